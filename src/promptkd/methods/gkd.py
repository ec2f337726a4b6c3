"""GKD / ImitKD: on-policy distillation with a per-token divergence (SPEC 5).

    promptkd train --config configs/gkd.yaml     # lmbda 1, beta 1: on-policy reverse KL

Each optimizer step is on-policy (the student's own samples) with probability `lmbda`, else
off-policy (dataset responses, or teacher samples with `seq_kd`). The draw is a function of the
seed and the step only, so every process and every resumed run makes the same choice. With
lmbda = 1 and beta = 1 this is PromptKD's "no student-friendly prompt" ablation.
"""

from __future__ import annotations

import torch

from promptkd.methods.base import Method


class GKD(Method):
    name = "gkd"

    def setup(self):
        c = self.cfg.gkd
        self.div = self.divergence(c.divergence, beta=c.beta, alpha=c.alpha)

    def on_policy(self, step: int) -> bool:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + step)
        return bool(torch.rand((), generator=g) < self.cfg.gkd.lmbda)

    def step(self, micro_batches):
        tr = self.trainer
        on_policy = self.on_policy(tr.step)
        if on_policy:
            batches = [tr.sample(mb) for mb in micro_batches]
        elif self.cfg.gkd.seq_kd:
            batches = [tr.sample(mb, model=tr.teacher) for mb in micro_batches]
        else:
            batches = [tr.collate(mb) for mb in micro_batches]
        out = self.supervised_step(batches, kd_ratio=1.0, divergence=self.div)
        out["on_policy"] = float(on_policy)
        if on_policy:
            out["_generated_tokens"] = out["_trained_tokens"]
        return out
