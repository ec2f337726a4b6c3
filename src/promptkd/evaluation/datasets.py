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

The registry of the named sets and `eval_set_for_source` (the config check that keeps training
and checkpoint selection off the test sets) live in promptkd.data.eval_sets.
"""

from __future__ import annotations

import os
from pathlib import Path

from promptkd.data.eval_sets import EVAL_SETS, EvalSetSpec, eval_set_for_source
from promptkd.data.records import InstructionRecord, load_records, read_jsonl_records
from promptkd.errors import UserError

DATA_DIR_ENV = "PROMPTKD_DATA_DIR"


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
    name_or_path: str | Path, data_dir: str | Path | None = None, *, require_outputs: bool = True
) -> list[InstructionRecord]:
    """Records of an evaluation set, every one with at least one reference (with
    require_outputs False, prompts alone are enough: exposure bias uses no references).

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
            records = read_jsonl_records(path, require_outputs=require_outputs)
        else:
            try:
                records = load_records(
                    spec.hub_id, split="train", require_outputs=require_outputs, data_files=spec.hub_data_files
                )
            except UserError as e:
                raise UserError(
                    f"evaluation set {key!r}: no local copy ({spec.filename} under data_dir / --data-dir or "
                    f"${DATA_DIR_ENV}), and reading {spec.hub_id} from the Hub failed: {e}. Point data_dir "
                    f"(--data-dir) or {DATA_DIR_ENV} at a directory that holds {spec.filename}"
                ) from e
        if spec.max_records is not None:
            records = records[: spec.max_records]
        return records
    path = Path(name_or_path)
    if path.suffix.lower() in (".jsonl", ".json") or path.exists():
        return read_jsonl_records(path, require_outputs=require_outputs)
    raise UserError(
        f"unknown evaluation set {key!r}: not one of {sorted(EVAL_SETS)} and not an existing "
        ".jsonl file"
    )


__all__ = ["DATA_DIR_ENV", "EVAL_SETS", "EvalSetSpec", "default_data_dir", "eval_set_for_source", "load_eval_set",
           "local_eval_file"]
