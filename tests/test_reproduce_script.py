"""benchmarks/reproduce.py: the verdict is computed from the numbers; SeqKD sees the right prompts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    # importable by name (benchmarks/ on sys.path), so that spawned worker processes can
    # unpickle the script's functions, as they do when it runs as a script
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        module = importlib.import_module("reproduce")
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert Path(module.__file__).resolve() == SCRIPT
    return module


def _summary(mean, std):
    return {"average": {"mean": mean, "std": std}}


def test_rank_statement_first_and_gaps(reproduce):
    summary = {"PromptKD": _summary(20.0, 0.5), "GKD": _summary(19.8, 0.3), "KD": _summary(15.0, 1.0)}
    text = "\n".join(reproduce.rank_statement(summary, ["KD", "GKD", "PromptKD"]))
    assert "PromptKD ranks first of 3 distilled students (it does rank first)." in text
    assert "PromptKD - GKD = +0.20 ROUGE-L; seed spread (sum of stds) 0.80: within the spread" in text
    assert "PromptKD - KD = +5.00 ROUGE-L; seed spread (sum of stds) 1.50: the gap exceeds the spread." in text
    assert "1 of 2 gaps exceed the seed spread." in text


def test_rank_statement_not_first(reproduce):
    summary = {"PromptKD": _summary(10.0, 0.0), "GKD": _summary(12.0, 0.0)}
    text = "\n".join(reproduce.rank_statement(summary, ["GKD", "PromptKD"]))
    assert "PromptKD ranks #2 of 2 distilled students (it does NOT rank first)." in text
    assert "Ranking by average ROUGE-L: GKD (12.00) > PromptKD (10.00)." in text


def test_seen_records_match_the_trainer_data_order(reproduce, tmp_path):
    from promptkd.data.order import DataOrder

    lines = [json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(10)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    seen = reproduce.seen_records(path, steps=3, batch_size=2, seed=2)
    order = DataOrder(10, 2)
    assert seen == [lines[i] for i in order.take(6)]
    assert len(set(seen)) == 6


def test_key_of_is_stable_and_sensitive(reproduce):
    assert reproduce.key_of({"a": 1, "b": [1, 2]}) == reproduce.key_of({"b": [1, 2], "a": 1})
    assert reproduce.key_of({"a": 1}) != reproduce.key_of({"a": 2})


def test_scales_have_every_knob(reproduce):
    knobs = {"heal_steps", "steps", "batch_size", "max_new_tokens", "eval_limit", "seeds"}
    for preset in reproduce.SCALES.values():
        assert knobs <= set(preset)
    args = reproduce.build_parser().parse_args(["--scale", "smoke", "--steps", "7"])
    assert args.steps == 7 and args.scale == "smoke"


def test_estimate_minutes_scales_with_the_knobs(reproduce):
    s = dict(reproduce.SCALES["cpu"], seeds=[10, 20])
    base = reproduce.estimate_minutes(s, 280)
    assert base["total"] == pytest.approx(sum(v for k, v in base.items() if k != "total"))
    assert base["total"] <= 150  # the cpu preset fits the 150-minute budget (projection)
    more = reproduce.estimate_minutes(dict(s, steps=2 * s["steps"]), 280)
    assert more["methods"] == pytest.approx(2 * base["methods"])
    assert reproduce.estimate_minutes(s, 822)["evaluation"] > base["evaluation"]


def test_cpu_preset_with_full_eval_sets_fits_the_budget(reproduce):
    s = dict(reproduce.SCALES["cpu"], seeds=[10, 20])
    assert s["eval_limit"] == 0  # the protocol's full Dolly / SelfInst / Vicuna test sets
    assert reproduce.estimate_minutes(s, 500 + 242 + 80)["total"] <= 150
    one = reproduce.estimate_minutes(dict(s, workers=1), 822)
    two = reproduce.estimate_minutes(dict(s, workers=2), 822)
    assert two["evaluation"] == pytest.approx(one["evaluation"] / min(2, os.cpu_count()))


def _touch(path):
    Path(path).write_text("x")


def test_parallel_group_counts_its_wall_clock_once(reproduce, tmp_path):
    stages = reproduce.Stages(tmp_path)
    jobs = [(f"job{i}", f"k{i}", False, _touch, (tmp_path / f"out{i}",)) for i in range(3)]
    stages.run_parallel("group", jobs, workers=1, threads=0)
    assert all((tmp_path / f"out{i}").is_file() for i in range(3))
    statuses = [r[2] for r in stages.rows]
    assert statuses == ["group", "group", "group", True]  # members are not summed; the group row is
    assert stages.rows[-1][0].startswith("group: wall clock")
    # a second invocation finds every member cached and reports the saved times
    again = reproduce.Stages(tmp_path)
    cached = [(n, k, True, _touch, a) for n, k, _, _, a in jobs]
    again.run_parallel("group", cached, workers=2, threads=0)
    assert [r[2] for r in again.rows] == [None, None, None, False]
    assert again.rows[-1][1] == pytest.approx(stages.rows[-1][1])


def test_parallel_group_reraises_a_failing_stage(reproduce, tmp_path):
    def boom():
        raise RuntimeError("stage failed")

    stages = reproduce.Stages(tmp_path)
    with pytest.raises(RuntimeError, match="stage failed"):
        stages.run_parallel("group", [("bad", "k", False, boom, ())], workers=1, threads=0)


def test_parallel_group_in_worker_processes(reproduce, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # what spawned workers import the script by
    stages = reproduce.Stages(tmp_path)
    jobs = [(f"job{i}", f"k{i}", False, os.mkdir, (str(tmp_path / f"dir{i}"),)) for i in range(3)]
    stages.run_parallel("group", jobs, workers=2, threads=1)
    assert all((tmp_path / f"dir{i}").is_dir() for i in range(3))
    assert [r[2] for r in stages.rows] == ["group", "group", "group", True]


@pytest.mark.parametrize("scale", ["cpu", "smoke"])
def test_every_method_gets_the_same_response_budget(reproduce, tmp_path, scale):
    """Reference and teacher responses are capped at the on-policy methods' max_new_tokens."""
    s = dict(reproduce.SCALES[scale])
    common = reproduce.data_config(s, tmp_path / "train.jsonl", tmp_path / "dev.jsonl")
    budgets = set()
    for label in reproduce.METHODS:
        cfg = reproduce.method_config(label, s, teacher=tmp_path / "t", init=tmp_path / "i", common_data=common,
                                      base_train={"max_steps": 1}, seqkd_file=tmp_path / "seqkd.jsonl")
        budgets.add((cfg["data"]["max_response_length"], cfg["sampling"]["max_new_tokens"]))
        assert cfg["data"]["max_length"] - cfg["data"]["max_prompt_length"] == s["max_new_tokens"]
    assert budgets == {(s["max_new_tokens"], s["max_new_tokens"])}
    assert reproduce.METHODS["SeqKD"][1]["seqkd"]["kd_ratio"] == 0.5  # the reference's SeqKD recipe


def test_mean_trained_tokens_reads_new_and_old_metrics(reproduce, tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(json.dumps({"step": 1, "trained_tokens": 10.0}) + "\n"
                 + json.dumps({"step": 2, "trained_tokens_per_s": 5.0, "step_time": 4.0}) + "\n")
    assert reproduce.mean_trained_tokens(f) == 15.0
    assert reproduce.mean_trained_tokens(tmp_path / "missing.jsonl") is None


def test_git_revision_ignores_results_files(reproduce, tmp_path, monkeypatch):
    """A cell's code revision is "with uncommitted changes" only when code differs from the commit,
    not when an earlier sitting rewrote the committed results (report, plots, sittings.jsonl)."""
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "README.md").write_text("report\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    clean = reproduce.git_revision()
    assert clean.startswith("git ") and "uncommitted" not in clean
    (tmp_path / "benchmarks" / "results" / "README.md").write_text("report, rewritten\n")
    assert reproduce.git_revision() == clean
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert reproduce.git_revision() == clean + " with uncommitted changes"
