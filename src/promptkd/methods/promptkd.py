"""PromptKD: a student-friendly soft prompt on a frozen teacher + on-policy reverse KL.

    promptkd train --config configs/promptkd.yaml

One optimizer step (docs/method.md), for the micro-batches of this step:

0. Pseudo-targets. The student samples responses y ~ p_S(.|x) (T = 1, top_k off, top_p 1),
   cut after the first EOS (kept); a sample that hits the cap ends in EOS (eos_at_cap).
   Ground-truth responses are not used.
1. Prompt update. With P the soft prompt (the only trainable teacher parameters):
       L_kd     = mean_R KL(p_TP || sg p_S)            (kd_direction = reverse)
       L_reg    = mean_R KL(p_TP || sg p_T)            (reg_direction = reverse, p_T = no prompt)
       lambda_k = base_coef * (1 - k / K),  k = 1..K
       L_prompt = L_kd + lambda_k * L_reg              -> prompt optimizer step
   Logged every step (the base-teacher forward runs even when lambda_k = 0, under no_grad
   then): prompt/kl_to_student = KL(p_TP || p_S) and prompt/drift = KL(p_TP || p_T), token
   means, of the prompt before this step's update. Two guards read them:
   - collapse warning (promptkd.collapse_window): kl_to_student < drift for that many
     consecutive steps warns once: the prompted teacher now imitates the student;
   - promptkd.max_drift: the prompt is only ever moved to a point whose drift on the step's
     batch is within the bound. A step whose drift is already over the bound skips its prompt
     update; otherwise the update is made, the drift of the updated prompt is measured on the
     same batch (the forward that gives the student its targets, so no extra teacher forward)
     and an update that left it over the bound is undone (prompt, optimizer state and schedule
     restored; the targets are recomputed). Either way prompt/frozen_by_guard = 1, and
     prompt/drift_after logs the drift, on the step's batch, of the prompt the step ends with.
2. Student update, against the *updated* prompt:
       L_student = mean_R KL(p_S || sg p_TP)           -> student optimizer step

Means are token-level over every response position of the step (all micro-batches and
processes). Two parameter sets, two AdamW optimizers, two schedules, one clip each.

Reference-code behaviour we follow, and where we differ (all configurable):
- teacher dropout is on during the prompt forward (`teacher_dropout`), off for targets;
- with accumulation both optimizers step once per optimizer step (at the boundary); here the
  prompt steps after all micro-batches' prompt losses, then every micro-batch's student loss
  uses the updated prompt, which is the paper's order for any accumulation;
- the student target of step 1 is the student in eval mode. When the student has no active
  dropout and the step has one micro-batch, one student forward (with grad) serves both
  step 1 (detached) and step 2; that is exact because the student does not change in between.

With train.chunked_lm_head (the default) every forward keeps its final hidden states instead of
(B, R, V) logits (methods.base.HiddenStates), and the losses run chunk by chunk over positions
(promptkd.head_losses): the prompt loss, its regulariser and the two logged distances are one
`head_divergences` pass in which the prompted teacher's logits are computed once per chunk.
Values and gradients equal the logits path's to float rounding.
"""

from __future__ import annotations

import logging

import torch

