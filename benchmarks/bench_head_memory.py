"""Peak memory of a PromptKD step: full logits vs LM-head chunking on hidden states.

    python benchmarks/bench_head_memory.py                    # both shapes, both modes, ~10-15 min on 2 cores
    python benchmarks/bench_head_memory.py --modes step       # whole training steps only
    python benchmarks/bench_head_memory.py --shapes qwen2.5-0.5b --steps 1
    python benchmarks/bench_head_memory.py --tiny             # smoke run: tiny shape, seconds
    python benchmarks/bench_head_memory.py --modes step --device cuda --precision bf16   # on a GPU

Models are randomly initialised from configs (no download) shaped like Llama-3.2-1B (hidden
2,048, vocabulary 128,256, tied embeddings) and Qwen2.5-0.5B (hidden 896, vocabulary 151,936,
tied), with --layers decoder layers each (default 2: the logits' memory, which is what differs
between the two paths, does not depend on depth; the layers' own activations are the same in
both). Teacher and student have the same shape and different seeds, float32 (step mode:
--precision picks train.mixed_precision), on CPU unless --device cuda; the teacher is wrapped
in promptkd's PromptedTeacher (7 random virtual tokens). The step mode of the Llama shape
holds about 10 GiB (two 1.5 GiB models, the student's gradients and AdamW moments).

Two modes (--modes), each measured for both paths:

- step: one real PromptKD training step, `Trainer.train_step()` on the library's Trainer
  (accelerate, the TrainingContext, both AdamW optimizers, clipping, the method's own step).
  "chunked" is the library's default (the losses on hidden states and LM heads); "unchunked"
  sets the context's `student_head` and `teacher_head` to None after setup: the full-logits
  path that a head which cannot be chunked gets. The student's sampling is replaced by one
  fixed batch (so both paths train on the same tokens, and generation, which does not differ
  between them, is not part of the figure). Step 1 also allocates the gradients and AdamW's
  two moments of the student; step 2 is the steady state. On --device cuda the figures are
  torch.cuda.max_memory_allocated (reset before each step) instead of the resident set.
- losses (CPU only): the loss part of PromptKD.step alone, written out here with one
  micro-batch (prompt and student losses both reverse KL, lambda > 0, the student forward
  shared by the prompt and student losses, as PromptKD.step does when the student has no
  dropout):
  - unchunked: student response_logits (with grad), prompted-teacher logits (with grad) and
    base logits (no grad); KL(p_TP || sg p_S) + lambda KL(p_TP || p_T), masked sums of
    promptkd.losses.reverse_kl -> backward into the prompt; prompted-teacher target logits
    (no grad); KL(p_S || p_TP) -> backward into the student. Plain autograd throughout.
  - chunked: the same with hidden_states_for_response and promptkd.losses.loss_terms on the
    models' LM heads: one call with both prompt terms (the prompted teacher's logits once per
    chunk for both), one for the student loss: no (B, R, V) tensor exists.

Each case runs in a fresh subprocess (MALLOC_MMAP_THRESHOLD_=1 MiB so freed tensors leave the
resident set). Memory is the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs before each step and as each phase of it ends; ru_maxrss, which the reset
clears too, is reported as the largest figure seen):

- setup: resident memory after the models and the batch exist, before any step;
- step 1 peak: the first step, which also allocates the student's parameter gradients (and,
  in step mode, AdamW's moments);
- step 2 peak: a second step, with AdamW's moments already allocated (the gradients are set
  to None after each update and allocated again by the backward), i.e. the step's memory on top
  of a steady state.
- "extra" = peak - setup. The ratio chunked / unchunked is given for peaks and extras.
- on CPU, the peak of each phase of the step (the high-water mark is read and reset as each
  phase ends, so a phase's figure also covers any untimed work since the previous phase ended),
  which shows where the step's peak is.

Prints a markdown report; the last stdout line is one JSON document with every figure.
The loss chunks run eagerly on both paths (promptkd.losses.COMPILE_MIN_ELEMENTS raised out of
reach) unless --fused, which keeps the library's default (chunks of at least COMPILE_MIN_ELEMENTS
logits compiled with torch.compile): compiling would add the compiler's own memory and minutes to
both. --chunk-elements overrides promptkd.losses.CHUNK_ELEMENTS (logits per chunk). --tiny swaps
in a tiny shape (V = 4,096, hidden 64, 1 layer) and a small batch: a smoke test of the script,
not a measurement.
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
    # --tiny: a smoke test of the script
    "tiny": {
        "family": "llama",
        "vocab_size": 4096,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
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


def _batch(case: dict, vocab: int):
    """The fixed batch: prompts left-padded to different lengths, every response token trained."""
    import torch

    from promptkd.data.batch import SequenceBatch

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
    return SequenceBatch(ids, attention, loss_mask, prompt_length=p)


def _configure_losses(case: dict) -> None:
    """The loss engine's module settings for this case (read by promptkd.losses at each call)."""
    from promptkd import losses

    if not case["fused"]:
        losses.COMPILE_MIN_ELEMENTS = 1 << 62  # no chunk reaches it: every chunk runs eagerly
    if case["chunk_elements"] is not None:
        losses.CHUNK_ELEMENTS = case["chunk_elements"]


