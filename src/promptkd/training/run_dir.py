"""The run directory (`train.output_dir`): what a run writes there, how `overwrite` clears it,
how `resume` continues it, and the exported students.

    config.yaml       the resolved config (a new run writes it; a resumed one keeps it)
    precision.json    the precision the run chose, its device, and N of the FLOPs estimate
    metrics.jsonl     one JSON record per logged step
    checkpoints/      resumable checkpoints (`promptkd.training.checkpoint`)
    best/, final/     exported students: the best dev evaluation and the last step
    promptkd/         TensorBoard logs (train.trackers)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import torch

from promptkd.errors import NonFiniteError, TrainingInterrupted, UserError
from promptkd.models.lora import is_lora_model, save_lora_student
from promptkd.models.sharding import full_state_dict, is_sharded
from promptkd.training.checkpoint import latest_checkpoint, load_trainer_state
from promptkd.training.compute import Compute

logger = logging.getLogger(__name__)

# What a run writes into train.output_dir; overwrite removes these and nothing else.
RUN_ARTEFACTS = ("config.yaml", "precision.json", "metrics.jsonl", "checkpoints", "final", "final.tmp", "best", "best.tmp")
# accelerate's TensorBoard tracker logs under <output_dir>/<project name> (init_trackers below).
TRACKER_DIR = "promptkd"
TRACKER_FILES = ("events.out.tfevents.*", "hparams.yml")


def _worded(text: str, run: Path, **values) -> dict[str, str]:
    """`message` and `cli` of an error whose fix is a Trainer argument in Python and a flag on the
    command line: `text` names it with {resume}, {overwrite}, {own_config} or {continue_run}."""
    python = {"resume": "resume=True", "overwrite": "overwrite=True",
              "own_config": f"the run's own config ({run / 'config.yaml'})",
              "continue_run": "resume=True (the same config and train.output_dir)"}
    cli = {"resume": "--resume", "overwrite": "--overwrite", "own_config": "the run's own config (omit --config)",
           "continue_run": f"promptkd train --resume {run}"}
    return {"message": text.format(run=run, **python, **values), "cli": text.format(run=run, **cli, **values)}


def stopped_nonfinite(output_dir: Path, reason: str, step: int) -> NonFiniteError:
    """The error of a run that stopped on a non-finite update, with its checkpoint at `step`."""
    return NonFiniteError(**_worded(
        "{reason}; the update was skipped and training stopped with a checkpoint at step {step} in "
        "{run}/checkpoints: lower train.learning_rate, try train.mixed_precision no or set "
        "train.nonfinite skip, then continue with {continue_run}", output_dir, reason=reason, step=step))


def interrupted(output_dir: Path, signum: int, step: int, max_steps: int) -> TrainingInterrupted:
    """The error of a run that a signal stopped after `step`, with its checkpoint at that step."""
    return TrainingInterrupted(**_worded(
        "{name} received: stopped after step {step} of {max_steps}, checkpoint written to {ckpt}; "
        "continue with: {continue_run}", output_dir, name=signal.Signals(signum).name, step=step,
        max_steps=max_steps, ckpt=output_dir / "checkpoints" / f"step-{step:08d}"), signum=signum)


# ---------------------------------------------------------------------- a new run


def check_output_dir(accelerator, output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """A new run refuses a directory that holds one, unless `overwrite` (then its files go).

    Raises:
        UserError: `output_dir` holds a run and neither `resume` nor `overwrite` is set.
    """
    if resume:
        return
    exists = (output_dir / "config.yaml").exists() or (output_dir / "checkpoints").exists()
    # every process looks before the main one deletes: a process that looked afterwards
    # would skip the barrier below and desynchronise the collectives that follow
    accelerator.wait_for_everyone()
    if exists:
        if not overwrite:
            raise UserError(**_worded(
                "output directory {run} already holds a run; pass {resume} to continue it or {overwrite} "
                "to replace it", output_dir))
        if accelerator.is_main_process:
            remove_run_artefacts(output_dir)
        accelerator.wait_for_everyone()


def remove_run_artefacts(output_dir: Path) -> None:
    """overwrite: delete the previous run's files only; anything else in the directory stays."""
    for name in RUN_ARTEFACTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    tracker = output_dir / TRACKER_DIR
    if tracker.is_dir() and not tracker.is_symlink():
        files = [f for f in tracker.rglob("*") if not f.is_dir()]
        if all(any(f.match(pat) for pat in TRACKER_FILES) for f in files):
            shutil.rmtree(tracker)
        else:
            logger.warning("overwrite: kept %s (it holds files other than tracker logs)", tracker)


def start_new_run(output_dir: Path, cfg) -> None:
    """A new run's config.yaml (the resolved config) and its empty metrics.jsonl."""
    cfg.save(output_dir / "config.yaml")
    (output_dir / "metrics.jsonl").write_text("", encoding="utf-8")


