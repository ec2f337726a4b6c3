"""KD: (1 - r) * CE + r * token-level divergence to the teacher on reference responses.

    promptkd train --config configs/kd.yaml            # r = 0.5, forward KL (SPEC 5)
    promptkd train --config configs/kd.yaml --kd.divergence skew_forward_kl   # DistiLLM SKL
"""

from __future__ import annotations

from promptkd.methods.base import Method


class KD(Method):
    name = "kd"

    def setup(self):
        c = self.cfg.kd
        self.div = self.divergence(c.divergence, beta=c.beta, alpha=c.alpha)

    def step(self, micro_batches):
        batches = [self.trainer.collate(mb) for mb in micro_batches]
        return self.supervised_step(batches, kd_ratio=self.cfg.kd.kd_ratio, divergence=self.div)
