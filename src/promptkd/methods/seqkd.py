"""SeqKD: the student trains on teacher-generated responses, 0.5 CE + 0.5 forward KL by default.

    promptkd generate --model TEACHER --data train.jsonl --out teacher_responses.jsonl
    promptkd train --config configs/seqkd.yaml --data.teacher_responses teacher_responses.jsonl

The reference's SeqKD scripts train with --type kd --kd-ratio 0.5 (gmkim-ai/PromptKD
scripts/gpt2/seqkd/seqkd_base.sh:61,80); `seqkd.kd_ratio 0` trains with CE alone and needs no
teacher. Each generated record says whether its response ended with EOS (`ended`); a response
cut at max_new_tokens gets no EOS appended, so the student does not learn to stop
mid-sentence. Files written before that flag existed still train (every response gets an EOS),
with a warning.
"""

from __future__ import annotations

import logging

from promptkd.losses import divergence
from promptkd.methods.base import Method, StepContext, StepResult, supervised_step

logger = logging.getLogger(__name__)


class SeqKD(Method):
    name = "seqkd"
    trains_on_teacher_responses = True

    @classmethod
    def needs_teacher(cls, options) -> bool:
        return options.kd_ratio > 0

    def check_train_records(self, records, *, source: str, is_main_process: bool) -> None:
        num_flagless = sum("ended" not in r.metadata for r in records)
        if num_flagless and is_main_process:
            logger.warning(
                "teacher responses %s: %d of %d records have no 'ended' flag; they may have been "
                "cut at max_new_tokens, yet each gets an EOS, which teaches the student to stop "
                "mid-sentence: regenerate the file with the current `promptkd generate`",
                source, num_flagless, len(records),
            )

    def setup(self, ctx: StepContext) -> None:
        self.div = divergence("forward_kl")

    def step(self, ctx: StepContext, micro_batches: list[list]) -> StepResult:
        batches = [ctx.collate(mb) for mb in micro_batches]
        return supervised_step(ctx, batches, kd_ratio=self.options.kd_ratio, div=self.div)
