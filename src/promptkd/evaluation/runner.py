"""The paper's evaluation protocol (docs/method.md, section 7) for one model.

    promptkd eval --model runs/promptkd/final/student --datasets dolly,selfinst,vicuna \
        --seeds 10,20,30,40,50 --out runs/promptkd/eval

    run_evaluation(EvalConfig(model="runs/promptkd/final/student", out="runs/promptkd/eval"))

`EvalConfig`'s defaults are the protocol: for every set and seed, sample one response per
prompt (T = 1, top_k 0, top_p 1, no_repeat_ngram_size 6, up to 256 new tokens, a longer prompt
cut to its FIRST 256 tokens as MiniLLM / PromptKD's evaluation does), decode with special
tokens skipped, strip, score ROUGE-L F (rouge-score, stemmer on, max over references, x 100).
Any other setting is allowed and recorded as a deviation (`deviations`). Writes
`predictions_<set>_seed<k>.jsonl` with a `.meta.json` sidecar naming the model (and a fingerprint
of its local files: `files_fingerprint`) and generation settings (a file is re-used only when it is
complete, was written for the same records, model files and settings, so an interrupted
evaluation continues and a changed one is redone),
`scores.json` (with the config and deviations from the protocol), `scores.csv`, `scores.md`,
and returns a Markdown table with the mean and standard deviation (population std over seeds)
per set and their average.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
from dataclasses import asdict, fields
from pathlib import Path

import torch

from promptkd.config import EvalConfig, PromptOptions
from promptkd.data.dataset import build_examples
from promptkd.data.eval_sets import eval_set_name, set_deviations
from promptkd.errors import UserError
from promptkd.evaluation.datasets import load_eval_set
from promptkd.generate import generate_for_examples
from promptkd.metric import corpus_rouge_l
from promptkd.models.loading import (
    ModelSpec,
    eos_token_ids,
    files_fingerprint,
    load_model_and_tokenizer,
)
from promptkd.precision import Precision, autocast, model_precision
from promptkd.sampling import SamplingConfig
from promptkd.training.checkpoint import atomic_write_text

logger = logging.getLogger(__name__)

def deviations(cfg: EvalConfig, sets: dict[str, str] | None = None) -> list[str]:
    """Every way this evaluation departs from the paper protocol (for results files): the sets
    (`set_deviations`: EvalConfig's default is three of the five; `sets` names them when the caller
    does, as a study's `name: path` pairs), and EvalConfig's other defaults: sampling and prompt
    settings, seeds, a record limit. The precision is not listed: the reference evaluates in fp16 under
    DeepSpeed on a GPU (LMOps minillm/scripts/gpt2/eval/eval_main_dolly.sh:52), which a CPU cannot run,
    so it is a choice of the hardware's (`auto`), and scores.json records the one used."""
    protocol = EvalConfig()
    out = set_deviations(sets if sets is not None else {eval_set_name(d): d for d in cfg.datasets})
    for name in (f.name for f in fields(SamplingConfig)):
        value, expected = getattr(cfg.sampling, name), getattr(protocol.sampling, name)
        if name == "eos_at_cap":  # null and false both leave responses as sampled
            value, expected = bool(value), bool(expected)
        if value != expected:
            out.append(f"sampling.{name} {value!r} (protocol: {expected!r})")
    for name in (f.name for f in fields(PromptOptions) if f.name != "mixed_precision"):  # recorded apart
        value, expected = getattr(cfg, name), getattr(protocol, name)
        if value != expected:
            out.append(f"{name} {value!r} (protocol: {expected!r})")
    if cfg.seeds != protocol.seeds:
        out.append(f"seeds {cfg.seeds} (protocol: {protocol.seeds})")
    if cfg.limit:
        out.append(f"only the first {cfg.limit} records of each set")
    return out


def predict(model, tokenizer, examples, *, seed: int, cfg: EvalConfig, desc: str, show_progress: bool = True) -> list[str]:
    """Sampled responses in the order of `examples` (batched longest-first to limit padding)."""

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt_ids))
    texts = [""] * len(examples)
    gen = generate_for_examples(
        model, tokenizer, [examples[i] for i in order], sampling=cfg.sampling, batch_size=cfg.batch_size,
        eos_token_ids=eos_token_ids(tokenizer, model), seed=seed, desc=desc, show_progress=show_progress,
    )
    for i, (_, text, _) in zip(order, gen, strict=True):
        texts[i] = text
    return texts


