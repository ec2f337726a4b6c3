"""Configuration: one validated dataclass per command, built from shared sub-configs.

    promptkd train --config configs/promptkd.yaml --train.max_steps 50 --promptkd.base_coef 0
    promptkd eval --model runs/x/final/student --sampling.max_new_tokens 128 --limit 50

`COMMANDS` maps each subcommand to its config: `Config` (train), `GenerateConfig`,
`EvalConfig`, `ExposureBiasConfig`, `MakeStudentConfig`, `DemoConfig` and `PlotConfig`. They share
`SamplingConfig` (the one generation-settings record, from `promptkd.sampling`) and
`PromptOptions` (how a record becomes a prompt). Every field carries its help text, its source
(paper / reference code / our choice) and its valid range (`promptkd.options.opt`), and the
command line has one flag per field (promptkd.cli). A YAML file plus flags become a config
through one validator that reports *all* problems at once (unknown keys with a guess, wrong
types, out-of-range values, cross-field conflicts), each naming the key, the value and the fix.
Library functions take these objects (`run_evaluation(EvalConfig(model=..., out=...))`) and
validate them again. The resolved train config is saved beside every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from promptkd.data.dataset import PROMPT_TRUNCATIONS
from promptkd.data.eval_sets import EVAL_SETS, eval_set_for_source, eval_set_name
from promptkd.data.templates import TEMPLATE_NAMES
from promptkd.errors import ConfigError, UserError
from promptkd.losses import DIVERGENCES
from promptkd.options import (
    ConfigBase,
    field_problems,
    merge_dicts,
    opt,
    read_yaml,
    reference_markdown,
    was_given,
)
from promptkd.precision import PRECISIONS
from promptkd.sampling import SamplingConfig

METHODS = ("promptkd", "gkd", "kd", "seqkd", "sft", "minillm", "distillm")
DIVERGENCE_NAMES = tuple(DIVERGENCES)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
ENDED_MODES = ("zero", "alive")  # exposure bias: how responses that ended before step t count


def _dtype_opt(help: str):
    return opt("float32", help, choices=list(DTYPE_NAMES))


def _precision_opt(what: str):
    return opt(
        "auto",
        what + " auto = bf16 on a GPU that supports it and on a CPU that computes bf16 natively (a cached matmul "
        "probe decides), float32 elsewhere; no = float32; fp16 is for CUDA. The choice is logged and recorded "
        "with the outputs.",
        choices=list(PRECISIONS),
    )


# =========================================================================== train


@dataclass
class StudentLoRAConfig:
    """LoRA adapters on the student (peft): only the adapters train; r 0 = full fine-tuning."""
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "alpha": "renamed model.student_lora.lora_alpha (PEFT's name; alpha elsewhere is a divergence's skew)"}

    r: int = opt(0, "LoRA rank; 0 trains the whole student (no LoRA).", min=0)
    lora_alpha: float = opt(16.0, "LoRA scaling numerator (PEFT's lora_alpha); the update is scaled by lora_alpha / r.", min=0.0, min_exclusive=True)
    dropout: float = opt(0.0, "Dropout on the LoRA branch (lora_dropout).", min=0.0, max=1.0)
    target_modules: list[str] = opt([], "Module names to adapt, e.g. [q_proj, v_proj]; [] = every linear layer but the LM head.")
    merge: bool = opt(False, "Also export the merged student (final/student); the adapter is always exported (final/student_adapter).")


@dataclass
class ModelConfig:
    teacher: str | None = opt(
        None,
        "Teacher: Hub id, local save_pretrained directory or a .gguf file (dequantised once into a cached dense "
        "copy). Unused by sft, and by seqkd with seqkd.kd_ratio 0 (seqkd reads teacher responses from "
        "data.teacher_responses).",
    )
    student: str = opt("", "Student: Hub id, local save_pretrained directory or a .gguf file.")
    dtype: str = _dtype_opt("Weight dtype of both models. Mixed precision for compute is train.mixed_precision.")
    trust_remote_code: bool = opt(False, "Passed to from_pretrained for custom architectures.")
    cross_tokenizer: str = opt(
        "auto", "Distil across tokenizers (docs/method.md section 11): auto = only when the teacher's and the student's "
        "tokenizers differ (one log line says which path runs), on = always (also for one tokenizer), off = never "
        "(a pair whose tokenizers differ is refused).", choices=["auto", "on", "off"],
    )
    student_lora: StudentLoRAConfig = field(default_factory=StudentLoRAConfig)


@dataclass
class DataConfig:
    train: str = opt("", "Training data: JSONL file (instruction/input/output schema), a datasets Hub id or a local dataset directory.")
    train_data_files: str | None = opt(
        None, "File inside a Hub id / directory data.train (datasets data_files), e.g. raw.jsonl of MiniLLM/dolly; "
        "null = the repository's own splits. Ignored for a JSONL file.",
    )
    train_split: str = opt(
        "train", "Split of a Hub id / directory data.train, slices allowed: train[1000:] is MiniLLM's training part "
        "of MiniLLM/dolly raw.jsonl (its first 1,000 records are dev). Ignored for a JSONL file.",
    )
    dev: str | None = opt(
        None, "Dev data for periodic evaluation / best-checkpoint selection (JSONL, Hub id or directory); "
        "never an evaluation set such as MiniLLM/dolly valid.jsonl (checked).",
    )
    dev_data_files: str | None = opt(None, "As data.train_data_files, for data.dev.")
    dev_split: str = opt(
        "train", "As data.train_split, for data.dev: train[:1000] of MiniLLM/dolly raw.jsonl is MiniLLM's dev split.",
    )
    teacher_responses: str | None = opt(
        None, "seqkd only: JSONL of teacher responses written by `promptkd generate`."
    )
    template: str = opt(
        "alpaca", "Prompt template: the Alpaca strings of MiniLLM, the model's chat template, or plain.",
        choices=list(TEMPLATE_NAMES),
    )
    max_prompt_length: int = opt(256, "Training prompts longer than this (tokens) are dropped and counted (MiniLLM's data processing: 256).", min=1)
    max_length: int = opt(512, "Prompt + response limit in tokens; reference responses are cut to fit (reference code: 512).", min=2)
    max_response_length: int | None = opt(
        None, "Reference / teacher responses are cut to this many tokens (EOS included; a cut response loses its EOS). "
        "Set it to sampling.max_new_tokens to give off-policy methods the same response budget as on-policy ones; "
        "null = only data.max_length limits them.", min=1,
    )
    max_train_examples: int | None = opt(None, "Use only the first N training records (after filtering).", min=1)
    max_dev_examples: int | None = opt(None, "Use only the first N dev records.", min=1)


@dataclass
class TrainConfig:
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "fused_losses": "the losses compile themselves when a chunk is large and fall back to eager on a compiler failure",
        "chunked_lm_head": "the losses use hidden states and LM heads where the head allows, full logits otherwise "
                           "(one info line says why)",
    }
    output_dir: str = opt("runs/promptkd", "Run directory: config, metrics, checkpoints, final student.")
    seed: int = opt(42, "Seed for data order, sampling and initialisation.")
    max_steps: int = opt(1000, "Total optimizer steps K (also the horizon of PromptKD's regulariser schedule).", min=1)
    batch_size: int = opt(8, "Micro-batch size per process.", min=1)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step; loss normalised by the global token count.", min=1)
    learning_rate: float = opt(5e-5, "Student learning rate (paper: 5e-5 GPT-2 base; 1e-5 medium; 5e-6 larger).", min=0.0, min_exclusive=True)
    weight_decay: float = opt(0.01, "AdamW weight decay (reference code: 0.01).", min=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0.0, max=1.0)
    adam_beta2: float = opt(0.999, "AdamW beta2.", min=0.0, max=1.0)
    lr_scheduler: str = opt(
        "constant_with_warmup", "LR schedule (reference code: constant after warm-up).",
        choices=["constant_with_warmup", "linear", "cosine", "constant"],
    )
    warmup_steps: int = opt(
        100, "Linear warm-up steps (reference code: 100). A warm-up not shorter than train.max_steps is cut to "
        "max_steps // 10, with one line saying so.", min=0,
    )
    max_grad_norm: float = opt(1.0, "Gradient-norm clip per parameter set (reference code: 1.0); 0 disables.", min=0.0)
    mixed_precision: str = _precision_opt(
        "Autocast for model compute; loss maths stays float32. bf16 (fp16 on CUDA) also holds the frozen "
        "teacher's linear weights in that dtype (same results, less memory)."
    )
    gradient_checkpointing: bool = opt(False, "Gradient checkpointing for the student.")
    eval_every: int = opt(0, "Evaluate on data.dev every N optimizer steps (0: only at the end).", min=0)
    eval_metric: str = opt(
        "loss", "Dev metric for best-checkpoint selection: reference-response token loss (fast) or sampled ROUGE-L.",
        choices=["loss", "rougeL"],
    )
    save_every: int = opt(0, "Write a resumable checkpoint every N optimizer steps (0: only by time and at the end).", min=0)
    save_every_minutes: float = opt(
        30.0, "Also write a checkpoint when this many minutes passed since the last one (0: off). SIGINT / SIGTERM "
        "always checkpoint the last completed step before exiting.", min=0.0,
    )
    keep_last: int = opt(2, "Keep the last N checkpoints (older ones are deleted).", min=1)
    log_every: int = opt(1, "Write a metrics record every N optimizer steps.", min=1)
    trackers: list[str] = opt([], "accelerate trackers, e.g. [tensorboard].")
    cpu: bool = opt(False, "Force CPU even when a GPU is present.")
    fsdp: bool = opt(
        False, "Shard the student and the teacher over the processes with PyTorch FSDP2 (one unit per decoder "
        "layer); launch with torchrun or a multi-process accelerate config (docs/distributed.md).",
    )
    sampler: str = opt(
        "hf", "On-policy sampler backend from the promptkd.samplers registry; hf = transformers generate.",
    )
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms (slower; for exact resume tests).")
    nonfinite: str = opt(
        "skip", "On a NaN/Inf loss or gradient: skip the update (warn + count) or stop with a checkpoint.",
        choices=["skip", "stop"],
    )
    max_nonfinite_skips: int = opt(20, "Stop when this many updates were skipped for non-finite values.", min=1)


@dataclass
class PromptKDSection:
    """PromptKD (docs/method.md, sections 3-4). Defaults follow the paper and the authors' code."""
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "max_drift": "the drift guard was removed (in study cpu2 it never acted at the reference prompt learning "
                     "rate, and no raised rate with it scored above the reference): lower "
                     "promptkd.prompt_learning_rate; promptkd.collapse_window still warns",
        "lagged_target": "the student's target is always the updated prompt (the paper's order)",
        "freeze_prompt": "a frozen prompt is GKD with reverse KL: method gkd at its defaults (lmbda 1, generalized_jsd "
                         "with beta 1 = reverse KL)",
        "kd_direction": "the prompt loss is KL(p_TP || p_S), as in the paper and its code",
        "reg_direction": "the regulariser is KL(p_TP || p_T), as in the paper and its code",
        "student_divergence": "renamed promptkd.divergence, the name every method's divergence has",
    }

    num_virtual_tokens: int = opt(7, "Soft-prompt length (paper: 7).", min=1)
    prompt_init: str = opt(
        "text", "Prompt init: embeddings of prompt_init_text (tiled/cut), the pad embedding, or random.",
        choices=["text", "pad", "random"],
    )
    prompt_init_text: str = opt("Suppose you are a student.", "Init text (paper / reference code).")
    prompt_learning_rate: float | None = opt(None, "Prompt LR; null = train.learning_rate (reference code).", min=0.0, min_exclusive=True)
    prompt_weight_decay: float = opt(0.01, "Prompt AdamW weight decay (reference).", min=0.0)
    divergence: str = opt("reverse_kl", "Student loss to sg p_TP on its own samples (paper: reverse KL).", choices=list(DIVERGENCE_NAMES))
    ab_alpha: float = opt(0.2, "alpha_beta_divergence alpha: 1 with ab_beta 0 = forward KL (ABKD gpt2 scripts: 0.2).", min=0.0)
    ab_beta: float = opt(0.7, "alpha_beta_divergence beta: 1 with ab_alpha 0 = reverse KL (ABKD gpt2 scripts: 0.7).", min=0.0)
    base_coef: float = opt(1.0, "Regulariser weight: lambda_k = base_coef * (1 - k/K); 0 disables it.", min=0.0)
    teacher_dropout: bool = opt(True, "Teacher dropout during the prompt forward (reference code quirk: on).")
    teacher_gradient_checkpointing: bool = opt(False, "Checkpoint the teacher during the prompt backward (less memory, more time).")
    collapse_window: int = opt(
        5,
        "Warn once when KL(p_TP || p_S) < KL(p_TP || p_T) (the prompted teacher closer to the student than to "
        "the teacher) for this many consecutive steps; 0 = off. More than one step, so one noisy batch does not "
        "warn (docs/method.md, section 5).",
        min=0,
    )


