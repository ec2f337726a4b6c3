"""Instruction records: reading and validating JSONL files and Hugging Face datasets.

One schema everywhere (MiniLLM's released files use it too):

    {"instruction": str, "input": str ("" or missing when none), "output": str}
    {"instruction": str, "input": str, "outputs": [str, ...]}      # several references

Extra keys (category, id, ...) are kept in `InstructionRecord.metadata`. A few aliases are
accepted so that MiniLLM's released files and common Hub datasets load unchanged:
`prompt` for `instruction` (an Alpaca-templated prompt is split back into instruction and
input), `context` for `input`, `response` for `output`, and `output` holding a list.

Conversations in TRL's formats load too (they need `data.template: chat`):

    {"messages": [{"role": "system", "content": ...}, {"role": "user", "content": ...},
                  {"role": "assistant", "content": ...}]}     # the final assistant turn is the reference
    {"prompt": [{"role": "user", "content": ...}]}           # prompt-only (on-policy methods)
    {"prompt": [...], "completion": [{"role": "assistant", "content": ...}]}

A conversation whose final turn is not an assistant turn is prompt-only, unless an `output` /
`outputs` / `response` field gives its reference (as `promptkd generate` writes it). A `prompt`
holding a string is not a conversation: it is the instruction (see the aliases above).

Every problem with the user's data raises `promptkd.errors.UserError` naming the file, the
1-based line and the field. A Hub id fails fast: one request without retries checks that the Hub
can be reached, and offline (HF_HUB_OFFLINE) only the datasets cache is read.

    records = load_records("my_data/dev.jsonl")
    records = load_records("databricks/databricks-dolly-15k", split="train")  # needs internet
    # MiniLLM's Dolly training file and its dev split (the first 1,000 records), as MiniLLM splits it
    records = load_records("MiniLLM/dolly", split="train[:1000]", data_files="raw.jsonl")
    records = records_from(my_hf_dataset)  # or a list of dicts, or a path: objects in
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
# A conversation: `messages` (TRL's conversational language modeling), or `prompt` holding a
# list of turns (TRL's conversational prompt-only / prompt-completion, with `completion`).
MESSAGES_KEY = "messages"
COMPLETION_KEY = "completion"

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

    instruction: the task text (never empty). For a conversation: its last user turn's
                 content (what logs and reports show).
    input:       optional context, "" when there is none (always "" for a conversation).
    outputs:     reference responses; outputs[0] is the training target. May be empty only
                 for prompt-only data (generation), never for training or evaluation.
    metadata:    every other key of the source object (category, id, ...).
    messages:    None for an instruction record. For a conversation: the prompt turns, every
                 `{"role": str, "content": str, ...}` before the reference response (system
                 turns and earlier exchanges included, at least one user turn, never ending
                 with an assistant turn); rendered with the tokenizer's chat template and
                 its generation prompt (data.template: chat).
    """

    instruction: str
    input: str = ""
    outputs: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None


def record_from_dict(obj: Any, where: str, *, require_outputs: bool = True) -> InstructionRecord:
    """Validate one decoded object and build a record.

    `where` locates the object for error messages, e.g. "data.jsonl line 7".
    An object with `messages`, or with a list under `prompt`, is a conversation (see
    `conversation_record`).
    Raises UserError for a non-object, missing / empty / mistyped fields.
    """
    if not isinstance(obj, dict):
        raise UserError(
            f"{where}: expected a JSON object with an 'instruction' (or 'messages') field, got "
            f"{type(obj).__name__}"
        )
    if obj.get(MESSAGES_KEY) is not None or isinstance(obj.get("prompt"), list):
        return conversation_record(obj, where, require_outputs=require_outputs)
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

    outputs = _pop_outputs(rest, where, require_outputs)
    return InstructionRecord(
        instruction=instruction, input=input_text, outputs=outputs, metadata=rest
    )


