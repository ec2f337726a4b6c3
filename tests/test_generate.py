"""`promptkd generate`: each output record says whether its response ended with EOS."""

from __future__ import annotations

import json
import string

import torch

from promptkd.config import GenerateConfig
from promptkd.data.batch import SequenceBatch
from promptkd.generate import response_ended, run_generation
from promptkd.sampling import SamplingConfig
from promptkd.testing import byte_tokenizer


def test_response_ended_is_true_only_when_the_last_kept_token_is_an_eos():
    eos = pad = 2
    # rows: EOS inside the cap (then pad == eos), capped without EOS, EOS exactly at the cap,
    # a second EOS id
    resp = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [5, 6, 7, 2], [9, 3, 2, 2]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    prompt = torch.full((4, 2), 4)
    batch = SequenceBatch(
        input_ids=torch.cat([prompt, resp], dim=1),
        attention_mask=torch.cat([torch.ones(4, 2, dtype=torch.long), mask.long()], dim=1),
        loss_mask=torch.cat([torch.zeros(4, 2, dtype=torch.bool), mask], dim=1),
        prompt_length=2,
    )
    assert pad == eos
    assert response_ended(batch, [eos]) == [True, False, True, False]
    assert response_ended(batch, [eos, 3]) == [True, False, True, True]


def test_generate_records_flag_responses_capped_at_max_new_tokens(tmp_path, tiny_pair_dirs, tiny_jsonl):
    teacher, _ = tiny_pair_dirs
    tok = byte_tokenizer()
    # Letters end a response as well as </s>, so a 3-token cap leaves some responses ended and
    # some capped (the random tiny model rarely samples </s> itself).
    letters = tok.convert_tokens_to_ids(list(string.ascii_letters))
    cfg_path = teacher / "generation_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["eos_token_id"] = [tok.eos_token_id, *letters]
    cfg_path.write_text(json.dumps(cfg))

    out = run_generation(GenerateConfig(model=str(teacher), data=str(tiny_jsonl), out=str(tmp_path / "g.jsonl"),
                                        sampling=SamplingConfig(max_new_tokens=3), batch_size=4), show_progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16 and all(isinstance(r["ended"], bool) for r in rows)
    assert {r["ended"] for r in rows} == {True, False}
    for r in rows:  # letters are not special tokens: the text keeps the one that ended it
        if r["ended"]:
            assert r["output"][-1] in string.ascii_letters
        else:  # capped: no EOS among its tokens
            assert not set(r["output"]) & set(string.ascii_letters)


def test_generated_chat_records_keep_their_prompt_turns_for_seqkd(tmp_path, tiny_pair_dirs):
    """Teacher responses to chat data keep the conversation, so SeqKD trains on the same chat prompt."""
    from promptkd.data.dataset import build_examples
    from promptkd.data.records import read_jsonl_records

    teacher, _ = tiny_pair_dirs
    data = tmp_path / "chat.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    data.write_text(json.dumps({"messages": [*turns, {"role": "assistant", "content": "Blue."}]}) + "\n")
    out = run_generation(GenerateConfig(model=str(teacher), data=str(data), out=str(tmp_path / "g.jsonl"),
                                        template="chat", sampling=SamplingConfig(max_new_tokens=4)),
                         show_progress=False)
    row = json.loads(out.read_text())
    assert row["messages"] == turns and row["references"] == ["Blue."]
    (record,) = read_jsonl_records(out)
    assert record.messages == turns and record.outputs == [row["output"]]
    tok = byte_tokenizer()
    (example,), _ = build_examples([record], tok, template="chat", max_length=400)
    assert example.prompt_ids == tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)
