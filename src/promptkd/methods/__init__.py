"""Distillation methods: one file each, sharing `promptkd.training.loop.Trainer`."""

from __future__ import annotations

from promptkd.errors import UserError


def get_method_class(name: str):
    from promptkd.methods.distillm import DistiLLM
    from promptkd.methods.gkd import GKD
    from promptkd.methods.kd import KD
    from promptkd.methods.minillm import MiniLLM
    from promptkd.methods.promptkd import PromptKD
    from promptkd.methods.seqkd import SeqKD
    from promptkd.methods.sft import SFT

    registry = {m.name: m for m in (PromptKD, GKD, KD, SeqKD, SFT, MiniLLM, DistiLLM)}
    if name not in registry:
        raise UserError(f"unknown method '{name}'; choose one of {', '.join(registry)}")
    return registry[name]