@dataclass
class GKDSection:
    """Generalized KD / ImitKD (docs/method.md, section 6). beta=1 with lmbda=1 is PromptKD's 'no prompt' ablation."""

    lmbda: float = opt(1.0, "Fraction of optimizer steps trained on student samples (on-policy); the rest on dataset responses.", min=0.0, max=1.0)
    divergence: str = opt("generalized_jsd", "Per-token divergence.", choices=list(DIVERGENCE_NAMES))
    beta: float = opt(1.0, "generalized_jsd interpolation: 0 = forward KL, 1 = reverse KL.", min=0.0, max=1.0)
    alpha: float = opt(0.1, "Skew of skew_forward_kl / skew_reverse_kl (DistiLLM: 0.1).", min=0.0, max=1.0)
    ab_alpha: float = opt(0.2, "alpha_beta_divergence alpha: 1 with ab_beta 0 = forward KL (ABKD gpt2 scripts: 0.2).", min=0.0)
    ab_beta: float = opt(0.7, "alpha_beta_divergence beta: 1 with ab_alpha 0 = reverse KL (ABKD gpt2 scripts: 0.7).", min=0.0)
    seq_kd: bool = opt(False, "Off-policy steps use teacher-sampled responses instead of dataset responses.")


@dataclass
class KDSection:
    """Word-level KD on reference responses: (1 - kd_ratio) * CE + kd_ratio * divergence (docs/method.md, section 6)."""

    kd_ratio: float = opt(0.5, "Weight of the divergence term (MiniLLM/PromptKD KD baseline: 0.5).", min=0.0, max=1.0)
    divergence: str = opt("forward_kl", "Divergence to the teacher.", choices=list(DIVERGENCE_NAMES))
    beta: float = opt(0.5, "generalized_jsd beta.", min=0.0, max=1.0)
    alpha: float = opt(0.1, "Skew KL alpha (DistiLLM: 0.1).", min=0.0, max=1.0)
    ab_alpha: float = opt(0.2, "alpha_beta_divergence alpha: 1 with ab_beta 0 = forward KL (ABKD gpt2 scripts: 0.2).", min=0.0)
    ab_beta: float = opt(0.7, "alpha_beta_divergence beta: 1 with ab_alpha 0 = reverse KL (ABKD gpt2 scripts: 0.7).", min=0.0)


