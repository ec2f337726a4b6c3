"""Models: loading (Hub, directory, GGUF), student construction by depth pruning, and the
prompted teacher that owns the soft prompt."""

from promptkd.models.loading import (
    ModelSpec,
    check_tokenizer_compatibility,
    dequantized_copy,
    eos_token_ids,
    load_model_and_tokenizer,
    output_vocab_size,
    save_model,
)
from promptkd.models.prompted_teacher import PromptedTeacher, PromptInit, prompt_init_ids
from promptkd.models.student import evenly_spaced_layers, make_student, make_student_from_path

__all__ = [
    "ModelSpec",
    "PromptInit",
    "PromptedTeacher",
    "check_tokenizer_compatibility",
    "dequantized_copy",
    "eos_token_ids",
    "evenly_spaced_layers",
    "load_model_and_tokenizer",
    "make_student",
    "make_student_from_path",
    "output_vocab_size",
    "prompt_init_ids",
    "save_model",
]
