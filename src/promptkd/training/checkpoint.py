"""Crash-safe checkpoints on top of `accelerate.save_state`.

Layout under `<output_dir>/checkpoints/`:

    step-00000100/        a complete checkpoint (accelerate state + trainer_state.json)
    .tmp-step-00000200/   a checkpoint being written (ignored, deleted on the next save)
    .old-step-00000200/   the previous copy of a step being re-saved (deleted once replaced)
    .del-step-00000050/   a pruned checkpoint being deleted
    latest                text file naming the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place only once every
file is on disk, and `latest` is replaced atomically after that rename, so `latest` never
names a partial checkpoint, whatever moment a crash (or SIGKILL) strikes. Every `step-*`
directory is complete by construction (trainer_state.json is written before the rename), so
when `latest` is missing or names a directory that is gone, `latest_checkpoint` falls back
to the set-aside copy of that step or to the newest `step-*` directory.

Test hook: with the environment variable PROMPTKD_TEST_KILL_AT=<phase>:<step> the process
SIGKILLs itself at that point of the checkpoint of that step (tests/test_kill_resume.py).
Phases, in order: `state-written` (accelerate state in the tmp dir, no trainer_state.json
yet), `tmp-complete` (tmp dir complete, not renamed), `set-aside` (re-saves only: the old copy
renamed away, the new one not yet in place), `renamed` (renamed, `latest` not yet updated),
`saved` (everything done). The hook does nothing unless the variable is set.
"""

from __future__ import annotations

import ast
import contextlib
import filecmp
import json
import logging
import os
import shutil
import signal
import stat
from pathlib import Path

from promptkd.models.sharding import reshard

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
KILL_ENV = "PROMPTKD_TEST_KILL_AT"


def _test_kill_point(phase: str, step: int) -> None:
    """SIGKILL this process here when PROMPTKD_TEST_KILL_AT == f"{phase}:{step}" (tests only)."""
    if os.environ.get(KILL_ENV) == f"{phase}:{step}":
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


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


