"""GKD / ImitKD: on-policy distillation with a per-token divergence.

    promptkd train --config configs/gkd.yaml     # lmbda 1, beta 1: on-policy reverse KL

Each optimizer step is on-policy (the student's own samples) with probability `lmbda`, else
off-policy (dataset responses, or teacher samples with `seq_kd`). The draw is a function of the
seed and the step only, so every process and every resumed run makes the same choice. With
lmbda = 1 and beta = 1 this is PromptKD's "no student-friendly prompt" ablation.
"""

from __future__ import annotations

import torch

from promptkd.losses import divergence
from promptkd.methods.base import Method, StepContext, StepResult, supervised_step


class GKD(Method):
    name = "gkd"

    @classmethod
    def needs_references(cls, options) -> bool:
        return options.lmbda < 1.0 and not options.seq_kd  # off-policy steps train on dataset responses

    def setup(self, ctx: StepContext) -> None:
        c = self.options
        self.div = divergence(c.divergence, beta=c.beta, alpha=c.alpha, ab_alpha=c.ab_alpha, ab_beta=c.ab_beta)

    def on_policy(self, step: int, seed: int) -> bool:
        g = torch.Generator().manual_seed(seed * 7919 + step)
        return bool(torch.rand((), generator=g) < self.options.lmbda)

    def step(self, ctx: StepContext, micro_batches: list[list]) -> StepResult:
        on_policy = self.on_policy(ctx.step, ctx.seed)
        if on_policy:
            batches = [ctx.sample(mb) for mb in micro_batches]
        elif self.options.seq_kd:
            batches = [ctx.sample(mb, from_teacher=True) for mb in micro_batches]
        else:
            batches = [ctx.collate(mb) for mb in micro_batches]
        result = supervised_step(ctx, batches, kd_ratio=1.0, div=self.div)
        result.metrics["on_policy"] = float(on_policy)
        if on_policy or self.options.seq_kd:  # sampled by the student or the teacher
            result.generated_tokens = result.trained_tokens
        return result
