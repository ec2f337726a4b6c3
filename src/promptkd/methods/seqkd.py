"""SeqKD: the student trains on teacher-generated responses (CE, optional forward-KL term).

    promptkd generate --model TEACHER --data train.jsonl --out teacher_responses.jsonl
    promptkd train --config configs/seqkd.yaml --data.teacher_responses teacher_responses.jsonl

Each generated record says whether its response ended with EOS (`ended`); a response cut at
max_new_tokens gets no EOS appended, so the student does not learn to stop mid-sentence.
Files written before that flag existed still train (every response gets an EOS), with a warning.
"""

from __future__ import annotations

import logging

from promptkd.methods.base import Method

logger = logging.getLogger(__name__)


class SeqKD(Method):
    name = "seqkd"

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        return cfg.seqkd.kd_ratio > 0

    def load_train_examples(self, source=None):
        source = self.cfg.data.teacher_responses
        examples = super().load_train_examples(source)
        num_flagless = sum("ended" not in ex.metadata for ex in examples)
        if num_flagless and self.trainer.accelerator.is_main_process:
            logger.warning(
                "teacher responses %s: %d of %d records have no 'ended' flag; they may have been "
                "cut at max_new_tokens, yet each gets an EOS, which teaches the student to stop "
                "mid-sentence: regenerate the file with the current `promptkd generate`",
                source, num_flagless, len(examples),
            )
        return examples

    def setup(self):
        self.div = self.divergence("forward_kl")

    def step(self, micro_batches):
        batches = [self.trainer.collate(mb) for mb in micro_batches]
        return self.supervised_step(batches, kd_ratio=self.cfg.seqkd.kd_ratio, divergence=self.div)
