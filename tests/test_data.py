"""Records, templates, tokenised examples and collation (promptkd.data, evaluation.datasets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from promptkd.data import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    Example,
    InstructionRecord,
    build_examples,
    collate_prompts,
    collate_sequences,
    format_prompt,
    global_batch,
    load_records,
    local_micro_batches,
    read_jsonl_records,
)
from promptkd.errors import UserError
from promptkd.evaluation import datasets as eval_datasets
from promptkd.evaluation.datasets import EVAL_SETS, load_eval_set
from promptkd.testing import byte_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rec(**kw) -> str:
    return json.dumps(kw)


GOOD = rec(instruction="Say hi.", input="", output="hi")


# --------------------------------------------------------------------------- records


def test_read_jsonl_schema_and_metadata(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            rec(instruction="A", input="ctx", output="x", category="qa", id=3),
            "",
            "   ",
            rec(instruction="B", outputs=["y", "z"]),
            rec(instruction="C", input=None, output="w"),
        ],
    )
    records = read_jsonl_records(path)
    assert records == [
        InstructionRecord("A", "ctx", ["x"], {"category": "qa", "id": 3}),
        InstructionRecord("B", "", ["y", "z"], {}),
        InstructionRecord("C", "", ["w"], {}),
    ]
    assert load_records(str(path)) == records


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"instruction": "x", "output": ', "malformed JSON"),
        ("[1, 2]", "JSON object"),
        ('"just a string"', "JSON object"),
        (rec(input="", output="x"), "instruction"),
        (rec(instruction="x", input=""), "output"),
        (rec(instruction=3, output="x"), "instruction"),
        (rec(instruction="", output="x"), "instruction"),
        (rec(instruction="  \n", output="x"), "instruction"),
        (rec(instruction="x", input=5, output="y"), "input"),
        (rec(instruction="x", output=7), "output"),
        (rec(instruction="x", outputs="y"), "outputs"),
        (rec(instruction="x", outputs=[1]), "outputs"),
        (rec(instruction="x", outputs=["a", None]), "outputs"),
        (rec(instruction="x", outputs=[]), "outputs"),
        (rec(instruction="x", outputs={"a": 1}), "outputs"),
    ],
)
def test_read_jsonl_user_errors_name_file_line_field(tmp_path, line, field):
    path = write_lines(tmp_path / "bad_records.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(UserError) as err:
        read_jsonl_records(path)
    msg = str(err.value)
    assert "bad_records.jsonl" in msg
    assert "line 3" in msg  # 1-based, counting the blank line
    assert field in msg


def test_missing_outputs_allowed_for_prompt_only_files(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", [rec(instruction="x"), GOOD])
    records = read_jsonl_records(path, require_outputs=False)
    assert [r.outputs for r in records] == [[], ["hi"]]
    # a null reference is a missing one
    nulls = write_lines(tmp_path / "nulls.jsonl", [rec(instruction="x", output=None)])
    assert read_jsonl_records(nulls, require_outputs=False) == [InstructionRecord("x", "", [], {})]
    with pytest.raises(UserError, match="nulls.jsonl line 1: missing field 'output'"):
        read_jsonl_records(nulls)
    # present outputs are still validated
    bad = write_lines(tmp_path / "bad.jsonl", [rec(instruction="x", outputs=[])])
    with pytest.raises(UserError, match="bad.jsonl line 1.*outputs"):
        read_jsonl_records(bad, require_outputs=False)


def test_non_utf8_names_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    line2 = b'{"instruction": "caf\xe9' + b'", "output": "x"}'
    path.write_bytes(GOOD.encode() + b"\n" + line2 + b"\n")
    with pytest.raises(UserError) as err:
        read_jsonl_records(path)
    msg = str(err.value)
    assert "latin1.jsonl" in msg and "line 2" in msg and "UTF-8" in msg
    # offset 20 in the line, 20 + len(GOOD) + 1 in the file
    assert "byte 20 of the line" in msg
    assert f"byte offset {len(GOOD) + 1 + 20}" in msg


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(UserError, match="nope/train.jsonl"):
        read_jsonl_records(missing)
    with pytest.raises(UserError, match="nope/train.jsonl"):
        load_records(str(missing))
    with pytest.raises(UserError, match="not found"):
        load_records(str(tmp_path / "nope" / "dir"))


def test_utf8_bom_and_json_array(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert read_jsonl_records(bom)[0].instruction == "Say hi."
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([json.loads(GOOD), {"instruction": "x"}]), encoding="utf-8")
    with pytest.raises(UserError, match="arr.json record 2.*output"):
        load_records(str(arr))


def test_minillm_templated_prompt_maps_back():
    from promptkd.data.records import record_from_dict

    templated = ALPACA_PROMPT_WITH_INPUT.format(instruction="Sum.", input="1 2").replace(
        "\n", "<n>"
    )
    r = record_from_dict({"prompt": templated, "output": ["3", "three"]}, "x")
    assert (r.instruction, r.input, r.outputs) == ("Sum.", "1 2", ["3", "three"])
    assert format_prompt(r) == templated.replace("<n>", "\n")
    # Dolly's valid.jsonl has both: instruction wins, the templated prompt is metadata
    r = record_from_dict({"instruction": "Hi", "prompt": "P", "input": "", "output": "o"}, "x")
    assert (r.instruction, r.metadata) == ("Hi", {"prompt": "P"})
    # a prompt that is not Alpaca-templated is the instruction as it stands
    r = record_from_dict({"prompt": "Tell a joke.", "response": "no"}, "x")
    assert (r.instruction, r.input, r.outputs) == ("Tell a joke.", "", ["no"])


def test_load_records_from_saved_hf_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "instruction": ["a", "b"],
            "context": ["", "c"],
            "response": ["x", "y"],
            "category": ["q", "r"],
        }
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    records = load_records(str(tmp_path / "saved"))
    assert records == [
        InstructionRecord("a", "", ["x"], {"category": "q"}),
        InstructionRecord("b", "c", ["y"], {"category": "r"}),
    ]
    bad = datasets.Dataset.from_dict({"question": ["a"], "answer": ["x"]})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(UserError) as err:
        load_records(str(tmp_path / "bad"))
    assert "question" in str(err.value) and "answer" in str(err.value)
    assert "instruction" in str(err.value)


def test_load_records_hub_path_is_mocked(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(source, split, data_files=None):
        calls.append((source, split, data_files))
        return datasets.Dataset.from_dict({"prompt": ["p"], "output": [["r1", "r2"]]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("someone/some-set", split="test")
    assert calls == [("someone/some-set", "test", None)]
    assert records == [InstructionRecord("p", "", ["r1", "r2"], {})]

    def failing(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(UserError, match="someone/other.*offline"):
        load_records("someone/other")


# --------------------------------------------------------------------------- templates

ALPACA_NO_INPUT_LITERAL = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT_LITERAL = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def test_alpaca_strings_exact():
    assert ALPACA_PROMPT_NO_INPUT == ALPACA_NO_INPUT_LITERAL
    assert ALPACA_PROMPT_WITH_INPUT == ALPACA_WITH_INPUT_LITERAL
    assert format_prompt(InstructionRecord("Name a colour.", "", ["blue"], {})) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert format_prompt(InstructionRecord("Add.", "2 and 3", ["5"], {}), "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )


def test_plain_and_chat_templates():
    tok = byte_tokenizer()
    r = InstructionRecord("Add.", "2 and 3", ["5"], {})
    assert format_prompt(r, "plain") == "Add.\n\n2 and 3\n"
    assert format_prompt(InstructionRecord("Hi.", "", [], {}), "plain") == "Hi.\n"
    assert format_prompt(r, "chat", tok) == "<s>user\nAdd.\n\n2 and 3</s>\n<s>assistant\n"


def test_template_errors():
    r = InstructionRecord("Hi.", "", [], {})
    with pytest.raises(UserError, match="'vicuna'.*alpaca"):
        format_prompt(r, "vicuna")
    tok = byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        format_prompt(r, "chat", tok)
    with pytest.raises(UserError, match="chat template"):
        format_prompt(r, "chat", None)


# --------------------------------------------------------------------------- examples


def bos_byte_tokenizer():
    """The byte tokenizer, but adding BOS like Llama tokenizers do."""
    from tokenizers import processors

    tok = byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


def test_build_examples_ids():
    tok = byte_tokenizer()
    records = [InstructionRecord("Hi.", "", ["yo", "hey"], {"id": 1})]
    examples, stats = build_examples(records, tok, template="plain")
    (ex,) = examples
    # the byte tokenizer adds no BOS: the prompt is exactly the text bytes
    assert ex.prompt_ids == tok("Hi.\n", add_special_tokens=False)["input_ids"]
    assert ex.response_ids == tok("yo", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.references == ["yo", "hey"] and ex.metadata == {"id": 1}
    assert (stats.num_records, stats.num_kept) == (1, 1)
    # chat prompts carry their own special tokens: not doubled
    (ex,), _ = build_examples(records, bos_byte_tokenizer(), template="chat")
    assert ex.prompt_ids[0] == tok.bos_token_id and ex.prompt_ids[1] != tok.bos_token_id
    # special-token text in data is split into ordinary bytes, never an early EOS
    (ex,), _ = build_examples([InstructionRecord("Hi.", "", ["a</s>b"], {})], tok, template="plain")
    assert ex.response_ids.count(tok.eos_token_id) == 1 and len(ex.response_ids) == 7


def test_build_examples_with_bos_tokenizer():
    tok = bos_byte_tokenizer()
    (ex,), _ = build_examples([InstructionRecord("Hi.", "", ["yo"], {})], tok, template="plain")
    assert ex.prompt_ids == [tok.bos_token_id] + tok("Hi.\n", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ex.response_ids


def test_long_prompts_dropped_and_counted():
    tok = byte_tokenizer()
    records = [
        InstructionRecord("a" * 9, "", ["x"], {}),  # plain prompt = 10 tokens: kept at limit 10
        InstructionRecord("b" * 10, "", ["x"], {}),  # 11 tokens: dropped
        InstructionRecord("c" * 50, "", ["x"], {}),  # dropped
    ]
    examples, stats = build_examples(
        records, tok, template="plain", max_prompt_length=10, max_length=20
    )
    assert [len(e.prompt_ids) for e in examples] == [10]
    assert (stats.num_records, stats.num_kept, stats.num_dropped_long_prompt) == (3, 1, 2)
    assert "1/3 examples kept" in stats.summary() and "2 dropped" in stats.summary()
    assert not stats.lossless  # the training loop warns about it
    _, whole = build_examples(records[:1], tok, template="plain", max_prompt_length=10, max_length=20)
    assert whole.lossless  # logged at INFO only


def test_eval_prompts_keep_the_last_tokens():
    tok = byte_tokenizer()
    r = InstructionRecord("0123456789", "", ["x"], {})
    (ex,), stats = build_examples(
        [r],
        tok,
        template="plain",
        max_prompt_length=4,
        drop_long_prompts=False,
        with_responses=False,
        prompt_truncation="keep_last",
    )
    assert tok.decode(ex.prompt_ids) == "789\n" and ex.response_ids is None
    assert stats.num_truncated_prompt == 1 and stats.num_dropped_long_prompt == 0
    assert "1 prompts truncated (keep_last)" in stats.summary()
    # with a BOS-adding tokenizer the BOS stays in front
    (ex,), _ = build_examples(
        [r],
        bos_byte_tokenizer(),
        template="plain",
        max_prompt_length=4,
        drop_long_prompts=False,
        with_responses=False,
        prompt_truncation="keep_last",
    )
    assert ex.prompt_ids[0] == tok.bos_token_id and tok.decode(ex.prompt_ids[1:]) == "89\n"


def test_eval_prompts_keep_the_first_tokens_by_default():
    """As MiniLLM / PromptKD's evaluation: prompt_ids[:max_prompt_length] (a BOS stays first)."""
    tok = byte_tokenizer()
    r = InstructionRecord("0123456789", "", ["x"], {})
    kw = dict(template="plain", max_prompt_length=4, drop_long_prompts=False, with_responses=False)
    (ex,), stats = build_examples([r], tok, **kw)
    assert tok.decode(ex.prompt_ids) == "0123" and stats.num_truncated_prompt == 1
    assert "1 prompts truncated (keep_first)" in stats.summary()
    (ex,), _ = build_examples([r], bos_byte_tokenizer(), **kw)
    assert ex.prompt_ids[0] == tok.bos_token_id and tok.decode(ex.prompt_ids[1:]) == "012"
    # a prompt within the limit is untouched either way
    (ex,), _ = build_examples([r], tok, **{**kw, "max_prompt_length": 11})
    assert tok.decode(ex.prompt_ids) == "0123456789\n"
    with pytest.raises(UserError, match="prompt_truncation = 'left'.*keep_first"):
        build_examples([r], tok, **kw, prompt_truncation="left")