def _run_step_case(case: dict) -> dict:
    """Runs in the child process: whole PromptKD training steps through the Trainer."""
    import shutil
    import tempfile

    import torch

    from promptkd.config import config_from_dict
    from promptkd.testing import byte_tokenizer
    from promptkd.training.loop import Trainer

    torch.set_num_threads(case["threads"])
    _configure_losses(case)
    shape = SHAPES[case["shape"]]
    vocab = shape["vocab_size"]
    cuda = case["device"] == "cuda"
    tokenizer = byte_tokenizer()  # 259 ids (pad, bos, eos among them), all inside the vocabulary
    student, teacher = _build(shape, case["layers"], seed=1), _build(shape, case["layers"], seed=2)
    for model in (student, teacher):
        model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    work = tempfile.mkdtemp(prefix="bench_head_memory_")
    cfg = config_from_dict({
        "method": "promptkd",
        "train": {"output_dir": f"{work}/run", "max_steps": 100, "batch_size": case["batch"],
                  "warmup_steps": 0, "learning_rate": 1e-5, "cpu": not cuda,
                  "mixed_precision": case["precision"], "save_every_minutes": 0},
        "promptkd": {"teacher_dropout": False},
        "sampling": {"max_new_tokens": case["response_length"]},
    }, check_required=False)
    records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(8)]
    phases = []  # CPU: (phase, its resident-set peak MiB) of the current step, in order

    def on_phase(name, seconds):  # the trainer calls it as each phase of the step ends
        if not cuda and _reset_hwm_ok:
            phases.append((name, _mib(_status_kib("VmHWM"))))
            _reset_hwm()

    _reset_hwm_ok = not cuda and _reset_hwm()
    tr = Trainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, train_dataset=records,
                 show_progress=False, on_phase=None if cuda else on_phase).setup()
    if case["path"] == "unchunked":  # the full-logits path, as for a head that cannot be chunked
        tr.ctx.student_head = tr.ctx.teacher_head = None
    assert (tr.ctx.student_head is not None) is (case["path"] == "chunked"), tr.ctx.chunked_fallback
    batch = _batch(case, vocab).to(tr.ctx.device)
    tr.ctx.sample = lambda examples, **kwargs: batch  # the same tokens on both paths
    tokens = float(batch.loss_mask.sum())

    def used_kib() -> int | None:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() // 1024
        return _status_kib("VmRSS")

    setup_kib = used_kib()
    steps = []
    for i in range(case["steps"]):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            reset = True
        else:
            reset = _reset_hwm()
        phases.clear()
        start = time.perf_counter()
        metrics = tr.train_step().metrics
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if cuda:
            peak_kib = torch.cuda.max_memory_allocated() // 1024
        else:  # the high-water mark is reset as each phase ends: the step's peak is the largest
            peak_kib = _status_kib("VmHWM") if reset else None
            if peak_kib is not None and phases:
                peak_kib = max(peak_kib, int(max(mib for _, mib in phases) * 1024))
        steps.append({
            "phases": list(phases),
            "step": i + 1,
            "seconds": seconds,
            "peak_mib": _mib(peak_kib),
            "extra_mib": None if peak_kib is None else _mib(peak_kib - setup_kib),
            "l_kl_to_student": metrics["prompt/kl_to_student"] * tokens,
            "l_drift": metrics["prompt/drift"] * tokens,
            "l_student": metrics["student/loss"] * tokens,
            "student_grad_norm": metrics["student/grad_norm"], "prompt_grad_norm": metrics["prompt/grad_norm"],
        })
    student_params = [q for q in tr.unwrapped_student.parameters() if q.requires_grad]
    shutil.rmtree(work, ignore_errors=True)
    return {
        **case,
        "setup_mib": _mib(setup_kib),
        # resetting the high-water mark resets ru_maxrss too: the largest figure seen is the peak
        "ru_maxrss_mib": max([_peak_rss_bytes() / 2**20] + [st["peak_mib"] for st in steps if st["peak_mib"] and not cuda]),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "student_params_m": sum(q.numel() for q in student_params) / 1e6,
        "student_grads_mib": sum(q.numel() * q.element_size() for q in student_params) / 2**20,
        "logits_mib": case["batch"] * case["response_length"] * vocab * 4 / 2**20,
        "steps": steps,
    }


