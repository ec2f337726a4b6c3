"""The paper's evaluation protocol (SPEC 6) for one model.

    promptkd eval --model runs/promptkd/final/student --datasets dolly,selfinst,vicuna \
        --seeds 10,20,30,40,50 --out runs/promptkd/eval

For every set and seed: sample one response per prompt (T = 1, top_k 0, top_p 1,
no_repeat_ngram_size 6, up to 256 new tokens, a longer prompt cut to its FIRST 256 tokens as
MiniLLM / PromptKD's evaluation does; `prompt_truncation="keep_last"` keeps the last ones
instead, a recorded deviation), decode with special tokens skipped, strip, score ROUGE-L F
(rouge-score, stemmer on, max over references, x 100). Writes `predictions_<set>_seed<k>.jsonl`
with a `.meta.json` sidecar naming the model and generation settings (a file is re-used only
when it is complete, was written for the same records and the same settings, so an interrupted
evaluation continues and a changed one is redone), `scores.json` (with the job's settings and
deviations from the protocol), `scores.csv`, `scores.md`, and returns a Markdown table with the
mean and standard deviation (population std over seeds) per set and their average.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from promptkd.errors import UserError

logger = logging.getLogger(__name__)

PROTOCOL = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "no_repeat_ngram_size": 6,
    "max_new_tokens": 256,
    "max_prompt_length": 256,
    "prompt_truncation": "keep_first",
}


@dataclass
class EvalJob:
    model: str
    out: str
    datasets: list[str] = field(default_factory=lambda: ["dolly", "selfinst", "vicuna"])
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    data_dir: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 256
    max_prompt_length: int = 256
    prompt_truncation: str = "keep_first"  # over-long prompts: "keep_first" / "keep_last" tokens
    limit: int | None = None
    template: str = "alpaca"
    dtype: str = "float32"
    show_progress: bool = True


def deviations(job: EvalJob) -> list[str]:
    """Every way this job departs from the paper protocol (for results files)."""
    out = []
    if job.max_new_tokens != PROTOCOL["max_new_tokens"]:
        out.append(f"max_new_tokens {job.max_new_tokens} (protocol: 256)")
    if job.max_prompt_length != PROTOCOL["max_prompt_length"]:
        out.append(f"prompts cut to {job.max_prompt_length} tokens (protocol: 256)")
    if job.prompt_truncation != PROTOCOL["prompt_truncation"]:
        out.append(f"long prompts keep their {job.prompt_truncation.removeprefix('keep_')} tokens "
                   "(protocol: the first)")
    if job.limit:
        out.append(f"only the first {job.limit} records of each set")
    if len(job.seeds) < 5:
        out.append(f"{len(job.seeds)} seeds {job.seeds} (protocol: 5 seeds 10..50)")
    return out


def predict(model, tokenizer, examples, *, seed: int, job: EvalJob, desc: str) -> list[str]:
    """Sampled responses in the order of `examples` (batched longest-first to limit padding)."""
    from promptkd.generate import generate_for_examples
    from promptkd.models.loading import eos_token_ids
    from promptkd.sampling import SamplingConfig

    sampling = SamplingConfig(
        max_new_tokens=job.max_new_tokens,
        temperature=PROTOCOL["temperature"],
        top_k=PROTOCOL["top_k"],
        top_p=PROTOCOL["top_p"],
        no_repeat_ngram_size=PROTOCOL["no_repeat_ngram_size"],
    )
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt_ids))
    texts = [""] * len(examples)
    gen = generate_for_examples(
        model, tokenizer, [examples[i] for i in order], sampling=sampling, batch_size=job.batch_size,
        eos_token_ids=eos_token_ids(tokenizer, model), seed=seed, desc=desc, show_progress=job.show_progress,
    )
    for i, (_, text, _) in zip(order, gen, strict=True):
        texts[i] = text
    return texts


def run_evaluation(job: EvalJob, model=None, tokenizer=None) -> str:
    """Evaluate `job.model` (or an already loaded model/tokenizer); return the Markdown table."""
    from promptkd.data.dataset import PROMPT_TRUNCATIONS, build_examples
    from promptkd.evaluation.datasets import EVAL_SETS, load_eval_set
    from promptkd.evaluation.metric import corpus_rouge_l
    from promptkd.models.loading import ModelSpec, load_model_and_tokenizer

    if not job.datasets:
        raise UserError("eval: --datasets is empty; name at least one set (dolly, selfinst, vicuna, sinst, uinst)")
    if not job.seeds:
        raise UserError("eval: --seeds is empty")
    if len(set(job.seeds)) != len(job.seeds):
        raise UserError(f"eval: --seeds {job.seeds} repeats a seed")
    if job.prompt_truncation not in PROMPT_TRUNCATIONS:
        raise UserError(f"eval: --prompt-truncation {job.prompt_truncation!r}: choose one of {PROMPT_TRUNCATIONS}")
    set_names = [str(n) if str(n) in EVAL_SETS else Path(str(n)).stem for n in job.datasets]
    if len(set(set_names)) != len(set_names):
        raise UserError(f"eval: --datasets {job.datasets} gives two sets the same name {set_names}: "
                        "rename one file (outputs are named after the file stem)")
    if model is not None and tokenizer is None:
        raise ValueError("run_evaluation: pass the tokenizer together with a loaded model")
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(ModelSpec(job.model, dtype=job.dtype))
    model.eval()
    scores: dict[str, dict[int, float]] = {}
    for name, set_name in zip(job.datasets, set_names, strict=True):
        records = load_eval_set(name, job.data_dir)
        if job.limit:
            records = records[: job.limit]
        examples, _ = build_examples(
            records, tokenizer, template=job.template, max_prompt_length=job.max_prompt_length,
            max_length=job.max_prompt_length + job.max_new_tokens, drop_long_prompts=False,
            with_responses=False, source=str(name), prompt_truncation=job.prompt_truncation,
        )
        scores[set_name] = {}
        for seed in job.seeds:
            pred_file = out / f"predictions_{set_name}_seed{seed}.jsonl"
            meta = _prediction_meta(job, seed, len(records))
            texts = _read_predictions(pred_file, records, meta)
            if texts is None:
                with torch.no_grad():
                    texts = predict(model, tokenizer, examples, seed=seed, job=job, desc=f"{set_name} seed {seed}")
                _write_predictions(pred_file, records, texts, meta)
            scores[set_name][seed] = corpus_rouge_l(texts, [r.outputs for r in records])
    table = scores_table(scores)
    (out / "scores.json").write_text(
        json.dumps({"job": asdict(job), "deviations": deviations(job), "scores": scores, "summary": summarize(scores)}, indent=1),
        encoding="utf-8",
    )
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "seed", "rougeL"])
        for set_name, by_seed in scores.items():
            for seed, v in by_seed.items():
                w.writerow([set_name, seed, f"{v:.4f}"])
    notes = deviations(job)
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


def _prediction_meta(job: EvalJob, seed: int, num_records: int) -> dict:
    """What a predictions file depends on besides its records (checked before re-use)."""
    return {
        "model": str(job.model), "seed": seed, "num_records": num_records, "template": job.template,
        "dtype": job.dtype, "max_new_tokens": job.max_new_tokens, "max_prompt_length": job.max_prompt_length,
        "prompt_truncation": job.prompt_truncation, "batch_size": job.batch_size,
        "decoding": {k: v for k, v in PROTOCOL.items() if k not in ("max_new_tokens", "max_prompt_length", "prompt_truncation")},
    }


def _meta_path(path: Path) -> Path:
    return path.with_name(path.stem + ".meta.json")


def _write_predictions(path: Path, records, texts: list[str], meta: dict) -> None:
    if len(records) != len(texts):
        raise UserError(f"{path}: {len(texts)} predictions for {len(records)} records")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec, text in zip(records, texts, strict=True):
            f.write(json.dumps({"instruction": rec.instruction, "input": rec.input, "prediction": text, "references": rec.outputs}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    # The sidecar goes last: a crash in between leaves new predictions with a stale (or no)
    # sidecar, which only causes a regeneration, never the re-use of stale predictions.
    meta_tmp = _meta_path(path).with_name(_meta_path(path).name + ".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    meta_tmp.replace(_meta_path(path))


def _read_predictions(path: Path, records, meta: dict) -> list[str] | None:
    """The saved predictions when they are complete and match `records` and `meta`, else None."""
    if not path.is_file():
        return None
    meta_file = _meta_path(path)
    try:
        saved_meta = json.loads(meta_file.read_text(encoding="utf-8"))
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
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
