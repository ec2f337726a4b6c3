"""Dev evaluation: the student's token-mean cross-entropy on the dev set (`dev/loss`) or the
ROUGE-L of its sampled responses against the references (`dev/rougeL`).

    dev = DevEvaluation(ctx, tokenizer, dev_examples, batch_size=8)
    dev.evaluate("loss", show_progress=True)     # {"dev/loss": ...}

Each process takes its share of the dev set; every process runs the same number of batches, so
collectives inside forward / generate (FSDP) stay matched, and the results are reduced over
processes, so every process gets the same value. Its forwards and samples are not counted as
training compute (`TrainingContext.uncounted`).
"""

from __future__ import annotations

import contextlib
import math

import torch

from promptkd.losses import CROSS_ENTROPY, loss_terms
from promptkd.methods.base import response_mask
from promptkd.metric import corpus_rouge_l


class DevEvaluation:
    """The dev set of a run and its two measures.

    While `memoised()` is active (the trainer's loop), the dev loss of one student state is
    computed once: DistiLLM's phi check (ctx.dev_loss, after its update) and the evaluation of the
    same step get it from one pass over the dev set. Inside the loop the student changes only
    through ctx.apply_update, whose count is the memo's key.
    """

    @staticmethod
    def improved(metric: str, record: dict, best: float | None) -> float | None:
        """The record's value of train.eval_metric when it beats `best` (lower loss, higher
        ROUGE-L), else None."""
        key = "dev/loss" if metric == "loss" else "dev/rougeL"
        value = record.get(key)
        if value is None or (best is not None and (value >= best if key == "dev/loss" else value <= best)):
            return None
        return value

    def __init__(self, ctx, tokenizer, examples: list, *, batch_size: int):
        self.ctx = ctx
        self.tokenizer = tokenizer
        self.examples = examples
        self.batch_size = batch_size
        self._memo: dict[int, float] | None = None  # {ctx.updates_applied: dev loss} while memoised

    @torch.no_grad()
    def evaluate(self, metric: str, *, show_progress: bool) -> dict:
        """{"dev/loss": ...} for metric "loss", else {"dev/rougeL": ...}; {} without a dev set."""
        if not self.examples:
            return {}
        if metric == "loss":
            return {"dev/loss": self.loss(show_progress=show_progress)}
        with self.ctx.uncounted():
            return {"dev/rougeL": self.rouge(show_progress=show_progress)}

    def loss(self, *, show_progress: bool) -> float:
        """The student's token-mean dev CE (eval mode), reduced over processes; memoised per
        student state inside `memoised()`."""
        memo, version = self._memo, self.ctx.updates_applied
        if memo is not None and version in memo:
            return memo[version]
        with self.ctx.uncounted():
            loss = self.pass_loss(show_progress=show_progress)
        if memo is not None:
            memo.clear()
            memo[version] = loss
        return loss

    @contextlib.contextmanager
    def memoised(self):
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def pass_loss(self, *, show_progress: bool) -> float:
        """One pass over the dev set: the summed response-token CE over the token count."""
        ctx = self.ctx
        total, count = 0.0, 0.0
        for chunk, indices in self.shards("dev loss", show_progress=show_progress):
            batch = ctx.collate(chunk)
            outputs = ctx.student_forward(batch, target=True)  # eval mode, no grad
            if indices is None:  # a filler batch that keeps the processes in step
                continue
            mask = response_mask(batch)
            targets = batch.input_ids[:, batch.prompt_length :]
            _, (nll,) = loss_terms(outputs, [(CROSS_ENTROPY, targets, 1.0)], mask)
            total += nll
            count += float(mask.sum())
        return ctx.reduce_sum(total) / max(ctx.reduce_sum(count), 1.0)

    def rouge(self, *, show_progress: bool) -> float:
        """Corpus ROUGE-L of the student's sampled responses (eval sampling) against the references."""
        scored = []  # (dev index, prediction) of this process's share
        for chunk, indices in self.shards("dev ROUGE-L", show_progress=show_progress):
            batch = self.ctx.sample(chunk, training=False)
            if indices is None:  # a filler batch that keeps the processes in step
                continue
            resp = batch.input_ids[:, batch.prompt_length :]
            mask = batch.loss_mask[:, batch.prompt_length :]
            for row, m, i in zip(resp, mask, indices, strict=True):
                scored.append((i, self.tokenizer.decode(row[m], skip_special_tokens=True).strip()))
        if self.ctx.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            # every process scores the same complete list, so best-checkpoint decisions agree
            scored = gather_object(scored)
        scored.sort(key=lambda x: x[0])
        return corpus_rouge_l([p for _, p in scored], [self.examples[i].references for i, _ in scored])

    def shards(self, desc: str, *, show_progress: bool):
        """This process's dev batches as (examples, dev indices), the same count on every process,
        with a progress bar named `desc` (when show_progress, on the main process).

        A process with no examples left gets a filler copy of the first batch with indices
        None, so that collectives inside forward / generate (FSDP) stay matched.
        """
        from tqdm.auto import tqdm

        accelerator, bs, n = self.ctx.accelerator, self.batch_size, len(self.examples)
        rank, world = accelerator.process_index, accelerator.num_processes
        for it in tqdm(range(math.ceil(n / (bs * world))), desc=desc, leave=False, dynamic_ncols=True,
                       disable=not (show_progress and accelerator.is_main_process)):
            start = (it * world + rank) * bs
            indices = list(range(start, min(start + bs, n)))
            if indices:
                yield [self.examples[i] for i in indices], indices
            else:
                yield self.examples[:bs], None
