"""A straightforward PromptKD step as the reference code does it (docs/method.md, section 3), for bench_step.py.

This is variant (c) of `benchmarks/bench_step.py`: the baseline our step is measured
against. It is written from the step's description (docs/method.md, section 3), not from
the reference repository, and deliberately does the work the way a MiniLLM-style code base
does, without the library's shortcuts:

- everything in float32 (no autocast);
- sampling with `generate` (KV cache, stops when every row has ended), then the batch is
  rebuilt sample by sample in Python: strip the prompt's left padding, cut the response
  after its first EOS, concatenate, right-pad, build the loss mask, one row at a time;
- prompt update: teacher forward with the prompt (with grad, teacher dropout on: the
  reference quirk), a separate no-grad student forward in eval mode for sg p_S, a separate
  no-grad teacher forward with the prompt disabled for sg p_T;
- student update: a teacher forward with the *updated* prompt (no grad), a student forward
  with grad;
- every forward returns full-length logits (B, L, V) (no `logits_to_keep`; the prompted
  teacher's also covers the virtual positions, dropped afterwards), and every loss is
  computed unchunked on all positions of the (B, L - 1, V) tensors, then masked;
- PEFT prompt tuning for the soft prompt (its forward; rows are right-padded here, so the
  positions PEFT assigns are the right ones), AdamW for both parameter sets, clip 1.0.

The maths is the library's PromptKD default (reverse L_kd, reverse L_reg with
lambda_k = 1 - k/K, reverse-KL student loss, token-level means), so the two are comparable
step for step.
"""

from __future__ import annotations

import time

import torch

PHASES = (
    "generation",
    "batch_rebuild",
    "student_fwd",
    "teacher_fwd_prompt_grad",
    "teacher_fwd_base",
    "teacher_fwd_target",
    "losses",
    "backward_prompt",
    "backward_student",
    "optimizer",
)


def _constant_with_warmup(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps))
    )


def _masked_mean_kl(log_a: torch.Tensor, log_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean over mask of KL(a || b); (B, L, V) log-probs, (B, L) float mask."""
    kl = (log_a.exp() * (log_a - log_b)).sum(-1)  # (B, L)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


class ReferencePromptKDStep:
    """One PromptKD optimizer step, the plain way. `step(prompt_id_lists)` -> metrics."""

    def __init__(
        self,
        student,
        teacher,
        tokenizer,
        *,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        total_steps: int = 1000,
        num_virtual_tokens: int = 7,
        init_text: str = "Suppose you are a student.",
        max_new_tokens: int = 128,
        max_grad_norm: float = 1.0,
    ):
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        self.student = student.float()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_grad_norm = max_grad_norm
        self.total_steps = total_steps
        self.n_virtual = num_virtual_tokens
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.k = 0

        teacher = teacher.float()
        teacher.requires_grad_(False)
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
        self.teacher = get_peft_model(teacher, config)
        prompt = self.teacher.prompt_encoder["default"].embedding.weight
        ids = tokenizer(init_text)["input_ids"]
        ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
        with torch.no_grad():
            prompt.copy_(teacher.get_input_embeddings().weight[torch.tensor(ids)])
        self.prompt_params = [prompt]

        self.student_opt = torch.optim.AdamW(
            self.student.parameters(), lr=learning_rate, weight_decay=weight_decay
        )
        self.prompt_opt = torch.optim.AdamW(
            self.prompt_params, lr=learning_rate, weight_decay=weight_decay
        )
        self.student_sched = _constant_with_warmup(self.student_opt, warmup_steps)
        self.prompt_sched = _constant_with_warmup(self.prompt_opt, warmup_steps)

    # ----------------------------------------------------------------------------- pieces
    def _generate(self, prompts: list[list[int]]):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        self.student.eval()
        with torch.no_grad():
            out = self.student.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
            )
        self.student.train()
        return ids, mask, out

    def _rebuild(self, ids, mask, generated):
        """Per sample: prompt without padding + response up to its first EOS, right-padded."""
        rows, targets = [], []
        width = ids.shape[1]
        for i in range(generated.shape[0]):
            prompt = ids[i][mask[i] == 1].tolist()
            response = []
            for token in generated[i, width:].tolist():
                response.append(token)
                if token == self.eos_id:
                    break
            rows.append(prompt + response)
            # logits at t predict t + 1: target positions are the response tokens
            targets.append([0] * (len(prompt) - 1) + [1] * len(response))
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), length - 1), dtype=torch.float32)
        for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            loss_mask[i, : len(target)] = torch.tensor(target, dtype=torch.float32)
        return input_ids, attention_mask, loss_mask

    def _teacher_logits(self, input_ids, attention_mask, *, prompt: bool):
        if prompt:
            logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits
            return logits[:, self.n_virtual : -1].float()  # drop the virtual positions
        with self.teacher.disable_adapter():
            return self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()

    def _student_logits(self, input_ids, attention_mask):
        return self.student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()

    def _clip_and_step(self, params, optimizer, scheduler):
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------------------- step
    def step(self, prompts: list[list[int]]) -> dict:
        t: dict[str, float] = dict.fromkeys(PHASES, 0.0)

        def lap(name, start):
            now = time.perf_counter()
            t[name] += now - start
            return now

        now = time.perf_counter()
        ids, mask, generated = self._generate(prompts)
        now = lap("generation", now)
        input_ids, attention_mask, loss_mask = self._rebuild(ids, mask, generated)
        now = lap("batch_rebuild", now)

        # prompt update
        self.teacher.train()  # reference quirk: teacher dropout on for the prompt forward
        tp = self._teacher_logits(input_ids, attention_mask, prompt=True)
        now = lap("teacher_fwd_prompt_grad", now)
        self.teacher.eval()
        self.student.eval()
        with torch.no_grad():
            s_target = self._student_logits(input_ids, attention_mask)
        self.student.train()
        now = lap("student_fwd", now)
        with torch.no_grad():
            base = self._teacher_logits(input_ids, attention_mask, prompt=False)
        now = lap("teacher_fwd_base", now)
        lam = 1.0 - self.k / self.total_steps
        log_tp = torch.log_softmax(tp, -1)
        l_kd = _masked_mean_kl(log_tp, torch.log_softmax(s_target, -1), loss_mask)
        l_reg = _masked_mean_kl(log_tp, torch.log_softmax(base, -1), loss_mask)
        loss = l_kd + lam * l_reg
        now = lap("losses", now)
        loss.backward()
        now = lap("backward_prompt", now)
        self._clip_and_step(self.prompt_params, self.prompt_opt, self.prompt_sched)
        now = lap("optimizer", now)
        del tp, log_tp, s_target, base, loss

        # student update against the updated prompt
        with torch.no_grad():
            target = self._teacher_logits(input_ids, attention_mask, prompt=True)
        now = lap("teacher_fwd_target", now)
        s_logits = self._student_logits(input_ids, attention_mask)
        now = lap("student_fwd", now)
        l_student = _masked_mean_kl(
            torch.log_softmax(s_logits, -1), torch.log_softmax(target, -1), loss_mask
        )
        now = lap("losses", now)
        l_student.backward()
        now = lap("backward_student", now)
        self._clip_and_step(list(self.student.parameters()), self.student_opt, self.student_sched)
        lap("optimizer", now)
        self.k += 1

        tokens = float(loss_mask.sum())
        return {
            "prompt/kd": float(l_kd),
            "prompt/reg": float(l_reg),
            "student/loss": float(l_student),
            "generated_tokens": tokens,
            "trained_tokens": tokens,
            "seq_len": int(input_ids.shape[1]),
            "phases": t,
        }
