"""Conversations in TRL's formats (messages, prompt [+ completion]) through records, templates,
examples and collation, with the chat templates of two model families built in-process."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from promptkd.data import (
    InstructionRecord,
    build_examples,
    chat_turn_end,
    collate_sequences,
    format_prompt,
    load_records,
    read_jsonl_records,
    records_from,
)
from promptkd.data.records import record_from_dict
from promptkd.errors import UserError
from promptkd.testing import CHAT_FAMILIES, byte_tokenizer, chat_tokenizer

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green."},
]
PROMPT_TURNS = CONVERSATION[:-1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def template_ids(tok, turns, **kw) -> list[int]:
    return list(tok.apply_chat_template(turns, return_dict=False, **kw))


def text_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- records


def test_messages_record_keeps_system_and_history_and_takes_the_last_assistant_turn():
    r = record_from_dict({"messages": CONVERSATION, "id": 7}, "x")
    assert r.messages == PROMPT_TURNS  # system turn and the earlier exchange kept, in order
    assert r.outputs == ["Green."]
    assert (r.instruction, r.input, r.metadata) == ("Another one?", "", {"id": 7})
    # TRL's conversational prompt-completion
    r2 = record_from_dict({"prompt": PROMPT_TURNS, "completion": CONVERSATION[-1:]}, "x")
    assert (r2.messages, r2.outputs, r2.instruction) == (r.messages, r.outputs, r.instruction)
    # the inputs are not modified
    assert CONVERSATION[-1] == {"role": "assistant", "content": "Green."}


def test_prompt_only_conversations_need_require_outputs_false(tmp_path):
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": [SYSTEM, {"role": "user", "content": "Hi."}]},  # TRL conversational prompt-only
            {"messages": [{"role": "user", "content": "Yo."}]},
            {"messages": CONVERSATION[:4]},  # ends with a user turn: all of it is prompt
        ],
    )
    records = read_jsonl_records(path, require_outputs=False)
    assert [r.outputs for r in records] == [[], [], []]
    assert [r.instruction for r in records] == ["Hi.", "Yo.", "Another one?"]
    assert records[2].messages == CONVERSATION[:4]
    assert load_records(str(path), require_outputs=False) == records

    with pytest.raises(UserError, match=r"prompts.jsonl line 1: field 'prompt' is a conversation without 'completion'.*require_outputs=False"):
        read_jsonl_records(path)
    rows = [{"messages": CONVERSATION[:4]}]
    with pytest.raises(UserError, match=r"p2.jsonl line 1: field 'messages' does not end with an assistant turn.*'system', 'user', 'assistant', 'user'"):
        read_jsonl_records(write_jsonl(tmp_path / "p2.jsonl", rows))
    # the other record helpers agree
    with pytest.raises(UserError, match="row index 0: field 'messages' does not end with an assistant turn"):
        records_from(rows)
    assert records_from(rows, require_outputs=False)[0].outputs == []


def test_a_prompt_conversation_may_take_its_reference_from_output_fields():
    """As `promptkd generate` would write a conversation: prompt turns + output (+ ended)."""
    r = record_from_dict({"messages": PROMPT_TURNS, "output": "Red.", "ended": False}, "x")
    assert (r.messages, r.outputs, r.metadata) == (PROMPT_TURNS, ["Red."], {"ended": False})
    with pytest.raises(UserError, match="x: two references: the final assistant turn of 'messages' and field 'output'"):
        record_from_dict({"messages": CONVERSATION, "output": "Red."}, "x")
    with pytest.raises(UserError, match="x: two references: field 'completion' and field 'outputs'"):
        record_from_dict({"prompt": PROMPT_TURNS, "completion": CONVERSATION[-1:], "outputs": ["a"]}, "x")


def test_string_prompt_is_still_the_instruction_and_messages_win_over_it():
    r = record_from_dict({"prompt": "Tell a joke.", "response": "no"}, "x")
    assert (r.instruction, r.outputs, r.messages) == ("Tell a joke.", ["no"], None)
    # ultrachat_200k's layout: prompt (the first user turn as a string), prompt_id, messages
    row = {"prompt": "Name a colour.", "prompt_id": "abc", "messages": CONVERSATION}
    r = record_from_dict(row, "x")
    assert r.messages == PROMPT_TURNS and r.outputs == ["Green."]
    assert r.metadata == {"prompt": "Name a colour.", "prompt_id": "abc"}


USER = {"role": "user", "content": "Hi."}
ASSISTANT = {"role": "assistant", "content": "Hello."}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": "Hi."}, "field 'messages' must be a list of .* turns, got str"),
        ({"messages": {"role": "user"}}, "field 'messages' must be a list"),
        ({"messages": []}, "field 'messages' is an empty list"),
        ({"messages": ["Hi.", ASSISTANT]}, "field 'messages' item 0 must be an object"),
        ({"messages": [{"role": "user"}, ASSISTANT]}, "field 'messages' item 0 has no 'content'"),
        ({"messages": [USER, {"content": "x"}]}, "field 'messages' item 1 has no 'role'"),
        ({"messages": [{"from": "human", "value": "Hi."}]}, "item 0 has no 'role' or 'content'.*ShareGPT"),
        ({"messages": [{"role": "", "content": "x"}, ASSISTANT]}, "item 0: 'role' must be a non-empty string"),
        ({"messages": [{"role": 1, "content": "x"}, ASSISTANT]}, "item 0: 'role' must be a non-empty string"),
        ({"messages": [USER, {"role": "assistant", "content": None}]}, r"item 1 \(assistant\): 'content' must be a string, got null"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}, ASSISTANT]}, "item 0 \\(user\\): 'content' must be a string, got list"),
        ({"messages": [SYSTEM, ASSISTANT]}, "field 'messages' has no user turn.*'system'"),
        ({"messages": [ASSISTANT]}, "field 'messages' has no user turn"),
        ({"messages": [{"role": "user", "content": "  "}, ASSISTANT]}, "field 'messages': the last user turn is empty"),
        ({"messages": [USER, ASSISTANT, ASSISTANT]}, "the prompt turns end with an assistant turn \\(item 1\\); the reference is the final"),
        ({"messages": [USER]}, "field 'messages' does not end with an assistant turn"),
        ({"prompt": [USER, ASSISTANT]}, "field 'prompt': the prompt turns end with an assistant turn.*'completion'"),
        ({"prompt": [USER]}, "field 'prompt' is a conversation without 'completion'"),
        ({"prompt": [USER], "completion": "Hello."}, "field 'completion' must be a list"),
        ({"prompt": [USER], "completion": [ASSISTANT, ASSISTANT]}, "field 'completion' must hold exactly one assistant turn.*'assistant', 'assistant'"),
        ({"prompt": [USER], "completion": [USER]}, "field 'completion' must hold exactly one assistant turn.*'user'"),
        ({"messages": [USER], "outputs": []}, "field 'outputs' is an empty list"),
    ],
)
def test_conversation_errors_name_file_line_and_field(tmp_path, row, message):
    good = {"messages": [USER, ASSISTANT]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, row])
    with pytest.raises(UserError, match="chat.jsonl line 2: " + ".*" + message) as err:
        read_jsonl_records(path)
    assert "line 2" in str(err.value)


def test_null_extra_keys_from_dataset_columns_are_dropped():
    """A datasets column of turns fills absent keys with null; the template must not see them."""
    import datasets

    rows = [
        {"messages": [{"role": "user", "content": "Hi.", "name": "ann"}, ASSISTANT]},
        {"messages": [USER, ASSISTANT]},
    ]
    ds = datasets.Dataset.from_list(rows)
    assert ds[1]["messages"][0] == {"role": "user", "content": "Hi.", "name": None}
    records = records_from(ds)
    assert records[0].messages == [{"role": "user", "content": "Hi.", "name": "ann"}]
    assert records[1].messages == [USER]


# --------------------------------------------------------------------------- records_from


def test_records_from_a_dataset_a_list_a_dataset_dict_and_a_path(tmp_path):
    import datasets

    rows = [
        {"messages": CONVERSATION, "category": "qa"},
        {"messages": [USER, ASSISTANT], "category": "chat"},
    ]
    expected = [record_from_dict(r, "x") for r in rows]
    ds = datasets.Dataset.from_list(rows)
    assert records_from(ds) == expected
    assert records_from(rows) == expected
    assert records_from(tuple(rows)) == expected
    assert records_from(iter(rows)) == expected
    assert records_from(datasets.DatasetDict({"train": ds, "test": ds.select([0])}), split="test") == expected[:1]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert records_from(path) == expected and records_from(str(path)) == expected
    ds.save_to_disk(str(tmp_path / "saved"))
    assert records_from(str(tmp_path / "saved")) == expected
    assert load_records(str(tmp_path / "saved")) == expected
    # instruction records and InstructionRecords pass through the same function
    assert records_from([{"instruction": "Hi.", "output": "yo"}]) == [InstructionRecord("Hi.", "", ["yo"])]
    assert records_from(expected) == expected
    # a prompt-only dataset: the columns are checked per row, require_outputs decides
    prompt_only = datasets.Dataset.from_list([{"prompt": [USER]}])
    assert records_from(prompt_only, require_outputs=False)[0].messages == [USER]
    with pytest.raises(UserError, match="dataset: cannot map columns.*no a reference column.*completion.*\\['prompt'\\]"):
        records_from(prompt_only)


def test_records_from_errors():
    import datasets

    with pytest.raises(UserError, match="got one dict.*'messages'.*pass a list"):
        records_from({"messages": CONVERSATION})
    with pytest.raises(UserError, match="cannot read records from a int"):
        records_from(3)
    with pytest.raises(UserError, match="has no split 'validation'; splits found: \\['train'\\]"):
        records_from(datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": CONVERSATION}])}), split="validation")
    with pytest.raises(UserError, match="my_set row index 1: field 'messages' item 0 has no 'content'"):
        records_from([{"messages": CONVERSATION}, {"messages": [{"role": "user"}]}], name="my_set")
    with pytest.raises(UserError, match="data row index 0: the record has no reference"):
        records_from([InstructionRecord("Hi.")])
    with pytest.raises(UserError, match="instruction column .* or a 'messages' conversation.*columns found: \\['question'\\]"):
        records_from(datasets.Dataset.from_list([{"question": "q"}]), require_outputs=False)


# --------------------------------------------------------------------------- templates and examples


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_chat_prompt_ids_are_the_template_with_generation_prompt(family):
    tok = chat_tokenizer(family)
    records = records_from([{"messages": CONVERSATION}, {"prompt": [USER], "completion": [ASSISTANT]}])
    examples, stats = build_examples(records, tok, template="chat", max_prompt_length=512, max_length=1024)
    assert stats.num_kept == 2
    for ex, turns, reference in zip(examples, (PROMPT_TURNS, [USER]), ("Green.", "Hello."), strict=True):
        assert ex.prompt_ids == template_ids(tok, turns, add_generation_prompt=True)
        assert ex.response_ids == text_ids(tok, reference) + [tok.eos_token_id]
        assert ex.references == [reference]
        # the reference + EOS is exactly what the template writes for the final assistant turn
        # (the instruct tokenizers' EOS is the template's end-of-turn token)
        full = template_ids(tok, turns + [{"role": "assistant", "content": reference}])
        assert full[: len(ex.prompt_ids) + len(ex.response_ids)] == ex.prompt_ids + ex.response_ids
    text = tok.decode(examples[0].prompt_ids)
    assert "You are terse." in text and "Blue." in text  # system turn and history kept
    expected_end = {"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
    assert text.endswith(expected_end[family])
    if family == "llama3":  # the template writes the BOS, the tokenizer adds none: one BOS
        assert tok("a")["input_ids"][0] == tok.bos_token_id  # the tokenizer alone would add one
        assert examples[0].prompt_ids[0] == tok.bos_token_id
        assert examples[0].prompt_ids.count(tok.bos_token_id) == 1
    else:
        assert tok.bos_token_id is None


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_instruction_records_with_the_chat_template_are_one_user_turn(family):
    tok = chat_tokenizer(family)
    r = InstructionRecord("Add.", "2 and 3", ["5"])
    (ex,), _ = build_examples([r], tok, template="chat")
    assert ex.prompt_ids == template_ids(tok, [{"role": "user", "content": "Add.\n\n2 and 3"}], add_generation_prompt=True)
    assert format_prompt(r, "chat", tok) == format_prompt(
        InstructionRecord("x", messages=[{"role": "user", "content": "Add.\n\n2 and 3"}]), "chat", tok
    )


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_conversations_need_the_chat_template(template):
    tok = chat_tokenizer("chatml")
    records = records_from([{"instruction": "Hi.", "output": "yo"}, {"messages": [USER, ASSISTANT]}])
    with pytest.raises(UserError, match=f"my.jsonl: record 2 is a conversation.*data.template='{template}'.*data.template: chat"):
        build_examples(records, tok, template=template, source="my.jsonl")
    with pytest.raises(UserError, match=f"last user turn 'Hi.'.*data.template='{template}'.*data.template: chat"):
        format_prompt(records[1], template, tok)
    tok.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        build_examples(records, tok, template="chat")


def test_prompt_only_conversations_build_prompt_examples():
    tok = chat_tokenizer("llama3")
    records = records_from([{"prompt": [SYSTEM, USER]}, {"messages": [USER]}], require_outputs=False)
    examples, _ = build_examples(records, tok, template="chat", with_responses=False)
    assert [ex.response_ids for ex in examples] == [None, None]
    assert examples[0].prompt_ids == template_ids(tok, [SYSTEM, USER], add_generation_prompt=True)
    with pytest.raises(UserError, match="record 1 has no reference output.*final assistant turn"):
        build_examples(records, tok, template="chat")


def test_ended_false_conversation_gets_no_eos():
    tok = chat_tokenizer("chatml")
    records = records_from([{"messages": [USER], "output": "Hel", "ended": False}, {"messages": [USER, ASSISTANT]}])
    examples, _ = build_examples(records, tok, template="chat")
    assert examples[0].response_ids == text_ids(tok, "Hel")
    assert examples[1].response_ids == text_ids(tok, "Hello.") + [tok.eos_token_id]


def test_keep_last_truncation_keeps_the_templates_bos():
    tok = chat_tokenizer("llama3")
    (ex,), _ = build_examples(
        records_from([{"messages": [{"role": "user", "content": "x" * 50}]}], require_outputs=False),
        tok, template="chat", max_prompt_length=8, drop_long_prompts=False, with_responses=False,
        prompt_truncation="keep_last",
    )
    full = template_ids(tok, [{"role": "user", "content": "x" * 50}], add_generation_prompt=True)
    assert ex.prompt_ids == [tok.bos_token_id] + full[-7:]


def test_turn_end_token_and_the_eos_warning():
    assert chat_turn_end(chat_tokenizer("chatml")) == "<|im_end|>"
    assert chat_turn_end(chat_tokenizer("llama3")) == "<|eot_id|>"
    assert chat_turn_end(byte_tokenizer()) == "</s>"
    plain = byte_tokenizer()
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert chat_turn_end(plain) is None  # no special token after the turn
    plain.chat_template = None
    assert chat_turn_end(plain) is None
    records = records_from([{"messages": [USER, ASSISTANT]}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # EOS == end-of-turn: silent
        for family in CHAT_FAMILIES:
            build_examples(records, chat_tokenizer(family), template="chat")
    base = chat_tokenizer("chatml", eos_token="<|endoftext|>")  # a base model's tokenizer
    with pytest.warns(UserWarning, match="ends an assistant turn with '<\\|im_end\\|>' but tokenizer.eos_token is '<\\|endoftext\\|>'.*SFTConfig.eos_token"):
        (ex,), _ = build_examples(records, base, template="chat")
    assert ex.response_ids[-1] == base.eos_token_id  # still the tokenizer's EOS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prompts only: no response, no warning
        build_examples(records, base, template="chat", with_responses=False)


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_chat_batch_loss_mask_is_exactly_the_reference_and_eos(family, tmp_path):
    tok = chat_tokenizer(family)
    rows = [
        {"messages": CONVERSATION},
        {"prompt": [USER], "completion": [{"role": "assistant", "content": "A longer answer here."}]},
        {"messages": [SYSTEM, {"role": "user", "content": "Count to three, please."}, {"role": "assistant", "content": "1 2 3"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    examples, _ = build_examples(records_from(path), tok, template="chat", max_prompt_length=512, max_length=1024)
    batch = collate_sequences(examples, tok.pad_token_id)
    references = ["Green.", "A longer answer here.", "1 2 3"]
    for b, (ex, reference) in enumerate(zip(examples, references, strict=True)):
        row_mask = batch.loss_mask[b]
        target = text_ids(tok, reference) + [tok.eos_token_id]
        assert batch.input_ids[b][row_mask].tolist() == target
        assert tok.decode(batch.input_ids[b][row_mask][:-1]) == reference
        # the masked tokens are contiguous, start right after the prompt, and the prompt is
        # the chat template's rendering, left-padded
        assert row_mask.nonzero().flatten().tolist() == list(range(batch.prompt_length, batch.prompt_length + len(target)))
        prompt = batch.input_ids[b][: batch.prompt_length][batch.attention_mask[b][: batch.prompt_length].bool()]
        assert prompt.tolist() == ex.prompt_ids
    assert batch.num_loss_tokens == sum(len(text_ids(tok, r)) + 1 for r in references)
    assert not batch.loss_mask[:, : batch.prompt_length].any()
    assert torch.equal(batch.loss_mask & ~batch.attention_mask.bool(), torch.zeros_like(batch.loss_mask))