def test_response_eos_follows_the_ended_flag():
    """A generated response cut at max_new_tokens (ended: false) gets no EOS; no flag -> EOS."""
    tok = byte_tokenizer()
    yo = tok("yo", add_special_tokens=False)["input_ids"]
    records = [
        InstructionRecord("Hi.", "", ["yo"], {"ended": True}),
        InstructionRecord("Hi.", "", ["yo"], {"ended": False}),
        InstructionRecord("Hi.", "", ["yo"], {}),
    ]
    examples, _ = build_examples(records, tok, template="plain")
    assert [e.response_ids for e in examples] == [yo + [tok.eos_token_id], yo, yo + [tok.eos_token_id]]
    assert examples[1].metadata == {"ended": False}
    bad = records[:2] + [InstructionRecord("Hi.", "", ["yo"], {"ended": "no"})]
    with pytest.raises(UserError, match=r"gen\.jsonl: record 3: field 'ended' must be true or false.*'no'"):
        build_examples(bad, tok, template="plain", source="gen.jsonl")


def test_response_truncated_to_max_length():
    tok = byte_tokenizer()
    records = [
        InstructionRecord("Hi.", "", ["abcdefghij"], {}),
        InstructionRecord("Hi.", "", ["ab"], {}),
    ]
    examples, stats = build_examples(
        records, tok, template="plain", max_prompt_length=4, max_length=8
    )
    # prompt "Hi.\n" = 4 tokens, budget 4: "abcd" (no EOS: the answer did not end there)
    assert tok.decode(examples[0].response_ids) == "abcd"
    assert examples[1].response_ids[-1] == tok.eos_token_id and len(examples[1].response_ids) == 3
    assert stats.num_truncated_response == 1
    assert all(len(e.prompt_ids) + len(e.response_ids) <= 8 for e in examples)


