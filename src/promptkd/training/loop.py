"""The one training loop shared by every method (`promptkd train`, `Trainer(...).train()`).

Each optimizer step takes `gradient_accumulation_steps` micro-batches per process from a seeded,
resumable data order and hands them to the method's `step(ctx, micro_batches)`; the method sees
only the step context (`promptkd.training.context`). Logging, checkpointing, the progress bar
and stopping on a signal happen here; the setup's parts have modules of their own: `assembly`
(accelerator, models), `data_sources`, `run_dir` (run directory, resume, export), `dev_eval`
and `console` (progress summary, signals, messages).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from promptkd.config import (
    METHOD_SECTIONS,
    Config,
    fit_warmup,
    load_config,
    merge_dicts,
    parse_overrides,
    validate_config,
)
from promptkd.data.order import DataOrder
from promptkd.methods import get_method_class
from promptkd.methods.base import StepResult
from promptkd.models.loading import eos_token_ids
from promptkd.samplers import build_sampler
from promptkd.training import assembly, data_sources, run_dir
from promptkd.training.checkpoint import MethodState, disk_size, link_duplicates, save_checkpoint
from promptkd.training.compute import Compute, matmul_params
from promptkd.training.console import StopSignals, progress_postfix, say
from promptkd.training.context import ParameterSet, TrainingContext, UpdateGuard
from promptkd.training.dev_eval import DevEvaluation
from promptkd.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


class Trainer:
    """Distils a student from a teacher with the configured method.

    Args:
        config: a `Config` (validated here), or a path / dict for `Trainer.from_config`.
        student, teacher, tokenizer: models and tokenizer you already hold; each one left None
            is loaded from `config.model` (the tokenizer from the student's source).
        teacher_tokenizer: the teacher's tokenizer when it is not the student's (cross-tokenizer
            distillation, model.cross_tokenizer); None: loaded with model.teacher, else `tokenizer`.
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
        student, teacher under train.fsdp (several processes): sharded in place with FSDP2 (their
            parameters become DTensor shards, their classes FSDP<name>).
        tokenizer: gets pad_token = eos_token when it has no pad token.
        train_dataset, eval_dataset: read, never changed.
    """

    def __init__(self, config: Config, *, student=None, teacher=None, tokenizer=None, teacher_tokenizer=None,
                 train_dataset=None, eval_dataset=None, resume: bool = False, overwrite: bool = False, show_progress: bool = True,
                 on_phase=None):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a promptkd Config (use Trainer.from_config for a path or dict), got {type(config).__name__}")
        self.cfg = config
        self._given = {"student": student, "teacher": teacher, "tokenizer": tokenizer,
                       "train_dataset": train_dataset, "eval_dataset": eval_dataset}
        validate_config(config, provided={k for k, v in self._given.items() if v is not None})
        self._given["teacher_tokenizer"] = teacher_tokenizer
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
        self.compute = Compute()  # token-passes since step 0, all processes (metrics compute/...)
        self.teacher = None
        self._teacher_flags = None  # a passed-in teacher's (requires_grad, training) flags
        self._is_setup = False

    @classmethod
    def from_config(cls, source, overrides: list[str] | dict | None = None, **kwargs) -> Trainer:
        """A Trainer from a YAML path, a dict or a Config, plus dotted overrides (the CLI path);
        `kwargs` are the constructor's (objects, resume, overwrite, show_progress, on_phase).

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

    def setup(self) -> Trainer:
        """Models, tokenizer, data, optimizers and the step context, prepared with accelerate."""
        if self._is_setup:
            return self
        from accelerate.utils import set_seed

        cfg, warmup_note = fit_warmup(self.cfg)
        self.cfg = cfg
        if warmup_note:
            logger.warning(warmup_note)
        self.accelerator, self.precision = assembly.accelerator_for(cfg.train)
        run_dir.check_output_dir(self.accelerator, self.output_dir, resume=self.resume, overwrite=self.overwrite)
        assembly.check_distributed_backend(cfg, self.accelerator)
        set_seed(cfg.train.seed)

        method_cls = get_method_class(cfg.method)
        options = getattr(cfg, METHOD_SECTIONS[cfg.method]) if cfg.method in METHOD_SECTIONS else None
        self.method = method_cls(options)
        main = self.accelerator.is_main_process
        given = self._given
        # the data before the models: a bad data source fails in seconds
        records = data_sources.read_sources(cfg, self.method, train_dataset=given["train_dataset"],
                                            eval_dataset=given["eval_dataset"])
        models = assembly.assemble_models(
            cfg, self.accelerator, self.precision, needs_teacher=method_cls.needs_teacher(options),
            student=given["student"], teacher=given["teacher"], tokenizer=given["tokenizer"],
            teacher_tokenizer=given["teacher_tokenizer"])
        self.student, self.tokenizer, self.teacher = models.student, models.tokenizer, models.teacher
        self.vocab_size, self._teacher_flags = models.vocab_size, models.teacher_flags
        # N of the FLOPs estimate, before prepare() may shard the student (FSDP, ZeRO-3)
        self.matmul_params = {"student": matmul_params(self.student), "teacher": matmul_params(self.teacher)}
        self.train_examples = data_sources.train_examples(cfg, self.method, self.tokenizer, records.pop("train"),
                                                          is_main_process=main)
        self.dev_examples = data_sources.dev_examples(cfg, self.tokenizer, records.pop("dev", None))
        self.data_order = DataOrder(len(self.train_examples), cfg.train.seed)

        t = cfg.train
        # train.fsdp: both models sharded (FSDP2) before the optimizer exists, which then holds the shards
        sharded = t.fsdp and assembly.shard_models(self.accelerator, self.teacher, self.student)
        optimizer = build_optimizer(self.student.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay,
                                    betas=(t.adam_beta1, t.adam_beta2))
        scheduler = build_scheduler(optimizer, name=t.lr_scheduler, warmup_steps=t.warmup_steps, total_steps=t.max_steps)
        self.student, optimizer, scheduler = assembly.prepare_student(self.accelerator, self.student, optimizer,
                                                                      scheduler, fsdp=t.fsdp, sharded=sharded)
        student_params = list(self.student.parameters())  # (the shards: before a forward gathers the root unit)
        self.ctx = TrainingContext(
            accelerator=self.accelerator, student=self.student, teacher=self.teacher, tokenizer=self.tokenizer,
            vocab_size=self.vocab_size, teacher_tokenizer=models.teacher_tokenizer,
            teacher_vocab_size=models.teacher_vocab_size, cross_tokenizer=models.cross_tokenizer, sampler=None, sampling=cfg.sampling,
            eos_token_ids=eos_token_ids(self.tokenizer, self.unwrapped_student),
            eos_at_cap_default=method_cls.eos_at_cap_default, train_cfg=t, guard=self.guard, on_phase=self.on_phase,
        )
        self.ctx.sampler = build_sampler(cfg.train.sampler, self.ctx)
        self.dev = DevEvaluation(self.ctx, self.tokenizer, self.dev_examples, batch_size=cfg.train.batch_size)
        self.ctx.dev_loss_fn = (lambda: self.dev.loss(show_progress=self.show_progress)) if self.dev_examples else None
        self.ctx.extra_examples = data_sources.method_examples(cfg, self.tokenizer, records, is_main_process=main)
        self.ctx.param_sets["student"] = ParameterSet("student", student_params, optimizer, scheduler)
        self.method.setup(self.ctx)
        self.accelerator.register_for_checkpointing(MethodState(self.method.state_dict, self.method.load_state_dict))

        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        if self.resume:
            run_dir.resume_trainer(self)
        elif main:
            run_dir.start_new_run(self.output_dir, cfg)
        if main:
            self._say(f"precision: {self.precision.describe()}")
            run_dir.write_precision(self.output_dir, self.precision, self.accelerator.device, self.matmul_params)
        if cfg.train.trackers:
            run_dir.init_trackers(self.accelerator, cfg)
        self.accelerator.wait_for_everyone()
        self._is_setup = True
        return self

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
        if not self._is_setup:
            self.setup()
        if micro_batches is None:
            micro_batches = self.next_micro_batches()
        self.ctx.step = self.step
        self.ctx.epoch = self.data_order.epoch
        result = self.method.step(self.ctx, micro_batches)
        self.compute += self.ctx.take_compute()
        self.step += 1
        self.ctx.step = self.step
        return result

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        """The dev evaluation of train.eval_metric ({"dev/loss": ...} or {"dev/rougeL": ...}; {}
        without a dev set)."""
        return self.dev.evaluate(self.cfg.train.eval_metric, show_progress=self.show_progress)

    # ------------------------------------------------------------------ outputs

    def _say(self, message: str) -> None:
        say(message, above_bar=self.show_progress and self.accelerator.is_main_process)

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.cfg.train.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def save(self, final: bool) -> None:
        self._last_save_time = time.monotonic()
        path = save_checkpoint(
            self.accelerator, self.checkpoints_dir, self.step, run_dir.trainer_state(self), self.cfg.train.keep_last
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
        run_dir.export_student(self.accelerator, self.student, self.tokenizer, self.method, out_dir,
                               merge_lora=self.cfg.model.student_lora.merge)

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
        with assembly.frozen_teacher(self.teacher, self._teacher_flags), StopSignals() as signals:
            with self.dev.memoised():
                last = self._train_steps(bar, last, signals)
            bar.close()
            self.save(final=True)
        if cfg.trackers:
            self.accelerator.end_training()
        return last

    def _train_steps(self, bar, last: dict, signals: StopSignals) -> dict:
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
            record.update(self.compute.record(self.matmul_params["student"], self.matmul_params["teacher"]))
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
                raise run_dir.stopped_nonfinite(self.output_dir, self.guard.stop_message, self.step)
            if self.step >= cfg.max_steps:
                break
            minutes = cfg.save_every_minutes
            due = minutes > 0 and time.monotonic() - self._last_save_time >= 60.0 * minutes
            stop_signal, time_due = signals.agreed(self.accelerator, checkpoint_due=due)
            if (cfg.save_every and self.step % cfg.save_every == 0) or time_due or stop_signal:
                self.save(final=False)
            if stop_signal:
                bar.close()
                raise run_dir.interrupted(self.output_dir, stop_signal, self.step, cfg.max_steps)
        return last

    def _maybe_save_best(self, record: dict) -> None:
        value = DevEvaluation.improved(self.cfg.train.eval_metric, record, self.best_metric)
        if value is not None:
            self.best_metric, self.best_step = value, self.step
            record["best"] = True
            self.export(self.output_dir / "best")

