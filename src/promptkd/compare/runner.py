"""Running a study: its prepare stages, then its cells. A cell is (arm, training seed):

1. a SeqKD cell first writes its teacher responses (compare.seqkd), and a FLOPs-budget cell
   plans its steps from finished cells (plan_steps, kept in RUNS/<cell>/budget.json);
2. train through the same path as `promptkd train` (Trainer.from_config), in RUNS/<cell>; a run
   directory with a checkpoint resumes, one with final/ is done;
3. evaluate final/student through the same path as `promptkd eval` (run_evaluation), every
   evaluation seed; complete prediction files are reused, so an interrupted evaluation continues;
4. write RESULTS/cells/<arm>__seed<k>.json atomically (scores, per-prompt ROUGE-L, compute,
   method traces, versions, revision), then delete the run's checkpoints (final/ stays).

A cell whose file exists is done. Integrity: the study's code revision is recorded in
RESULTS/study.json at its first cell; a cell from another revision, or from a tree with
uncommitted changes under src/, is refused unless allow_revision (then its file says so). A
prepare stage is trained once and recorded in RESULTS/prepare/<name>.json with the sha256 of its
output, which every sitting checks.

Under a multi-process launch (torchrun, `accelerate launch`) a sitting runs one cell: every process
trains it (and any prepare stage still to train), as `promptkd train` would under that launch; the
main process alone writes files, generates SeqKD's responses and evaluates (`Processes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from promptkd.compare.config import Arm, CompareConfig, cell_id, parse_cell_id
from promptkd.compare.plan import estimate_seconds
from promptkd.compare.report import GENERATION, cell_flops, read_cells, write_json
from promptkd.errors import TrainingInterrupted, UserError

TRACES = ("prompt/drift", "prompt/kl_to_student", "distillm/student_prob")  # per-step curves kept in a cell


def is_main_process() -> bool:
    """False only on a non-main process of a multi-process launch (WORLD_SIZE > 1, RANK > 0)."""
    return int(os.environ.get("WORLD_SIZE", "1")) == 1 or os.environ.get("RANK") == "0"


def say(message: str) -> None:
    if is_main_process():  # a launch says things once
        print(f"[compare] {message}", flush=True)


class Processes:
    """The processes of this sitting: one, or those of a multi-process launch (torchrun,
    `accelerate launch`; WORLD_SIZE > 1), where every process trains and the main one alone writes,
    generates and evaluates. `wait()` is accelerate's barrier (a no-op for one process)."""

    def __init__(self, cpu: bool = False):
        self.count = int(os.environ.get("WORLD_SIZE", "1"))
        self.state = None
        if self.count > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=cpu)  # the cells' own train.cpu: the trainer's Accelerator shares it
        self.main = self.state is None or self.state.is_main_process

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def runs_dir(cfg: CompareConfig) -> Path:
    from promptkd.models.loading import default_cache_dir

    return Path(cfg.runs).expanduser() if cfg.runs else default_cache_dir() / "compare" / cfg.name


# ----------------------------------------------------------------------------- integrity


def code_revision() -> dict:
    """{"revision": the git commit of promptkd's checkout or "unknown" (e.g. a pip install),
    "source": the git tree of its src/ at that commit (the code's identity: a commit that changes
    only docs or results keeps it), "dirty": uncommitted changes under src/, "promptkd": the version}."""
    import promptkd

    package = Path(promptkd.__file__).resolve().parent
    out = {"revision": "unknown", "source": "unknown", "dirty": False, "promptkd": promptkd.__version__}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "__init__.py") is None:  # not a git checkout of promptkd
        return out
    out["revision"] = git("rev-parse", "HEAD") or "unknown"
    out["source"] = git("rev-parse", "HEAD:../") or "unknown"  # relative to src/promptkd: the src/ tree
    out["dirty"] = bool(git("status", "--porcelain", "--", str(package.parent)))
    return out