def test_empty_after_filter_error_names_source_count_limit_flag():
    tok = byte_tokenizer()
    records = [InstructionRecord("long instruction", "", ["x"], {})] * 3
    with pytest.raises(UserError) as err:
        build_examples(records, tok, max_prompt_length=5, max_length=10, source="train.jsonl")
    msg = str(err.value)
    assert "train.jsonl" in msg and "3 records" in msg and "5" in msg
    assert "data.max_prompt_length" in msg


def test_build_examples_argument_errors():
    tok = byte_tokenizer()
    r = [InstructionRecord("Hi.", "", [], {})]
    with pytest.raises(UserError, match="record 1 has no reference"):
        build_examples(r, tok)
    with pytest.raises(UserError, match="data.max_length"):
        build_examples(r, tok, max_prompt_length=8, max_length=8)
    with pytest.raises(UserError, match="no records"):
        build_examples([], tok, source="empty.jsonl")
    examples, _ = build_examples(r, tok, with_responses=False)
    assert examples[0].response_ids is None and examples[0].references == []


# --------------------------------------------------------------------------- collation

PAD = 258


def ex(prompt, response=None):
    return Example(
        prompt_ids=list(prompt),
        response_ids=None if response is None else list(response),
        references=[],
    )


def test_collate_prompts_left_padded():
    ids, mask = collate_prompts([ex([1, 2, 3]), ex([4])], pad_token_id=PAD)
    assert ids.tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_collate_sequences_layout():
    batch = collate_sequences([ex([1, 2, 3], [10, 11, 257]), ex([4], [12, 257])], pad_token_id=PAD)
    assert batch.prompt_length == 3
    assert batch.input_ids.tolist() == [[1, 2, 3, 10, 11, 257], [PAD, PAD, 4, 12, 257, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]]
    assert batch.loss_mask.tolist() == [
        [False, False, False, True, True, True],
        [False, False, False, True, True, False],
    ]
    assert batch.loss_mask.dtype == torch.bool and batch.attention_mask.dtype == torch.long
    assert batch.num_loss_tokens == 5
    # positions count real tokens only
    assert batch.position_ids.tolist()[1] == [0, 0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="with_responses"):
        collate_sequences([ex([1])], pad_token_id=PAD)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 12), st.integers(1, 12)),
        min_size=1,
        max_size=6,
    )
)
def test_collate_sequences_loss_mask_is_exactly_the_response(lengths):
    # prompt tokens 1..99, response tokens 100..199 ending in EOS 257: identifiable by value
    examples = [
        ex([1 + (i % 99) for i in range(p)], [100 + (i % 99) for i in range(r - 1)] + [257])
        for p, r in lengths
    ]
    batch = collate_sequences(examples, pad_token_id=PAD)
    ids, lm, am = batch.input_ids, batch.loss_mask, batch.attention_mask
    P = max(p for p, _ in lengths)
    assert batch.prompt_length == P and ids.shape == (len(lengths), P + max(r for _, r in lengths))
    is_response = (ids >= 100) & (ids != PAD)
    assert torch.equal(lm, is_response)
    assert torch.equal(am.bool(), ids != PAD)
    for b, (p, r) in enumerate(lengths):
        assert ids[b, P - p : P].tolist() == examples[b].prompt_ids  # prompt ends at column P-1
        assert ids[b, P : P + r].tolist() == examples[b].response_ids  # response starts at P
        assert int(lm[b].sum()) == r and bool(lm[b, P + r - 1]) and ids[b, P + r - 1] == 257


