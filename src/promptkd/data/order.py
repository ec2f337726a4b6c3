"""The global batch order: how one optimizer step's examples are split over processes and
micro-batches, and joined back.

A step's global batch is a list in a fixed order. Micro-batch m of every process comes before
micro-batch m + 1 of any, and inside micro-batch m the processes take consecutive runs of
sizes[m] items in process order:

    micro-batch m of process r = items[start_m + r * sizes[m] : start_m + (r + 1) * sizes[m]]
    start_m = num_processes * (sizes[0] + ... + sizes[m - 1])

The union of every process's micro-batches is the whole global batch, so a step trains on the
same examples however the batch is split. The training data order (the trainer's `DataOrder`),
MiniLLM's LM data and DistiLLM's replay draws all use this layout; DistiLLM's replay buffer is
filled in it (`global_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

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
