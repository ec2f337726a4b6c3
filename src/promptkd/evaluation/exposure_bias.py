"""Exposure bias: the excess accumulated error ExAccErr(l) of a student against a teacher.

    promptkd exposure-bias --student runs/promptkd/final/student --teacher TEACHER \
        --data dolly --num-prompts 50 --sampling.max_new_tokens 64 --out runs/promptkd/exposure_bias

    run_exposure_bias(ExposureBiasConfig(student=..., teacher=..., out=...))

Definition (docs/method.md, section 7; Arora et al. 2022 as adapted by MiniLLM, with the teacher p_T as the
oracle and the student p_S as the model). For a prompt x and a response prefix y_<t,

    kl_t(y) = KL(p_T(. | x, y_<t) || p_S(. | x, y_<t))          (token-level, float32)

    R(l)   = sum_{t <= l} E_{y ~ p_S} [kl_t(y)]       (accumulated regret on student prefixes)
    eps(l) = sum_{t <= l} E_{y ~ p_T} [kl_t(y)]       (the same error on teacher prefixes)
    ExAccErr(l) = 100 * (R(l) - eps(l)) / eps(l)      (percent)

MiniLLM writes eps(l) as a per-step average and divides by l * eps(l); the two forms are the
same number. Expectations are estimated with `samples_per_prompt` (default 3) responses per
prompt from each model, sampled with the config's `sampling` record: by default as in training
(T = 1, top_k off, top_p 1, no n-gram block), up to 64 new tokens (`sampling.max_new_tokens`,
the curve's length); kl_t is evaluated at every predicted response position, the position that
predicts the final EOS included.

Ended sequences (our choice; gmkim-ai/PromptKD's evaluate_exposure_bias.py averages only over
the responses still running, which is `ended="alive"` here, so its curves are not directly
comparable with our default): a response that
ended with EOS before step t contributes kl_t = 0 (it incurs no further error), and the
expectation divides by *all* sampled responses. So R(l) is exactly the expectation of the
per-sequence accumulated error sum_{t <= min(l, |y|)} kl_t(y), and R(l), eps(l) are
non-decreasing in l. `ended="alive"` instead averages kl_t over the responses still running
at step t (conditional expectation); the CSV keeps the counts of running responses either way.

Zero division: ExAccErr(l) = 0 when eps(l) = 0 and R(l) = 0 (e.g. student == teacher, where
every kl_t is exactly 0), +inf when eps(l) = 0 < R(l); the plot skips non-finite points.

Checkpoints: a model path may be a `save_pretrained` directory, or an accelerate checkpoint
written during training (`<run>/checkpoints/step-N`, weights only): its architecture and
tokenizer are then taken from the run's `config.yaml` (model.student).
`exposure_bias_over_checkpoints` evaluates a list of them against one teacher, reusing the
teacher's samples, which gives ExAccErr through training.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from promptkd.config import ENDED_MODES, ExposureBiasConfig
from promptkd.data.collate import collate_prompts
from promptkd.data.dataset import build_examples
from promptkd.errors import UserError, require_extra
from promptkd.evaluation.datasets import load_eval_set
from promptkd.losses import forward_kl
from promptkd.models.loading import (
    ModelSpec,
    check_tokenizer_compatibility,
    eos_token_ids,
    load_model_and_tokenizer,
)
from promptkd.precision import Precision, autocast, model_precision
from promptkd.sampling import SamplingConfig, response_logits, sample_responses
from promptkd.training.checkpoint import atomic_write_text

_TEACHER_SEED_OFFSET = 500_009  # teacher samples use a seed stream disjoint from the student's


@dataclass
class ExposureBiasResult:
    """One ExAccErr curve; every list has one entry per l = 1..max_new_tokens."""

    lengths: list[int]  # l = 1..max_new_tokens
    R: list[float]
    eps: list[float]
    exaccerr: list[float]
    student_running: list[int] = field(default_factory=list)  # student samples still running at step l
    teacher_running: list[int] = field(default_factory=list)
    num_sequences: int = 0  # samples per model (prompts x samples_per_prompt)
    ended: str = "zero"

    def summary(self, label: str = "") -> str:
        picks = sorted({min(n, len(self.lengths)) for n in (1, 8, 16, 32, 64, 128, 256, len(self.lengths))} - {0})
        parts = [f"l={n}: {_fmt(self.exaccerr[n - 1])}%" for n in picks]
        head = f"{label}: " if label else ""
        return (
            f"{head}ExAccErr {'  '.join(parts)}  (R({len(self.lengths)})={self.R[-1]:.3f}, "
            f"eps({len(self.lengths)})={self.eps[-1]:.3f}, {self.num_sequences} samples per model)"
        )


def _fmt(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else str(x)


def exaccerr(R: float, eps: float) -> float:
    """100 (R - eps) / eps, with 0 for 0/0 and +inf (or -inf) when only eps is 0."""
    if eps == 0.0:
        if R == 0.0:
            return 0.0
        return math.inf if R > 0 else -math.inf
    return 100.0 * (R - eps) / eps


# ----------------------------------------------------------------------------- models


def load_model_for_eval(path: str | Path, dtype: str = "float32"):
    """(model, tokenizer) from a save_pretrained dir / Hub id / .gguf, or a training checkpoint.

    A training checkpoint is a directory with `model.safetensors` (accelerate state) but no
    config.json, normally `<run>/checkpoints/step-N`: the student architecture and tokenizer
    come from `<run>/config.yaml`'s model.student and the weights from the checkpoint.
    """

    p = Path(str(path)).expanduser()
    if p.is_dir() and not (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        cfg_file = run_dir / "config.yaml"
        if not cfg_file.is_file():
            raise UserError(
                f"{p} looks like a training checkpoint (model.safetensors, no config.json) but "
                f"{cfg_file} is missing: pass a save_pretrained directory instead"
            )
        import yaml
        from safetensors.torch import load_file

        base = (yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}).get("model", {}).get("student")
        if not base:
            raise UserError(f"{cfg_file} has no model.student: cannot rebuild the checkpoint's architecture")
        model, tokenizer = load_model_and_tokenizer(ModelSpec(base, dtype=dtype))
        state = load_file(str(p / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        if unexpected or set(missing) - tied:
            raise UserError(
                f"checkpoint {p} does not match the architecture of {base}: missing "
                f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        model.tie_weights()
        model.eval()
        return model, tokenizer
    return load_model_and_tokenizer(ModelSpec(str(path), dtype=dtype))


def checkpoint_label(path: str | Path) -> str:
    """'step 100' for <run>/checkpoints/step-00000100, else the path's last parts."""
    p = Path(str(path))
    if p.name.startswith("step-") and p.name[5:].isdigit():
        return f"step {int(p.name[5:])}"
    parts = p.parts[-3:]
    return "/".join(parts)


