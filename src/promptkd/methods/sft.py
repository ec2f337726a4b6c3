"""SFT: cross-entropy on reference responses, no teacher (also how inits and teachers are prepared).

    promptkd train --config configs/sft.yaml
"""

from __future__ import annotations

from promptkd.methods.base import Method, StepContext, StepResult, supervised_step


class SFT(Method):
    name = "sft"

    @classmethod
    def needs_teacher(cls, options) -> bool:
        return False

    def step(self, ctx: StepContext, micro_batches: list[list]) -> StepResult:
        return supervised_step(ctx, [ctx.collate(mb) for mb in micro_batches])
