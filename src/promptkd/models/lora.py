"""LoRA students: the student's weights stay frozen and peft's low-rank adapters train instead.

    student = with_lora(student, r=16, alpha=32, dropout=0.05, target_modules=None)  # all linear layers
    ...train...
    save_lora_student(student, tokenizer, out_dir, merge=True)  # adapter + merged model

With `model.student_lora.r > 0` the trainer wraps the student this way: the student optimizer
sees only the adapter parameters, checkpoints hold the whole wrapped model (so a resume is
exact), and the run exports the adapter (`final/student_adapter/`, loadable with
`PeftModel.from_pretrained(base_student, ...)`) and, with `merge`, the merged student
(`final/student/`, loadable with `AutoModelForCausalLM.from_pretrained`). A student passed in
that is a PeftModel already trains as it is. Runs one process or DDP; FSDP and DeepSpeed ZeRO-3,
which shard the student, are refused (`check_lora_backend`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from promptkd.errors import UserError


def is_lora_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency; be safe for partial installs
        return False
    return isinstance(model, PeftModel)


def with_lora(student: torch.nn.Module, *, r: int, alpha: float, dropout: float,
              target_modules: list[str] | None = None) -> torch.nn.Module:
    """The student wrapped with trainable LoRA adapters (peft), its own weights frozen.

    target_modules: module names to adapt (e.g. ["q_proj", "v_proj"]); None or [] adapts every
    linear layer except the LM head (peft's "all-linear").
    Raises UserError for r < 1 or target modules the model does not have.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if r < 1:
        raise UserError(f"model.student_lora.r must be >= 1 to use LoRA, got {r}")
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)})
    names = [n for n, _ in student.named_modules()]
    missing = [t for t in target_modules or [] if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(
            f"model.student_lora.target_modules: {missing} not found in the student; its linear layers are "
            f"named {linear} (or leave target_modules [] to adapt every linear layer but the LM head)"
        )
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules else "all-linear",
    )
    try:
        with warnings.catch_warnings():
            # peft 0.21 calls transformers' deprecated `is_gradient_checkpointing` (as in prompted_teacher.py)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(student, config)
    except ValueError as e:  # e.g. a target that is no linear layer (peft prints the whole module)
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise UserError(
            f"model.student_lora.target_modules = {list(target_modules or [])} cannot be adapted ({detail}); "
            f"name linear layers, e.g. from {linear}"
        ) from e


def check_lora_backend(accelerator) -> None:
    """Raise UserError under FSDP or DeepSpeed ZeRO-3, where the student's weights are sharded.

    Sampling from the unwrapped student, the merged export and peft's adapter layers inside
    separately wrapped decoder blocks all assume every process holds the full weights; a LoRA
    student's frozen base needs no optimizer state, so DDP holds little more memory anyway.
    """
    from accelerate.utils import DistributedType

    backend = accelerator.distributed_type
    if backend == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage != 3:
        return
    if backend in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        name = "FSDP" if backend == DistributedType.FSDP else "DeepSpeed ZeRO-3"
        raise UserError(
            f"model.student_lora (a LoRA student) is not supported under {name}, which shards the "
            "student's weights; launch with DDP (e.g. configs/accelerate/ddp_8gpu.yaml) or set "
            "model.student_lora.r 0 to train the whole student"
        )


def save_lora_student(student, tokenizer, out_dir: str | Path, *, state_dict=None, merge: bool = False) -> None:
    """Write the adapter to out_dir/student_adapter and, with `merge`, the merged model to out_dir/student.

    state_dict: the wrapped model's full state (e.g. gathered by accelerate); peft keeps its
    adapter entries. None reads the live model. The merge works on a copy of the live model,
    which must hold its full weights (one process or DDP; the trainer refuses sharded set-ups).
    """
    out_dir = Path(out_dir)
    student.save_pretrained(out_dir / "student_adapter", state_dict=state_dict)
    tokenizer.save_pretrained(out_dir / "student_adapter")
    if merge:
        import copy

        merged = copy.deepcopy(student).merge_and_unload()
        merged.save_pretrained(out_dir / "student", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "student")