@dataclass
class SeqKDSection:
    """SeqKD: (1 - kd_ratio) * CE + kd_ratio * forward KL on teacher-generated responses
    (data.teacher_responses), as the reference's SeqKD scripts (--type kd --kd-ratio 0.5)."""

    kd_ratio: float = opt(
        0.5,
        "Weight of the forward-KL term to the teacher (needs model.teacher); 0 = CE on the teacher responses "
        "only. Reference SeqKD: 0.5 (PromptKD / MiniLLM scripts/*/seqkd/*.sh --kd-ratio 0.5).",
        min=0.0, max=1.0,
    )


# Reference snapshots cited below: microsoft/LMOps@4f2a9de (minillm/), jongwooko/distillm@d47e77f.
@dataclass
class MiniLLMSection:
    """MiniLLM: reverse KL as a policy gradient on rollouts (docs/method.md, section 6).
    Defaults: LMOps minillm/scripts/gpt2/minillm/train_base_xl.sh and arguments.py."""

    teacher_mix_alpha: float = opt(
        0.2, "Rollouts sample from (1 - alpha) p_S + alpha p_T, with importance weights p_S / mix "
        "(train_base_xl.sh:76); 0 = the student alone.", min=0.0, max=1.0,
    )
    ppo_epochs: int = opt(
        4, "Optimizer steps on each set of rollouts (train_base_xl.sh:70): fresh rollouts every ppo_epochs "
        "steps, whose prompts are that step's batch.", min=1,
    )
    cliprange: float = opt(0.2, "PPO clip of the ratio p_theta / mix (arguments.py:156).", min=0.0, min_exclusive=True)
    gamma: float = opt(0.95, "Discount of the long-term return (arguments.py:158).", min=0.0, max=1.0)
    reward_scaling: float = opt(0.5, "Rewards are divided by this (train_base_xl.sh:78).", min=0.0, min_exclusive=True)
    cliprange_reward: float = opt(100.0, "Scaled rewards are clipped to +-this (train_base_xl.sh:79).", min=0.0, min_exclusive=True)
    length_norm: bool = opt(
        True, "Divide each return by the number of response tokens it sums over (paper; the reference code "
        "always does, losses.py:49).",
    )
    include_current_reward: bool = opt(
        True, "The return at t includes r_t, as the reference code (losses.py:43-48); false = from t + 1, as "
        "the paper's long-term term, which leaves r_t to the exact single-step term.",
    )
    whiten: bool = opt(True, "Standardise the advantages over the step's response tokens (losses.py:53-54).")
    single_step_reg: bool = opt(
        True, "Add the single-step term: KL(p_S || p_T) per position, exact over the vocabulary "
        "(train_base_xl.sh:75, losses.py:98-108).",
    )
    lm_coef: float = opt(
        0.0, "Weight of the language-modelling term on minillm.lm_data. The reference adds it with weight 1 on "
        "OpenWebText (trainer.py:287); off here: a pretraining corpus is the user's choice.", min=0.0,
    )
    lm_data: str | None = opt(
        None, "Corpus of the language-modelling term (JSONL / Hub id / directory in the training schema; the "
        "response text is the LM text). Needed when lm_coef > 0.",
    )
    lm_kd_ratio: float = opt(
        0.5, "The LM term is (1 - r) CE + r forward KL to the teacher on lm_data (losses.py:226; "
        "train_base_xl.sh:51: 0.5).", min=0.0, max=1.0,
    )


