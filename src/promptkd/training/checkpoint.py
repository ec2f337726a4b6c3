"""Crash-safe checkpoints on top of `accelerate.save_state`.

Layout under `<output_dir>/checkpoints/`:

    step-00000100/        a complete checkpoint (accelerate state + trainer_state.json)
    .tmp-step-00000200/   a checkpoint being written (ignored, deleted on the next save)
    latest                text file naming the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place only once every
file is on disk, and `latest` is replaced atomically after that rename, so `latest` never
names a partial checkpoint, whatever moment a crash (or SIGKILL) strikes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(accelerator, checkpoints_dir: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Write a complete checkpoint for `step` (every process must call this)."""
    checkpoints_dir = Path(checkpoints_dir)
    name = f"step-{step:08d}"
    final = checkpoints_dir / name
    tmp = checkpoints_dir / f".tmp-{name}"
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        os.rename(tmp, final)
        _fsync_dir(checkpoints_dir)
        atomic_write_text(checkpoints_dir / LATEST, name + "\n")
        _prune(checkpoints_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _prune(checkpoints_dir: Path, keep_last: int) -> None:
    complete = sorted(p for p in checkpoints_dir.glob("step-*") if (p / TRAINER_STATE).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint named by `latest`, or None when there is none."""
    checkpoints_dir = Path(checkpoints_dir)
    pointer = checkpoints_dir / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints_dir / pointer.read_text(encoding="utf-8").strip()
    if not (path / TRAINER_STATE).is_file():
        return None
    return path


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
