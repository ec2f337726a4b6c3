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
    chat:   `tokenizer.apply_chat_template` with the generation prompt, on the record's
            prompt turns (`record.messages`, a conversation) or else on one user message
            (instruction, blank line, input). The text already contains the template's
            special tokens (a BOS too when the template writes one), so tokenize it with
            add_special_tokens=False.
    plain:  instruction, blank line + input when present, then a newline.

    Raises UserError for an unknown template, "chat" without a tokenizer chat template, or a
    conversation with a template other than "chat".
    """
    kind = parse_template(template)
    if record.messages is not None and kind is not PromptTemplate.CHAT:
        raise UserError(
            f"a conversation record (messages; last user turn {record.instruction[:40]!r}) needs "
            f"the tokenizer's chat template, not data.template={kind.value!r}; set "
            "data.template: chat"
        )
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
    messages = record.messages
    if messages is None:
        messages = [{"role": "user", "content": user_message(record)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


_TURN_END_PROBE = "promptkd-turn-end-probe"


def chat_turn_end(tokenizer) -> str | None:
    """The special token a tokenizer's chat template writes right after an assistant turn's
    content (e.g. "<|im_end|>" for ChatML, "<|eot_id|>" for Llama 3), or None when the template
    writes none (or cannot render a plain user / assistant exchange).

    Reference responses end with tokenizer.eos_token (data/dataset.py); this is what
    `build_examples` compares it with.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    exchange = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": _TURN_END_PROBE},
    ]
    try:
        text = tokenizer.apply_chat_template(exchange, tokenize=False)
    except Exception:  # a template with its own rules (roles, system turn): nothing to compare
        return None
    at = text.rfind(_TURN_END_PROBE)
    if at < 0:
        return None
    after = text[at + len(_TURN_END_PROBE) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    token = tokenizer.convert_ids_to_tokens(ids[0])
    special = ids[0] in tokenizer.all_special_ids or token in tokenizer.get_added_vocab()
    return token if special else None
