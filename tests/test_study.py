"""benchmarks/study.py (the per-cell cpu2 study): comparisons, integrity, resume, init hash, sitting plan, report."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from promptkd.errors import UserError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("study")
    finally:
        sys.path.remove(str(BENCH))
    assert Path(module.__file__).resolve() == BENCH / "study.py"
    return module


@pytest.fixture(scope="module")
def cpu2(study):
    return dict(study.STUDY_SCALES["cpu2"])


# ----------------------------------------------------------------------------- comparisons


def test_cpu2_report_tests_18_comparisons(study, cpu2):
    """PromptKD against its 8 baselines, and each of the 5 prompt-LR / guard variants against GKD
    and against PromptKD: Holm's family is these 18."""
    pairs = study.comparison_pairs(study.study_labels(cpu2))
    assert len(pairs) == len(set(pairs)) == 18
    assert pairs[:8] == [("PromptKD", b) for b in study.PRIMARY + study.SECONDARY]
    assert ("PromptKD-lr1e-3", "GKD") in pairs and ("PromptKD-lr1e-3", "PromptKD") in pairs


def test_fmt_p(study):
    assert study.fmt_p(0.0966) == "0.097" and study.fmt_p(1.0) == "1.000" and study.fmt_p(0.00025) == "0.00025"
    assert study.fmt_p(float("nan")) == ""


# ----------------------------------------------------------------------------- design of the study


def test_cpu2_design_meets_the_issue(study, cpu2):
    s = cpu2
    assert s["steps"] >= 160 and s["batch_size"] == 4  # >= 4 x the first study's 40 steps of batch 4
    labels = study.study_labels(s)
    order = study.cell_order(s)
    seeds = {}
    for lab, sd in order:
        seeds.setdefault(lab, []).append(sd)
    for lab in ("PromptKD", "PromptKD-noreg", "GKD", "KD"):
        assert len(seeds[lab]) >= 3
    for lab in ("SFT", "SeqKD", "ImitKD", "MiniLLM", "DistiLLM"):
        assert len(seeds[lab]) >= 1
    drift = [k for k, v in labels.items() if v.group == "drift"]
    # reference LR and >= 2 raised LRs, each with and without the guard, 3 seeds each
    combos = {(labels[k].prompt_lr, labels[k].guard) for k in drift} | {(None, False)}
    assert {lr for lr, _ in combos} >= {None, 2.5e-4, 1e-3}
    assert all((lr, g) in combos for lr in {lr for lr, _ in combos} for g in (False, True))
    assert all(len(seeds[k]) == 3 for k in drift)
    # the most important comparisons come first: the core cells of every seed before anything else
    core = [i for i, (lab, _) in enumerate(order) if labels[lab].group == "core"]
    assert core == list(range(1, 1 + len(core)))
    assert order[0] == ("Init", 0)
    # ExAccErr at >= 3 checkpoints for PromptKD, GKD and KD
    assert len(study.eb_steps(s)) >= 3
    assert all(labels[k].exposure_bias for k in ("PromptKD", "GKD", "KD"))


def test_every_method_gets_the_same_steps_prompts_and_response_cap(study, cpu2, tmp_path):
    from promptkd.config import config_from_dict

    paths = study.Paths(study_dir=tmp_path, cache=tmp_path, data_dir=tmp_path, teacher=tmp_path / "t",
                        pruned=tmp_path / "p", train_file=tmp_path / "train.jsonl", dev_file=tmp_path / "dev.jsonl",
                        sinst_file=tmp_path / "sinst.jsonl", init_run=tmp_path / "init")
    seen = set()
    for lab in study.study_labels(cpu2).values():
        if not lab.method:
            continue
        if lab.guard:  # promptkd.max_drift was removed: the guard cells cannot be re-run
            with pytest.raises(UserError, match=r"'promptkd\.max_drift' was removed"):
                study.method_config(cpu2, paths, lab, 2, tmp_path / "seqkd.jsonl")
            continue
        cfg = study.method_config(cpu2, paths, lab, 2, tmp_path / "seqkd.jsonl")
        config_from_dict(cfg, check_required=False)  # a valid promptkd config
        t, d = cfg["train"], cfg["data"]
        seen.add((t["max_steps"], t["batch_size"], t["seed"], t["learning_rate"], d["max_response_length"],
                  cfg["sampling"]["max_new_tokens"], d["train"], cfg["model"]["student"]))
    assert len(seen) == 1
    init = study.init_config(cpu2, paths)
    assert init["method"] == "sft" and init["train"]["deterministic"] and init["train"]["seed"] == study.INIT_SEED
    config_from_dict(init, check_required=False)


