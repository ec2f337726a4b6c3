"""A run's data sources: the training data, the dev set and a method's own data
(minillm.lm_data), read before any model loads and tokenised into examples.

    records = read_sources(cfg, method, train_dataset=None, eval_dataset=None)
    train = train_examples(cfg, method, tokenizer, records.pop("train"), is_main_process=True)
"""

from __future__ import annotations

import logging

from promptkd.data.dataset import build_examples
from promptkd.data.records import records_from
from promptkd.errors import UserError

logger = logging.getLogger(__name__)


def read_sources(cfg, method, *, train_dataset=None, eval_dataset=None) -> dict[str, tuple[str, list]]:
    """Every data source's records, read before any model loads, so that a missing file or an
    unreachable Hub id fails in seconds and names its config key.

    Args:
        cfg: the run's `Config` (data.*, method, minillm.lm_data).
        method: the method object (its training source and whether it needs references).
        train_dataset, eval_dataset: data the user passed; None reads data.train / data.dev.

    Returns:
        {"train" / "dev" / a method's own source by its config key ("minillm.lm_data"): (the name logs and messages
        give it, records)}.

    Raises:
        UserError: a source that cannot be read, prefixed with its config key.
    """
    d = cfg.data
    if train_dataset is not None:
        train = ("train_dataset", train_dataset, d.train_split, None)
    elif not method.trains_on_teacher_responses:
        train = ("data.train", d.train, d.train_split, d.train_data_files)
    else:  # another file than data.train (seqkd's teacher responses): data.train's split is not its own
        train = ("data.teacher_responses", d.teacher_responses, "train", None)
    reads = {"train": (*train, method.needs_references(method.options))}
    if eval_dataset is not None:
        reads["dev"] = ("eval_dataset", eval_dataset, d.dev_split, None, True)
    elif d.dev:
        reads["dev"] = ("data.dev", d.dev, d.dev_split, d.dev_data_files, True)
    if cfg.method == "minillm" and cfg.minillm.lm_data:
        reads["minillm.lm_data"] = ("minillm.lm_data", cfg.minillm.lm_data, "train", None, True)
    return {name: _read_records(*read) for name, read in reads.items()}


def train_examples(cfg, method, tokenizer, records: tuple[str, list], *, is_main_process: bool) -> list:
    """The training examples of `read_sources(...)["train"]`, checked by the method and logged with
    their counts; the first data.max_train_examples when set."""
    source, records = records
    method.check_train_records(records, source=source, is_main_process=is_main_process)
    examples, stats = _examples(cfg, tokenizer, records, source=source, with_responses=method.needs_references(method.options))
    if is_main_process:
        logger.log(stats.log_level, "training data %s: %s", source, stats.summary())
    if cfg.data.max_train_examples:
        examples = examples[: cfg.data.max_train_examples]
    return examples


def dev_examples(cfg, tokenizer, records: tuple[str, list] | None) -> list:
    """The dev examples (with responses) of `read_sources(...)["dev"]`; [] without a dev set."""
    if records is None:
        return []
    source, records = records
    examples, _ = _examples(cfg, tokenizer, records, source=source, with_responses=True)
    if cfg.data.max_dev_examples:
        examples = examples[: cfg.data.max_dev_examples]
    return examples


def method_examples(cfg, tokenizer, sources: dict[str, tuple[str, list]], *, is_main_process: bool) -> dict[str, list]:
    """A method's own data by config key ({"minillm.lm_data": examples} when it is set, else {}):
    the rest of `read_sources(...)`, with responses, tokenised like the training data.

    Raises:
        UserError: the source has no usable records.
    """
    if "minillm.lm_data" not in sources:
        return {}
    name, records = sources["minillm.lm_data"]
    examples, stats = _examples(cfg, tokenizer, records, source=name, with_responses=True)
    if is_main_process:
        logger.log(stats.log_level, "%s data %s: %s", cfg.method, name, stats.summary())
    if not examples:
        raise UserError(f"minillm.lm_data: {name}: no usable records (see the counts above)")
    return {"minillm.lm_data": examples}


def _examples(cfg, tokenizer, records, *, source: str, with_responses: bool):
    d = cfg.data
    return build_examples(
        records,
        tokenizer,
        template=d.template,
        max_prompt_length=d.max_prompt_length,
        max_length=d.max_length,
        max_response_length=d.max_response_length,
        with_responses=with_responses,
        source=source,
    )


def _read_records(key: str, data, split: str, data_files, with_responses: bool) -> tuple[str, list]:
    """(the name logs give a data source, its records); an error names the source's config key."""
    try:
        records = records_from(data, split=split, data_files=data_files, require_outputs=with_responses)
    except UserError as e:
        raise UserError(f"{key}: {e}", cli=f"{key}: {e.cli}") from e
    return (key if key in ("train_dataset", "eval_dataset") else str(data)), records
