"""The five evaluation sets of MiniLLM / PromptKD, by short name or by path.

    records = load_eval_set("dolly")                        # <data_dir>/eval/dolly_eval.jsonl
    records = load_eval_set("sinst")                        # no local file: MiniLLM/sinst on the Hub
    records = load_eval_set("my_eval.jsonl")                # any JSONL in the record schema

The local data directory is `data_dir`, else $PROMPTKD_DATA_DIR; there is no implicit
directory (nothing relative to the working directory). A set's file is looked up as
<data_dir>/eval/<file> and <data_dir>/<file>. Without a local file the set is read from
MiniLLM's Hub release (needs internet), whose valid.jsonl files hold the Alpaca-templated
`prompt` and `output` (a string or a list of references); the record loader maps both back to
the common schema.

`eval_set_for_source` tells whether a training or dev source is one of these sets (the config
check that keeps checkpoint selection off the test set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from promptkd.data.records import InstructionRecord, load_records, read_jsonl_records
from promptkd.errors import UserError

DATA_DIR_ENV = "PROMPTKD_DATA_DIR"


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


def default_data_dir() -> Path | None:
    """$PROMPTKD_DATA_DIR if set, else None (the sets then come from the Hub)."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def local_eval_file(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The local file of a named set under data_dir (else $PROMPTKD_DATA_DIR), or None."""
    spec = EVAL_SETS[name]
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root is None:
        return None
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


def eval_set_for_source(source: str | Path, data_files: str | None = None) -> str | None:
    """The name of the evaluation set that a training / dev data source resolves to, or None.

    source, data_files: as `load_records` takes them (data.train / data.train_data_files).
    A source is an evaluation set when it is
      - a set's Hub repo read with that set's data file, or with no data_files (datasets then
        infers a single "validation" split from valid.jsonl: MiniLLM/dolly is the Dolly test set);
      - a local copy of that repo (a directory named like it, e.g. data/dolly) read the same way;
      - a file named like a set's local file (dolly_eval.jsonl, ...) or laid out as MiniLLM's
        README downloads the repos (<dir>/dolly/valid.jsonl, <dir>/sinst/11_/valid.jsonl).
    MiniLLM/dolly with data_files raw.jsonl is the training file, not an evaluation set.
    """
    text = str(source).replace("\\", "/").rstrip("/")
    if not text:
        return None
    files = None if data_files is None else str(data_files).replace("\\", "/").removeprefix("./")
    lower = text.lower()
    path = Path(text)
    for spec in EVAL_SETS.values():
        repo = spec.hub_id.split("/")[-1].lower()
        reads_eval_file = files is None or files == spec.hub_data_files
        if lower == spec.hub_id.lower() and reads_eval_file:
            return spec.name
        if path.name == spec.filename or lower == f"{repo}/{spec.hub_data_files}" or lower.endswith(
            f"/{repo}/{spec.hub_data_files}"
        ):
            return spec.name
        if path.name.lower() == repo and path.is_dir() and reads_eval_file:
            return spec.name
    return None