# Text pieces, including the special tokens' spellings: data text must never become special.
_PIECES = st.sampled_from(["a", "b", " ", "\n", "\u00e9", "</s>", "<pad>", "<s>"])
_TEXT = st.lists(_PIECES, min_size=1, max_size=6).map("".join)
_TOK = byte_tokenizer()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=5),
    st.integers(2, 32),
    st.integers(1, 12),
)
def test_built_and_collated_loss_mask_is_the_response_up_to_the_first_eos(pairs, prompt_limit, room):
    """Records -> build_examples -> collate: for random prompt/response lengths, dropped long
    prompts, cut responses and text spelling special tokens, the loss mask covers exactly the
    response tokens up to and including the first EOS (the appended one; none when the response
    was cut), nothing after, never a prompt or pad column."""
    tok = _TOK
    records = [InstructionRecord(instr, "", [out], {}) for instr, out in [("a", "b"), *pairs]]  # "a\n" always fits
    examples, stats = build_examples(
        records, tok, template="plain", max_prompt_length=prompt_limit, max_length=prompt_limit + room
    )
    assert stats.num_kept == len(examples) == len(records) - stats.num_dropped_long_prompt
    batch = collate_sequences(examples, tok.pad_token_id)
    P, eos = batch.prompt_length, tok.eos_token_id
    assert not batch.loss_mask[:, :P].any()
    cut = 0
    for b, ex_ in enumerate(examples):
        resp = batch.input_ids[b, P:]
        real = batch.attention_mask[b, P:].bool()
        eos_at = [t for t in range(len(resp)) if real[t] and resp[t] == eos]
        first = eos_at[0] if eos_at else int(real.sum()) - 1
        expected = real & (torch.arange(len(resp)) <= first)
        assert torch.equal(batch.loss_mask[b, P:], expected)
        assert torch.equal(expected, real)  # nothing real after the first EOS
        n = len(ex_.response_ids)
        assert len(ex_.prompt_ids) <= prompt_limit and len(ex_.prompt_ids) + n <= prompt_limit + room
        assert int(expected.sum()) == n and resp[:n].tolist() == ex_.response_ids
        if eos_at:  # complete response: exactly one EOS, the last token; the text round-trips
            assert eos_at == [n - 1] and tok.decode(resp[: n - 1]) == ex_.references[0]
        else:  # cut to max_length: no EOS, and prompt + response fill the budget exactly
            cut += 1
            assert len(ex_.prompt_ids) + n == prompt_limit + room
    assert cut == stats.num_truncated_response


