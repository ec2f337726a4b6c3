"""A SeqKD cell's training data: the teacher's responses to exactly the prompts that the study's
other arms read with the same seed, in the order they read them.

A cell of another arm reads data.train in `DataOrder(kept examples, train.seed)`: max_steps x
batch_size x gradient_accumulation_steps examples (one process). A SeqKD cell trains on
RUN/teacher_responses.jsonl instead: n lines, which its trainer reads in `DataOrder(n,
train.seed)`, one epoch. So line i holds the response to the (inv[i])-th prompt seen, inv being
the inverse of that permutation, and step k of SeqKD trains on the prompts of step k of every
other arm (as the cpu2 study's SeqKD cells did). The prompts, in file order, are
written to RUN/teacher_prompts.jsonl; `run_generation` (the code of `promptkd generate`)
answers them with the teacher, sampled with the cell's seed, and continues an interrupted file
after its last complete batch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from promptkd.compare.config import TEACHER_RESPONSES
from promptkd.compare.report import write_text

PROMPTS = "teacher_prompts.jsonl"


def seen_records(cell, tokenizer) -> list:
    """The data.train records a one-process run of the train config `cell` (a promptkd Config)
    reads, in order, whatever its method: the records the trainer keeps (prompts no longer than
    data.max_prompt_length), in its DataOrder."""
    from promptkd.data.dataset import build_examples
    from promptkd.data.order import DataOrder
    from promptkd.data.records import records_from

    d, t = cell.data, cell.train
    records = records_from(d.train, split=d.train_split, data_files=d.train_data_files, require_outputs=False)
    examples, _ = build_examples([dataclasses.replace(r, metadata={"row": i}) for i, r in enumerate(records)],
                                 tokenizer, template=d.template, max_prompt_length=d.max_prompt_length,
                                 with_responses=False, source=str(d.train))
    kept = [records[e.metadata["row"]] for e in examples]
    order = DataOrder(len(kept), t.seed).take(t.max_steps * t.batch_size * t.gradient_accumulation_steps)
    return [kept[i] for i in order]


def file_order(n: int, seed: int) -> list[int]:
    """inv: line i of a SeqKD file of n lines must hold the response to the inv[i]-th prompt seen,
    since its trainer reads line perm[j] at position j (perm = DataOrder(n, seed))."""
    from promptkd.data.order import DataOrder

    inv = [0] * n
    for j, i in enumerate(DataOrder(n, seed).take(n)):
        inv[i] = j
    return inv


def generate_teacher_responses(cell, run_dir: Path, counts: dict, show_progress: bool = True) -> Path:
    """Write RUN/teacher_responses.jsonl for the train config `cell` (its data.teacher_responses);
    `counts` gets the generation's compute (run_generation's counts). Resumable."""
    from promptkd.config import GenerateConfig
    from promptkd.generate import run_generation
    from promptkd.models.loading import ModelSpec, load_model_and_tokenizer

    prompts = run_dir / PROMPTS
    if not prompts.is_file():
        _, tokenizer = load_model_and_tokenizer(ModelSpec(cell.model.student, dtype=cell.model.dtype,
                                                          trust_remote_code=cell.model.trust_remote_code))
        seen = seen_records(cell, tokenizer)
        lines = [_record_json(seen[j]) for j in file_order(len(seen), cell.train.seed)]
        write_text(prompts, "".join(line + "\n" for line in lines))
    job = GenerateConfig(model=cell.model.teacher, data=str(prompts), out=str(run_dir / TEACHER_RESPONSES),
                         template=cell.data.template, max_prompt_length=cell.data.max_prompt_length,
                         batch_size=cell.train.batch_size, seed=cell.train.seed, dtype=cell.model.dtype,
                         mixed_precision=cell.train.mixed_precision,
                         sampling=dataclasses.replace(cell.sampling, eos_at_cap=None))
    return run_generation(job, show_progress=show_progress, counts=counts)


def _record_json(record) -> str:
    row = {"instruction": record.instruction, "input": record.input, **record.metadata}
    if record.outputs:
        row["outputs"] = record.outputs
    if record.messages:
        row["messages"] = record.messages
    return json.dumps(row, ensure_ascii=False)
