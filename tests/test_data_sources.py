"""Where shipped recipes and defaults read data from.

- Train and dev come from MiniLLM's training file, split as MiniLLM splits it (dev = the first
  1,000 records of MiniLLM/dolly raw.jsonl, train = the rest; LMOps minillm/tools/
  process_data_dolly.py), never from an evaluation set (MiniLLM/dolly valid.jsonl is the test set).
- Nothing shipped or defaulted points at our development tree (../shared/data): local data is
  passed explicitly (--data.train, --data-dir) or through $PROMPTKD_DATA_DIR.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import promptkd
from promptkd.config import config_from_dict, read_yaml
from promptkd.errors import ConfigError
from promptkd.evaluation import datasets as eval_datasets
from promptkd.evaluation.datasets import (
    DATA_DIR_ENV,
    EVAL_SETS,
    eval_set_for_source,
    load_eval_set,
    local_eval_file,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)
NUM_DEV = 1000  # MiniLLM's --dev-num


def _sources(data: dict) -> list[tuple[str, str, str | None]]:
    return [(key, data[key], data.get(f"{key}_data_files")) for key in ("train", "dev") if data.get(key)]


# --------------------------------------------------------------------------- no evaluation set


def test_eval_set_for_source_recognises_every_way_to_name_an_eval_set(tmp_path):
    assert eval_set_for_source("MiniLLM/dolly") == "dolly"  # datasets infers only valid.jsonl
    assert eval_set_for_source("MiniLLM/dolly", "valid.jsonl") == "dolly"
    assert eval_set_for_source("MiniLLM/dolly", "raw.jsonl") is None  # the training file
    assert eval_set_for_source("MiniLLM/sinst", "11_/valid.jsonl") == "sinst"
    assert eval_set_for_source("data/dolly/valid.jsonl") == "dolly"  # MiniLLM's README layout
    assert eval_set_for_source("data/self-inst/valid.jsonl") == "selfinst"
    assert eval_set_for_source("/x/eval/vicuna_eval.jsonl") == "vicuna"
    assert eval_set_for_source("my_train.jsonl") is None
    clone = tmp_path / "dolly"  # a local copy of the Hub repo
    clone.mkdir()
    assert eval_set_for_source(clone) == "dolly"
    assert eval_set_for_source(clone, "raw.jsonl") is None
    for spec in EVAL_SETS.values():
        assert eval_set_for_source(spec.hub_id, spec.hub_data_files) == spec.name


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_shipped_train_or_dev_source_is_an_eval_set(path):
    data = read_yaml(path).get("data", {})
    for key, source, data_files in _sources(data):
        assert eval_set_for_source(source, data_files) is None, f"{path.name}: data.{key} = {source!r} is an eval set"
        if source == "MiniLLM/dolly":  # MiniLLM's own split of its training file
            assert data_files == "raw.jsonl"
            assert data[f"{key}_split"] == {"train": f"train[{NUM_DEV}:]", "dev": f"train[:{NUM_DEV}]"}[key]


def test_config_rejects_an_eval_set_as_train_or_dev():
    """The old paper recipes: data.dev MiniLLM/dolly split validation = the Dolly test set."""
    old = {"model": {"teacher": "t", "student": "s"},
           "data": {"train": "x.jsonl", "dev": "MiniLLM/dolly", "dev_split": "validation"}}
    with pytest.raises(ConfigError, match=r"'data.dev' = 'MiniLLM/dolly' is the 'dolly' evaluation set") as e:
        config_from_dict(old)
    assert len(e.value.problems) == 1
    with pytest.raises(ConfigError, match="'data.train' = .* is the 'dolly' evaluation set"):
        config_from_dict({**old, "data": {"train": "eval/dolly_eval.jsonl"}})


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_shipped_split_through_the_trainer_on_a_hub_layout_directory(tmp_path, monkeypatch, tiny_pair_dirs):
    """A directory laid out like the MiniLLM/dolly Hub repo, read with the shipped paper recipe's
    data_files / splits by the real Trainer: dev = raw.jsonl's first 1,000 records in order,
    train = the rest, disjoint, and nothing from valid.jsonl."""
    import datasets

    from promptkd.training.loop import Trainer

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    repo = tmp_path / "hub" / "dolly"
    repo.mkdir(parents=True)
    num_train = 30
    raw = [{"topic": "open_qa", "instruction": f"q{i}", "input": "", "output": f"raw {i}", "prompt": "p"}
           for i in range(NUM_DEV + num_train)]
    _write_jsonl(repo / "raw.jsonl", raw)
    _write_jsonl(repo / "valid.jsonl", [{"instruction": f"t{i}", "input": "", "output": f"test {i}"} for i in range(20)])
    (repo / "raw.txt").write_text("q0\n")  # the Hub repo's other files
    (repo / "valid.txt").write_text("t0\n")

    data = read_yaml(ROOT / "configs/paper/gpt2-base_promptkd.yaml")
    teacher, student = tiny_pair_dirs
    data["model"] = {"teacher": str(teacher), "student": str(student)}
    for key in ("train", "dev"):
        assert data["data"][key] == "MiniLLM/dolly"
        data["data"][key] = str(repo)
    data["train"].update(output_dir=str(tmp_path / "run"), mixed_precision="no", cpu=True)
    trainer = Trainer(config_from_dict(data), show_progress=False).setup()

    dev = [e.references[0] for e in trainer.dev_examples]
    train = [e.references[0] for e in trainer.train_examples]
    assert dev == [f"raw {i}" for i in range(NUM_DEV)]
    assert sorted(train) == sorted(f"raw {i}" for i in range(NUM_DEV, NUM_DEV + num_train))
    assert not set(dev) & set(train)
    assert not any(r.startswith("test") for r in dev + train)
    # without data_files the same directory is only the test set (what the old recipes read)
    assert datasets.load_dataset(str(repo)).keys() == {"validation"}
    assert eval_set_for_source(repo) == "dolly"


# --------------------------------------------------------------------------- no development tree


def test_nothing_shipped_or_defaulted_points_at_the_development_tree():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        assert "shared/data" not in text and "../shared" not in text, path
        assert "~/.cache/promptkd" not in text, f"{path}: a file only our demo creates"
    for path in RECIPES:  # models: Hub ids a user with internet can load
        for key, name in read_yaml(path).get("model", {}).items():
            if key in ("teacher", "student"):
                assert not str(name).startswith(("/", ".", "~")) and not str(name).endswith(".gguf"), (path, name)
    for path in sorted(Path(promptkd.__file__).parent.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text and '"shared" / "data"' not in text, path

    from promptkd.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            text = f"{action.default} {action.help}"
            assert "../shared" not in text and "shared/data" not in text, (name, action.dest)


def test_named_eval_set_goes_to_the_hub_not_to_shared_beside_the_cwd(tmp_path, monkeypatch):
    """With neither data_dir nor $PROMPTKD_DATA_DIR, a ../shared/data beside the working directory
    is not read: the set comes from MiniLLM's Hub release (mocked here)."""
    shared = tmp_path / "shared" / "data"
    (shared / "eval").mkdir(parents=True)
    _write_jsonl(shared / "eval" / "dolly_eval.jsonl", [{"instruction": "local", "input": "", "output": "o"}])
    cwd = tmp_path / "project"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    calls = []

    def fake_hub(source, split="train", *, require_outputs=True, data_files=None):
        calls.append((source, data_files))
        return [eval_datasets.InstructionRecord("hub", "", ["o"], {})]

    monkeypatch.setattr(eval_datasets, "load_records", fake_hub)
    assert local_eval_file("dolly") is None
    assert [r.instruction for r in load_eval_set("dolly")] == ["hub"]
    assert calls == [("MiniLLM/dolly", "valid.jsonl")]

    monkeypatch.setenv(DATA_DIR_ENV, str(shared))  # $PROMPTKD_DATA_DIR still selects local files
    assert [r.instruction for r in load_eval_set("dolly")] == ["local"]
    monkeypatch.delenv(DATA_DIR_ENV)
    assert [r.instruction for r in load_eval_set("dolly", data_dir=shared)] == ["local"]  # and --data-dir
    assert len(calls) == 1


