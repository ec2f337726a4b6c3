"""What every method shares: the step context it is given, the result it returns, and the
supervised (teacher-forced) step of SFT, KD, SeqKD, DistiLLM and GKD.

A method never sees the trainer. `setup(ctx)` and `step(ctx, micro_batches)` receive a
`StepContext`: the few operations a step needs (forwards with autocast, sampling, the global
token count and loss scale, backward, an update of a parameter set, reductions over processes).
`promptkd.training.context.TrainingContext` implements it for real training.

A forward returns `promptkd.losses.Outputs`: final hidden states and the model's LM head, or full
logits when the head cannot be chunked; `promptkd.losses.loss_terms` takes either, chunk by chunk,
so a method's step is written once. When teacher and student tokenize differently, the teacher's
forwards return `promptkd.cross_tokenizer.Aligned` outputs on its own tokenization and
`distill_terms` compares them over aligned groups of tokens; with one tokenizer it is `loss_terms`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from promptkd.cross_tokenizer import Aligned, cross_terms
from promptkd.data.batch import SequenceBatch
from promptkd.losses import CROSS_ENTROPY, Divergence, Outputs, Term, loss_terms
from promptkd.models.head import LMHead, hidden_states_for_response
from promptkd.models.prompted_teacher import PromptedTeacher
from promptkd.sampling import response_logits

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


def outputs_of(model: torch.nn.Module, batch: SequenceBatch, head: LMHead | None, vocab_size: int,
               **kwargs) -> Outputs:
    """`model`'s predictions for the response columns, in the caller's grad mode, train / eval mode
    and autocast: (B, R, H) final hidden states and `head` (no logits computed), or, with head
    None, (B, R, V) logits. `model` is a causal LM (DDP / PEFT-wrapped or not) or a
    PromptedTeacher (`base=True`: without its prompt). Under no_grad the head is detached too: the
    result is a target no gradient reaches."""
    device_type = batch.input_ids.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if head is None:
        if isinstance(model, PromptedTeacher):
            forward = model.forward_base if kwargs.pop("base", False) else model
            keep = batch.input_ids.shape[1] - batch.prompt_length + 1
            logits = forward(batch.input_ids, batch.attention_mask, logits_to_keep=keep)[:, :-1, :vocab_size]
        else:
            logits = response_logits(model, batch, vocab_size, **kwargs)
        return Outputs(logits, None, dtype)  # (B, R, V)
    hidden = hidden_states_for_response(model, batch, **kwargs)  # (B, R, H)
    return Outputs(hidden, head if torch.is_grad_enabled() else head.detached(), dtype)


class StepContext(Protocol):
    """The operations a method may use; see promptkd.training.context.TrainingContext.

    Attributes: `step` (optimizer steps done before this one), `epoch` (passes over the training
    data, this step's batch included), `max_steps`, `vocab_size` (logit columns comparable
    between student and teacher), `tokenizer` (the student's), `teacher_tokenizer` (the teacher's; the
    same object when they match), `teacher` (the frozen teacher or None), `device`,
    `student_module` (the unwrapped student, for inspection), `is_main_process`,
    `num_processes`, `process_index`, `seed` (train.seed), `extra_examples` (a method's own data
    by config key, read and tokenised like the training data: {"minillm.lm_data": [...]}).
    """

    step: int
    epoch: float
    max_steps: int
    vocab_size: int
    tokenizer: Any
    teacher_tokenizer: Any
    teacher: torch.nn.Module | None
    device: torch.device
    student_module: torch.nn.Module
    is_main_process: bool
    num_processes: int
    process_index: int
    seed: int
    extra_examples: dict[str, list]

    def phase(self, name: str) -> contextlib.AbstractContextManager: ...
    def sample(self, examples: Sequence, *, from_teacher: bool = False, teacher_mix: float = 0.0) -> SequenceBatch: ...
    def collate(self, examples: Sequence) -> SequenceBatch: ...
    def student_forward(self, batch: SequenceBatch, *, target: bool = False, logits: bool = False) -> Outputs: ...
    def teacher_forward(self, batch: SequenceBatch, *, model: torch.nn.Module | None = None, base: bool = False,
                        grad: bool = False, logits: bool = False) -> Outputs | Aligned: ...
    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager: ...
    def backward(self, loss_sum: torch.Tensor, tokens: float) -> None: ...
    def add_parameter_set(self, name: str, params: list, *, learning_rate: float | None, weight_decay: float) -> None: ...
    def apply_update(self, name: str, loss_value: float) -> dict[str, float]: ...
    def reduce_sum(self, value: float) -> float: ...
    def gather_object(self, obj) -> list: ...
    def dev_loss(self) -> float | None: ...


def distill_terms(trained: Outputs | Aligned, terms: Sequence[Term], mask: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """`promptkd.losses.loss_terms(trained, terms, mask)`, for outputs on one tokenization (the exact
    path). When trained or a target is `Aligned` (the teacher's tokenization of the batch), the
    cross-entropy terms still go through `loss_terms` on the student's tokens and the others through
    `promptkd.cross_tokenizer.cross_terms`, over aligned groups; the values keep the terms' order."""
    if not any(isinstance(x, Aligned) for x in (trained, *[target for _, target, _ in terms])):
        return loss_terms(trained, terms, mask)
    ids = [k for k, (_, target, _) in enumerate(terms) if isinstance(target, torch.Tensor)]
    rest = [k for k in range(len(terms)) if k not in ids]
    loss, values = cross_terms(trained, [terms[k] for k in rest])
    by_term = dict(zip(rest, values, strict=True))
    if ids:
        ce_loss, ce_values = loss_terms(trained, [terms[k] for k in ids], mask)
        loss = loss + ce_loss
        by_term.update(zip(ids, ce_values, strict=True))
    return loss, [by_term[k] for k in range(len(terms))]


def response_mask(batch: SequenceBatch) -> torch.Tensor:
    """(B, T - P) bool: the response positions in the loss, aligned with a forward's outputs."""
    return batch.loss_mask[:, batch.prompt_length :]


def step_tokens(ctx: StepContext, batches: Sequence[SequenceBatch]) -> float:
    """The response tokens of this optimizer step, over its micro-batches and all processes: the
    denominator of every token mean (`ctx.backward(loss_sum, tokens)`)."""
    return ctx.reduce_sum(sum(float(response_mask(b).sum()) for b in batches))


class Method:
    """A distillation method: its options (its own config section), its setup and its step.

    The trainer owns the student's parameter set ("student"); a method may add its own in
    `setup` (PromptKD's soft prompt) with `ctx.add_parameter_set`, and then saves its tensors
    through `state_dict` / `load_state_dict` and its artefacts through `export`.
    """

    name = "base"
    # sampling.eos_at_cap when the config leaves it null: whether the student's samples that
    # hit max_new_tokens get EOS as their last token
    eos_at_cap_default = False

    # True: trains on data.teacher_responses (SeqKD) instead of data.train
    trains_on_teacher_responses = False

    def __init__(self, options=None):
        self.options = options  # the method's config section (cfg.<method>); None for methods without one

    @classmethod
    def needs_teacher(cls, options) -> bool:
        return True

    @classmethod
    def needs_references(cls, options) -> bool:
        """Whether training records must carry a reference response (on-policy methods: no)."""
        return True

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
                    div: Divergence | None = None) -> StepResult:
    """(1 - kd_ratio) CE + kd_ratio divergence(student, teacher) on given sequences, one update.

    Used by SFT (kd_ratio 0), KD, SeqKD, DistiLLM and GKD, with one tokenizer or two
    (`distill_terms`). Token-level mean over every response
    token of the optimizer step (the global count across micro-batches and processes). CE and the
    divergence are one `loss_terms` pass (CE at weight 0, as GKD has it, is logged only).
    """
    global_tokens = step_tokens(ctx, batches)
    ce_sum = kd_sum = 0.0
    for i, batch in enumerate(batches):
        with ctx.accumulate(is_last=i == len(batches) - 1):
            targets = batch.input_ids[:, batch.prompt_length :]  # (B, R)
            terms = [(CROSS_ENTROPY, targets, 1.0 - kd_ratio)]
            student = ctx.student_forward(batch)  # with grad
            if kd_ratio > 0:
                terms.append((div, ctx.teacher_forward(batch), kd_ratio))  # no grad
            with ctx.phase("losses"):
                loss, values = distill_terms(student, terms, response_mask(batch))
            del student, terms  # the loss holds its gradients: the outputs go before the backward
            ce_sum += values[0]
            kd_sum += values[1] if kd_ratio > 0 else 0.0
            ctx.backward(loss, global_tokens)
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
