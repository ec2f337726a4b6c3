"""Data: instruction records and conversations, prompt templates, tokenised examples, batch
collation and the global batch order over processes and micro-batches.

The names below load their module on first use, so a torch-free module of this package (the
evaluation sets, the templates) imports without torch (compare's `build_report` needs none).
"""

import importlib

_EXPORTS = {
    "SequenceBatch": "batch", "position_ids_from_mask": "batch", "prompt_batch_from_ids": "batch",
    "collate_prompts": "collate", "collate_sequences": "collate",
    "Example": "dataset", "FilterStats": "dataset", "build_examples": "dataset",
    "global_batch": "order", "local_micro_batches": "order",
    "InstructionRecord": "records", "load_records": "records", "read_jsonl_records": "records",
    "records_from": "records",
    "ALPACA_PROMPT_NO_INPUT": "templates", "ALPACA_PROMPT_WITH_INPUT": "templates", "PromptTemplate": "templates",
    "chat_turn_end": "templates", "format_prompt": "templates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'promptkd.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"promptkd.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