@dataclass
class DistiLLMSection:
    """DistiLLM: skew KL with adaptive off-policy student data (docs/method.md, section 6).
    Defaults: jongwooko/distillm arguments.py and scripts/*/distillm/*.sh."""

    divergence: str = opt(
        "skew_reverse_kl", "Per-token divergence (scripts/opt/distillm/*.sh: adaptive-srkl; gpt2 0.1B: sfkl).",
        choices=list(DIVERGENCE_NAMES),
    )
    alpha: float = opt(0.1, "Skew of skew_forward_kl / skew_reverse_kl (arguments.py:178).", min=0.0, max=1.0)
    beta: float = opt(0.5, "generalized_jsd beta, if that divergence is chosen.", min=0.0, max=1.0)
    ab_alpha: float = opt(0.2, "alpha_beta_divergence alpha: 1 with ab_beta 0 = forward KL (ABKD gpt2 scripts: 0.2).", min=0.0)
    ab_beta: float = opt(0.7, "alpha_beta_divergence beta: 1 with ab_alpha 0 = reverse KL (ABKD gpt2 scripts: 0.7).", min=0.0)
    kd_ratio: float = opt(1.0, "(1 - r) CE on the batch + r divergence (scripts: --kd-ratio 1.0).", min=0.0, max=1.0)
    initial_student_prob: float = opt(
        0.0, "Starting probability phi of a step on student-generated responses (arguments.py:188; "
        "scripts: --init-threshold 0.0).", min=0.0, max=1.0,
    )
    prob_step: float = opt(0.1, "phi grows by this when the dev loss rose (finetune.py:411-417).", min=0.0, max=1.0)
    loss_eps: float = opt(
        0.1, "phi grows when the dev loss is at least this much above its value at the last growth "
        "(arguments.py:187).", min=0.0,
    )
    adapt_every: int = opt(
        0, "Optimizer steps between dev-loss checks; 0 = once per epoch (the scripts' --eval-interval -1).", min=0,
    )
    capacity: int = opt(
        1000, "Replay buffer size in sequences per process, first in first out: the buffer, shared by the processes, "
        "holds capacity x processes, as the reference keeps capacity on each GPU (arguments.py:191, "
        "distillm/buffer.py:19).", min=1,
    )
    replay_ratio: str = opt(
        "decreasing", "Of the student-data steps, fresh samples take phi (1 - t/T) (decreasing), phi / 2 "
        "(constant) or phi t/T (increasing); the rest replay the buffer (arguments.py:192).",
        choices=["decreasing", "constant", "increasing"],
    )


