"""Model assembly: where a run computes (the accelerator and its precision), the student,
tokenizer and teacher it trains with, taken from the objects passed in or loaded from
`config.model`, and the distributed backends this loop refuses.

    accelerator, precision = accelerator_for(cfg.train)
    models = assemble_models(cfg, accelerator, precision, needs_teacher=True,
                             student=student, teacher=None, tokenizer=tokenizer)
    models.student, models.tokenizer, models.teacher, models.vocab_size, models.cross_tokenizer
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from promptkd.cross_tokenizer import CrossTokenizer
from promptkd.errors import ConfigError, UserError
from promptkd.models.loading import (
    ModelSpec,
    cast_frozen_linear_weights,
    check_output_rows,
    check_tokenizer_compatibility,
    load_model_and_tokenizer,
    tokenizer_difference,
)
from promptkd.models.lora import check_lora_backend, is_lora_model, with_lora
from promptkd.models.sharding import shard_model
from promptkd.precision import resolve_precision
from promptkd.training.checkpoint import ShardedTrainingState

logger = logging.getLogger(__name__)


def accelerator_for(train_cfg):
    """(the run's `accelerate.Accelerator`, its resolved precision) for the `train` config section;
    train.deterministic turns on torch's deterministic algorithms first."""
    from accelerate import Accelerator, PartialState

    if train_cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    precision = resolve_precision(train_cfg.mixed_precision, PartialState(cpu=train_cfg.cpu).device)
    accelerator = Accelerator(
        cpu=train_cfg.cpu,
        mixed_precision=precision.mixed_precision,
        step_scheduler_with_optimizer=False,  # our schedules count optimizer steps, not batches
        log_with=train_cfg.trackers or None,
        project_dir=str(Path(train_cfg.output_dir)),
    )
    return accelerator, precision


@dataclass
class Models:
    """What `assemble_models` returns.

    teacher_flags: a passed-in teacher's ([(parameter, requires_grad)], [(module, training)]),
    which `frozen_teacher` gives back after training; None for a teacher the trainer loaded.
    cross_tokenizer: the pair's `CrossTokenizer` when the run distils across tokenizers, else None;
    teacher_tokenizer and teacher_vocab_size are then the teacher's own (else the student's).
    """

    student: Any
    tokenizer: Any
    teacher: Any | None
    vocab_size: int
    teacher_flags: tuple | None = None
    teacher_tokenizer: Any = None
    teacher_vocab_size: int = 0
    cross_tokenizer: CrossTokenizer | None = None


def assemble_models(cfg, accelerator, precision, *, needs_teacher: bool, student=None, teacher=None,
                    tokenizer=None, teacher_tokenizer=None) -> Models:
    """The run's models and tokenizer, on `accelerator`'s device for the teacher (the student is
    placed by `accelerator.prepare` later).

    Args:
        cfg: the run's `Config` (model.*, train.gradient_checkpointing).
        accelerator, precision: the run's `Accelerator` and resolved `promptkd.precision` choice.
        needs_teacher: whether the method uses a teacher (its class's `needs_teacher`); a teacher
            given to a method that uses none is ignored, with a warning.
        student, teacher, tokenizer: objects the user passed; None loads from `cfg.model`.
        teacher_tokenizer: the teacher's own tokenizer, when it is not the student's; None loads it from
            model.teacher when that is set (else the teacher shares `tokenizer`).

    Returns:
        `Models`: the student in train mode (with LoRA adapters when model.student_lora.r > 0), a
        tokenizer with a pad token, the frozen teacher in eval mode (or None), the vocabulary
        size student and teacher share (the student's, across tokenizers) and the path
        (`tokenizer_path`).

    Raises:
        ConfigError: the method needs a teacher and none is given (checked first; the config checks
            the built-in methods' rule already, this one a registered method's).
        UserError: a student without a tokenizer and no model.student, a tokenizer with neither a
            pad nor an eos token, or tokenizers that do not match with model.cross_tokenizer off.
    """
    teacher_given = teacher is not None
    problems = cfg.teacher_problems(needs_teacher, {"teacher"} if teacher_given else set())
    if problems:
        raise ConfigError(problems)
    if not needs_teacher and (cfg.model.teacher or teacher_given):
        logger.warning("a teacher is given but method '%s' uses none (with these settings): it is ignored", cfg.method)
    student, tokenizer = _student_and_tokenizer(cfg, accelerator, student, tokenizer)
    vocab_size = student.get_output_embeddings().weight.shape[0]
    teacher_flags, cross, teacher_tok, teacher_vocab_size = None, None, tokenizer, vocab_size
    if needs_teacher:
        teacher, teacher_tok = _teacher_and_tokenizer(cfg, teacher, tokenizer, teacher_tokenizer)
        cross, vocab_size, teacher_vocab_size = tokenizer_path(cfg, teacher_tok, tokenizer, teacher, student)
        if teacher_given:  # what train() gives back (frozen_teacher)
            teacher_flags = ([(p, p.requires_grad) for p in teacher.parameters()],
                             [(m, m.training) for m in teacher.modules()])
        teacher.requires_grad_(False)
        teacher.eval()
        teacher.to(accelerator.device)
        if not teacher_given:  # one passed in keeps its weights as they are
            teacher_linears_to_compute_dtype(teacher, precision.dtype, accelerator.device)
    else:
        teacher = None
    if cfg.train.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        student.config.use_cache = False
    return Models(student, tokenizer, teacher, vocab_size, teacher_flags, teacher_tok, teacher_vocab_size, cross)


def tokenizer_path(cfg, teacher_tokenizer, student_tokenizer, teacher, student) -> tuple[CrossTokenizer | None, int, int]:
    """(CrossTokenizer or None, the student's and the teacher's logit columns) for the pair, and one
    log line naming the path: the exact token-level path when the tokenizers match (as
    `tokenizer_difference` defines it) and model.cross_tokenizer is not on; the
    cross-tokenizer path when they differ (model.cross_tokenizer auto) or it is on. Across
    tokenizers each model's logit columns are its tokenizer's ids (padding rows cut off).

    Raises:
        UserError: tokenizers that differ with model.cross_tokenizer off; a model with fewer output
            rows than its tokenizer's ids (on either path); across tokenizers, a method that runs the
            teacher on the student's tokens (minillm, gkd with seq_kd).
    """
    mode = cfg.model.cross_tokenizer
    difference = tokenizer_difference(teacher_tokenizer, student_tokenizer)
    if difference is None and mode != "on":
        vocab_size = check_tokenizer_compatibility(teacher_tokenizer, student_tokenizer, teacher, student)
        logger.info("the teacher's and the student's tokenizers match: token-level distillation over one "
                    "vocabulary of %d tokens (model.cross_tokenizer %s)", vocab_size, mode)
        return None, vocab_size, vocab_size
    if difference is not None and mode == "off":
        raise UserError(f"{difference}, and model.cross_tokenizer is off: set model.cross_tokenizer auto to distil across "
                        "tokenizers (docs/method.md section 11), or use a student from the teacher's family")
    if cfg.method == "minillm" or (cfg.method == "gkd" and cfg.gkd.seq_kd):
        what = "minillm samples with the teacher" if cfg.method == "minillm" else "gkd.seq_kd samples from the teacher"
        raise UserError(f"{what} on the student's tokens, which needs one tokenizer; the teacher's and the student's "
                        "differ (or model.cross_tokenizer is on): use gkd, kd, seqkd, distillm or promptkd across "
                        "tokenizers, or a teacher that shares the student's tokenizer")
    # each model's logits are cut to its tokenizer's ids: padding rows are no tokens (neither shared nor ULD's)
    check_output_rows(teacher, teacher_tokenizer, "teacher")
    check_output_rows(student, student_tokenizer, "student")
    if teacher_tokenizer.pad_token is None:
        teacher_tokenizer.pad_token = teacher_tokenizer.eos_token  # pad positions are always masked out
    pair = CrossTokenizer(student_tokenizer, teacher_tokenizer)
    why = "model.cross_tokenizer on" if mode == "on" else "the teacher's and the student's tokenizers differ"
    logger.info("%s: cross-tokenizer distillation (%s; exact divergence on them, ULD on the rest)", why, pair.describe())
    return pair, len(student_tokenizer), len(teacher_tokenizer)


def _student_and_tokenizer(cfg, accelerator, student, tokenizer):
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
                "model.student_lora's r, lora_alpha, dropout and target_modules are ignored",
                UserWarning, stacklevel=5,  # the caller of Trainer.train() / setup()
            )
    elif lora.r > 0:
        student = with_lora(student, r=lora.r, alpha=lora.lora_alpha, dropout=lora.dropout,
                            target_modules=lora.target_modules)
    if is_lora_model(student):
        check_lora_backend(accelerator)
        if cfg.train.gradient_checkpointing:
            student.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    student.train()
    return student, tokenizer


