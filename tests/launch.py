"""Launching `promptkd train` as subprocesses for the multi-process tests (test_multiprocess.py,
test_fsdp.py): one process, two under torchrun, or two under `accelerate launch` with the shipped
configs/accelerate/cpu_2proc.yaml; the tiny PromptKD run config; reading the runs' outputs back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from promptkd.testing import TINY_RECORDS, save_tiny_pair, write_tiny_jsonl

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
LR = 1e-3  # one AdamW step moves a weight by about LR
RUN_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    out = dict(os.environ)
    out.update(
        OMP_NUM_THREADS="1",  # 2 ranks on 2 shared cores
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return out


def command(launcher: str, args: list[str], *, verbose: bool = False) -> list[str]:
    """`promptkd train ARGS` with one process ("single"), or two ("torchrun", "accelerate");
    `verbose` logs at debug level (info lines included)."""
    train = ["-m", "promptkd.cli", *(["-v"] if verbose else []), "train", "--no-progress", *args]
    if launcher == "single":
        return [sys.executable, *train]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *train]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
                "--main_process_port", str(free_port()), *train]
    raise ValueError(launcher)


def run_all(jobs: dict[str, tuple], logs: Path) -> dict[str, float]:
    """Run the jobs {name: (launcher, args[, verbose])} concurrently (they are independent); fail with
    the log of any that fails. Returns each job's wall time from the common start."""
    procs, started = {}, time.perf_counter()
    for name, (launcher, args, *verbose) in jobs.items():
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed below
        procs[name] = (subprocess.Popen(command(launcher, args, verbose=bool(verbose and verbose[0])), stdout=log,
                                        stderr=subprocess.STDOUT, env=env(), cwd=ROOT), log)
    times = {}
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            for p, _ in procs.values():
                p.kill()
            raise
        finally:
            log.close()
        times[name] = time.perf_counter() - started
        if rc != 0:
            tail = (logs / f"{name}.log").read_text(errors="replace")[-4000:]
            pytest.fail(f"run {name} ({jobs[name][0]}) exited {rc}:\n{tail}")
    return times


def write_config(root: Path, **model) -> tuple[Path, Path]:
    """(config, student dir) of a 1-step PromptKD run on the tiny pair; `model` adds model.* entries."""
    teacher, student = save_tiny_pair(root / "models")
    train = write_tiny_jsonl(root / "train.jsonl", 16)
    dev = root / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in TINY_RECORDS[:5]), encoding="utf-8")  # 5: uneven shards
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "method": "promptkd",
        "model": {"teacher": str(teacher), "student": str(student), **model},
        "data": {"train": str(train), "dev": str(dev), "max_prompt_length": 256, "max_length": 300},
        "train": {"max_steps": 1, "batch_size": 2, "warmup_steps": 0, "seed": 5, "learning_rate": LR,
                  "cpu": True, "eval_metric": "rougeL"},
        "sampling": {"max_new_tokens": 6, "do_sample": False},
    }), encoding="utf-8")
    return config, student


def final_weights(run_dir: Path) -> tuple[dict, dict]:
    """(student, prompt) state dicts the run exported to final/ (prompt {} for a method without one)."""
    from safetensors.torch import load_file

    final = run_dir / "final"
    prompt = final / "prompt_adapter" / "adapter_model.safetensors"
    return load_file(final / "student" / "model.safetensors"), (load_file(prompt) if prompt.is_file() else {})


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
