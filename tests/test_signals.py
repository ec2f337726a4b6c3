"""SIGTERM / SIGINT in the middle of a run: checkpoint the last completed step, say how to resume,
exit 143 / 130; `--resume` then ends exactly where an uninterrupted run ends. Plus the
time-based checkpoint (train.save_every_minutes).

The interrupted runs are `python -m promptkd.cli train` subprocesses started with default
signal handling; the signal is sent from outside once the run has logged a few steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_kill_resume import assert_same, load_any, metrics, signal_after_steps

from promptkd.testing import save_tiny_pair, write_tiny_jsonl
from promptkd.training.checkpoint import latest_checkpoint, load_trainer_state

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

MAX_STEPS = 40


def env() -> dict:
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return out


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "promptkd.cli", "train", *args, "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    teacher, student = save_tiny_pair(root / "models")
    data = write_tiny_jsonl(root / "train.jsonl", 12)
    cfg = {
        "method": "promptkd",
        "model": {"teacher": str(teacher), "student": str(student)},
        "data": {"train": str(data), "template": "plain", "max_prompt_length": 40, "max_length": 56},
        "train": {"output_dir": str(root / "ref"), "max_steps": MAX_STEPS, "batch_size": 2, "warmup_steps": 2,
                  "learning_rate": 1e-3, "seed": 11, "deterministic": True, "cpu": True},
        "sampling": {"max_new_tokens": 4},
    }
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(train_cmd("--config", str(cfg_path)), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root, cfg_path


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_checkpoints_and_resume_matches_uninterrupted_run(setup, sig, code):
    root, cfg_path = setup
    run = root / f"run_{sig.name}"
    proc = subprocess.Popen(train_cmd("--config", str(cfg_path), "--train.output_dir", str(run)),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_after_steps(proc, run, 3, sig, timeout=120, output=proc.stderr)
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    # the exit message is one line (the notice on receipt is a warning line of its own)
    lines = [x for x in stderr.splitlines() if x.startswith("promptkd: ") and not x.startswith("promptkd: warning: ")]
    assert len(lines) == 1 and f"{sig.name} received" in lines[0], stderr[-3000:]
    assert f"continue with: promptkd train --resume {run}" in lines[0]
    ckpt = latest_checkpoint(run / "checkpoints")
    step = load_trainer_state(ckpt)["step"]
    assert 3 <= step < MAX_STEPS, "the signal should have arrived mid-run"
    assert f"stopped after step {step} of {MAX_STEPS}" in lines[0]
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 1))
    assert not (run / "final").exists()

    done = subprocess.run(train_cmd("--resume", str(run)), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = root / "ref"
    assert metrics(run) == metrics(ref)
    for rel in ("final/student/model.safetensors", "final/prompt_adapter/adapter_model.safetensors"):
        assert_same(load_any(ref / rel), load_any(run / rel), rel)


def test_time_based_checkpoints(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """train.save_every_minutes checkpoints when the time since the last checkpoint is up."""
    from test_methods import trainer_for

    clock = [1000.0]
    monkeypatch.setattr("promptkd.training.loop.time.monotonic", lambda: clock[0])
    tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, train={"max_steps": 4, "save_every_minutes": 10.0})
    saved = []
    real_save = tr.save

    def save(final):
        saved.append((tr.step, final))
        real_save(final)

    monkeypatch.setattr(tr, "save", save)
    real_step = tr.method.step

    def step(ctx, mb):
        clock[0] += 6 * 60.0  # every step takes 6 minutes
        return real_step(ctx, mb)

    monkeypatch.setattr(tr.method, "step", step)
    tr.train()
    assert saved == [(2, False), (4, True)]  # 12 min after the start, then the final save
    assert Path(tr.checkpoints_dir / "step-00000002").is_dir()


def test_default_is_a_checkpoint_every_30_minutes():
    from promptkd.config import TrainConfig

    assert TrainConfig().save_every_minutes == 30.0

