"""train.fsdp, killed and resumed: a 2-process PromptKD run (student and teacher sharded with FSDP2,
gloo on CPU) gets SIGTERM mid-run, checkpoints the step it was in and exits; `--resume` with 2
processes then ends where an uninterrupted 2-process run ends, bit for bit.

Bit for bit because both runs execute the same float32 operations in the same order: the same world
size, the same shards, greedy decoding (as in test_fsdp.py), and the resumed run gets back each
rank's RNG states, the student's shards with their AdamW moments (each rank its own, from the
checkpoint's student_dcp/), the prompt and its optimizer (replicated) and the data position.

The signal goes to torchrun, as a cluster scheduler's would: torchrun forwards SIGTERM to both
workers and waits `--shutdown_timeout` seconds for them before it SIGKILLs them. Each worker
finishes its step; the ranks agree on the stop (`StopSignals.agreed`, an all-reduce), write the
checkpoint together and exit 143. torchrun itself then exits 1 (its SignalException).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import yaml
from launch import ROOT, env, write_config
from test_kill_resume import assert_same, load_any, metrics, signal_after_steps

from promptkd.training.checkpoint import latest_checkpoint, load_trainer_state

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")]

MAX_STEPS = 8


def torchrun(*args: str) -> list[str]:
    """`promptkd train ARGS` under torchrun with 2 processes; torchrun waits up to 300 s for its
    signalled workers (the default 30 s is short for two busy cores)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--shutdown_timeout", "300", "-m", "promptkd.cli", "train", "--no-progress", *args]


def test_sigterm_mid_run_then_resume_equals_uninterrupted_sharded_run(tmp_path):
    config, _ = write_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"].pop("dev")  # no dev evaluation: only the training steps matter here
    cfg["train"].update(max_steps=MAX_STEPS, mixed_precision="no", fsdp=True, eval_metric="loss")
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    ref, run = tmp_path / "ref", tmp_path / "run"
    started = time.perf_counter()
    uninterrupted = subprocess.Popen(torchrun("--config", str(config), "--train.output_dir", str(ref)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT)
    proc = subprocess.Popen(torchrun("--config", str(config), "--train.output_dir", str(run)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT)
    signal_after_steps(proc, run, 2, signal.SIGTERM, timeout=300, output=proc.stdout)
    output, _ = proc.communicate(timeout=300)
    ref_output, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, ref_output[-3000:]

    # both workers stopped on the signal after the same step, with its checkpoint
    ckpt = latest_checkpoint(run / "checkpoints")
    step = load_trainer_state(ckpt)["step"]
    assert 2 <= step < MAX_STEPS, "the signal should have arrived mid-run"
    assert load_trainer_state(ckpt)["world_size"] == 2
    stopped = (f"promptkd: SIGTERM received: stopped after step {step} of {MAX_STEPS}, checkpoint written to "
               f"{ckpt}; continue with: promptkd train --resume {run}")
    assert output.count(stopped) == 1, output[-3000:]  # said once, by rank 0
    assert proc.returncode != 0  # torchrun's SignalException; its traceback is the only one
    assert "src/promptkd/" not in output and "promptkd/cli.py" not in output, output[-3000:]
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 1))
    assert not (run / "final").exists()

    done = subprocess.run(torchrun("--resume", str(run)), capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "were not restored" not in done.stderr
    print(f"\nstopped after step {step}; ref + interrupted + resumed runs: {time.perf_counter() - started:.1f} s")
    assert metrics(run) == metrics(ref)
    for rel in ("final/student/model.safetensors", "final/prompt_adapter/adapter_model.safetensors"):
        assert_same(load_any(ref / rel), load_any(run / rel), rel)
