"""MiniLLM: the sequence-level reverse KL KL(p_S || p_T) optimised as a policy gradient.

    promptkd train --config configs/minillm.yaml

One rollout phase every `minillm.ppo_epochs` optimizer steps (docs/method.md, section 6):

0. Rollouts. For this step's prompts x, responses y are sampled token by token from the
   mixture  mix = (1 - alpha) p_S + alpha p_T  (teacher-mixed sampling, alpha =
   teacher_mix_alpha). Under no_grad, with the student as it is now (S_old):
       lq_t = log p_S_old(y_t | c_t),  lp_t = log p_T(y_t | c_t),   c_t = (x, y_<t)
       w_t  = p_S_old(y_t) / mix(y_t)                      importance weight (1 when alpha = 0)
       r_t  = clip((lp_t - lq_t) / reward_scaling, +-cliprange_reward)
       G_t  = sum_{s >= t} gamma^(s - t) r_s     (include_current_reward; else
              sum_{s > t} gamma^(s - t - 1) r_s, the paper's return from t + 1)
       G_t /= number of response tokens in that sum        (length_norm)
       A_t  = (G_t - mean G) / std G                       (whiten; over the step's tokens)
1. Update, on every step of the phase (the same rollouts, ppo_epochs times):
       rho_t   = exp(log p_S(y_t | c_t) - lq_t) * w_t      = p_S(y_t) / mix(y_t)
       L_pg    = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))   (eps = cliprange)
       L_single= mean_t KL(p_S(. | c_t) || p_T(. | c_t))   exact over the vocabulary (single_step_reg)
       L_lm    = (1 - r) CE + r KL(p_T || p_S) on minillm.lm_data   (lm_coef; off by default)
       loss    = L_pg + L_single + lm_coef L_lm
   Means are over every response token of the step (all micro-batches and processes). The
   student runs in eval mode throughout (no dropout), as the reference's RL model does, so
   with one micro-batch a rollout step runs each model once on its rollouts: the student's
   forward with grad gives lq (detached) and the update's logits, the teacher's gives lp and
   the single-step term's target (`reuses_rollout_forwards`).

The single-step term's gradient is the analytic gradient of the per-position reverse KL (the
part of the sequence-level gradient whose expectation over y_t is taken exactly); L_pg carries
the long-term part through the sampled return. With include_current_reward (the reference
code) the return also contains r_t; false gives the paper's split, the return from t + 1.

The rollouts of the current phase are part of the method's state, so a resumed run continues
the phase on the same rollouts.

MiniLLM computes full (B, R, V) logits (`logits=True` forwards): the PPO term is a non-linear
function of each sampled token's log-probability log p_S(y_t), which needs its own
differentiable per-token values next to the single-step KL; its divergences run through the same
`loss_terms` as every method's, on those logits.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from promptkd.data.batch import SequenceBatch
from promptkd.data.order import local_micro_batches
from promptkd.losses import CROSS_ENTROPY, Outputs, divergence, loss_terms
from promptkd.methods.base import Method, StepContext, StepResult, response_mask, step_tokens


# ------------------------------------------------------------------------- the formulas
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, R, V) logits, (B, R) token ids -> (B, R) float32 log-probabilities of the tokens."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def importance_weights(lq: torch.Tensor, lp: torch.Tensor, alpha: float) -> torch.Tensor:
    """w = p_S(y) / ((1 - alpha) p_S(y) + alpha p_T(y)) from the log-probabilities lq, lp."""
    if alpha == 0:
        return torch.ones_like(lq)
    if alpha >= 1:
        return torch.exp(lq - lp)
    log_mix = torch.logaddexp(lq + math.log1p(-alpha), lp + math.log(alpha))
    return torch.exp(lq - log_mix)


def rewards(lq: torch.Tensor, lp: torch.Tensor, mask: torch.Tensor, *, scaling: float, clip: float) -> torch.Tensor:
    """r_t = clip((log p_T - log p_S) / scaling, +-clip), 0 off the mask. (B, R) each."""
    return ((lp - lq) / scaling).clamp(-clip, clip) * mask


def returns(r: torch.Tensor, mask: torch.Tensor, *, gamma: float, include_current: bool,
            length_norm: bool) -> torch.Tensor:
    """Discounted returns G_t = sum_{s >= t} gamma^(s-t) r_s (or sum_{s > t} gamma^(s-t-1) r_s,
    discounted from t + 1), optionally divided by
    the number of masked tokens summed over (at least 1). (B, R) -> (B, R), 0 off the mask."""
    mask = mask.to(r.dtype)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        if include_current:
            running = r[:, t] + gamma * running
            out[:, t] = running
        else:
            out[:, t] = running  # sum over s > t (discounted from t + 1)
            running = r[:, t] + gamma * running
    if length_norm:
        remaining = mask.flip(-1).cumsum(-1).flip(-1)  # sum_{s >= t} m_s
        if not include_current:
            remaining = remaining - mask
        out = out / remaining.clamp(min=1.0)
    return out * mask


def ppo_terms(logq: torch.Tensor, old_logq: torch.Tensor, weights: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of max(-A rho, -A clip(rho)) over the mask, number of clipped tokens), rho = exp(logq -
    old_logq) * w. Gradients flow through logq only."""
    ratio = torch.exp(logq - old_logq) * weights
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = torch.maximum(unclipped, clipped)
    return (loss * mask).sum(), ((clipped > unclipped) & mask).sum()


