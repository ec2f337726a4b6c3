"""Kill-and-resume: a PromptKD CLI run SIGKILLed again and again ends where an uninterrupted
run with the same seed ends, bit for bit.

The run goes through `python -m promptkd.cli train` in subprocesses. PROMPTKD_TEST_KILL_AT
(promptkd/training/checkpoint.py) makes the process SIGKILL itself at a chosen point of a
chosen checkpoint write; every later process resumes with `--resume RUN_DIR`. Compared with
the uninterrupted run: the exported student and prompt adapter, every metrics record (timings
aside, the compute totals included) and the last checkpoint (both optimizers, both schedulers, RNG
states, trainer state).
A shorter variant does the same with a LoRA student (model.student_lora): three kills, 4 steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from promptkd.testing import save_tiny_pair, write_tiny_jsonl
from promptkd.training.checkpoint import KILL_ENV, latest_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL"),
]

MAX_STEPS = 6
TIMING_KEYS = {"step_time", "trained_tokens_per_s"}
# (kill point, what the run directory must look like right after the kill)
KILLS = [
    ("saved:2", "after step 2's checkpoint"),
    ("state-written:4", "inside step 4's checkpoint write: tmp dir without trainer_state.json"),
    ("renamed:5", "step 5's checkpoint renamed into place, `latest` still names step 4"),
    ("saved:6", "final checkpoint written, student not exported yet"),
    ("set-aside:6", "re-saving step 6 on resume: old copy renamed away, new one not in place"),
]


def cli(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    # one thread per process: the same float reductions in every run, and gentle on shared cores
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "promptkd.cli", "train", *args, "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )


def metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def signal_after_steps(proc: subprocess.Popen, run: Path, steps: int, sig: int, *, timeout: float,
                       output) -> None:
    """Send `sig` to `proc` once `run`'s metrics.jsonl holds `steps` records; fail (with the tail of
    `output`, the process's stream) if it ends or takes longer than `timeout` seconds first."""
    log = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (log.is_file() and log.read_text().count("\n") >= steps):
        assert proc.poll() is None, f"run ended before it was signalled:\n{output.read()[-3000:]}"
        assert time.monotonic() < deadline, "run logged no steps in time"
        time.sleep(0.02)
    proc.send_signal(sig)


def assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif type(a).__module__ == "numpy":
        assert repr(a) == repr(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load_any(path: Path):
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix == ".json":
        state = json.loads(path.read_text())
        state.pop("metrics_offset")  # byte size of metrics.jsonl: its timings differ per run
        return state
    return torch.load(path, map_location="cpu", weights_only=False)


def write_run_config(tmp_path: Path, max_steps: int, **model) -> Path:
    """The PromptKD run's config (tiny pair, 12 examples + 1 dropped, a checkpoint every step) under
    tmp_path, writing into tmp_path/ref; `model` adds model.* entries (e.g. student_lora)."""
    teacher, student = save_tiny_pair(tmp_path / "models")
    data = write_tiny_jsonl(tmp_path / "train.jsonl", 12)
    with data.open("a") as f:  # one prompt over the limit: dropped, and the count is reported
        f.write(json.dumps({"instruction": "x" * 80, "output": "y"}) + "\n")
    cfg = {
        "method": "promptkd",
        "model": {"teacher": str(teacher), "student": str(student), **model},
        "data": {"train": str(data), "template": "plain", "max_prompt_length": 40, "max_length": 56},
        "train": {"output_dir": str(tmp_path / "ref"), "max_steps": max_steps, "batch_size": 2,
                  "warmup_steps": 2, "learning_rate": 1e-3, "save_every": 1, "keep_last": 2,
                  "seed": 11, "deterministic": True, "cpu": True},
        "sampling": {"max_new_tokens": 4},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path


def assert_same_checkpoints(ref: Path, run: Path, step: int) -> list[str]:
    """The last checkpoints of both runs are step `step` and hold the same files, bit for bit."""
    last_ref, last_run = latest_checkpoint(ref / "checkpoints"), latest_checkpoint(run / "checkpoints")
    assert last_ref.name == last_run.name == f"step-{step:08d}"
    files = sorted(p.name for p in last_ref.iterdir())
    assert files == sorted(p.name for p in last_run.iterdir())
    for name in files:
        assert_same(load_any(last_ref / name), load_any(last_run / name), name)
    return files


def test_sigkill_at_any_point_then_resume_equals_uninterrupted_run(tmp_path):
    cfg_path = write_run_config(tmp_path, MAX_STEPS)
    ref = tmp_path / "ref"
    done = cli(["--config", str(cfg_path)])
    assert done.returncode == 0, done.stderr
    assert "12/13 examples kept; 1 dropped (prompt too long)" in done.stderr

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = ["--config", str(cfg_path), "--train.output_dir", str(run)]
    for kill_at, what in KILLS:
        out = cli(args, kill_at)
        assert out.returncode == -signal.SIGKILL, f"{kill_at} ({what}) did not kill:\n{out.stderr[-3000:]}"
        assert "Traceback" not in out.stderr
        if kill_at == "state-written:4":
            assert not (ckpts / ".tmp-step-00000004" / "trainer_state.json").exists()
            assert any((ckpts / ".tmp-step-00000004").iterdir())
            assert latest_checkpoint(ckpts).name == "step-00000003"
            assert len(metrics(run)) == 4  # step 4 was logged: the resume must drop it
        if kill_at == "renamed:5":
            assert (ckpts / "step-00000005" / "trainer_state.json").is_file()
            assert (ckpts / "latest").read_text().strip() == "step-00000004"
        if kill_at == "saved:6":
            assert not (run / "final").exists()
        if kill_at == "set-aside:6":
            assert not (ckpts / "step-00000006").exists()
            assert latest_checkpoint(ckpts).name == ".old-step-00000006"
        args = ["--resume", str(run)]
    done = cli(args)
    assert done.returncode == 0, done.stderr
    assert "were not restored" not in done.stderr

    assert metrics(run) == metrics(ref)
    assert [r["step"] for r in metrics(run)] == list(range(1, MAX_STEPS + 1))
    # the compute totals come back from the trainer state, so the last record holds the whole run's
    flops = [r["compute/flops"] for r in metrics(run)]
    assert flops == sorted(set(flops)) and metrics(run)[-1]["compute/teacher_backward_tokens"] > 0
    for rel in ("final/student/model.safetensors", "final/prompt_adapter/adapter_model.safetensors"):
        assert_same(load_any(ref / rel), load_any(run / rel), rel)
    files = assert_same_checkpoints(ref, run, MAX_STEPS)
    assert {"optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin",
            "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= set(files)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000005", "step-00000006"]


LORA_MAX_STEPS = 4
LORA_KILLS = ["state-written:2", "renamed:3", "saved:4"]  # inside a write, before `latest`, before export


def test_lora_student_sigkilled_then_resumed_equals_uninterrupted_run(tmp_path):
    """The same with a LoRA student (model.student_lora, dropout on, so the RNG matters): the
    exported adapter, the prompt, the metrics and the last checkpoint (the wrapped student, both
    optimizers over the adapter and the prompt) are bit-identical."""
    lora = {"r": 4, "lora_alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    cfg_path = write_run_config(tmp_path, LORA_MAX_STEPS, student_lora=lora)
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = cli(["--config", str(cfg_path)])
    assert done.returncode == 0, done.stderr

    args = ["--config", str(cfg_path), "--train.output_dir", str(run)]
    for kill_at in LORA_KILLS:
        out = cli(args, kill_at)
        assert out.returncode == -signal.SIGKILL, f"{kill_at} did not kill:\n{out.stderr[-3000:]}"
        args = ["--resume", str(run)]
    assert not (run / "final").exists()
    done = cli(args)
    assert done.returncode == 0, done.stderr
    assert "were not restored" not in done.stderr

    assert metrics(run) == metrics(ref)
    assert [r["step"] for r in metrics(run)] == list(range(1, LORA_MAX_STEPS + 1))
    assert not (run / "final" / "student").exists()  # model.student_lora.merge is off
    for rel in ("final/student_adapter/adapter_model.safetensors", "final/prompt_adapter/adapter_model.safetensors"):
        assert_same(load_any(ref / rel), load_any(run / rel), rel)
    adapter = load_any(run / "final/student_adapter/adapter_model.safetensors")
    assert adapter and all(".lora_" in k for k in adapter)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B moved off 0
    files = assert_same_checkpoints(ref, run, LORA_MAX_STEPS)
    assert {"model.safetensors", "optimizer.bin", "optimizer_1.bin", "custom_checkpoint_0.pkl"} <= set(files)
    student_opt = torch.load(latest_checkpoint(run / "checkpoints") / "optimizer.bin", weights_only=False)
    assert len(student_opt["state"]) == len(adapter)  # AdamW state for the adapter weights only


# MiniLLM: rollouts every 3 steps, so the resume after step 2 continues step 1's rollouts from the
# checkpoint. DistiLLM: a replay buffer (capacity 4 = two global batches), phi checked every 2 steps
# against the dev loss (loss_eps 0, so it grows), replay and fresh steps mixed (replay_ratio constant).
METHOD_RUNS = {
    "minillm": {"minillm": {"teacher_mix_alpha": 0.2, "ppo_epochs": 3}},
    "distillm": {"distillm": {"initial_student_prob": 0.5, "capacity": 4, "replay_ratio": "constant",
                              "adapt_every": 2, "loss_eps": 0.0}},
}
METHOD_KILLS = ["saved:2", "renamed:4"]  # after a checkpoint; a checkpoint in place but not `latest`


@pytest.mark.parametrize("method", sorted(METHOD_RUNS))
def test_minillm_and_distillm_sigkilled_then_resumed_equal_uninterrupted_runs(tmp_path, method):
    steps = 5
    cfg_path = write_run_config(tmp_path, steps)
    cfg = yaml.safe_load(cfg_path.read_text())
    dev = write_tiny_jsonl(tmp_path / "dev.jsonl", 4)
    cfg.update(method=method, **METHOD_RUNS[method])
    cfg["data"]["dev"] = str(dev)
    cfg_path.write_text(yaml.safe_dump(cfg))
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = cli(["--config", str(cfg_path)])
    assert done.returncode == 0, done.stderr

    args = ["--config", str(cfg_path), "--train.output_dir", str(run)]
    for kill_at in METHOD_KILLS:
        out = cli(args, kill_at)
        assert out.returncode == -signal.SIGKILL, f"{kill_at} did not kill:\n{out.stderr[-3000:]}"
        args = ["--resume", str(run)]
    done = cli(args)
    assert done.returncode == 0, done.stderr
    assert "were not restored" not in done.stderr

    records = metrics(run)
    assert records == metrics(ref)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    if method == "minillm":  # fresh rollouts at steps 1 and 4 only; step 3 ran on restored rollouts
        assert [r["minillm/fresh_rollouts"] for r in records] == [1.0, 0.0, 0.0, 1.0, 0.0]
    else:  # the buffer and phi came back from the checkpoints
        assert {r["distillm/source"] for r in records} >= {1.0, 2.0}, records
        assert records[-1]["distillm/student_prob"] > 0.5
    rel = "final/student/model.safetensors"
    assert_same(load_any(ref / rel), load_any(run / rel), rel)
    files = assert_same_checkpoints(ref, run, steps)
    assert "custom_checkpoint_0.pkl" in files
