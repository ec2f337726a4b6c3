"""PromptKD across two tokenizers on tiny CPU models: does the student's divergence to the teacher fall?

    PYTHONPATH=src python benchmarks/cross_tokenizer_promptkd.py [--steps 20]

The teacher reads a byte-level BPE trained here (`promptkd.testing.bpe_tokenizer`, 320 tokens), the
student the 259-token byte tokenizer: the cross-tokenizer path (docs/method.md section 11). The
teacher is first fine-tuned briefly on the tiny data (plain cross-entropy), so it has a distribution
worth imitating; the student starts from random weights. Then `promptkd train` runs for --steps
steps. The measure is the student loss's own divergence (reverse KL, hybrid with ULD) of the
student to the un-prompted teacher, a token mean over the dataset's responses (fixed text, not the
student's samples), before training and after every step. Nothing is downloaded; the last stdout
line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from promptkd.config import config_from_dict
from promptkd.cross_tokenizer import Aligned, CrossTokenizer, cross_terms
from promptkd.data.collate import collate_sequences
from promptkd.data.dataset import Example
from promptkd.data.records import InstructionRecord
from promptkd.data.templates import format_prompt
from promptkd.losses import divergence
from promptkd.methods.base import outputs_of
from promptkd.testing import (
    TINY_RECORDS,
    bpe_tokenizer,
    byte_tokenizer,
    tiny_llama,
    write_tiny_jsonl,
)
from promptkd.training.loop import Trainer

logger = logging.getLogger("cross_tokenizer_promptkd")


def texts():
    for r in TINY_RECORDS:
        yield format_prompt(InstructionRecord(r["instruction"], r["input"], [r.get("output") or r["outputs"][0]])), \
            r.get("output") or r["outputs"][0]


def batch_for(tokenizer):
    examples = [Example(tokenizer(p)["input_ids"], tokenizer(r, add_special_tokens=False)["input_ids"]
                        + [tokenizer.eos_token_id], []) for p, r in texts()]
    return collate_sequences(examples, tokenizer.pad_token_id)


def fine_tune_teacher(teacher, tokenizer, steps: int = 150) -> None:
    """Plain cross-entropy on the tiny data's prompt + response texts, so the teacher is not random."""
    batch = batch_for(tokenizer)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    teacher.train()
    for _ in range(steps):
        logits = outputs_of(teacher, batch, None, teacher.config.vocab_size).states  # (B, R, V)
        targets = batch.input_ids[:, batch.prompt_length:]
        mask = batch.loss_mask[:, batch.prompt_length:]
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.eval()
    teacher.requires_grad_(False)


@torch.no_grad()
def divergence_to_teacher(student, teacher, pair: CrossTokenizer, batch) -> float:
    """Token mean over the batch's student response tokens of the hybrid reverse KL (PromptKD's student loss)."""
    student.eval()
    alignment = pair.teacher_batch(batch)
    target = Aligned(outputs_of(teacher, alignment.teacher_batch, None, teacher.config.vocab_size), alignment)
    _, (value,) = cross_terms(outputs_of(student, batch, None, student.config.vocab_size),
                              [(divergence("reverse_kl"), target, 1.0)])
    student.train()
    return value / float(batch.loss_mask.sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("accelerate", "promptkd.training.console", "promptkd.training.data_sources"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    student_tokenizer, teacher_tokenizer = byte_tokenizer(), bpe_tokenizer()
    teacher = tiny_llama(vocab_size=len(teacher_tokenizer), num_layers=2, seed=0, pad_token_id=0, eos_token_id=0,
                         bos_token_id=0)
    student = tiny_llama(num_layers=1, seed=1)
    fine_tune_teacher(teacher, teacher_tokenizer)
    pair = CrossTokenizer(student_tokenizer, teacher_tokenizer)
    batch = batch_for(student_tokenizer)
    curve = [divergence_to_teacher(student, teacher, pair, batch)]

    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_jsonl(Path(tmp) / "train.jsonl", 16)
        cfg = config_from_dict({
            "method": "promptkd", "data": {"train": str(data)},
            "train": {"output_dir": str(Path(tmp) / "run"), "max_steps": args.steps, "batch_size": 4, "warmup_steps": 0,
                      "learning_rate": args.learning_rate, "seed": 0, "mixed_precision": "no",
                      "save_every_minutes": 0},
            "promptkd": {"num_virtual_tokens": 4}, "sampling": {"max_new_tokens": 12}}, check_required=False)
        start = time.perf_counter()
        trainer = Trainer(cfg, student=student, teacher=teacher, tokenizer=student_tokenizer,
                          teacher_tokenizer=teacher_tokenizer, show_progress=False).setup()
        for _ in range(args.steps):  # one step at a time, to measure after each
            result = trainer.train_step()
            curve.append(divergence_to_teacher(trainer.unwrapped_student, teacher, pair, batch))
            logger.info("step %d: student/loss %.4f, divergence to the teacher %.4f", trainer.step,
                         result.metrics["student/loss"], curve[-1])
        seconds = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "cross_tokenizer_promptkd", "steps": args.steps, "learning_rate": args.learning_rate,
        "shared_tokens": len(pair.columns), "teacher_vocabulary": len(teacher_tokenizer),
        "student_vocabulary": len(student_tokenizer),
        "divergence_before": round(curve[0], 5), "divergence_after": round(curve[-1], 5),
        "divergence_curve": [round(x, 5) for x in curve], "fell": curve[-1] < curve[0], "seconds": round(seconds, 1),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
