"""KD: (1 - r) * CE + r * token-level divergence to the teacher on reference responses.

    promptkd train --config configs/kd.yaml            # r = 0.5, forward KL (MiniLLM / PromptKD's KD baseline)
    promptkd train --config configs/kd.yaml --kd.divergence skew_forward_kl   # DistiLLM SKL
"""

from __future__ import annotations

from promptkd.losses import divergence
from promptkd.methods.base import Method, StepContext, StepResult, supervised_step


class KD(Method):
    name = "kd"

    def setup(self, ctx: StepContext) -> None:
        c = self.options
        self.div = divergence(c.divergence, beta=c.beta, alpha=c.alpha, ab_alpha=c.ab_alpha, ab_beta=c.ab_beta)

    def step(self, ctx: StepContext, micro_batches: list[list]) -> StepResult:
        batches = [ctx.collate(mb) for mb in micro_batches]
        return supervised_step(ctx, batches, kd_ratio=self.options.kd_ratio, div=self.div)
