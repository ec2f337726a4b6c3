"""Parameter memory per process of a teacher 4x the student, replicated vs sharded with train.fsdp.

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_memory.py
    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_memory.py --out benchmarks/results/fsdp_memory_$(date +%Y%m%d).md

Random-init Llamas (no download), float32, CPU (gloo): a teacher of hidden 512, 14 layers and a
student of hidden 256, 8 layers, both with a 32,000-token vocabulary and tied embeddings (the
teacher has 4.1x the student's parameters; the embeddings are 32% of the teacher's and 58% of the
student's, far more than in an LLM: the root unit's share below is large for that reason). Both are sharded as `promptkd train --train.fsdp true`
shards them (`promptkd.models.sharding.shard_model`). Per process it counts the bytes of the
parameter storages the process holds (each storage once):

- replicated: the whole model, what every process holds without train.fsdp;
- sharded, at rest: the process's shards (DTensor local tensors, FSDP2's padding included);
- sharded, after a no-grad forward: the shards plus the root unit (input embeddings, final norm,
  LM head), which FSDP2 keeps gathered after the root's forward until a backward through the
  model (the chunked losses use the gathered head). A decoder layer is gathered only during its
  own forward, so one layer more is the peak inside a forward (not counted here).

For the student, also AdamW's two moments after one step (they have the shards' shapes).
The last stdout line is one JSON document with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from promptkd.models.sharding import shard_model

SHAPES = {"teacher": {"hidden_size": 512, "num_hidden_layers": 14, "intermediate_size": 1408},
          "student": {"hidden_size": 256, "num_hidden_layers": 8, "intermediate_size": 704}}
VOCAB = 32000
MIB = 1 << 20


def build(name: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                         max_position_embeddings=512, **SHAPES[name])
    return LlamaForCausalLM(config)


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shards)."""
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def shard_bytes(model) -> int:
    return held_bytes(p for p in model.parameters() if isinstance(p, DTensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write a markdown report here (main process)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    figures = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        model = build(name, seed)
        params = sum(p.numel() for p in model.parameters())
        replicated = held_bytes(model.parameters())
        shard_model(model, mesh)
        # before any forward: afterwards parameters() lists the gathered root unit, not its shards
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3) if name == "student" else None
        at_rest = shard_bytes(model)
        with torch.no_grad():
            model(input_ids=ids)
        gathered = held_bytes(p for p in model.parameters() if not isinstance(p, DTensor))
        row = {"parameters": params, "replicated_mib": replicated / MIB, "sharded_at_rest_mib": at_rest / MIB,
               "sharded_after_forward_mib": (at_rest + gathered) / MIB}
        if optimizer is not None:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
            row["adamw_moments_replicated_mib"] = 2 * replicated / MIB
            row["adamw_moments_sharded_mib"] = held_bytes(states) / MIB
        figures[name] = row
    per_rank = [None] * world
    dist.all_gather_object(per_rank, figures)
    if rank == 0:
        result = {"world_size": world, "vocab": VOCAB, "shapes": SHAPES, "dtype": "float32", "device": "cpu",
                  "torch": torch.__version__, "machine": platform.machine(),
                  "date": time.strftime("%Y-%m-%d"), "per_rank": per_rank}
        if args.out:
            write_report(args.out, result)
        print(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_report(path: str, result: dict) -> None:
    lines = [f"# Parameter memory per process, replicated vs train.fsdp ({result['world_size']} processes, CPU)", "",
             f"torch {result['torch']}, float32, {result['date']}; `torchrun --standalone --nproc_per_node "
             f"{result['world_size']} benchmarks/fsdp_memory.py`. Shapes: {json.dumps(result['shapes'])}, "
             f"vocabulary {result['vocab']}, tied embeddings. MiB of parameter storage held by each process.", "",
             "| model | rank | parameters | replicated | sharded, at rest | sharded, after a forward | "
             "AdamW moments replicated | AdamW moments sharded |", "|---|---|---|---|---|---|---|---|"]
    for rank, figures in enumerate(result["per_rank"]):
        for name, row in figures.items():
            lines.append(f"| {name} | {rank} | {row['parameters']:,} | {row['replicated_mib']:.1f} | "
                         f"{row['sharded_at_rest_mib']:.1f} | {row['sharded_after_forward_mib']:.1f} | "
                         f"{_mib(row.get('adamw_moments_replicated_mib'))} | {_mib(row.get('adamw_moments_sharded_mib'))} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