def test_end_to_end_with_tiny_jsonl(tiny_jsonl, tokenizer):
    records = load_records(str(tiny_jsonl))
    examples, stats = build_examples(records, tokenizer, source=str(tiny_jsonl))
    assert stats.num_kept == 16 and len(examples) == 16
    batch = collate_sequences(examples[0:4], tokenizer.pad_token_id)
    assert batch.num_loss_tokens == sum(len(e.response_ids) for e in examples[:4])
    assert "### Response:\n" in tokenizer.decode(batch.input_ids[0, : batch.prompt_length])


# --------------------------------------------------------------------------- eval sets


def test_load_eval_set_local_and_hub_fallback(tmp_path, monkeypatch):
    (tmp_path / "eval").mkdir()
    write_lines(
        tmp_path / "eval" / "dolly_eval.jsonl", [GOOD, rec(instruction="q", outputs=["a", "b"])]
    )
    records = load_eval_set("dolly", data_dir=tmp_path)
    assert [r.outputs for r in records] == [["hi"], ["a", "b"]]
    assert load_eval_set(tmp_path / "eval" / "dolly_eval.jsonl") == records

    calls = []

    def fake_load_records(source, split="train", *, require_outputs=True, data_files=None):
        calls.append((source, data_files))
        return [InstructionRecord(str(i), "", ["r"], {}) for i in range(10_005)]

    monkeypatch.setattr(eval_datasets, "load_records", fake_load_records)
    assert len(load_eval_set("uinst", data_dir=tmp_path)) == 10_000  # first 10k, as MiniLLM
    assert len(load_eval_set("sinst", data_dir=tmp_path)) == 10_005
    assert calls == [("MiniLLM/uinst", "11_/valid.jsonl"), ("MiniLLM/sinst", "11_/valid.jsonl")]
    with pytest.raises(UserError, match="unknown evaluation set 'dollyy'"):
        load_eval_set("dollyy", data_dir=tmp_path)
    assert {s.hub_id for s in EVAL_SETS.values()} == {
        "MiniLLM/dolly",
        "MiniLLM/self-inst",
        "MiniLLM/Vicuna",
        "MiniLLM/sinst",
        "MiniLLM/uinst",
    }


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data directory not present")
def test_real_data_counts():
    dev = load_records(str(SHARED_DATA / "train" / "dolly_minillm_dev.jsonl"))
    assert len(dev) == 1000
    counts = {
        name: len(load_eval_set(name, data_dir=SHARED_DATA))
        for name in ("dolly", "selfinst", "vicuna")
    }
    assert counts == {"dolly": 500, "selfinst": 242, "vicuna": 80}
    assert load_eval_set("dolly", data_dir=SHARED_DATA)[0].metadata.keys() == {"category"}
    examples, stats = build_examples(
        dev[:200], byte_tokenizer(), max_prompt_length=256, max_length=512
    )
    # byte-level tokens are much longer than GPT-2's: some prompts exceed 256 and are dropped
    assert stats.num_kept + stats.num_dropped_long_prompt == 200 and stats.num_kept > 0