def _teacher_and_tokenizer(cfg, teacher, student_tokenizer, teacher_tokenizer=None):
    if teacher is None:
        loaded, loaded_tok = load_model_and_tokenizer(
            ModelSpec(cfg.model.teacher, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        )
        return loaded, teacher_tokenizer or loaded_tok
    if teacher_tokenizer is not None:
        return teacher, teacher_tokenizer
    # a passed-in teacher shares the student's tokenizer unless model.teacher names its own
    if cfg.model.teacher:
        _, teacher_tok = load_model_and_tokenizer(ModelSpec(cfg.model.teacher, dtype=cfg.model.dtype))
        return teacher, teacher_tok
    return teacher, student_tokenizer


def teacher_linears_to_compute_dtype(teacher, dtype: torch.dtype | None, device: torch.device) -> None:
    """Under bf16 (or CUDA fp16) autocast, hold the frozen teacher's linear weights in that dtype.

    Every teacher forward runs under the step context's autocast, which would otherwise cast each
    linear weight at every call: same numbers (tests/test_prompted_teacher.py), fewer cast
    kernels, about half the teacher's weight memory. `assemble_models` applies it only to a
    teacher the trainer loaded itself.
    """
    if dtype is None or (dtype is torch.float16 and device.type != "cuda"):
        return
    cast_frozen_linear_weights(teacher, dtype)


@contextlib.contextmanager
def frozen_teacher(teacher, teacher_flags: tuple | None):
    """The teacher is frozen while training runs (no gradients, eval mode; PromptKD's prompt
    forward turns dropout on by itself); a teacher passed in gets back the requires_grad and
    train / eval flags it came with (`Models.teacher_flags`)."""
    if teacher is not None:
        teacher.requires_grad_(False)
        teacher.eval()
    try:
        yield
    finally:
        params, modules = teacher_flags or ((), ())
        for p, flag in params:
            p.requires_grad_(flag)
        for m, mode in modules:
            m.training = mode


def shard_models(accelerator, *models) -> bool:
    """train.fsdp: shard each model (None skipped) with FSDP2 over one mesh of all processes
    (`promptkd.models.sharding.shard_model`), on the accelerator's device. Returns whether they
    were sharded: with one process there is nothing to shard, which one warning says."""
    if accelerator.num_processes == 1:
        logger.warning("train.fsdp with one process: nothing to shard, the models train whole")
        return False
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for model in models:
        if model is not None:
            shard_model(model.to(accelerator.device), mesh)
    if accelerator.is_main_process:
        logger.info("train.fsdp: %s sharded over %d processes (FSDP2, one unit per decoder layer)",
                    " and ".join(type(m).__name__.removeprefix("FSDP") for m in models if m is not None),
                    accelerator.num_processes)
    return True


def prepare_student(accelerator, student, optimizer, scheduler, *, fsdp: bool, sharded: bool):
    """(student, optimizer, scheduler) ready to train: prepared by accelerate (DDP, FSDP1, ZeRO),
    or under train.fsdp left unprepared (accelerate would wrap it in DDP), with checkpoints that
    hold each process's shards (torch.distributed.checkpoint; with one process too, so a run has
    one layout)."""
    if not fsdp:
        return accelerator.prepare(student, optimizer, scheduler)
    if not sharded:
        student.to(accelerator.device)
    ShardedTrainingState(student, optimizer).register(accelerator)
    accelerator.register_for_checkpointing(scheduler)
    return student, optimizer, scheduler


def check_distributed_backend(cfg, accelerator) -> None:
    """Refuse what accelerate's DeepSpeed and FSDP2 integrations cannot run with this loop.

    `accelerator.backward` under DeepSpeed runs the engine's backward *and* its optimizer
    step on every call, so a second parameter set (PromptKD's prompt) would step the
    student and gradient accumulation would step per micro-batch (docs/distributed.md).
    accelerate's FSDP2 shards the student only (and not on CPU); train.fsdp shards both models.

    Raises:
        UserError: accelerate's FSDP with fsdp_version 2, or train.fsdp under accelerate's FSDP or
            DeepSpeed; under DeepSpeed, PromptKD with a trained prompt, MiniLLM with
            minillm.lm_coef > 0, or train.gradient_accumulation_steps > 1.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if cfg.train.fsdp and kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(
            f"train.fsdp shards the models itself and cannot run under accelerate's {kind.value} "
            "(distributed_type in the accelerate config): launch with torchrun or a multi-process config "
            "(configs/accelerate/cpu_2proc.yaml, ddp_8gpu.yaml)"
        )
    if getattr(accelerator, "is_fsdp2", False):
        raise UserError(
            "accelerate's FSDP2 (fsdp_version: 2) is not supported: it shards the student only; set "
            "train.fsdp true and launch with torchrun or a multi-process config (configs/accelerate/ddp_8gpu.yaml): "
            "that shards the student and the teacher with FSDP2 (docs/distributed.md)"
        )
    if kind != DistributedType.DEEPSPEED:
        return
    if cfg.method == "promptkd":
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
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        # no DataLoader goes through prepare(), so accelerate cannot infer it
        ds_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
