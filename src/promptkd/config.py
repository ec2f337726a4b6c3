"""Configuration: one dataclass per section, loaded from YAML plus dotted overrides.

    promptkd train --config configs/promptkd.yaml --train.max_steps 50 --promptkd.base_coef 0

Every field carries its help text, its source (paper / reference code / our choice) and its
valid range in `field(metadata=...)`. `load_config` reports *all* problems at once (unknown
keys, wrong types, out-of-range values, cross-field conflicts), each naming the key, the value
and the fix. The resolved config is saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promptkd.errors import ConfigError, UserError
from promptkd.losses import DIVERGENCES

METHODS = ("promptkd", "gkd", "kd", "seqkd", "sft")
DIVERGENCE_NAMES = tuple(DIVERGENCES)


def opt(default, help: str, *, choices=None, min=None, max=None, min_exclusive=False):
    """A config field with help text and validation metadata."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    teacher: str | None = opt(
        None,
        "Teacher: Hub id, local save_pretrained directory or a .gguf file (dequantised once into a cached dense "
        "copy). Unused by sft, and by seqkd with seqkd.kd_ratio 0 (seqkd reads teacher responses from "
        "data.teacher_responses).",
    )
    student: str = opt("", "Student: Hub id, local save_pretrained directory or a .gguf file.")
    dtype: str = opt(
        "float32",
        "Weight dtype of both models. Mixed precision for compute is train.mixed_precision.",
        choices=["float32", "bfloat16", "float16"],
    )
    trust_remote_code: bool = opt(False, "Passed to from_pretrained for custom architectures.")


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
        choices=["alpaca", "chat", "plain"],
    )
    max_prompt_length: int = opt(256, "Training prompts longer than this (tokens) are dropped and counted (SPEC 4).", min=1)
    max_length: int = opt(512, "Prompt + response limit in tokens; reference responses are cut to fit (SPEC 4).", min=2)
    max_response_length: int | None = opt(
        None, "Reference / teacher responses are cut to this many tokens (EOS included; a cut response loses its EOS). "
        "Set it to sampling.max_new_tokens to give off-policy methods the same response budget as on-policy ones; "
        "null = only data.max_length limits them.", min=1,
    )
    max_train_examples: int | None = opt(None, "Use only the first N training records (after filtering).", min=1)
    max_dev_examples: int | None = opt(None, "Use only the first N dev records.", min=1)


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/promptkd", "Run directory: config, metrics, checkpoints, final student.")
    seed: int = opt(42, "Seed for data order, sampling and initialisation.")
    max_steps: int = opt(1000, "Total optimizer steps K (also the horizon of PromptKD's regulariser schedule).", min=1)
    batch_size: int = opt(8, "Micro-batch size per process.", min=1)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step; loss normalised by the global token count.", min=1)
    learning_rate: float = opt(5e-5, "Student learning rate (SPEC 4: 5e-5 GPT-2 base; 1e-5 medium; 5e-6 larger).", min=0.0, min_exclusive=True)
    weight_decay: float = opt(0.01, "AdamW weight decay (SPEC 4).", min=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0.0, max=1.0)
    adam_beta2: float = opt(0.999, "AdamW beta2.", min=0.0, max=1.0)
    lr_scheduler: str = opt(
        "constant_with_warmup", "LR schedule (SPEC 4: constant after warm-up).",
        choices=["constant_with_warmup", "linear", "cosine", "constant"],
    )
    warmup_steps: int = opt(100, "Linear warm-up steps (SPEC 4: 100).", min=0)
    max_grad_norm: float = opt(1.0, "Gradient-norm clip per parameter set (SPEC 4: 1.0); 0 disables.", min=0.0)
    mixed_precision: str = opt(
        "no",
        "Autocast for model compute; loss maths stays float32. bf16 (fp16 on CUDA) also holds the frozen "
        "teacher's linear weights in that dtype (same results, less memory).",
        choices=["no", "bf16", "fp16"],
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
    trackers: list = opt([], "accelerate trackers, e.g. [tensorboard].")
    cpu: bool = opt(False, "Force CPU even when a GPU is present.")
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
class SamplingSection:
    """On-policy sampling settings (SPEC 2.1: T = 1, top_k off, top_p 1, 256 new tokens)."""

    max_new_tokens: int = opt(256, "Maximum new tokens per sampled response (reference: 256).", min=1)
    temperature: float = opt(1.0, "Sampling temperature (reference: 1.0).", min=0.0, min_exclusive=True)
    top_k: int = opt(0, "Top-k filter; 0 disables (reference).", min=0)
    top_p: float = opt(1.0, "Nucleus filter; 1.0 disables (reference).", min=0.0, max=1.0, min_exclusive=True)
    do_sample: bool = opt(True, "Sample (True) or greedy decode (False, for tests).")
    eos_at_cap: bool | None = opt(
        None,
        "A sample that hits max_new_tokens without EOS gets EOS as its last token, so capped samples "
        "are trained to end. null = the method's default: on for promptkd (reference code overwrites "
        "the last position), off for gkd (like TRL's GKDTrainer, which trains capped samples as they are).",
    )

    def to_sampling_config(self, eos_at_cap_default: bool = False):
        """The sampler's own record (validated again by its __post_init__); a null eos_at_cap
        takes the method's default."""
        from promptkd.sampling import SamplingConfig

        settings = dataclasses.asdict(self)
        if settings["eos_at_cap"] is None:
            settings["eos_at_cap"] = eos_at_cap_default
        return SamplingConfig(**settings)


@dataclass
class PromptKDSection:
    """PromptKD (SPEC 2-3). Defaults follow the paper and the authors' code."""

    num_virtual_tokens: int = opt(7, "Soft-prompt length (paper: 7).", min=1)
    prompt_init: str = opt(
        "text", "Prompt init: embeddings of prompt_init_text (tiled/cut), the pad embedding, or random.",
        choices=["text", "pad", "random"],
    )
    prompt_init_text: str = opt("Suppose you are a student.", "Init text (paper / reference code).")
    prompt_learning_rate: float | None = opt(None, "Prompt LR; null = train.learning_rate (reference code).", min=0.0, min_exclusive=True)
    prompt_weight_decay: float = opt(0.01, "Prompt AdamW weight decay (reference).", min=0.0)
    kd_direction: str = opt("reverse", "L_kd: reverse = KL(p_TP || sg p_S); forward = KL(sg p_S || p_TP).", choices=["reverse", "forward"])
    reg_direction: str = opt("reverse", "L_reg: reverse = KL(p_TP || sg p_T); forward = KL(sg p_T || p_TP).", choices=["reverse", "forward"])
    student_divergence: str = opt("reverse_kl", "Student loss to sg p_TP on its own samples (paper: reverse KL).", choices=list(DIVERGENCE_NAMES))
    base_coef: float = opt(1.0, "Regulariser weight: lambda_k = base_coef * (1 - k/K); 0 disables it.", min=0.0)
    teacher_dropout: bool = opt(True, "Teacher dropout during the prompt forward (reference code quirk: on).")
    freeze_prompt: bool = opt(False, "Freeze the prompt (= on-policy reverse KL to the plain teacher: the 'no prompt' ablation).")
    lagged_target: bool = opt(False, "Student target from the pre-update prompt (saves one teacher forward; not the paper's order).")
    teacher_gradient_checkpointing: bool = opt(False, "Checkpoint the teacher during the prompt backward (less memory, more time).")


@dataclass
class GKDSection:
    """Generalized KD / ImitKD (SPEC 5). beta=1 with lmbda=1 is PromptKD's 'no prompt' ablation."""

    lmbda: float = opt(1.0, "Fraction of optimizer steps trained on student samples (on-policy); the rest on dataset responses.", min=0.0, max=1.0)
    divergence: str = opt("generalized_jsd", "Per-token divergence.", choices=list(DIVERGENCE_NAMES))
    beta: float = opt(1.0, "generalized_jsd interpolation: 0 = forward KL, 1 = reverse KL.", min=0.0, max=1.0)
    alpha: float = opt(0.1, "Skew of skew_forward_kl / skew_reverse_kl (DistiLLM: 0.1).", min=0.0, max=1.0)
    seq_kd: bool = opt(False, "Off-policy steps use teacher-sampled responses instead of dataset responses.")


@dataclass
class KDSection:
    """Word-level KD on reference responses: (1 - kd_ratio) * CE + kd_ratio * divergence (SPEC 5)."""

    kd_ratio: float = opt(0.5, "Weight of the divergence term (MiniLLM/PromptKD KD baseline: 0.5).", min=0.0, max=1.0)
    divergence: str = opt("forward_kl", "Divergence to the teacher.", choices=list(DIVERGENCE_NAMES))
    beta: float = opt(0.5, "generalized_jsd beta.", min=0.0, max=1.0)
    alpha: float = opt(0.1, "Skew KL alpha (DistiLLM: 0.1).", min=0.0, max=1.0)


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


@dataclass
class Config:
    method: str = opt("promptkd", "Distillation method.", choices=list(METHODS))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    promptkd: PromptKDSection = field(default_factory=PromptKDSection)
    gkd: GKDSection = field(default_factory=GKDSection)
    kd: KDSection = field(default_factory=KDSection)
    seqkd: SeqKDSection = field(default_factory=SeqKDSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


METHOD_SECTIONS = {"promptkd": "promptkd", "gkd": "gkd", "kd": "kd", "seqkd": "seqkd"}
TEACHER_FREE_METHODS = {"sft"}


# --------------------------------------------------------------------------- parsing


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) a YAML value against a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _type_ok(value, a)
            if ok:
                return True, v
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 5e-5 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is list or origin is list:
        if isinstance(value, str):
            return True, [v for v in value.split(",") if v]
        return isinstance(value, list), value
    return True, value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build_section(cls, data: Any, prefix: str, problems: list[str]):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.')}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            problems.append(f"unknown key '{prefix}{key}'{hint}")
            continue
        f = names[key]
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build_section(tp, value, f"{prefix}{key}.", problems)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            problems.append(f"'{prefix}{key}' = {value!r}: expected {_type_name(tp)}")
            continue
        problems.extend(_check_range(f, coerced, f"{prefix}{key}"))
        kwargs[key] = coerced
    return cls(**kwargs)


def _check_range(f: dataclasses.Field, value: Any, name: str) -> list[str]:
    meta = f.metadata
    out = []
    if value is None:
        return out
    choices = meta.get("choices")
    if choices and value not in choices:
        out.append(f"'{name}' = {value!r}: must be one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            rel = ">" if meta.get("min_exclusive") else ">="
            out.append(f"'{name}' = {value!r}: must be {rel} {lo}")
        if hi is not None and value > hi:
            out.append(f"'{name}' = {value!r}: must be <= {hi}")
    return out


def _cross_checks(cfg: Config) -> list[str]:
    problems = []
    if not cfg.model.student:
        problems.append("'model.student' is not set: give a Hub id, a save_pretrained directory or a .gguf file")
    if cfg.method not in TEACHER_FREE_METHODS and not cfg.model.teacher and not (
        cfg.method == "seqkd" and cfg.seqkd.kd_ratio == 0
    ):
        fix = ""
        if cfg.method == "seqkd":
            fix = f" (seqkd.kd_ratio = {cfg.seqkd.kd_ratio} adds a forward-KL term; --seqkd.kd_ratio 0 trains on the teacher responses alone)"
        problems.append(f"'model.teacher' is not set but method '{cfg.method}' needs a teacher{fix}")
    if not cfg.data.train and not (cfg.method == "seqkd" and cfg.data.teacher_responses):
        problems.append("'data.train' is not set: give a JSONL file or a datasets Hub id")
    if cfg.method == "seqkd" and not cfg.data.teacher_responses:
        problems.append(
            "'data.teacher_responses' is not set but method 'seqkd' trains on teacher responses: "
            "write them with `promptkd generate --model TEACHER --data TRAIN --out FILE`"
        )
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        problems.append(
            f"'data.max_prompt_length' = {cfg.data.max_prompt_length} must be smaller than "
            f"'data.max_length' = {cfg.data.max_length} (room is needed for the response)"
        )
    if cfg.train.eval_metric == "rougeL" and not cfg.data.dev and cfg.train.eval_every:
        problems.append("'train.eval_every' is set but 'data.dev' is not: give dev data or set eval_every 0")
    from promptkd.evaluation.datasets import eval_set_for_source

    for key, source, data_files in (
        ("train", cfg.data.train, cfg.data.train_data_files),
        ("dev", cfg.data.dev, cfg.data.dev_data_files),
    ):
        name = eval_set_for_source(source, data_files) if source else None
        if name is not None:
            files = f" with data_files {data_files!r}" if data_files else ""
            problems.append(
                f"'data.{key}' = {source!r}{files} is the '{name}' evaluation set: training or checkpoint "
                "selection on it leaks the test set into the results. For Dolly use MiniLLM's training file "
                "as configs/paper/*.yaml do (data_files raw.jsonl, split train[1000:] to train, train[:1000] as dev)"
            )
    return problems


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are valid but probably not meant (the trainer warns with these)."""
    out = []
    if cfg.train.warmup_steps > cfg.train.max_steps:
        out.append(
            f"train.warmup_steps = {cfg.train.warmup_steps} exceeds train.max_steps = {cfg.train.max_steps}: "
            "the learning rate never reaches its peak"
        )
    for name, section in METHOD_SECTIONS.items():
        if name != cfg.method and getattr(cfg, section) != type(getattr(cfg, section))():
            out.append(f"the '{section}' section is set but method is '{cfg.method}': it is ignored")
    if cfg.method in TEACHER_FREE_METHODS and cfg.model.teacher:
        out.append(f"model.teacher is set but method '{cfg.method}' uses no teacher: it is ignored")
    return out


def config_from_dict(data: dict, *, check_required: bool = True) -> Config:
    problems: list[str] = []
    cfg = _build_section(Config, data, "", problems)
    if not problems and check_required:
        problems.extend(_cross_checks(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def parse_overrides(args: list[str]) -> dict:
    """['--train.max_steps', '5', '--model.student=x'] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}': overrides look like --section.key value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise UserError(f"override '{arg}' has no value: write {arg} VALUE")
            raw = args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{arg}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"invalid YAML in {path}{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None, *, check_required: bool = True) -> Config:
    """YAML file (optional) + overrides -> validated Config. Raises ConfigError listing every problem."""
    data = read_yaml(path) if path else {}
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = _merge(data, over)
    return config_from_dict(data, check_required=check_required)


def config_reference_markdown() -> str:
    """The config reference (README / docs), generated from the dataclasses' metadata."""
    lines = []
    hints = typing.get_type_hints(Config)
    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(hints[f.name])]
    sections = [f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]
    lines.append("| key | default | allowed | meaning |\n|---|---|---|---|")
    for f in top:
        lines.append(_ref_row(f.name, f))
    for s in sections:
        cls = hints[s.name]
        for f in dataclasses.fields(cls):
            lines.append(_ref_row(f"{s.name}.{f.name}", f))
    return "\n".join(lines) + "\n"


def _ref_row(name: str, f: dataclasses.Field) -> str:
    m = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    allowed = ""
    if m.get("choices"):
        allowed = " / ".join(map(str, m["choices"]))
    elif m.get("min") is not None or m.get("max") is not None:
        lo = m.get("min")
        hi = m.get("max")
        op = ">" if m.get("min_exclusive") else ">="
        allowed = " and ".join(x for x in (f"{op} {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "") if x)
    return f"| `{name}` | `{default!r}` | {allowed} | {m.get('help', '')} |"
