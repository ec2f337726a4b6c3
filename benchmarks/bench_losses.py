"""Peak memory and time of forward + backward for every divergence in promptkd.losses.

    python benchmarks/bench_losses.py                 # full grid (see below), ~10 min on 2 cores
    python benchmarks/bench_losses.py --quick         # vocab 49,152, length 512 only
    python benchmarks/bench_losses.py --divergences reverse_kl --lengths 2048 --vocabs 128256

Grid: every divergence x vocab {49,152, 128,256} x length {512, 2,048} (batch 1, every
position selected by an all-True mask, so the mask path is exercised) x chunk_size {None
(plain autograd), 1024 (the library default), 256}; a chunk_size >= length is skipped, as
the library then takes the unchunked path. Inputs are float32 (1, T, V) logits
~ N(0, 2^2); only `logits` requires grad, as in a student update. Each case runs in a fresh
subprocess, so peak resident memory (getrusage ru_maxrss) of one case never mixes with
another; "extra" is that peak minus the peak right after the inputs were allocated, i.e. what
the loss (gradient buffer included) adds on top of the two input tensors. Time is the best
of --repeats runs of loss + backward.

Prints a markdown report (hardware, versions, command, table); the last stdout line is one
JSON document with every figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

ALL_DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "generalized_jsd",
    "total_variation",
)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _run_case(case: dict) -> dict:
    """Runs in the child process: one divergence, one shape, one chunk size."""
    import torch

    from promptkd.losses import DIVERGENCES

    torch.set_num_threads(case["threads"])
    gen = torch.Generator().manual_seed(0)
    shape = (1, case["length"], case["vocab"])
    logits = torch.randn(shape, generator=gen).mul_(2.0).requires_grad_()  # (1, T, V)
    target_logits = torch.randn(shape, generator=gen).mul_(2.0)  # (1, T, V)
    mask = torch.ones(shape[:-1], dtype=torch.bool)  # (1, T)
    fn = DIVERGENCES[case["divergence"]]
    baseline = _peak_rss_bytes()
    forward_s, backward_s = [], []
    for _ in range(case["repeats"]):
        logits.grad = None
        start = time.perf_counter()
        loss = fn(logits, target_logits, mask, chunk_size=case["chunk_size"])
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        forward_s.append(mid - start)
        backward_s.append(end - mid)
        # A reduction, not isfinite(grad): that would allocate (T, V) temporaries and set
        # the peak itself.
        assert torch.isfinite(loss.detach() + logits.grad.sum()).item()
    best = min(range(len(forward_s)), key=lambda i: forward_s[i] + backward_s[i])
    peak = _peak_rss_bytes()
    return {
        **case,
        "loss": float(loss.detach()),
        "forward_s": forward_s[best],
        "backward_s": backward_s[best],
        "total_s": forward_s[best] + backward_s[best],
        "inputs_mib": 2 * logits.numel() * logits.element_size() / 2**20,
        "baseline_rss_mib": baseline / 2**20,
        "peak_rss_mib": peak / 2**20,
        "extra_mib": (peak - baseline) / 2**20,
    }


def _spawn(case: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
    # glibc raises its mmap threshold (up to 32 MiB) after large frees, after which freed
    # (chunk, V) buffers can stay resident in malloc arenas and RSS stops tracking live
    # tensors. A fixed threshold keeps every large tensor mmap-backed, returned on free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {**case, "error": why[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _fmt_chunk(chunk_size) -> str:
    return "none" if chunk_size is None else str(chunk_size)


def _table(results: list[dict]) -> str:
    head = (
        "| divergence | vocab | length | chunk_size | fwd s | bwd s | fwd+bwd s | "
        "peak RSS MiB | extra MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for r in results:
        key = (
            f"| {r['divergence']} | {r['vocab']} | {r['length']} | {_fmt_chunk(r['chunk_size'])} |"
        )
        if "error" in r:
            rows.append(f"{key} error: {r['error']} | | | | |")
            continue
        rows.append(
            f"{key} {r['forward_s']:.2f} | {r['backward_s']:.2f} | {r['total_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} | {r['extra_mib']:.0f} |"
        )
    return "\n".join(rows)


def _parse_chunks(text: str) -> list[int | None]:
    return [None if c.strip().lower() == "none" else int(c) for c in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="vocab 49152, length 512 only")
    parser.add_argument("--divergences", default=",".join(ALL_DIVERGENCES))
    parser.add_argument("--vocabs", default="49152,128256")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--chunk-sizes", default="none,1024,256", help="'none' = unchunked")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (child)
    args = parser.parse_args(argv)

    if args.case:
        print(json.dumps(_run_case(json.loads(args.case))))
        return 0

    vocabs = [49152] if args.quick else [int(v) for v in args.vocabs.split(",")]
    lengths = [512] if args.quick else [int(t) for t in args.lengths.split(",")]
    cases = [
        {
            "divergence": name,
            "vocab": vocab,
            "length": length,
            "chunk_size": chunk_size,
            "repeats": args.repeats,
            "threads": args.threads,
        }
        for vocab in vocabs
        for length in lengths
        for name in args.divergences.split(",")
        for chunk_size in _parse_chunks(args.chunk_sizes)
        # chunk_size >= the number of rows takes the unchunked code path: nothing to measure.
        if chunk_size is None or chunk_size < length
    ]
    import torch

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    results = []
    for case in cases:
        results.append(_spawn(case, args.timeout_s))
        print(f"done {len(results)}/{len(cases)}", file=sys.stderr, flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_losses.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - started, 1),
        # Other processes share the cores: the 1-min load average before/after the run.
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0] if load_before else None],
    }
    print("# promptkd.losses benchmark\n")
    for key, value in meta.items():
        print(f"- {key}: {value}")
    print()
    print(_table(results))
    print()
    print(json.dumps({"meta": meta, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
