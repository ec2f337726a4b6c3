"""A `promptkd.methods.base.StepContext` for unit tests: plain CPU forwards, no accelerate."""

from __future__ import annotations

import contextlib
import logging

import torch

from promptkd.data.collate import collate_prompts, collate_sequences
from promptkd.errors import UserError
from promptkd.losses import Outputs
from promptkd.methods.base import outputs_of
from promptkd.models.head import lm_head_of
from promptkd.sampling import SamplingConfig, TeacherMixture, sample_responses
from promptkd.testing import byte_tokenizer

logger = logging.getLogger(__name__)


class FakeContext:
    """A `promptkd.methods.base.StepContext` for unit tests: plain CPU forwards, no accelerate.

    It drives a method's `setup` / `step` with tiny in-process models and records what the
    method asked for, in order, so a test can check the order of operations and the values:

    calls:    every operation as a tuple, e.g. ("sample", from_teacher), ("phase", name),
              ("apply_update", name, loss_value), ("backward", loss_value), ("accumulate", is_last).
    phases:   the names of the phases entered; open_phases: those not yet left (empty after a
              step, also one that raised).
    batches:  every batch `sample` / `collate` returned; grads: {set name: gradients as
              `apply_update` received them (None as zeros)} of the last update of that set.

    `sample` returns the queued `samples` first (pre-built SequenceBatches), then asks
    `sampler(examples, from_teacher=...)` when one is given, else samples with
    `promptkd.sampling.sample_responses` seeded by `seed` and the number of samples drawn so far
    (deterministic). Each parameter set gets a plain SGD (or AdamW) optimizer, no clipping, no
    schedule; the student's set ("student") is added here, as the trainer does.

    heads: forwards serve hidden states and LM heads, as the trainer does, falling back to full
    logits like it when a head cannot be used (`chunked_fallback` says why). Off by default here:
    forwards serve full logits, which tests of a method's losses can read.
    """

    def __init__(self, student, teacher=None, tokenizer=None, *, vocab_size: int | None = None,
                 max_steps: int = 10, samples=None, sampler=None, learning_rate: float = 1e-2,
                 optimizer: str = "sgd", max_new_tokens: int = 6, eos_at_cap: bool = False, seed: int = 0,
                 heads: bool = False, extra_examples: dict | None = None):
        self.student_module = student
        self.teacher = teacher
        self.tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
        self.teacher_tokenizer = self.tokenizer
        if vocab_size is None:
            sizes = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher) if m is not None]
            vocab_size = min(sizes)
        self.vocab_size = vocab_size
        self.step = 0
        self.epoch = 0.0
        self.max_steps = max_steps
        self.seed = seed
        self.device = torch.device("cpu")
        self.is_main_process = True
        self.num_processes = 1
        self.process_index = 0
        self.dev_losses: list[float] = []
        self.samples = list(samples or [])
        self.sampler = sampler
        self.optimizer = optimizer
        self.max_new_tokens = max_new_tokens
        self.eos_at_cap = eos_at_cap
        self.extra_examples = dict(extra_examples or {})
        self.calls: list[tuple] = []
        self.phases: list[str] = []
        self.open_phases: list[str] = []
        self.batches: list = []
        self.grads: dict[str, list[torch.Tensor]] = {}
        self.param_sets: dict[str, tuple[list, torch.optim.Optimizer]] = {}
        self.num_samples = 0
        self.student_head = self.teacher_head = None
        self.chunked_fallback: str | None = None
        if heads:
            try:
                heads = [lm_head_of(m, vocab_size) if m is not None else None for m in (student, teacher)]
            except UserError as err:
                self.chunked_fallback = str(err)
                logger.info("the losses use full logits: %s", err)
            else:
                self.student_head, self.teacher_head = heads
        self.add_parameter_set("student", [p for p in student.parameters() if p.requires_grad],
                               learning_rate=learning_rate, weight_decay=0.0)
        self.calls.clear()

    def calls_named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]

    # ------------------------------------------------------------ context managers
    def phase(self, name: str):
        @contextlib.contextmanager
        def entered():  # like the trainer's clock, a nested phase counts in the outermost only
            if not self.open_phases:
                self.calls.append(("phase", name))
                self.phases.append(name)
            self.open_phases.append(name)
            try:
                yield
            finally:
                self.open_phases.pop()

        return entered()

    def accumulate(self, is_last: bool):
        self.calls.append(("accumulate", is_last))
        return contextlib.nullcontext()

    # ------------------------------------------------------------ batches
    def sample(self, examples, *, from_teacher: bool = False, teacher_mix: float = 0.0):

        self.calls.append(("sample", from_teacher) + ((teacher_mix,) if teacher_mix else ()))
        if self.samples:
            batch = self.samples.pop(0)
        elif self.sampler is not None:
            batch = self.sampler(examples, from_teacher=from_teacher)
        else:
            model = self.teacher if from_teacher else self.student_module
            prompt_ids, prompt_mask = collate_prompts(examples, self.tokenizer.pad_token_id)
            config = SamplingConfig(max_new_tokens=self.max_new_tokens,
                                    eos_at_cap=self.eos_at_cap and not from_teacher)
            processors = None
            if teacher_mix and not from_teacher:
                processors = [TeacherMixture(self.teacher, prompt_mask, alpha=teacher_mix, vocab_size=self.vocab_size)]
            batch = sample_responses(model, prompt_ids, prompt_mask, eos_token_ids=[self.tokenizer.eos_token_id],
                                     pad_token_id=self.tokenizer.pad_token_id, config=config,
                                     generator_seed=self.seed + self.num_samples, logits_processor=processors)
        self.num_samples += 1
        self.batches.append(batch)
        return batch

    def collate(self, examples):

        self.calls.append(("collate",))
        batch = collate_sequences(examples, self.tokenizer.pad_token_id)
        self.batches.append(batch)
        return batch

    # ------------------------------------------------------------ forwards
    def student_forward(self, batch, *, target: bool = False, logits: bool = False) -> Outputs:
        self.calls.append(("student_forward", target))
        head = None if logits else self.student_head
        model = self.student_module
        if not target:
            return outputs_of(model, batch, head, self.vocab_size)  # with grad
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return outputs_of(model, batch, head, self.vocab_size)
        finally:
            model.train(was_training)

    def teacher_forward(self, batch, *, model=None, base: bool = False, grad: bool = False,
                        logits: bool = False) -> Outputs:
        self.calls.append(("teacher_forward",) + (("model",) if model is not None else ()))
        if self.teacher is None:
            raise RuntimeError("FakeContext: teacher_forward called but the context has no teacher")
        with self.phase("teacher_fwd_base"), contextlib.nullcontext() if grad else torch.no_grad():
            return outputs_of(model if model is not None else self.teacher, batch,
                              None if logits else self.teacher_head, self.vocab_size, **({"base": True} if base else {}))

    # ------------------------------------------------------------ normalisation and backward
    def backward(self, loss_sum: torch.Tensor, tokens: float) -> None:
        loss = loss_sum / max(tokens, 1.0)
        self.calls.append(("backward", float(loss.detach())))
        loss.backward()

    def reduce_sum(self, value: float) -> float:
        return float(value)

    def gather_object(self, obj) -> list:
        return [obj]

    def dev_loss(self) -> float | None:
        """The next of `dev_losses` (a list a test sets), or None when there are none."""
        self.calls.append(("dev_loss",))
        return self.dev_losses.pop(0) if self.dev_losses else None

    # ------------------------------------------------------------ parameter sets
    def add_parameter_set(self, name: str, params: list, *, learning_rate: float | None, weight_decay: float) -> None:
        if name in self.param_sets:
            raise ValueError(f"parameter set {name!r} exists already")
        if learning_rate is None:  # the student's, as in the trainer
            learning_rate = self.param_sets["student"][1].param_groups[0]["lr"]
        params = list(params)
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
        self.param_sets[name] = (params, opt)
        self.calls.append(("add_parameter_set", name))

    def apply_update(self, name: str, loss_value: float) -> dict[str, float]:
        params, opt = self.param_sets[name]
        self.calls.append(("apply_update", name, float(loss_value)))
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        self.grads[name] = grads
        grad_norm = float(torch.stack([g.float().norm() for g in grads]).norm()) if grads else 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {f"{name}/grad_norm": grad_norm, f"{name}/lr": opt.param_groups[0]["lr"]}


def crash_in_step(trainer, monkeypatch, step: int = 2) -> None:
    """Run `trainer.train()` until its method raises in optimizer step `step` (0-based: after
    `step` steps are done), as a crash would; pytest.raises checks it happened."""
    import pytest

    real = trainer.method.step

    def crashing(ctx, micro_batches):
        if ctx.step == step:
            raise RuntimeError("simulated crash")
        return real(ctx, micro_batches)

    monkeypatch.setattr(trainer.method, "step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
