"""Distillation methods: one file each, sharing `promptkd.training.loop.Trainer`.

`register_method(name, cls)` adds a method from your own code: a subclass of
`promptkd.methods.base.Method` whose `step(ctx, micro_batches)` uses the step context
(docs/python_api.md). `method: NAME` in a config then trains with it.
"""

from __future__ import annotations

from promptkd.errors import UserError

_REGISTERED: dict[str, type] = {}


def _built_in() -> dict[str, type]:
    from promptkd.methods.distillm import DistiLLM
    from promptkd.methods.gkd import GKD
    from promptkd.methods.kd import KD
    from promptkd.methods.minillm import MiniLLM
    from promptkd.methods.promptkd import PromptKD
    from promptkd.methods.seqkd import SeqKD
    from promptkd.methods.sft import SFT

    return {m.name: m for m in (PromptKD, GKD, KD, SeqKD, SFT, MiniLLM, DistiLLM)}


def register_method(name: str, cls: type) -> None:
    """Make `cls` (a subclass of promptkd.methods.base.Method) the method `name`.

    Raises:
        UserError: `cls` is not a Method subclass, or `name` is a built-in method's.
    """
    from promptkd.methods.base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise UserError(f"register_method({name!r}, ...): expected a subclass of promptkd.methods.base.Method, got {cls!r}")
    if name in _built_in():
        raise UserError(f"register_method: {name!r} is a built-in method; choose another name")
    cls.name = name
    _REGISTERED[name] = cls


def get_method_class(name: str) -> type:
    registry = {**_built_in(), **_REGISTERED}
    if name not in registry:
        raise UserError(f"unknown method '{name}'; choose one of {', '.join(registry)}")
    return registry[name]
