"""The global batch order: how one optimizer step's examples are split over processes and
micro-batches, and joined back.

A step's global batch is a list in a fixed order. Micro-batch m of every process comes before
micro-batch m + 1 of any, and inside micro-batch m the processes take consecutive runs of
sizes[m] items in process order:

    micro-batch m of process r = items[start_m + r * sizes[m] : start_m + (r + 1) * sizes[m]]
    start_m = num_processes * (sizes[0] + ... + sizes[m - 1])

The union of every process's micro-batches is the whole global batch, so a step trains on the
same examples however the batch is split. The training data order (`DataOrder`, below),
MiniLLM's LM data and DistiLLM's replay draws all use this layout; DistiLLM's replay buffer is
filled in it (`global_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def local_micro_batches(items: Sequence[T], sizes: Sequence[int], *, num_processes: int,
                        process_index: int) -> list[list[T]]:
    """This process's micro-batches of a step's global batch.

    Args:
        items: the global batch in order, num_processes * sum(sizes) long.
        sizes: the micro-batch sizes of one process (the same on every process).
        num_processes / process_index: the world size and this process's rank.

    Returns:
        len(sizes) lists; list m holds sizes[m] items laid out as in the module docstring.

    Raises:
        ValueError: if `items` is not num_processes * sum(sizes) long.
    """
    if len(items) != num_processes * sum(sizes):
        raise ValueError(f"local_micro_batches: {len(items)} items for {num_processes} processes x "
                         f"micro-batches of {list(sizes)}")
    out, start = [], 0
    for size in sizes:
        begin = start + process_index * size
        out.append(list(items[begin : begin + size]))
        start += num_processes * size
    return out


def global_batch(per_process: Sequence[Sequence[Sequence[T]]]) -> list[T]:
    """The inverse of `local_micro_batches`: every process's micro-batches
    ([process][micro-batch] -> items, the same number of micro-batches on each) joined in the
    global batch order (micro-batch, then process)."""
    num_micro = len(per_process[0]) if per_process else 0
    return [item for m in range(num_micro) for proc in per_process for item in proc[m]]


class DataOrder:
    """Seeded epoch permutations of the training examples; the state is one integer (examples
    consumed globally), which a checkpoint saves and a resumed run restores."""

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.seed = seed
        self.position = 0
        self._epoch = -1
        self._perm: list[int] = []

    def _perm_for(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_examples, generator=g).tolist()
            self._epoch = epoch
        return self._perm

    @property
    def epoch(self) -> float:
        return self.position / self.num_examples

    def micro_batches(self, batch_size: int, accumulation: int, world: int, rank: int) -> list[list[int]]:
        """Example indices of process `rank`'s micro-batches for the next optimizer step.

        The step takes batch_size x accumulation x world examples in the global batch order
        (module docstring): micro-batch m of rank r holds global slots
        (m * world + r) * batch_size ..., so step k trains on the same examples for any split of
        the same global batch, and the position is global (resumable anywhere).
        """
        indices = self.take(batch_size * accumulation * world)
        return local_micro_batches(indices, [batch_size] * accumulation, num_processes=world, process_index=rank)

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            epoch, idx = divmod(self.position, self.num_examples)
            out.append(self._perm_for(epoch)[idx])
            self.position += 1
        return out
