"""DistiLLM: a skew divergence with adaptive use of student-generated responses.

    promptkd train --config configs/distillm.yaml

Each optimizer step (docs/method.md, section 6) trains (1 - kd_ratio) CE + kd_ratio D on one of
three kinds of responses for this step's prompts, chosen by one uniform draw u per step:

    fresh  = phi f(t)     f = 1 - t/T (decreasing), 1/2 (constant) or t/T (increasing)
    u < fresh, or u < phi with the buffer not yet full:  the student samples now (on-policy);
                                                         the samples join the replay buffer
    u < phi otherwise:                                    a batch drawn from the replay buffer
    else:                                                 the dataset's responses

D is skew reverse KL, KL(p_S || a p_S + (1 - a) p_T), or skew forward KL, KL(p_T || a p_T +
(1 - a) p_S) (a = distillm.alpha). phi, the probability of student data, starts at
initial_student_prob and grows by prob_step (at most to 1) whenever the dev loss has risen
by loss_eps or more since phi last grew; it is checked once per epoch (adapt_every 0) or every
adapt_every steps. The buffer (first in first out) holds every process's samples in the global
batch order, so all processes hold the same buffer; its size is capacity sequences per process
(capacity x processes in all), as the reference keeps capacity on each GPU (jongwooko/distillm
distillm/buffer.py:19, one buffer per process, finetune.py:267); it is part of the
method's state, with phi and the dev loss at the last growth, so a resumed run continues
exactly.

The draw u and the replay draw depend only on train.seed and the step, so every process and
every resumed run makes the same choice.
"""

from __future__ import annotations

import math

import torch

from promptkd.data.batch import SequenceBatch
from promptkd.data.dataset import Example
from promptkd.data.order import global_batch, local_micro_batches
from promptkd.losses import divergence
from promptkd.methods.base import Method, StepContext, StepResult, response_mask, supervised_step

SOURCES = ("data", "fresh", "replay")


def fresh_fraction(phi: float, progress: float, replay_ratio: str) -> float:
    """The probability of a step on fresh student samples, phi f(t), t = progress in [0, 1]."""
    f = {"decreasing": 1.0 - progress, "constant": 0.5, "increasing": progress}[replay_ratio]
    return phi * f


def choose_source(u: float, *, phi: float, fresh: float, buffer_full: bool) -> str:
    """Which responses a step trains on, for the step's uniform draw u."""
    if u < fresh or (u < phi and not buffer_full):
        return "fresh"
    if u < phi:
        return "replay"
    return "data"


def adapted_prob(phi: float, prev_loss: float, dev_loss: float, *, loss_eps: float, prob_step: float) -> tuple[float, float]:
    """(phi, reference loss) after a dev-loss check: phi grows when the loss rose by loss_eps."""
    if dev_loss >= prev_loss + loss_eps:
        return min(phi + prob_step, 1.0), dev_loss
    return phi, prev_loss


