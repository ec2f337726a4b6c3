"""The five evaluation sets of MiniLLM / PromptKD, by short name or by path.

    records = load_eval_set("dolly")                        # <data_dir>/eval/dolly_eval.jsonl
    records = load_eval_set("sinst")                        # no local file: MiniLLM/sinst on the Hub
    records = load_eval_set("my_eval.jsonl")                # any JSONL in the record schema

The local data directory is `data_dir`, else $PROMPTKD_DATA_DIR, else ../shared/data relative
to the working directory; a set's file is looked up as <data_dir>/eval/<file> and
<data_dir>/<file>. Without a local file the set is read from MiniLLM's Hub release (needs
internet), whose valid.jsonl files hold the Alpaca-templated `prompt` and `output` (a string
or a list of references); the record loader maps both back to the common schema.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from promptkd.data.records import InstructionRecord, load_records, read_jsonl_records
from promptkd.errors import UserError

DATA_DIR_ENV = "PROMPTKD_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"


@dataclass(frozen=True)
class EvalSetSpec:
    """Where an evaluation set lives.

    hub_id / hub_data_files: MiniLLM's release on the Hugging Face Hub (the file inside it).
    filename: the local JSONL name under the data directory.
    max_records: keep only the first N records (UnNI: the first 10,000, as MiniLLM does).
    """

    name: str
    hub_id: str
    hub_data_files: str
    filename: str
    max_records: int | None = None


# S-NI and UnNI use MiniLLM's "11_" subsets: references of at least 11 words.
EVAL_SETS: dict[str, EvalSetSpec] = {
    "dolly": EvalSetSpec("dolly", "MiniLLM/dolly", "valid.jsonl", "dolly_eval.jsonl"),
    "selfinst": EvalSetSpec("selfinst", "MiniLLM/self-inst", "valid.jsonl", "selfinst_eval.jsonl"),
    "vicuna": EvalSetSpec("vicuna", "MiniLLM/Vicuna", "valid.jsonl", "vicuna_eval.jsonl"),
    "sinst": EvalSetSpec("sinst", "MiniLLM/sinst", "11_/valid.jsonl", "sinst_eval.jsonl"),
    "uinst": EvalSetSpec(
        "uinst", "MiniLLM/uinst", "11_/valid.jsonl", "uinst_eval.jsonl", max_records=10_000
    ),
}


def default_data_dir() -> Path:
    """$PROMPTKD_DATA_DIR if set, else ../shared/data (relative to the working directory)."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else DEFAULT_DATA_DIR


def local_eval_file(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The local file of a named set, or None when it is not on disk."""
    spec = EVAL_SETS[name]
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    for candidate in (root / "eval" / spec.filename, root / spec.filename):
        if candidate.is_file():
            return candidate
    return None


def load_eval_set(
    name_or_path: str | Path, data_dir: str | Path | None = None
) -> list[InstructionRecord]:
    """Records of an evaluation set, every one with at least one reference.

    name_or_path: a short name from EVAL_SETS (local file first, then the Hub), or a path
        to a JSONL file (`output` string or `outputs` list per record).
    Raises UserError for an unknown name that is not a file either, a missing file, or any
    invalid record.
    """
    key = str(name_or_path)
    if key in EVAL_SETS:
        spec = EVAL_SETS[key]
        path = local_eval_file(key, data_dir)
        if path is not None:
            records = read_jsonl_records(path, require_outputs=True)
        else:
            records = load_records(
                spec.hub_id, split="train", require_outputs=True, data_files=spec.hub_data_files
            )
        if spec.max_records is not None:
            records = records[: spec.max_records]
        return records
    path = Path(name_or_path)
    if path.suffix.lower() in (".jsonl", ".json") or path.exists():
        return read_jsonl_records(path, require_outputs=True)
    raise UserError(
        f"unknown evaluation set {key!r}: not one of {sorted(EVAL_SETS)} and not an existing "
        ".jsonl file"
    )
