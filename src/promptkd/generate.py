"""Batched, resumable generation of responses for a JSONL of prompts.

    promptkd generate --model TEACHER --data train.jsonl --out teacher_responses.jsonl

    from promptkd.config import GenerateConfig
    run_generation(GenerateConfig(model="teacher", data="train.jsonl", out="responses.jsonl"))

Used for SeqKD (teacher responses become the student's training targets) and by evaluation.
Output records keep the input schema: `instruction`, `input`, `output` (the generated
response) plus `references` (the original outputs), the input's metadata and `ended`: true
when the response ended with EOS, false when it was cut at sampling.max_new_tokens (training
then appends no EOS to it, see data/dataset.py). Re-running with the same `out` continues after
its last complete batch, when its sidecar (OUT.meta.json) shows the same model, data and
settings; a finished file is left as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from promptkd.config import GenerateConfig
from promptkd.errors import UserError

logger = logging.getLogger(__name__)


def decode_responses(tokenizer, batch) -> list[str]:
    """Response text of each row of a SequenceBatch (special tokens skipped, stripped)."""
    resp = batch.input_ids[:, batch.prompt_length :]
    mask = batch.loss_mask[:, batch.prompt_length :]
    return [tokenizer.decode(row[m], skip_special_tokens=True).strip() for row, m in zip(resp, mask, strict=True)]


def response_ended(batch, eos_token_ids) -> list[bool]:
    """Per row of a SequenceBatch: True when the response ended with EOS, False when capped.

    The loss mask keeps response tokens up to and including the first EOS, so a row ended iff
    its last kept token is one of `eos_token_ids` (int or list). Only meaningful for a batch
    sampled with `eos_at_cap` off (that option writes an EOS over a capped row's last token).
    """
    eos = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids))
    resp = batch.input_ids[:, batch.prompt_length :].cpu()  # (B, R)
    mask = batch.loss_mask[:, batch.prompt_length :].cpu()  # (B, R)
    return [bool(m.any()) and bool(torch.isin(row[m][-1], eos)) for row, m in zip(resp, mask, strict=True)]


def generate_for_examples(
    model, tokenizer, examples, *, sampling, batch_size: int, eos_token_ids, seed: int | None = None,
    first_index: int = 0, desc: str = "generate", show_progress: bool = True, counts: dict | None = None,
):
    """Yield (example, response_text, ended) in order, generating `batch_size` prompts at a time.

    `ended` is True when the response ended with EOS, False when it hit max_new_tokens.

    With `seed`, each batch is seeded with seed + (index of its first example + first_index),
    so a run resumed at a batch boundary samples exactly what the uninterrupted run would.
    With `counts`, each batch adds its model forward token-passes to counts["forward_tokens"]
    and its generated tokens to counts["generated_tokens"], as promptkd.training.compute counts
    sampling (the prompt once, then one forward per generated token with a KV cache).
    """
    from tqdm.auto import tqdm

    from promptkd.data.collate import collate_prompts
    from promptkd.sampling import sample_responses

    device = next(model.parameters()).device
    bar = tqdm(total=len(examples), desc=desc, disable=not show_progress, dynamic_ncols=True)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if seed is not None:
            torch.manual_seed(seed + first_index + start)
        prompt_ids, prompt_mask = collate_prompts(chunk, tokenizer.pad_token_id)
        batch = sample_responses(
            model,
            prompt_ids.to(device),
            prompt_mask.to(device),
            eos_token_ids=eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
            config=sampling,
        )
        if counts is not None:
            generated = float(batch.attention_mask[:, batch.prompt_length :].sum())
            counts["forward_tokens"] = counts.get("forward_tokens", 0.0) + float(prompt_mask.sum()) + generated
            counts["generated_tokens"] = counts.get("generated_tokens", 0.0) + generated
        texts = decode_responses(tokenizer, batch)
        ended = response_ended(batch, eos_token_ids)
        bar.update(len(chunk))
        yield from zip(chunk, texts, ended, strict=True)
    bar.close()


def run_generation(cfg: GenerateConfig, show_progress: bool = True, counts: dict | None = None) -> Path:
    """Sample one response per record of `cfg.data` into the JSONL `cfg.out` (continued if it
    exists); returns its path. Raises ConfigError for an invalid config, UserError when `cfg.out`
    holds another generation's lines (`_resume_point`).

    counts: a dict to which this call adds its model's forward token-passes, generated tokens
    (see generate_for_examples) and their FLOPs (2 N per forward token-pass, N = matmul_params
    of the model, promptkd.training.compute), also when it stops early (an exception, Ctrl-C).
    """
    from promptkd.data.dataset import build_examples
    from promptkd.data.records import load_records
    from promptkd.models.loading import ModelSpec, eos_token_ids, load_model_and_tokenizer
    from promptkd.precision import autocast, model_precision
    from promptkd.training.compute import Compute, matmul_params

    cfg.validate()
    out = Path(cfg.out)
    records = load_records(cfg.data, split=cfg.split, require_outputs=False)
    if cfg.limit:
        records = records[: cfg.limit]
    meta = _generation_meta(cfg, out)
    done = _resume_point(out, meta, len(records), cfg.batch_size)
    if done >= len(records):
        return out
    model, tokenizer = load_model_and_tokenizer(ModelSpec(cfg.model, dtype=cfg.dtype))
    examples, _ = build_examples(
        records,
        tokenizer,
        template=cfg.template,
        max_prompt_length=cfg.max_prompt_length,
        max_length=cfg.max_prompt_length + cfg.sampling.max_new_tokens,
        drop_long_prompts=False,
        with_responses=False,
        source=cfg.data,
        prompt_truncation=cfg.prompt_truncation,
    )
    precision = model_precision(cfg.mixed_precision, model, "generate")
    _write_meta(out, meta, precision.mixed_precision, done)
    counted = {"forward_tokens": 0.0, "generated_tokens": 0.0}
    try:
        with open(out, "a", encoding="utf-8") as f, autocast(model.device, precision):
            recs = records[done:]
            for i, (_, text, ended) in enumerate(
                generate_for_examples(
                    model, tokenizer, examples[done:], sampling=cfg.sampling, batch_size=cfg.batch_size,
                    eos_token_ids=eos_token_ids(tokenizer, model), seed=cfg.seed, first_index=done,
                    show_progress=show_progress, counts=counted,
                )
            ):
                rec = recs[i]
                row = {"instruction": rec.instruction, "input": rec.input, "output": text,
                       "references": rec.outputs, **rec.metadata, "ended": ended}
                if rec.messages:  # a conversation: keep its prompt turns, so SeqKD trains on the same chat prompt
                    row["messages"] = rec.messages
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
    finally:
        if counts is not None:
            counted["flops"] = Compute(teacher_forward_tokens=counted["forward_tokens"]).flops(0, matmul_params(model))
            for key, value in counted.items():
                counts[key] = counts.get(key, 0.0) + value
    return out


def _generation_meta(cfg: GenerateConfig, out: Path) -> dict:
    """What the lines of `out` depend on: every setting but `out` (local paths resolved), and
    fingerprints of the model's and the data's local files (checked before a file is continued)."""
    from dataclasses import asdict

    from promptkd.models.loading import files_fingerprint

    def spelled(p: str) -> str:  # ./teacher, teacher and /abs/teacher are one model
        local = Path(p).expanduser()
        return str(local.resolve()) if local.exists() else p

    meta = {k: v for k, v in asdict(cfg).items() if k != "out"}
    skip = (out, _meta_path(out))
    return {**meta, "model": spelled(cfg.model), "data": spelled(cfg.data),
            "model_files": files_fingerprint(cfg.model, skip), "data_files": files_fingerprint(cfg.data, skip)}


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def _read_meta(out: Path) -> dict | None:
    try:
        return json.loads(_meta_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _resume_point(out: Path, meta: dict, num_records: int, batch_size: int) -> int:
    """How many lines of `out` to keep: a finished file stays as it is, an unfinished one is cut back
    to a whole number of batches (a torn tail dropped). Raises UserError when an unfinished OUT has
    lines that another model, data or setting wrote (its sidecar OUT.meta.json differs from `meta`, or
    there is none); a finished one without a sidecar (from before sidecars) is kept, with a warning."""
    data = out.read_bytes() if out.exists() else b""
    lines = data.split(b"\n")[:-1]  # the part after the last newline is torn or empty
    if not lines:
        if data:
            out.write_bytes(b"")
        return 0
    saved = _read_meta(out)
    if saved is None and len(lines) == num_records:
        logger.warning("%s has a response per record but no %s to say what wrote them: kept as it is", out,
                       _meta_path(out).name)
        return len(lines)
    saved_settings = None if saved is None else {k: v for k, v in saved.items() if k != "precision"}
    if saved_settings != meta:
        why = (f"{_meta_path(out).name} is missing or unreadable" if saved is None else "it differs in " + ", ".join(
            sorted(k for k in set(meta) | set(saved_settings) if meta.get(k) != saved_settings.get(k))))
        raise UserError(f"out: {out} holds {len(lines)} responses of another generation ({why}); delete it (and "
                        f"{_meta_path(out).name}) to start again, or choose another --out")
    if len(lines) >= num_records:
        return len(lines)
    keep = len(lines) - len(lines) % batch_size
    cut = sum(len(x) + 1 for x in lines[:keep])
    if cut != len(data):
        with open(out, "r+b") as f:
            f.truncate(cut)
    return keep


def _write_meta(out: Path, meta: dict, precision: str, done: int) -> None:
    """Write the sidecar: `meta` and the precision `mixed_precision` resolved to (auto: by device),
    once the model has loaded; a file with `done` lines is continued only in its own precision."""
    from promptkd.training.checkpoint import atomic_write_text

    saved = (_read_meta(out) or {}).get("precision", precision) if done else precision
    if saved != precision:
        raise UserError(f"out: {out} was generated in {saved} precision, and mixed_precision resolves to "
                        f"{precision} here: continue it where it resolves to {saved}, or delete it (and "
                        f"{_meta_path(out).name}) to start again")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_meta_path(out), json.dumps({**meta, "precision": precision}, indent=1))
