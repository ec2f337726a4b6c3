"""Peak memory of a PromptKD step's loss part: full logits vs LM-head chunking on hidden states.

    python benchmarks/bench_head_memory.py                    # both shapes, ~5-8 min on 2 cores
    python benchmarks/bench_head_memory.py --shapes qwen2.5-0.5b --steps 1

Models are randomly initialised from configs (no download) shaped like Llama-3.2-1B (hidden
2,048, vocabulary 128,256, tied embeddings) and Qwen2.5-0.5B (hidden 896, vocabulary 151,936,
tied), with --layers decoder layers each (default 2: the logits' memory, which is what differs
between the two paths, does not depend on depth; the layers' own activations are the same in
both). Teacher and student have the same shape and different seeds, float32, on CPU; the
teacher is wrapped in promptkd's PromptedTeacher (7 random virtual tokens).

One step = the loss part of PromptKD.step with one micro-batch (kd, reg and student
divergences all reverse KL, lambda > 0, the student forward shared by the prompt and student
losses, as PromptKD.step does when the student has no dropout):

- unchunked: student response_logits (with grad), prompted-teacher logits (with grad) and base
  logits (no grad); L_kd + lambda L_reg on them -> backward into the prompt; prompted-teacher
  target logits (no grad); L_student -> backward into the student. promptkd.losses throughout.
- chunked: the same with hidden_states_for_response, head_divergences for L_kd + lambda L_reg
  (the prompted teacher's logits once per chunk for both terms) and head_divergence for
  L_student (default chunk size): no (B, R, V) tensor exists.

Each case runs in a fresh subprocess (MALLOC_MMAP_THRESHOLD_=1 MiB so freed tensors leave the
resident set, as in bench_losses.py). Memory is the resident-set high-water mark (VmHWM, reset
through /proc/self/clear_refs before each step; ru_maxrss for the whole process):

- setup: resident memory after the models and the batch exist, before any step;
- step 1 peak: the first step, which also allocates the student's parameter gradients;
- step 2 peak: a second step with those gradients already allocated (zeroed in place), i.e.
  the step's transient memory on top of a steady state.
- "extra" = peak - setup. The ratio chunked / unchunked is given for peaks and extras.

Prints a markdown report; the last stdout line is one JSON document with every figure.
Divergences run eagerly (PROMPTKD_FUSED_LOSSES=0, both paths) unless --fused: compiling would
add the compiler's own memory and minutes to both.
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

SHAPES = {
    # Llama-3.2-1B: config.json of meta-llama/Llama-3.2-1B (16 layers there)
    "llama-3.2-1b": {
        "family": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
    # Qwen2.5-0.5B: config.json of Qwen/Qwen2.5-0.5B (24 layers there)
    "qwen2.5-0.5b": {
        "family": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
}


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def _build(shape: dict, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = {k: v for k, v in shape.items() if k != "family"}
    kwargs.update(num_hidden_layers=layers, max_position_embeddings=4096, pad_token_id=0)
    if shape["family"] == "llama":
        config, cls = LlamaConfig(**kwargs), LlamaForCausalLM
    else:
        config, cls = Qwen2Config(**kwargs), Qwen2ForCausalLM
    torch.manual_seed(seed)
    return cls(config).eval()


def _run_case(case: dict) -> dict:
    """Runs in the child process: one shape, one path, `steps` steps."""
    import torch

    from promptkd.data.batch import SequenceBatch
    from promptkd.head_losses import (
        HeadTerm,
        head_divergence,
        head_divergences,
        hidden_states_for_response,
        lm_head_of,
    )
    from promptkd.losses import reverse_kl
    from promptkd.models.prompted_teacher import PromptedTeacher
    from promptkd.sampling import response_logits

    torch.set_num_threads(case["threads"])
    shape = SHAPES[case["shape"]]
    vocab = shape["vocab_size"]
    student = _build(shape, case["layers"], seed=1)
    prompted = PromptedTeacher(_build(shape, case["layers"], seed=2), None, num_virtual_tokens=7,
                               init="random")
    prompt = prompted.prompt_parameters()[0]
    gen = torch.Generator().manual_seed(0)
    b, p, r = case["batch"], case["prompt_length"], case["response_length"]
    ids = torch.randint(3, vocab, (b, p + r), generator=gen)
    attention = torch.ones_like(ids)
    for row in range(b):  # left-padded prompts of different lengths
        pad = (row * 3) % p
        attention[row, :pad] = 0
        ids[row, :pad] = 0
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, p:] = True
    batch = SequenceBatch(ids, attention, loss_mask, prompt_length=p)
    mask = loss_mask[:, p:]  # (B, R)
    tokens = float(mask.sum())
    scale, lam = 1.0 / tokens, 0.5
    keep = ids.shape[1] - p + 1
    student_params = [q for q in student.parameters() if q.requires_grad]

    def step_unchunked():
        s_logits = response_logits(student, batch, vocab)  # (B, R, V), with grad
        target = s_logits.detach()
        tp = prompted(ids, attention, logits_to_keep=keep)[:, :-1, :vocab]  # with grad
        with torch.no_grad():
            base = prompted.forward_base(ids, attention, logits_to_keep=keep)[:, :-1, :vocab]
        l_kd = reverse_kl(tp, target, mask, reduction="sum")
        l_reg = reverse_kl(tp, base, mask, reduction="sum")
        ((l_kd + lam * l_reg) * scale).backward()
        del tp, base, target
        with torch.no_grad():
            t = prompted(ids, attention, logits_to_keep=keep)[:, :-1, :vocab]
        l_s = reverse_kl(s_logits, t, mask, reduction="sum")
        (l_s * scale).backward()
        return float(l_kd), float(l_reg), float(l_s)

    s_head, t_head = lm_head_of(student, vocab), lm_head_of(prompted, vocab)
    chunk = case["chunk_size"]

    def step_chunked():
        h = hidden_states_for_response(student, batch)  # (B, R, H), with grad
        th = hidden_states_for_response(prompted, batch)  # with grad (the prompt's)
        with torch.no_grad():
            bh = hidden_states_for_response(prompted, batch, base=True)
        loss, (l_kd, l_reg) = head_divergences(th, t_head, [
            HeadTerm("reverse_kl", h.detach(), s_head.detached()),
            HeadTerm("reverse_kl", bh, t_head, weight=lam),
        ], mask, chunk_size=chunk)
        (loss * scale).backward()
        del th, bh, loss
        with torch.no_grad():
            th = hidden_states_for_response(prompted, batch)
        l_s = head_divergence("reverse_kl", h, s_head, th, t_head, mask, chunk_size=chunk)
        (l_s * scale).backward()
        return float(l_kd), float(l_reg), float(l_s)

    step = step_chunked if case["path"] == "chunked" else step_unchunked
    setup_kib = _status_kib("VmRSS")
    steps = []
    for i in range(case["steps"]):
        reset = _reset_hwm()
        start = time.perf_counter()
        losses = step()
        seconds = time.perf_counter() - start
        peak_kib = _status_kib("VmHWM") if reset else None
        grad_norm = float(torch.stack([q.grad.norm() for q in student_params]).norm())
        steps.append({
            "step": i + 1,
            "seconds": seconds,
            "peak_mib": _mib(peak_kib),
            "extra_mib": None if peak_kib is None else _mib(peak_kib - setup_kib),
            "l_kd": losses[0], "l_reg": losses[1], "l_student": losses[2],
            "student_grad_norm": grad_norm, "prompt_grad_norm": float(prompt.grad.norm()),
        })
        for q in student_params + [prompt]:  # keep the buffers: step 2 measures a steady state
            q.grad.zero_()
    params = sum(q.numel() for q in student.parameters())
    return {
        **case,
        "setup_mib": _mib(setup_kib),
        "ru_maxrss_mib": _peak_rss_bytes() / 2**20,
        "student_params_m": params / 1e6,
        "student_grads_mib": sum(q.numel() * q.element_size() for q in student_params) / 2**20,
        "logits_mib": b * r * vocab * 4 / 2**20,  # one float32 (B, R, V) tensor
        "steps": steps,
    }


def _spawn(case: dict, timeout_s: float, fused: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    if not fused:
        env["PROMPTKD_FUSED_LOSSES"] = "0"
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


def _fmt(x, digits=0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


def _tables(results: list[dict]) -> str:
    rows = [
        "| shape | path | setup MiB | step 1 peak MiB | step 1 extra MiB | step 2 peak MiB | "
        "step 2 extra MiB | ru_maxrss MiB | step 1 s | step 2 s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['shape']} | {r['path']} | error: {r['error']} |||||||| ")
            continue
        s = r["steps"] + [{}] * (2 - len(r["steps"]))
        rows.append(
            f"| {r['shape']} | {r['path']} | {_fmt(r['setup_mib'])} | "
            f"{_fmt(s[0].get('peak_mib'))} | {_fmt(s[0].get('extra_mib'))} | "
            f"{_fmt(s[1].get('peak_mib'))} | {_fmt(s[1].get('extra_mib'))} | "
            f"{_fmt(r['ru_maxrss_mib'])} | {_fmt(s[0].get('seconds'), 1)} | "
            f"{_fmt(s[1].get('seconds'), 1)} |"
        )
    rows += [
        "",
        "| shape | (B, R, V) float32 MiB | student grads MiB | step 1 peak ratio | "
        "step 1 extra ratio | step 2 peak ratio | step 2 extra ratio | max rel. loss diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["shape"], r["path"]): r for r in results if "error" not in r}
    for shape in dict.fromkeys(r["shape"] for r in results):
        c, u = by.get((shape, "chunked")), by.get((shape, "unchunked"))
        if c is None or u is None:
            continue
        cells = []
        for i in range(2):
            for key in ("peak_mib", "extra_mib"):
                a = c["steps"][i].get(key) if i < len(c["steps"]) else None
                b = u["steps"][i].get(key) if i < len(u["steps"]) else None
                cells.append(_ratio(a, b))
        diff = max(
            abs(cs[k] - us[k]) / max(abs(us[k]), 1e-12)
            for cs, us in zip(c["steps"], u["steps"], strict=False)
            for k in ("l_kd", "l_reg", "l_student", "student_grad_norm", "prompt_grad_norm")
        )
        rows.append(
            f"| {shape} | {_fmt(u['logits_mib'])} | {_fmt(u['student_grads_mib'])} | "
            + " | ".join(cells) + f" | {diff:.1e} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--paths", default="unchunked,chunked")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers per model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--response-length", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="head_divergence chunk_size (default: the library's)")
    parser.add_argument("--steps", type=int, default=2, choices=(1, 2))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fused", action="store_true",
                        help="leave promptkd.losses' fused (torch.compile) default on")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (child)
    args = parser.parse_args(argv)

    if args.case:
        print(json.dumps(_run_case(json.loads(args.case))))
        return 0

    cases = [
        {
            "shape": shape,
            "path": path,
            "layers": args.layers,
            "batch": args.batch,
            "prompt_length": args.prompt_length,
            "response_length": args.response_length,
            "chunk_size": args.chunk_size,
            "steps": args.steps,
            "threads": args.threads,
        }
        for shape in args.shapes.split(",")
        for path in args.paths.split(",")
    ]
    import torch

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    results = []
    for case in cases:
        results.append(_spawn(case, args.timeout_s, args.fused))
        print(f"done {len(results)}/{len(cases)}", file=sys.stderr, flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_head_memory.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_losses": args.fused,
        "wall_s": round(time.perf_counter() - started, 1),
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0] if load_before else None],
    }
    print("# LM-head chunking: peak memory of a PromptKD step\n")
    for key, value in meta.items():
        print(f"- {key}: {value}")
    print()
    print(_tables(results))
    print()
    print(json.dumps({"meta": meta, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
