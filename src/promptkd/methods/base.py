"""What every method shares: the step context it is given, the result it returns, and the
supervised (teacher-forced) step of SFT, KD, SeqKD and GKD's off-policy steps.

A method never sees the trainer. `setup(ctx)` and `step(ctx, micro_batches)` receive a
`StepContext`: the few operations a step needs (forward passes with autocast, sampling,
response logits, the global token count and loss scale, backward, an update of a parameter
set, reductions over processes). `promptkd.training.context.TrainingContext` implements it for
real training; a test can drive a method with a fake one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from promptkd.data.batch import SequenceBatch
from promptkd.losses import get_divergence

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one optimizer step of a method reports.

    metrics:          scalars for metrics.jsonl and the progress bar (means over the whole step,
                      already reduced over processes).
    trained_tokens:   response tokens in this process's losses, summed over its micro-batches.
    generated_tokens: tokens this process sampled for the step, by the student or the teacher
                      (0 for steps on dataset responses).
    """

    metrics: dict[str, float]
    trained_tokens: float
    generated_tokens: float = 0.0


class StepContext(Protocol):
    """The operations a method may use; see promptkd.training.context.TrainingContext.

    Attributes: `step` (optimizer steps done before this one), `epoch` (passes over the training
    data, this step's batch included), `max_steps`, `vocab_size` (logit columns comparable
    between student and teacher), `tokenizer`, `teacher` (the frozen teacher or None), `device`,
    `student_module` (the unwrapped student, for inspection), `is_main_process`,
    `num_processes`, `process_index`.
    """

    step: int
    epoch: float
    max_steps: int
    vocab_size: int
    tokenizer: Any
    teacher: torch.nn.Module | None
    device: torch.device
    student_module: torch.nn.Module
    is_main_process: bool
    num_processes: int
    process_index: int

    def phase(self, name: str) -> contextlib.AbstractContextManager: ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def sample(self, examples: Sequence, *, from_teacher: bool = False, teacher_mix: float = 0.0) -> SequenceBatch: ...
    def collate(self, examples: Sequence) -> SequenceBatch: ...
    def student_logits(self, batch: SequenceBatch) -> torch.Tensor: ...
    def student_target_logits(self, batch: SequenceBatch) -> torch.Tensor: ...
    def teacher_logits(self, batch: SequenceBatch) -> torch.Tensor: ...
    def global_token_count(self, batches: Sequence[SequenceBatch]) -> float: ...
    def loss_scale(self, global_tokens: float) -> float: ...
    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def add_parameter_set(self, name: str, params: list, *, learning_rate: float, weight_decay: float) -> None: ...
    def apply_update(self, name: str, loss_value: float) -> dict[str, float]: ...
    def all_reduce_grads(self, params: list) -> None: ...
    def reduce_sum(self, value: float) -> float: ...
    def gather_object(self, obj) -> list: ...
    def dev_loss(self) -> float | None: ...
    def load_examples(self, source: str) -> list: ...


def response_mask(batch: SequenceBatch) -> torch.Tensor:
    """(B, T - P) bool: the response positions in the loss, aligned with `response_logits`."""
    return batch.loss_mask[:, batch.prompt_length :]


def divergence(name: str, *, beta: float = 0.5, alpha: float = 0.1):
    """The divergence function `name` with the one knob it takes (generalized_jsd: beta; skew KLs: alpha)."""
    params = {"generalized_jsd": {"beta": beta}, "skew_forward_kl": {"alpha": alpha}, "skew_reverse_kl": {"alpha": alpha}}
    return get_divergence(name, **params.get(name, {}))


class Method:
    """A distillation method: its config, its setup and its optimizer step.

    The trainer owns the student's parameter set ("student"); a method may add its own in
    `setup` (PromptKD's soft prompt) with `ctx.add_parameter_set`, and then saves its tensors
    through `state_dict` / `load_state_dict` and its artefacts through `export`.
    """

    name = "base"
    # sampling.eos_at_cap when the config leaves it null: whether the student's samples that
    # hit max_new_tokens get EOS as their last token
    eos_at_cap_default = False

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def needs_teacher(cls, cfg) -> bool:
        return True

    @classmethod
    def needs_references(cls, cfg) -> bool:
        """Whether training records must carry a reference response (on-policy methods: no)."""
        return True

    def train_source(self) -> str | None:
        """The training data this method reads when none is passed as an object (data.train)."""
        return self.cfg.data.train

    def check_train_records(self, records, *, source: str, is_main_process: bool) -> None:
        """A hook to warn about training records (SeqKD: teacher responses without `ended`)."""

    def setup(self, ctx: StepContext) -> None:
        pass

    def step(self, ctx: StepContext, micro_batches: list[list]) -> StepResult:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def export(self, out_dir) -> None:
        pass


def supervised_step(ctx: StepContext, batches: list[SequenceBatch], *, kd_ratio: float = 0.0,
                    div=None) -> StepResult:
    """(1 - kd_ratio) CE + kd_ratio divergence(student, teacher) on given sequences, one update.

    Used by SFT (kd_ratio 0), KD, SeqKD and GKD. Token-level mean over every response token of
    the optimizer step (the global count across micro-batches and processes).
    """
    global_tokens = ctx.global_token_count(batches)
    scale = ctx.loss_scale(global_tokens)
    ce_sum = kd_sum = 0.0
    for i, batch in enumerate(batches):
        with ctx.accumulate(is_last=i == len(batches) - 1):
            mask = response_mask(batch)  # (B, R)
            logits = ctx.student_logits(batch)  # (B, R, V)
            targets = batch.input_ids[:, batch.prompt_length :]  # (B, R)
            with ctx.phase("losses"):
                ce = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
            loss = (1.0 - kd_ratio) * ce
            if kd_ratio > 0:
                teacher_logits = ctx.teacher_logits(batch)  # (B, R, V), no grad
                with ctx.phase("losses"):
                    kd = div(logits, teacher_logits, mask, reduction="sum")
                loss = loss + kd_ratio * kd
                kd_sum += float(kd.detach())
            ce_sum += float(ce.detach())
            ctx.backward(loss * scale)
    ce_mean = ctx.reduce_sum(ce_sum) / max(global_tokens, 1.0)
    metrics = {"student/ce": ce_mean}
    loss_value = (1.0 - kd_ratio) * ce_mean
    if kd_ratio > 0:
        kd_mean = ctx.reduce_sum(kd_sum) / max(global_tokens, 1.0)
        metrics["student/kd"] = kd_mean
        loss_value += kd_ratio * kd_mean
    metrics["student/loss"] = loss_value
    metrics.update(ctx.apply_update("student", loss_value))
    return StepResult(metrics, trained_tokens=sum(float(response_mask(b).sum()) for b in batches))