# ------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """One micro-batch of rollouts: the sequences and their per-token constants (B, R)."""

    batch: SequenceBatch
    old_logprobs: torch.Tensor
    weights: torch.Tensor
    advantages: torch.Tensor

    def to_state(self) -> dict:
        b = self.batch
        return {"input_ids": b.input_ids.cpu(), "attention_mask": b.attention_mask.cpu(),
                "loss_mask": b.loss_mask.cpu(), "prompt_length": b.prompt_length,
                "old_logprobs": self.old_logprobs.cpu(), "weights": self.weights.cpu(),
                "advantages": self.advantages.cpu()}

    @classmethod
    def from_state(cls, state: dict, device) -> Rollout:
        batch = SequenceBatch(state["input_ids"], state["attention_mask"], state["loss_mask"],
                              state["prompt_length"]).to(device)
        return cls(batch, *(state[k].to(device) for k in ("old_logprobs", "weights", "advantages")))


class MiniLLM(Method):
    name = "minillm"
    # LMOps minillm/sampler.py:71-73 writes no EOS into capped rollouts
    eos_at_cap_default = False

    @classmethod
    def needs_references(cls, options) -> bool:
        return False  # rollouts only; the LM term reads minillm.lm_data

    def setup(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.rollouts: list[Rollout] = []
        # the rollout step's forwards that its update reuses (one micro-batch), not state
        self.fresh_student_logits: torch.Tensor | None = None
        self.fresh_teacher_logits: torch.Tensor | None = None
        self.rollout_stats: dict[str, float] = {}
        self.single_step = divergence("reverse_kl")
        self.lm_divergence = divergence("forward_kl")
        self.lm_examples = ctx.extra_examples["minillm.lm_data"] if self.has_lm_term else []
        self.lm_position = 0  # LM examples consumed, over all processes

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        local = {"rollouts": [r.to_state() for r in self.rollouts], "stats": dict(self.rollout_stats)}
        return {"world_size": self.ctx.num_processes, "processes": self.ctx.gather_object(local),
                "lm_position": self.lm_position}

    def load_state_dict(self, state: dict) -> None:
        self.lm_position = state["lm_position"]
        if state["world_size"] != self.ctx.num_processes:
            if any(p["rollouts"] for p in state["processes"]) and self.ctx.is_main_process:
                warnings.warn(
                    f"minillm: the checkpoint's rollouts belong to {state['world_size']} processes, not "
                    f"{self.ctx.num_processes}; fresh rollouts are sampled at the next step", UserWarning, stacklevel=2)
            self.rollouts, self.rollout_stats = [], {}
            return
        local = state["processes"][self.ctx.process_index]
        self.rollouts = [Rollout.from_state(r, self.ctx.device) for r in local["rollouts"]]
        self.rollout_stats = local["stats"]

    # ------------------------------------------------------------------ rollouts
    def reuses_rollout_forwards(self, micro_batches: list[list]) -> bool:
        """Whether the rollout step's update reuses the forwards that scored its rollouts: one
        student forward with grad (its detached values are lq) and the teacher's logits.

        Exact: the student runs in eval mode (no dropout) throughout the step and does not change
        between scoring and update, on the same batch. Only with one micro-batch: with several,
        every micro-batch's logits (and the student's graph) would be held until its update.
        """
        return len(micro_batches) == 1

    @torch.no_grad()
    def collect(self, ctx: StepContext, micro_batches: list[list]) -> list[Rollout]:
        c = self.options
        reuse = self.reuses_rollout_forwards(micro_batches)
        pieces, reward_sum, weight_sum = [], 0.0, 0.0
        for mb in micro_batches:
            batch = ctx.sample(mb, teacher_mix=c.teacher_mix_alpha)
            mask = response_mask(batch)  # (B, R)
            targets = batch.input_ids[:, batch.prompt_length :]  # (B, R)
            if reuse:
                # the update's forward, run now; the LM term's micro-batches come after it
                with torch.enable_grad(), ctx.accumulate(is_last=not self.has_lm_term):
                    self.fresh_student_logits = ctx.student_forward(batch, logits=True).states  # (B, R, V), with grad
                student_logits = self.fresh_student_logits.detach()
            else:
                student_logits = ctx.student_forward(batch, target=True, logits=True).states  # (B, R, V), eval, no grad
            lq = token_logprobs(student_logits, targets) * mask  # (B, R)
            teacher = ctx.teacher_forward(batch, logits=True).states  # (B, R, V)
            lp = token_logprobs(teacher, targets) * mask  # (B, R)
            self.fresh_teacher_logits = teacher if reuse and c.single_step_reg else None
            del student_logits, teacher
            w = torch.where(mask, importance_weights(lq, lp, c.teacher_mix_alpha), 1.0)
            r = rewards(lq, lp, mask, scaling=c.reward_scaling, clip=c.cliprange_reward)
            g = returns(r, mask, gamma=c.gamma, include_current=c.include_current_reward, length_norm=c.length_norm)
            pieces.append((batch, lq, w, g, mask))
            reward_sum += float((lp - lq)[mask].sum())
            weight_sum += float(w[mask].sum())
        tokens = step_tokens(ctx, [p[0] for p in pieces])
        out = []
        if c.whiten:  # mean and variance over every response token of the step, all processes
            mean = ctx.reduce_sum(sum(float(g[m].sum()) for _, _, _, g, m in pieces)) / max(tokens, 1.0)
            var = ctx.reduce_sum(sum(float(((g - mean)[m] ** 2).sum()) for _, _, _, g, m in pieces)) / max(tokens, 1.0)
        for batch, lq, w, g, mask in pieces:
            a = (g - mean) / math.sqrt(var + 1e-8) if c.whiten else g
            out.append(Rollout(batch, lq, w, a * mask))
        self.rollout_stats = {
            "minillm/log_ratio": ctx.reduce_sum(reward_sum) / max(tokens, 1.0),  # mean log p_T - log p_S, unscaled
            "minillm/importance_weight": ctx.reduce_sum(weight_sum) / max(tokens, 1.0),
        }
        return out

    # ------------------------------------------------------------------ the LM term's data
    @property
    def has_lm_term(self) -> bool:
        return self.options.lm_coef > 0

    def lm_micro_batches(self, ctx: StepContext, sizes: list[int]) -> list[list]:
        """This process's LM micro-batches: the next examples (cycling), laid out like the
        training data (promptkd.data.order)."""
        n, total = len(self.lm_examples), ctx.num_processes * sum(sizes)
        examples = [self.lm_examples[(self.lm_position + j) % n] for j in range(total)]
        self.lm_position += total
        return local_micro_batches(examples, sizes, num_processes=ctx.num_processes, process_index=ctx.process_index)

    # ------------------------------------------------------------------ the step
    def step(self, ctx: StepContext, micro_batches: list[list]) -> StepResult:
        c = self.options
        student = ctx.student_module
        was_training = student.training
        student.eval()  # the reference's RL student has no dropout (LMOps minillm/model.py:14)
        try:
            return self._step(ctx, micro_batches, c)
        finally:
            student.train(was_training)

    def _step(self, ctx: StepContext, micro_batches: list[list], c) -> StepResult:
        fresh = ctx.step % c.ppo_epochs == 0 or not self.rollouts
        if fresh:
            self.rollouts = []  # free the last phase's tensors before sampling
            self.rollouts = self.collect(ctx, micro_batches)
        batches = [r.batch for r in self.rollouts]
        global_tokens = step_tokens(ctx, batches)
        lm_batches = []
        if self.has_lm_term:
            lm_batches = [ctx.collate(mb) for mb in self.lm_micro_batches(ctx, [len(mb) for mb in micro_batches])]
        pg_sum = single_sum = clipped = 0.0
        for i, ro in enumerate(self.rollouts):
            last = i == len(self.rollouts) - 1 and not lm_batches
            with ctx.accumulate(is_last=last):
                mask = response_mask(ro.batch)
                targets = ro.batch.input_ids[:, ro.batch.prompt_length :]
                # (B, R, V), with grad: the rollout forward's when collect ran it with grad
                logits = self.fresh_student_logits if fresh and self.fresh_student_logits is not None \
                    else ctx.student_forward(ro.batch, logits=True).states
                self.fresh_student_logits = None
                teacher = None  # (B, R, V), no grad
                if c.single_step_reg:
                    teacher = self.fresh_teacher_logits if fresh and self.fresh_teacher_logits is not None \
                        else ctx.teacher_forward(ro.batch, logits=True).states
                    self.fresh_teacher_logits = None
                with ctx.phase("losses"):
                    logq = token_logprobs(logits, targets)
                    pg, n_clipped = ppo_terms(logq, ro.old_logprobs, ro.weights, ro.advantages, mask, c.cliprange)
                    loss = pg
                    if teacher is not None:
                        single, _ = loss_terms(Outputs(logits), [(self.single_step, Outputs(teacher), 1.0)], mask)
                        loss = loss + single
                        single_sum += float(single.detach())
                pg_sum += float(pg.detach())
                clipped += float(n_clipped)
                ctx.backward(loss, global_tokens)
            del logits, teacher, loss
        metrics = dict(self.rollout_stats)
        pg_mean = ctx.reduce_sum(pg_sum) / max(global_tokens, 1.0)
        single_mean = ctx.reduce_sum(single_sum) / max(global_tokens, 1.0)
        metrics.update({"minillm/pg": pg_mean, "minillm/clip_frac": ctx.reduce_sum(clipped) / max(global_tokens, 1.0),
                        "minillm/fresh_rollouts": float(fresh)})
        loss_value = pg_mean
        if c.single_step_reg:
            metrics["minillm/single_step"] = single_mean
            loss_value += single_mean
        if lm_batches:
            lm_tokens = step_tokens(ctx, lm_batches)
            lm_sum = 0.0
            for i, batch in enumerate(lm_batches):
                with ctx.accumulate(is_last=i == len(lm_batches) - 1):
                    mask = response_mask(batch)
                    student = ctx.student_forward(batch)  # with grad
                    terms = [(CROSS_ENTROPY, batch.input_ids[:, batch.prompt_length :], 1.0 - c.lm_kd_ratio)]
                    if c.lm_kd_ratio > 0:
                        terms.append((self.lm_divergence, ctx.teacher_forward(batch), c.lm_kd_ratio))  # no grad
                    with ctx.phase("losses"):
                        loss, _ = loss_terms(student, terms, mask)
                    del student, terms  # the loss holds its gradients: the outputs go before the backward
                    lm_sum += float(loss.detach())
                    ctx.backward(loss * c.lm_coef, lm_tokens)
            metrics["minillm/lm"] = ctx.reduce_sum(lm_sum) / max(lm_tokens, 1.0)
            loss_value += c.lm_coef * metrics["minillm/lm"]
        metrics["student/loss"] = loss_value
        metrics.update(ctx.apply_update("student", loss_value))
        trained = sum(float(response_mask(b).sum()) for b in batches)
        generated = trained if fresh else 0.0
        return StepResult(metrics, trained_tokens=trained, generated_tokens=generated)
