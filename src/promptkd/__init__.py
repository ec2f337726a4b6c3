"""promptkd: knowledge distillation of generative LMs with student-friendly soft prompts.

    import promptkd

    config = promptkd.Config(method="promptkd", train=promptkd.TrainConfig(max_steps=100, output_dir="runs/x"))
    trainer = promptkd.Trainer(config, student=student, teacher=teacher, tokenizer=tokenizer,
                               train_dataset=dataset)   # a datasets.Dataset, a list of dicts or a JSONL path
    trainer.train()
    promptkd.evaluate(student, tokenizer, out="runs/x/eval", datasets=["my_eval.jsonl"])

The names below are imported on first use, so `import promptkd` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # configuration
    "Config": "promptkd.config",
    "ModelConfig": "promptkd.config",
    "StudentLoRAConfig": "promptkd.config",
    "DataConfig": "promptkd.config",
    "TrainConfig": "promptkd.config",
    "PromptKDSection": "promptkd.config",
    "GKDSection": "promptkd.config",
    "KDSection": "promptkd.config",
    "SeqKDSection": "promptkd.config",
    "GenerateConfig": "promptkd.config",
    "EvalConfig": "promptkd.config",
    "ExposureBiasConfig": "promptkd.config",
    "MakeStudentConfig": "promptkd.config",
    "load_config": "promptkd.config",
    "SamplingConfig": "promptkd.sampling",
    # training
    "Trainer": "promptkd.training.loop",
    "StepContext": "promptkd.methods.base",
    "StepResult": "promptkd.methods.base",
    "Method": "promptkd.methods.base",
    "register_method": "promptkd.methods",
    # models
    "PromptedTeacher": "promptkd.models.prompted_teacher",
    "make_student": "promptkd.models.student",
    "load_model_and_tokenizer": "promptkd.models.loading",
    # divergences
    "forward_kl": "promptkd.losses",
    "reverse_kl": "promptkd.losses",
    "generalized_jsd": "promptkd.losses",
    "skew_forward_kl": "promptkd.losses",
    "skew_reverse_kl": "promptkd.losses",
    "total_variation": "promptkd.losses",
    # data and evaluation
    "records_from": "promptkd.data.records",
    "evaluate": "promptkd.evaluation.runner",
    "run_generation": "promptkd.generate",
    "run_exposure_bias": "promptkd.evaluation.exposure_bias",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'promptkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
