"""The one training loop shared by every method.

    promptkd train --config configs/promptkd.yaml              # from the command line

    trainer = Trainer(config, student=student, teacher=teacher, tokenizer=tokenizer,
                      train_dataset=dataset)                   # from Python, with your objects
    trainer.train()

`Trainer.setup()` takes the models, tokenizer and data it was given (loading whatever is missing
from the config) and prepares them with `accelerate`; `Trainer.train()` runs optimizer steps.
Each step takes `gradient_accumulation_steps` micro-batches per process from a seeded,
resumable data order and hands them to the method's `step(ctx, micro_batches)`. The method
sees only the step context (`promptkd.training.context.TrainingContext`): forward passes with
autocast, on-policy sampling, global-token normalisation, backward and parameter-set updates.
Evaluation, logging, checkpointing and signal handling happen here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from promptkd.config import (
    Config,
    config_warnings,
    fit_warmup,
    load_config,
    merge_dicts,
    parse_overrides,
    validate_config,
)
from promptkd.data.dataset import build_examples
from promptkd.data.order import local_micro_batches
from promptkd.data.records import records_from
from promptkd.errors import NonFiniteError, TrainingInterrupted, UserError
from promptkd.head_losses import head_cross_entropy
from promptkd.losses import set_fused
from promptkd.methods import get_method_class
from promptkd.methods.base import StepResult, response_mask
from promptkd.metric import corpus_rouge_l
from promptkd.models.loading import (
    ModelSpec,
    cast_frozen_linear_weights,
    check_tokenizer_compatibility,
    eos_token_ids,
    load_model_and_tokenizer,
)
from promptkd.models.lora import check_lora_backend, is_lora_model, save_lora_student, with_lora
from promptkd.precision import resolve_precision
from promptkd.samplers import build_sampler
from promptkd.training.checkpoint import (
    disk_size,
    latest_checkpoint,
    link_duplicates,
    load_trainer_state,
    save_checkpoint,
)
from promptkd.training.context import ParameterSet, TrainingContext, UpdateGuard
from promptkd.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

# metric key -> its short label on the progress bar, shown when a step reports it
PROGRESS_EXTRAS = {"prompt/kl_to_student": "kl_to_student", "prompt/drift": "drift"}
# What a run writes into train.output_dir; --overwrite removes these and nothing else.
RUN_ARTEFACTS = ("config.yaml", "precision.json", "metrics.jsonl", "checkpoints", "final", "final.tmp", "best", "best.tmp")
# accelerate's TensorBoard tracker logs under <output_dir>/<project name> (init_trackers below).
TRACKER_DIR = "promptkd"
TRACKER_FILES = ("events.out.tfevents.*", "hparams.yml")


class DataOrder:
    """Seeded epoch permutations; the state is one integer (examples consumed globally)."""

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.seed = seed
        self.position = 0
        self._epoch = -1
        self._perm: list[int] = []

    def _perm_for(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_examples, generator=g).tolist()
            self._epoch = epoch
        return self._perm

    @property
    def epoch(self) -> float:
        return self.position / self.num_examples

    def micro_batches(self, batch_size: int, accumulation: int, world: int, rank: int) -> list[list[int]]:
        """Example indices of process `rank`'s micro-batches for the next optimizer step.

        The step takes batch_size x accumulation x world examples in the global batch order
        (`promptkd.data.order`): micro-batch m of rank r holds global slots
        (m * world + r) * batch_size ..., so step k trains on the same examples for any split of
        the same global batch, and the position is global (resumable anywhere).
        """
        indices = self.take(batch_size * accumulation * world)
        return local_micro_batches(indices, [batch_size] * accumulation, num_processes=world, process_index=rank)

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            epoch, idx = divmod(self.position, self.num_examples)
            out.append(self._perm_for(epoch)[idx])
            self.position += 1
        return out


class _StopSignals:
    """While training: SIGINT and SIGTERM only set `signum`, which the loop reads after each step
    (it then checkpoints and stops). A second SIGINT raises KeyboardInterrupt at once. Handlers
    are installed only in the main thread and the previous ones are restored on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            logger.warning("%s received: finishing step, then checkpointing (Ctrl-C again to stop now)",
                           signal.Signals(signum).name)
        self.signum = self.signum or signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MethodState:
    """Adapter so accelerate's checkpointing saves and restores a method's own tensors."""

    def __init__(self, get_state, set_state):
        self._get, self._set = get_state, set_state

    def state_dict(self):
        return self._get()

    def load_state_dict(self, state):
        self._set(state)


