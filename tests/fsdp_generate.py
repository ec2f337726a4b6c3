"""Greedy sampling from an FSDP2-sharded model whose ranks leave `generate` at different steps.

Run by tests/test_fsdp.py under torchrun with 2 processes (gloo, CPU). Each rank samples from its
own prompt with `promptkd.sampling.sample_responses`, the trainer's sampler. The EOS id is the first
greedy token after rank 0's prompt, chosen so that rank 1's greedy response does not contain it:
rank 0 is done after one token while rank 1 runs to the cap, and the sharded layers' all-gathers
stay matched only if generate keeps rank 0 stepping (transformers' synced_gpus, on for
FSDP-managed models). Each rank's samples must equal the unsharded model's. Writes
{"rank", "new_tokens", "equal"} as one JSON line per rank to the file argv[1] + ".<rank>".
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from promptkd.models.sharding import shard_model
from promptkd.sampling import SamplingConfig, sample_responses
from promptkd.testing import tiny_llama

MAX_NEW_TOKENS = 8


def greedy(model, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_llama(num_layers=2, seed=1)
    with torch.no_grad():  # the same choice on both ranks: each holds the whole model here
        for start in range(3, 250, 3):
            prompts = [[start, start + 1, start + 2], [start + 3, start + 4]]
            eos = greedy(model, prompts[0])[0]
            if eos not in greedy(model, prompts[1]):
                break
        else:
            raise RuntimeError("no prompt pair found")
    ids = torch.tensor([prompts[rank]])
    mask = torch.ones_like(ids)
    config = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    kwargs = {"eos_token_ids": [eos], "pad_token_id": 0, "config": config}
    reference = sample_responses(model, ids, mask, **kwargs)
    shard_model(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    sharded = sample_responses(model, ids, mask, **kwargs)
    result = {"rank": rank, "new_tokens": int(sharded.attention_mask[0, sharded.prompt_length:].sum()),
              "equal": torch.equal(sharded.input_ids, reference.input_ids)
              and torch.equal(sharded.attention_mask, reference.attention_mask)}
    with open(f"{sys.argv[1]}.{rank}", "w") as f:
        f.write(json.dumps(result) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
