"""Time (and peak memory) of forward + backward for every divergence in promptkd.losses.

Two modes.

Side by side, eager vs fused (``--compare``): one subprocess per (vocab, threads) runs every
divergence on float32 (1, N, V) logits ~ N(0, 2^2) (only ``logits`` requires grad, as in a
student update; an all-True mask) through the eager path, the fused (torch.compile) path and,
with ``--baseline FILE``, an earlier version of losses.py loaded from FILE, interleaved round
by round (best of --repeats). It reports the no-grad forward (evaluation), the training
forward (which, by design, already computes the gradient), the backward, their sum, the
ratios, and the fused path's warm-up: the first call's time minus the steady-state time,
i.e. compiling (a fresh, empty inductor cache per subprocess unless --warm-cache). The fused
variant runs with ``set_fused(True, min_elements=0)``, so small --vocabs/--compare-length
are fused too. Unlike the grid, these subprocesses keep glibc's default malloc settings.

    python benchmarks/bench_losses.py --compare                           # V 49,152 and 128,256, N 512,
                                                                          # 1 thread and all threads
    git show dd65392:src/promptkd/losses.py > /tmp/losses_before.py  # before fusing
    python benchmarks/bench_losses.py --compare --baseline /tmp/losses_before.py

Grid (default): peak memory and time per case,

    python benchmarks/bench_losses.py                 # full grid (see below), ~10 min on 2 cores
    python benchmarks/bench_losses.py --quick         # vocab 49,152, length 512 only
    python benchmarks/bench_losses.py --divergences reverse_kl --lengths 2048 --vocabs 128256

Grid: every divergence x vocab {49,152, 128,256} x length {512, 2,048} (batch 1, every
position selected by an all-True mask, so the mask path is exercised) x chunk_size {None,
1024 (the library default), 256} x --paths (default: the library's default, fused); a
chunk_size >= length is skipped, as it changes nothing then. Inputs are float32 (1, T, V)
logits ~ N(0, 2^2); only `logits` requires grad, as in a student update. Each case runs in a
fresh subprocess, so peak resident memory (getrusage ru_maxrss) of one case never mixes with
another; "extra" is that peak minus the peak right after the inputs were allocated, i.e. what
the loss (gradient buffer included) adds on top of the two input tensors. A fused case first
compiles on an 8-row input of the same vocabulary, before that baseline. Time is the best of
--repeats runs of loss + backward; the fixed malloc mmap threshold these subprocesses need
(see ``_spawn``) makes every (block, V) temporary a fresh mapping, which slows the blocked
evaluation severalfold, so take times from --compare and memory from here.

Both modes print a markdown report (hardware, versions, command, tables); the last stdout
line is one JSON document with every figure.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
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

    from promptkd.losses import DIVERGENCES, set_fused

    torch.set_num_threads(case["threads"])
    fn = DIVERGENCES[case["divergence"]]
    if case.get("path", "default") != "default":  # "fused": whatever the size
        set_fused(case["path"] == "fused", min_elements=0)
    if case.get("path", "default") != "eager":  # compile now, on 8 rows of the same vocabulary
        small = torch.randn(1, 8, case["vocab"]).requires_grad_()
        fn(small, torch.randn(1, 8, case["vocab"]), chunk_size=case["chunk_size"]).backward()
        del small
    gen = torch.Generator().manual_seed(0)
    shape = (1, case["length"], case["vocab"])
    logits = torch.randn(shape, generator=gen).mul_(2.0).requires_grad_()  # (1, T, V)
    target_logits = torch.randn(shape, generator=gen).mul_(2.0)  # (1, T, V)
    mask = torch.ones(shape[:-1], dtype=torch.bool)  # (1, T)
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


def _load_module(path: str):
    """An earlier version of promptkd/losses.py, loaded from a file (the --baseline)."""
    spec = importlib.util.spec_from_file_location("losses_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_compare(case: dict) -> dict:
    """Runs in the child process: every divergence, eager vs fused (vs baseline), interleaved."""
    import torch

    from promptkd import losses

    torch.set_num_threads(case["threads"])
    modules = {"eager": losses, "fused": losses}
    if case.get("baseline"):
        modules = {"before": _load_module(case["baseline"]), **modules}
    gen = torch.Generator().manual_seed(0)
    shape = (1, case["length"], case["vocab"])
    logits = torch.randn(shape, generator=gen).mul_(2.0).requires_grad_()  # (1, N, V)
    target_logits = torch.randn(shape, generator=gen).mul_(2.0)  # (1, N, V)
    mask = torch.ones(shape[:-1], dtype=torch.bool)  # (1, N)

    def train_step(variant: str, name: str) -> tuple[float, float, float]:
        losses.set_fused(variant == "fused", min_elements=0)
        fn = modules[variant].DIVERGENCES[name]
        logits.grad = None
        start = time.perf_counter()
        loss = fn(logits, target_logits, mask)
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        assert torch.isfinite(loss.detach() + logits.grad.sum()).item()
        return mid - start, end - mid, float(loss.detach())

    def no_grad_forward(variant: str, name: str) -> float:
        losses.set_fused(variant == "fused", min_elements=0)
        fn = modules[variant].DIVERGENCES[name]
        with torch.no_grad():
            start = time.perf_counter()
            fn(logits, target_logits, mask)
            return time.perf_counter() - start

    rows = []
    for name in case["divergences"]:
        row = {"divergence": name, "vocab": case["vocab"], "length": case["length"]}
        row["threads"] = case["threads"]
        # First calls: the fused ones compile (a kernel shared with an earlier divergence,
        # e.g. reverse_kl after forward_kl, is already compiled).
        first_train = sum(train_step("fused", name)[:2])
        first_no_grad = no_grad_forward("fused", name)
        train_step("eager", name)
        best: dict[str, dict[str, float]] = {}
        for repeat in range(case["repeats"]):
            for variant in modules:
                if variant == "before" and repeat >= case["baseline_repeats"]:
                    continue
                fwd, bwd, value = train_step(variant, name)
                nog = no_grad_forward(variant, name)
                got = best.setdefault(variant, {"fwd": fwd, "bwd": bwd, "nograd": nog})
                if fwd + bwd < got["fwd"] + got["bwd"]:
                    got.update(fwd=fwd, bwd=bwd)
                got["nograd"] = min(got["nograd"], nog)
                row[f"loss_{variant}"] = value
        for variant, got in best.items():
            row[f"{variant}_fwd_s"] = got["fwd"]
            row[f"{variant}_bwd_s"] = got["bwd"]
            row[f"{variant}_total_s"] = got["fwd"] + got["bwd"]
            row[f"{variant}_nograd_s"] = got["nograd"]
        row["warmup_train_s"] = first_train - row["fused_total_s"]
        row["warmup_nograd_s"] = first_no_grad - row["fused_nograd_s"]
        rows.append(row)
        print(f"{name} V={case['vocab']} threads={case['threads']} done", file=sys.stderr)
    return {**case, "rows": rows, "peak_rss_mib": _peak_rss_bytes() / 2**20}


def _spawn(case: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
    env = dict(os.environ)
    cache_dir = None
    if case.get("mode") != "compare":
        # glibc raises its mmap threshold (up to 32 MiB) after large frees, after which freed
        # (chunk, V) buffers can stay resident in malloc arenas and RSS stops tracking live
        # tensors. A fixed threshold keeps every large tensor mmap-backed, returned on free.
        # Not for --compare: every (block, V) temporary over 1 MiB would then be mapped and
        # page-faulted afresh (measured 1.8x slower fused, 3.5x eager), which real runs,
        # with glibc's adaptive threshold, do not do.
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    elif not case.get("warm_cache"):
        # An empty inductor cache of its own: the warm-up is a cold compile.
        cache_dir = tempfile.mkdtemp(prefix="bench_losses_inductor_")
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout_s:.0f} s"}
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
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
        "| divergence | vocab | length | chunk_size | path | fwd s | bwd s | fwd+bwd s | "
        "peak RSS MiB | extra MiB |\n|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for r in results:
        key = (
            f"| {r['divergence']} | {r['vocab']} | {r['length']} | {_fmt_chunk(r['chunk_size'])} "
            f"| {r.get('path', 'default')} |"
        )
        if "error" in r:
            rows.append(f"{key} error: {r['error']} | | | | |")
            continue
        rows.append(
            f"{key} {r['forward_s']:.2f} | {r['backward_s']:.2f} | {r['total_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} | {r['extra_mib']:.0f} |"
        )
    return "\n".join(rows)


def _compare_tables(results: list[dict]) -> str:
    """Markdown: the training step (fwd+bwd), its parts, the no-grad forward, the warm-up."""
    rows = [r for result in results if "error" not in result for r in result["rows"]]
    errors = [
        f"- error ({r['vocab']}, {r['threads']} threads): {r['error']}"
        for r in results
        if "error" in r
    ]
    before = any("before_total_s" in r for r in rows)

    def key(r):
        return f"| {r['divergence']} | {r['vocab']} | {r['threads']} |"

    def ratio(a, b):
        return f"{a / b:.1f}x" if b > 0 else "-"

    out = ["### Training step: forward + backward (s, best of the repeats)", ""]
    cols = ["before", "eager", "fused"] if before else ["eager", "fused"]
    head = "| divergence | vocab | threads | " + " | ".join(cols) + " | eager / fused |"
    head += " before / fused |" if before else ""
    out += [head, "|---|---:|---:|" + "---:|" * (len(cols) + 1 + before)]
    for r in rows:
        cells = " | ".join(f"{r[f'{c}_total_s']:.3f}" for c in cols)
        line = f"{key(r)} {cells} | {ratio(r['eager_total_s'], r['fused_total_s'])} |"
        if before:
            line += f" {ratio(r['before_total_s'], r['fused_total_s'])} |"
        out.append(line)
    out += ["", "### Its parts: training forward (computes the gradient too) and backward (s)", ""]
    head = (
        "| divergence | vocab | threads | " + " | ".join(f"{c} fwd | {c} bwd" for c in cols) + " |"
    )
    out += [head, "|---|---:|---:|" + "---:|" * (2 * len(cols))]
    for r in rows:
        cells = " | ".join(f"{r[f'{c}_fwd_s']:.3f} | {r[f'{c}_bwd_s']:.3f}" for c in cols)
        out.append(f"{key(r)} {cells} |")
    out += ["", "### No-grad forward (evaluation, values only; s)", ""]
    head = "| divergence | vocab | threads | " + " | ".join(cols) + " | eager / fused |"
    head += " before / fused |" if before else ""
    out += [head, "|---|---:|---:|" + "---:|" * (len(cols) + 1 + before)]
    for r in rows:
        cells = " | ".join(f"{r[f'{c}_nograd_s']:.3f}" for c in cols)
        line = f"{key(r)} {cells} | {ratio(r['eager_nograd_s'], r['fused_nograd_s'])} |"
        if before:
            line += f" {ratio(r['before_nograd_s'], r['fused_nograd_s'])} |"
        out.append(line)
    out += [
        "",
        "### Fused warm-up: first call minus steady state (s; compiling, in this order)",
        "",
        "| divergence | vocab | threads | training call | no-grad call |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(f"{key(r)} {r['warmup_train_s']:.1f} | {r['warmup_nograd_s']:.1f} |")
    return "\n".join(out + ([""] + errors if errors else []))


def _parse_chunks(text: str) -> list[int | None]:
    return [None if c.strip().lower() == "none" else int(c) for c in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="vocab 49152, length 512 only")
    parser.add_argument("--divergences", default=",".join(ALL_DIVERGENCES))
    parser.add_argument("--vocabs", default="49152,128256")
    parser.add_argument("--lengths", default="512,2048", help="grid; --compare: the first")
    parser.add_argument("--chunk-sizes", default="none,1024,256", help="'none' = unchunked")
    parser.add_argument(
        "--paths", default="default", help="grid: comma-separated default, eager, fused"
    )
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per case")
    parser.add_argument("--compare", action="store_true", help="eager vs fused, side by side")
    parser.add_argument(
        "--compare-threads",
        default=f"1,{os.cpu_count() or 1}",
        help="--compare: one subprocess per vocab x this many threads",
    )
    parser.add_argument("--compare-length", type=int, default=512, help="--compare: N")
    parser.add_argument("--baseline", help="--compare: also time the losses.py in this file")
    parser.add_argument(
        "--baseline-repeats", type=int, default=1, help="--compare: rounds with the baseline"
    )
    parser.add_argument(
        "--warm-cache", action="store_true", help="--compare: reuse the inductor cache"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (child)
    args = parser.parse_args(argv)

    if args.case:
        case = json.loads(args.case)
        result = _run_compare(case) if case.get("mode") == "compare" else _run_case(case)
        print(json.dumps(result))
        return 0

    vocabs = [49152] if args.quick else [int(v) for v in args.vocabs.split(",")]
    lengths = [512] if args.quick else [int(t) for t in args.lengths.split(",")]
    divergences = args.divergences.split(",")
    if args.compare:
        cases = [
            {
                "mode": "compare",
                "divergences": divergences,
                "vocab": vocab,
                "length": args.compare_length,
                "threads": int(threads),
                "repeats": args.repeats,
                "baseline": os.path.abspath(args.baseline) if args.baseline else None,
                "baseline_repeats": args.baseline_repeats,
                "warm_cache": args.warm_cache,
            }
            for vocab in vocabs
            for threads in args.compare_threads.split(",")
        ]
    else:
        cases = [
            {
                "divergence": name,
                "vocab": vocab,
                "length": length,
                "chunk_size": chunk_size,
                "path": path,
                "repeats": args.repeats,
                "threads": args.threads,
            }
            for vocab in vocabs
            for length in lengths
            for name in divergences
            for chunk_size in _parse_chunks(args.chunk_sizes)
            for path in args.paths.split(",")
            # chunk_size >= the number of rows is the same as none: nothing to measure.
            if chunk_size is None or chunk_size < length
        ]
    import torch

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
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
        "threads": args.compare_threads if args.compare else args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - started, 1),
        # Other processes share the cores: the load averages before and after the run.
        "loadavg_before_after": [load_before, os.getloadavg() if load_before else None],
    }
    print("# promptkd.losses benchmark\n")
    for key, value in meta.items():
        print(f"- {key}: {value}")
    print()
    print(_compare_tables(results) if args.compare else _table(results))
    print()
    print(json.dumps({"meta": meta, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