def _pop_outputs(rest: dict[str, Any], where: str, require_outputs: bool) -> list[str]:
    """Remove the reference field (output / outputs / response) from `rest`; its strings.

    [] when there is none; raises UserError when there is none and require_outputs, or for
    a mistyped or empty reference.
    """
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
    return outputs


def conversation_record(
    obj: dict[str, Any], where: str, *, require_outputs: bool = True
) -> InstructionRecord:
    """Build a record from a conversation in one of TRL's formats.

    - `messages`: a list of turns; a final assistant turn is the reference, the turns before it
      are the prompt. Without a final assistant turn every turn is prompt.
    - `prompt` (a list of turns) with an optional `completion` (a list holding one assistant turn,
      the reference).
    A turn is `{"role": str, "content": str}`; its other keys (name, tool_calls, ...) are kept
    for the chat template, except null ones (a `datasets` column fills absent keys with null).
    A conversation without its own reference may take it from `output` / `outputs` /
    `response` (a `promptkd generate` file). The record's `messages` are the prompt turns,
    `instruction` the last user turn's content; the other keys go to metadata.

    Raises UserError naming `where` and the field for: a field that is not a list of turns, a
    turn without a string role / content, no user turn (or an empty last one), prompt turns
    ending with an assistant turn, a `completion` that is not one assistant turn, two
    references, and (with require_outputs) no reference.
    """
    rest = dict(obj)
    reference: str | None = None
    if rest.get(MESSAGES_KEY) is not None:
        key = MESSAGES_KEY
        turns = _turns(rest.pop(MESSAGES_KEY), where, key)
        if turns[-1]["role"] == "assistant":
            reference = turns.pop()["content"]
    else:
        key = "prompt"
        turns = _turns(rest.pop("prompt"), where, key)
        if rest.get(COMPLETION_KEY) is not None:
            completion = _turns(rest.pop(COMPLETION_KEY), where, COMPLETION_KEY)
            roles = [t["role"] for t in completion]
            if roles != ["assistant"]:
                raise UserError(
                    f"{where}: field '{COMPLETION_KEY}' must hold exactly one assistant turn (the "
                    f"reference response), got roles {roles}"
                )
            reference = completion[0]["content"]

    user_turns = [t for t in turns if t["role"] == "user"]
    if not user_turns:
        raise UserError(
            f"{where}: field '{key}' has no user turn before the reference (roles: "
            f"{[t['role'] for t in turns]}); a prompt needs at least one "
            '{"role": "user", "content": ...} turn'
        )
    if turns[-1]["role"] == "assistant":
        # The chat template's generation prompt opens a new assistant turn after the prompt.
        where_ref = (
            "the reference is the final assistant turn alone"
            if key == MESSAGES_KEY
            else f"put the reference in '{COMPLETION_KEY}'"
        )
        raise UserError(
            f"{where}: field '{key}': the prompt turns end with an assistant turn (item "
            f"{len(turns) - 1}); {where_ref}, and the prompt must end with a user (or other "
            "non-assistant) turn"
        )
    instruction = user_turns[-1]["content"]
    if not instruction.strip():
        raise UserError(
            f"{where}: field '{key}': the last user turn is empty; give it non-empty content"
        )

    has_output_field = any(rest.get(k) is not None for k in OUTPUT_KEYS)
    if reference is not None:
        if has_output_field:
            found = next(k for k in OUTPUT_KEYS if rest.get(k) is not None)
            source = (
                "the final assistant turn of 'messages'"
                if key == MESSAGES_KEY
                else f"field '{COMPLETION_KEY}'"
            )
            raise UserError(
                f"{where}: two references: {source} and field '{found}'; keep one of them"
            )
        outputs = [reference]
    elif has_output_field or not require_outputs:
        outputs = _pop_outputs(rest, where, require_outputs)
    elif key == MESSAGES_KEY:
        raise UserError(
            f"{where}: field 'messages' does not end with an assistant turn (roles: "
            f"{[t['role'] for t in turns]}); training and evaluation need the reference response "
            "as the final assistant turn (prompt-only data loads with require_outputs=False, "
            "for on-policy methods and generation)"
        )
    else:
        raise UserError(
            f"{where}: field 'prompt' is a conversation without 'completion'; training and "
            "evaluation need a reference response: add "
            '"completion": [{"role": "assistant", "content": ...}] (prompt-only data loads with '
            "require_outputs=False, for on-policy methods and generation)"
        )
    return InstructionRecord(
        instruction=instruction, input="", outputs=outputs, metadata=rest, messages=turns
    )