def check_revision(cfg: CompareConfig, allow: bool) -> tuple[str, bool]:
    """(this code's revision, whether it departs from the study's: RESULTS/study.json, written
    here at the first cell). Raises UserError for a departure unless `allow`."""
    here = code_revision()
    study_file = Path(cfg.results) / "study.json"
    study = json.loads(study_file.read_text(encoding="utf-8")) if study_file.is_file() else None
    recorded = study or {"revision": here["revision"], "source": here["source"], "promptkd": here["promptkd"]}
    key = "source" if "source" in recorded else "revision"  # study files from before "source" compare commits
    problem = None
    if (recorded[key], recorded["promptkd"]) != (here[key], here["promptkd"]):
        problem = (f"the study runs on revision {recorded['revision']} (promptkd {recorded['promptkd']}, "
                   f"{study_file}) but this code is revision {here['revision']} (promptkd {here['promptkd']})")
    elif here["dirty"]:
        problem = (f"this code is revision {here['revision']} with uncommitted changes under src/, and the study "
                   f"runs on revision {recorded['revision']} as committed")
    if problem and not allow:
        fix = ": check out the study's revision with a clean src/, or pass {} to run the cell anyway (the report marks it)"
        raise UserError(problem + fix.format("allow_revision=True"), cli=problem + fix.format("--allow-revision"))
    if study is None:
        write_json(study_file, {**recorded, "config_hash": cfg.config_hash()})
    if problem:
        say(f"warning: {problem}; the cell is marked in the report")
    return here["revision"] + (" with uncommitted changes under src/" if here["dirty"] else ""), problem is not None


# ----------------------------------------------------------------------------- prepare stages


def prepare(cfg: CompareConfig, *, revision: str, show_progress: bool = True, procs: Processes | None = None) -> None:
    """Train the prepare stages that have no record in RESULTS/prepare/NAME.json yet, in order
    (RUNS/prepare/NAME, resumable, through Trainer.from_config), and record each one. A recorded
    stage whose output is gone (a new machine, a cleaned disk) is trained again, resumably, and must
    give the recorded output. Raises UserError when a recorded stage's output is not the one
    recorded (its sha256), or when a stage has no record but cells exist: every cell must start
    from the same outputs."""
    from promptkd.options import read_yaml
    from promptkd.precision import machine_description

    procs = procs or Processes()
    for name in cfg.prepare:
        run_dir, record = runs_dir(cfg) / "prepare" / name, Path(cfg.results) / "prepare" / f"{name}.json"
        redo = (f"to redo the stage, delete {record}, {run_dir}, every cell file in {Path(cfg.results) / 'cells'} and "
                f"every cell's run directory in {runs_dir(cfg)} (their cells trained from the old output)")
        if record.is_file():
            recorded = json.loads(record.read_text(encoding="utf-8"))
            again = not (run_dir / "final").is_dir()
            procs.wait()  # every process has looked before one writes it
            if again:
                changed = _stage_changes(cfg, name, run_dir, recorded.get("train_config"))
                if changed:  # it cannot give the recorded output: say so before hours of training
                    raise UserError(f"prepare stage {name!r}: {run_dir} has no output, and the stage's config is not the "
                                    f"one recorded in {record} ({'; '.join(changed)}), so training it again would not "
                                    f"give the recorded output; restore the stage's config in {cfg.source}, or {redo}")
                say(f"prepare stage {name}: {run_dir} has no output; training it again, to be checked against {record}")
                _train_stage(cfg, name, run_dir, procs, show_progress)
            found = output_hash(run_dir)
            if again:  # the retrain's optimizer states go; a wrong output is set aside
                if procs.main:
                    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                    if found != recorded["sha256"]:
                        shutil.rmtree(run_dir / "final-mismatch", ignore_errors=True)
                        (run_dir / "final").rename(run_dir / "final-mismatch")
                procs.wait()
            if found == recorded["sha256"]:
                continue
            if again:  # training repeats on one machine, not always on another (emulated bf16 rounds otherwise)
                raise UserError(
                    f"prepare stage {name!r}: trained again on this machine ({machine_description()}, revision "
                    f"{revision}), it gave {f'sha256 {found[:16]}...' if found else 'no weights'} (kept in "
                    f"{run_dir / 'final-mismatch'}), not the {recorded['sha256'][:16]}... recorded in {record} (trained "
                    f"on {recorded.get('machine', 'a machine not recorded')}, revision {recorded.get('revision')}); "
                    f"finish the study on a machine like that one, or {redo}")
            raise UserError(f"prepare stage {name!r}: {run_dir / 'final' / 'student'} is not the output recorded in "
                            f"{record} (sha256 {recorded['sha256'][:16]}...), from which the cells train; restore it, or {redo}")
        if read_cells(Path(cfg.results)):
            raise UserError(f"prepare stage {name!r} has no record ({record}) but cells exist, trained from an "
                            f"output that cannot be checked; restore the record, or {redo}")
        if not (run_dir / "final").is_dir():
            say(f"prepare stage {name}: training in {run_dir}")
            _train_stage(cfg, name, run_dir, procs, show_progress)
        if not procs.main:
            procs.wait()  # for the main process's record
            continue
        records = _read_metrics(run_dir / "metrics.jsonl")
        times = json.loads((run_dir / "times.json").read_text(encoding="utf-8"))
        write_json(record, {"name": name, "revision": revision, "finished": _now(),
                            "seconds": round(times.get("train", 0.0), 1), "machine": machine_description(),
                            "compute": {k: v for k, v in records[-1].items() if k.startswith("compute/")},
                            "sha256": output_hash(run_dir), "train_config": read_yaml(run_dir / "config.yaml")})
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        say(f"prepare stage {name}: recorded in {record}")
        procs.wait()