def batch_to_pairs(batch: SequenceBatch) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per row of a sampled batch: the real tokens, up to the first EOS."""
    p = batch.prompt_length
    out = []
    for ids, attn, loss in zip(batch.input_ids.cpu(), batch.attention_mask.cpu(), batch.loss_mask.cpu(), strict=True):
        out.append((ids[:p][attn[:p].bool()].tolist(), ids[p:][loss[p:]].tolist()))
    return out


class DistiLLM(Method):
    name = "distillm"
    # distillm/sampler.py re-packs samples without their EOS; here capped samples stay as sampled
    # and an EOS, when sampled, is trained (see docs/method.md for the deviation)
    eos_at_cap_default = False

    @classmethod
    def needs_references(cls, options) -> bool:
        return options.initial_student_prob < 1.0  # phi < 1: some steps train on the dataset's responses

    def setup(self, ctx: StepContext) -> None:
        c = self.options
        self.ctx = ctx
        self.seed = ctx.seed
        self.div = divergence(c.divergence, beta=c.beta, alpha=c.alpha, ab_alpha=c.ab_alpha, ab_beta=c.ab_beta)
        self.phi = c.initial_student_prob
        self.prev_loss: float | None = None  # dev loss at the last growth of phi (or at the start)
        self.checked = 0  # epochs (adapt_every 0) or steps already checked
        self.buffer: list[tuple[list[int], list[int]]] = []

    def state_dict(self) -> dict:
        return {"phi": self.phi, "prev_loss": self.prev_loss, "checked": self.checked,
                "buffer": [(list(p), list(r)) for p, r in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        self.phi, self.prev_loss, self.checked = state["phi"], state["prev_loss"], state["checked"]
        self.buffer = [(list(p), list(r)) for p, r in state["buffer"]]

    # ------------------------------------------------------------------ pieces
    def adapting(self) -> bool:
        return self.options.prob_step > 0 and self.phi < 1.0

    def draw(self, step: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7919 + step * 3 + stream)

    def push(self, ctx: StepContext, batches: list[SequenceBatch]) -> None:
        """Add every process's samples in global batch order (micro-batch, then process)."""
        gathered = ctx.gather_object([batch_to_pairs(b) for b in batches])  # [process][micro-batch] -> pairs
        self.buffer.extend(global_batch(gathered))
        del self.buffer[: max(0, len(self.buffer) - self.capacity(ctx))]

    def capacity(self, ctx: StepContext) -> int:
        """The buffer's size in sequences: distillm.capacity per process."""
        return self.options.capacity * ctx.num_processes

    def replay(self, ctx: StepContext, step: int, micro_batches: list[list]) -> list[SequenceBatch]:
        """This process's share of a global batch drawn from the buffer (same layout as the data)."""
        sizes = [len(mb) for mb in micro_batches]
        total = ctx.num_processes * sum(sizes)
        g = self.draw(step, 1)
        n = len(self.buffer)
        idx = torch.randperm(n, generator=g)[:total] if n >= total else torch.randint(n, (total,), generator=g)
        mine = local_micro_batches(idx.tolist(), sizes, num_processes=ctx.num_processes, process_index=ctx.process_index)
        return [ctx.collate([Example(prompt_ids=self.buffer[i][0], response_ids=self.buffer[i][1], references=[])
                             for i in rows]) for rows in mine]

    def maybe_adapt(self, ctx: StepContext, metrics: dict) -> None:
        """The dev-loss check after a step: once per epoch, or every adapt_every steps."""
        c = self.options
        if c.adapt_every:
            if (ctx.step + 1) % c.adapt_every:
                return
        else:
            epochs = math.floor(ctx.epoch + 1e-9)  # completed passes over the training data
            if epochs <= self.checked:
                return
            self.checked = epochs
        if not self.adapting():
            return
        loss = ctx.dev_loss()
        if loss is None:
            return
        if self.prev_loss is None:  # no dev loss before training: this one is the reference
            self.prev_loss = loss
            metrics["distillm/dev_loss"] = loss
            return
        self.phi, self.prev_loss = adapted_prob(self.phi, self.prev_loss, loss, loss_eps=c.loss_eps, prob_step=c.prob_step)
        metrics["distillm/dev_loss"] = loss

    # ------------------------------------------------------------------ the step
    def step(self, ctx: StepContext, micro_batches: list[list]) -> StepResult:
        c = self.options
        if self.prev_loss is None and self.adapting():
            self.prev_loss = ctx.dev_loss()  # the reference evaluates before training (finetune.py:266)
        u = float(torch.rand((), generator=self.draw(ctx.step, 0)))
        fresh = fresh_fraction(self.phi, ctx.step / ctx.max_steps, c.replay_ratio)
        source = choose_source(u, phi=self.phi, fresh=fresh, buffer_full=len(self.buffer) >= self.capacity(ctx))
        if source == "fresh":
            batches = [ctx.sample(mb) for mb in micro_batches]
            self.push(ctx, batches)
        elif source == "replay":
            batches = self.replay(ctx, ctx.step, micro_batches)
        else:
            batches = [ctx.collate(mb) for mb in micro_batches]
        result = supervised_step(ctx, batches, kd_ratio=c.kd_ratio, div=self.div)
        result.metrics.update({"distillm/student_prob": self.phi, "distillm/source": float(SOURCES.index(source)),
                               "distillm/buffer": float(len(self.buffer))})
        if source == "fresh":
            result.generated_tokens = sum(float(response_mask(b).sum()) for b in batches)
        self.maybe_adapt(ctx, result.metrics)
        return result
