"""The demo's own data and its teacher-agreement measure (the full demo needs the real model)."""

from __future__ import annotations

import json

from promptkd.demo import teacher_kl
from promptkd.demo_data import demo_records, write_demo_data
from promptkd.testing import byte_tokenizer, tiny_llama


def test_demo_data_is_deterministic_and_split_without_overlap(tmp_path):
    assert demo_records() == demo_records()
    train, evals = write_demo_data(tmp_path, num_eval=40)
    tr = [json.loads(x) for x in train.read_text().splitlines()]
    ev = [json.loads(x) for x in evals.read_text().splitlines()]
    assert len(ev) == 40 and len(tr) == len(demo_records()) - 40
    assert not {(r["instruction"], r["input"]) for r in tr} & {(r["instruction"], r["input"]) for r in ev}
    assert all(r["output"] for r in tr + ev)


def test_teacher_kl_is_zero_for_the_teacher_itself_and_positive_otherwise(tmp_path):
    tok = byte_tokenizer()
    teacher = tiny_llama(num_layers=2, seed=0)
    teacher.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    other = tiny_llama(num_layers=2, seed=1)
    other.save_pretrained(tmp_path / "s")
    tok.save_pretrained(tmp_path / "s")
    _, evals = write_demo_data(tmp_path / "data", num_eval=4)
    same = teacher_kl(str(tmp_path / "t"), teacher, tok, evals, max_new_tokens=4)
    diff = teacher_kl(str(tmp_path / "s"), teacher, tok, evals, max_new_tokens=4)
    assert abs(same) < 1e-5 and diff > 1e-3
