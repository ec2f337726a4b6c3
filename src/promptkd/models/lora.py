"""LoRA students: the student's weights stay frozen and peft's low-rank adapters train instead.

    student = with_lora(student, r=16, alpha=32, dropout=0.05, target_modules=None)  # all linear layers
    ...train...
    save_lora_student(student, tokenizer, out_dir, merge=True)  # adapter + merged model

With `model.student_lora.r > 0` the trainer wraps the student this way: the student optimizer
sees only the adapter parameters, checkpoints hold the whole wrapped model (so a resume is
exact), and the run exports the adapter (`final/student_adapter/`, loadable with
`PeftModel.from_pretrained(base_student, ...)`) and, with `merge`, the merged student
(`final/student/`, loadable with `AutoModelForCausalLM.from_pretrained`).
"""

from __future__ import annotations

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
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if target_modules else "all-linear",
    )
    try:
        return get_peft_model(student, config)
    except ValueError as e:  # e.g. target modules not found in the base model
        raise UserError(f"model.student_lora: {e}") from e


def save_lora_student(student, tokenizer, out_dir: str | Path, *, state_dict=None, merge: bool = False) -> None:
    """Write the adapter to out_dir/student_adapter and, with `merge`, the merged model to out_dir/student."""
    out_dir = Path(out_dir)
    adapter_state = None
    if state_dict is not None:  # the full wrapped state (e.g. gathered by accelerate): keep the adapter part
        from peft import get_peft_model_state_dict

        adapter_state = get_peft_model_state_dict(student, state_dict=state_dict)
    student.save_pretrained(out_dir / "student_adapter", state_dict=adapter_state)
    tokenizer.save_pretrained(out_dir / "student_adapter")
    if merge:
        import copy

        merged = copy.deepcopy(student).merge_and_unload()
        merged.save_pretrained(out_dir / "student", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "student")
