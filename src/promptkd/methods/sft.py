"""SFT: cross-entropy on reference responses, no teacher (also how inits and teachers are prepared).

    promptkd train --config configs/sft.yaml
"""

from __future__ import annotations

from promptkd.methods.base import Method


class SFT(Method):
    name = "sft"

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        return False

    def step(self, micro_batches):
        batches = [self.trainer.collate(mb) for mb in micro_batches]
        return self.supervised_step(batches)