# ----------------------------------------------------------------------------- core


def sample_sequences(model, tokenizer, examples, *, samples_per_prompt: int, sampling: SamplingConfig,
                     seed: int, batch_size: int, eos_token_ids) -> list:
    """SequenceBatches of `samples_per_prompt` responses per example, sampled with `sampling`.

    Batch j of sample round k is seeded with seed + 7919 * k + j, independently of the global RNG.
    """

    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    jobs = [(k, j, start) for k in range(samples_per_prompt) for j, start in enumerate(range(0, len(examples), batch_size))]
    batches = []
    for k, j, start in tqdm(jobs, desc=f"sampling ({type(model).__name__})", disable=None, leave=False):  # a bar on a TTY
        ids, mask = collate_prompts(examples[start : start + batch_size], tokenizer.pad_token_id)
        batches.append(sample_responses(
            model, ids.to(device), mask.to(device), eos_token_ids=eos_token_ids,
            pad_token_id=tokenizer.pad_token_id, config=sampling, generator_seed=seed + 7919 * k + j,
        ))
    return batches


@torch.no_grad()
def per_step_kl(student, teacher, batches, *, max_new_tokens: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum over sequences of KL(p_T || p_S) at each response step, and the running counts.

    Returns (kl_sum (L,), running (L,), num_sequences), L = max_new_tokens, float64/long;
    step t (0-based) is the prediction of response token t given the prompt and y_<t.
    """

    from tqdm.auto import tqdm

    kl_sum = torch.zeros(max_new_tokens, dtype=torch.float64)
    running = torch.zeros(max_new_tokens, dtype=torch.long)
    n = 0
    for batch in tqdm(batches, desc="KL per step", disable=None, leave=False):  # a bar on a TTY
        mask = batch.loss_mask[:, batch.prompt_length :]  # (B, R)
        n += mask.shape[0]
        if mask.shape[1] == 0 or not mask.any():
            continue
        s_logits = response_logits(student, batch, vocab)  # (B, R, V)
        t_logits = response_logits(teacher, batch.to(next(teacher.parameters()).device), vocab).to(s_logits.device)
        # forward_kl(logits=q, target=p) = KL(p || q): here KL(p_T || p_S), in float32
        values = forward_kl(s_logits[mask].float(), t_logits[mask].float())  # (N,)
        per_pos = torch.zeros(mask.shape, dtype=torch.float64)
        per_pos[mask.cpu()] = values.double().cpu()
        width = min(mask.shape[1], max_new_tokens)
        kl_sum[:width] += per_pos[:, :width].sum(0)
        running[:width] += mask[:, :width].long().sum(0).cpu()
    return kl_sum, running, n


def curve_from_sums(kl_student: torch.Tensor, run_student: torch.Tensor, n_student: int,
                    kl_teacher: torch.Tensor, run_teacher: torch.Tensor, n_teacher: int,
                    ended: str = "zero") -> ExposureBiasResult:
    """R, eps and ExAccErr from per-step KL sums (see the module docstring for `ended`)."""
    if ended not in ENDED_MODES:
        raise UserError(f"ended = {ended!r}: choose one of {ENDED_MODES}")
    if ended == "zero":
        mean_s = kl_student / max(n_student, 1)
        mean_t = kl_teacher / max(n_teacher, 1)
    else:
        mean_s = torch.where(run_student > 0, kl_student / run_student.clamp(min=1), 0.0)
        mean_t = torch.where(run_teacher > 0, kl_teacher / run_teacher.clamp(min=1), 0.0)
    R = mean_s.cumsum(0).tolist()
    eps = mean_t.cumsum(0).tolist()
    return ExposureBiasResult(
        lengths=list(range(1, len(R) + 1)), R=R, eps=eps, exaccerr=[exaccerr(r, e) for r, e in zip(R, eps, strict=True)],
        student_running=run_student.tolist(), teacher_running=run_teacher.tolist(),
        num_sequences=n_student, ended=ended,
    )


def exposure_bias_curve(student, teacher, tokenizer, examples, *, samples_per_prompt: int = 3,
                        sampling: SamplingConfig | None = None, seed: int = 10, batch_size: int = 8,
                        ended: str = "zero", teacher_batches: list | None = None,
                        vocab: int | None = None) -> ExposureBiasResult:
    """ExAccErr curve of loaded models on prompt-only `examples` (see the module docstring).

    sampling: how both models sample (default: ExposureBiasConfig's, T 1 and up to 64 new
    tokens); the curve has sampling.max_new_tokens points.
    teacher_batches: teacher samples from an earlier call (`ExposureBiasResult` does not keep
    them; use `sample_sequences` with seed + _TEACHER_SEED_OFFSET) to evaluate many students
    against one set of teacher prefixes.
    """

    sampling = ExposureBiasConfig().sampling if sampling is None else sampling
    if samples_per_prompt < 1 or not examples:
        raise UserError("exposure bias needs >= 1 prompt and samples_per_prompt >= 1")
    if ended not in ENDED_MODES:
        raise UserError(f"ended = {ended!r}: choose one of {ENDED_MODES}")
    if vocab is None:
        vocab = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    eos = sorted(set(eos_token_ids(tokenizer, student)) | set(eos_token_ids(tokenizer, teacher)))
    student.eval()
    teacher.eval()
    common = dict(samples_per_prompt=samples_per_prompt, sampling=sampling, batch_size=batch_size, eos_token_ids=eos)
    s_batches = sample_sequences(student, tokenizer, examples, seed=seed, **common)
    if teacher_batches is None:
        teacher_batches = sample_sequences(teacher, tokenizer, examples, seed=seed + _TEACHER_SEED_OFFSET, **common)
    length = sampling.max_new_tokens
    ks, rs, ns = per_step_kl(student, teacher, s_batches, max_new_tokens=length, vocab=vocab)
    kt, rt, nt = per_step_kl(student, teacher, teacher_batches, max_new_tokens=length, vocab=vocab)
    return curve_from_sums(ks, rs, ns, kt, rt, nt, ended=ended)


# ----------------------------------------------------------------------------- outputs


def write_csv(path: str | Path, curves: Mapping[str, ExposureBiasResult]) -> Path:
    """One row per (curve, l): l, R, eps, ExAccErr, then the running counts (and a label column
    first when there are several curves)."""
    path = Path(path)
    labelled = len(curves) > 1
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow((["label"] if labelled else []) + ["l", "R", "eps", "ExAccErr", "student_running", "teacher_running"])
        for label, c in curves.items():
            for i, n in enumerate(c.lengths):
                row = [n, f"{c.R[i]:.6g}", f"{c.eps[i]:.6g}", f"{c.exaccerr[i]:.6g}",
                       c.student_running[i] if c.student_running else "", c.teacher_running[i] if c.teacher_running else ""]
                w.writerow(([label] if labelled else []) + row)
    return path


def plot_curves(path: str | Path, curves: Mapping[str, ExposureBiasResult], title: str = "Exposure bias") -> Path:
    """ExAccErr(l) per curve (matplotlib Agg); non-finite points are skipped."""
    matplotlib = require_extra("matplotlib", "plot", "the exposure-bias plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, c in curves.items():
        pts = [(n, v) for n, v in zip(c.lengths, c.exaccerr, strict=True) if math.isfinite(v)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("generation length l (tokens)")
    ax.set_ylabel("ExAccErr(l) (%)")
    ax.set_title(title)
    if len(curves) > 1 or any(curves):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _read_records(cfg: ExposureBiasConfig) -> list:
    """The prompts, read before any model loads (a bad --data fails in seconds); their references,
    if any, are not needed."""
    return load_eval_set(cfg.data, cfg.data_dir, require_outputs=False)[: cfg.num_prompts]


def _examples(cfg: ExposureBiasConfig, records: list, tokenizer):
    examples, _ = build_examples(
        records, tokenizer, template=cfg.template, max_prompt_length=cfg.max_prompt_length,
        max_length=cfg.max_prompt_length + cfg.sampling.max_new_tokens, drop_long_prompts=False,
        with_responses=False, source=str(cfg.data), prompt_truncation=cfg.prompt_truncation,
    )
    return examples


def exposure_bias_over_checkpoints(checkpoints: Sequence[str | Path] | Mapping[str, str | Path],
                                   cfg: ExposureBiasConfig, *, teacher=None, tokenizer=None,
                                   write: bool = True) -> dict[str, ExposureBiasResult]:
    """ExAccErr curves of several students (e.g. checkpoints through training) vs one teacher.

    checkpoints: paths (labelled by `checkpoint_label`) or {label: path}; each takes the place
    of `cfg.student`, which may be left empty. The teacher's samples are drawn once and shared
    by every student, and each student's samples use the same seeds, so curves differ only
    through the students. With `write`, saves `exposure_bias_curves.csv` / `.png` and
    `exposure_bias.json` in cfg.out.
    """

    items = dict(checkpoints) if isinstance(checkpoints, Mapping) else {checkpoint_label(p): p for p in checkpoints}
    if not items:
        raise UserError("exposure_bias_over_checkpoints: no checkpoints given")
    replace(cfg, student=str(next(iter(items.values())))).validate()
    records = _read_records(cfg)
    out = Path(cfg.out)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    if teacher is None:
        teacher, tokenizer = load_model_for_eval(cfg.teacher, cfg.dtype)
    examples = _examples(cfg, records, tokenizer)
    teacher_batches = None
    curves: dict[str, ExposureBiasResult] = {}
    precision = model_precision(cfg.mixed_precision, teacher, "exposure-bias")
    for label, path in items.items():
        student, s_tok = load_model_for_eval(path, cfg.dtype)
        vocab = check_tokenizer_compatibility(tokenizer, s_tok, teacher, student)
        with autocast(teacher.device, precision):
            if teacher_batches is None:
                eos = sorted(set(eos_token_ids(tokenizer, student)) | set(eos_token_ids(tokenizer, teacher)))
                teacher_batches = sample_sequences(
                    teacher, tokenizer, examples, samples_per_prompt=cfg.samples_per_prompt,
                    sampling=cfg.sampling, seed=cfg.seed + _TEACHER_SEED_OFFSET,
                    batch_size=cfg.batch_size, eos_token_ids=eos,
                )
            curves[label] = exposure_bias_curve(
                student, teacher, tokenizer, examples, samples_per_prompt=cfg.samples_per_prompt,
                sampling=cfg.sampling, seed=cfg.seed, batch_size=cfg.batch_size,
                ended=cfg.ended, teacher_batches=teacher_batches, vocab=vocab,
            )
        del student
    if write:
        write_csv(out / "exposure_bias_curves.csv", curves)
        plot_curves(out / "exposure_bias_curves.png", curves, title=f"Exposure bias vs teacher ({cfg.data})")
        _write_json(out / "exposure_bias.json", cfg, curves, precision)
    return curves


def _write_json(path: Path, cfg: ExposureBiasConfig, curves: Mapping[str, ExposureBiasResult],
                precision: Precision) -> None:
    from dataclasses import asdict

    def clean(v):
        return v if math.isfinite(v) else str(v)

    data = {"config": asdict(cfg), "precision": precision.as_record(), "curves": {
        k: {**asdict(c), "exaccerr": [clean(v) for v in c.exaccerr]} for k, c in curves.items()}}
    atomic_write_text(path, json.dumps(data, indent=1))  # whole or absent: `promptkd compare` re-uses it when present


def run_exposure_bias(cfg: ExposureBiasConfig) -> str:
    """Compute ExAccErr for cfg.student vs cfg.teacher; write exposure_bias.csv / .png / .json
    in cfg.out and return a one-paragraph text summary. Raises ConfigError for an invalid config."""

    cfg.validate()
    require_extra("matplotlib", "plot", "the exposure-bias plot")  # before hours of sampling, not after
    records = _read_records(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_model_for_eval(cfg.teacher, cfg.dtype)
    student, s_tok = load_model_for_eval(cfg.student, cfg.dtype)
    vocab = check_tokenizer_compatibility(tokenizer, s_tok, teacher, student)
    examples = _examples(cfg, records, tokenizer)
    precision = model_precision(cfg.mixed_precision, teacher, "exposure-bias")
    with autocast(teacher.device, precision):
        curve = exposure_bias_curve(
            student, teacher, tokenizer, examples, samples_per_prompt=cfg.samples_per_prompt,
            sampling=cfg.sampling, seed=cfg.seed, batch_size=cfg.batch_size, ended=cfg.ended, vocab=vocab,
        )
    curves = {"student": curve}
    write_csv(out / "exposure_bias.csv", curves)
    plot_curves(out / "exposure_bias.png", curves, title=f"Exposure bias of {Path(cfg.student).name} ({cfg.data})")
    _write_json(out / "exposure_bias.json", cfg, curves, precision)
    return (
        f"{curve.summary()}\n{len(examples)} prompts x {cfg.samples_per_prompt} samples, up to "
        f"{cfg.sampling.max_new_tokens} new tokens; wrote {out / 'exposure_bias.csv'} and {out / 'exposure_bias.png'}"
    )
