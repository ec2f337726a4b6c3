"""Instruction records: reading and validating JSONL files and Hugging Face datasets.

One schema everywhere (MiniLLM's released files use it too):

    {"instruction": str, "input": str ("" or missing when none), "output": str}
    {"instruction": str, "input": str, "outputs": [str, ...]}      # several references

Extra keys (category, id, ...) are kept in `InstructionRecord.metadata`. A few aliases are
accepted so that MiniLLM's released files and common Hub datasets load unchanged:
`prompt` for `instruction` (an Alpaca-templated prompt is split back into instruction and
input), `context` for `input`, `response` for `output`, and `output` holding a list.

Every problem with the user's data raises `promptkd.errors.UserError` naming the file, the
1-based line and the field.

    records = load_records("my_data/dev.jsonl")
    records = load_records("databricks/databricks-dolly-15k", split="train")  # needs internet
    # MiniLLM's Dolly training file and its dev split (the first 1,000 records), as MiniLLM splits it
    records = load_records("MiniLLM/dolly", split="train[:1000]", data_files="raw.jsonl")
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptkd.errors import UserError

# Column / key aliases, in order of preference. The first one present is used; the rest of
# the object goes to metadata.
INSTRUCTION_KEYS = ("instruction", "prompt")
INPUT_KEYS = ("input", "context")
OUTPUT_KEYS = ("outputs", "output", "response")

_LOCAL_SUFFIXES = (".jsonl", ".json")

# MiniLLM's released eval files store the fully templated Alpaca prompt (with "<n>" for
# newlines) under `prompt`. Splitting it back lets `format_prompt` rebuild the same string.
# The header texts match data/templates.py (kept here too to avoid an import cycle).
_ALPACA_SPLIT = re.compile(
    r"\ABelow is an instruction that describes a task(?:, paired with an input that provides "
    r"further context)?\. Write a response that appropriately completes the request\.\n\n"
    r"### Instruction:\n(?P<instruction>.*?)"
    r"(?:\n\n### Input:\n(?P<input>.*?))?"
    r"\n\n### Response:\n\Z",
    re.DOTALL,
)


@dataclass
class InstructionRecord:
    """One instruction-following example.

    instruction: the task text (never empty).
    input:       optional context, "" when there is none.
    outputs:     reference responses; outputs[0] is the training target. May be empty only
                 for prompt-only data (generation), never for training or evaluation.
    metadata:    every other key of the source object (category, id, ...).
    """

    instruction: str
    input: str = ""
    outputs: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def record_from_dict(obj: Any, where: str, *, require_outputs: bool = True) -> InstructionRecord:
    """Validate one decoded object and build a record.

    `where` locates the object for error messages, e.g. "data.jsonl line 7".
    Raises UserError for a non-object, missing / empty / mistyped fields.
    """
    if not isinstance(obj, dict):
        raise UserError(
            f"{where}: expected a JSON object with an 'instruction' field, got {type(obj).__name__}"
        )
    rest = dict(obj)

    instruction_key = next((k for k in INSTRUCTION_KEYS if k in rest), None)
    if instruction_key is None:
        raise UserError(
            f"{where}: missing field 'instruction' (keys found: {sorted(obj)}); every record "
            "needs an 'instruction' string"
        )
    instruction = rest.pop(instruction_key)
    if not isinstance(instruction, str):
        raise UserError(
            f"{where}: field '{instruction_key}' must be a string, got {type(instruction).__name__}"
        )
    input_text = ""
    if instruction_key == "prompt":
        instruction = instruction.replace("<n>", "\n")
        match = _ALPACA_SPLIT.match(instruction)
        if match is not None:
            instruction, input_text = match["instruction"], match["input"] or ""
            rest["prompt"] = obj["prompt"]  # keep the original templated prompt as metadata
    if not instruction.strip():
        raise UserError(
            f"{where}: field '{instruction_key}' is empty; give a non-empty instruction"
        )

    input_key = next((k for k in INPUT_KEYS if k in rest), None)
    if input_key is not None:
        value = rest.pop(input_key)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise UserError(
                f"{where}: field '{input_key}' must be a string (\"\" when there is no input), "
                f"got {type(value).__name__}"
            )
        input_text = value

    # A null reference (e.g. an empty cell of a Hub dataset) counts as missing.
    for k in OUTPUT_KEYS:
        if k in rest and rest[k] is None:
            del rest[k]
    output_key = next((k for k in OUTPUT_KEYS if k in rest), None)
    outputs: list[str] = []
    if output_key is None:
        if require_outputs:
            raise UserError(
                f"{where}: missing field 'output' (or 'outputs'); training and evaluation need "
                "a reference response"
            )
    else:
        value = rest.pop(output_key)
        if isinstance(value, str) and output_key == "outputs":
            raise UserError(
                f"{where}: field 'outputs' must be a list of strings, got a string; use "
                "'output' for a single reference"
            )
        if isinstance(value, str):
            outputs = [value]
        elif isinstance(value, list):
            bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
            if bad:
                raise UserError(
                    f"{where}: field '{output_key}' must be a list of strings; item {bad[0]} is "
                    f"{type(value[bad[0]]).__name__}"
                )
            if not value:
                raise UserError(
                    f"{where}: field '{output_key}' is an empty list; give at least one reference"
                )
            outputs = list(value)
        else:
            raise UserError(
                f"{where}: field '{output_key}' must be a string or a list of strings, got "
                f"{type(value).__name__}"
            )
    return InstructionRecord(
        instruction=instruction, input=input_text, outputs=outputs, metadata=rest
    )


def read_jsonl_records(
    path: str | Path, *, require_outputs: bool = True
) -> list[InstructionRecord]:
    """Read a JSONL file of instruction records (blank lines skipped).

    A file whose first non-blank character is '[' is read as one JSON array of objects
    (records are then located by index instead of line).

    Raises UserError naming the file, the 1-based line and the field for: a missing file,
    non-UTF-8 bytes (with the byte offset), malformed JSON, a line that is not an object,
    missing / empty / mistyped fields (see `record_from_dict`).
    """
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise UserError(f"data file not found: {str(path)!r}{hint}")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
        raw = raw[3:]
    if raw.lstrip()[:1] == b"[":
        return _read_json_array(path, raw, require_outputs)

    records = []
    offset = 0
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        line_start, offset = offset, offset + len(line) + 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path} line {line_no}: invalid UTF-8 byte 0x{line[e.start]:02x} at byte "
                f"{e.start} of the line (byte offset {line_start + e.start} in the file); "
                "save the file as UTF-8"
            ) from None
        if not text.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        records.append(record_from_dict(obj, where, require_outputs=require_outputs))
    return records


def _read_json_array(path: Path, raw: bytes, require_outputs: bool) -> list[InstructionRecord]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path} line {line_no}: invalid UTF-8 byte 0x{raw[e.start]:02x} at byte offset "
            f"{e.start} in the file; save the file as UTF-8"
        ) from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
        ) from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON array of records or one JSON object per line")
    return [
        record_from_dict(obj, f"{path} record {i + 1}", require_outputs=require_outputs)
        for i, obj in enumerate(items)
    ]


def load_records(
    source: str | Path,
    split: str = "train",
    *,
    require_outputs: bool = True,
    data_files: str | list[str] | None = None,
) -> list[InstructionRecord]:
    """Load instruction records from a local file, a saved dataset or a Hugging Face dataset.

    source: a `.jsonl` / `.json` file (see `read_jsonl_records`); a directory written by
        `datasets.Dataset.save_to_disk`; otherwise a dataset id or local data directory for
        `datasets.load_dataset(source, split=split, data_files=data_files)`.
    Columns are mapped by the same aliases as JSONL keys (instruction/prompt,
    input/context, outputs/output/response).

    Raises UserError for a missing file, a dataset that cannot be loaded, columns that cannot
    be mapped (listing the columns found) and invalid values.
    """
    path = Path(source)
    if path.suffix.lower() in _LOCAL_SUFFIXES or path.is_file():
        return read_jsonl_records(path, require_outputs=require_outputs)
    if path.is_dir() and (
        (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    ):
        dataset = _load_from_disk(path, split)
    else:
        if str(source).startswith((".", "/", "~")) and not path.exists():
            raise UserError(
                f"data source not found: {str(source)!r} is not an existing file or directory"
            )
        dataset = _load_hub(str(source), split, data_files)
    return records_from_dataset(
        dataset, f"dataset {str(source)!r} split {split!r}", require_outputs=require_outputs
    )


def _load_from_disk(path: Path, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(
                f"saved dataset {str(path)!r} has no split {split!r}; splits found: {sorted(loaded)}"
            )
        return loaded[split]
    return loaded


def _load_hub(source: str, split: str, data_files):
    import datasets

    try:
        return datasets.load_dataset(source, split=split, data_files=data_files)
    except Exception as e:  # network, missing dataset, bad split: all fixable by the user
        files = f", data_files {data_files!r}" if data_files is not None else ""
        raise UserError(
            f"could not load {source!r} (split {split!r}{files}): it is not a local .jsonl/.json file, "
            f"and loading it with datasets.load_dataset failed: {type(e).__name__}: {e}"
        ) from e


def records_from_dataset(
    dataset, name: str, *, require_outputs: bool = True
) -> list[InstructionRecord]:
    """Convert a `datasets.Dataset` (or any sequence of dicts with `column_names`) to records.

    Raises UserError listing the columns found when the instruction (or, with
    require_outputs, the reference) column cannot be identified.
    """
    columns = list(getattr(dataset, "column_names", None) or [])
    if columns:
        missing = []
        if not any(k in columns for k in INSTRUCTION_KEYS):
            missing.append("an instruction column (" + " / ".join(INSTRUCTION_KEYS) + ")")
        if require_outputs and not any(k in columns for k in OUTPUT_KEYS):
            missing.append("a reference column (" + " / ".join(OUTPUT_KEYS) + ")")
        if missing:
            raise UserError(
                f"{name}: cannot map columns to instruction records: no {' or '.join(missing)}; "
                f"columns found: {columns}. Rename the columns or convert the data to JSONL with "
                "instruction / input / output keys"
            )
    return [
        record_from_dict(row, f"{name} row index {i}", require_outputs=require_outputs)
        for i, row in enumerate(dataset)
    ]