def _run_case(case: dict) -> dict:
    """Runs in the child process: one shape, one mode, one path, `steps` steps."""
    if case["mode"] == "step":
        return _run_step_case(case)
    import torch

    from promptkd.losses import Outputs, divergence, loss_terms, reverse_kl
    from promptkd.models.head import hidden_states_for_response, lm_head_of
    from promptkd.models.prompted_teacher import PromptedTeacher
    from promptkd.sampling import response_logits

    torch.set_num_threads(case["threads"])
    _configure_losses(case)
    shape = SHAPES[case["shape"]]
    vocab = shape["vocab_size"]
    student = _build(shape, case["layers"], seed=1)
    prompted = PromptedTeacher(_build(shape, case["layers"], seed=2), None, num_virtual_tokens=7,
                               init="random")
    prompt = prompted.prompt_parameters()[0]
    batch = _batch(case, vocab)
    ids, attention, p = batch.input_ids, batch.attention_mask, batch.prompt_length
    b, r = case["batch"], case["response_length"]
    mask = batch.loss_mask[:, p:]  # (B, R)
    tokens = float(mask.sum())
    scale, lam = 1.0 / tokens, 0.5
    keep = ids.shape[1] - p + 1
    student_params = [q for q in student.parameters() if q.requires_grad]

    def masked_sum(logits, target_logits):  # reverse_kl summed over the masked positions, plain autograd
        return reverse_kl(logits, target_logits)[mask].sum()  # (B, R, V), (B, R, V) -> (B, R) -> ()

    def step_unchunked():
        s_logits = response_logits(student, batch, vocab)  # (B, R, V), with grad
        target = s_logits.detach()
        tp = prompted(ids, attention, logits_to_keep=keep)[:, :-1, :vocab]  # with grad
        with torch.no_grad():
            base = prompted.forward_base(ids, attention, logits_to_keep=keep)[:, :-1, :vocab]
        l_kl = masked_sum(tp, target)
        l_drift = masked_sum(tp, base)
        ((l_kl + lam * l_drift) * scale).backward()
        del tp, base, target
        with torch.no_grad():
            t = prompted(ids, attention, logits_to_keep=keep)[:, :-1, :vocab]
        l_s = masked_sum(s_logits, t)
        (l_s * scale).backward()
        return float(l_kl), float(l_drift), float(l_s)

    s_head, t_head = lm_head_of(student, vocab), lm_head_of(prompted, vocab)
    kl = divergence("reverse_kl")

    def step_chunked():
        student_out = Outputs(hidden_states_for_response(student, batch), s_head)  # (B, R, H), with grad
        prompted_out = Outputs(hidden_states_for_response(prompted, batch), t_head)  # with grad (the prompt's)
        with torch.no_grad():
            base = Outputs(hidden_states_for_response(prompted, batch, base=True), t_head.detached())
        loss, (l_kl, l_drift) = loss_terms(prompted_out, [(kl, student_out.detach(), 1.0),
                                                          (kl, base, lam)], mask)
        (loss * scale).backward()
        del prompted_out, base, loss
        with torch.no_grad():
            target = Outputs(hidden_states_for_response(prompted, batch), t_head.detached())
        loss, (l_s,) = loss_terms(student_out, [(kl, target, 1.0)], mask)
        (loss * scale).backward()
        return l_kl, l_drift, l_s

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
            "l_kl_to_student": losses[0], "l_drift": losses[1], "l_student": losses[2],
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


