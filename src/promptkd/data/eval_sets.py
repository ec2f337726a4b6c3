"""The evaluation sets of MiniLLM / PromptKD by name, and where each one lives.

A low-level registry: the config check uses it to refuse an evaluation set as training or dev
data (`eval_set_for_source`), and promptkd.evaluation.datasets loads the sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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


def set_deviations(sets: dict[str, str]) -> list[str]:
    """How the evaluated sets depart from the paper's five (the reference evaluates dolly, self_inst,
    vicuna, sinst and uinst: microsoft/LMOps minillm/scripts/gpt2/eval/run_eval.sh:5): those left
    out, and any other.

    sets: {name: the dataset read, a registered name or a file}. A file is one of the five when
    `eval_set_for_source` recognises it as a local copy (dolly_eval.jsonl, <dir>/sinst/11_/valid.jsonl,
    ...); any other file is another set, whatever its name (a subsample of one, for instance).
    """
    found = {name: dataset if dataset in EVAL_SETS else eval_set_for_source(dataset) for name, dataset in sets.items()}
    out = []
    missing = [name for name in EVAL_SETS if name not in found.values()]
    if missing:
        out.append(f"sets {', '.join(missing)} not evaluated (protocol: {', '.join(EVAL_SETS)})")
    other = [name if name == dataset else f"{name} ({dataset})" for name, dataset in sets.items() if found[name] is None]
    if other:
        out.append(f"sets outside the protocol: {', '.join(other)}")
    return out


def eval_set_name(dataset: str) -> str:
    """The name an evaluation set's outputs are filed under: a registered name as given, a JSONL
    file by its stem (predictions_<name>_seed<k>.jsonl, the score tables' columns)."""
    return dataset if dataset in EVAL_SETS else Path(dataset).stem


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
