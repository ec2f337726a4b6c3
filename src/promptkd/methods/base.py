"""What every method shares: data loading and the supervised (reference-response) step."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from promptkd.losses import get_divergence

logger = logging.getLogger(__name__)


class Method:
    """A distillation method. Subclasses set `name` and implement `step`.

    The trainer owns the student, its optimizer and scheduler; a method may add its own
    parameter sets (PromptKD's soft prompt) in `setup` and must then save them through
    `extra_state_dict` / `load_extra_state_dict` and `export`.
    """

    name = "base"
    # sampling.eos_at_cap when the config leaves it null: whether the student's samples that hit
    # max_new_tokens get EOS as their last token
    eos_at_cap_default = False

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        return True

    # ---------------------------------------------------------------- data
    def load_train_examples(self, source: str | None = None):
        from promptkd.data.dataset import build_examples
        from promptkd.data.records import load_records

        data = self.cfg.data
        source = source or data.train
        if source == data.train:
            records = load_records(source, split=data.train_split, data_files=data.train_data_files)
        else:  # another file (seqkd's teacher responses): data.train's split and data_files are not its own
            records = load_records(source)
        examples, stats = build_examples(
            records,
            self.trainer.tokenizer,
            template=data.template,
            max_prompt_length=data.max_prompt_length,
            max_length=data.max_length,
            max_response_length=data.max_response_length,
            source=source,
        )
        if self.trainer.accelerator.is_main_process:
            logger.warning("training data %s: %s", source, stats.summary())
        if data.max_train_examples:
            examples = examples[: data.max_train_examples]
        return examples

    # ---------------------------------------------------------------- hooks
    def setup(self) -> None:
        pass

    def step(self, micro_batches: list[list]) -> dict:
        raise NotImplementedError

    def extra_state_dict(self) -> dict:
        return {}

    def load_extra_state_dict(self, state: dict) -> None:
        pass

    def export(self, out_dir) -> None:
        pass

    # ---------------------------------------------------------------- shared pieces
    def sync_context(self, is_last_micro_batch: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        tr = self.trainer
        if is_last_micro_batch or tr.accelerator.num_processes == 1:
            return contextlib.nullcontext()
        return tr.accelerator.no_sync(tr.student)

    def divergence(self, name: str, *, beta: float = 0.5, alpha: float = 0.1):
        params = {"generalized_jsd": {"beta": beta}, "skew_forward_kl": {"alpha": alpha}, "skew_reverse_kl": {"alpha": alpha}}
        return get_divergence(name, **params.get(name, {}))

    def teacher_logits(self, batch):
        """Plain (un-prompted) teacher logits on the response columns, no grad."""
        tr = self.trainer
        with torch.no_grad():
            return tr.response_logits(tr.teacher, batch)

    def supervised_step(self, batches, *, kd_ratio: float = 0.0, divergence=None, prefix: str = "student") -> dict:
        """(1 - kd_ratio) * CE + kd_ratio * divergence(student, teacher) on given sequences.

        Used by SFT (kd_ratio 0), KD, SeqKD and GKD's off-policy steps. Token-level mean over
        all response tokens of the optimizer step (global count across micro-batches/processes).
        """
        tr = self.trainer
        scale = tr.loss_scale(tr.global_token_count(batches))
        ce_sum = kd_sum = 0.0
        for i, batch in enumerate(batches):
            with self.sync_context(i == len(batches) - 1):
                mask = tr.response_mask(batch)  # (B, R)
                logits = tr.response_logits(tr.student, batch)  # (B, R, V)
                targets = batch.input_ids[:, batch.prompt_length :]  # (B, R)
                ce = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
                loss = (1.0 - kd_ratio) * ce
                ce_sum += float(ce.detach())
                if kd_ratio > 0:
                    kd = divergence(logits, self.teacher_logits(batch), mask, reduction="sum")
                    loss = loss + kd_ratio * kd
                    kd_sum += float(kd.detach())
                tr.accelerator.backward(loss * scale)
        tokens = tr.global_token_count(batches)
        ce_mean = tr.reduce_sum(ce_sum) / max(tokens, 1.0)
        out = {f"{prefix}/ce": ce_mean}
        loss_value = (1.0 - kd_ratio) * ce_mean
        if kd_ratio > 0:
            kd_mean = tr.reduce_sum(kd_sum) / max(tokens, 1.0)
            out[f"{prefix}/kd"] = kd_mean
            loss_value += kd_ratio * kd_mean
        out[f"{prefix}/loss"] = loss_value
        out.update(tr.apply_update(prefix, tr.student_optimizer, tr.student_scheduler, tr.student.parameters(), loss_value))
        out["_trained_tokens"] = sum(float(tr.response_mask(b).sum()) for b in batches)
        return out