# --------------------------------------------------------------------------- unreachable sources fail fast


def test_a_dev_source_that_cannot_be_read_fails_before_the_models_load_naming_its_key(
    tmp_path, monkeypatch, tiny_pair_dirs, tiny_jsonl
):
    """Offline (HF_HUB_OFFLINE, set for every test by conftest.py) a Hub id without a cached copy fails
    at once, before any model loads, and the message names data.dev and how to use local data."""
    import datasets

    from promptkd.errors import UserError
    from promptkd.training import assembly, loop

    assert datasets.config.HF_HUB_OFFLINE
    monkeypatch.setattr(assembly, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("a model loaded first"))
    teacher, student = tiny_pair_dirs
    cfg = config_from_dict({"model": {"teacher": str(teacher), "student": str(student)},
                            "data": {"train": str(tiny_jsonl), "dev": "promptkd-tests/no-such-dataset",
                                     "dev_data_files": "raw.jsonl", "dev_split": "train[:1000]"},
                            "train": {"output_dir": str(tmp_path / "run"), "mixed_precision": "no"}})
    with pytest.raises(UserError) as e:
        loop.Trainer(cfg, show_progress=False).setup()
    message = str(e.value)
    assert message.startswith("data.dev: could not load 'promptkd-tests/no-such-dataset'"), message
    assert "HF_HUB_OFFLINE" in message and "give a local JSONL file instead" in message
    cfg.data.dev, cfg.data.train = None, str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match=r"^data.train: data file not found: '.*missing.jsonl'"):
        loop.Trainer(cfg, show_progress=False).setup()


