"""Data: instruction records and conversations, prompt templates, tokenised examples, batch
collation and the global batch order over processes and micro-batches."""

from promptkd.data.batch import SequenceBatch, position_ids_from_mask, prompt_batch_from_ids
from promptkd.data.collate import collate_prompts, collate_sequences
from promptkd.data.dataset import Example, FilterStats, build_examples
from promptkd.data.order import global_batch, local_micro_batches
from promptkd.data.records import InstructionRecord, load_records, read_jsonl_records, records_from
from promptkd.data.templates import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    PromptTemplate,
    chat_turn_end,
    format_prompt,
)

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "Example",
    "FilterStats",
    "InstructionRecord",
    "PromptTemplate",
    "SequenceBatch",
    "build_examples",
    "chat_turn_end",
    "collate_prompts",
    "collate_sequences",
    "format_prompt",
    "global_batch",
    "load_records",
    "local_micro_batches",
    "position_ids_from_mask",
    "prompt_batch_from_ids",
    "read_jsonl_records",
    "records_from",
]