def test_cells_with_removed_settings_are_skipped_or_refused(study, cpu2):
    """cpu2's guard cells set promptkd.max_drift, which the current code removed: a sitting skips
    them, and naming them with --cells is an error that names the key."""
    order, labels = study.cell_order(cpu2), study.study_labels(cpu2)
    ids = [study.cell_id(*c) for c in order]
    guard = [c for c in ids if "-guard__" in c]
    assert len(guard) == 9 and all(study.removed_keys(labels[c.split("__")[0]]) for c in guard)
    assert study.runnable_cells(ids, order, labels, explicit=False) == [c for c in ids if c not in guard]
    assert study.runnable_cells(["GKD__seed1"], order, labels, explicit=True) == ["GKD__seed1"]
    with pytest.raises(UserError, match=r"PromptKD-guard__seed1: .*'promptkd\.max_drift' was removed"):
        study.runnable_cells(["GKD__seed1", "PromptKD-guard__seed1"], order, labels, explicit=True)


def test_seqkd_file_order_gives_the_same_prompts_per_step(study):
    from promptkd.data.order import DataOrder

    n, seed = 24, 3
    seen = [f"p{j}" for j in range(n)]  # the j-th prompt the other methods see
    inv = study.seqkd_order(n, seed)
    file = [seen[inv[i]] for i in range(n)]
    order = DataOrder(n, seed)
    assert [file[i] for i in order.take(n)] == seen


def test_fmt_lr_and_cell_ids(study):
    assert study.fmt_lr(2.5e-4) == "2.5e-4" and study.fmt_lr(1e-3) == "1e-3"
    assert study.cell_id("PromptKD-lr1e-3-guard", 2) == "PromptKD-lr1e-3-guard__seed2"
    order = study.cell_order(study.STUDY_SCALES["cpu2"])
    labels = study.study_labels(study.STUDY_SCALES["cpu2"])
    assert study.select_cells(order, "GKD", labels) == [("GKD", 1), ("GKD", 2), ("GKD", 3)]
    assert study.select_cells(order, "KD__seed2,Init", labels) == [("Init", 0), ("KD", 2)]
    with pytest.raises(SystemExit):
        study.select_cells(order, "Nope", labels)


# ----------------------------------------------------------------------------- sittings


def test_dry_run_plan_never_exceeds_150_minutes(study, cpu2):
    order = [study.cell_id(*c) for c in study.cell_order(cpu2)]
    est = study.refined_estimates(cpu2, study.cell_order(cpu2), {})
    assert all(0 < est[c] < 150 for c in order)
    plan = study.plan_sittings(order, est, 150, cpu2["workers"], study.estimate_init_minutes(cpu2))
    assert sorted(c for st in plan for c, *_ in st["cells"]) == sorted(order)  # every cell once
    for st in plan:
        assert not st["over"] and st["minutes"] <= 150
        for w in range(cpu2["workers"]):  # a worker never runs two cells at once
            spans = sorted((a, b) for _, a, b, ww in st["cells"] if ww == w)
            assert all(b1 <= a2 + 1e-9 for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False))
    # the core comparison's cells are all in the first sitting
    first = {c for c, *_ in plan[0]["cells"]}
    assert {study.cell_id(k, sd) for k in ("PromptKD", "GKD", "KD", "PromptKD-noreg") for sd in (1, 2, 3)} <= first


