"""PromptKD: a student-friendly soft prompt on a frozen teacher + on-policy reverse KL.

    promptkd train --config configs/promptkd.yaml

One optimizer step (docs/method.md), on the micro-batches of this step:

0. Pseudo-targets. The student samples responses y ~ p_S(.|x) (T = 1, top_k off, top_p 1),
   cut after the first EOS (kept); a sample that hits the cap ends in EOS (eos_at_cap).
   Ground-truth responses are not used.
1. Prompt update. With P the soft prompt (the only trainable teacher parameters):
       L_prompt = KL(p_TP || sg p_S) + lambda_k KL(p_TP || sg p_T),  lambda_k = base_coef (1 - k / K)
   for the optimizer step k = 1..K, then one prompt optimizer step. The two KLs are logged as
   prompt/kl_to_student and prompt/drift (token means, of the prompt before its update); the
   collapse warning (promptkd.collapse_window) fires when kl_to_student < drift for that many
   consecutive steps: the prompted teacher then imitates the student.
2. Student update, against the *updated* prompt:
       L_student = KL(p_S || sg p_TP)   -> one student optimizer step

Means are token-level over every response position of the step (all micro-batches and
processes). Two parameter sets, two AdamW optimizers, two schedules, one clip each.

Reference-code behaviour we follow, and where we differ:
- teacher dropout is on during the prompt forward (`teacher_dropout`), off for targets;
- with accumulation the reference steps both optimizers at the boundary; here the prompt steps
  after all micro-batches' prompt losses, then every micro-batch's student loss uses the updated
  prompt: the paper's order for any accumulation;
- the student target of step 1 is the student in eval mode. When the student has no active
  dropout and the step has one micro-batch, one student forward (with grad) serves both steps
  (detached in step 1): exact, because the student does not change in between.
"""

from __future__ import annotations

import logging

import torch

from promptkd.cross_tokenizer import Aligned
from promptkd.data.batch import SequenceBatch
from promptkd.losses import Outputs, divergence
from promptkd.methods.base import (
    Method,
    StepContext,
    StepResult,
    distill_terms,
    response_mask,
    step_tokens,
)
from promptkd.models.prompted_teacher import PromptedTeacher

logger = logging.getLogger(__name__)