@dataclass
class Config(ConfigBase):
    """`promptkd train`: the method, its models and data, the loop, sampling and method knobs."""

    method: str = opt("promptkd", "Distillation method: a built-in one or a name given to promptkd.register_method.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    promptkd: PromptKDSection = field(default_factory=PromptKDSection)
    gkd: GKDSection = field(default_factory=GKDSection)
    kd: KDSection = field(default_factory=KDSection)
    seqkd: SeqKDSection = field(default_factory=SeqKDSection)
    minillm: MiniLLMSection = field(default_factory=MiniLLMSection)
    distillm: DistiLLMSection = field(default_factory=DistiLLMSection)

    def required_problems(self, provided: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Unset entries the run needs; `provided` names the objects a Python caller passed to
        the Trainer instead (student, teacher, tokenizer, train_dataset, eval_dataset). The
        teacher is checked here for the built-in methods; a registered method's class decides
        for itself when the trainer sets it up (`teacher_problems`)."""
        problems = []
        if not self.model.student and "student" not in provided:
            problems.append("'model.student' is not set: give a Hub id, a save_pretrained directory or a .gguf file")
        if self.method in METHODS:
            needs_teacher = self.method not in TEACHER_FREE_METHODS and not (
                self.method == "seqkd" and self.seqkd.kd_ratio == 0)
            problems += self.teacher_problems(needs_teacher, provided)
        if not self.data.train and "train_dataset" not in provided and not (
            self.method == "seqkd" and self.data.teacher_responses
        ):
            problems.append("'data.train' is not set: give a JSONL file or a datasets Hub id")
        if self.method == "seqkd" and not self.data.teacher_responses and "train_dataset" not in provided:
            problems.append(
                "'data.teacher_responses' is not set but method 'seqkd' trains on teacher responses: "
                "write them with `promptkd generate --model TEACHER --data TRAIN --out FILE`"
            )
        if (self.method == "distillm" and self.distillm.prob_step > 0 and self.distillm.initial_student_prob < 1
                and not self.data.dev and "eval_dataset" not in provided):
            problems.append(
                "'data.dev' is not set but method 'distillm' adapts its student-data probability from the dev loss: "
                "give dev data, or set distillm.prob_step 0 for a fixed probability"
            )
        if self.train.eval_metric == "rougeL" and not self.data.dev and "eval_dataset" not in provided and self.train.eval_every:
            problems.append("'train.eval_every' is set but 'data.dev' is not: give dev data or set eval_every 0")
        return problems

    def teacher_problems(self, needs_teacher: bool, provided: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """The missing teacher of a method that needs one, or []."""
        if not needs_teacher or self.model.teacher or "teacher" in provided:
            return []
        fix = ""
        if self.method == "seqkd":
            fix = f" (seqkd.kd_ratio = {self.seqkd.kd_ratio} adds a forward-KL term; seqkd.kd_ratio 0 trains on the teacher responses alone)"
        return [f"'model.teacher' is not set but method '{self.method}' needs a teacher{fix}"]

    def cross_checks(self) -> list[str]:
        problems = []
        if self.data.max_prompt_length >= self.data.max_length:
            problems.append(
                f"'data.max_prompt_length' = {self.data.max_prompt_length} must be smaller than "
                f"'data.max_length' = {self.data.max_length} (room is needed for the response)"
            )

        for key, source, data_files in (
            ("train", self.data.train, self.data.train_data_files),
            ("dev", self.data.dev, self.data.dev_data_files),
        ):
            name = eval_set_for_source(source, data_files) if source else None
            if name is not None:
                files = f" with data_files {data_files!r}" if data_files else ""
                problems.append(
                    f"'data.{key}' = {source!r}{files} is the '{name}' evaluation set: training or checkpoint "
                    "selection on it leaks the test set into the results. For Dolly use MiniLLM's training file "
                    "as configs/paper/*.yaml do (data_files raw.jsonl, split train[1000:] to train, train[:1000] as dev)"
                )
        problems += _method_knob_problems(self)
        if self.train.fsdp:
            if self.train.mixed_precision == "fp16":
                problems.append("'train.mixed_precision' = 'fp16' is not supported with 'train.fsdp' = True (fp16 loss "
                                "scaling of sharded gradients is not implemented): use bf16 or no")
            if self.model.student_lora.r > 0:
                problems.append(f"'model.student_lora.r' = {self.model.student_lora.r} is not supported with 'train.fsdp' = "
                                "True (a LoRA student is trained replicated): set model.student_lora.r 0 or train.fsdp false")
            if self.method == "minillm" and self.minillm.teacher_mix_alpha > 0:
                problems.append(
                    f"'minillm.teacher_mix_alpha' = {self.minillm.teacher_mix_alpha} is not supported with 'train.fsdp' = "
                    "True: a process whose samples have all ended stops calling the logits processor that runs the "
                    "sharded teacher, while the others still gather its layers; set minillm.teacher_mix_alpha 0"
                )
        return problems

    def to_dict(self) -> dict:
        """The resolved config; a divergence knob (kd, gkd, distillm, promptkd) that section's divergence does not read is left
        out (it has no effect, and setting it is an error), so the saved file loads again."""
        out = dataclasses.asdict(self)
        for name in DIVERGENCE_SECTIONS:
            for knob in unused_divergence_knobs(getattr(self, name)):
                del out[name][knob]
        return out


METHOD_SECTIONS = {"promptkd": "promptkd", "gkd": "gkd", "kd": "kd", "seqkd": "seqkd", "minillm": "minillm",
                   "distillm": "distillm"}
TEACHER_FREE_METHODS = {"sft"}
DIVERGENCE_SECTIONS = ("kd", "gkd", "distillm", "promptkd")  # sections with a `divergence` and its knobs
DIVERGENCE_KNOBS = ("beta", "alpha", "ab_alpha", "ab_beta")  # promptkd has the last two only


def _divergences_reading(knob: str) -> list[str]:
    """The divergences that take `knob` (read from the loss functions' signatures)."""
    return [name for name, fn in DIVERGENCES.items() if knob in inspect.signature(fn).parameters]


def unused_divergence_knobs(section) -> list[str]:
    """The knobs (beta, alpha, ab_alpha, ab_beta) of a section that its divergence does not read."""
    return [k for k in DIVERGENCE_KNOBS if hasattr(section, k) and section.divergence not in _divergences_reading(k)]


def _method_knob_problems(cfg: Config) -> list[str]:
    """A knob that cannot take effect is an error, not silently ignored.

    Another method's section is an error when it differs from its defaults (a section at its
    defaults changes nothing, and every saved config.yaml holds one per method). A knob of the
    chosen method is decided by whether the user set it (the key is in the YAML or on the command
    line; for a config built in Python, whether it differs from its default).
    """
    problems = []
    for name in METHOD_SECTIONS:
        section, default = getattr(cfg, name), type(getattr(cfg, name))()
        changed = [f.name for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(default, f.name)]
        if name != cfg.method and changed:
            problems.append(
                f"the '{name}' section sets {', '.join(f'{name}.{k}' for k in changed)} but method is "
                f"'{cfg.method}', which never reads that section: remove it, or set method {name}"
            )
    if cfg.method in DIVERGENCE_SECTIONS:
        name = cfg.method
        section = getattr(cfg, name)
        for knob in unused_divergence_knobs(section):
            if was_given(section, knob):
                readers = " / ".join(_divergences_reading(knob))
                problems.append(
                    f"'{name}.{knob}' = {getattr(section, knob)!r} is set but {name}.divergence "
                    f"'{section.divergence}' does not use it ({knob} is a parameter of {readers}): remove "
                    f"{name}.{knob}, or set {name}.divergence to {readers.replace(' / ', ' or ')}"
                )
        if section.divergence == "alpha_beta_divergence" and section.ab_alpha == section.ab_beta == 0:
            problems.append(f"'{name}.ab_alpha' and '{name}.ab_beta' are both 0, where alpha_beta_divergence is "
                            "undefined: set one above 0 (ab_alpha 1, ab_beta 0 = forward KL; 0, 1 = reverse KL)")
    if cfg.method == "gkd" and cfg.gkd.seq_kd and cfg.gkd.lmbda == 1.0:
        problems.append(
            "'gkd.seq_kd' = True has no effect with gkd.lmbda = 1.0 (every step is on-policy, so no step "
            "uses teacher responses): set gkd.lmbda below 1 or remove gkd.seq_kd"
        )
    if cfg.method == "minillm":
        m = cfg.minillm
        if m.lm_coef > 0 and not m.lm_data:
            problems.append(f"'minillm.lm_coef' = {m.lm_coef} needs 'minillm.lm_data' (the corpus of the language-modelling term)")
        if m.lm_data and m.lm_coef == 0:
            problems.append("'minillm.lm_data' is set but 'minillm.lm_coef' is 0: set lm_coef > 0 or remove lm_data")
        if m.teacher_mix_alpha > 0 and cfg.sampling.do_sample and (cfg.sampling.top_k or cfg.sampling.top_p < 1.0):
            problems.append(
                f"'minillm.teacher_mix_alpha' = {m.teacher_mix_alpha} mixes the teacher into sampling, which needs "
                "sampling.top_k 0 and sampling.top_p 1 (the reference scripts' setting; a truncated student "
                "distribution would be mixed with a full teacher one): set those, or minillm.teacher_mix_alpha 0"
            )
    return problems


def fit_warmup(cfg: Config) -> tuple[Config, str | None]:
    """`cfg`, or a copy whose warm-up fits the run, and the line that says so.

    A warm-up of train.max_steps or more keeps the learning rate below its peak for the whole run
    (warmup_steps 100 with max_steps 3 trains at 1e-6 of a 5e-5 peak), so the copy warms up over a
    tenth of the run (max_steps // 10: 0 for a run under 10 steps), the usual warm-up ratio.
    """
    t = cfg.train
    if t.warmup_steps < t.max_steps:
        return cfg, None
    fitted = copy.deepcopy(cfg)
    fitted.train.warmup_steps = t.max_steps // 10
    return fitted, (
        f"train.warmup_steps = {t.warmup_steps} is not shorter than train.max_steps = {t.max_steps}: warming up "
        f"over {fitted.train.warmup_steps} steps instead (a tenth of the run); set train.warmup_steps to choose"
    )


def validate_config(cfg: Config, *, provided: frozenset[str] | set[str] = frozenset()) -> Config:
    """Check a Config built in Python (types, ranges, cross-field rules), reporting every problem.

    provided: the objects passed to the Trainer in place of config entries ("student",
    "teacher", "tokenizer", "train_dataset", "eval_dataset"), which make those entries optional.
    Raises ConfigError listing every problem.
    """
    problems = field_problems(cfg)
    if not problems:
        problems = cfg.required_problems(provided) + cfg.cross_checks()
    if problems:
        raise ConfigError(problems)
    return cfg


def config_from_dict(data: dict, *, check_required: bool = True) -> Config:
    """A validated train Config from a mapping (YAML + overrides); ConfigError lists every problem."""
    return Config.from_dict(data, check_required=check_required)


# =========================================================================== generation commands


@dataclass
class PromptOptions(ConfigBase):
    """How a record becomes a prompt for generate, eval and exposure-bias (shared by the three).

    Unlike training (data.max_prompt_length drops longer prompts), these commands keep every
    record and cut a longer prompt.
    """

    template: str = opt(
        "alpaca", "Prompt template: the Alpaca strings of MiniLLM, the model's chat template, or plain text.",
        choices=list(TEMPLATE_NAMES),
    )
    max_prompt_length: int = opt(256, "A longer prompt is cut to this many tokens (evaluation protocol: 256).", min=1)
    prompt_truncation: str = opt(
        "keep_first", "Which tokens of a longer prompt are kept: the first (as MiniLLM / PromptKD's evaluation "
        "does) or the last.", choices=list(PROMPT_TRUNCATIONS),
    )
    mixed_precision: str = _precision_opt("Autocast for generation and scoring.")


def _sampled_as_is(sampling: SamplingConfig, command: str) -> list[str]:
    if sampling.eos_at_cap:
        return [
            f"'sampling.eos_at_cap' = True: only training samples can end in a forced EOS; {command} keeps "
            "responses as they were sampled (and records whether each one ended): leave sampling.eos_at_cap unset"
        ]
    return []


def _path_problems(out: str, out_is: str, data_dir: str | None = None) -> list[str]:
    """An output path of the wrong kind (out_is "directory" or "file") and a data_dir that is not a
    directory (a typo would otherwise read the set from the Hub)."""
    problems = []
    path = Path(out).expanduser() if out else None
    if path is not None and path.exists() and path.is_dir() != (out_is == "directory"):
        problems.append(f"'out' = {out!r} is a {'file' if out_is == 'directory' else 'directory'}: give the "
                        f"{out_is} to write")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        problems.append(f"'data_dir' = {data_dir!r} is not a directory: give the directory that holds the sets' "
                        "files, or leave it unset")
    return problems


def _missing(key: str, value, fix: str) -> list[str]:
    """The problem of a required command setting left empty, or none."""
    return [] if value else [f"'{key}' is not set: {fix}"]


def _model_problem(key: str, value: str, what: str) -> list[str]:
    return _missing(key, value, f"give the {what} (a Hub id, a save_pretrained directory or a .gguf file)")


@dataclass
class GenerateConfig(PromptOptions):
    """`promptkd generate`: sample one response per prompt of a JSONL file (SeqKD teacher data)."""

    model: str = opt("", "Model that writes the responses: Hub id, save_pretrained directory or .gguf file.")
    data: str = opt("", "Prompts: JSONL (instruction / input [/ output]), a datasets Hub id or a local dataset directory.")
    out: str = opt("", "Output JSONL; an existing file is continued after its last complete batch when its sidecar "
                       "(OUT.meta.json) shows the same model, data and settings, else refused.")
    split: str = opt("train", "Split of a Hub id / directory `data`, slices allowed (e.g. train[1000:]). Ignored for a JSONL file.")
    limit: int | None = opt(None, "Only the first N records; null = all.", min=1)
    batch_size: int = opt(8, "Prompts per generate call.", min=1)
    seed: int = opt(42, "Seed: each batch is seeded with seed + the index of its first record, so a resumed run "
                        "samples what an uninterrupted one would.")
    dtype: str = _dtype_opt("Weight dtype of the model.")
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def required_problems(self) -> list[str]:
        problems = _model_problem("model", self.model, "model that writes the responses")
        problems += _missing("data", self.data, "give a JSONL file of prompts or a datasets Hub id")
        problems += _missing("out", self.out, "give the output JSONL file")
        return problems

    def cross_checks(self) -> list[str]:
        return _sampled_as_is(self.sampling, "generate") + _path_problems(self.out, "file")


@dataclass
class EvalConfig(PromptOptions):
    """`promptkd eval`: the paper's ROUGE-L protocol. The defaults are the protocol (docs/method.md, section 7)
    but for the sets (dolly, selfinst, vicuna of its five; S-NI and UnNI are large and need their files):
    sampling at T 1, top_k 0, top_p 1, no_repeat_ngram_size 6, up to 256 new tokens, prompts
    cut to their first 256 tokens, seeds 10..50; `deviations()` lists every departure."""

    model: str = opt("", "Model to evaluate: Hub id, save_pretrained directory or .gguf file.")
    out: str = opt("", "Output directory: predictions per set and seed, scores.json / .csv / .md.")
    datasets: list[str] = opt(
        ["dolly", "selfinst", "vicuna"],
        "Evaluation sets: names (dolly, selfinst, vicuna, sinst, uinst) or JSONL paths; comma-separated on the command line.",
    )
    data_dir: str | None = opt(
        None, "Directory with local copies of the named sets (DIR/eval/dolly_eval.jsonl or DIR/dolly_eval.jsonl, ...); "
        "null = $PROMPTKD_DATA_DIR. A set without a local file is read from MiniLLM's Hub release.",
    )
    seeds: list[int] = opt([10, 20, 30, 40, 50], "Sampling seeds, one score per set and seed (protocol: 10,20,30,40,50).")
    limit: int | None = opt(None, "Only the first N records of each set (a recorded deviation); null = all.", min=1)
    batch_size: int = opt(16, "Prompts per generate call.", min=1)
    dtype: str = _dtype_opt("Weight dtype of the model.")
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(no_repeat_ngram_size=6))

    def required_problems(self) -> list[str]:
        problems = _model_problem("model", self.model, "model to evaluate")
        problems += _missing("out", self.out, "give the output directory")
        return problems

    def cross_checks(self) -> list[str]:

        problems = []
        if not self.datasets:
            problems.append(f"'datasets' is empty: name at least one set ({', '.join(EVAL_SETS)}) or JSONL file")
        if not self.seeds:
            problems.append("'seeds' is empty: give at least one seed (protocol: 10,20,30,40,50)")
        elif len(set(self.seeds)) != len(self.seeds):
            problems.append(f"'seeds' = {self.seeds} repeats a seed: give each seed once")
        names = [eval_set_name(n) for n in self.datasets]
        if len(set(names)) != len(names):
            problems.append(
                f"'datasets' = {self.datasets} gives two sets the same name {names}: rename one file "
                "(outputs are named after the file stem)"
            )
        return problems + _sampled_as_is(self.sampling, "eval") + _path_problems(self.out, "directory", self.data_dir)


@dataclass
class ExposureBiasConfig(PromptOptions):
    """`promptkd exposure-bias`: ExAccErr(l) of a student against a teacher (docs/method.md, section 7). Both models
    sample with `sampling` (default: T 1, no filters, up to 64 new tokens)."""

    student: str = opt(
        "", "Student: save_pretrained directory, Hub id, .gguf file or a training checkpoint (<run>/checkpoints/step-N)."
    )
    teacher: str = opt("", "Teacher, the oracle p_T: Hub id, save_pretrained directory or .gguf file.")
    out: str = opt("", "Output directory: exposure_bias.csv / .png / .json.")
    data: str = opt("dolly", "Prompts: an evaluation set name (dolly, selfinst, vicuna, sinst, uinst) or a JSONL path.")
    data_dir: str | None = opt(
        None, "Directory with a local copy of the named set (as for eval); null = $PROMPTKD_DATA_DIR, else the Hub."
    )
    num_prompts: int = opt(50, "Use the first N prompts of the set.", min=1)
    samples_per_prompt: int = opt(3, "Responses sampled per prompt from each model.", min=1)
    seed: int = opt(10, "Seed of the student's samples (the teacher's use a disjoint seed stream).")
    batch_size: int = opt(8, "Prompts per generate / forward call.", min=1)
    ended: str = opt(
        "zero", "A response that ended before step t counts 0 in the mean over all responses (zero), or is left "
        "out of the mean (alive).", choices=list(ENDED_MODES),
    )
    dtype: str = _dtype_opt("Weight dtype of both models.")
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64))

    def required_problems(self) -> list[str]:
        problems = _model_problem("student", self.student, "student")
        problems += _model_problem("teacher", self.teacher, "teacher")
        problems += _missing("out", self.out, "give the output directory")
        return problems

    def cross_checks(self) -> list[str]:
        return _sampled_as_is(self.sampling, "exposure-bias") + _path_problems(self.out, "directory", self.data_dir)


