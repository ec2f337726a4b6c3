"""The evaluation runner (docs/method.md, section 7) end to end on a tiny model: files, scores, re-use, errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace

import pytest

from promptkd.cli import main
from promptkd.config import EvalConfig
from promptkd.errors import UserError
from promptkd.evaluation import runner
from promptkd.evaluation.runner import deviations, run_evaluation, scores_table, summarize
from promptkd.metric import corpus_rouge_l
from promptkd.sampling import SamplingConfig

EVAL_RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "hello there"},
    {"instruction": "Name two colours.", "input": "", "outputs": ["red and blue", "green and yellow"]},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
]


@pytest.fixture
def eval_jsonl(tmp_path):
    path = tmp_path / "data" / "tinyset.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in EVAL_RECORDS), encoding="utf-8")
    return path


def _eval_args(model, data, out, *extra):
    return ["eval", "--model", str(model), "--datasets", str(data), "--seeds", "10,20", "--out", str(out),
            "--sampling.max_new_tokens", "6", "--batch-size", "2", *extra]


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_eval_cli_writes_predictions_and_scores(tmp_path, tiny_pair_dirs, eval_jsonl, capsys):
    _, student = tiny_pair_dirs
    out = tmp_path / "eval"
    assert main(_eval_args(student, eval_jsonl, out)) == 0
    printed = capsys.readouterr().out
    assert "| model | tinyset | average |" in printed and "±" in printed

    scores = json.loads((out / "scores.json").read_text())
    for seed in (10, 20):
        rows = _read_jsonl(out / f"predictions_tinyset_seed{seed}.jsonl")
        assert len(rows) == len(EVAL_RECORDS)
        assert [r["instruction"] for r in rows] == [r["instruction"] for r in EVAL_RECORDS]
        assert rows[1]["references"] == ["red and blue", "green and yellow"]  # the `outputs` list
        assert all(isinstance(r["prediction"], str) for r in rows)
        # the stored score is ROUGE-L of the stored predictions (max over every reference)
        expected = corpus_rouge_l([r["prediction"] for r in rows], [r["references"] for r in rows])
        assert scores["scores"]["tinyset"][str(seed)] == pytest.approx(expected)
        assert (out / f"predictions_tinyset_seed{seed}.meta.json").is_file()

    summary = scores["summary"]
    vals = [scores["scores"]["tinyset"][s] for s in ("10", "20")]
    assert summary["tinyset"]["mean"] == pytest.approx(sum(vals) / 2)
    assert summary["tinyset"]["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2)  # population std
    assert summary["average"]["mean"] == pytest.approx(summary["tinyset"]["mean"])
    assert scores["deviations"] == [
        "sets dolly, selfinst, vicuna, sinst, uinst not evaluated (protocol: dolly, selfinst, vicuna, sinst, uinst)",
        f"sets outside the protocol: tinyset ({eval_jsonl})", "sampling.max_new_tokens 6 (protocol: 256)",
        "seeds [10, 20] (protocol: [10, 20, 30, 40, 50])"]
    assert scores["config"]["seeds"] == [10, 20]
    assert scores["config"]["sampling"]["no_repeat_ngram_size"] == 6

    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["seed"]) for r in rows] == [("tinyset", "10"), ("tinyset", "20")]
    md = (out / "scores.md").read_text()
    assert f"{summary['tinyset']['mean']:.2f} ± {summary['tinyset']['std']:.2f}" in md
    assert "Deviations from the protocol" in md


def test_rerun_reuses_complete_predictions(tmp_path, tiny_pair_dirs, eval_jsonl, monkeypatch):
    _, student = tiny_pair_dirs
    out = tmp_path / "eval"
    assert main(_eval_args(student, eval_jsonl, out)) == 0
    before = {p.name: p.read_text() for p in out.glob("predictions_*.jsonl")}
    scores_before = json.loads((out / "scores.json").read_text())["scores"]

    calls = []
    real_predict = runner.predict

    def counting_predict(*args, **kwargs):
        calls.append(kwargs["seed"])
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(runner, "predict", counting_predict)
    assert main(_eval_args(student, eval_jsonl, out)) == 0
    assert calls == []  # everything re-used
    assert {p.name: p.read_text() for p in out.glob("predictions_*.jsonl")} == before
    assert json.loads((out / "scores.json").read_text())["scores"] == scores_before

    # an incomplete file (interrupted run) is regenerated, identically (seeded generation)
    seed20 = out / "predictions_tinyset_seed20.jsonl"
    seed20.write_text(before[seed20.name].splitlines()[0] + "\n")
    assert main(_eval_args(student, eval_jsonl, out)) == 0
    assert calls == [20]
    assert seed20.read_text() == before[seed20.name]

    # other generation settings are not silently re-used
    calls.clear()
    assert main(_eval_args(student, eval_jsonl, out, "--sampling.max_new_tokens", "4")) == 0
    assert sorted(calls) == [10, 20]


@pytest.mark.parametrize("layout", ["out inside the model", "model inside out"])
def test_a_model_changed_at_the_same_path_is_evaluated_again(tmp_path, tiny_pair_dirs, eval_jsonl, monkeypatch,
                                                             layout):
    """A retrained or re-exported model (same path, other files) does not get the old predictions;
    the evaluation's own files never count as the model's, wherever the two directories lie."""
    if layout == "out inside the model":
        student = shutil.copytree(tiny_pair_dirs[1], tmp_path / "student")
        out = student / "eval"
    else:  # --out RUN with --model RUN/final/student
        student = shutil.copytree(tiny_pair_dirs[1], tmp_path / "run" / "final" / "student")
        out = tmp_path / "run"
    assert main(_eval_args(student, eval_jsonl, out)) == 0
    calls = []
    real_predict = runner.predict
    monkeypatch.setattr(runner, "predict", lambda *a, **k: calls.append(k["seed"]) or real_predict(*a, **k))
    assert main(_eval_args(student, eval_jsonl, out)) == 0
    assert calls == []
    weights = student / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # written again
    assert main(_eval_args(student, eval_jsonl, out)) == 0
    assert sorted(calls) == [10, 20]


def test_changed_records_are_not_reused(tmp_path, tiny_pair_dirs, eval_jsonl, monkeypatch):
    _, student = tiny_pair_dirs
    out = tmp_path / "eval"
    job = EvalConfig(model=str(student), out=str(out), datasets=[str(eval_jsonl)], seeds=[10], batch_size=2,
                     sampling=SamplingConfig(max_new_tokens=4, no_repeat_ngram_size=6))
    run_evaluation(job, show_progress=False)
    changed = [dict(r) for r in EVAL_RECORDS]
    changed[0]["instruction"] = "Say goodbye."
    eval_jsonl.write_text("".join(json.dumps(r) + "\n" for r in changed))
    calls = []
    real_predict = runner.predict
    monkeypatch.setattr(runner, "predict", lambda *a, **k: calls.append(k["seed"]) or real_predict(*a, **k))
    run_evaluation(job, show_progress=False)
    assert calls == [10]
    assert _read_jsonl(out / "predictions_tinyset_seed10.jsonl")[0]["instruction"] == "Say goodbye."


def test_count_mismatch_is_an_error():
    with pytest.raises(UserError, match="2 predictions and 3 reference lists"):
        corpus_rouge_l(["a", "b"], [["a"], ["b"], ["c"]])
    with pytest.raises(UserError):
        runner._write_predictions(__import__("pathlib").Path("/nonexistent/x.jsonl"), [object()] * 2, ["a"], {})


def test_eval_user_errors(tmp_path, tiny_pair_dirs, eval_jsonl, capsys):
    _, student = tiny_pair_dirs
    assert main(_eval_args(student, tmp_path / "missing.jsonl", tmp_path / "o")) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["eval", "--model", str(student), "--datasets", "nosuchset", "--out", str(tmp_path / "o")]) == 2
    assert "unknown evaluation set 'nosuchset'" in capsys.readouterr().err
    assert main(_eval_args(student, eval_jsonl, tmp_path / "o", "--seeds", "10,10")) == 2
    assert "repeats a seed" in capsys.readouterr().err
    other = tmp_path / "other" / "tinyset.jsonl"
    other.parent.mkdir()
    other.write_text(eval_jsonl.read_text())
    assert main(["eval", "--model", str(student), "--datasets", f"{eval_jsonl},{other}", "--out", str(tmp_path / "o")]) == 2
    assert "same name" in capsys.readouterr().err


def test_summary_and_table_two_sets():
    scores = {"a": {10: 10.0, 20: 20.0}, "b": {10: 30.0, 20: 30.0}}
    s = summarize(scores)
    assert s["a"] == {"mean": 15.0, "std": 5.0}
    assert s["b"] == {"mean": 30.0, "std": 0.0}
    # average: mean of set means; its spread: std over seeds of the per-seed average
    assert s["average"]["mean"] == 22.5
    assert s["average"]["std"] == pytest.approx(2.5)  # per-seed averages 20 and 25
    table = scores_table(scores, label="student")
    assert table.splitlines()[0] == "| student | a | b | average |"
    assert "15.00 ± 5.00" in table and "22.50 ± 2.50" in table


def test_deviations_are_differences_from_the_protocol():
    five = ["dolly", "selfinst", "vicuna", "sinst", "uinst"]
    assert deviations(EvalConfig(model="m", out="o", datasets=five)) == []
    # the default sets are three of the protocol's five; a file is outside it, whatever its content
    assert deviations(EvalConfig(model="m", out="o")) == [
        "sets sinst, uinst not evaluated (protocol: dolly, selfinst, vicuna, sinst, uinst)"]
    assert deviations(EvalConfig(model="m", out="o", datasets=[*five, "mine.jsonl"])) == [
        "sets outside the protocol: mine (mine.jsonl)"]
    # a local copy of a protocol set is that set; a study's label does not make a file one
    copies = {"dolly": "data/eval/dolly_eval.jsonl", "selfinst": "selfinst_eval.jsonl", "vicuna": "vicuna",
              "sinst": "dl/sinst/11_/valid.jsonl", "uinst": "cache/sinst_every4/uinst.jsonl"}
    assert deviations(EvalConfig(model="m", out="o"), sets=copies) == [
        "sets uinst not evaluated (protocol: dolly, selfinst, vicuna, sinst, uinst)",
        "sets outside the protocol: uinst (cache/sinst_every4/uinst.jsonl)"]
    devs = deviations(EvalConfig(model="m", out="o", datasets=five, seeds=[10, 20], limit=50,
                                 sampling=SamplingConfig(max_new_tokens=128, no_repeat_ngram_size=6)))
    assert devs == ["sampling.max_new_tokens 128 (protocol: 256)", "seeds [10, 20] (protocol: [10, 20, 30, 40, 50])",
                    "only the first 50 records of each set"]
    devs = deviations(EvalConfig(model="m", out="o", datasets=five, prompt_truncation="keep_last"))
    assert devs == ["prompt_truncation 'keep_last' (protocol: 'keep_first')"]
    # the precision is the machine's choice, not the protocol's (scores.json records it)
    assert deviations(EvalConfig(model="m", out="o", datasets=five, mixed_precision="no")) == []
    # every sampling setting counts, e.g. the training sampler's missing n-gram block
    devs = deviations(EvalConfig(model="m", out="o", datasets=five, sampling=SamplingConfig(eos_at_cap=False)))
    assert devs == ["sampling.no_repeat_ngram_size 0 (protocol: 6)"]


def test_long_prompts_keep_their_first_tokens_by_default_and_the_choice_is_recorded(tmp_path, eval_jsonl, monkeypatch):
    """The reference evaluation (MiniLLM / PromptKD PromptDataset) keeps prompt_ids[:256]."""
    from promptkd.data.records import read_jsonl_records
    from promptkd.data.templates import format_prompt
    from promptkd.testing import byte_tokenizer, tiny_llama

    tok, model = byte_tokenizer(), tiny_llama(num_layers=1)
    full = [tok(format_prompt(r, "alpaca", tok))["input_ids"] for r in read_jsonl_records(eval_jsonl)]
    assert all(len(ids) > 16 for ids in full)
    seen = []
    monkeypatch.setattr(runner, "predict", lambda m, t, examples, **k: seen.append(examples) or [""] * len(examples))

    out = tmp_path / "eval"
    job = EvalConfig(model="tiny", out=str(out), datasets=[str(eval_jsonl)], seeds=[10], max_prompt_length=16)
    run_evaluation(job, model=model, tokenizer=tok, show_progress=False)
    assert [e.prompt_ids for e in seen[-1]] == [ids[:16] for ids in full]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["config"]["prompt_truncation"] == "keep_first"
    assert not any("keep their" in d for d in scores["deviations"])
    meta = json.loads((out / "predictions_tinyset_seed10.meta.json").read_text())
    assert meta["prompt_truncation"] == "keep_first"

    # keep_last still works, is a recorded deviation, and does not re-use keep_first predictions
    run_evaluation(replace(job, prompt_truncation="keep_last"), model=model, tokenizer=tok, show_progress=False)
    assert len(seen) == 2 and [e.prompt_ids for e in seen[-1]] == [ids[-16:] for ids in full]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["config"]["prompt_truncation"] == "keep_last"
    assert "prompt_truncation 'keep_last' (protocol: 'keep_first')" in scores["deviations"]
    assert "prompt_truncation 'keep_last'" in (out / "scores.md").read_text()

    with pytest.raises(UserError, match="'prompt_truncation' = 'right': must be one of keep_first, keep_last"):
        run_evaluation(replace(job, prompt_truncation="right"), model=model, tokenizer=tok)


def test_eval_cli_prompt_truncation_reaches_the_job(monkeypatch):
    jobs = []
    monkeypatch.setattr(runner, "run_evaluation", lambda job: jobs.append(job) or "table")
    assert main(["eval", "--model", "m", "--out", "o"]) == 0
    assert main(["eval", "--model", "m", "--out", "o", "--prompt-truncation", "keep_last"]) == 0
    assert [j.prompt_truncation for j in jobs] == ["keep_first", "keep_last"]
    assert main(["eval", "--model", "m", "--out", "o", "--prompt-truncation", "left"]) == 2
    assert len(jobs) == 2
