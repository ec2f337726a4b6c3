"""The step context: what a method's `setup` and `step` may use, and nothing else.

`TrainingContext` implements `promptkd.methods.base.StepContext` on top of `accelerate`:
forward passes with autocast, on-policy sampling, the global token count and loss scale,
backward, parameter sets (an AdamW optimizer and a schedule each) and their updates with the
non-finite guard and fp16 loss scaling, reductions over processes, and named phases that a
profiler can time (`on_phase`). The trainer builds one per run; methods never see the trainer.
Sampling and forwards count their token-passes (`promptkd.training.compute`), which the trainer
takes after every step (`take_compute`).

Forwards return `promptkd.losses.Outputs`. The context finds the student's and the teacher's LM
heads once (`promptkd.models.head.lm_head_of`, with its check forward under the run's autocast)
and then serves final hidden states + heads, which the losses turn into logits a chunk at a time.
When a head cannot be used that way (LoRA on lm_head, a head that is not a plain Linear, an
unknown output transform) or the student is sharded by accelerate (FSDP1, DeepSpeed ZeRO-3), one
info line says why and the forwards serve full logits. Under train.fsdp (FSDP2, both models
sharded by the trainer) the root unit of each model, which holds the LM head, stays gathered from
its forward until the backward through it, so each forward serves the head it ran with
(`promptkd.models.sharding`); the head's gradient goes to the gathered weight and FSDP
reduce-scatters it into the shards with the other gradients.

Across tokenizers (`cross_tokenizer` set), a teacher forward runs on the teacher's tokenization of
the batch and returns `promptkd.cross_tokenizer.Aligned` outputs (docs/method.md section 11).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from promptkd.cross_tokenizer import Aligned, CrossTokenizer
from promptkd.data.batch import SequenceBatch
from promptkd.data.collate import collate_prompts, collate_sequences
from promptkd.errors import UserError
from promptkd.losses import Outputs
from promptkd.methods.base import outputs_of
from promptkd.models.head import LMHead, lm_head_of
from promptkd.models.sharding import gather_root, is_sharded
from promptkd.sampling import TeacherMixture
from promptkd.training.compute import Compute
from promptkd.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


@dataclass
class ParameterSet:
    """One trained set of parameters with its own (prepared) optimizer and schedule."""

    name: str
    params: list
    optimizer: object
    scheduler: object


@dataclass
class UpdateGuard:
    """Bookkeeping of skipped updates, saved in every checkpoint.

    nonfinite_skips: updates skipped for a non-finite loss or gradient (train.nonfinite);
    overflows:       fp16 loss-scale overflows per parameter set (normal; not failures);
    stop_message:    set when training must stop after this step (nonfinite stop / too many skips).
    """

    nonfinite: str = "skip"
    max_nonfinite_skips: int = 20
    nonfinite_skips: int = 0
    overflows: dict[str, int] = field(default_factory=dict)
    stop_message: str | None = None

    def on_nonfinite(self, name: str, step: int, loss_value: float, grad_norm: float) -> None:
        """The update was skipped. With nonfinite stop (or after max_nonfinite_skips skips) the
        trainer ends training once this step is complete and checkpointed (stopping inside the
        step would mix one parameter set's new state with another's old one)."""
        self.nonfinite_skips += 1
        msg = f"non-finite {name} update at step {step} (loss {loss_value}, grad norm {grad_norm})"
        if self.nonfinite == "stop" or self.nonfinite_skips >= self.max_nonfinite_skips:
            if self.stop_message is None:
                reason = "" if self.nonfinite == "stop" else f" ({self.nonfinite_skips} updates skipped, train.max_nonfinite_skips)"
                self.stop_message = msg + reason
            return
        logger.warning("%s; update skipped (%d so far)", msg, self.nonfinite_skips)


class PhaseClock:
    """Wall time per named phase for a profiler callback; nested phases count in the outermost.

    `sync` (e.g. torch.cuda.synchronize) runs at both ends of an outermost phase, so an
    accelerator's queued kernels are charged to the phase that launched them.
    """

    def __init__(self, on_phase: Callable[[str, float], None], sync: Callable[[], None] | None = None):
        self.on_phase = on_phase
        self.sync = sync or (lambda: None)
        self.depth = 0

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.depth:
            yield
            return
        self.depth += 1
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.depth -= 1
            self.on_phase(name, time.perf_counter() - start)


class TrainingContext:
    """The `StepContext` of a training run (see promptkd.methods.base.StepContext).

    Built by the trainer from its components; `step` is kept equal to the optimizer steps done.
    """

    def __init__(self, *, accelerator, student, teacher, tokenizer, vocab_size: int, sampler, sampling,
                 eos_token_ids: list[int], eos_at_cap_default: bool, train_cfg, guard: UpdateGuard,
                 on_phase: Callable[[str, float], None] | None = None, teacher_tokenizer=None,
                 teacher_vocab_size: int | None = None, cross_tokenizer: CrossTokenizer | None = None):
        self.accelerator = accelerator
        self.student = student  # prepared (DDP / FSDP-wrapped when distributed), or sharded by train.fsdp
        self.sharded = is_sharded(student)  # train.fsdp: FSDP2 units (the teacher's too)
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else tokenizer
        self.teacher_vocab_size = teacher_vocab_size or vocab_size  # the teacher's logit columns
        self.cross_tokenizer = cross_tokenizer  # None: one tokenizer (the exact path)
        self.sampler = sampler
        self.sampling = sampling.to_sampling_config(eos_at_cap_default)  # the student's training samples
        self.plain_sampling = dataclasses.replace(self.sampling, eos_at_cap=False)  # teacher samples, dev evaluation
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = tokenizer.pad_token_id
        self.train_cfg = train_cfg
        self.guard = guard
        self.step = 0
        self.epoch = 0.0  # passes over the training data, this step's batch included (set by the trainer)
        self.max_steps = train_cfg.max_steps
        self.seed = train_cfg.seed
        self.dev_loss_fn: Callable[[], float | None] | None = None  # set by the trainer
        self.extra_examples: dict[str, list] = {}  # a method's own data by config key, set by the trainer
        self.param_sets: dict[str, ParameterSet] = {}
        self.updates_applied = 0  # apply_update calls, any set: the trained state's version
        self.compute = Compute()  # this process's token-passes since the last take_compute
        self._clock = None
        if on_phase is not None:
            device = accelerator.device
            sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
            self._clock = PhaseClock(on_phase, sync)
        self.student_head: LMHead | None = None
        self.teacher_head: LMHead | None = None
        self.chunked_fallback: str | None = None  # why the forwards serve full logits
        self._find_heads()

    def _find_heads(self) -> None:
        """The LM heads for chunked losses, or (logged once) why the run uses full logits."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind == DistributedType.FSDP:
            why = "FSDP shards the student's LM head weight"
        elif kind == DistributedType.DEEPSPEED and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            why = "DeepSpeed ZeRO-3 shards the student's LM head weight"
        else:
            heads, why = {}, None
            for name, model in (("student", self.student), ("teacher", self.teacher)):
                try:
                    if model is not None:
                        gather_root(model)  # FSDP2: the whole head weight, as after every forward
                    with self.autocast():  # the check forward runs as the training forwards do
                        vocab = self.vocab_size if name == "student" else self.teacher_vocab_size
                        heads[name] = None if model is None else lm_head_of(model, vocab)
                except UserError as err:
                    why = f"{name}: {err}"
                    break
            if why is None:
                self.student_head, self.teacher_head = heads["student"], heads["teacher"]
                return
        self.chunked_fallback = why
        if self.is_main_process:
            logger.info("the losses use full (batch, response, vocabulary) logits: %s", why)

    # ---------------------------------------------------------------- facts
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def student_module(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.student)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    # ---------------------------------------------------------------- profiling and precision
    def phase(self, name: str):
        """A named phase for the profiler (`on_phase(name, seconds)`); free when none is attached."""
        return self._clock(name) if self._clock is not None else contextlib.nullcontext()

    def autocast(self):
        return self.accelerator.autocast()

    # ---------------------------------------------------------------- compute
    def take_compute(self) -> Compute:
        """The token-passes counted since the last call, summed over processes (every process must
        call it); counting starts again from zero."""
        step, self.compute = self.compute, Compute()
        return step.reduced(self.reduce_sum)

    @contextlib.contextmanager
    def uncounted(self):
        """Sampling and forwards inside are not training compute (dev evaluation): not counted."""
        counted, self.compute = self.compute, Compute()
        try:
            yield
        finally:
            self.compute = counted

    def gathered_student(self):
        """Context in which the *unwrapped* student may run forward / generate.

        Under FSDP1 the root module's own parameters (embeddings, final norm, LM head) stay
        sharded outside the wrapped forward, so they are gathered here (the decoder layers,
        wrapped separately, gather themselves). A no-op for one process, DDP, train.fsdp (FSDP2
        units gather themselves in their forward, the root included) and DeepSpeed.
        """
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP.summon_full_params(self.student, recurse=False, writeback=False)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- batches
    def sample(self, examples: Sequence, *, from_teacher: bool = False, training: bool = True,
               teacher_mix: float = 0.0) -> SequenceBatch:
        """Sampled responses of the current student (or the teacher) for these examples' prompts.

        `sampling.eos_at_cap` (or the method's default) applies to the student's training
        samples only, never to teacher samples or dev evaluation (`training=False`).
        `teacher_mix` > 0 samples every token from (1 - teacher_mix) p_S + teacher_mix p_T
        (`promptkd.sampling.TeacherMixture`, MiniLLM); it needs a sampler backend that takes
        logits processors (the default "hf" does).
        """
        prompt_ids, prompt_mask = collate_prompts(examples, self.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        config = self.plain_sampling if from_teacher or not training else self.sampling
        if self.cross_tokenizer is not None and (from_teacher or teacher_mix > 0):
            raise UserError("sampling from the teacher needs one tokenizer (the prompts are the student's tokens)")
        model = self.teacher if from_teacher else self.student_module
        gather = contextlib.nullcontext() if from_teacher else self.gathered_student()
        extra = {}
        mixed = teacher_mix > 0 and not from_teacher
        if mixed:
            if not getattr(self.sampler, "supports_logits_processor", False):
                raise UserError(
                    f"teacher-mixed sampling needs a sampler that takes logits processors; train.sampler "
                    f"{self.train_cfg.sampler!r} does not: use train.sampler hf or set minillm.teacher_mix_alpha 0"
                )
            # the processor applies the temperature itself: generate's warpers run after it
            extra["logits_processor"] = [TeacherMixture(
                self.teacher, prompt_mask, alpha=teacher_mix, vocab_size=self.vocab_size,
                temperature=config.temperature, autocast=self.autocast,
            )]
            config = dataclasses.replace(config, temperature=1.0)
        with self.phase("generation"), gather, self.autocast():
            batch = self.sampler(
                model,
                prompt_ids,
                prompt_mask,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                config=config,
                **extra,
            )
        # with a KV cache: the prompt once (prefill), then one forward per generated token; the
        # teacher in a TeacherMixture keeps a KV cache of its own and runs the same positions
        generated = float(batch.attention_mask[:, batch.prompt_length :].sum())
        passes = float(prompt_mask.sum()) + generated
        self.compute.generated_tokens += generated
        if from_teacher or mixed:
            self.compute.teacher_forward_tokens += passes
        if not from_teacher:
            self.compute.student_forward_tokens += passes
        return batch

    def collate(self, examples: Sequence) -> SequenceBatch:
        """Prompt + reference response batch of these examples, on the training device."""
        return collate_sequences(examples, self.pad_token_id).to(self.device)

    # ---------------------------------------------------------------- forwards
    def student_forward(self, batch: SequenceBatch, *, target: bool = False, logits: bool = False) -> Outputs:
        """The student's outputs on the response columns, under autocast: with grad through the
        (DDP-wrapped) training student, or as a `target`: eval mode (no dropout), no grad.
        `logits`: full (B, R, V) logits instead of hidden states + head."""
        head = None if logits else self.student_head
        tokens = float(batch.attention_mask.sum())
        self.compute.student_forward_tokens += tokens
        if not target:
            self.compute.student_backward_tokens += tokens  # a forward with grad is one a backward goes through
            with self.phase("student_fwd"), self.autocast():
                return self._outputs(self.student, batch, head)
        model = self.student_module
        was_training = model.training
        model.eval()
        try:
            with self.phase("student_fwd"), torch.no_grad(), self.gathered_student(), self.autocast():
                return self._outputs(model, batch, head)
        finally:
            model.train(was_training)

    def teacher_forward(self, batch: SequenceBatch, *, model: torch.nn.Module | None = None, base: bool = False,
                        grad: bool = False, logits: bool = False) -> Outputs | Aligned:
        """The teacher's outputs on the response columns under autocast, no grad unless `grad`.
        `model`: a module around the teacher that a method trains (PromptKD's prompted teacher,
        with the teacher's head); `base` runs it without its own parameters. `logits` as above.
        Across tokenizers: `Aligned` outputs on the teacher's tokenization of `batch`."""
        alignment = None
        if self.cross_tokenizer is not None:
            alignment = self.cross_tokenizer.teacher_batch(batch)
            batch = alignment.teacher_batch
        grad_mode = contextlib.nullcontext() if grad else torch.no_grad()
        # a prompted teacher runs its virtual tokens too (not with `base`)
        virtual = 0 if base or model is None else getattr(model, "num_virtual_tokens", 0)
        tokens = float(batch.attention_mask.sum()) + virtual * batch.input_ids.shape[0]
        self.compute.teacher_forward_tokens += tokens
        if grad:
            self.compute.teacher_backward_tokens += tokens  # activations only: the teacher is frozen
        with self.phase("teacher_fwd_base"), grad_mode, self.autocast():
            out = self._outputs(model if model is not None else self.teacher, batch, None if logits else self.teacher_head,
                                vocab_size=self.teacher_vocab_size, **({"base": True} if base else {}))
        return out if alignment is None else Aligned(out, alignment)

    def _outputs(self, model, batch: SequenceBatch, head: LMHead | None, vocab_size: int | None = None,
                 **kwargs) -> Outputs:
        """`outputs_of` in the caller's grad mode; under train.fsdp with the head weight this forward
        gathered (FSDP2 swaps a module's weight between its shard and the whole tensor)."""
        vocab_size = vocab_size or self.vocab_size
        out = outputs_of(model, batch, head, vocab_size, **kwargs)
        if head is None or not self.sharded:
            return out
        head = lm_head_of(model, vocab_size, check=False)  # checked once, in _find_heads
        return Outputs(out.states, head if torch.is_grad_enabled() else head.detached(), out.autocast_dtype)

    # ---------------------------------------------------------------- normalisation and backward
    def accumulate(self, is_last: bool):
        """Around a micro-batch's student forward + backward: skip DDP's gradient all-reduce on
        all but the last micro-batch of a step. FSDP2 (train.fsdp) reduce-scatters every
        micro-batch's gradients into the shards: skipping that would hold whole gradients."""
        if is_last or self.accelerator.num_processes == 1 or self.sharded:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.student)

    def backward(self, loss_sum: torch.Tensor, tokens: float) -> None:
        """Backward of a micro-batch's summed loss as its share of the step's token mean:
        gradients equal sum / tokens (`tokens` from promptkd.methods.base.step_tokens). DDP (and FSDP2's
        reduce-scatter) averages gradients over processes, hence the factor num_processes."""
        with self.phase("backward_student"):
            self.accelerator.backward(loss_sum * (self.accelerator.num_processes / max(tokens, 1.0)))

    def reduce_sum(self, value: float) -> float:
        t = torch.tensor(float(value), device=self.device, dtype=torch.float64)
        return float(self.accelerator.reduce(t, "sum").item())

    def gather_object(self, obj) -> list:
        """[obj of process 0, obj of process 1, ...] on every process (picklable objects)."""
        if self.accelerator.num_processes == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def dev_loss(self) -> float | None:
        """The student's token-mean CE on the dev responses (data.dev), reduced over processes;
        None without dev data. Every process must call it. While training, the trainer runs the
        dev set once per student state: its own evaluation of the same step reuses the value."""
        return self.dev_loss_fn() if self.dev_loss_fn is not None else None

    def _average_grads(self, params: list) -> None:
        """Average gradients of parameters DDP does not wrap (a method's own set) over processes."""
        if self.accelerator.num_processes == 1:
            return
        for p in params:
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, "mean")

    # ---------------------------------------------------------------- parameter sets
    def add_parameter_set(self, name: str, params: list, *, learning_rate: float | None, weight_decay: float,
                          prepare: bool = True) -> ParameterSet:
        """Train `params` with their own AdamW and schedule (train.* betas, schedule, warm-up);
        learning_rate None = the student's (train.learning_rate).

        The student's set ("student") is added by the trainer; a method adds its own in setup
        (PromptKD: "prompt"). Optimizers and schedules are checkpointed in the order added.
        """
        if name in self.param_sets:
            raise ValueError(f"parameter set {name!r} exists already")
        t = self.train_cfg
        optimizer = build_optimizer(params, lr=t.learning_rate if learning_rate is None else learning_rate, weight_decay=weight_decay, betas=(t.adam_beta1, t.adam_beta2))
        scheduler = build_scheduler(optimizer, name=t.lr_scheduler, warmup_steps=t.warmup_steps, total_steps=t.max_steps)
        if prepare:
            optimizer, scheduler = self.accelerator.prepare(optimizer, scheduler)
        self.param_sets[name] = ParameterSet(name, list(params), optimizer, scheduler)
        return self.param_sets[name]

    def apply_update(self, name: str, loss_value: float) -> dict[str, float]:
        """Non-finite guard, clipping, optimizer and scheduler step for one parameter set. The
        gradients of a set other than the student's (which DDP averages) are averaged over
        processes first.

        Under fp16 loss scaling (a GradScaler, CUDA) an infinite gradient with a finite loss is
        an overflow, which is normal: the update goes through the scaler, which skips it and
        lowers the scale (GradScaler's protocol), and it is counted in `{name}/overflows`, not as
        a non-finite failure; the learning-rate schedule does not advance on an overflow. A
        non-finite loss is a failure with or without a scaler (`train.nonfinite`).
        """
        ps = self.param_sets[name]
        self.updates_applied += 1
        if name != "student":
            self._average_grads(ps.params)
        with self.phase("optimizer"):
            return self._apply_update(ps, loss_value)

    def _apply_update(self, ps: ParameterSet, loss_value: float) -> dict[str, float]:
        name, params, optimizer, scheduler = ps.name, ps.params, ps.optimizer, ps.scheduler
        scaler = self.accelerator.scaler
        max_norm = self.train_cfg.max_grad_norm
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
                self.guard.overflows[name] = self.guard.overflows.get(name, 0) + 1
                logger.info("fp16 overflow in the %s update at step %d: skipped, loss scale now %g",
                            name, self.step + 1, scaler.get_scale())
            out[f"{name}/overflows"] = self.guard.overflows.get(name, 0)
        elif loss_finite and grads_finite:
            optimizer.step()
        else:
            if scaler is not None:
                # close the scaler's iteration (the gradients were unscaled above) with a backoff
                scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
            self.guard.on_nonfinite(name, self.step + 1, loss_value, grad_norm)
        optimizer.zero_grad(set_to_none=True)
        if not overflow:
            with warnings.catch_warnings():  # a skipped non-finite update advances the schedule, on purpose
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
        return out