# =========================================================================== other commands


@dataclass
class MakeStudentConfig(ConfigBase):
    """`promptkd make-student`: a depth-pruned student that keeps some of the teacher's layers."""

    teacher: str = opt("", "Teacher to prune: Hub id, save_pretrained directory or .gguf file.")
    out: str = opt("", "Output directory (save_pretrained format, plus promptkd_student.json); must not exist or be empty.")
    layers: list[int] | None = opt(
        None, "Teacher layer indices to keep, increasing, e.g. 0,1,2,8,13,18,23,27,28,29; give this or num_layers."
    )
    num_layers: int | None = opt(None, "Keep N evenly spaced layers, first and last included; give this or layers.", min=1)
    dtype: str = _dtype_opt("Weight dtype of the loaded teacher and the saved student.")

    def required_problems(self) -> list[str]:
        problems = _model_problem("teacher", self.teacher, "teacher to prune")
        problems += _missing("out", self.out, "give the output directory")
        if self.layers is None and self.num_layers is None:
            problems.append("neither 'layers' nor 'num_layers' is set: give the layer indices to keep or how many")
        return problems

    def cross_checks(self) -> list[str]:
        if self.layers is not None and self.num_layers is not None:
            return [
                f"'layers' = {self.layers} and 'num_layers' = {self.num_layers} are both set: give only one "
                "(layers picks the indices, num_layers spaces them evenly)"
            ]
        return []