class _TiedWeightRemovalFilter(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving" when every removed name is a
    tied weight of the saved models (e.g. an LM head tied to the input embeddings): safetensors
    stores one copy and `from_pretrained` / `load_state` re-tie it. Any other removal still warns."""

    def __init__(self, tied_names: set[str]):
        super().__init__()
        self.tied_names = tied_names

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()  # accelerate may prefix "[RANK n] "
        head = "Removed shared tensor "
        start = message.find(head)
        if start < 0:
            return True
        try:
            names = ast.literal_eval(message[start + len(head) : message.index(" while saving")])
        except (ValueError, SyntaxError):
            return True
        return not (isinstance(names, set) and names <= self.tied_names)


def tied_parameter_names(model) -> set[str]:
    """Names of parameters that share their storage with another parameter of `model`."""
    by_storage: dict = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault((param.untyped_storage().data_ptr(), param.device), []).append(name)
    return {name for names in by_storage.values() if len(names) > 1 for name in names}


@contextlib.contextmanager
def _quiet_tied_weight_removal(models):
    tied = set()
    for model in models:
        tied |= tied_parameter_names(model)
        tied |= {n.removeprefix("module.") for n in tied_parameter_names(model)}  # DDP's prefix
    target = logging.getLogger("accelerate.utils.other")
    quiet = _TiedWeightRemovalFilter(tied)
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


class MethodState:
    """Adapter so accelerate's checkpointing saves and restores a method's own tensors
    (`accelerator.register_for_checkpointing(MethodState(method.state_dict, method.load_state_dict))`)."""

    def __init__(self, get_state, set_state):
        self._get, self._set = get_state, set_state

    def state_dict(self):
        return self._get()

    def load_state_dict(self, state):
        self._set(state)


STUDENT_DCP = "student_dcp"


class ShardedTrainingState:
    """The student's model and optimizer under train.fsdp, in every checkpoint as a
    torch.distributed.checkpoint (DCP) directory, `student_dcp/`: each process writes its own shards
    (`__<rank>_0.distcp`) and the main process the `.metadata` that says which rows of which tensor
    each file holds. The student is not prepared by accelerate; `register` hooks the save and the
    load into `accelerator.save_state` / `load_state`, which call them on every process. (The
    schedule, replicated, is an ordinary accelerate custom object.)

    State dicts come from `torch.distributed.checkpoint.state_dict` with its sharded default: keys
    are parameter names, values the DTensor shards (plain tensors when the model is not sharded, with
    one process), AdamW's moments likewise. Nothing is gathered. Loading reads from the files the
    rows of this process's shards, so a checkpoint resumes with another number of processes too
    (DCP reshards on load: verified 2 -> 1 and 1 -> 2 in tests/test_fsdp.py).
    """

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def register(self, accelerator) -> None:
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: self.save(Path(output_dir)))
        accelerator.register_load_state_pre_hook(lambda models, input_dir: self.load(Path(input_dir)))

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        reshard(self.model)  # the optimizer holds the shards, and so must the state dicts
        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def save(self, checkpoint: Path) -> None:
        """Write `checkpoint`/student_dcp (a collective: every process calls it)."""
        import torch.distributed.checkpoint as dcp

        with _single_process_quiet():
            dcp.save(self._state(), checkpoint_id=checkpoint / STUDENT_DCP)

    def load(self, checkpoint: Path) -> None:
        """Load `checkpoint`/student_dcp into the model and optimizer (every process calls it).

        Raises:
            ValueError: the checkpoint has no student_dcp/ (not written by a train.fsdp run).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = checkpoint / STUDENT_DCP
        if not (path / ".metadata").is_file():
            raise ValueError(f"no {STUDENT_DCP}/ in {checkpoint}: it was not written by a train.fsdp run")
        state = self._state()  # (initialises the optimizer's state with a zero step: DCP loads in place)
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns once per call that it assumes one process when no process group exists (a
    1-process train.fsdp run): that is what it should do here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def save_checkpoint(accelerator, checkpoints_dir: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Write a complete checkpoint for `step` (every process must call this)."""
    checkpoints_dir = Path(checkpoints_dir)
    name = f"step-{step:08d}"
    final = checkpoints_dir / name
    tmp = checkpoints_dir / f".tmp-{name}"
    old = checkpoints_dir / f".old-{name}"
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for pattern in (".tmp-*", ".del-*"):
            for stale in checkpoints_dir.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    with _quiet_tied_weight_removal(accelerator._models):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    _test_kill_point("state-written", step)
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        _test_kill_point("tmp-complete", step)
        # Re-saving a step (e.g. the final save of a run resumed at max_steps): the complete
        # copy is set aside, not deleted, until the new one is in place.
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            _test_kill_point("set-aside", step)
        os.rename(tmp, final)
        _fsync_dir(checkpoints_dir)
        _test_kill_point("renamed", step)
        atomic_write_text(checkpoints_dir / LATEST, name + "\n")
        for stale in checkpoints_dir.glob(".old-*"):  # only now: `latest` names a complete dir
            shutil.rmtree(stale, ignore_errors=True)
        _prune(checkpoints_dir, keep_last)
        _test_kill_point("saved", step)
    accelerator.wait_for_everyone()
    return final


def disk_size(path: Path) -> int:
    """Bytes of the files under `path`, a file hard-linked several times counted once."""
    seen, total = set(), 0
    for f in Path(path).rglob("*"):
        st = f.lstat()
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def link_duplicates(dirs: list[Path], min_size: int = 1 << 20) -> int:
    """Make byte-identical files (of at least `min_size` bytes) under `dirs` hard links to one
    copy; returns the bytes freed.

    A run writes the student's weights several times over: the final export repeats the last
    checkpoint's model file, and `best/` repeats both when the best dev score is at the last
    step (always, for a run that evaluates only at its end). Nothing writes into these files
    afterwards (every save goes to a new directory), so sharing them is safe. A file system
    without hard links keeps the copies.
    """
    by_size: dict[int, list[Path]] = {}
    for d in dirs:
        for f in sorted(Path(d).rglob("*")) if Path(d).is_dir() else ():
            st = f.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_size >= min_size:
                by_size.setdefault(st.st_size, []).append(f)
    freed = 0
    for size, files in by_size.items():
        kept: list[Path] = []
        for f in files:
            twin = next((k for k in kept if os.path.samefile(k, f) or filecmp.cmp(k, f, shallow=False)), None)
            if twin is None:
                kept.append(f)
                continue
            if os.path.samefile(twin, f):
                continue
            tmp = f.with_name(f".link-{f.name}")
            try:
                os.link(twin, tmp)
                os.replace(tmp, f)
            except OSError:
                tmp.unlink(missing_ok=True)
                continue
            freed += size
    return freed


def _prune(checkpoints_dir: Path, keep_last: int) -> None:
    complete = sorted(p for p in checkpoints_dir.glob("step-*") if (p / TRAINER_STATE).is_file())
    for old in complete[:-keep_last]:
        trash = old.with_name(f".del-{old.name}")  # a killed rmtree never leaves a torn step-*
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint named by `latest`, or None when there is none.

    A crash between the steps of a save can leave `latest` missing (first save) or naming a
    step whose directory was just set aside (re-save); then the set-aside copy, or else the
    newest complete `step-*` directory, is used.
    """
    checkpoints_dir = Path(checkpoints_dir)
    pointer = checkpoints_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        for path in (checkpoints_dir / name, checkpoints_dir / f".old-{name}"):
            if name and (path / TRAINER_STATE).is_file():
                return path
    complete = sorted(p for p in checkpoints_dir.glob("step-*") if (p / TRAINER_STATE).is_file())
    return complete[-1] if complete else None


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
