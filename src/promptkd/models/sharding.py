"""FSDP2 sharding of a transformers causal LM over the processes (`train.fsdp`).

    mesh = init_device_mesh(device.type, (num_processes,))
    shard_model(teacher, mesh)   # the frozen teacher
    shard_model(student, mesh)   # then the student's optimizer over its (sharded) parameters

`shard_model` applies PyTorch's `torch.distributed.fsdp.fully_shard` to every decoder layer (the
classes a transformers model names in `_no_split_modules`: the rule accelerate's FSDP auto-wrap
policy follows) and then to the model itself, whose unit holds the rest: input embeddings, final
norm and LM head. Each parameter becomes a DTensor holding 1/N of its rows on each process.

How the units behave (FSDP2's defaults):
- a decoder layer gathers its weights at the start of its forward (and of its backward) and frees
  them at its end, so one layer at a time is whole;
- the root unit is gathered by the model's forward and stays gathered until the next backward
  through the model has reduced its gradients. Between a forward and its loss the module's
  `get_output_embeddings().weight` is therefore the whole head weight (a plain Parameter), which
  the chunked losses use (`promptkd.models.head.lm_head_of`);
- gradients are averaged over processes and reduce-scattered in the backward pass, like DDP's.
"""

from __future__ import annotations

import torch

from promptkd.errors import UserError


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's modules whose class is named in `_no_split_modules` (its decoder layers).

    Raises:
        UserError: a model that names none, or none of whose modules match.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(
            f"{type(model).__name__} names no decoder layer class in _no_split_modules ({sorted(names)}): "
            "train.fsdp shards a model one decoder layer at a time and cannot tell where its layers are"
        )
    return layers


def shard_model(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """Shard `model` in place with FSDP2 over `mesh` (a 1-D DeviceMesh): one unit per decoder
    layer, then the root. Returns the model (its class becomes FSDP<name>)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module | None) -> bool:
    """Whether `model` is an FSDP2 root (`shard_model` applied)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather_root(model: torch.nn.Module) -> None:
    """Gather the root unit (embeddings, final norm, LM head) of a sharded model; a no-op if it is
    gathered already or the model is not sharded. The root stays gathered until the next backward
    through the model (or `reshard`)."""
    if is_sharded(model):
        model.unshard()


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered unit of a sharded model: its parameters are its shards again (what its
    optimizer holds, and what torch.distributed.checkpoint's state dicts expect)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model: torch.nn.Module) -> dict:
    """The sharded model's whole state dict, on the CPU of the main process ({} elsewhere); every
    process must call it (a collective: torch.distributed.checkpoint.state_dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (e.g. the LM head and the input embeddings) is gathered once per name: one tensor
    # again, so save_pretrained sees the tie and stores it once
    first_name = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        source = first_name.setdefault(param, name)
        if source != name and name in state and source in state:
            state[name] = state[source]
    return state