@dataclass
class DemoConfig(ConfigBase):
    """`promptkd demo`: PromptKD beside GKD (its no-prompt ablation), SeqKD and KD, from one init with one
    budget, on SmolLM2-135M-Instruct (see promptkd.demo and docs/demo.md)."""

    out: str | None = opt(None, "Run directory; null = CACHE/demo-run (CACHE: --cache-dir, $PROMPTKD_CACHE or ~/.cache/promptkd).")
    steps: int | None = opt(None, "Optimizer steps of each compared run (PromptKD, GKD, SeqKD, KD); null = the demo's own budget "
                              "(docs/demo.md).", min=1)
    cache_dir: str | None = opt(
        None, "Where the model and the derived student are cached; null = ~/.cache/promptkd ($PROMPTKD_CACHE)."
    )


@dataclass
class PlotConfig(ConfigBase):
    """`promptkd plot RUN_DIR`: one PNG of a run's metrics.jsonl (promptkd.evaluation.plot)."""

    run_dir: str = opt("", "Run directory (train.output_dir) holding metrics.jsonl; also the positional RUN_DIR.")
    out: str | None = opt(None, "Output PNG; null = RUN_DIR/metrics.png.")

    def required_problems(self) -> list[str]:
        return [] if self.run_dir else ["'run_dir' is not set: give the run directory (promptkd plot RUN_DIR)"]