def _spawn(case: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
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


def _fmt(x, digits=0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


def _tables(results: list[dict]) -> str:
    rows = [
        "| shape | mode | path | setup MiB | step 1 peak MiB | step 1 extra MiB | step 2 peak MiB | "
        "step 2 extra MiB | ru_maxrss MiB | step 1 s | step 2 s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['shape']} | {r['mode']} | {r['path']} | error: {r['error']} |||||||| ")
            continue
        s = r["steps"] + [{}] * (2 - len(r["steps"]))
        rows.append(
            f"| {r['shape']} | {r['mode']} | {r['path']} | {_fmt(r['setup_mib'])} | "
            f"{_fmt(s[0].get('peak_mib'))} | {_fmt(s[0].get('extra_mib'))} | "
            f"{_fmt(s[1].get('peak_mib'))} | {_fmt(s[1].get('extra_mib'))} | "
            f"{_fmt(r['ru_maxrss_mib'])} | {_fmt(s[0].get('seconds'), 1)} | "
            f"{_fmt(s[1].get('seconds'), 1)} |"
        )
    rows += [
        "",
        "| shape | mode | (B, R, V) float32 MiB | student grads MiB | step 1 peak ratio | "
        "step 1 extra ratio | step 2 peak ratio | step 2 extra ratio | max rel. loss diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["shape"], r["mode"], r["path"]): r for r in results if "error" not in r}
    for shape, mode in dict.fromkeys((r["shape"], r["mode"]) for r in results):
        c, u = by.get((shape, mode, "chunked")), by.get((shape, mode, "unchunked"))
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
            for k in ("l_kl_to_student", "l_drift", "l_student", "student_grad_norm", "prompt_grad_norm")
        )
        rows.append(
            f"| {shape} | {mode} | {_fmt(u['logits_mib'])} | {_fmt(u['student_grads_mib'])} | "
            + " | ".join(cells) + f" | {diff:.1e} |"
        )
    for r in results:  # where in the step the peak is (CPU step mode)
        if "error" in r or not any(st.get("phases") for st in r["steps"]):
            continue
        rows += ["", f"Resident-set peak of each phase, {r['shape']} {r['mode']} {r['path']} (MiB; the phases in the order the "
                 "step runs them, named as `Trainer(on_phase=...)` names them; a phase's figure is the peak since the "
                 "previous phase ended):", "",
                 "| phase | " + " | ".join(f"step {st['step']}" for st in r["steps"]) + " |",
                 "|---|" + "---:|" * len(r["steps"])]
        names = [name for name, _ in r["steps"][0]["phases"]]
        for i, name in enumerate(names):  # the steps run the same phases in the same order (checked)
            cells = [_fmt(st["phases"][i][1]) if [n for n, _ in st["phases"]] == names else "?" for st in r["steps"]]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shapes", default="llama-3.2-1b,qwen2.5-0.5b", help=f"of {sorted(SHAPES)}")
    parser.add_argument("--modes", default="step,losses",
                        help="step: a whole Trainer step; losses: the loss part alone (CPU only)")
    parser.add_argument("--paths", default="unchunked,chunked")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers per model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--response-length", type=int, default=128)
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="logits per loss chunk, promptkd.losses.CHUNK_ELEMENTS (default: the library's)")
    parser.add_argument("--steps", type=int, default=2, choices=(1, 2))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fused", action="store_true",
                        help="compile large loss chunks with torch.compile (the library's default); "
                        "without it every chunk runs eagerly")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="step mode only")
    parser.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"),
                        help="train.mixed_precision of the step mode (fp16: CUDA only)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: the tiny shape, 1 layer, batch 2 x 16 response tokens")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (child)
    args = parser.parse_args(argv)

    if args.case:
        print(json.dumps(_run_case(json.loads(args.case))))
        return 0
    if args.tiny:
        args.shapes, args.layers, args.batch = "tiny", 1, 2
        args.prompt_length, args.response_length = 8, 16
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in ("step", "losses")]:
        parser.error(f"--modes: unknown {bad}; choose from step, losses")
    if args.device == "cuda" and "losses" in modes:
        parser.error("--device cuda measures whole steps only: pass --modes step")
    if bad := [x for x in args.shapes.split(",") if x not in SHAPES]:
        parser.error(f"--shapes: unknown {bad}; choose from {sorted(SHAPES)}")

    cases = [
        {
            "shape": shape,
            "mode": mode,
            "path": path,
            "layers": args.layers,
            "batch": args.batch,
            "prompt_length": args.prompt_length,
            "response_length": args.response_length,
            "chunk_elements": args.chunk_elements,
            "fused": args.fused,
            "steps": args.steps,
            "threads": args.threads,
            "device": args.device if mode == "step" else "cpu",
            "precision": args.precision if mode == "step" else "no",
        }
        for shape in args.shapes.split(",")
        for mode in modes
        for path in args.paths.split(",")
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
        "command": "python benchmarks/bench_head_memory.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loss_chunks": "torch.compile from COMPILE_MIN_ELEMENTS logits" if args.fused else "eager",
        "device": args.device,
        "cuda": torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else None,
        "precision (step mode)": args.precision,
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