def evaluate(model, tokenizer=None, *, out: str | Path, datasets=("dolly", "selfinst", "vicuna"),
             seeds=(10, 20, 30, 40, 50), show_progress: bool = True, **settings) -> dict:
    """The paper's evaluation protocol on `model`, from Python.

        scores = evaluate(student, tokenizer, out="runs/x/eval", datasets=["my_eval.jsonl"], seeds=[10])

    Args:
        model: a Hub id / directory / .gguf path, or a loaded causal LM (pass its tokenizer too;
            its predictions are always generated afresh, never reused from `out`).
        out: directory for predictions and scores.json / .csv / .md.
        datasets, seeds: as `promptkd eval`; settings: any other EvalConfig field (data_dir,
            limit, batch_size, dtype, template, prompt_truncation, sampling=SamplingConfig(...)).
    Returns:
        scores.json's content: {"scores": {set: {seed: ROUGE-L}}, "summary": ..., "deviations": ...}.
    Raises ConfigError listing every invalid setting.
    """
    loaded = not isinstance(model, (str, os.PathLike))
    label = str(model) if not loaded else (getattr(getattr(model, "config", None), "name_or_path", "") or "in-memory model")
    cfg = EvalConfig(model=label, out=str(out), datasets=list(datasets), seeds=list(seeds), **settings)
    run_evaluation(cfg, model if loaded else None, tokenizer, show_progress=show_progress, reuse_predictions=not loaded)
    return json.loads((Path(out) / "scores.json").read_text(encoding="utf-8"))


def run_evaluation(cfg: EvalConfig, model=None, tokenizer=None, *, show_progress: bool = True,
                   reuse_predictions: bool = True) -> str:
    """Evaluate `cfg.model` (or an already loaded model/tokenizer); return the Markdown table.

    reuse_predictions: keep complete prediction files written for the same records and
    settings (an interrupted evaluation continues); False regenerates everything.
    Raises ConfigError for an invalid config (every problem at once)."""

    cfg.validate()
    if model is not None and tokenizer is None:
        raise ValueError("run_evaluation: pass the tokenizer together with a loaded model")
    set_names = [eval_set_name(n) for n in cfg.datasets]
    # every set is read before the model loads: a set that cannot be found fails in seconds
    records_of = {name: load_eval_set(name, cfg.data_dir) for name in cfg.datasets}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = files_fingerprint(cfg.model, skip=(out,)) if reuse_predictions else None
    if model is None:
        model, tokenizer = load_model_and_tokenizer(ModelSpec(cfg.model, dtype=cfg.dtype))
    model.eval()
    precision = model_precision(cfg.mixed_precision, model, "eval")
    scores: dict[str, dict[int, float]] = {}
    for name, set_name in zip(cfg.datasets, set_names, strict=True):
        records = records_of[name]
        if cfg.limit:
            records = records[: cfg.limit]
        examples, _ = build_examples(
            records, tokenizer, template=cfg.template, max_prompt_length=cfg.max_prompt_length,
            max_length=cfg.max_prompt_length + cfg.sampling.max_new_tokens, drop_long_prompts=False,
            with_responses=False, source=str(name), prompt_truncation=cfg.prompt_truncation,
        )
        scores[set_name] = {}
        for seed in cfg.seeds:
            pred_file = out / f"predictions_{set_name}_seed{seed}.jsonl"
            meta = _prediction_meta(cfg, seed, len(records), precision, files)
            texts = _read_predictions(pred_file, records, meta) if reuse_predictions else None
            if texts is not None:
                logger.info("%s: re-using the predictions for this model, records and settings", pred_file)
            else:
                with torch.no_grad(), autocast(model.device, precision):
                    texts = predict(model, tokenizer, examples, seed=seed, cfg=cfg, desc=f"{set_name} seed {seed}",
                                    show_progress=show_progress)
                _write_predictions(pred_file, records, texts, meta)
            scores[set_name][seed] = corpus_rouge_l(texts, [r.outputs for r in records])
    table = scores_table(scores)
    notes = deviations(cfg)
    (out / "scores.json").write_text(
        json.dumps({"config": asdict(cfg), "precision": precision.as_record(), "deviations": notes, "scores": scores,
                    "summary": summarize(scores)}, indent=1),
        encoding="utf-8",
    )
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "seed", "rougeL"])
        for set_name, by_seed in scores.items():
            for seed, v in by_seed.items():
                w.writerow([set_name, seed, f"{v:.4f}"])
    md = table + (("\nDeviations from the protocol: " + "; ".join(notes) + ".\n") if notes else "")
    (out / "scores.md").write_text(md, encoding="utf-8")
    return table