COMMANDS: dict[str, type[ConfigBase]] = {
    "train": Config,
    "generate": GenerateConfig,
    "make-student": MakeStudentConfig,
    "eval": EvalConfig,
    "exposure-bias": ExposureBiasConfig,
    "demo": DemoConfig,
    "plot": PlotConfig,
}


# --------------------------------------------------------------------------- parsing


def parse_overrides(args: list[str]) -> dict:
    """['--train.max_steps', '5', '--model.student=x'] -> nested dict (values parsed as YAML;
    '-' in a key is read as '_')."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}': options look like --key value (--section.key value for a nested key)")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise UserError(f"option '{arg}' has no value: write {arg} VALUE")
            raw = args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_key(out, key.replace("-", "_"), value, arg)  # flags may be written in kebab-case
    return out


def set_key(out: dict, key: str, value, flag: str | None = None) -> None:
    """out['a']['b'] = value for key 'a.b' (creating the nested mappings)."""
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{flag or key}' conflicts with another override of '{p}'")
    node[parts[-1]] = value


def load_command_config(
    command: str, path: str | Path | None = None, overrides: list[str] | dict | None = None, *, check_required: bool = True
) -> ConfigBase:
    """YAML file (optional) + overrides -> the validated config of `command` (a COMMANDS key).
    Raises ConfigError listing every problem."""
    data = read_yaml(path) if path else {}
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = merge_dicts(data, over)
    return COMMANDS[command].from_dict(data, check_required=check_required)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None, *, check_required: bool = True) -> Config:
    """YAML file (optional) + overrides -> validated train Config. Raises ConfigError listing every problem."""
    return load_command_config("train", path, overrides, check_required=check_required)


def config_reference_markdown(command: str = "train") -> str:
    """The config reference of one command (README / docs), generated from its dataclasses."""
    return reference_markdown(COMMANDS[command])
