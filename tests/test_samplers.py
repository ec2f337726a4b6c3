"""The on-policy sampler is pluggable: train.sampler picks a registered backend (default hf)."""

from __future__ import annotations

import pytest

from promptkd import samplers
from promptkd.config import config_from_dict
from promptkd.errors import UserError
from promptkd.training.loop import Trainer


def test_default_is_transformers_generate():
    assert config_from_dict({"model": {"teacher": "t", "student": "s"}, "data": {"train": "x"}}).train.sampler == "hf"
    assert isinstance(samplers.build_sampler("hf"), samplers.HFSampler)
    assert "hf" in samplers.available_samplers()


def test_unknown_sampler_names_the_registered_ones():
    with pytest.raises(UserError, match=r"train.sampler = 'vllm' is not a registered sampler; available: hf"):
        samplers.build_sampler("vllm")


def test_registering_twice_needs_replace(monkeypatch):
    monkeypatch.setattr(samplers, "_REGISTRY", dict(samplers._REGISTRY))
    samplers.register_sampler("other", samplers.HFSampler)
    with pytest.raises(UserError, match="already registered"):
        samplers.register_sampler("other", samplers.HFSampler)
    samplers.register_sampler("other", samplers.HFSampler, replace=True)


def test_trainer_samples_through_the_configured_backend(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    monkeypatch.setattr(samplers, "_REGISTRY", dict(samplers._REGISTRY))
    calls = []

    class Recording(samplers.HFSampler):
        def __init__(self, context):
            super().__init__(context)
            self.context = context

        def __call__(self, model, prompt_ids, prompt_mask, **kw):
            calls.append((self.context, tuple(prompt_ids.shape), kw["config"].max_new_tokens))
            return super().__call__(model, prompt_ids, prompt_mask, **kw)

    samplers.register_sampler("recording", Recording)
    teacher, student = tiny_pair_dirs
    cfg = config_from_dict({
        "model": {"teacher": str(teacher), "student": str(student)},
        "data": {"train": str(tiny_jsonl)},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "warmup_steps": 0,
                  "sampler": "recording"},
        "sampling": {"max_new_tokens": 4},
    })
    tr = Trainer(cfg, show_progress=False).setup()
    metrics = tr.train_step().metrics
    assert len(calls) == 1 and calls[0][0] is tr.ctx and calls[0][1][0] == 2 and calls[0][2] == 4
    assert metrics["student/loss"] >= 0
