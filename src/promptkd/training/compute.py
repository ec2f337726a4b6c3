"""The compute of a training run: token-passes through the student and the teacher, and FLOPs.

A token-pass is one token position through a model. A forward counts the positions it runs on
(the batch's non-pad tokens, plus a soft prompt's virtual tokens); a forward that a backward goes
through counts them again as backward token-passes. Sampling with a KV cache is one forward
token-pass per prompt token (prefill) and per generated token, counted from the returned batch
(rows that have ended and wait for the others are not counted); in teacher-mixed sampling
(MiniLLM) the teacher, with a KV cache of its own, runs the same positions. Dev evaluation is not
training compute and is not counted; neither is the forward that gradient checkpointing recomputes.

FLOPs are estimated from the counts as 2 N per forward token-pass, 4 N per backward token-pass of
the student (gradients of activations and weights; a LoRA student's frozen weights counted as
trained) and 2 N per backward token-pass of the frozen teacher (activations only: PromptKD's
prompt update), N = `matmul_params` of that model.
This is C ~ 6N per trained token (Kaplan et al. 2020, arXiv:2001.08361, section 2.1) without the
attention term 2 n_layer n_ctx d_attn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch


def matmul_params(model: torch.nn.Module | None) -> int:
    """N: the parameters that take part in a matmul per token. Embedding lookups (the input
    embedding, learned positions) are left out; an LM head tied to the input embedding counts
    once, as the head. A LoRA model's adapters count; None (no teacher) has 0."""
    if model is None:
        return 0
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head_weight}
    return sum(p.numel() for p in model.parameters() if id(p) not in lookups)  # a tied weight once


@dataclass
class Compute:
    """Token-passes of a run (or of one step on one process)."""

    student_forward_tokens: float = 0.0
    student_backward_tokens: float = 0.0
    teacher_forward_tokens: float = 0.0
    teacher_backward_tokens: float = 0.0
    generated_tokens: float = 0.0

    def __add__(self, other: Compute) -> Compute:
        return Compute(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    def reduced(self, reduce_sum: Callable[[float], float]) -> Compute:
        """The counts summed over processes with `reduce_sum` (every process must call it)."""
        return Compute(*(reduce_sum(v) for v in dataclasses.astuple(self)))

    def flops(self, num_student: int, num_teacher: int) -> float:
        """Estimated FLOPs, with N = `matmul_params` of the student and of the teacher."""
        return (2.0 * num_student * self.student_forward_tokens + 4.0 * num_student * self.student_backward_tokens
                + 2.0 * num_teacher * (self.teacher_forward_tokens + self.teacher_backward_tokens))

    def record(self, num_student: int, num_teacher: int) -> dict[str, float]:
        """The `compute/...` fields of a metrics record."""
        counts = {f"compute/{k}": float(v) for k, v in dataclasses.asdict(self).items()}
        return {**counts, "compute/flops": self.flops(num_student, num_teacher)}
