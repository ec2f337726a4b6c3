"""Prompt templates: Alpaca (MiniLLM's exact strings), a tokenizer's chat template, plain text.

The Alpaca strings are the ones MiniLLM / PromptKD train and evaluate with; the response is
appended directly after the final newline and followed by EOS (see data/dataset.py).
"""

from __future__ import annotations

from enum import Enum

from promptkd.data.records import InstructionRecord
from promptkd.errors import UserError

ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class PromptTemplate(str, Enum):
    """How a record becomes prompt text (a str-Enum, so YAML strings work as values)."""

    ALPACA = "alpaca"
    CHAT = "chat"
    PLAIN = "plain"


TEMPLATE_NAMES = tuple(t.value for t in PromptTemplate)


def parse_template(template: str | PromptTemplate) -> PromptTemplate:
    """Validate a template name; raises UserError listing the valid names."""
    try:
        return PromptTemplate(template)
    except ValueError:
        raise UserError(
            f"unknown prompt template {template!r} (data.template); choose one of {list(TEMPLATE_NAMES)}"
        ) from None


def user_message(record: InstructionRecord) -> str:
    """Instruction, then the input after a blank line when there is one."""
    return record.instruction + ("\n\n" + record.input if record.input else "")


def format_prompt(
    record: InstructionRecord, template: str | PromptTemplate = "alpaca", tokenizer=None
) -> str:
    """Render a record's prompt text (everything before the response).

    alpaca: `ALPACA_PROMPT_WITH_INPUT` when `record.input` is non-empty, else
            `ALPACA_PROMPT_NO_INPUT` (MiniLLM's rule: an empty string means no input).
    chat:   `tokenizer.apply_chat_template` on one user message (instruction, blank line,
            input), with the generation prompt. The text already contains the template's
            special tokens, so tokenize it with add_special_tokens=False.
    plain:  instruction, blank line + input when present, then a newline.

    Raises UserError for an unknown template, or "chat" without a tokenizer chat template.
    """
    kind = parse_template(template)
    if kind is PromptTemplate.ALPACA:
        if record.input:
            return ALPACA_PROMPT_WITH_INPUT.format(
                instruction=record.instruction, input=record.input
            )
        return ALPACA_PROMPT_NO_INPUT.format(instruction=record.instruction)
    if kind is PromptTemplate.PLAIN:
        return user_message(record) + "\n"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise UserError(
            f"data.template='chat' needs a tokenizer with a chat template, but {name!r} has none; "
            "use data.template='alpaca' (or 'plain') for base models"
        )
    messages = [{"role": "user", "content": user_message(record)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