class Trainer:
    """Distils a student from a teacher with the configured method.

    Args:
        config: a `Config` (validated here), or a path / dict for `Trainer.from_config`.
        student, teacher, tokenizer: models and tokenizer you already hold; each one left None
            is loaded from `config.model` (the tokenizer from the student's source).
        train_dataset, eval_dataset: a `datasets.Dataset`, a list of dicts or a JSONL path, in
            the instruction schema or a chat format (`messages`, or prompt-only for on-policy
            methods); None reads `config.data.train` / `config.data.dev`.
        resume, overwrite: continue the run in `config.train.output_dir`, or replace it.
        show_progress: the progress bar.
        on_phase: called as on_phase(name, seconds) after each timed phase of a step
            (generation, student_fwd, teacher_fwd_*, losses, backward_*, optimizer), for
            profilers such as benchmarks/bench_step.py; None costs nothing.

    What happens to the objects passed in:
        student: trained in place and moved to the training device; with model.student_lora.r > 0
            LoRA adapters are added to it (peft). A second Trainer given the same object continues
            from the first one's result: pass a fresh copy (copy.deepcopy) to start over.
        teacher: moved to the training device and never updated. While `train()` runs it is
            frozen (requires_grad False, eval mode); afterwards its requires_grad and train / eval
            flags are what they were. Its weights keep their dtype (a teacher the trainer loads
            itself holds its linear weights in bf16 under bf16 autocast).
        tokenizer: gets pad_token = eos_token when it has no pad token.
        train_dataset, eval_dataset: read, never changed.
    """

    def __init__(self, config: Config, *, student=None, teacher=None, tokenizer=None, train_dataset=None,
                 eval_dataset=None, resume: bool = False, overwrite: bool = False, show_progress: bool = True,
                 on_phase=None):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a promptkd Config (use Trainer.from_config for a path or dict), got {type(config).__name__}")
        self.cfg = config
        self._given = {"student": student, "teacher": teacher, "tokenizer": tokenizer,
                       "train_dataset": train_dataset, "eval_dataset": eval_dataset}
        validate_config(config, provided={k for k, v in self._given.items() if v is not None})
        self.resume = resume
        self.overwrite = overwrite
        self.show_progress = show_progress
        self.on_phase = on_phase
        self.output_dir = Path(config.train.output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.step = 0
        self.guard = UpdateGuard(nonfinite=config.train.nonfinite, max_nonfinite_skips=config.train.max_nonfinite_skips)
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.teacher = None
        self._teacher_flags = None  # a passed-in teacher's (requires_grad, training) flags
        self._is_setup = False
        # while training: {ctx.updates_applied: dev loss} of the current student state (_dev_loss)
        self._dev_loss_memo: dict[int, float] | None = None

    @classmethod
    def from_config(cls, source, overrides: list[str] | dict | None = None, **kwargs) -> Trainer:
        """A Trainer from a YAML path, a dict or a Config, plus dotted overrides (the CLI path).

        Entries that passed objects replace (student, teacher, train data) may be missing: the
        constructor validates the config knowing which objects it was given.
        """
        if isinstance(source, Config) and not overrides:
            return cls(source, **kwargs)
        if isinstance(source, (Config, dict)):
            base = source.to_dict() if isinstance(source, Config) else source
            over = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
            cfg = load_config(None, merge_dicts(base, over), check_required=False)
        else:
            cfg = load_config(source, overrides, check_required=False)
        return cls(cfg, **kwargs)

    @property
    def nonfinite_skips(self) -> int:
        return self.guard.nonfinite_skips

    @property
    def unwrapped_student(self):
        return self.accelerator.unwrap_model(self.student)

    # ------------------------------------------------------------------ setup

    def _check_output_dir(self) -> None:
        cfg_file = self.output_dir / "config.yaml"
        if self.resume:
            return
        exists = cfg_file.exists() or self.checkpoints_dir.exists()
        # every process looks before the main one deletes: a process that looked afterwards
        # would skip the barrier below and desynchronise the collectives that follow
        self.accelerator.wait_for_everyone()
        if exists:
            if not self.overwrite:
                raise UserError(**_worded(
                    "output directory {run} already holds a run; pass {resume} to continue it or {overwrite} "
                    "to replace it", self.output_dir))
            if self.accelerator.is_main_process:
                self._remove_run_artefacts()
            self.accelerator.wait_for_everyone()

    def _remove_run_artefacts(self) -> None:
        """overwrite: delete the previous run's files only; anything else in the directory stays."""
        for name in RUN_ARTEFACTS:
            path = self.output_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        tracker = self.output_dir / TRACKER_DIR
        if tracker.is_dir() and not tracker.is_symlink():
            files = [f for f in tracker.rglob("*") if not f.is_dir()]
            if all(any(f.match(pat) for pat in TRACKER_FILES) for f in files):
                shutil.rmtree(tracker)
            else:
                logger.warning("overwrite: kept %s (it holds files other than tracker logs)", tracker)

    def setup(self) -> Trainer:
        """Models, tokenizer, data, optimizers and the step context, prepared with accelerate."""
        if self._is_setup:
            return self
        from accelerate import Accelerator, PartialState
        from accelerate.utils import set_seed

        cfg, warmup_note = fit_warmup(self.cfg)
        self.cfg = cfg
        for note in config_warnings(cfg) + ([warmup_note] if warmup_note else []):
            logger.warning(note)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.precision = resolve_precision(cfg.train.mixed_precision, PartialState(cpu=cfg.train.cpu).device)
        self.accelerator = Accelerator(
            cpu=cfg.train.cpu,
            mixed_precision=self.precision.mixed_precision,
            step_scheduler_with_optimizer=False,  # our schedules count optimizer steps, not batches
            log_with=cfg.train.trackers or None,
            project_dir=str(self.output_dir),
        )
        self._check_output_dir()
        self._check_distributed_backend()
        set_seed(cfg.train.seed)
        if not cfg.train.fused_losses:  # (on by default unless PROMPTKD_FUSED_LOSSES=0 turned it off)
            set_fused(False)

        method_cls = get_method_class(cfg.method)
        self.method = method_cls(cfg)
        self._records = self._read_data()  # before the models: a bad data source fails in seconds
        self.student, self.tokenizer = self._student_and_tokenizer()
        self.vocab_size = self.student.get_output_embeddings().weight.shape[0]
        if method_cls.needs_teacher(cfg):
            self.teacher, teacher_tok = self._teacher()
            self.vocab_size = check_tokenizer_compatibility(teacher_tok, self.tokenizer, self.teacher, self.student)
            if self._given["teacher"] is not None:  # what train() gives back (_teacher_frozen)
                self._teacher_flags = ([(p, p.requires_grad) for p in self.teacher.parameters()],
                                       [(m, m.training) for m in self.teacher.modules()])
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            self.teacher.to(self.accelerator.device)
            self._teacher_linears_to_compute_dtype()
        if cfg.train.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.student, "activation_checkpointing_enable"):  # transformers >= 5.x name
                self.student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            self.student.config.use_cache = False

        self.train_examples = self._load_train_examples(self._records.pop("train"))
        self.dev_examples = self._load_dev_examples(self._records.pop("dev", None))
        self.data_order = DataOrder(len(self.train_examples), cfg.train.seed)

        student_optimizer = build_optimizer(
            self.student.parameters(),
            lr=cfg.train.learning_rate,
            weight_decay=cfg.train.weight_decay,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        )
        student_scheduler = build_scheduler(
            student_optimizer,
            name=cfg.train.lr_scheduler,
            warmup_steps=cfg.train.warmup_steps,
            total_steps=cfg.train.max_steps,
        )
        self.student, student_optimizer, student_scheduler = self.accelerator.prepare(
            self.student, student_optimizer, student_scheduler
        )
        self.ctx = TrainingContext(
            accelerator=self.accelerator,
            student=self.student,
            teacher=self.teacher,
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            sampler=None,
            sampling=cfg.sampling,
            eos_token_ids=eos_token_ids(self.tokenizer, self.unwrapped_student),
            eos_at_cap_default=method_cls.eos_at_cap_default,
            train_cfg=cfg.train,
            guard=self.guard,
            on_phase=self.on_phase,
        )
        self.ctx.sampler = build_sampler(cfg.train.sampler, self.ctx)
        self.ctx.dev_loss_fn = (lambda: self._dev_loss()) if self.dev_examples else None
        self.ctx.examples_fn = self._extra_examples
        self.ctx.param_sets["student"] = ParameterSet(
            "student", list(self.student.parameters()), student_optimizer, student_scheduler
        )
        self.method.setup(self.ctx)
        self.accelerator.register_for_checkpointing(MethodState(self.method.state_dict, self.method.load_state_dict))

        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        if self.resume:
            self._restore()
        elif self.accelerator.is_main_process:
            cfg.save(self.output_dir / "config.yaml")
            self.metrics_path.write_text("", encoding="utf-8")
        if self.accelerator.is_main_process:
            self._say(f"precision: {self.precision.describe()}")
            (self.output_dir / "precision.json").write_text(
                json.dumps({**self.precision.as_record(), "device": str(self.accelerator.device)}, indent=1) + "\n",
                encoding="utf-8")
        if cfg.train.trackers:
            self.accelerator.init_trackers("promptkd", config=_flatten(cfg.to_dict()))
        self.accelerator.wait_for_everyone()
        self._is_setup = True
        return self

    def _student_and_tokenizer(self):
        cfg = self.cfg
        student, tokenizer = self._given["student"], self._given["tokenizer"]
        if student is None:
            student, loaded_tok = load_model_and_tokenizer(
                ModelSpec(cfg.model.student, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
            )
            tokenizer = tokenizer or loaded_tok
        elif tokenizer is None:
            if not cfg.model.student:
                raise UserError("a student model was passed without a tokenizer: pass tokenizer=... "
                                "(or set model.student so the tokenizer can be loaded from it)")
            _, tokenizer = load_model_and_tokenizer(ModelSpec(cfg.model.student, dtype=cfg.model.dtype))
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UserError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token  # pad positions are always masked out
        lora = cfg.model.student_lora
        if is_lora_model(student):
            if lora.r > 0:
                warnings.warn(
                    "the student passed in is a PeftModel already: its own adapters train and "
                    "model.student_lora's r, alpha, dropout and target_modules are ignored",
                    UserWarning, stacklevel=4,
                )
        elif lora.r > 0:
            student = with_lora(student, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                target_modules=lora.target_modules)
        if is_lora_model(student):
            check_lora_backend(self.accelerator)
            if cfg.train.gradient_checkpointing:
                student.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
        student.train()
        return student, tokenizer

    def _teacher(self):
        cfg = self.cfg
        teacher = self._given["teacher"]
        if teacher is None:
            return load_model_and_tokenizer(
                ModelSpec(cfg.model.teacher, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
            )
        # a passed-in teacher shares the student's tokenizer unless model.teacher names its own
        if cfg.model.teacher:
            _, teacher_tok = load_model_and_tokenizer(ModelSpec(cfg.model.teacher, dtype=cfg.model.dtype))
            return teacher, teacher_tok
        return teacher, self.tokenizer

    def _check_distributed_backend(self) -> None:
        """Refuse what accelerate's DeepSpeed integration cannot run with this loop.

        `accelerator.backward` under DeepSpeed runs the engine's backward *and* its optimizer
        step on every call, so a second parameter set (PromptKD's prompt) would step the
        student and gradient accumulation would step per micro-batch (docs/distributed.md).
        """
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            return
        cfg = self.cfg
        if cfg.method == "promptkd" and not cfg.promptkd.freeze_prompt:
            raise UserError(
                "DeepSpeed is not supported for method promptkd: accelerate's DeepSpeed backward "
                "also steps the student's engine, so the prompt update would step the student; "
                "launch with DDP or FSDP instead (configs/accelerate/, docs/distributed.md)"
            )
        if cfg.method == "minillm" and cfg.minillm.lm_coef > 0:
            raise UserError(
                "DeepSpeed is not supported for minillm with minillm.lm_coef > 0: the language-modelling "
                "term is a second backward per step, and accelerate's DeepSpeed backward steps the engine "
                "each time; set minillm.lm_coef 0 or launch with DDP or FSDP"
            )
        if cfg.train.gradient_accumulation_steps > 1:
            raise UserError(
                "DeepSpeed with train.gradient_accumulation_steps > 1 is not supported: the engine "
                "would step after every micro-batch; set train.gradient_accumulation_steps 1 and "
                "use more processes or a larger train.batch_size, or launch with DDP/FSDP"
            )
        ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            # no DataLoader goes through prepare(), so accelerate cannot infer it
            ds_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size

    # ------------------------------------------------------------------ data

    def _read_data(self) -> dict[str, tuple[str, list]]:
        """Every data source's records, read before any model loads, so that a missing file or an
        unreachable Hub id fails in seconds and names its config key.

        Returns {"train" / "dev" / a method's own source (minillm.lm_data): (the name logs and
        messages give it, records)}.
        """
        d, given = self.cfg.data, self._given
        if given["train_dataset"] is not None:
            train = ("train_dataset", given["train_dataset"], d.train_split, None)
        elif self.method.train_source() == d.train:
            train = ("data.train", d.train, d.train_split, d.train_data_files)
        else:  # another file than data.train (seqkd's teacher responses): data.train's split is not its own
            train = ("data.teacher_responses", self.method.train_source(), "train", None)
        reads = {"train": (*train, self.method.needs_references(self.cfg))}
        if given["eval_dataset"] is not None:
            reads["dev"] = ("eval_dataset", given["eval_dataset"], d.dev_split, None, True)
        elif d.dev:
            reads["dev"] = ("data.dev", d.dev, d.dev_split, d.dev_data_files, True)
        if self.cfg.method == "minillm" and self.cfg.minillm.lm_data:
            reads[str(self.cfg.minillm.lm_data)] = ("minillm.lm_data", self.cfg.minillm.lm_data, "train", None, True)
        return {name: _read_records(*read) for name, read in reads.items()}

    def _examples(self, records, *, source: str, with_responses: bool):
        d = self.cfg.data
        return build_examples(
            records,
            self.tokenizer,
            template=d.template,
            max_prompt_length=d.max_prompt_length,
            max_length=d.max_length,
            max_response_length=d.max_response_length,
            with_responses=with_responses,
            source=source,
        )

    def _load_train_examples(self, records: tuple[str, list]):
        source, records = records
        self.method.check_train_records(records, source=source, is_main_process=self.accelerator.is_main_process)
        examples, stats = self._examples(records, source=source, with_responses=self.method.needs_references(self.cfg))
        if self.accelerator.is_main_process:
            logger.log(stats.log_level, "training data %s: %s", source, stats.summary())
        if self.cfg.data.max_train_examples:
            examples = examples[: self.cfg.data.max_train_examples]
        return examples

    def _extra_examples(self, source: str) -> list:
        """A method's own data (minillm.lm_data), with responses, tokenised like the training data."""
        name, records = self._records.get(str(source)) or _read_records(str(source), source, "train", None, True)
        examples, stats = self._examples(records, source=name, with_responses=True)
        if self.accelerator.is_main_process:
            logger.log(stats.log_level, "%s data %s: %s", self.cfg.method, source, stats.summary())
        if not examples:
            raise UserError(f"{source}: no usable records (see the counts above)")
        return examples

    def _load_dev_examples(self, records: tuple[str, list] | None):
        if records is None:
            return []
        source, records = records
        examples, _ = self._examples(records, source=source, with_responses=True)
        if self.cfg.data.max_dev_examples:
            examples = examples[: self.cfg.data.max_dev_examples]
        return examples

    # ------------------------------------------------------------------ resume

    def _trainer_state(self) -> dict:
        offset = 0
        if self.accelerator.is_main_process and self.metrics_path.exists():
            with open(self.metrics_path, "ab") as f:  # the records the checkpoint vouches for are on disk
                os.fsync(f.fileno())
                offset = os.fstat(f.fileno()).st_size
        return {
            "step": self.step,
            "data_position": self.data_order.position,
            "metrics_offset": offset,
            "nonfinite_skips": self.guard.nonfinite_skips,
            "overflows": self.guard.overflows,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "world_size": self.accelerator.num_processes,
            "rng_fingerprint": _rng_fingerprint(),
        }

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.checkpoints_dir)
        if ckpt is None:
            raise UserError(**_worded(
                "{resume}: no complete checkpoint under {run}/checkpoints (set train.save_every so runs write "
                "checkpoints, or start without {resume})", self.output_dir))
        saved_cfg = self.output_dir / "config.yaml"
        saved_method = (_read_yaml_mapping(saved_cfg) or {}).get("method") if saved_cfg.is_file() else None
        if saved_method not in (None, self.cfg.method):
            raise UserError(**_worded(
                "{resume}: {run} holds a '{saved}' run but the config says method '{method}'; resume with "
                "{own_config} or use another train.output_dir", self.output_dir, saved=saved_method,
                method=self.cfg.method))
        try:
            self.accelerator.load_state(str(ckpt))
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. another student architecture
            detail = " ".join(str(e).split())  # one line
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            raise UserError(**_worded(
                "{resume}: checkpoint {ckpt} does not fit this configuration ({detail}); resume with "
                "{own_config} or use another train.output_dir", self.output_dir, ckpt=ckpt,
                detail=f"{type(e).__name__}: {detail}")) from e
        state = load_trainer_state(ckpt)
        self.step = state["step"]
        self.data_order.position = state["data_position"]
        self.ctx.step = self.step
        self.guard.nonfinite_skips = state["nonfinite_skips"]
        self.guard.overflows = dict(state.get("overflows", {}))
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        if self.accelerator.is_main_process:
            # accelerate ignores an unreadable RNG file silently; an inexact resume should not be
            if state.get("rng_fingerprint") not in (None, _rng_fingerprint()):
                logger.warning("random-number generator states were not restored from %s: the resumed run "
                               "will not reproduce an uninterrupted one exactly", ckpt)
            if self.metrics_path.exists():
                offset = state["metrics_offset"]
                with open(self.metrics_path, "r+b") as f:  # drop records logged after the checkpoint
                    size = os.fstat(f.fileno()).st_size
                    if size >= offset:
                        f.truncate(offset)
                    else:  # truncate() would pad with NUL bytes
                        logger.warning(
                            "%s is shorter (%d bytes) than when %s was written (%d bytes): records were lost",
                            self.metrics_path, size, ckpt, offset,
                        )
        logger.info("resumed from %s at step %d", ckpt, self.step)

    # ------------------------------------------------------------------ teacher precision

    def _teacher_linears_to_compute_dtype(self) -> None:
        """Under bf16 (or CUDA fp16) autocast, hold the frozen teacher's linear weights in that dtype.

        Every teacher forward runs under `self.autocast()`, which would otherwise cast each
        linear weight at every call: same numbers (tests/test_prompted_teacher.py), fewer cast
        kernels, about half the teacher's weight memory. Only a teacher the trainer loaded itself:
        one passed in keeps its weights as they are.
        """
        dtype = self.precision.dtype
        if dtype is None or (dtype is torch.float16 and self.accelerator.device.type != "cuda"):
            return
        if self._given["teacher"] is not None:
            return

        cast_frozen_linear_weights(self.teacher, dtype)

    # ------------------------------------------------------------------ steps

    def next_micro_batches(self) -> list[list]:
        """This process's micro-batches for the next optimizer step (accumulation x batch_size)."""
        t = self.cfg.train
        shards = self.data_order.micro_batches(
            t.batch_size, t.gradient_accumulation_steps, self.accelerator.num_processes, self.accelerator.process_index
        )
        return [[self.train_examples[i] for i in shard] for shard in shards]

    def train_step(self, micro_batches: list[list] | None = None) -> StepResult:
        """One optimizer step of the method on the next micro-batches (or the given ones)."""
        self.setup()
        if micro_batches is None:
            micro_batches = self.next_micro_batches()
        self.ctx.step = self.step
        self.ctx.epoch = self.data_order.epoch
        result = self.method.step(self.ctx, micro_batches)
        self.step += 1
        self.ctx.step = self.step
        return result

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.dev_examples:
            return {}
        if self.cfg.train.eval_metric == "loss":
            return {"dev/loss": self._dev_loss()}
        return {"dev/rougeL": self._dev_rouge()}

    def _dev_loss(self) -> float:
        """The student's token-mean dev CE (eval mode), reduced over processes.

        While `train()` runs, the value of one student state is computed once: DistiLLM's phi
        check (ctx.dev_loss, after its update) and the evaluation of the same step get it from
        one pass over the dev set. Inside the loop the student changes only through
        ctx.apply_update, whose count is the memo's key.
        """
        memo, version = self._dev_loss_memo, self.ctx.updates_applied
        if memo is not None and version in memo:
            return memo[version]
        loss = self._dev_pass_loss()
        if memo is not None:
            memo.clear()
            memo[version] = loss
        return loss

    @contextlib.contextmanager
    def _dev_loss_memoised(self):
        self._dev_loss_memo = {}
        try:
            yield
        finally:
            self._dev_loss_memo = None

    def _dev_pass_loss(self) -> float:
        total, count = 0.0, 0.0
        for chunk, indices in self._dev_shards("dev loss"):
            batch = self.ctx.collate(chunk)
            # eval mode, no grad: (B, R, H) hidden states when chunked, else (B, R, V) logits
            outputs = self.ctx.student_target_hidden(batch) if self.ctx.chunked else self.ctx.student_target_logits(batch)
            if indices is None:  # a filler batch that keeps the processes in step
                continue
            mask = response_mask(batch)
            targets = batch.input_ids[:, batch.prompt_length :]
            if self.ctx.chunked:
                with outputs.head_autocast():
                    nll = head_cross_entropy(outputs.hidden, outputs.head, targets, mask, reduction="sum")
            else:
                nll = torch.nn.functional.cross_entropy(outputs.float()[mask], targets[mask], reduction="sum")
            total += float(nll)
            count += float(mask.sum())
        return self.ctx.reduce_sum(total) / max(self.ctx.reduce_sum(count), 1.0)

    def _dev_rouge(self) -> float:

        scored = []  # (dev index, prediction) of this process's share
        for chunk, indices in self._dev_shards("dev ROUGE-L"):
            batch = self.ctx.sample(chunk, training=False)
            if indices is None:  # a filler batch that keeps the processes in step
                continue
            resp = batch.input_ids[:, batch.prompt_length :]
            mask = batch.loss_mask[:, batch.prompt_length :]
            for row, m, i in zip(resp, mask, indices, strict=True):
                scored.append((i, self.tokenizer.decode(row[m], skip_special_tokens=True).strip()))
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            # every process scores the same complete list, so best-checkpoint decisions agree
            scored = gather_object(scored)
        scored.sort(key=lambda x: x[0])
        return corpus_rouge_l([p for _, p in scored], [self.dev_examples[i].references for i, _ in scored])

    def _dev_shards(self, desc: str):
        """This process's dev batches as (examples, dev indices), the same count on every process,
        with a progress bar named `desc` (when show_progress).

        A process with no examples left gets a filler copy of the first batch with indices
        None, so that collectives inside forward / generate (FSDP) stay matched.
        """
        from tqdm.auto import tqdm

        bs = self.cfg.train.batch_size
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        n = len(self.dev_examples)
        for it in tqdm(range(math.ceil(n / (bs * world))), desc=desc, leave=False, dynamic_ncols=True,
                       disable=not (self.show_progress and self.accelerator.is_main_process)):
            start = (it * world + rank) * bs
            indices = list(range(start, min(start + bs, n)))
            if indices:
                yield [self.dev_examples[i] for i in indices], indices
            else:
                yield self.dev_examples[:bs], None

    # ------------------------------------------------------------------ outputs

    def _say(self, message: str) -> None:
        """One line for whoever watches the run: above the progress bar when it is shown
        (show_progress, main process), else an INFO log record."""
        if self.show_progress and self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)
        else:
            logger.info(message)

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.cfg.train.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def save(self, final: bool) -> None:
        self._last_save_time = time.monotonic()
        path = save_checkpoint(
            self.accelerator, self.checkpoints_dir, self.step, self._trainer_state(), self.cfg.train.keep_last
        )
        if final:
            self.export(self.output_dir / "final")
        if self.accelerator.is_main_process:
            link_duplicates([self.checkpoints_dir, self.output_dir / "best", self.output_dir / "final"])
            total = f"; the run directory holds {disk_size(self.output_dir) / 1e6:.1f} MB" if final else ""
            self._say(f"checkpoint step {self.step}: {disk_size(path) / 1e6:.1f} MB in {path}{total}")

    def export(self, out_dir: Path) -> None:
        """Student in save_pretrained format (+ tokenizer) and the method's artefacts.

        A LoRA student exports its adapter (student_adapter/) and, with model.student_lora.merge,
        the merged model (student/)."""
        self.accelerator.wait_for_everyone()
        # every process takes part: a collective under FSDP / ZeRO-3 (full weights on the main one)
        state_dict = self.accelerator.get_state_dict(self.student)
        if self.accelerator.is_main_process:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            student = self.unwrapped_student
            if is_lora_model(student):
                save_lora_student(student, self.tokenizer, tmp, state_dict=state_dict,
                                  merge=self.cfg.model.student_lora.merge)
            else:
                student.save_pretrained(tmp / "student", state_dict=state_dict, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp / "student")
            self.method.export(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.rename(tmp, out_dir)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ loop

    def train(self) -> dict:
        """Run the remaining optimizer steps, checkpoint and export; returns the last metrics record."""
        from tqdm.auto import tqdm

        self.setup()
        cfg = self.cfg.train
        self.student.train()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"{self.cfg.method}",
            disable=not (self.show_progress and self.accelerator.is_main_process),
            dynamic_ncols=True,
        )
        last = {"step": self.step}  # a run resumed at max_steps only re-exports
        self._last_save_time = time.monotonic()
        # the final save, too, completes before a signal is acted on
        with self._teacher_frozen(), _StopSignals() as signals:
            with self._dev_loss_memoised():
                last = self._train_steps(bar, last, signals)
            bar.close()
            self.save(final=True)
        if cfg.trackers:
            self.accelerator.end_training()
        return last

    @contextlib.contextmanager
    def _teacher_frozen(self):
        """The teacher is frozen while train() runs (no gradients, eval mode; PromptKD's prompt
        forward turns dropout on by itself); a teacher passed in gets back the requires_grad and
        train / eval flags it came with."""
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        try:
            yield
        finally:
            params, modules = self._teacher_flags or ((), ())
            for p, flag in params:
                p.requires_grad_(flag)
            for m, mode in modules:
                m.training = mode

    def _train_steps(self, bar, last: dict, signals: _StopSignals) -> dict:
        """Optimizer steps until max_steps; a SIGINT / SIGTERM checkpoints and raises after a step."""
        cfg = self.cfg.train
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            micro_batches = self.next_micro_batches()
            result = self.train_step(micro_batches)
            dt = time.perf_counter() - t0
            trained = self.ctx.reduce_sum(result.trained_tokens)
            generated = self.ctx.reduce_sum(result.generated_tokens)
            record = {"step": self.step, "epoch": round(self.data_order.epoch, 4), **result.metrics}
            record.update(step_time=dt, trained_tokens=trained, trained_tokens_per_s=trained / dt,
                          generated_tokens=generated)
            if self.guard.nonfinite_skips:
                record["nonfinite_skips"] = self.guard.nonfinite_skips
            do_eval = bool(self.dev_examples) and (
                (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps
            )
            if do_eval:
                dev = self.evaluate()
                record.update(dev)
                self._say(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in dev.items()))
                self._maybe_save_best(record)
            if self.step % cfg.log_every == 0 or do_eval or self.step == cfg.max_steps:
                self.log(record)
            last = record
            bar.set_postfix(progress_postfix(record), refresh=False)
            bar.update(1)
            if self.guard.stop_message is not None:
                bar.close()
                self.save(final=False)
                raise NonFiniteError(**_worded(
                    "{reason}; the update was skipped and training stopped with a checkpoint at step {step} in "
                    "{run}/checkpoints: lower train.learning_rate, try train.mixed_precision no or set "
                    "train.nonfinite skip, then continue with {continue_run}", self.output_dir,
                    reason=self.guard.stop_message, step=self.step))
            if self.step >= cfg.max_steps:
                break
            stop_signal, time_due = self._poll_stop_and_timer(signals)
            if (cfg.save_every and self.step % cfg.save_every == 0) or time_due or stop_signal:
                self.save(final=False)
            if stop_signal:
                bar.close()
                name = signal.Signals(stop_signal).name
                raise TrainingInterrupted(**_worded(
                    "{name} received: stopped after step {step} of {max_steps}, checkpoint written to {ckpt}; "
                    "continue with: {continue_run}", self.output_dir, name=name, step=self.step,
                    max_steps=cfg.max_steps, ckpt=self.checkpoints_dir / f"step-{self.step:08d}"), signum=stop_signal)
        return last

    def _poll_stop_and_timer(self, signals: _StopSignals) -> tuple[int, bool]:
        """(signal to stop on or 0, whether a time-based checkpoint is due), agreed by every process.

        A signal that reached any process stops all of them; the main process's clock decides
        the time-based checkpoint (train.save_every_minutes).
        """
        minutes = self.cfg.train.save_every_minutes
        due = minutes > 0 and time.monotonic() - self._last_save_time >= 60.0 * minutes
        flags = torch.tensor(
            [signals.signum == signal.SIGINT, signals.signum == signal.SIGTERM,
             due and self.accelerator.is_main_process],
            dtype=torch.float64, device=self.accelerator.device,
        )
        flags = self.accelerator.reduce(flags, "sum") if self.accelerator.num_processes > 1 else flags
        stop = signal.SIGTERM if flags[1] > 0 else signal.SIGINT if flags[0] > 0 else 0
        return int(stop), bool(flags[2] > 0)

    def _maybe_save_best(self, record: dict) -> None:
        key = "dev/loss" if self.cfg.train.eval_metric == "loss" else "dev/rougeL"
        value = record.get(key)
        if value is None:
            return
        better = self.best_metric is None or (value < self.best_metric if key == "dev/loss" else value > self.best_metric)
        if better:
            self.best_metric, self.best_step = value, self.step
            record["best"] = True
            self.export(self.output_dir / "best")