def _stage_changes(cfg: CompareConfig, name: str, run_dir: Path, recorded: dict | None) -> list[str]:
    """'key: recorded -> now' for each resolved config key of stage `name` whose value differs from its
    record's train_config. Keys only one side has (another revision's) are the revision check's business."""
    from promptkd.compare.report import flat
    from promptkd.config import fit_warmup, load_config

    if recorded is None:
        return []
    resolved, _ = fit_warmup(load_config(None, cfg.stage_config(name, run_dir), check_required=False))  # as the Trainer saves it
    now = flat(json.loads(json.dumps(resolved.to_dict())))
    before = flat(recorded)
    return [f"{key}: {before[key]!r} -> {now[key]!r}" for key in sorted(set(now) & set(before))
            if now[key] != before[key]]


def _train_stage(cfg: CompareConfig, name: str, run_dir: Path, procs: Processes, show_progress: bool) -> None:
    """Train prepare stage `name` in run_dir, resuming from its checkpoint if it has one."""
    from promptkd.training.checkpoint import latest_checkpoint
    from promptkd.training.loop import Trainer

    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    with _timed(run_dir, "train", procs.main):
        Trainer.from_config(cfg.stage_config(name, run_dir), resume=resume, overwrite=not resume,
                            show_progress=show_progress).train()
    procs.wait()


