"""Mixed precision chosen by the hardware: `mixed_precision: auto` (the default everywhere).

    from promptkd.precision import resolve_precision
    resolve_precision("auto", torch.device("cpu"))   # Precision(mixed_precision='no', ...) on an AVX2 CPU

- CUDA: auto is bf16 where the device supports it (`torch.cuda.is_bf16_supported()`), else no.
- CPU: auto is bf16 only where the CPU computes bf16 natively (AMX, AVX512-BF16). Elsewhere
  (AVX2-only CPUs: Intel before Sapphire Rapids, AMD before Zen 4) bf16 is emulated and a bf16
  matmul takes tens of times as long as a float32 one. A probe decides, not a list of CPU
  names: it times one bf16 and one float32 matmul and picks bf16 only when bf16 is faster. The
  result is cached per machine (CPU model, torch version and the oneDNN / ATen ISA variables)
  in CACHE/precision.json (CACHE = $PROMPTKD_CACHE or ~/.cache/promptkd).
- Other devices (MPS, XPU): no.

An explicit bf16 on a CPU that emulates it still runs, with one warning that quotes the
measured slowdown. "no" means float32 compute; fp16 is CUDA's (accelerate rejects it on CPU).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "no", "bf16", "fp16")
CACHE_FILE = "precision.json"
# The probe: one thread, shapes that take about 1 ms in float32 and tens of ms in emulated bf16.
# The minimum over repeats filters out the time a busy machine takes the core away; float32, the
# short one, gets many repeats, since an inflated float32 time is what could make emulated bf16
# look fast (an inflated bf16 time only errs towards float32).
PROBE_SHAPE = (128, 512, 512)  # (M, K, N): (M, K) @ (K, N)
PROBE_REPEATS = {torch.float32: 30, torch.bfloat16: 3}


@dataclass(frozen=True)
class Precision:
    """What runs: `mixed_precision` is no / bf16 / fp16 (accelerate's names); `reason` says why."""

    mixed_precision: str
    requested: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for float32 compute."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)

    def describe(self) -> str:
        name = {"no": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[self.mixed_precision]
        return f"{name} ({self.reason})" if self.requested == "auto" else f"{name} (set explicitly; {self.reason})"

    def as_record(self) -> dict:
        return {"mixed_precision": self.mixed_precision, "requested": self.requested, "reason": self.reason}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cpus() -> int:
    """The logical CPUs this process may run on: a container's or a `taskset`'s share, not the
    host's count that os.cpu_count() gives."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_description() -> str:
    """The hardware a run's numbers come from, as a study records it: the CPU, the logical CPUs
    this process may use and any CUDA GPUs."""
    text = f"{_cpu_name()}, {available_cpus()} CPUs"
    if torch.cuda.is_available():
        text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return text


def machine_key() -> str:
    """What the probe's answer depends on: the CPU, torch and the variables that cap its ISA."""
    isa = ",".join(f"{k}={os.environ.get(k, '')}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"))
    return f"{_cpu_name()} | torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()} | {isa}"


def _cache_path() -> Path:
    # (promptkd.models.loading.default_cache_dir, without importing a higher layer)
    return Path(os.environ.get("PROMPTKD_CACHE") or "~/.cache/promptkd").expanduser() / CACHE_FILE


def _time_matmul(dtype: torch.dtype) -> float:
    m, k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    a @ b  # first call: kernel selection
    best = float("inf")
    for _ in range(PROBE_REPEATS[dtype]):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bf16_slowdown() -> float:
    """Time of a bf16 matmul over that of the same float32 matmul on one core of this CPU
    (< 1: bf16 is native)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time_matmul(torch.bfloat16) / max(_time_matmul(torch.float32), 1e-9)
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def cpu_bf16_slowdown() -> float:
    """`measure_bf16_slowdown()` for this machine, read from CACHE/precision.json or measured
    once and written there (a read-only cache only costs a re-measurement)."""
    path, key = _cache_path(), machine_key()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    ratio = measure_bf16_slowdown()
    logger.info("bf16 probe on %s: a bf16 matmul takes %.2fx the float32 time", key, ratio)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, key: ratio}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        logger.info("could not cache the bf16 probe in %s: %s", path, err)
    return ratio


_warned: set[str] = set()


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """The precision that runs on `device` for a requested one (auto / no / bf16 / fp16).

    Raises ValueError for an unknown name (configs validate it first).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"mixed precision must be one of {PRECISIONS}, got {requested!r}")
    device = torch.device(device)
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if requested == "auto":
            why = "this GPU supports bf16" if supported else "this GPU has no bf16 support"
            return Precision("bf16" if supported else "no", requested, why)
        return Precision(requested, requested, "CUDA")
    if device.type != "cpu":
        return Precision("no" if requested == "auto" else requested, requested, f"device {device.type}")
    if requested == "no":
        return Precision("no", requested, "CPU")
    ratio = cpu_bf16_slowdown()
    native = ratio < 1.0
    if requested == "auto":
        why = (f"this CPU computes bf16 natively: a bf16 matmul took {ratio:.2f}x the float32 time" if native else
               f"this CPU emulates bf16: a bf16 matmul took {ratio:.0f}x the float32 time")
        return Precision("bf16" if native else "no", requested, why)
    why = f"a bf16 matmul took {ratio:.2f}x the float32 time on this CPU"
    if requested == "bf16" and not native and "bf16" not in _warned:
        _warned.add("bf16")
        logger.warning("mixed precision bf16 on a CPU that emulates it: a bf16 matmul took %.0fx the float32 "
                       "time here, so this run will be that much slower; 'auto' picks float32 on this CPU", ratio)
    return Precision(requested, requested, why)


def autocast(device: torch.device | str, precision: Precision):
    """torch.autocast for `precision` on `device` (a no-op context for float32 compute)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=precision.dtype, enabled=precision.dtype is not None)


def model_precision(requested: str, model: torch.nn.Module, what: str = "") -> Precision:
    """`resolve_precision` for the device `model` is on, logged once per call site's run."""
    p = resolve_precision(requested, next(model.parameters()).device)
    logger.info("precision%s: %s", f" ({what})" if what else "", p.describe())
    return p