def write_precision(output_dir: Path, precision, device, matmul_params: dict[str, int]) -> None:
    """precision.json: the run's resolved precision (`promptkd.precision`), its device, and N of the
    student and the teacher in the FLOPs estimate (`promptkd.training.compute.matmul_params`)."""
    record = {**precision.as_record(), "device": str(device), "matmul_params": matmul_params}
    (output_dir / "precision.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def init_trackers(accelerator, cfg) -> None:
    """train.trackers (TensorBoard, ...): logs under <output_dir>/promptkd, the config as flat hparams."""
    accelerator.init_trackers(TRACKER_DIR, config=_flatten(cfg.to_dict()))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------- resume


def metrics_offset(metrics_path: Path) -> int:
    """The size of metrics.jsonl once flushed to disk: the records a checkpoint vouches for."""
    if not metrics_path.exists():
        return 0
    with open(metrics_path, "ab") as f:
        os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_size


def rng_fingerprint() -> str:
    """A short hash of the python, numpy and torch RNG states (checks a resume restored them)."""
    import random

    import numpy as np

    h = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    h.update(repr(random.getstate()).encode())
    h.update(np.random.get_state()[1].tobytes())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for state in torch.cuda.get_rng_state_all():
            h.update(state.numpy().tobytes())
    return h.hexdigest()[:16]


def restore(accelerator, output_dir: Path, method: str) -> tuple[Path, dict]:
    """resume: load the latest complete checkpoint into the objects `accelerator` prepared and
    registered, and drop the metrics records logged after it.

    Returns:
        (the checkpoint, its trainer state: step, data_position, nonfinite_skips, overflows,
        best_metric, best_step, ...).

    Raises:
        UserError: no complete checkpoint, a run of another method, or a checkpoint that does
            not fit this configuration.
    """
    ckpt = latest_checkpoint(output_dir / "checkpoints")
    if ckpt is None:
        raise UserError(**_worded(
            "{resume}: no complete checkpoint under {run}/checkpoints (set train.save_every so runs write "
            "checkpoints, or start without {resume})", output_dir))
    saved_cfg = output_dir / "config.yaml"
    saved_method = (_read_yaml_mapping(saved_cfg) or {}).get("method") if saved_cfg.is_file() else None
    if saved_method not in (None, method):
        raise UserError(**_worded(
            "{resume}: {run} holds a '{saved}' run but the config says method '{method}'; resume with "
            "{own_config} or use another train.output_dir", output_dir, saved=saved_method, method=method))
    try:
        accelerator.load_state(str(ckpt))
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. another student architecture
        detail = " ".join(str(e).split())  # one line
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise UserError(**_worded(
            "{resume}: checkpoint {ckpt} does not fit this configuration ({detail}); resume with "
            "{own_config} or use another train.output_dir", output_dir, ckpt=ckpt,
            detail=f"{type(e).__name__}: {detail}")) from e
    state = load_trainer_state(ckpt)
    if accelerator.is_main_process:
        # accelerate ignores an unreadable RNG file silently; an inexact resume should not be
        if state.get("rng_fingerprint") not in (None, rng_fingerprint()):
            logger.warning("random-number generator states were not restored from %s: the resumed run "
                           "will not reproduce an uninterrupted one exactly", ckpt)
        metrics_path = output_dir / "metrics.jsonl"
        if metrics_path.exists():
            offset = state["metrics_offset"]
            with open(metrics_path, "r+b") as f:  # drop records logged after the checkpoint
                size = os.fstat(f.fileno()).st_size
                if size >= offset:
                    f.truncate(offset)
                else:  # truncate() would pad with NUL bytes
                    logger.warning(
                        "%s is shorter (%d bytes) than when %s was written (%d bytes): records were lost",
                        metrics_path, size, ckpt, offset,
                    )
    return ckpt, state


def trainer_state(trainer) -> dict:
    """What a checkpoint keeps of a `Trainer` besides the objects accelerate saves: its step, data
    position, skipped updates, best evaluation, compute counts and the metrics.jsonl size."""
    return {
        "step": trainer.step,
        "data_position": trainer.data_order.position,
        "metrics_offset": metrics_offset(trainer.metrics_path) if trainer.accelerator.is_main_process else 0,
        "nonfinite_skips": trainer.guard.nonfinite_skips,
        "overflows": trainer.guard.overflows,
        "best_metric": trainer.best_metric,
        "best_step": trainer.best_step,
        "compute": dataclasses.asdict(trainer.compute),
        "world_size": trainer.accelerator.num_processes,
        "rng_fingerprint": rng_fingerprint(),
    }


def resume_trainer(trainer) -> None:
    """resume: `restore` the latest checkpoint and give `trainer` back its `trainer_state`."""
    ckpt, state = restore(trainer.accelerator, trainer.output_dir, trainer.cfg.method)
    trainer.step = trainer.ctx.step = state["step"]
    trainer.data_order.position = state["data_position"]
    trainer.guard.nonfinite_skips = state["nonfinite_skips"]
    trainer.guard.overflows = dict(state.get("overflows", {}))
    trainer.best_metric, trainer.best_step = state["best_metric"], state["best_step"]
    trainer.compute = Compute(**state.get("compute", {}))  # absent in older checkpoints: counted from here
    logger.info("resumed from %s at step %d", ckpt, trainer.step)


def _read_yaml_mapping(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------- exported students


def export_student(accelerator, student, tokenizer, method, out_dir: Path, *, merge_lora: bool) -> None:
    """The student in save_pretrained format (+ tokenizer) and the method's artefacts in `out_dir`,
    written beside it and renamed into place. Every process calls it.

    A LoRA student exports its adapter (student_adapter/) and, with `merge_lora`, the merged model
    (student/)."""
    accelerator.wait_for_everyone()
    # every process takes part: a collective under FSDP / ZeRO-3 (full weights on the main one)
    state_dict = full_state_dict(student) if is_sharded(student) else accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(student)
        if is_lora_model(unwrapped):
            save_lora_student(unwrapped, tokenizer, tmp, state_dict=state_dict, merge=merge_lora)
        else:
            unwrapped.save_pretrained(tmp / "student", state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp / "student")
        method.export(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    accelerator.wait_for_everyone()
