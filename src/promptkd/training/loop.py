"""The one training loop shared by every method.

    promptkd train --config configs/promptkd.yaml

`Trainer.setup()` loads the models, data and optimizers and prepares them with `accelerate`;
`Trainer.train()` runs optimizer steps. Each step takes `gradient_accumulation_steps`
micro-batches per process from a seeded, resumable data order and hands them to the method's
`step()`, which computes losses and calls back into the trainer for the shared mechanics:
forward passes with autocast, on-policy sampling, global-token normalisation, non-finite
guards, clipping and optimizer steps. Evaluation, logging and checkpointing happen here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import torch

from promptkd.config import Config
from promptkd.data.batch import SequenceBatch
from promptkd.errors import NonFiniteError, TrainingInterrupted, UserError
from promptkd.models.loading import eos_token_ids
from promptkd.sampling import response_logits
from promptkd.training.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from promptkd.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

# What a run writes into train.output_dir; --overwrite removes these and nothing else.
RUN_ARTEFACTS = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "final.tmp", "best", "best.tmp")
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


class PromptState:
    """Adapter so accelerate's checkpointing saves and restores a method's extra tensors."""

    def __init__(self, get_state, set_state):
        self._get, self._set = get_state, set_state

    def state_dict(self):
        return self._get()

    def load_state_dict(self, state):
        self._set(state)


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False, show_progress: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.show_progress = show_progress
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.step = 0
        self.nonfinite_skips = 0
        self.overflows: dict[str, int] = {}  # fp16 loss-scale overflows per parameter set
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.teacher = None
        self._stop_message: str | None = None  # set by the non-finite guard to end training

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
                raise UserError(
                    f"output directory {self.output_dir} already holds a run; "
                    "pass --resume to continue it or --overwrite to replace it"
                )
            if self.accelerator.is_main_process:
                self._remove_run_artefacts()
            self.accelerator.wait_for_everyone()

    def _remove_run_artefacts(self) -> None:
        """--overwrite: delete the previous run's files only; anything else in the directory stays."""
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
                logger.warning("--overwrite: kept %s (it holds files other than tracker logs)", tracker)

    def setup(self) -> Trainer:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from promptkd.config import config_warnings
        from promptkd.methods import get_method_class
        from promptkd.models.loading import (
            ModelSpec,
            check_tokenizer_compatibility,
            load_model_and_tokenizer,
        )

        cfg = self.cfg
        for w in config_warnings(cfg):
            warnings.warn(w, UserWarning, stacklevel=2)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.accelerator = Accelerator(
            cpu=cfg.train.cpu,
            mixed_precision=cfg.train.mixed_precision,
            step_scheduler_with_optimizer=False,  # our schedules count optimizer steps, not batches
            log_with=cfg.train.trackers or None,
            project_dir=str(self.output_dir),
        )
        self._check_output_dir()
        self._check_distributed_backend()
        set_seed(cfg.train.seed)

        method_cls = get_method_class(cfg.method)
        self.student, self.tokenizer = load_model_and_tokenizer(
            ModelSpec(cfg.model.student, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        )
        self.vocab_size = self.student.get_output_embeddings().weight.shape[0]
        if method_cls.needs_teacher(cfg):
            self.teacher, teacher_tok = load_model_and_tokenizer(
                ModelSpec(cfg.model.teacher, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
            )
            self.vocab_size = check_tokenizer_compatibility(teacher_tok, self.tokenizer, self.teacher, self.student)
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            self.teacher.to(self.accelerator.device)
            self._teacher_linears_to_compute_dtype()
        if cfg.train.gradient_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.student.config.use_cache = False
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.student)

        from promptkd.samplers import build_sampler

        self.sampler = build_sampler(cfg.train.sampler, self)
        self.method = method_cls(self)
        self.train_examples = self.method.load_train_examples()
        self.dev_examples = self._load_dev_examples()
        self.data_order = DataOrder(len(self.train_examples), cfg.train.seed)

        self.student_optimizer = build_optimizer(
            self.student.parameters(),
            lr=cfg.train.learning_rate,
            weight_decay=cfg.train.weight_decay,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        )
        self.student_scheduler = build_scheduler(
            self.student_optimizer,
            name=cfg.train.lr_scheduler,
            warmup_steps=cfg.train.warmup_steps,
            total_steps=cfg.train.max_steps,
        )
        self.student, self.student_optimizer, self.student_scheduler = self.accelerator.prepare(
            self.student, self.student_optimizer, self.student_scheduler
        )
        self.method.setup()
        self.accelerator.register_for_checkpointing(PromptState(self._extra_state, self._load_extra_state))

        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        if self.resume:
            self._restore()
        elif self.accelerator.is_main_process:
            cfg.save(self.output_dir / "config.yaml")
            self.metrics_path.write_text("", encoding="utf-8")
        if cfg.train.trackers:
            self.accelerator.init_trackers("promptkd", config=_flatten(cfg.to_dict()))
        self.accelerator.wait_for_everyone()
        return self

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

    def gathered_student(self):
        """Context in which the *unwrapped* student may run forward / generate.

        Under FSDP1 the root module's own parameters (embeddings, final norm, LM head) stay
        sharded outside the wrapped forward, so they are gathered here (the decoder layers,
        wrapped separately, gather themselves). A no-op for one process, DDP, FSDP2 and
        DeepSpeed.
        """
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP and not getattr(self.accelerator, "is_fsdp2", False):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP.summon_full_params(self.student, recurse=False, writeback=False)
        return contextlib.nullcontext()

    def _load_dev_examples(self):
        if not self.cfg.data.dev:
            return []
        from promptkd.data.dataset import build_examples
        from promptkd.data.records import load_records

        records = load_records(self.cfg.data.dev, split=self.cfg.data.dev_split, data_files=self.cfg.data.dev_data_files)
        examples, _ = build_examples(
            records,
            self.tokenizer,
            template=self.cfg.data.template,
            max_prompt_length=self.cfg.data.max_prompt_length,
            max_length=self.cfg.data.max_length,
            max_response_length=self.cfg.data.max_response_length,
            source=self.cfg.data.dev,
        )
        if self.cfg.data.max_dev_examples:
            examples = examples[: self.cfg.data.max_dev_examples]
        return examples

    # ------------------------------------------------------------------ resume

    def _extra_state(self) -> dict:
        return self.method.extra_state_dict()

    def _load_extra_state(self, state: dict) -> None:
        self.method.load_extra_state_dict(state)

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
            "nonfinite_skips": self.nonfinite_skips,
            "overflows": self.overflows,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "world_size": self.accelerator.num_processes,
            "rng_fingerprint": _rng_fingerprint(),
        }

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.checkpoints_dir)
        if ckpt is None:
            raise UserError(
                f"--resume: no complete checkpoint under {self.checkpoints_dir} "
                "(set train.save_every so runs write checkpoints, or start without --resume)"
            )
        saved_cfg = self.output_dir / "config.yaml"
        saved_method = (_read_yaml_mapping(saved_cfg) or {}).get("method") if saved_cfg.is_file() else None
        if saved_method not in (None, self.cfg.method):
            raise UserError(
                f"--resume: {self.output_dir} holds a '{saved_method}' run but the config says method "
                f"'{self.cfg.method}'; resume with the run's own config (omit --config) or use another "
                "train.output_dir"
            )
        try:
            self.accelerator.load_state(str(ckpt))
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. another student architecture
            detail = " ".join(str(e).split())  # one line
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            raise UserError(
                f"--resume: checkpoint {ckpt} does not fit this configuration ({type(e).__name__}: "
                f"{detail}); resume with the run's own config (omit --config) or use another "
                "train.output_dir"
            ) from e
        state = load_trainer_state(ckpt)
        self.step = state["step"]
        self.data_order.position = state["data_position"]
        self.nonfinite_skips = state["nonfinite_skips"]
        self.overflows = dict(state.get("overflows", {}))
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        if self.accelerator.is_main_process:
            # accelerate ignores an unreadable RNG file silently; an inexact resume should not be
            if state.get("rng_fingerprint") not in (None, _rng_fingerprint()):
                warnings.warn(
                    f"random-number generator states were not restored from {ckpt}: the resumed run "
                    "will not reproduce an uninterrupted one exactly",
                    RuntimeWarning,
                    stacklevel=2,
                )
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

    # ------------------------------------------------------------------ shared mechanics

    def _teacher_linears_to_compute_dtype(self) -> None:
        """Under bf16 (or CUDA fp16) autocast, hold the frozen teacher's linear weights in that dtype.

        Every teacher forward runs under `self.autocast()`, which would otherwise cast each
        linear weight at every call: same numbers (tests/test_prompted_teacher.py), fewer cast
        kernels, about half the teacher's weight memory.
        """
        mp = self.cfg.train.mixed_precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
        if dtype is None or (dtype is torch.float16 and self.accelerator.device.type != "cuda"):
            return
        from promptkd.models.loading import cast_frozen_linear_weights

        cast_frozen_linear_weights(self.teacher, dtype)

    @property
    def unwrapped_student(self):
        return self.accelerator.unwrap_model(self.student)

    def autocast(self):
        return self.accelerator.autocast()

    def response_logits(self, model, batch: SequenceBatch, **kwargs) -> torch.Tensor:
        """(B, T - P, V) logits predicting the response columns (`sampling.response_logits`), autocast."""
        with self.autocast():
            return response_logits(model, batch, self.vocab_size, **kwargs)

    @staticmethod
    def response_mask(batch: SequenceBatch) -> torch.Tensor:
        return batch.loss_mask[:, batch.prompt_length :]  # (B, T - P)

    def sample(self, examples, model=None, *, training: bool = True) -> SequenceBatch:
        """Sampled responses (of the current student unless `model` is given) for these prompts.

        `sampling.eos_at_cap` (or the method's default) applies to the student's training
        samples only, never to teacher samples or dev evaluation (`training=False`)."""
        from promptkd.data.collate import collate_prompts

        prompt_ids, prompt_mask = collate_prompts(examples, self.pad_token_id)
        s = self.cfg.sampling
        gather = self.gathered_student() if model is None else contextlib.nullcontext()
        with gather, self.autocast():
            batch = self.sampler(
                model if model is not None else self.unwrapped_student,
                prompt_ids.to(self.accelerator.device),
                prompt_mask.to(self.accelerator.device),
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                config=s.to_sampling_config(self.method.eos_at_cap_default)
                if model is None and training
                else dataclasses.replace(s.to_sampling_config(), eos_at_cap=False),
            )
        return batch

    def collate(self, examples) -> SequenceBatch:
        from promptkd.data.collate import collate_sequences

        return collate_sequences(examples, self.pad_token_id).to(self.accelerator.device)

    def global_token_count(self, batches: list[SequenceBatch]) -> float:
        """Response tokens of this optimizer step summed over micro-batches and processes."""
        local = sum(self.response_mask(b).sum() for b in batches)
        total = self.accelerator.reduce(torch.as_tensor(local, device=self.accelerator.device, dtype=torch.float64), "sum")
        return float(total.item())

    def loss_scale(self, global_tokens: float) -> float:
        """Multiply a micro-batch's summed loss by this so gradients equal sum / global tokens.

        DDP averages gradients over processes, hence the factor num_processes.
        """
        return self.accelerator.num_processes / max(global_tokens, 1.0)

    def reduce_sum(self, value: float) -> float:
        t = torch.tensor(float(value), device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(t, "sum").item())

    def all_reduce_grads(self, params) -> None:
        """Average gradients of parameters not wrapped by DDP (the soft prompt) over processes."""
        if self.accelerator.num_processes == 1:
            return
        for p in params:
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, "mean")

    def apply_update(self, name: str, optimizer, scheduler, params, loss_value: float) -> dict:
        """Non-finite guard, clipping, optimizer and scheduler step for one parameter set.

        Under fp16 loss scaling (a GradScaler, CUDA) an infinite gradient with a finite loss is
        an overflow, which is normal: the update goes through the scaler, which skips it and
        lowers the scale (GradScaler's protocol), and it is counted in `{name}/overflows`, not as
        a non-finite failure; the learning-rate schedule does not advance on an overflow. A
        non-finite loss is a failure with or without a scaler (`train.nonfinite`).
        """
        params = list(params)
        scaler = self.accelerator.scaler
        max_norm = self.cfg.train.max_grad_norm
        if max_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(params, max_norm)  # unscales first
        else:
            if scaler is not None:
                self.accelerator.unscale_gradients()
            grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            grad_norm = torch.stack(grads).norm() if grads else torch.tensor(0.0)
        grad_norm = float(grad_norm)  # of the unscaled gradients
        loss_finite = self.reduce_sum(0.0 if math.isfinite(loss_value) else 1.0) == 0.0
        grads_finite = self.reduce_sum(0.0 if math.isfinite(grad_norm) else 1.0) == 0.0
        lr = scheduler.get_last_lr()[0]
        out = {f"{name}/grad_norm": grad_norm, f"{name}/lr": lr}
        overflow = False
        if scaler is not None and loss_finite:
            # The scaler decides: it steps on finite gradients, and on inf/NaN gradients it skips
            # the step and lowers the scale. Not calling optimizer.step() here would leave the
            # gradients unscaled without scaler.update(), and the next unscale_() would fail.
            optimizer.step()
            overflow = not grads_finite
            if overflow:
                self.overflows[name] = self.overflows.get(name, 0) + 1
                logger.info("fp16 overflow in the %s update at step %d: skipped, loss scale now %g",
                            name, self.step + 1, scaler.get_scale())
            out[f"{name}/overflows"] = self.overflows.get(name, 0)
        elif loss_finite and grads_finite:
            optimizer.step()
        else:
            if scaler is not None:
                # close the scaler's iteration (the gradients were unscaled above) with a backoff
                scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
            self._on_nonfinite(name, loss_value, grad_norm)
        optimizer.zero_grad(set_to_none=True)
        if not overflow:
            with warnings.catch_warnings():  # a skipped non-finite update advances the schedule, on purpose
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
        return out

    def _on_nonfinite(self, name: str, loss_value: float, grad_norm: float) -> None:
        """The update was skipped. With train.nonfinite stop (or after max_nonfinite_skips skips)
        training ends once this step is complete: `train()` checkpoints the finished step and
        raises NonFiniteError, so the checkpoint is a consistent, resumable state (stopping in
        the middle of a step would mix one parameter set's new state with another's old one)."""
        self.nonfinite_skips += 1
        msg = (
            f"non-finite {name} update at step {self.step + 1} (loss {loss_value}, grad norm {grad_norm})"
        )
        t = self.cfg.train
        if t.nonfinite == "stop" or self.nonfinite_skips >= t.max_nonfinite_skips:
            if self._stop_message is None:
                reason = "" if t.nonfinite == "stop" else f" ({self.nonfinite_skips} updates skipped, train.max_nonfinite_skips)"
                self._stop_message = msg + reason
            return
        warnings.warn(msg + f"; update skipped ({self.nonfinite_skips} so far)", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ data

    def next_micro_batches(self) -> list[list]:
        """This process's micro-batches for the next optimizer step (accumulation x batch_size)."""
        t = self.cfg.train
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        indices = self.data_order.take(t.batch_size * t.gradient_accumulation_steps * world)
        out = []
        for m in range(t.gradient_accumulation_steps):
            start = (m * world + rank) * t.batch_size
            out.append([self.train_examples[i] for i in indices[start : start + t.batch_size]])
        return out

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.dev_examples:
            return {}
        if self.cfg.train.eval_metric == "loss":
            return {"dev/loss": self._dev_loss()}
        return {"dev/rougeL": self._dev_rouge()}

    def _dev_loss(self) -> float:
        model = self.unwrapped_student
        was_training = model.training
        model.eval()
        total, count = 0.0, 0.0
        for chunk, indices in self._dev_shards():
            batch = self.collate(chunk)
            with self.gathered_student():
                logits = self.response_logits(model, batch).float()
            if indices is None:  # a filler batch that keeps the processes in step
                continue
            mask = self.response_mask(batch)
            targets = batch.input_ids[:, batch.prompt_length :]
            nll = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
            total += float(nll)
            count += float(mask.sum())
        model.train(was_training)
        return self.reduce_sum(total) / max(self.reduce_sum(count), 1.0)

    def _dev_rouge(self) -> float:
        from promptkd.evaluation.metric import corpus_rouge_l

        model = self.unwrapped_student
        was_training = model.training
        scored = []  # (dev index, prediction) of this process's share
        for chunk, indices in self._dev_shards():
            batch = self.sample(chunk, training=False)
            if indices is None:  # a filler batch that keeps the processes in step
                continue
            resp = batch.input_ids[:, batch.prompt_length :]
            mask = batch.loss_mask[:, batch.prompt_length :]
            for row, m, i in zip(resp, mask, indices, strict=True):
                scored.append((i, self.tokenizer.decode(row[m], skip_special_tokens=True).strip()))
        model.train(was_training)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            # every process scores the same complete list, so best-checkpoint decisions agree
            scored = gather_object(scored)
        scored.sort(key=lambda x: x[0])
        return corpus_rouge_l([p for _, p in scored], [self.dev_examples[i].references for i, _ in scored])

    def _dev_shards(self):
        """This process's dev batches as (examples, dev indices), the same count on every process.

        A process with no examples left gets a filler copy of the first batch with indices
        None, so that collectives inside forward / generate (FSDP) stay matched.
        """
        bs = self.cfg.train.batch_size
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        n = len(self.dev_examples)
        for it in range(math.ceil(n / (bs * world))):
            start = (it * world + rank) * bs
            indices = list(range(start, min(start + bs, n)))
            if indices:
                yield [self.dev_examples[i] for i in indices], indices
            else:
                yield self.dev_examples[:bs], None

    # ------------------------------------------------------------------ outputs

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.cfg.train.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def save(self, final: bool) -> None:
        self._last_save_time = time.monotonic()
        save_checkpoint(
            self.accelerator, self.checkpoints_dir, self.step, self._trainer_state(), self.cfg.train.keep_last
        )
        if final:
            self.export(self.output_dir / "final")

    def export(self, out_dir: Path) -> None:
        """Student in save_pretrained format (+ tokenizer) and the method's artefacts."""
        self.accelerator.wait_for_everyone()
        # every process takes part: a collective under FSDP / ZeRO-3 (full weights on the main one)
        state_dict = self.accelerator.get_state_dict(self.student)
        if self.accelerator.is_main_process:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            student = self.unwrapped_student
            student.save_pretrained(tmp / "student", state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "student")
            self.method.export(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.rename(tmp, out_dir)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ loop

    def train(self) -> dict:
        from tqdm.auto import tqdm

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
        with _StopSignals() as signals:  # the final save, too, completes before a signal is acted on
            last = self._train_steps(bar, last, signals)
            bar.close()
            self.save(final=True)
        if cfg.trackers:
            self.accelerator.end_training()
        return last

    def _train_steps(self, bar, last: dict, signals: _StopSignals) -> dict:
        """Optimizer steps until max_steps; a SIGINT / SIGTERM checkpoints and raises after a step."""
        cfg = self.cfg.train
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            micro_batches = self.next_micro_batches()
            metrics = self.method.step(micro_batches)
            self.step += 1
            dt = time.perf_counter() - t0
            trained = self.reduce_sum(metrics.pop("_trained_tokens", 0.0))
            generated = self.reduce_sum(metrics.pop("_generated_tokens", 0.0))
            record = {"step": self.step, "epoch": round(self.data_order.epoch, 4), **metrics}
            record.update(step_time=dt, trained_tokens=trained, trained_tokens_per_s=trained / dt,
                          generated_tokens=generated)
            if self.nonfinite_skips:
                record["nonfinite_skips"] = self.nonfinite_skips
            do_eval = bool(self.dev_examples) and (
                (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps
            )
            if do_eval:
                record.update(self.evaluate())
                self._maybe_save_best(record)
            if self.step % cfg.log_every == 0 or do_eval or self.step == cfg.max_steps:
                self.log(record)
            last = record
            loss_key = next((k for k in record if k.endswith("loss")), None)
            bar.set_postfix(
                {
                    **({loss_key: f"{record[loss_key]:.4f}"} if loss_key else {}),
                    "s/step": f"{dt:.2f}",
                    "tok/s": f"{record['trained_tokens_per_s']:.0f}",
                },
                refresh=False,
            )
            bar.update(1)
            if self._stop_message is not None:
                bar.close()
                self.save(final=False)
                raise NonFiniteError(
                    f"{self._stop_message}; the update was skipped and training stopped with a checkpoint "
                    f"at step {self.step} in {self.checkpoints_dir}: lower train.learning_rate, try "
                    "train.mixed_precision no or set train.nonfinite skip, then continue with "
                    f"--resume {self.output_dir}"
                )
            if self.step >= cfg.max_steps:
                break
            stop_signal, time_due = self._poll_stop_and_timer(signals)
            if (cfg.save_every and self.step % cfg.save_every == 0) or time_due or stop_signal:
                self.save(final=False)
            if stop_signal:
                bar.close()
                name = signal.Signals(stop_signal).name
                raise TrainingInterrupted(
                    f"{name} received: stopped after step {self.step} of {cfg.max_steps}, checkpoint written "
                    f"to {self.checkpoints_dir / f'step-{self.step:08d}'}; continue with: "
                    f"promptkd train --resume {self.output_dir}",
                    stop_signal,
                )
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
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite, show_progress=show_progress).setup()
    return trainer.train()