def has_active_dropout(model: torch.nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
    cfg = getattr(model, "config", None)
    return any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout", "dropout"))


def next_collapse_streak(streak: int, kl_to_student: float, drift: float) -> int:
    """Consecutive steps so far with the prompted teacher closer to the student than to the teacher
    (kl_to_student < drift), after one more step's pair of distances."""
    return streak + 1 if kl_to_student < drift else 0


def collapse_warning_step(points, window: int) -> int | None:
    """The step at which a run warns of collapse, from its logged (step, kl_to_student, drift)
    triples in step order: the first step that ends `window` consecutive collapsed steps; None if
    none does or `window` is 0 (off). The rule of PromptKD.check_collapse, for reports that read
    metrics.jsonl after the run."""
    streak = 0
    for step, kl_to_student, drift in points:
        streak = next_collapse_streak(streak, kl_to_student, drift)
        if window and streak >= window:
            return step
    return None


class PromptKD(Method):
    name = "promptkd"
    # the reference overwrites the last position of a capped sample with EOS (pad = EOS there):
    # gmkim-ai/PromptKD train_promptkd.py:321-327, 342
    eos_at_cap_default = True

    @classmethod
    def needs_references(cls, options) -> bool:
        return False  # trains on the student's own samples only

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: StepContext) -> None:
        c = self.options
        self.prompted = PromptedTeacher(
            ctx.teacher,
            ctx.teacher_tokenizer,  # the prompt's text init: the teacher's tokens
            num_virtual_tokens=c.num_virtual_tokens,
            init=c.prompt_init,
            init_text=c.prompt_init_text,
            dropout=c.teacher_dropout,
            gradient_checkpointing=c.teacher_gradient_checkpointing,
        ).to(ctx.device)
        self.prompt_params = self.prompted.prompt_parameters()
        ctx.add_parameter_set(
            "prompt",
            self.prompt_params,
            learning_rate=c.prompt_learning_rate,  # None: the student's (the reference code's)
            weight_decay=c.prompt_weight_decay,
        )
        self.prompt_loss = divergence("reverse_kl")  # KL(p_TP || .), as in the paper and its code
        self.student_loss = divergence(c.divergence, ab_alpha=c.ab_alpha, ab_beta=c.ab_beta)
        self.student_dropout = has_active_dropout(ctx.student_module)
        self.collapse_streak = 0  # consecutive steps with kl_to_student < drift
        self.collapse_warned = False

    def state_dict(self) -> dict:
        # the collapse guard's window goes with the prompt, so a resumed run neither warns
        # twice nor forgets a streak in progress
        return {**self.prompted.prompt_state_dict(),
                "collapse_streak": self.collapse_streak, "collapse_warned": self.collapse_warned}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.collapse_streak = int(state.pop("collapse_streak", 0))  # absent in older checkpoints
        self.collapse_warned = bool(state.pop("collapse_warned", False))
        self.prompted.load_prompt_state_dict(state)

    def export(self, out_dir) -> None:
        self.prompted.save_adapter(out_dir / "prompt_adapter")

    # ------------------------------------------------------------------ pieces
    def regulariser_weight(self, step: int, max_steps: int) -> float:
        """lambda_k = base_coef * (1 - k / K) for the optimizer step k = 1..K being taken.

        The reference counts k from 1 (gmkim-ai/PromptKD train_promptkd.py:293 starts
        `global_step` at 1; :360-364 compute the weight), so lambda reaches 0 at the last step K.
        `step` is the number of optimizer steps already done (k - 1).
        """
        return self.options.base_coef * (1.0 - (step + 1) / max_steps)

    def prompted_outputs(self, ctx: StepContext, batch: SequenceBatch, *, base: bool = False,
                         grad: bool = False) -> Outputs | Aligned:
        """The prompted teacher's outputs on the response columns (base: without its prompt);
        `grad`: differentiable into the prompt. With two tokenizers, on the teacher's tokenization
        (`Aligned`): both prompt losses then run over the aligned groups (`distill_terms`)."""
        return ctx.teacher_forward(batch, model=self.prompted, base=base, grad=grad)

    def check_collapse(self, step: int, kl_to_student: float, drift: float) -> None:
        """Warn once when the prompted teacher has been closer to the student than to the
        teacher (kl_to_student < drift) for promptkd.collapse_window consecutive steps."""
        window = self.options.collapse_window
        self.collapse_streak = next_collapse_streak(self.collapse_streak, kl_to_student, drift)
        if window and self.collapse_streak >= window and not self.collapse_warned:
            self.collapse_warned = True
            logger.warning(
                f"PromptKD step {step}: the prompted teacher is closer to the student than to the teacher "
                f"for {window} consecutive steps (KL(p_TP || p_S) = {kl_to_student:.4g} < "
                f"KL(p_TP || p_T) = {drift:.4g}): the student is learning from a teacher that imitates it. "
                "Lower promptkd.prompt_learning_rate."
            )

    # ------------------------------------------------------------------ the step
    def step(self, ctx: StepContext, micro_batches: list[list]) -> StepResult:
        batches = [ctx.sample(mb) for mb in micro_batches]  # 0. the student's own samples
        tokens = max(step_tokens(ctx, batches), 1.0)
        shared = len(batches) == 1 and not self.student_dropout  # one student forward serves both updates
        students: list[Outputs | None] = [None] * len(batches)

        # 1. prompt update: KL(p_TP || sg p_S) + lambda_k KL(p_TP || sg p_T), gradients into the prompt only
        lam = self.regulariser_weight(ctx.step, ctx.max_steps)
        kl_sum = drift_sum = 0.0
        for i, batch in enumerate(batches):
            if shared:
                with ctx.accumulate(is_last=True):
                    students[i] = ctx.student_forward(batch)  # with grad, for step 2
                target = students[i].detach()
            else:
                target = ctx.student_forward(batch, target=True)  # eval mode, no grad
            with ctx.phase("teacher_fwd_prompt_grad"):
                prompted = self.prompted_outputs(ctx, batch, grad=True)  # teacher dropout as configured
            with ctx.phase("teacher_fwd_base"):
                base = self.prompted_outputs(ctx, batch, base=True)
            with ctx.phase("losses"):
                loss, (kl, drift) = distill_terms(prompted, [(self.prompt_loss, target, 1.0),
                                                          (self.prompt_loss, base, lam)], response_mask(batch))
            del prompted, base, target  # the loss holds its gradients: the outputs go before the backward
            kl_sum, drift_sum = kl_sum + kl, drift_sum + drift
            with ctx.phase("backward_prompt"):
                ctx.backward(loss, tokens)
        kl, drift = ctx.reduce_sum(kl_sum) / tokens, ctx.reduce_sum(drift_sum) / tokens
        metrics = {"prompt/loss": kl + lam * drift, "prompt/lambda": lam, "prompt/kl_to_student": kl,
                   "prompt/drift": drift}
        self.check_collapse(ctx.step + 1, kl, drift)
        metrics.update(ctx.apply_update("prompt", metrics["prompt/loss"]))

        # 2. student update: KL(p_S || sg p_TP) against the *updated* prompt
        student_sum = 0.0
        for i, batch in enumerate(batches):
            with ctx.accumulate(is_last=i == len(batches) - 1):
                student = students[i] if shared else ctx.student_forward(batch)  # with grad
                students[i] = None
                with ctx.phase("teacher_fwd_target"):
                    target = self.prompted_outputs(ctx, batch)
                with ctx.phase("losses"):
                    loss, (value,) = distill_terms(student, [(self.student_loss, target, 1.0)], response_mask(batch))
                del student, target  # (as above: the backward, the step's memory peak, runs without them)
                student_sum += value
                with ctx.phase("backward_student"):
                    ctx.backward(loss, tokens)
        metrics["student/loss"] = ctx.reduce_sum(student_sum) / tokens
        metrics.update(ctx.apply_update("student", metrics["student/loss"]))
        num_tokens = float(sum(response_mask(b).sum() for b in batches))
        return StepResult(metrics, trained_tokens=num_tokens, generated_tokens=num_tokens)