def _turns(value: Any, where: str, key: str) -> list[dict[str, Any]]:
    """Validate a list of chat turns; return copies without null-valued extra keys."""
    shape = '{"role": ..., "content": ...}'
    if not isinstance(value, list):
        raise UserError(
            f"{where}: field '{key}' must be a list of {shape} turns, got {type(value).__name__}"
        )
    if not value:
        raise UserError(f"{where}: field '{key}' is an empty list; give at least one turn")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise UserError(
                f"{where}: field '{key}' item {i} must be an object {shape}, got "
                f"{type(turn).__name__}"
            )
        missing = [k for k in ("role", "content") if k not in turn]
        if missing:
            hint = " (ShareGPT 'from' / 'value' turns: rename them)" if "from" in turn else ""
            raise UserError(
                f"{where}: field '{key}' item {i} has no {' or '.join(repr(k) for k in missing)} "
                f"(keys found: {sorted(turn)}); every turn is {shape}{hint}"
            )
        role, content = turn["role"], turn["content"]
        if not isinstance(role, str) or not role:
            raise UserError(
                f"{where}: field '{key}' item {i}: 'role' must be a non-empty string "
                f"(system / user / assistant), got {role!r}"
            )
        if not isinstance(content, str):
            kind = "null" if content is None else type(content).__name__
            raise UserError(
                f"{where}: field '{key}' item {i} ({role}): 'content' must be a string, got "
                f"{kind} (content lists / multimodal turns are not supported)"
            )
        turns.append({k: v for k, v in turn.items() if v is not None or k in ("role", "content")})
    return turns


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


LOCAL_FIX = "give a local JSONL file instead"


def _hub_offline() -> bool:
    import datasets

    # datasets < 2.19 names it HF_DATASETS_OFFLINE only
    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_DATASETS_OFFLINE))


def _check_hub(source: str) -> None:
    """Fail fast when a dataset id cannot be read: one request, no retries.

    datasets.load_dataset retries an unreachable Hub for about 30 s before it fails. Offline
    (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) nothing is sent: datasets then reads its cache only,
    and fails at once without a cached copy.
    """
    # a name without a namespace may be one of datasets' builders (json, csv, parquet)
    if _hub_offline() or "/" not in source or Path(source).exists():
        return
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(source, timeout=10)
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"{source!r} is neither a local file or directory nor a dataset on the Hugging Face Hub: "
                        f"{LOCAL_FIX}") from None
    except HfHubHTTPError:
        return  # reachable (gated, rate-limited...): datasets reports the rest
    except Exception as e:  # no network, DNS, timeout
        raise UserError(
            f"{source!r} is not a local file or directory, and the Hugging Face Hub cannot be reached "
            f"({type(e).__name__}: {e}): {LOCAL_FIX}, or set HF_HUB_OFFLINE=1 to read a copy in the datasets cache"
        ) from None