from promptkd.data.batch import SequenceBatch
from promptkd.methods.base import (
    HiddenStates,
    Method,
    Outputs,
    StepContext,
    StepResult,
    divergence,
    divergence_terms,
    response_mask,
    student_outputs,
    student_target_outputs,
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
    def needs_references(cls, cfg) -> bool:
        return False  # trains on the student's own samples only

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: StepContext) -> None:
        c = self.cfg.promptkd
        self.prompted = PromptedTeacher(
            ctx.teacher,
            ctx.tokenizer,
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
            learning_rate=c.prompt_learning_rate or self.cfg.train.learning_rate,
            weight_decay=c.prompt_weight_decay,
        )
        self.kd_loss = divergence("reverse_kl" if c.kd_direction == "reverse" else "forward_kl")
        self.reg_loss = divergence("reverse_kl" if c.reg_direction == "reverse" else "forward_kl")
        self.student_loss = divergence(c.student_divergence)
        self.kl_from_prompted = divergence("reverse_kl")  # KL(p_TP || other): the logged distances
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
    def regulariser_weight(self, step: int) -> float:
        """lambda_k = base_coef * (1 - k / K) for the optimizer step k = 1..K being taken.

        The reference counts k from 1 (gmkim-ai/PromptKD train_promptkd.py:293 starts
        `global_step` at 1; :360-364 compute the weight), so lambda reaches 0 at the last step K.
        `step` is the number of optimizer steps already done (k - 1).
        """
        return self.cfg.promptkd.base_coef * (1.0 - (step + 1) / self.cfg.train.max_steps)

    def teacher_logits_on(self, forward, batch: SequenceBatch, vocab_size: int) -> torch.Tensor:
        """(B, R, V) logits of a teacher forward predicting the response columns.

        Only the last R + 1 positions go through the LM head (`logits_to_keep`): the same
        values as slicing the full output, without the (B, T, V) logits.
        """
        keep = batch.input_ids.shape[1] - batch.prompt_length + 1
        logits = forward(batch.input_ids, batch.attention_mask, logits_to_keep=keep)  # (B, R + 1, V)
        return logits[:, :-1, :vocab_size]

    def prompted_outputs(self, ctx: StepContext, batch: SequenceBatch, *, base: bool = False) -> Outputs:
        """The prompted teacher's outputs on the response columns (base: the teacher without
        its prompt): HiddenStates when ctx.chunked, else (B, R, V) logits. Grad mode and
        autocast are the caller's."""
        if ctx.chunked:
            return HiddenStates.of(self.prompted, batch, ctx.teacher_head, base=base)  # (B, R, H)
        forward = self.prompted.forward_base if base else self.prompted
        return self.teacher_logits_on(forward, batch, ctx.vocab_size)  # (B, R, V)

    def prompt_loss(self, tp: Outputs, target: Outputs, base: Outputs, lam: float,
                    mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(L_kd + lambda L_reg summed over `mask`, {kd, reg, kl_to_student, drift} sums).

        One `divergence_terms` call: on hidden states the prompted teacher's logits are computed
        once per chunk for every term. L_reg is a term only when lambda > 0; the logged
        distances KL(p_TP || p_S) and KL(p_TP || p_T) reuse L_kd / L_reg when those are the same
        reverse KL, and are weight-0 terms (no gradient) otherwise.
        """
        c = self.cfg.promptkd
        terms = [(self.kd_loss, target, 1.0)]
        reg = None
        if lam > 0:
            reg = len(terms)
            terms.append((self.reg_loss, base, lam))
        kl = 0
        if c.kd_direction != "reverse":
            kl = len(terms)
            terms.append((self.kl_from_prompted, target, 0.0))
        drift = reg
        if reg is None or c.reg_direction != "reverse":
            drift = len(terms)
            terms.append((self.kl_from_prompted, base, 0.0))
        loss, values = divergence_terms(tp, terms, mask)
        return loss, {"kd": float(values[0]), "reg": 0.0 if reg is None else float(values[reg]),
                      "kl_to_student": float(values[kl]), "drift": float(values[drift])}

    def check_collapse(self, step: int, kl_to_student: float, drift: float) -> None:
        """Warn once when the prompted teacher has been closer to the student than to the
        teacher (kl_to_student < drift) for promptkd.collapse_window consecutive steps."""
        window = self.cfg.promptkd.collapse_window
        self.collapse_streak = next_collapse_streak(self.collapse_streak, kl_to_student, drift)
        if window and self.collapse_streak >= window and not self.collapse_warned:
            self.collapse_warned = True
            logger.warning(
                f"PromptKD step {step}: the prompted teacher is closer to the student than to the teacher "
                f"for {window} consecutive steps (KL(p_TP || p_S) = {kl_to_student:.4g} < "
                f"KL(p_TP || p_T) = {drift:.4g}): the student is learning from a teacher that imitates it. "
                "Lower promptkd.prompt_learning_rate or set promptkd.max_drift (e.g. a little above the "
                "early prompt/drift values)."
            )

    def updated_prompt_drift(self, ctx: StepContext, batches: list[SequenceBatch], bases: list,
                             masks: list[torch.Tensor], global_tokens: float) -> tuple[list, float]:
        """(the updated prompt's outputs per micro-batch, its drift KL(p_TP || p_T) on them).

        The outputs are the student's targets (the same no-grad forward step 2 would run), so
        the guard costs the divergence only, unless it undoes the update. `bases` are the plain
        teacher's outputs of step 1 on the same batches.
        """
        outs, drift_sum = [], 0.0
        for batch, base, mask in zip(batches, bases, masks, strict=True):
            with ctx.phase("teacher_fwd_target"), torch.no_grad(), ctx.autocast():
                tp = self.prompted_outputs(ctx, batch)
            with ctx.phase("losses"), torch.no_grad():
                drift_sum += float(self.kl_from_prompted(tp, base, mask, reduction="sum"))
            outs.append(tp)
        return outs, ctx.reduce_sum(drift_sum) / max(global_tokens, 1.0)

    # ------------------------------------------------------------------ the step
    def step(self, ctx: StepContext, micro_batches: list[list]) -> StepResult:
        c = self.cfg.promptkd
        metrics: dict[str, float] = {}

        # 0. pseudo-targets: on-policy samples of the current student
        batches = [ctx.sample(mb) for mb in micro_batches]
        global_tokens = ctx.global_token_count(batches)
        scale = ctx.loss_scale(global_tokens)
        masks = [response_mask(b) for b in batches]  # (B, R) each
        share_student_forward = len(batches) == 1 and not self.student_dropout
        # (B, R, V) logits, or (B, R, H) HiddenStates when ctx.chunked
        student_out: list[Outputs | None] = [None] * len(batches)
        lagged: list[Outputs | None] = [None] * len(batches)
        targets: list[Outputs | None] = [None] * len(batches)  # the updated prompt's, once measured
        guarded = c.max_drift is not None
        bases: list[Outputs | None] = [None] * len(batches)  # kept for the guard's post-update drift

        # 1. prompt update: L_kd + lambda_k L_reg, gradients into the prompt only
        if not c.freeze_prompt:
            lam = self.regulariser_weight(ctx.step)
            kd_sum = reg_sum = kl_sum = drift_sum = 0.0
            for i, batch in enumerate(batches):
                if share_student_forward:
                    with ctx.accumulate(is_last=True):
                        student_out[i] = student_outputs(ctx, batch)  # with grad
                    target = student_out[i].detach()
                else:
                    target = student_target_outputs(ctx, batch)  # eval mode, no grad
                # with grad: teacher dropout on when teacher_dropout (the reference's quirk)
                with ctx.phase("teacher_fwd_prompt_grad"), ctx.autocast():
                    tp = self.prompted_outputs(ctx, batch)
                # every step, lambda_k = 0 included: the drift is logged and guarded
                with ctx.phase("teacher_fwd_base"), torch.no_grad(), ctx.autocast():
                    base = self.prompted_outputs(ctx, batch, base=True)
                with ctx.phase("losses"):
                    loss, sums = self.prompt_loss(tp, target, base, lam, masks[i])
                kd_sum += sums["kd"]
                reg_sum += sums["reg"]
                kl_sum += sums["kl_to_student"]
                drift_sum += sums["drift"]
                if c.lagged_target:
                    lagged[i] = tp.detach()
                if guarded:
                    bases[i] = base
                with ctx.phase("backward_prompt"):
                    ctx.backward(loss * scale)
                del tp, target, base, loss
            ctx.all_reduce_grads(self.prompt_params)
            kd_mean = ctx.reduce_sum(kd_sum) / max(global_tokens, 1.0)
            reg_mean = ctx.reduce_sum(reg_sum) / max(global_tokens, 1.0)
            kl_to_student = ctx.reduce_sum(kl_sum) / max(global_tokens, 1.0)
            drift = ctx.reduce_sum(drift_sum) / max(global_tokens, 1.0)
            frozen = c.max_drift is not None and drift > c.max_drift
            metrics.update({"prompt/loss": kd_mean + lam * reg_mean, "prompt/kd": kd_mean,
                            "prompt/reg": reg_mean, "prompt/lambda": lam,
                            "prompt/kl_to_student": kl_to_student, "prompt/drift": drift,
                            "prompt/frozen_by_guard": float(frozen)})
            self.check_collapse(ctx.step + 1, kl_to_student, drift)
            if frozen:
                # not apply_update: Adam's momentum and weight decay would move a zero-gradient prompt
                for p in self.prompt_params:
                    p.grad = None
                if guarded:
                    metrics["prompt/drift_after"] = drift
            elif guarded:
                snapshot = ctx.snapshot_update("prompt")
                metrics.update(ctx.apply_update("prompt", metrics["prompt/loss"]))
                targets, drift_after = self.updated_prompt_drift(ctx, batches, bases, masks, global_tokens)
                undone = drift_after > c.max_drift
                if undone:  # the update went past the bound: restore the prompt as it was
                    ctx.restore_update("prompt", snapshot)
                    metrics["prompt/frozen_by_guard"] = 1.0
                    drift_after = drift
                if undone or c.lagged_target:  # step 2 recomputes them, or uses the lagged ones
                    targets = [None] * len(batches)
                metrics["prompt/drift_after"] = drift_after
            else:
                metrics.update(ctx.apply_update("prompt", metrics["prompt/loss"]))
            bases = [None] * len(batches)

        # 2. student update: reverse KL to the prompted teacher with the *updated* prompt
        s_sum = 0.0
        for i, batch in enumerate(batches):
            with ctx.accumulate(is_last=i == len(batches) - 1):
                if student_out[i] is None:
                    student_out[i] = student_outputs(ctx, batch)  # with grad
                if c.freeze_prompt:
                    with ctx.phase("teacher_fwd_base"), torch.no_grad(), ctx.autocast():
                        target = self.prompted_outputs(ctx, batch, base=True)
                elif c.lagged_target:
                    target = lagged[i]
                elif targets[i] is not None:
                    target = targets[i]  # measured by the drift guard
                else:
                    with ctx.phase("teacher_fwd_target"), torch.no_grad(), ctx.autocast():
                        target = self.prompted_outputs(ctx, batch)
                with ctx.phase("losses"):
                    l_s = self.student_loss(student_out[i], target, masks[i], reduction="sum")
                s_sum += float(l_s.detach())
                with ctx.phase("backward_student"):
                    ctx.backward(l_s * scale)
            student_out[i] = lagged[i] = targets[i] = None
        metrics["student/loss"] = ctx.reduce_sum(s_sum) / max(global_tokens, 1.0)
        metrics.update(ctx.apply_update("student", metrics["student/loss"]))
        num_tokens = float(sum(m.sum() for m in masks))
        return StepResult(metrics, trained_tokens=num_tokens, generated_tokens=num_tokens)
