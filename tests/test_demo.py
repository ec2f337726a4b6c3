"""The demo's own data, its teacher-agreement measure and a smoke run on tiny models (the full
demo needs the real model; nothing here downloads)."""

from __future__ import annotations

import json

import pytest
import yaml

from promptkd.demo import SMOKE_SETTINGS, DemoSettings, prompt_distances, run_demo, teacher_kl
from promptkd.demo_data import demo_records, write_demo_data
from promptkd.errors import UserError
from promptkd.testing import byte_tokenizer, save_tiny_pair, tiny_llama


def test_demo_data_is_deterministic_and_split_without_overlap(tmp_path):
    assert demo_records() == demo_records()
    train, evals = write_demo_data(tmp_path, num_eval=40)
    tr = [json.loads(x) for x in train.read_text().splitlines()]
    ev = [json.loads(x) for x in evals.read_text().splitlines()]
    assert len(ev) == 40 and len(tr) == len(demo_records()) - 40
    assert not {(r["instruction"], r["input"]) for r in tr} & {(r["instruction"], r["input"]) for r in ev}
    assert all(r["output"] for r in tr + ev)


def test_teacher_kl_is_zero_for_the_teacher_itself_and_positive_otherwise(tmp_path):
    tok = byte_tokenizer()
    teacher = tiny_llama(num_layers=2, seed=0)
    teacher.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    other = tiny_llama(num_layers=2, seed=1)
    other.save_pretrained(tmp_path / "s")
    tok.save_pretrained(tmp_path / "s")
    _, evals = write_demo_data(tmp_path / "data", num_eval=4)
    same = teacher_kl(str(tmp_path / "t"), teacher, tok, evals, max_new_tokens=4)
    diff = teacher_kl(str(tmp_path / "s"), teacher, tok, evals, max_new_tokens=4)
    assert abs(same) < 1e-5 and diff > 1e-3
    assert teacher_kl(other, teacher, tok, evals, max_new_tokens=4) == diff  # a loaded model works too


def test_prompt_distances_reads_first_and_last_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "student/loss": 1.0}] + [
        {"step": k, "prompt/drift": 0.01 * k, "prompt/kl_to_student": 1.0 / k} for k in range(1, 9)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = prompt_distances(path, window=2)
    assert (d["first_step"], d["last_step"], d["window"]) == (1, 8, 2)
    assert d["prompt/drift"]["first"] == 0.01 and d["prompt/drift"]["last"] == 0.08
    assert abs(d["prompt/kl_to_student"]["last_mean"] - (1 / 7 + 1 / 8) / 2) < 1e-12
    empty = path.with_name("no_prompt.jsonl")
    empty.write_text(json.dumps({"step": 1, "student/loss": 1.0}) + "\n")
    assert prompt_distances(empty) == {}


def test_the_demo_runs_end_to_end_on_tiny_models_with_one_budget(tmp_path, capsys):
    teacher_dir, student_dir = save_tiny_pair(tmp_path / "models")
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    table = run_demo(out=str(run), steps=3, settings=SMOKE_SETTINGS, teacher=str(teacher_dir), student=str(student_dir),
                     cache_dir=str(cache))

    assert (run / "demo_results.md").read_text(encoding="utf-8") == table
    results = json.loads((run / "demo_results.json").read_text(encoding="utf-8"))
    rows = results["rows"]
    assert len(rows) == 2 + 2 + len(SMOKE_SETTINGS.baselines)  # teacher, init, PromptKD, GKD, baselines
    assert abs(rows[0]["kl_to_teacher"]) < 1e-5 and all(r["kl_to_teacher"] > 0 for r in rows[1:])
    seeds = {str(s) for s in SMOKE_SETTINGS.seeds}
    assert all(set(r["rouge_l_vs_teacher"]) == seeds == set(r["rouge_l_vs_references"]) for r in rows)
    prompt = results["promptkd_prompt"]
    assert prompt["last_step"] == 3 and {"first", "last"} <= set(prompt["prompt/drift"]) and "prompt/kl_to_student" in prompt

    # every compared run: the same steps, prompts per step, learning rate and response cap
    budgets = set()
    for name in ("promptkd", "gkd", "seqkd", "kd"):
        cfg = yaml.safe_load((run / name / "config.yaml").read_text(encoding="utf-8"))
        t = cfg["train"]
        budgets.add((t["max_steps"], t["batch_size"], t["gradient_accumulation_steps"], t["learning_rate"], t["seed"],
                     cfg["sampling"]["max_new_tokens"], cfg["data"]["max_response_length"], cfg["model"]["student"]))
        assert cfg["method"] == name
        assert t["mixed_precision"] == "auto"
        assert not (run / name / "checkpoints").exists()
    assert yaml.safe_load((run / "promptkd" / "config.yaml").read_text())["promptkd"]["prompt_learning_rate"] is None
    gkd = yaml.safe_load((run / "gkd" / "config.yaml").read_text())["gkd"]  # PromptKD without the prompt
    assert (gkd["lmbda"], gkd["divergence"]) == (1.0, "reverse_kl")
    assert len(budgets) == 1 and next(iter(budgets))[0] == 3
    assert (run / "eval" / "teacher_responses.jsonl").is_file()
    assert (run / "eval" / f"predictions_gkd_seed{SMOKE_SETTINGS.seeds[0]}.jsonl").is_file()

    out = capsys.readouterr().out
    assert "demo_results.json" in out and "| stage | seconds |" in out and "drift KL(p_TP ‖ p_T)" in out
    assert "[demo] precision: float32" in out  # the suite's injected probe: a CPU that emulates bf16

    # a second run with other compared-run steps reuses the fine-tuned teacher and the init
    run_demo(out=str(tmp_path / "run2"), steps=2, settings=SMOKE_SETTINGS, teacher=str(teacher_dir),
             student=str(student_dir), cache_dir=str(cache))
    again = json.loads((tmp_path / "run2" / "demo_results.json").read_text(encoding="utf-8"))
    assert [r["path"] for r in again["rows"][:2]] == [r["path"] for r in rows[:2]]
    assert {"teacher (SFT): cached", "student init (KD): cached", "teacher responses (train prompts): cached"} <= set(
        again["seconds"])
    assert not (tmp_path / "run2" / "teacher").exists() and not (tmp_path / "run2" / "init").exists()


def test_demo_settings_refuse_an_unknown_baseline():
    with pytest.raises(UserError, match="minillm"):
        DemoSettings(baselines=("kd", "minillm"))
