"""SeqKD: the student trains on teacher-generated responses (CE, optional forward-KL term).

    promptkd generate --model TEACHER --data train.jsonl --out teacher_responses.jsonl
    promptkd train --config configs/seqkd.yaml --data.teacher_responses teacher_responses.jsonl
"""

from __future__ import annotations

from promptkd.methods.base import Method


class SeqKD(Method):
    name = "seqkd"

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        return cfg.seqkd.kd_ratio > 0

    def load_train_examples(self, source=None):
        return super().load_train_examples(self.cfg.data.teacher_responses)

    def setup(self):
        self.div = self.divergence("forward_kl")

    def step(self, micro_batches):
        batches = [self.trainer.collate(mb) for mb in micro_batches]
        return self.supervised_step(batches, kd_ratio=self.cfg.seqkd.kd_ratio, divergence=self.div)
