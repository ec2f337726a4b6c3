"""On-policy sampling speed of the student, replicated vs sharded with train.fsdp (FSDP2).

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_generate_speed.py
    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_generate_speed.py --out benchmarks/results/fsdp_generate_speed_$(date +%Y%m%d).md

The student of benchmarks/fsdp_memory.py (random-init Llama, hidden 256, 8 layers, 32,000-token
vocabulary, tied embeddings, 14.1 M parameters), float32, CPU (gloo). Each process samples its own
batch of prompts with `promptkd.sampling.sample_responses` (the trainer's `hf` sampler:
transformers `generate` with a KV cache, temperature 1, up to --new-tokens tokens), as a training
step does:

- replicated: every process holds the whole student (a DDP run); no communication;
- sharded: the student sharded as `promptkd train --train.fsdp true` shards it
  (`promptkd.models.sharding.shard_model`): every decoding step gathers each decoder layer (an
  all-gather per layer and token) and transformers' `synced_gpus` keeps the ranks stepping together.

Both variants run on both processes at once, after one warm-up call, --repeats times each,
alternating; the figure is the median over calls of the slower rank's time. Tokens/s counts the
generated tokens of both processes. The last stdout line is one JSON document with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from promptkd.models.sharding import shard_model
from promptkd.sampling import SamplingConfig, sample_responses

SHAPE = {"hidden_size": 256, "num_hidden_layers": 8, "intermediate_size": 704}
VOCAB = 32000


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=VOCAB, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                         max_position_embeddings=512, **SHAPE)
    return LlamaForCausalLM(config).eval()


def timed_sample(model, prompt_ids, config) -> tuple[float, int]:
    """(seconds of the slower rank, generated tokens of all ranks) of one sampling call."""
    mask = torch.ones_like(prompt_ids)
    dist.barrier()
    t0 = time.perf_counter()
    batch = sample_responses(model, prompt_ids, mask, eos_token_ids=VOCAB - 1, pad_token_id=0, config=config)
    seconds = torch.tensor([time.perf_counter() - t0, float(batch.loss_mask.sum())], dtype=torch.float64)
    slowest, tokens = seconds.clone(), seconds.clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    dist.all_reduce(tokens)
    return float(slowest[0]), int(tokens[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="prompts per process")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write a markdown report here (main process)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    replicated = build()
    sharded = shard_model(copy.deepcopy(replicated), init_device_mesh("cpu", (world,)))
    params = sum(p.numel() for p in replicated.parameters())
    prompt_ids = torch.randint(1, VOCAB - 1, (args.batch, args.prompt_length),
                               generator=torch.Generator().manual_seed(rank))
    config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    torch.manual_seed(rank)
    models = {"replicated": replicated, "sharded": sharded}
    times = {name: [] for name in models}
    tokens = dict.fromkeys(models, 0)
    for model in models.values():  # warm-up
        timed_sample(model, prompt_ids, config)
    for _ in range(args.repeats):
        for name, model in models.items():
            seconds, generated = timed_sample(model, prompt_ids, config)
            times[name].append(seconds)
            tokens[name] = generated  # the same count every call: random models reach the cap
    rows = {}
    for name in models:
        median = statistics.median(times[name])
        rows[name] = {"median_s": median, "min_s": min(times[name]), "max_s": max(times[name]),
                      "generated_tokens": tokens[name], "tokens_per_s": tokens[name] / median}
    if rank == 0:
        result = {"world_size": world, "parameters": params, "vocab": VOCAB, "shape": SHAPE, "dtype": "float32",
                  "device": "cpu", "batch_per_process": args.batch, "prompt_length": args.prompt_length,
                  "max_new_tokens": args.new_tokens, "repeats": args.repeats,
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                  "torch": torch.__version__, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
                  "rows": rows, "sharded_over_replicated_time": rows["sharded"]["median_s"] / rows["replicated"]["median_s"]}
        if args.out:
            write_report(args.out, result)
        print(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def write_report(path: str, result: dict) -> None:
    lines = [f"# On-policy sampling speed, replicated vs train.fsdp student ({result['world_size']} processes, CPU)",
             "",
             f"torch {result['torch']}, float32, gloo, {result['date']}, {result['cpu_count']} CPU cores shared with "
             f"other jobs, OMP_NUM_THREADS={result['omp_num_threads']}; `torchrun --standalone --nproc_per_node "
             f"{result['world_size']} benchmarks/fsdp_generate_speed.py`. Student: {result['parameters']:,} parameters "
             f"({json.dumps(result['shape'])}, vocabulary {result['vocab']}, tied embeddings). Per process "
             f"{result['batch_per_process']} prompts of {result['prompt_length']} tokens, up to "
             f"{result['max_new_tokens']} new tokens at temperature 1; median of {result['repeats']} calls (slower "
             "rank), tokens of both processes.", "",
             "| student | median s per call (min-max) | generated tokens | tokens/s |", "|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['median_s']:.2f} ({row['min_s']:.2f}-{row['max_s']:.2f}) | "
                     f"{row['generated_tokens']} | {row['tokens_per_s']:.0f} |")
    lines += ["", f"Sharded / replicated time per call: {result['sharded_over_replicated_time']:.2f}x."]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
