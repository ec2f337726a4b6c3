"""Tokenised examples: records -> (prompt ids, response ids), with length filtering.

Conventions (MiniLLM / PromptKD data processing, docs/method.md section 8):
- prompt ids = tokenizer(format_prompt(record)) with the tokenizer's default special tokens
  (a BOS when the tokenizer adds one). Chat-template prompts already contain their special
  tokens and are tokenized with add_special_tokens=False so BOS is not doubled.
- Special-token strings inside the data text (instruction, input, reference) are split into
  ordinary tokens, so a record that happens to contain "</s>" cannot plant an early EOS.
- Conversations (records with `messages`, TRL's chat formats) need template "chat": the prompt
  turns are rendered with the tokenizer's chat template and its generation prompt, so prompt
  ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True).
- response ids = tokenizer(outputs[0], add_special_tokens=False) + [eos_token_id], except for
  a record whose `ended` field is false (`promptkd generate` writes it: that response was cut
  at max_new_tokens, so the student must not learn to stop there): no EOS. A record without
  `ended` gets the EOS.
- With the chat template too, the response ends with tokenizer.eos_token_id, not with the
  template's own end-of-turn text (TRL's SFT/GKD collators take the completion as the rendered
  full conversation minus the rendered prompt: content + "<|im_end|>\n" for ChatML). The EOS
  keeps training and generation consistent: sampling stops at eos_token_ids(tokenizer, model),
  which always holds tokenizer.eos_token_id, and chat models' tokenizers (Qwen2.5 / Qwen3 /
  SmolLM2-Instruct: <|im_end|>; Llama-3.1+-Instruct: <|eot_id|>) set eos_token to the
  end-of-turn token. When the template ends a turn with another token (e.g. a base model's
  tokenizer with a chat template added) `build_examples` warns: set tokenizer.eos_token to
  the template's end-of-turn token (TRL's SFTConfig.eos_token does the same).
- Training (drop_long_prompts=True): prompts longer than max_prompt_length are dropped and
  counted, never truncated. Evaluation (drop_long_prompts=False): long prompts keep their
  FIRST max_prompt_length tokens (prompt_truncation="keep_first", as MiniLLM / PromptKD's
  evaluation does, `prompt_ids[:max_prompt_length]`; a leading BOS stays), or with
  "keep_last" their LAST ones (the "### Response:" cue stays next to the generation) plus the
  leading BOS when the tokenizer (or the chat template) put one there.
- Responses are cut so that prompt + response <= max_length; a cut response loses its EOS
  (it did not end there), as in MiniLLM.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from promptkd.data.records import InstructionRecord
from promptkd.data.templates import PromptTemplate, chat_turn_end, format_prompt, parse_template
from promptkd.errors import UserError

# How an over-long evaluation prompt is cut: keep its first tokens (the reference evaluation)
# or its last ones.
PROMPT_TRUNCATIONS = ("keep_first", "keep_last")


@dataclass
class Example:
    """One tokenised example.

    prompt_ids:   templated prompt ids (<= max_prompt_length).
    response_ids: reference response ids ending in EOS unless cut at max_length or the record
                  says `ended: false`; None for prompt-only examples (generation / evaluation).
    references:   every reference text (for ROUGE-L).
    """

    prompt_ids: list[int]
    response_ids: list[int] | None
    references: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class FilterStats:
    """What `build_examples` dropped or cut."""

    num_records: int
    num_kept: int
    num_dropped_long_prompt: int
    num_truncated_response: int
    num_truncated_prompt: int = 0
    prompt_truncation: str = "keep_first"

    @property
    def lossless(self) -> bool:
        """True when every record was kept whole (nothing dropped or truncated)."""
        return not (self.num_dropped_long_prompt or self.num_truncated_response or self.num_truncated_prompt)

    @property
    def log_level(self) -> int:
        """The level to log summary() at: a warning only when records were dropped or cut."""
        return logging.INFO if self.lossless else logging.WARNING

    def summary(self) -> str:
        text = (
            f"{self.num_kept}/{self.num_records} examples kept; "
            f"{self.num_dropped_long_prompt} dropped (prompt too long), "
            f"{self.num_truncated_response} responses truncated"
        )
        if self.num_truncated_prompt:
            text += f", {self.num_truncated_prompt} prompts truncated ({self.prompt_truncation})"
        return text


def build_examples(
    records: Sequence[InstructionRecord],
    tokenizer,
    *,
    template: str | PromptTemplate = "alpaca",
    max_prompt_length: int = 256,
    max_length: int = 512,
    max_response_length: int | None = None,
    drop_long_prompts: bool = True,
    with_responses: bool = True,
    source: str | None = None,
    prompt_truncation: str = "keep_first",
) -> tuple[list[Example], FilterStats]:
    """Tokenise records into examples and report what was filtered.

    Args:
        records: instruction records; with_responses=True needs outputs on every record.
        tokenizer: a Hugging Face tokenizer (needs eos_token_id when with_responses).
        max_prompt_length: prompt token limit (data.max_prompt_length).
        max_length: prompt + response token limit (data.max_length).
        max_response_length: response token limit (data.max_response_length); None = no own limit.
        drop_long_prompts: drop (True, training) or truncate (False, evaluation) long prompts.
        with_responses: tokenize outputs[0] as the response (+ EOS unless the record's
            `ended` is false); False gives response_ids=None.
        source: the data's name or path, used in error messages.
        prompt_truncation: with drop_long_prompts=False, a long prompt keeps its first
            ("keep_first", the reference evaluation) or last ("keep_last") tokens.

    Returns (examples, FilterStats). Raises UserError for invalid limits or prompt_truncation,
    a conversation record with a template other than "chat", a record without a reference
    when responses are needed, a non-boolean `ended`, or when no example is left after
    filtering. Warns when the chat template ends assistant turns with a token other than EOS.
    """
    kind = parse_template(template)
    where = source or "the data"
    if max_prompt_length < 1:
        raise UserError(f"data.max_prompt_length must be >= 1, got {max_prompt_length}")
    if prompt_truncation not in PROMPT_TRUNCATIONS:
        raise UserError(f"prompt_truncation = {prompt_truncation!r}: choose one of {PROMPT_TRUNCATIONS}")
    if with_responses and max_length <= max_prompt_length:
        raise UserError(
            f"data.max_length ({max_length}) must be larger than data.max_prompt_length "
            f"({max_prompt_length}) to leave room for the response"
        )
    eos_id = tokenizer.eos_token_id
    if with_responses and eos_id is None:
        raise UserError(
            "the tokenizer has no eos_token; set one (tokenizer.eos_token) before training"
        )
    if not records:
        raise UserError(f"{where} contains no records")

    if kind is not PromptTemplate.CHAT:
        chat = next((i for i, r in enumerate(records) if r.messages is not None), None)
        if chat is not None:
            raise UserError(
                f"{where}: record {chat + 1} is a conversation (messages / a prompt of turns), "
                f"which data.template={kind.value!r} cannot render; set data.template: chat (the "
                "tokenizer's chat template)"
            )
    prompts = [format_prompt(r, kind, tokenizer) for r in records]
    if kind is PromptTemplate.CHAT:
        # The rendered chat template already holds its special tokens (as text), a BOS too
        # when the template writes one (Llama 3): the tokenizer adds none, so none is doubled.
        prompt_ids_all = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        adds_bos = tokenizer.bos_token_id is not None  # kept by keep_last when it leads
        turn_end = chat_turn_end(tokenizer) if with_responses else None
        if turn_end is not None and tokenizer.convert_tokens_to_ids(turn_end) != eos_id:
            warnings.warn(
                f"the chat template ends an assistant turn with {turn_end!r} but "
                f"tokenizer.eos_token is {tokenizer.eos_token!r}: reference responses are trained "
                f"to end with {tokenizer.eos_token!r}, not with {turn_end!r}. To keep the chat "
                f"format, set tokenizer.eos_token = {turn_end!r} (as TRL's SFTConfig.eos_token "
                "does)",
                UserWarning,
                stacklevel=2,
            )
    else:
        # Tokenizer-default special tokens (BOS when it adds one); data text never turns
        # into special tokens.
        prompt_ids_all = tokenizer(prompts, split_special_tokens=True)["input_ids"]
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [
            tokenizer.bos_token_id
        ]
    bos_id = tokenizer.bos_token_id

    responses_all: list[list[int]] | None = None
    if with_responses:
        missing = [i for i, r in enumerate(records) if not r.outputs]
        if missing:
            raise UserError(
                f"{where}: record {missing[0] + 1} has no reference output ('output' / 'outputs', "
                "or a conversation's final assistant turn); training needs one for every record"
            )
        for i, r in enumerate(records):
            ended = r.metadata.get("ended")
            if ended is not None and not isinstance(ended, bool):
                raise UserError(
                    f"{where}: record {i + 1}: field 'ended' must be true or false (did the response "
                    f"end with EOS?), got {ended!r}"
                )
        responses_all = tokenizer(
            [r.outputs[0] for r in records], add_special_tokens=False, split_special_tokens=True
        )["input_ids"]

    examples: list[Example] = []
    num_dropped = num_cut_response = num_cut_prompt = 0
    for i, (record, prompt_ids) in enumerate(zip(records, prompt_ids_all, strict=True)):
        prompt_ids = list(prompt_ids)
        if len(prompt_ids) > max_prompt_length:
            if drop_long_prompts:
                num_dropped += 1
                continue
            num_cut_prompt += 1
            if prompt_truncation == "keep_first":  # a leading BOS stays first
                prompt_ids = prompt_ids[:max_prompt_length]
            elif adds_bos and prompt_ids[0] == bos_id and max_prompt_length > 1:
                prompt_ids = [bos_id] + prompt_ids[-(max_prompt_length - 1) :]
            else:
                prompt_ids = prompt_ids[-max_prompt_length:]
        response_ids = None
        if responses_all is not None:
            # A response cut at generation (ended: false) did not end: no EOS to learn.
            eos = [] if record.metadata.get("ended") is False else [eos_id]
            response_ids = list(responses_all[i]) + eos
            budget = max_length - len(prompt_ids)
            if max_response_length is not None:
                budget = min(budget, max_response_length)
            if len(response_ids) > budget:
                response_ids = response_ids[:budget]
                num_cut_response += 1
        examples.append(
            Example(
                prompt_ids=prompt_ids,
                response_ids=response_ids,
                references=list(record.outputs),
                metadata=dict(record.metadata),
            )
        )

    stats = FilterStats(
        num_records=len(records),
        num_kept=len(examples),
        num_dropped_long_prompt=num_dropped,
        num_truncated_response=num_cut_response,
        num_truncated_prompt=num_cut_prompt,
        prompt_truncation=prompt_truncation,
    )
    if not examples:
        raise UserError(
            f"no examples left from {where}: all {len(records)} records have prompts longer than "
            f"data.max_prompt_length={max_prompt_length} tokens; raise data.max_prompt_length "
            "(or check data.template and the tokenizer)"
        )
    return examples, stats
