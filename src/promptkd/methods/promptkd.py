"""PromptKD: a student-friendly soft prompt on a frozen teacher + on-policy reverse KL.

    promptkd train --config configs/promptkd.yaml

One optimizer step (SPEC 2), for the micro-batches of this step:

0. Pseudo-targets. The student samples responses y ~ p_S(.|x) (T = 1, top_k off, top_p 1),
   cut after the first EOS (kept). Ground-truth responses are not used.
1. Prompt update. With P the soft prompt (the only trainable teacher parameters):
       L_kd     = mean_R KL(p_TP || sg p_S)            (kd_direction = reverse)
       L_reg    = mean_R KL(p_TP || sg p_T)            (reg_direction = reverse, p_T = no prompt)
       lambda_k = base_coef * (1 - k / K)
       L_prompt = L_kd + lambda_k * L_reg              -> prompt optimizer step
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
"""

from __future__ import annotations

import torch

from promptkd.errors import UserError
from promptkd.methods.base import Method


def _has_active_dropout(model: torch.nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
    cfg = getattr(model, "config", None)
    return any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout", "dropout"))


class PromptKD(Method):
    name = "promptkd"
    # the reference overwrites the last position of a capped sample with EOS (pad = EOS there):
    # gmkim-ai/PromptKD train_promptkd.py:321-327, 342
    eos_at_cap_default = True

    # ------------------------------------------------------------------ setup
    def setup(self):
        from promptkd.models.prompted_teacher import PromptedTeacher
        from promptkd.training.optim import build_optimizer, build_scheduler

        tr, c = self.trainer, self.cfg.promptkd
        self.prompted = PromptedTeacher(
            tr.teacher,
            tr.tokenizer,
            num_virtual_tokens=c.num_virtual_tokens,
            init=c.prompt_init,
            init_text=c.prompt_init_text,
            dropout=c.teacher_dropout,
            gradient_checkpointing=c.teacher_gradient_checkpointing,
        ).to(tr.accelerator.device)
        self.prompt_params = self.prompted.prompt_parameters()
        self.prompt_optimizer = build_optimizer(
            self.prompt_params,
            lr=c.prompt_learning_rate or self.cfg.train.learning_rate,
            weight_decay=c.prompt_weight_decay,
            betas=(self.cfg.train.adam_beta1, self.cfg.train.adam_beta2),
        )
        self.prompt_scheduler = build_scheduler(
            self.prompt_optimizer,
            name=self.cfg.train.lr_scheduler,
            warmup_steps=self.cfg.train.warmup_steps,
            total_steps=self.cfg.train.max_steps,
        )
        if getattr(tr.accelerator, "is_fsdp2", False):
            # accelerate's FSDP2 prepare() takes an optimizer only together with its model
            raise UserError(
                "method promptkd does not run under FSDP2 (fsdp_version: 2): its prompt optimizer "
                "cannot be prepared without a model; use fsdp_version: 1 (configs/accelerate/fsdp.yaml)"
            )
        self.prompt_optimizer, self.prompt_scheduler = tr.accelerator.prepare(self.prompt_optimizer, self.prompt_scheduler)
        self.kd_loss = self.divergence("reverse_kl" if c.kd_direction == "reverse" else "forward_kl")
        self.reg_loss = self.divergence("reverse_kl" if c.reg_direction == "reverse" else "forward_kl")
        self.student_loss = self.divergence(c.student_divergence)
        self.student_dropout = _has_active_dropout(tr.unwrapped_student)

    def extra_state_dict(self) -> dict:
        return self.prompted.prompt_state_dict()

    def load_extra_state_dict(self, state: dict) -> None:
        self.prompted.load_prompt_state_dict(state)

    def export(self, out_dir) -> None:
        self.prompted.save_adapter(out_dir / "prompt_adapter")

    # ------------------------------------------------------------------ helpers
    def regulariser_weight(self, step: int) -> float:
        """lambda_k = base_coef * (1 - k / K) for the optimizer step k = 1..K being taken.

        The reference counts k from 1 (gmkim-ai/PromptKD train_promptkd.py:293 starts
        `global_step` at 1; :360-364 compute the weight), so lambda reaches 0 at the last step K.
        `step` is the number of optimizer steps already done (k - 1).
        """
        return self.cfg.promptkd.base_coef * (1.0 - (step + 1) / self.cfg.train.max_steps)

    def _response_logits(self, forward, batch) -> torch.Tensor:
        """(B, T - P, V) teacher logits predicting the response columns, like `response_logits`.

        Only the last T - P + 1 positions go through the teacher's LM head (`logits_to_keep`):
        the same values as slicing the full output, without the (B, T, V) logits.
        """
        keep = batch.input_ids.shape[1] - batch.prompt_length + 1
        logits = forward(batch.input_ids, batch.attention_mask, logits_to_keep=keep)  # (B, keep, V)
        return logits[:, :-1, : self.trainer.vocab_size]

    def prompted_logits(self, batch) -> torch.Tensor:
        with self.trainer.autocast():
            return self._response_logits(self.prompted, batch)

    def base_logits(self, batch) -> torch.Tensor:
        with torch.no_grad(), self.trainer.autocast():
            return self._response_logits(self.prompted.forward_base, batch)

    def student_target_logits(self, batch) -> torch.Tensor:
        """sg p_S for the prompt loss: the student in eval mode, no grad."""
        tr = self.trainer
        model = tr.unwrapped_student
        was_training = model.training
        model.eval()
        with torch.no_grad(), tr.gathered_student():
            logits = tr.response_logits(model, batch)
        model.train(was_training)
        return logits

    # ------------------------------------------------------------------ step
    def step(self, micro_batches):
        tr, c = self.trainer, self.cfg.promptkd
        out: dict = {}

        # 0. pseudo-targets: on-policy samples of the current student
        batches = [tr.sample(mb) for mb in micro_batches]
        global_tokens = tr.global_token_count(batches)
        scale = tr.loss_scale(global_tokens)
        masks = [tr.response_mask(b) for b in batches]  # (B, R) each
        share_student_forward = len(batches) == 1 and not self.student_dropout
        student_logits = [None] * len(batches)
        lagged = [None] * len(batches)

        # 1. prompt update
        if not c.freeze_prompt:
            lam = self.regulariser_weight(tr.step)
            kd_sum = reg_sum = 0.0
            self.prompted.train()
            for i, batch in enumerate(batches):
                if share_student_forward:
                    with self.sync_context(True):
                        student_logits[i] = tr.response_logits(tr.student, batch)  # (B, R, V), grad
                    target = student_logits[i].detach()
                else:
                    target = self.student_target_logits(batch)
                tp_logits = self.prompted_logits(batch)  # (B, R, V), grad w.r.t. the prompt only
                l_kd = self.kd_loss(tp_logits, target, masks[i], reduction="sum")
                loss = l_kd
                kd_sum += float(l_kd.detach())
                if lam > 0:
                    l_reg = self.reg_loss(tp_logits, self.base_logits(batch), masks[i], reduction="sum")
                    loss = loss + lam * l_reg
                    reg_sum += float(l_reg.detach())
                if c.lagged_target:
                    lagged[i] = tp_logits.detach()
                tr.accelerator.backward(loss * scale)
                del tp_logits, target, loss
            tr.all_reduce_grads(self.prompt_params)
            kd_mean = tr.reduce_sum(kd_sum) / max(global_tokens, 1.0)
            reg_mean = tr.reduce_sum(reg_sum) / max(global_tokens, 1.0)
            out.update({"prompt/loss": kd_mean + lam * reg_mean, "prompt/kd": kd_mean, "prompt/reg": reg_mean, "prompt/lambda": lam})
            out.update(tr.apply_update("prompt", self.prompt_optimizer, self.prompt_scheduler, self.prompt_params, out["prompt/loss"]))
            self.prompted.eval()

        # 2. student update against the updated prompt
        s_sum = 0.0
        for i, batch in enumerate(batches):
            with self.sync_context(i == len(batches) - 1):
                if student_logits[i] is None:
                    student_logits[i] = tr.response_logits(tr.student, batch)
                if c.freeze_prompt:
                    target = self.base_logits(batch)
                elif c.lagged_target:
                    target = lagged[i]
                else:
                    with torch.no_grad():
                        target = self.prompted_logits(batch)
                l_s = self.student_loss(student_logits[i], target, masks[i], reduction="sum")
                s_sum += float(l_s.detach())
                tr.accelerator.backward(l_s * scale)
            student_logits[i] = lagged[i] = None
        out["student/loss"] = tr.reduce_sum(s_sum) / max(global_tokens, 1.0)
        out.update(tr.apply_update("student", tr.student_optimizer, tr.student_scheduler, tr.student.parameters(), out["student/loss"]))
        n_tokens = float(sum(m.sum() for m in masks))
        out["_trained_tokens"] = n_tokens
        out["_generated_tokens"] = n_tokens
        return out