def _load_hub(source: str, split: str, data_files):
    import datasets

    _check_hub(source)
    try:
        return datasets.load_dataset(source, split=split, data_files=data_files)
    except Exception as e:  # network, missing dataset, bad split: all fixable by the user
        files = f", data_files {data_files!r}" if data_files is not None else ""
        offline = " (HF_HUB_OFFLINE: only the datasets cache is read)" if _hub_offline() else ""
        raise UserError(
            f"could not load {source!r} (split {split!r}{files}){offline}: it is not a local .jsonl/.json file, "
            f"and loading it with datasets.load_dataset failed: {type(e).__name__}: {e}; {LOCAL_FIX}"
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
        if not any(k in columns for k in (*INSTRUCTION_KEYS, MESSAGES_KEY)):
            missing.append(
                "an instruction column (" + " / ".join(INSTRUCTION_KEYS) + ") or a 'messages' "
                "conversation"
            )
        # A conversation's reference is its final assistant turn or its completion: checked per row.
        references = (*OUTPUT_KEYS, MESSAGES_KEY, COMPLETION_KEY)
        if require_outputs and not any(k in columns for k in references):
            names = " / ".join((*OUTPUT_KEYS, COMPLETION_KEY))
            missing.append(f"a reference column ({names})")
        if missing:
            raise UserError(
                f"{name}: cannot map columns to instruction records: no {' or '.join(missing)}; "
                f"columns found: {columns}. Rename the columns or convert the data to JSONL with "
                "instruction / input / output keys (or TRL's messages / prompt + completion)"
            )
    return [
        record_from_dict(row, f"{name} row index {i}", require_outputs=require_outputs)
        for i, row in enumerate(dataset)
    ]


def records_from(
    data: Any,
    *,
    split: str = "train",
    data_files: str | list[str] | None = None,
    require_outputs: bool = True,
    name: str | None = None,
) -> list[InstructionRecord]:
    """Records from whatever the user holds: objects in, paths optional.

    data: a path or dataset id (str / Path, read by `load_records` with split and data_files);
        a `datasets.Dataset` (or a `datasets.DatasetDict`, of which `split` is taken); or a
        list / tuple / other iterable of dicts in any record format (instruction /
        input / output, TRL's messages or prompt + completion) or of `InstructionRecord`s.
    split, data_files: for a path or dataset id (see `load_records`); split also picks the
        split of a `DatasetDict`.
    require_outputs: every record must have a reference (False for prompt-only data: on-policy
        methods and generation).
    name: what error messages call the data (default: "dataset" / "data").

    Raises UserError for an unsupported type (a single dict or string of JSON included), a
    DatasetDict without `split`, and every record error of `record_from_dict`, located by
    row index.
    """
    if isinstance(data, (str, Path)):
        return load_records(data, split, require_outputs=require_outputs, data_files=data_files)
    if isinstance(data, InstructionRecord):
        data = [data]
    if isinstance(data, dict):
        if not data or not all(hasattr(v, "column_names") for v in data.values()):
            raise UserError(
                f"{name or 'data'}: got one dict (keys {sorted(map(str, data))}); pass a list of "
                "record dicts, a datasets.Dataset or a path"
            )
        # A datasets.DatasetDict (a dict of splits).
        if split not in data:
            raise UserError(
                f"{name or 'dataset'} has no split {split!r}; splits found: {sorted(data.keys())}"
            )
        data = data[split]
        name = name or f"dataset split {split!r}"
    if hasattr(data, "column_names"):
        return records_from_dataset(data, name or "dataset", require_outputs=require_outputs)
    try:
        items = iter(data)
    except TypeError:
        raise UserError(
            f"cannot read records from a {type(data).__name__}: pass a path, a datasets.Dataset "
            "or a list of record dicts"
        ) from None
    where = name or "data"
    records = []
    for i, item in enumerate(items):
        if isinstance(item, InstructionRecord):
            if require_outputs and not item.outputs:
                raise UserError(
                    f"{where} row index {i}: the record has no reference output; training and "
                    "evaluation need one"
                )
            records.append(item)
        else:
            records.append(
                record_from_dict(item, f"{where} row index {i}", require_outputs=require_outputs)
            )
    return records