def test_without_a_network_one_quick_probe_fails_and_datasets_never_retries(monkeypatch):
    """Online mode with no network: datasets.load_dataset would retry for about 30 s; one request
    without retries decides instead."""
    import datasets
    import huggingface_hub

    from promptkd.data.records import load_records
    from promptkd.errors import UserError

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    probes = []

    def no_network(self, repo_id, **kwargs):
        probes.append((repo_id, kwargs))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("datasets retries an unreachable Hub"))
    with pytest.raises(UserError) as e:
        load_records("MiniLLM/dolly", split="train[:1000]", data_files="raw.jsonl")
    assert probes == [("MiniLLM/dolly", {"timeout": 10})]
    assert str(e.value) == (
        "'MiniLLM/dolly' is not a local file or directory, and the Hugging Face Hub cannot be reached "
        "(ConnectionError: [Errno -2] Name or service not known): give a local JSONL file instead, or set "
        "HF_HUB_OFFLINE=1 to read a copy in the datasets cache")


def test_eval_without_a_local_copy_fails_before_the_model_loads_naming_data_dir(tmp_path, monkeypatch, capsys):
    import datasets

    from promptkd.cli import main
    from promptkd.evaluation import runner

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(runner, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model loaded first"))

    def offline(*args, **kwargs):  # what datasets raises offline without a cached copy
        raise ConnectionError("Couldn't reach 'MiniLLM/dolly' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert main(["eval", "--model", "m", "--out", str(tmp_path / "out"), "--datasets", "dolly"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptkd: error: evaluation set 'dolly': no local copy (dolly_eval.jsonl under data_dir / "
                          "--data-dir or $PROMPTKD_DATA_DIR)"), err
    assert err.rstrip().endswith("Point data_dir (--data-dir) or PROMPTKD_DATA_DIR at a directory that holds "
                                 "dolly_eval.jsonl") and len(err.splitlines()) == 1


def test_best_checkpoint_rule_lower_loss_higher_rouge():
    """train.eval_metric loss keeps the lowest dev loss, rougeL the highest ROUGE-L; ties and
    records without the metric keep the earlier best."""
    from promptkd.training.dev_eval import DevEvaluation

    improved = DevEvaluation.improved
    assert improved("loss", {"dev/loss": 2.0}, None) == 2.0
    assert improved("loss", {"dev/loss": 1.5}, 2.0) == 1.5
    assert improved("loss", {"dev/loss": 2.0}, 2.0) is None
    assert improved("loss", {"dev/loss": 2.5}, 2.0) is None
    assert improved("rougeL", {"dev/rougeL": 30.0}, 25.0) == 30.0
    assert improved("rougeL", {"dev/rougeL": 20.0}, 25.0) is None
    assert improved("rougeL", {"dev/loss": 1.0}, 25.0) is None