def summarize(scores: dict[str, dict[int, float]]) -> dict:
    """{set: {"mean", "std"}} plus "average": mean over sets of the per-set means."""
    summary = {}
    for name, by_seed in scores.items():
        vals = list(by_seed.values())
        summary[name] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0}
    if summary:
        means = [s["mean"] for s in summary.values()]
        # spread of the average: std over seeds of the per-seed average across sets
        seeds = sorted(set.intersection(*(set(v) for v in scores.values())))
        per_seed = [statistics.fmean(scores[n][s] for n in scores) for s in seeds]
        summary["average"] = {"mean": statistics.fmean(means), "std": statistics.pstdev(per_seed) if len(per_seed) > 1 else 0.0}
    return summary


def scores_table(scores: dict[str, dict[int, float]], label: str | None = None) -> str:
    summary = summarize(scores)
    names = [n for n in summary if n != "average"] + ["average"]
    head = "| " + (label or "model") + " | " + " | ".join(names) + " |"
    sep = "|---" * (len(names) + 1) + "|"
    row = "| ROUGE-L | " + " | ".join(f"{summary[n]['mean']:.2f} ± {summary[n]['std']:.2f}" for n in names) + " |"
    return "\n".join([head, sep, row]) + "\n"


def _prediction_meta(cfg: EvalConfig, seed: int, num_records: int, precision: Precision, files: str | None) -> dict:
    """What a predictions file depends on besides its records (checked before re-use)."""
    meta = {
        "model": str(cfg.model), "seed": seed, "num_records": num_records, "template": cfg.template,
        "dtype": cfg.dtype, "max_prompt_length": cfg.max_prompt_length, "prompt_truncation": cfg.prompt_truncation,
        "batch_size": cfg.batch_size, "sampling": asdict(cfg.sampling),
    }
    if precision.dtype is not None:  # files from before autocast existed were float32: they stay valid
        meta["mixed_precision"] = precision.mixed_precision
    if files is not None:  # a Hub model id has no local files to tell versions apart
        meta["model_files"] = files
    return meta


def _meta_path(path: Path) -> Path:
    return path.with_name(path.stem + ".meta.json")


def _write_predictions(path: Path, records, texts: list[str], meta: dict) -> None:
    if len(records) != len(texts):
        raise UserError(f"{path}: {len(texts)} predictions for {len(records)} records")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec, text in zip(records, texts, strict=True):
            f.write(json.dumps({"instruction": rec.instruction, "input": rec.input, "prediction": text, "references": rec.outputs}, ensure_ascii=False) + "\n")
    # The old sidecar goes first and the new one last: a crash in between leaves predictions
    # without a sidecar, which only causes a regeneration, never the re-use of stale predictions.
    _meta_path(path).unlink(missing_ok=True)
    tmp.replace(path)
    atomic_write_text(_meta_path(path), json.dumps(meta, indent=1))


def _read_predictions(path: Path, records, meta: dict) -> list[str] | None:
    """The saved predictions when they are complete and match `records` and `meta`, else None."""
    if not path.is_file():
        return None
    meta_file = _meta_path(path)
    try:
        saved_meta = json.loads(meta_file.read_text(encoding="utf-8"))
        # "\n" only: str.splitlines() would also split generated text at U+2028, U+0085, ...
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    except (OSError, ValueError):
        logger.warning("%s (or %s) is unreadable: regenerating", path, meta_file.name)
        return None
    if saved_meta != meta:
        changed = sorted(k for k in set(meta) | set(saved_meta) if meta.get(k) != saved_meta.get(k))
        logger.warning("%s was written with other settings (%s): regenerating", path, ", ".join(changed))
        return None
    if len(rows) != len(records):
        return None
    for row, rec in zip(rows, records, strict=True):
        if (row.get("instruction"), row.get("input"), row.get("references")) != (rec.instruction, rec.input, rec.outputs):
            logger.warning("%s was written for other records: regenerating", path)
            return None
        if not isinstance(row.get("prediction"), str):
            return None
    return [r["prediction"] for r in rows]