def output_hash(run_dir: Path) -> str | None:
    """sha256 of RUN/final/student's weights (its *.safetensors files in name order: model.safetensors's
    own hash when there is one file); None when there are none."""
    files = sorted((run_dir / "final" / "student").glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- one cell


@contextlib.contextmanager
def _timed(run_dir: Path, stage: str, write: bool = True):
    """Adds the block's wall seconds to RUN/times.json[stage] (over every sitting), even when it
    raises; `write` False (a process other than the main one) only runs the block."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        if write:
            _add_to_json(run_dir / "times.json", {stage: time.monotonic() - t0})


def _add_to_json(path: Path, values: dict) -> None:
    """Adds `values` to the numbers of the JSON object in `path` (created when missing)."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    write_json(path, {**data, **{k: data.get(k, 0.0) + v for k, v in values.items()}})


@contextlib.contextmanager
def _sigterm_stops():
    """SIGTERM inside raises TrainingInterrupted at once (as Ctrl-C raises KeyboardInterrupt), so
    the block's finally clauses save what it did; for steps that resume on their own (generation)."""
    def stop(signum, frame):
        raise TrainingInterrupted("stopped by SIGTERM", signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def eval_config(cfg: CompareConfig, model: Path, out: Path, train_config: dict):
    """The cell's `promptkd eval` config: the protocol, with the study's sets, seeds, response cap,
    limit and batch size, and the template and precision (train.mixed_precision) the student was
    trained with."""
    from promptkd.config import EvalConfig

    e = cfg.evaluation
    return EvalConfig(model=str(model), out=str(out), datasets=list(e.sets().values()), seeds=list(e.seeds),
                      limit=e.limit or None, batch_size=e.batch_size, template=train_config["data"]["template"],
                      mixed_precision=train_config["train"]["mixed_precision"],
                      sampling=dataclasses.replace(EvalConfig().sampling, max_new_tokens=e.max_new_tokens))


def _exposure_bias(cfg: CompareConfig, model: Path, train_config: dict, run_dir: Path) -> dict:
    """ExAccErr(l) of the cell's student against its teacher through `promptkd exposure-bias`, on
    the first evaluation set's first prompts, sampled with the first evaluation seed in the cell's
    train.mixed_precision (reused when its file is complete)."""
    from promptkd.config import ExposureBiasConfig
    from promptkd.evaluation.exposure_bias import run_exposure_bias

    e = cfg.evaluation
    out = run_dir / "exposure_bias"
    if not (out / "exposure_bias.json").is_file():
        job = ExposureBiasConfig(
            student=str(model), teacher=str(train_config["model"]["teacher"]), out=str(out),
            data=next(iter(e.sets().values())), num_prompts=e.exposure_bias_prompts,
            samples_per_prompt=e.exposure_bias_samples, seed=e.seeds[0], batch_size=e.batch_size,
            template=train_config["data"]["template"], dtype=train_config["model"].get("dtype", "float32"),
            mixed_precision=train_config["train"]["mixed_precision"],
            sampling=dataclasses.replace(ExposureBiasConfig().sampling, max_new_tokens=e.max_new_tokens))
        with _timed(run_dir, "exposure_bias"):
            run_exposure_bias(job)
    curve = json.loads((out / "exposure_bias.json").read_text(encoding="utf-8"))["curves"]["student"]
    return {"prompts": e.exposure_bias_prompts, "samples": e.exposure_bias_samples,
            "exaccerr": [round(v, 3) if isinstance(v, (int, float)) else v for v in curve["exaccerr"]]}


def run_cell(cfg: CompareConfig, arm: Arm, seed: int, *, revision: str, revision_mismatch: bool = False,
             show_progress: bool = True, procs: Processes | None = None) -> dict | None:
    """Train, evaluate and write one cell's file; returns its content (None on a process other
    than the main one of a multi-process launch, which only trains). revision: the code's, as
    check_revision saw it when the sitting's code was loaded."""
    import torch
    import transformers

    import promptkd
    from promptkd.compare.seqkd import generate_teacher_responses
    from promptkd.config import Config
    from promptkd.data.eval_sets import eval_set_name
    from promptkd.evaluation.runner import deviations, run_evaluation
    from promptkd.metric import rouge_l
    from promptkd.options import read_yaml
    from promptkd.precision import machine_description
    from promptkd.training.checkpoint import latest_checkpoint
    from promptkd.training.loop import Trainer

    procs = procs or Processes()
    started = _now()
    run_dir = runs_dir(cfg) / cell_id(arm.name, seed)
    budget = None
    if arm.budget.flops_of:  # planned once, at the cell's first start: a resumed cell keeps its steps
        if procs.main and not (run_dir / "budget.json").is_file():
            write_json(run_dir / "budget.json", plan_steps(cfg, arm, seed, read_cells(Path(cfg.results))))
        procs.wait()
        budget = json.loads((run_dir / "budget.json").read_text(encoding="utf-8"))
    cell_config = cfg.resolve(cfg.cell_config(arm, seed, run_dir, max_steps=budget and budget["max_steps"]),
                              runs_dir(cfg))
    if not (run_dir / "final").is_dir():
        if arm.method == "seqkd" and procs.main:  # first its training data: the teacher's responses (compare.seqkd)
            counts: dict = {}
            try:
                with _sigterm_stops(), _timed(run_dir, "generation"):
                    generate_teacher_responses(Config.from_dict(cell_config), run_dir, counts, show_progress)
            finally:
                _add_to_json(run_dir / "generation.json", counts)
        procs.wait()  # every process trains on the same state of the run directory
        resume = latest_checkpoint(run_dir / "checkpoints") is not None
        with _timed(run_dir, "train", procs.main):
            trainer = Trainer.from_config(cell_config, resume=resume, overwrite=not resume, show_progress=show_progress)
            trainer.train()
        processes = trainer.accelerator.num_processes  # the processes that trained it (this sitting)
    else:
        processes = procs.count
    if not procs.main:  # the main process evaluates and writes the cell
        return None
    train_config = read_yaml(run_dir / "config.yaml")
    model = run_dir / "final" / "student"
    if not model.is_dir():  # a LoRA run without merge exports only its adapter
        model = run_dir / "final" / "student_adapter"
    job = eval_config(cfg, model, run_dir / "eval", train_config)
    with _timed(run_dir, "eval"):
        run_evaluation(job, show_progress=show_progress)
    exposure = None
    if cfg.evaluation.exposure_bias_prompts and train_config["model"].get("teacher"):
        exposure = _exposure_bias(cfg, model, train_config, run_dir)

    sets = {}
    for name, dataset in cfg.evaluation.sets().items():
        per_seed, per_prompt = {}, []
        for eval_seed in job.seeds:
            path = run_dir / "eval" / f"predictions_{eval_set_name(dataset)}_seed{eval_seed}.jsonl"
            rows = [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]
            scores = [rouge_l(r["prediction"], r["references"]) for r in rows]
            per_seed[str(eval_seed)] = round(statistics.fmean(scores), 6)
            per_prompt.append(scores)
        sets[name] = {"mean": round(statistics.fmean(per_seed.values()), 6), "per_seed": per_seed,
                      "per_prompt": [round(statistics.fmean(s), 4) for s in zip(*per_prompt, strict=True)]}
    records = _read_metrics(run_dir / "metrics.jsonl")
    times = json.loads((run_dir / "times.json").read_text(encoding="utf-8"))
    compute = {k: v for k, v in (records[-1] if records else {}).items() if k.startswith("compute/")}
    seconds = {k: round(times.get(k, 0.0), 1) for k in ("train", "eval", "exposure_bias") if k in times}
    generation = run_dir / "generation.json"
    if generation.is_file():  # a SeqKD cell's teacher generation, counted apart from its training
        compute.update({f"{GENERATION}{k}": v for k, v in json.loads(generation.read_text(encoding="utf-8")).items()})
        seconds["generation"] = round(times.get("generation", 0.0), 1)
    cell = {
        "arm": arm.name, "seed": seed, "method": arm.method, "overrides": arm.overrides,
        "cell_hash": cfg.cell_hash(arm, seed), "train_config": train_config,
        "revision": revision, "revision_mismatch": revision_mismatch,
        "versions": {"promptkd": promptkd.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "host": platform.node(), "machine": machine_description(), "processes": processes, "started": started, "finished": _now(),
        "seconds": seconds,
        "eval_deviations": deviations(job, cfg.evaluation.sets()),
        "score": round(statistics.fmean(s["mean"] for s in sets.values()), 6),
        "sets": sets,
        "dev_loss": next((r["dev/loss"] for r in reversed(records) if "dev/loss" in r), None),
        "trained_tokens": sum(r.get("trained_tokens", 0) for r in records),
        "generated_tokens": sum(r.get("generated_tokens", 0) for r in records),
        "compute": compute,
        "traces": _traces(records),
    }
    if exposure:
        cell["exposure_bias"] = exposure
    if budget:
        cell["budget"] = {**budget, "flops": cell_flops(cell)}
    write_json(Path(cfg.results) / "cells" / f"{cell_id(arm.name, seed)}.json", cell)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimizer states; final/ stays
    return cell


def plan_steps(cfg: CompareConfig, arm: Arm, seed: int, cells: dict[str, dict]) -> dict:
    """The steps of a FLOPs-budget cell: round(F_ref / f), F_ref the FLOPs of the cell
    (budget.flops_of, seed) and f those of (budget.per_step_from, seed) per step. Raises UserError
    when a cell is missing or has no FLOPs."""
    b = arm.budget
    missing = [c for c in cfg.needs(arm, seed) if c not in cells or cell_flops(cells[c]) is None]
    if missing:
        raise UserError(f"{cell_id(arm.name, seed)}: its FLOPs budget is planned from cell(s) {', '.join(missing)}, "
                        "which have no file or no compute/flops: run them first")
    reference, per_step = cells[cell_id(b.flops_of, seed)], cells[cell_id(b.per_step_from, seed)]
    flops_per_step = cell_flops(per_step) / per_step["train_config"]["train"]["max_steps"]
    return {"flops_of": b.flops_of, "reference_flops": cell_flops(reference), "per_step_from": b.per_step_from,
            "flops_per_step": flops_per_step, "max_steps": max(1, round(cell_flops(reference) / flops_per_step))}


def _traces(records: list[dict]) -> dict:
    """Method traces (part of what a method did, per logged step): PromptKD's prompt distances,
    DistiLLM's student-data probability phi and how many steps took each data source."""
    from promptkd.methods.distillm import SOURCES

    out = {key: [[r["step"], float(f"{r[key]:.5g}")] for r in records if isinstance(r.get(key), (int, float))]
           for key in TRACES}
    out = {k: v for k, v in out.items() if v}
    sources = [int(r["distillm/source"]) for r in records if "distillm/source" in r]
    if sources:
        out["distillm/source_steps"] = {name: sources.count(i) for i, name in enumerate(SOURCES)}
    return out


def _read_metrics(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- a sitting


def run_study(cfg: CompareConfig, *, cells: list[str] | None = None, max_minutes: float | None = None,
              workers: int = 1, allow_revision: bool = False, show_progress: bool = True) -> list[str]:
    """Run the pending cells (those without a file) in seed-major order (`CompareConfig.order`), so
    a partial study stays balanced; returns the ids of the cells finished in this sitting. A
    FLOPs-budget cell waits for the cells it is planned from, and is skipped when they do not run.

    cells: ids (ARM__seedK) to run, a subset; max_minutes: do not start a cell whose estimate
    (compare.plan.estimate_seconds) would end past this many minutes from now;
    workers: cells at once, each in a `promptkd compare --cells ONE` process with
    cores // workers torch threads (1 = in this process).
    Raises UserError for an unknown cell or a refused revision; TrainingInterrupted when a signal
    stopped a cell (its checkpoints stay, and the next sitting resumes it).
    """
    arms = {a.name: a for a in cfg.arm_list()}
    order = cfg.order()
    chosen = order
    if cells is not None:
        unknown = [c for c in cells if c not in order]
        for c in unknown:
            parse_cell_id(c)  # a malformed id says how to write one
        if unknown:
            raise UserError(f"unknown cell(s) {', '.join(unknown)}; this study's cells: {', '.join(order)}")
        chosen = [c for c in order if c in cells]
    done = read_cells(Path(cfg.results))
    pending = [c for c in chosen if c not in done]
    if not pending:
        say(f"nothing to run: all {len(chosen)} chosen cells have their files in {Path(cfg.results) / 'cells'}")
        return []
    arm, seed = parse_cell_id(pending[0])  # the accelerate state of a launch must be the trainer's: its train.cpu
    procs = Processes(cpu=bool(cfg.cell_config(arms[arm], seed, runs_dir(cfg))["train"].get("cpu", False)))
    if procs.count > 1 and (workers > 1 or len(pending) > 1):
        raise UserError(f"under a multi-process launch ({procs.count} processes) a sitting runs one cell, which every "
                        f"process trains: give --cells with one of {', '.join(pending)} and --workers 1")
    if not procs.main:
        procs.wait()  # the main process writes study.json first
    revision, mismatch = check_revision(cfg, allow_revision)
    if procs.main:
        procs.wait()
    say(f"{len(pending)} cell(s) to run of {len(order)}; {len(done)} done; runs in {runs_dir(cfg)}")
    t0 = time.monotonic()
    try:
        prepare(cfg, revision=revision, show_progress=show_progress, procs=procs)
    except TrainingInterrupted as e:
        raise _interrupted("a prepare stage", cfg, e.signum) from None

    def may_start(cell: str, started: int) -> bool:
        estimate, _ = estimate_seconds(cfg, cell, read_cells(Path(cfg.results)))
        elapsed = (time.monotonic() - t0) / 60
        if max_minutes is not None and elapsed + estimate / 60 > max_minutes:
            say(f"{cell}: not started, it would not end within --max-minutes {max_minutes:g} (elapsed "
                f"{elapsed:.1f} min, estimate {_minutes(estimate)}); {len(pending) - started} cell(s) left for "
                "the next sitting")
            return False
        say(f"{cell}: starting ({started + 1}/{len(pending)}, elapsed {elapsed:.1f} min, estimate {_minutes(estimate)})")
        return True

    def next_ready(queue: list[str], running) -> str | None:
        """The first queued cell whose FLOPs budget can be planned; a cell whose cells to plan
        from are neither done nor queued nor running is dropped (said), one that waits for them stays."""
        done = read_cells(Path(cfg.results))
        for cell in list(queue):
            arm, seed = parse_cell_id(cell)
            missing = [c for c in cfg.needs(arms[arm], seed) if c not in done]
            if not missing:
                return cell
            if not any(c in queue or c in running for c in missing):
                queue.remove(cell)
                say(f"{cell}: skipped, its FLOPs budget is planned from cell(s) {', '.join(missing)}, which are not "
                    "done and not run in this sitting")
        return None

    if workers > 1:
        return _run_workers(cfg, pending, workers, allow_revision, may_start, next_ready)
    queue, finished = list(pending), []
    while (cell := next_ready(queue, ())) is not None:
        if not may_start(cell, len(finished)):
            break
        queue.remove(cell)
        arm, seed = parse_cell_id(cell)
        t = time.monotonic()
        try:
            run_cell(cfg, arms[arm], seed, revision=revision, revision_mismatch=mismatch, show_progress=show_progress,
                     procs=procs)
        except TrainingInterrupted as e:
            raise _interrupted(cell, cfg, e.signum) from None
        finished.append(cell)
        say(f"{cell}: done in {(time.monotonic() - t) / 60:.1f} min")
    return finished


def _run_workers(cfg: CompareConfig, pending: list[str], workers: int, allow_revision: bool, may_start,
                 next_ready) -> list[str]:
    """Up to `workers` cells at once, each a `promptkd compare --cells ONE` process (its own
    session: on Ctrl-C or SIGTERM here, each gets one SIGTERM, checkpoints and stops)."""
    if cfg.source is None:
        raise UserError("workers > 1 runs cells from the study's YAML file: load the config with load_compare_config")
    from promptkd.precision import available_cpus

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, available_cpus() // workers))}
    queue, running, finished, failed = list(pending), {}, [], []
    stop = False  # no more starts: the budget, or a failed cell
    received = [signal.SIGINT]

    def on_sigterm(signum, frame):  # SIGTERM here stops the workers as Ctrl-C does
        received[0] = signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while running or (queue and not stop):
            while queue and not stop and len(running) < workers:
                cell = next_ready(queue, running)
                if cell is None:  # every queued cell waits for a running one
                    break
                if failed or not may_start(cell, len(finished) + len(running)):
                    stop = True
                    break
                queue.remove(cell)
                log = runs_dir(cfg) / cell / "compare.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-m", "promptkd.cli", "compare", "--config", str(cfg.source), "--cells", cell,
                       "--no-report", "--no-progress"] + (["--allow-revision"] if allow_revision else [])
                with open(log, "a", encoding="utf-8") as f:
                    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                running[cell] = (proc, time.monotonic(), log)
            time.sleep(1.0)
            for cell, (proc, t, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[cell]
                if proc.returncode == 0:
                    finished.append(cell)
                    say(f"{cell}: done in {(time.monotonic() - t) / 60:.1f} min")
                else:
                    failed.append(cell)
                    last = (log.read_text(encoding="utf-8", errors="replace").strip().splitlines() or [""])[-1]
                    say(f"{cell}: failed (exit {proc.returncode}): {last} (log: {log})")
    except KeyboardInterrupt:
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in running.values():
            proc.wait()
        raise _interrupted(", ".join(running), cfg, received[0]) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        raise UserError(f"cell(s) {', '.join(failed)} failed; their logs are {runs_dir(cfg)}/<cell>/compare.log")
    return finished


def _interrupted(cells: str, cfg: CompareConfig, signum: int) -> TrainingInterrupted:
    return TrainingInterrupted(f"{cells}: stopped by {signal.Signals(signum).name}; a training cell keeps its "
                               f"checkpoint in {runs_dir(cfg)}: run the same promptkd compare command to resume it",
                               signum)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"
