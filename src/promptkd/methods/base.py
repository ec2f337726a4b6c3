"""What every method shares: the step context it is given, the result it returns, the two
forms a model's outputs take in a loss, and the supervised (teacher-forced) step of SFT, KD,
SeqKD, DistiLLM and GKD.

A method never sees the trainer. `setup(ctx)` and `step(ctx, micro_batches)` receive a
`StepContext`: the few operations a step needs (forward passes with autocast, sampling,
response logits or hidden states, the global token count and loss scale, backward, an update
of a parameter set, reductions over processes). `promptkd.training.context.TrainingContext`
implements it for real training; a test can drive a method with a fake one.

Outputs. With `ctx.chunked` (train.chunked_lm_head, on unless a head cannot be chunked) a
forward returns `HiddenStates` (the (B, R, H) final hidden states and the model's LM head)
instead of (B, R, V) logits; `Divergence` and `divergence_terms` take either form, so a method's
step is written once. On hidden states the losses run through `promptkd.head_losses`, a chunk of
positions at a time, and no (B, R, V) tensor is built in any pass.
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
from promptkd.head_losses import (
    CrossEntropyTerm,
    HeadTerm,
    LMHead,
    head_divergence,
    head_divergences,
    hidden_states_for_response,
)
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


@dataclass(frozen=True, eq=False)
class HiddenStates:
    """A model's outputs on the response columns in the chunked form: hidden states + LM head.

    hidden:         (B, R, H) final hidden states predicting the response columns (aligned with
                    `response_mask`), as `promptkd.head_losses.hidden_states_for_response`
                    captures them; with or without grad, as the forward ran.
    head:           the model's LMHead (`lm_head_of`), cut to the compared vocabulary.
    autocast_dtype: the autocast dtype the forward ran under (None: none). The head's matmul
                    runs in it too, as the model's own head would (`head_autocast`).
    """

    hidden: torch.Tensor
    head: LMHead
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def of(cls, model: torch.nn.Module, batch: SequenceBatch, head: LMHead, **kwargs) -> HiddenStates:
        """Run `model` (a causal LM, DDP / PEFT-wrapped or not, or a PromptedTeacher; `base=True`
        for its un-prompted forward) on `batch` in the caller's grad mode, train / eval mode and
        autocast, and keep its (B, R, H) hidden states: the LM head computes nothing. Under
        no_grad the head is detached too: like no-grad logits, the result is a target that no
        gradient reaches (the student's head weight requires grad)."""
        hidden = hidden_states_for_response(model, batch, **kwargs)  # (B, R, H)
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return cls(hidden, head if torch.is_grad_enabled() else head.detached(), dtype)

    def detach(self) -> HiddenStates:
        """A target that gets no gradient (like `logits.detach()`): hidden states and head weight."""
        return HiddenStates(self.hidden.detach(), self.head.detached(), self.autocast_dtype)

    def head_autocast(self) -> contextlib.AbstractContextManager:
        """Around a loss on these hidden states: the head's matmul in the forward's autocast dtype."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.hidden.device.type, dtype=self.autocast_dtype)


Outputs = torch.Tensor | HiddenStates
"""A model's outputs on the response columns: (B, R, V) logits or `HiddenStates`."""


class StepContext(Protocol):
    """The operations a method may use; see promptkd.training.context.TrainingContext.

    Attributes: `step` (optimizer steps done before this one), `epoch` (passes over the training
    data, this step's batch included), `max_steps`, `vocab_size` (logit columns comparable
    between student and teacher), `tokenizer`, `teacher` (the frozen teacher or None), `device`,
    `student_module` (the unwrapped student, for inspection), `is_main_process`,
    `num_processes`, `process_index`; `chunked` (True: the losses take the `*_hidden` forwards'
    HiddenStates, no (B, R, V) logits; False: the `*_logits` forwards), `student_head` and
    `teacher_head` (the models' LMHeads; None when not chunked or without a teacher).
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
    chunked: bool
    student_head: LMHead | None
    teacher_head: LMHead | None

    def phase(self, name: str) -> contextlib.AbstractContextManager: ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def sample(self, examples: Sequence, *, from_teacher: bool = False, teacher_mix: float = 0.0) -> SequenceBatch: ...
    def collate(self, examples: Sequence) -> SequenceBatch: ...
    def student_logits(self, batch: SequenceBatch) -> torch.Tensor: ...
    def student_target_logits(self, batch: SequenceBatch) -> torch.Tensor: ...
    def teacher_logits(self, batch: SequenceBatch) -> torch.Tensor: ...
    def student_hidden(self, batch: SequenceBatch) -> HiddenStates: ...
    def student_target_hidden(self, batch: SequenceBatch) -> HiddenStates: ...
    def teacher_hidden(self, batch: SequenceBatch) -> HiddenStates: ...
    def global_token_count(self, batches: Sequence[SequenceBatch]) -> float: ...
    def loss_scale(self, global_tokens: float) -> float: ...
    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def add_parameter_set(self, name: str, params: list, *, learning_rate: float, weight_decay: float) -> None: ...
    def apply_update(self, name: str, loss_value: float) -> dict[str, float]: ...
    def snapshot_update(self, name: str) -> dict: ...
    def restore_update(self, name: str, snapshot: dict) -> None: ...
    def all_reduce_grads(self, params: list) -> None: ...
    def reduce_sum(self, value: float) -> float: ...
    def gather_object(self, obj) -> list: ...
    def dev_loss(self) -> float | None: ...
    def load_examples(self, source: str) -> list: ...


def response_mask(batch: SequenceBatch) -> torch.Tensor:
    """(B, T - P) bool: the response positions in the loss, aligned with `response_logits`."""
    return batch.loss_mask[:, batch.prompt_length :]


def student_outputs(ctx: StepContext, batch: SequenceBatch) -> Outputs:
    """The student's outputs with grad (train mode): HiddenStates when ctx.chunked, else logits."""
    return ctx.student_hidden(batch) if ctx.chunked else ctx.student_logits(batch)


def student_target_outputs(ctx: StepContext, batch: SequenceBatch) -> Outputs:
    """The student's outputs as a target: eval mode, no grad."""
    return ctx.student_target_hidden(batch) if ctx.chunked else ctx.student_target_logits(batch)


class Divergence:
    """A token-level divergence of promptkd.losses by name, on either form of outputs.

    `div(outputs, target, mask, reduction=...)`: on (B, R, V) logits it is the divergence
    function itself; on HiddenStates it is `head_divergence` (chunked over positions, the head
    matmul in the forward's autocast dtype). The first argument is the trained distribution q,
    the second the target p, as everywhere in promptkd.losses.
    """

    def __init__(self, name: str, **params):
        self.fn = get_divergence(name, **params)  # UserError: unknown name / bad parameter
        self.name = name
        self.params = params

    def __repr__(self) -> str:
        return f"Divergence({self.name!r}, {self.params})"

    def __call__(self, outputs: Outputs, target: Outputs, mask: torch.Tensor, *,
                 reduction: str = "mean") -> torch.Tensor:
        if isinstance(outputs, HiddenStates):
            with outputs.head_autocast():
                return head_divergence(self.name, outputs.hidden, outputs.head, target.hidden, target.head, mask,
                                       reduction=reduction, **self.params)
        return self.fn(outputs, target, mask, reduction=reduction)


def divergence(name: str, *, beta: float = 0.5, alpha: float = 0.1) -> Divergence:
    """The divergence `name` with the one knob it takes (generalized_jsd: beta; skew KLs: alpha)."""
    params = {"generalized_jsd": {"beta": beta}, "skew_forward_kl": {"alpha": alpha}, "skew_reverse_kl": {"alpha": alpha}}
    return Divergence(name, **params.get(name, {}))


def divergence_terms(outputs: Outputs, terms: Sequence[tuple[Divergence, Outputs, float]],
                     mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Several divergences of one trained side: (sum_k weight_k D_k, [D_k detached]), summed over `mask`.

    terms: (divergence, target outputs, weight); weight 0 = the value only (a logged distance,
    no gradient work). On HiddenStates one `head_divergences` pass computes every term, the
    trained side's logits once per chunk. On logits each term is its own divergence call, the
    weight-0 ones under no_grad. Gradients flow into whatever requires them.
    """
    if isinstance(outputs, HiddenStates):
        head_terms = [HeadTerm(div.name, target.hidden, target.head, weight, div.params)
                      for div, target, weight in terms]
        with outputs.head_autocast():
            loss, per_term = head_divergences(outputs.hidden, outputs.head, head_terms, mask, reduction="sum")
        return loss, list(per_term.unbind())
    loss, values = None, []
    for div, target, weight in terms:
        if weight:
            value = div(outputs, target, mask, reduction="sum")
            loss = (value if weight == 1.0 else weight * value) if loss is None else loss + weight * value
        else:
            with torch.no_grad():
                value = div(outputs, target, mask, reduction="sum")
        values.append(value.detach())
    if loss is None:
        loss = torch.zeros((), device=mask.device)
    return loss, values


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
                    div: Divergence | None = None) -> StepResult:
    """(1 - kd_ratio) CE + kd_ratio divergence(student, teacher) on given sequences, one update.

    Used by SFT (kd_ratio 0), KD, SeqKD, DistiLLM and GKD. Token-level mean over every response
    token of the optimizer step (the global count across micro-batches and processes). With
    ctx.chunked, CE and the divergence come from one `head_divergences` pass over the student's
    hidden states (its logits once per chunk; CE at weight 0, as GKD has it, costs no gradient).
    """
    global_tokens = ctx.global_token_count(batches)
    scale = ctx.loss_scale(global_tokens)
    ce_sum = kd_sum = 0.0
    for i, batch in enumerate(batches):
        with ctx.accumulate(is_last=i == len(batches) - 1):
            mask = response_mask(batch)  # (B, R)
            targets = batch.input_ids[:, batch.prompt_length :]  # (B, R)
            outputs = student_outputs(ctx, batch)  # (B, R, V) logits or (B, R, H) HiddenStates, with grad
            if isinstance(outputs, HiddenStates):
                terms = [CrossEntropyTerm(targets, 1.0 - kd_ratio)]
                if kd_ratio > 0:
                    teacher = ctx.teacher_hidden(batch)  # (B, R, H_t), no grad
                    terms.append(HeadTerm(div.name, teacher.hidden, teacher.head, kd_ratio, div.params))
                with ctx.phase("losses"), outputs.head_autocast():
                    loss, values = head_divergences(outputs.hidden, outputs.head, terms, mask, reduction="sum")
                ce_sum += float(values[0])
                if kd_ratio > 0:
                    kd_sum += float(values[1])
            else:
                with ctx.phase("losses"):
                    ce = F.cross_entropy(outputs[mask].float(), targets[mask], reduction="sum")
                loss = (1.0 - kd_ratio) * ce
                if kd_ratio > 0:
                    teacher_logits = ctx.teacher_logits(batch)  # (B, R, V), no grad
                    with ctx.phase("losses"):
                        kd = div(outputs, teacher_logits, mask, reduction="sum")
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