def progress_postfix(record: dict) -> dict[str, str]:
    """What the progress bar shows of a step's metrics record: the student's loss (a method's
    first `*loss` key when it reports none), PromptKD's two distances, seconds and tokens/s."""
    loss_key = "student/loss" if "student/loss" in record else next((k for k in record if k.endswith("loss")), None)
    return {
        **({loss_key: f"{record[loss_key]:.4f}"} if loss_key else {}),
        # PromptKD: the two distances of the prompted teacher (collapse when kl_to_student < drift)
        **{label: f"{record[key]:.3g}" for key, label in PROGRESS_EXTRAS.items() if key in record},
        "s/step": f"{record['step_time']:.2f}",
        "tok/s": f"{record['trained_tokens_per_s']:.0f}",
    }


def _read_records(key: str, data, split: str, data_files, with_responses: bool) -> tuple[str, list]:
    """(the name logs give a data source, its records); an error names the source's config key."""
    try:
        records = records_from(data, split=split, data_files=data_files, require_outputs=with_responses)
    except UserError as e:
        raise UserError(f"{key}: {e}", cli=f"{key}: {e.cli}") from e
    return (key if key in ("train_dataset", "eval_dataset") else str(data)), records


def _worded(text: str, run: Path, **values) -> dict[str, str]:
    """`message` and `cli` of an error whose fix is a Trainer argument in Python and a flag on the
    command line: `text` names it with {resume}, {overwrite}, {own_config} or {continue_run}."""
    python = {"resume": "resume=True", "overwrite": "overwrite=True",
              "own_config": f"the run's own config ({run / 'config.yaml'})",
              "continue_run": "resume=True (the same config and train.output_dir)"}
    cli = {"resume": "--resume", "overwrite": "--overwrite", "own_config": "the run's own config (omit --config)",
           "continue_run": f"promptkd train --resume {run}"}
    return {"message": text.format(run=run, **python, **values), "cli": text.format(run=run, **cli, **values)}


def _read_yaml_mapping(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _rng_fingerprint() -> str:
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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def run_training(cfg: Config, *, resume: bool = False, overwrite: bool = False, show_progress: bool = True) -> dict:
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite, show_progress=show_progress)
    return trainer.train()
