"""benchmarks/gpu_check.py: the CPU dry run of the whole flow, the refusal without CUDA, and the
pieces its verdicts rest on (FLOP count, peak table, numerics comparison)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    module = gpu_check_module()
    assert Path(module.__file__).resolve() == SCRIPT
    return module


def gpu_check_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(SCRIPT.parent))


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.slow
def test_cpu_tiny_dry_run(tmp_path):
    out = tmp_path / "report.md"
    proc = _run("--device", "cpu", "--tiny", "--steps", "1", "--peak-tflops", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text(encoding="utf-8")
    assert report in proc.stdout
    for section in ("# GPU check", "## Numerics against float64", "## Throughput", "## Per-phase profile",
                    "Numerics: **PASS**", "MFU is an estimate", "CPU run (--device cpu): a dry run"):
        assert section in report, section
    for run in ("promptkd/float32", "promptkd/bf16", "gkd/float32", "gkd/bf16"):
        assert f"| {run} | student gradient cosine |" in report
    assert "| promptkd/bf16 | prompt gradient cosine |" in report
    assert "**FAIL**" not in report
    assert "## FSDP2 (train.fsdp), 2 processes against 1 unsharded process" in report and "FSDP2: **PASS**" in report

    doc = json.loads(proc.stdout.strip().splitlines()[-1])  # the last stdout line
    assert doc["passed"] is True and doc["complete"] is True
    fsdp = doc["fsdp"]  # the 2-process train.fsdp check, on the CPU with gloo
    assert fsdp["backend"] == "gloo" and fsdp["passed"] is True
    weights = {r["quantity"]: r["value"] for r in fsdp["rows"] if "weights" in r["quantity"]}
    assert set(weights) == {"student weights max |diff|", "prompt weights max |diff|"}
    assert all(v <= gpu_check_module().FSDP_WEIGHT_ATOL for v in weights.values())
    assert doc["meta"]["device_type"] == "cpu" and doc["meta"]["tiny"] is True
    for method in ("promptkd", "gkd"):
        r = doc["results"][method]
        assert r["seconds_per_step"]["median"] > 0 and r["seconds_per_step"]["n"] == 1
        assert len(r["warmup_seconds"]) == 1
        assert r["generated_tokens_per_step"] > 0 and r["trained_tokens_per_s"] > 0
        assert r["tflops_per_step"] > 0 and r["mfu"] > 0
        assert r["phases_median_s"]["generation"] > 0
        assert r["phase_clock"].startswith("device synchronised")
        (step,) = [s for s in r["steps"] if s["measured"]]
        rows, width, prompt = step["shapes"][0]
        assert rows == 2 and prompt == 16 and 16 < width <= 32  # --tiny: batch 2, 16 + up to 16 tokens
    assert doc["results"]["promptkd"]["phases_median_s"]["backward_prompt"] > 0
    assert doc["results"]["gkd"]["phases_median_s"]["backward_prompt"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_refuses_cuda_without_cuda():
    proc = _run("--device", "cuda", timeout=120)
    assert proc.returncode == 2
    assert "--device cuda was asked but CUDA is not available here" in proc.stderr
    assert "--device cpu --tiny" in proc.stderr
    assert proc.stdout == ""


def test_flops_per_step(gpu_check):
    m = {"body": 100, "lm_head": 10, "hidden": 4, "layers": 2}
    # F(m, L, K) = 2 * 100 * B * L + 2 * 10 * B * K + 2 * B * L^2 * 4 * 2
    assert gpu_check.forward_flops(m, 1, 3, 2) == 600 + 40 + 144
    shapes = [(2, 10, 6)]  # 2 rows, width 10, prompt 6: R = 4
    F = gpu_check.forward_flops
    gen = F(m, 2, 10, 4)
    student = 3 * F(m, 2, 10, 5)
    total, g = gpu_check.flops_per_step("gkd", m, m, shapes, 7)
    assert g == gen and total == gen + student + F(m, 2, 10, 5)
    total, g = gpu_check.flops_per_step("promptkd", m, m, shapes, 7)
    assert g == gen and total == gen + student + 3 * F(m, 2, 17, 5) + F(m, 2, 10, 5)


def test_peak_table(gpu_check):
    assert gpu_check.peak_for_name("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert gpu_check.peak_for_name("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert gpu_check.peak_for_name("NVIDIA H200") == (989.0, "H200")
    assert gpu_check.peak_for_name("NVIDIA A100-SXM4-80GB") == (312.0, "A100")
    assert gpu_check.peak_for_name("NVIDIA L40S") == (362.0, "L40S")
    assert gpu_check.peak_for_name("NVIDIA L4") == (121.0, "L4")
    assert gpu_check.peak_for_name("Some Future GPU") == (None, None)
    value, source = gpu_check.peak_tflops(torch.device("cpu"), 123.0)
    assert value == 123.0 and source == "--peak-tflops"
    assert gpu_check.peak_tflops(torch.device("cpu"), None)[0] is None


def test_word_tokenizer(gpu_check):
    tok = gpu_check.word_tokenizer(1000)
    assert len(tok) == 1000
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok("t4 t999", add_special_tokens=False)["input_ids"] == [4, 999]
    assert tok.decode([5, 6]) == "t5 t6"


def test_compare_flags_a_bad_gradient(gpu_check):
    g = torch.linspace(-1, 1, 50, dtype=torch.float64)
    ref = {"metrics": {"student/loss": 1.0}, "student_grad": g, "student_update": g.sign()}
    good = {"metrics": {"student/loss": 1.005}, "student_grad": g * 1.01, "student_update": g.sign()}
    rows = gpu_check.compare(ref, good, "bf16")
    assert all(r["ok"] is not False for r in rows)
    assert all(r["ok"] is False for r in gpu_check.compare(ref, good, "float32") if r["quantity"].endswith("rel. diff"))
    bad = {"metrics": {"student/loss": 1.0}, "student_grad": g.flip(0) + 0.5, "student_update": g.sign()}
    (cos,) = [r for r in gpu_check.compare(ref, bad, "bf16") if r["quantity"] == "student gradient cosine"]
    assert cos["ok"] is False


def test_fsdp_check_is_skipped_with_fewer_than_two_gpus(gpu_check, tmp_path, monkeypatch):
    """With 0 or 1 CUDA GPU the train.fsdp check does not run (nothing is launched) and the report
    says why; a skipped check does not fail the run."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fsdp = gpu_check.run_fsdp(torch.device("cuda"), tmp_path)
    assert fsdp == {"skipped": "needs 2 or more CUDA GPUs, this machine has 1"}
    assert not any(tmp_path.iterdir())
    meta = {"date": "d", "device_type": "cuda", "versions": {}, "command": "c", "wall_s": 1.0, "max_seconds": 1.0,
            "loss_compile": "n/a", "tiny": False, "peak_tflops": None, "peak_source": "none",
            "device": {"name": "GPU", "memory_gib": 80, "capability": "9.0"},
            "spec": {"batch_size": 1, "prompt_tokens": 1, "new_tokens": 1, "vocab": 16, "warmup": 0, "steps": 1,
                     "precision": "bf16"}}
    report = gpu_check.markdown(meta, None, {}, fsdp)
    assert "Skipped: needs 2 or more CUDA GPUs, this machine has 1. The FSDP2 path has not run" in report