def test_dry_run_cli_prints_a_plan_within_budget(study, tmp_path, capsys):
    assert study.main(["--scale", "cpu2", "--dry-run", "--results-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    minutes = [float(m) for m in re.findall(r"^sitting \d+: (\d+) min wall", out, flags=re.M)]
    assert minutes and max(minutes) <= 150
    assert "OVER BUDGET" not in out
    assert "PromptKD-lr2.5e-4-guard__seed3" in out


def test_reproduce_dispatches_the_study_scales(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        reproduce = importlib.import_module("reproduce")
    finally:
        sys.path.remove(str(BENCH))
    assert reproduce.main(["--scale", "cpu2-smoke", "--dry-run", "--results-dir", str(tmp_path)]) == 0
    assert "sitting 1:" in capsys.readouterr().out


def test_a_huge_cell_gets_its_own_flagged_sitting(study):
    plan = study.plan_sittings(["a", "big", "b"], {"a": 10, "big": 500, "b": 10}, 150, 2)
    assert [sorted(c for c, *_ in st["cells"]) for st in plan] == [["a", "b"], ["big"]]
    assert plan[1]["over"] and not plan[0]["over"]


# ----------------------------------------------------------------------------- cells, resume, init hash

SMOKE = "cpu2-smoke"


def _cell(study, s, label, seed, *, init_hash="h0", shift=0.0, key=None, n=(3, 3, 3, 3), code="git abc"):
    lab = study.study_labels(s)[label]
    per_prompt = {x: [10.0 + shift + i for i in range(k)] for x, k in zip(study.SETS, n, strict=True)}
    scores = {x: sum(v) / len(v) for x, v in per_prompt.items()}
    rec = {"label": label, "seed": seed, "method": lab.method, "group": lab.group,
           "settings_key": key or study.settings_key(s, lab, seed), "init_hash": init_hash, "code": code,
           "per_prompt": per_prompt, "scores": scores, "average": sum(scores.values()) / 4,
           "prompts_hash": {x: "p" for x in study.SETS}, "wall_s": 60.0, "dev_loss": 3.0,
           "trained_tokens": 100.0, "trained_tokens_per_step": 33.3,
           "curves": {"student/loss": [[1, 2.0], [2, 1.5], [3, 1.2]], "dev/loss": [[1, 3.2], [3, 3.0]]}}
    if lab.method == "promptkd":
        # 24 steps: the report's start / end are means over the first / last 10 steps; one spike at
        # step 12 is the maximum; the prompted teacher ends closer to the student than to the teacher
        steps = range(1, 25)
        rec["curves"]["prompt/drift"] = [[t, 0.05 if t <= 10 else 0.9 if t == 12 else 0.4] for t in steps]
        rec["curves"]["prompt/kl_to_student"] = [[t, 1.9 if t <= 10 else 0.3] for t in steps]
        rec["curves"]["prompt/frozen_by_guard"] = [[t, float(t > 20)] for t in steps]
    if lab.exposure_bias:
        rec["exaccerr"] = {str(st): [-5.0 * st, -6.0 * st] for st in study.eb_steps(s)}
    return rec


def _write(study, study_dir, rec):
    study.atomic_write_json(study_dir / "cells" / f"{study.cell_id(rec['label'], rec['seed'])}.json", rec)


def test_finished_cells_are_skipped_and_not_recomputed(study, tmp_path):
    s = dict(study.STUDY_SCALES[SMOKE])
    d = tmp_path / "study"
    _write(study, d, _cell(study, s, "GKD", 1))
    _write(study, d, _cell(study, s, "KD", 1, key="old-settings"))
    status = study.classify_cells(study.load_cells(d), s, "h0")
    assert status == {"GKD__seed1": "ok", "KD__seed1": "stale"}
    ids = ["GKD__seed1", "KD__seed1", "PromptKD__seed1"]
    assert study.pending_cells(ids, status) == ["PromptKD__seed1"]
    assert study.pending_cells(ids, status, rerun_stale=True) == ["KD__seed1", "PromptKD__seed1"]

    calls = []

    def fake(cid):
        calls.append(cid)

    pending = study.pending_cells(ids, status)
    est = {c: 0.01 for c in ids}
    import time

    done, failed, left = study.run_sitting(pending, est, {c: (c,) for c in ids}, fake, workers=1, threads=0,
                                           budget_min=60, t_start=time.perf_counter())
    assert calls == ["PromptKD__seed1"] and done == ["PromptKD__seed1"] and not failed and not left


def test_a_cached_stage_keeps_the_code_and_time_of_the_sitting_that_ran_it(study, tmp_path):
    now = {"code": "git new", "host": "h"}
    study.record_stage(tmp_path, "train", 1500.0, {"code": "git old", "host": "h"})
    log = study.read_stage_log(tmp_path)
    assert log["train"]["code"] == "git old" and log["train"]["seconds"] == 1500.0

    # trained in an earlier sitting, evaluated now: the cell's code is the training's, both codes are listed
    p = study.cell_provenance(["train", "eval"], {"eval": 300.0}, log, now, elapsed=310.0)
    assert p["code"] == "git old" and p["stage_code"] == {"train": "git old", "eval": "git new"}
    assert p["times"] == {"train_s": 1500.0, "eval_s": 300.0} and p["wall_s"] == 1810.0
    assert "times_unrecorded" not in p

    # everything ran now: one code, the elapsed time
    p = study.cell_provenance(["train", "eval"], {"train": 100.0, "eval": 50.0}, {}, now, elapsed=155.0)
    assert p == {"times": {"train_s": 100.0, "eval_s": 50.0}, "wall_s": 155.0, "code": "git new"}

    # cached with no stage log (a sitting whose record was lost): said, not guessed
    p = study.cell_provenance(["train", "eval", "exposure_bias"], {}, {}, now, elapsed=7.0)
    assert p["code"] == "unrecorded" and p["times_unrecorded"] == ["train", "eval", "exposure_bias"]
    assert p["wall_s"] == 7.0


def test_cells_with_unrecorded_times_do_not_set_the_time_estimates(study):
    s = dict(study.STUDY_SCALES[SMOKE])
    fast = _cell(study, s, "GKD", 1)
    fast.update(wall_s=6.0, times_unrecorded=["train"])
    est = study.refined_estimates(s, [("GKD", 2)], {"GKD__seed1": fast})
    assert est["GKD__seed2"] == pytest.approx(study.estimate_cell_minutes(s, study.study_labels(s)["GKD"]))
    fast.pop("times_unrecorded")
    assert study.refined_estimates(s, [("GKD", 2)], {"GKD__seed1": fast})["GKD__seed2"] == pytest.approx(0.1)


def test_sitting_stops_starting_cells_past_the_budget_and_survives_a_failure(study):
    import time

    calls = []

    def fake(cid):
        calls.append(cid)
        if cid == "bad":
            raise RuntimeError("boom")

    est = {"bad": 1.0, "a": 1.0, "long": 500.0, "b": 1.0}
    done, failed, left = study.run_sitting(list(est), est, {c: (c,) for c in est}, fake, workers=1, threads=0,
                                           budget_min=30, t_start=time.perf_counter())
    assert failed == ["bad"] and done == ["a", "b"] and left == ["long"]
    assert "long" not in calls


def test_after_adopting_a_new_init_old_cells_are_archived_and_rerun(study, tmp_path):
    s = dict(study.STUDY_SCALES[SMOKE])
    d = tmp_path / "study"
    _write(study, d, _cell(study, s, "GKD", 1, init_hash="old"))
    _write(study, d, _cell(study, s, "KD", 1, init_hash="new"))
    cells = study.load_cells(d)
    status = study.classify_cells(cells, s, "new")
    assert status == {"GKD__seed1": "other-init", "KD__seed1": "ok"}
    pending = study.pending_cells(["GKD__seed1", "KD__seed1"], status)
    assert pending == ["GKD__seed1"]
    moved = study.archive_other_init(d, cells, status, pending)
    assert [p.name for p in moved] == ["GKD__seed1__initold.json"]
    assert list(study.load_cells(d)) == ["KD__seed1"]
    study.build_report(d, s, SMOKE)
    assert "archived in `cells_other_init/`" in (d / "README.md").read_text()


def test_init_hash_check(study):
    assert study.check_init(None, "abc", False)[0] == "record"
    assert study.check_init({"hash": "abc"}, "abc", False)[0] == "ok"
    action, msg = study.check_init({"hash": "abc"}, "def", False)
    assert action == "refuse" and "INIT MISMATCH" in msg and "--adopt-init" in msg
    action, msg = study.check_init({"hash": "abc", "code": "git 2d0f2f9"}, "def", False)
    assert action == "refuse" and "git worktree add DIR 2d0f2f9" in msg  # how to rebuild it bit for bit


def test_a_missing_init_is_built_with_the_code_of_the_revision_that_built_it(study, tmp_path, monkeypatch):
    rec = {"hash": "abc", "code": "git 2d0f2f9"}
    assert study.init_build_revision(rec, "git 8f34e09") == "2d0f2f9"
    assert study.init_build_revision(rec, "git 2d0f2f9") is None  # the current code builds it
    assert study.init_build_revision(rec, "git 2d0f2f9 with uncommitted changes") is None
    assert study.init_build_revision({"hash": "abc", "code": "git cc01f1c with uncommitted changes"}, "git 1") is None
    assert study.init_build_revision(None, "git 8f34e09") is None  # the first sitting records its own
    calls = []
    paths = study.Paths(study_dir=tmp_path / "results", cache=tmp_path / "cache", data_dir=tmp_path / "data",
                        init_run=tmp_path / "cache" / "runs" / "init-x")

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        if "reproduce.py" in " ".join(map(str, cmd)):  # the old revision's sitting builds the init
            assert kw["env"]["PYTHONPATH"] == str(Path(kw["cwd"]) / "src")
            (paths.init_model).mkdir(parents=True)
            (paths.init_model / "model.safetensors").write_bytes(b"w")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(study.subprocess, "run", fake_run)
    study.build_init_at_revision("2d0f2f9", "cpu2", paths)
    (add, _), (sitting, kw), (remove, _) = calls
    assert add[-1] == "2d0f2f9" and "add" in add and "remove" in remove
    assert sitting[sitting.index("--cache-dir") + 1] == str(paths.cache)  # into this study's cache
    assert sitting[sitting.index("--scale") + 1] == "cpu2" and "--max-minutes" in sitting  # no cell starts
    calls.clear()
    (paths.init_model / "model.safetensors").unlink()
    monkeypatch.setattr(study.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", ""))
    with pytest.raises(RuntimeError, match="left no"):
        study.build_init_at_revision("2d0f2f9", "cpu2", paths)
    assert study.check_init({"hash": "abc"}, "def", True)[0] == "adopt"


def test_cells_from_another_init_are_excluded_from_the_statistics(study, tmp_path):
    s = dict(study.STUDY_SCALES[SMOKE])
    d = tmp_path / "study"
    study.atomic_write_json(d / "init.json", {"hash": "h0", "dev_loss": 3.5, "exaccerr_step0": [-1.0, -2.0]})
    _write(study, d, _cell(study, s, "PromptKD", 1, shift=1.0))
    _write(study, d, _cell(study, s, "GKD", 1))
    _write(study, d, _cell(study, s, "PromptKD", 2, shift=50.0, init_hash="other"))
    _write(study, d, _cell(study, s, "GKD", 2, init_hash="other"))
    assert study.classify_cells(study.load_cells(d), s, "h0")["PromptKD__seed2"] == "other-init"
    study.build_report(d, s, SMOKE)
    text = (d / "README.md").read_text()
    assert "cells trained from ANOTHER init" in text and "PromptKD__seed2" in text
    summary = json.loads((d / "summary.json").read_text())
    r = summary["paired"]["PromptKD - GKD"]
    assert r["seeds"] == [1] and r["mean"] == pytest.approx(1.0)  # seed 2 (shift 50) is not used
    assert r["p"] is None and r["verdict"] == "unresolved"  # one seed pair: no test


def test_report_from_partial_cells(study, tmp_path):
    s = dict(study.STUDY_SCALES[SMOKE])
    d = tmp_path / "study"
    study.atomic_write_json(d / "init.json", {"hash": "h0", "dev_loss": 3.5, "wall_s": 30.0,
                                              "exaccerr_step0": [-1.0, -2.0]})
    for sd in (1, 2):
        _write(study, d, _cell(study, s, "PromptKD", sd, shift=0.3 + 0.2 * sd))
        _write(study, d, _cell(study, s, "GKD", sd))
    guard = _cell(study, s, "PromptKD-lr1e-3-guard", 1, shift=-2.0)
    guard["times_unrecorded"] = ["eval", "exposure_bias"]
    _write(study, d, guard)
    _write(study, d, _cell(study, s, "Init", 0, shift=-3.0))
    (d / "sittings.jsonl").write_text(json.dumps({"wall_s": 120.0, "finished": ["x"], "code": "git abc"}) + "\n")
    out = study.build_report(d, s, SMOKE)
    text = out.read_text()
    assert "cells finished: 6 of 18 planned; not yet run:" in text and "KD__seed1" in text
    # two seed pairs, +0.5 and +0.7: a t-test with 1 df, p 0.105
    assert "| PromptKD | GKD | 2 | +0.50, +0.70 | +0.60 | -0.67 to +1.87 | 0.105 | 0.105 | unresolved | 2/2 |" in text
    assert "95% t-interval of the mean paired difference over 2 training seeds (1 df)" in text
    assert "| PromptKD | KD | 0 |" in text and "not available (an arm has no cell yet)" in text
    assert "| PromptKD-lr1e-3-guard | GKD | 1 | -2.00 | -2.00 |  |  |  | unresolved (no test: 1 seed pair) | 1/1 |" in text
    assert "A comparison with fewer than 2 seed pairs has no test and no interval." in text
    assert "| PromptKD-lr1e-3-guard | 1e-3 | max_drift 0.1 | 1/1 |" in text
    # drift: first-10 mean -> last-10 mean (max); kl_to_student likewise; 4 steps frozen; collapse
    assert "| 0.050 -> 0.400 (0.900) | 1.900 -> 0.300 | 4 | yes |" in text
    assert "## Exposure bias through training" in text
    for png in ("training_curves.png", "paired_differences.png", "exposure_bias.png", "drift.png"):
        assert (d / png).stat().st_size > 1000
        assert f"]({png})" in text
    assert "(cells 6 min, summed over cells" in text and "init 0.5 min" in text  # 6 cells x 60 s, init 30 s
    assert "1 sitting(s), 2 min of sitting wall clock" in text
    assert "not in these totals: the time of PromptKD-lr1e-3-guard__seed1 (eval, exposure_bias)" in text


def test_atomic_cell_write_leaves_no_partial_file(study, tmp_path):
    study.atomic_write_json(tmp_path / "cells" / "A__seed1.json", {"x": 1})
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["A__seed1.json"]
    (tmp_path / "cells" / "broken__seed1.json").write_text("{not json")
    assert list(study.load_cells(tmp_path)) == ["A__seed1"]


def test_per_prompt_scores_keep_a_prediction_with_a_unicode_line_separator(study, tmp_path):
    rows = [{"instruction": "a", "input": "", "prediction": "one\u2028two \x85 three", "references": ["one two three"]},
            {"instruction": "b", "input": "", "prediction": "x", "references": ["x"]}]
    (tmp_path / "predictions_dolly_seed10.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    scores, _ = study.per_prompt_scores(tmp_path, "dolly", 10)
    assert len(scores) == 2 and scores[1] == 100.0


def test_a_guard_that_never_acted_is_reported_as_an_a_a_control(study, cpu2):
    """PromptKD-guard with no frozen step ran PromptKD's algorithm: the report gives the per-seed
    difference, both code revisions and where the training curves part; a guard that acted is no
    control and gets no line."""
    labels = study.study_labels(cpu2)
    base = {sd: _cell(study, cpu2, "PromptKD", sd) for sd in (1, 2)}
    guard = {sd: _cell(study, cpu2, "PromptKD-guard", sd, shift=0.25 * (sd - 1)) for sd in (1, 2)}
    for rec in guard.values():
        rec["curves"]["prompt/frozen_by_guard"] = [[t, 0.0] for t, _ in rec["curves"]["prompt/frozen_by_guard"]]
        rec["code"] = "git new"
    guard[2]["curves"]["student/loss"] = [[1, 2.0], [2, 1.6], [3, 1.2]]
    lines = study.guard_control_lines(cpu2, labels, {"PromptKD": base, "PromptKD-guard": guard})
    text = " ".join(lines)
    assert "PromptKD-guard never froze its prompt" in text
    assert "seed 1: +0.00 (PromptKD-guard on git new, PromptKD on git abc; identical training curves)" in text
    assert "seed 2: +0.25 (PromptKD-guard on git new, PromptKD on git abc; curves differ from step 2)" in text
    guard[1]["curves"]["prompt/frozen_by_guard"][5][1] = 1.0
    assert study.guard_control_lines(cpu2, labels, {"PromptKD": base, "PromptKD-guard": guard}) == []


def test_report_verdicts_are_holm_adjusted_paired_t_tests_and_integrity_is_read_from_the_cells(study, cpu2, tmp_path):
    """Four comparisons with cells (PromptKD against GKD, KD, SFT, SeqKD), 3 seeds each. Holm over
    the four: the two strong differences are called (worse, better); SFT's raw p < 0.05 does not
    survive; no comparison is "equivalent" (no margin). The integrity section reports the code
    states, the pairs on one clean revision, the seed-1 overlap with the init and the evaluation seed."""
    from scipy import stats

    from promptkd.compare.stats import describe_interval

    d = tmp_path / "study"
    study.atomic_write_json(d / "init.json", {"hash": "h0", "dev_loss": 3.5, "exaccerr_step0": [-1.0, -2.0],
                                              "config": {"max_steps": 80, "batch_size": 8, "seed": 1}})
    differences = {"GKD": (-1.0, -1.1, -0.9), "KD": (1.0, 1.2, 0.8), "SFT": (0.5, 0.25, 0.4), "SeqKD": (0.5, 0.1, 0.3)}
    for sd in (1, 2, 3):
        _write(study, d, _cell(study, cpu2, "PromptKD", sd))
        for name, diff in differences.items():
            code = "git bbb with uncommitted changes" if (name, sd) == ("GKD", 2) else "git abc"
            _write(study, d, _cell(study, cpu2, name, sd, shift=-diff[sd - 1], code=code))
    text = study.build_report(d, cpu2, "cpu2").read_text()
    summary = json.loads((d / "summary.json").read_text())["paired"]
    assert set(summary) == {f"PromptKD - {b}" for b in differences}
    raw = {b: stats.ttest_1samp(diff, 0.0).pvalue for b, diff in differences.items()}
    ranked = sorted(raw, key=raw.get)  # GKD, KD, SFT, SeqKD
    assert ranked == ["GKD", "KD", "SFT", "SeqKD"]
    holm = {b: min(1.0, max((4 - j) * raw[ranked[j]] for j in range(k + 1))) for k, b in enumerate(ranked)}
    for b in differences:
        r = summary[f"PromptKD - {b}"]
        assert r["p"] == pytest.approx(raw[b]) and r["p_holm"] == pytest.approx(holm[b])
        assert r["differences"] == pytest.approx(list(differences[b]))
    assert raw["SFT"] < 0.05 < holm["SFT"]
    verdicts = {b: summary[f"PromptKD - {b}"]["verdict"] for b in differences}
    assert verdicts == {"GKD": "worse", "KD": "better", "SFT": "unresolved", "SeqKD": "unresolved"}
    assert "no comparison can be called equivalent" in text and "| equivalent |" not in text
    assert "over all 4 comparisons of this report" in text
    assert describe_interval(0.05, 3) in text
    assert "**2 of 4 comparisons differ after Holm's adjustment** (PromptKD worse than GKD, PromptKD better than KD)" in text
    assert "| PromptKD | SFT | 3 | +0.50, +0.25, +0.40 | +0.38 |" in text
    assert f"| {study.fmt_p(raw['SFT'])} | {study.fmt_p(holm['SFT'])} | unresolved | 3/3 |" in text
    assert "| PromptKD | GKD | 3 | -1.00, -1.10, -0.90 | -1.00 |" in text and "| worse | 2/3 |" in text
    assert "| PromptKD | MiniLLM | 0 |" in text  # no MiniLLM cell: not tested, not in Holm's family
    # integrity
    integrity = text[text.index("## Integrity"):text.index("## Paired comparisons")]
    assert ("The 15 cells ran on 2 code states (2 commits; table below); 1 state had uncommitted changes or no "
            "record, so git cannot restore the code of 1 cell.") in integrity
    assert "| git abc | 14 | no |" in integrity and "| git bbb with uncommitted changes | 1 | yes | GKD__seed2 |" in integrity
    assert "Of the 12 seed pairs in the 4 comparisons, 11 ran both cells on one clean revision" in integrity
    assert ("The init's SFT took the first 640 examples (80 steps x batch 8) of training seed 1's order" in integrity
            and "first 640 (160 steps x batch 4) of the same order" in integrity)
    assert "So the 5 seed-1 cells train on 640 examples the init was fitted to" in integrity
    assert "evaluation seed 10 only" in integrity and "same prompts (one prompts hash per set)" in integrity
    assert "These confound the comparison" in integrity and study.SUCCESSOR in integrity


def test_integrity_names_cells_evaluated_on_other_prompts(study, cpu2):
    ok = {f"GKD__seed{sd}": _cell(study, cpu2, "GKD", sd) for sd in (1, 2)}
    ok["GKD__seed2"]["prompts_hash"]["vicuna"] = "other"
    lines = study.integrity_section(cpu2, {}, ok, study.study_labels(cpu2), {}, [], {})
    assert any("different prompts in Vicuna" in x for x in lines)
    assert not any("Seed 1 re-trains" in x for x in lines)  # init.json without its config: not claimed