# ----------------------------------------------------------------------------- the global batch order


def test_local_micro_batches_take_micro_batch_then_process_slots():
    items = list(range(12))  # 2 processes x micro-batches of 2, 1 and 3
    assert local_micro_batches(items, [2, 1, 3], num_processes=2, process_index=0) == [[0, 1], [4], [6, 7, 8]]
    assert local_micro_batches(items, [2, 1, 3], num_processes=2, process_index=1) == [[2, 3], [5], [9, 10, 11]]
    # equal sizes: micro-batch m of rank r holds global slots (m * world + r) * size ...
    items = list(range(24))
    for r in range(3):
        got = local_micro_batches(items, [2] * 4, num_processes=3, process_index=r)
        assert got == [items[(m * 3 + r) * 2 :][:2] for m in range(4)]


@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(1, 4))
@settings(max_examples=50, deadline=None)
def test_global_batch_joins_every_process_share_back_in_order(sizes, world):
    items = list(range(world * sum(sizes)))
    shares = [local_micro_batches(items, sizes, num_processes=world, process_index=r) for r in range(world)]
    assert global_batch(shares) == items
    assert all([len(mb) for mb in share] == sizes for share in shares)


def test_local_micro_batches_reject_a_batch_of_another_length():
    with pytest.raises(ValueError, match="5 items for 2 processes"):
        local_micro_batches(list(range(5)), [1, 2], num_processes=2, process_index=0)
