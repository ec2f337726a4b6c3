"""`mixed_precision: auto`: bf16 only where the hardware computes it natively (promptkd.precision).

The bf16 probe is injected (its cached answer, or `measure_bf16_slowdown`), so these tests
decide the same on every CPU; one test runs the real probe and checks only its contract.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from promptkd import precision
from promptkd.config import Config, EvalConfig, ExposureBiasConfig, GenerateConfig


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """Set what the probe measures (bf16 time / float32 time); counts the measurements."""
    monkeypatch.setenv("PROMPTKD_CACHE", str(tmp_path))
    precision.cpu_bf16_slowdown.cache_clear()
    monkeypatch.setattr(precision, "_warned", set())
    calls = []

    def inject(ratio):
        monkeypatch.setattr(precision, "measure_bf16_slowdown", lambda: calls.append(ratio) or ratio)
        precision.cpu_bf16_slowdown.cache_clear()
        return calls

    yield inject
    precision.cpu_bf16_slowdown.cache_clear()


def test_auto_on_a_cpu_with_native_bf16_is_bf16(probe):
    probe(0.35)
    p = precision.resolve_precision("auto", "cpu")
    assert (p.mixed_precision, p.dtype) == ("bf16", torch.bfloat16)
    assert "natively" in p.describe() and "0.35x" in p.describe()


def test_auto_on_a_cpu_that_emulates_bf16_is_float32(probe):
    probe(35.0)
    p = precision.resolve_precision("auto", "cpu")
    assert (p.mixed_precision, p.dtype) == ("no", None)
    assert "emulates" in p.describe() and "35x" in p.describe()


def test_explicit_bf16_on_an_emulating_cpu_runs_and_warns_once(probe, caplog):
    probe(35.0)
    with caplog.at_level(logging.WARNING, logger="promptkd.precision"):
        first = precision.resolve_precision("bf16", "cpu")
        second = precision.resolve_precision("bf16", "cpu")
    assert first.mixed_precision == second.mixed_precision == "bf16"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "35x" in warnings[0] and "'auto'" in warnings[0]


def test_explicit_bf16_on_a_native_cpu_does_not_warn(probe, caplog):
    probe(0.4)
    with caplog.at_level(logging.WARNING, logger="promptkd.precision"):
        assert precision.resolve_precision("bf16", "cpu").mixed_precision == "bf16"
    assert not caplog.records


def test_no_never_probes(probe):
    calls = probe(0.4)
    assert precision.resolve_precision("no", "cpu").mixed_precision == "no"
    assert calls == []


def test_the_probe_is_measured_once_per_machine_and_cached(probe, tmp_path):
    calls = probe(35.0)
    assert precision.resolve_precision("auto", "cpu").mixed_precision == "no"
    cache = json.loads((tmp_path / precision.CACHE_FILE).read_text())
    assert cache == {precision.machine_key(): 35.0}
    precision.cpu_bf16_slowdown.cache_clear()  # a new process: reads the file, does not measure
    assert precision.resolve_precision("auto", "cpu").mixed_precision == "no"
    assert calls == [35.0]


def test_the_cache_is_per_isa(probe, monkeypatch, tmp_path):
    """Capping the ISA (ONEDNN_MAX_CPU_ISA=AVX2) is another machine for the probe."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    probe(0.4)
    assert precision.resolve_precision("auto", "cpu").mixed_precision == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    probe(35.0)
    assert precision.resolve_precision("auto", "cpu").mixed_precision == "no"
    assert len(json.loads((tmp_path / precision.CACHE_FILE).read_text())) == 2


def test_auto_on_cuda_follows_the_device(monkeypatch):
    for supported, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert precision.resolve_precision("auto", "cuda").mixed_precision == expected


def test_the_real_probe_measures_a_positive_ratio():
    ratio = precision.measure_bf16_slowdown()
    assert ratio > 0 and ratio == ratio  # finite, positive; its size depends on the CPU


def test_auto_is_the_default_wherever_models_run():
    assert Config().train.mixed_precision == "auto"
    assert GenerateConfig().mixed_precision == EvalConfig().mixed_precision == ExposureBiasConfig().mixed_precision == "auto"


def test_a_training_run_records_its_precision(tmp_path, tiny_pair_dirs, tiny_jsonl, probe):
    from test_methods import trainer_for

    probe(35.0)
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "gkd")
    assert tr.precision.mixed_precision == "no" and tr.accelerator.mixed_precision == "no"
    record = json.loads((tmp_path / "run_gkd" / "precision.json").read_text())
    assert record["mixed_precision"] == "no" and record["requested"] == "auto" and "emulates" in record["reason"]


def test_the_machine_counts_the_cpus_this_process_may_use(monkeypatch):
    # a container (or taskset) given 3 of a 64-CPU host: its workers must share 3, not 64
    monkeypatch.setattr(precision.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(precision.os, "cpu_count", lambda: 64)
    assert precision.available_cpus() == 3
    assert ", 3 CPUs" in precision.machine_description()
