"""`promptkd compare`: the config's errors, integrity, sittings (skip, resume, budget), the report,
and a 2-arm x 2-seed study on tiny models end to end."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from promptkd.cli import main
from promptkd.compare import runner
from promptkd.compare.config import load_compare_config
from promptkd.compare.report import build_report, write_json
from promptkd.errors import ConfigError, UserError
from promptkd.precision import machine_description
from promptkd.training import console

CLEAN = {"revision": "abc1234", "source": "tree1", "dirty": False, "promptkd": "0.1.0"}
EVAL_RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "hello there"},
    {"instruction": "Name a colour.", "input": "", "output": "blue"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    # any one-character word matches one of these references: random tiny models score above 0
    {"instruction": "Write one character.", "input": "", "outputs": list("abcdefghijklmnopqrstuvwxyz0123456789")},
]


def write_study(tmp_path, teacher, student, train, **changes) -> Path:
    evals = tmp_path / "data" / "tiny_eval.jsonl"
    evals.parent.mkdir(parents=True, exist_ok=True)
    evals.write_text("".join(json.dumps(r) + "\n" for r in EVAL_RECORDS), encoding="utf-8")
    study = {
        "name": "tiny", "results": str(tmp_path / "results"), "runs": str(tmp_path / "runs"),
        "base": {"model": {"teacher": str(teacher), "student": str(student)},
                 "data": {"train": str(train), "max_prompt_length": 256, "max_length": 300},
                 "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 0.01, "warmup_steps": 0,
                           "save_every_minutes": 0},
                 "sampling": {"max_new_tokens": 3}},
        "arms": [{"name": "PromptKD", "method": "promptkd"},
                 {"name": "GKD", "method": "gkd", "overrides": {"gkd": {"lmbda": 1.0, "beta": 1.0}}}],
        "seeds": [1, 2], "baseline": "GKD",
        "evaluation": {"datasets": [{"tiny": str(evals)}], "seeds": [10, 20], "max_new_tokens": 6, "batch_size": 4},
        **changes,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def study(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    monkeypatch.setattr(runner, "code_revision", lambda: dict(CLEAN))
    return write_study(tmp_path, *tiny_pair_dirs, tiny_jsonl)


def fake_cell(cfg, arm: str, seed: int, score: float, seconds: float = 60.0, **extra) -> None:
    """A cell file as run_cell writes it, with made-up numbers."""
    arms = {a.name: a for a in cfg.arm_list()}
    cell = {"arm": arm, "seed": seed, "method": arms[arm].method, "overrides": arms[arm].overrides,
            "cell_hash": cfg.cell_hash(arms[arm], seed), "revision": CLEAN["revision"], "revision_mismatch": False,
            "versions": {"promptkd": "0.1.0", "torch": "2", "transformers": "4"}, "seconds": {"train": seconds, "eval": 0.0},
            "eval_deviations": [], "score": score,
            "sets": {"tiny": {"mean": score, "per_seed": {"10": score}, "per_prompt": [score] * 3}},
            "trained_tokens": 100, "generated_tokens": 10, "compute": {}, "traces": {}, **extra}
    write_json(Path(cfg.results) / "cells" / f"{arm}__seed{seed}.json", cell)


# ----------------------------------------------------------------------------- config


def edit(study: Path, **changes) -> dict:
    data = {**yaml.safe_load(study.read_text()), **changes}
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def test_config_errors_name_the_file_and_every_bad_key(study):
    data = yaml.safe_load(study.read_text())
    data["arms"][1]["overrides"] = {"gkd": {"lmbdaa": 1.0}}
    edit(study, seed=data.pop("seeds"), arms=data["arms"], baseline="GKDD")
    with pytest.raises(ConfigError) as e:
        load_compare_config(study)
    assert str(study) in str(e.value)
    assert e.value.problems == ["unknown key 'seed'; did you mean 'seeds'?"]  # keys and types first
    data = yaml.safe_load(study.read_text())
    data["seeds"] = data.pop("seed")
    study.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_compare_config(study)
    assert e.value.problems == ["'baseline' = 'GKDD' is not an arm; arms: PromptKD, GKD"]
    edit(study, baseline="GKD")
    with pytest.raises(ConfigError) as e:  # an arm's train config goes through promptkd's validation
        load_compare_config(study)
    assert e.value.problems == ["arm 'GKD': unknown key 'gkd.lmbdaa'; did you mean 'gkd.lmbda'?"]


def test_duplicate_arm_bad_seqkd_and_keys_the_study_sets_are_refused(study):
    data = yaml.safe_load(study.read_text())
    data["arms"] += [{"name": "GKD", "method": "gkd"},
                     {"name": "SeqKD", "method": "seqkd", "overrides": {"data": {"max_train_examples": 8}}},
                     {"name": "x__y", "method": "kd", "overrides": {"train": {"seed": 3}}}]
    data["base"]["train"]["output_dir"] = "runs/x"
    study.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_compare_config(study, check_arms=False)
    text = "\n".join(e.value.problems)
    assert "arm name 'GKD' is used by 2 arms" in text
    assert "arm 'SeqKD': data.max_train_examples with method seqkd would cut its teacher responses" in text
    assert "'arms[4].name' = 'x__y'" in text
    assert "'arms[4].overrides.train.seed' is set by the study" in text
    assert "'base.train.output_dir' is set by the study" in text


def test_an_init_trained_with_a_study_seed_on_the_same_data_is_refused(study, tmp_path):
    init = tmp_path / "init" / "final" / "student"
    init.mkdir(parents=True)
    data = yaml.safe_load(study.read_text())
    (tmp_path / "init" / "config.yaml").write_text(yaml.safe_dump(
        {"train": {"seed": 2}, "data": {"train": data["base"]["data"]["train"]}}))
    data["base"]["model"]["student"] = str(init)
    study.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="trained by promptkd with train.seed 2 on the same data.train"):
        load_compare_config(study)
    data["seeds"] = [3, 4]
    study.write_text(yaml.safe_dump(data))
    load_compare_config(study)


def test_shipped_example_loads():
    cfg = load_compare_config(Path(__file__).parents[1] / "configs" / "compare" / "example.yaml")
    assert cfg.pairs() == [("PromptKD", "GKD"), ("ABKD", "GKD")]


# ----------------------------------------------------------------------------- integrity


def test_another_revision_or_a_dirty_tree_is_refused_unless_allowed(study, monkeypatch):
    cfg = load_compare_config(study)
    assert runner.check_revision(cfg, allow=False) == ("abc1234", False)  # writes study.json at the first cell
    recorded = json.loads((Path(cfg.results) / "study.json").read_text())
    assert recorded == {**{k: CLEAN[k] for k in ("revision", "source", "promptkd")}, "config_hash": cfg.config_hash()}
    # a later commit that leaves src/ as it was (docs, results) is the same code
    monkeypatch.setattr(runner, "code_revision", lambda: {**CLEAN, "revision": "bcd2345"})
    assert runner.check_revision(cfg, allow=False) == ("bcd2345", False)
    monkeypatch.setattr(runner, "code_revision", lambda: {**CLEAN, "revision": "def5678", "source": "tree2"})
    with pytest.raises(UserError, match="revision abc1234 .* this code is revision def5678") as e:
        runner.check_revision(cfg, allow=False)
    assert "--allow-revision" in e.value.cli
    assert runner.check_revision(cfg, allow=True) == ("def5678", True)
    monkeypatch.setattr(runner, "code_revision", lambda: {**CLEAN, "dirty": True})
    with pytest.raises(UserError, match="uncommitted changes under src/"):
        runner.check_revision(cfg, allow=False)
    assert runner.check_revision(cfg, allow=True) == ("abc1234 with uncommitted changes under src/", True)


def test_an_installed_promptkd_outside_git_runs_a_study_on_its_version(tmp_path, tiny_pair_dirs, tiny_jsonl,
                                                                        monkeypatch):
    """A pip install has no git checkout: the study records revision and source "unknown" and
    compares the promptkd version."""
    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(runner.subprocess, "run", no_git)
    here = runner.code_revision()
    assert {k: here[k] for k in ("revision", "source", "dirty")} == {"revision": "unknown", "source": "unknown",
                                                                        "dirty": False}
    monkeypatch.setattr(runner, "code_revision", lambda: dict(here))
    cfg = load_compare_config(write_study(tmp_path, *tiny_pair_dirs, tiny_jsonl))
    assert runner.check_revision(cfg, allow=False) == ("unknown", False)
    assert runner.check_revision(cfg, allow=False) == ("unknown", False)  # against the study.json it wrote
    monkeypatch.setattr(runner, "code_revision", lambda: {**here, "promptkd": "0.2.0"})
    with pytest.raises(UserError, match=re.escape(f"(promptkd {here['promptkd']}, ") + r".*\(promptkd 0\.2\.0\)"):
        runner.check_revision(cfg, allow=False)


def test_allowed_cells_from_another_revision_are_marked_in_the_report(study, monkeypatch):
    cfg = load_compare_config(study)
    runner.check_revision(cfg, allow=False)
    monkeypatch.setattr(runner, "code_revision", lambda: {**CLEAN, "revision": "def5678", "source": "tree2"})
    seen = []
    monkeypatch.setattr(runner, "run_cell", lambda cfg, arm, seed, **kw: seen.append(
        (kw["revision"], kw["revision_mismatch"])))
    with pytest.raises(UserError):
        runner.run_study(cfg, cells=["GKD__seed1"])
    runner.run_study(cfg, cells=["GKD__seed1"], allow_revision=True)
    assert seen == [("def5678", True)]
    fake_cell(cfg, "GKD", 1, 5.0, revision="def5678", revision_mismatch=True)
    report = build_report(cfg).read_text()
    assert "| GKD | – | 5.00† |" not in report and "| GKD | 5.00† | – |" in report
    assert "marked †: GKD__seed1 (def5678)" in report


# ----------------------------------------------------------------------------- sittings


def test_sittings_skip_done_cells_run_seed_major_and_respect_the_budget(study, monkeypatch):
    cfg = load_compare_config(study)
    calls = []
    monkeypatch.setattr(runner, "run_cell", lambda cfg, arm, seed, **kw: calls.append(f"{arm.name}__seed{seed}"))
    fake_cell(cfg, "GKD", 1, 5.0, seconds=600)  # done: never re-run
    assert runner.run_study(cfg, max_minutes=5) == []  # estimate 10 min (the GKD cell) > 5: nothing starts
    assert calls == []
    assert runner.run_study(cfg, max_minutes=60) == ["PromptKD__seed1", "PromptKD__seed2", "GKD__seed2"]
    assert calls == ["PromptKD__seed1", "PromptKD__seed2", "GKD__seed2"]  # seed-major order

    calls.clear()
    (Path(cfg.results) / "cells" / "GKD__seed1.json").unlink()  # no finished cell: rough estimates, 6.7 and 4.2 s
    assert runner.run_study(cfg, max_minutes=0.1) == []
    assert len(runner.run_study(cfg, max_minutes=0.2)) == 4
    with pytest.raises(UserError, match="unknown cell"):
        runner.run_study(cfg, cells=["KD__seed1"])


# ----------------------------------------------------------------------------- report


def test_report_lists_missing_cells_and_leaves_n_below_2_unresolved(study):
    cfg = load_compare_config(study)
    fake_cell(cfg, "PromptKD", 1, 6.0)
    fake_cell(cfg, "PromptKD", 2, 6.5)
    fake_cell(cfg, "GKD", 1, 5.0)
    report = build_report(cfg).read_text()
    assert "| PromptKD − GKD | 1 | s1 +1.00 | +1.00 | [n/a, n/a] | n/a | n/a | unresolved (n < 2) |" in report
    assert "## Missing cells\n\nGKD__seed2\n" in report
    assert "over the report's 0 tested comparison(s)" in report  # the one row has no test
    # the tiny file is not one of the protocol's sets: the report says so from the config
    assert "sets dolly, selfinst, vicuna, sinst, uinst not evaluated" in report and "outside the protocol: tiny (" in report
    assert "| GKD | gkd, gkd.lmbda 1.0, gkd.beta 1.0 | 1 | 5.00 [n/a, n/a] |" in report
    assert "No equivalence margin is declared" in report
    assert build_report(cfg).read_text() == report


def test_report_verdicts_with_a_margin(study):
    edit(study, seeds=[1, 2, 3, 4], margin=1.0)
    cfg = load_compare_config(study, check_arms=False)
    for seed, (a, b) in enumerate([(6.0, 6.1), (6.2, 6.2), (6.1, 6.0), (6.0, 6.05)], start=1):
        fake_cell(cfg, "PromptKD", seed, a)
        fake_cell(cfg, "GKD", seed, b)
    report = build_report(cfg).read_text()
    assert "TOST p (Holm)" in report and "| equivalent |" in report
    assert "declared margin ±1 ROUGE-L points" in report


# ----------------------------------------------------------------------------- end to end


def test_two_arms_two_seeds_end_to_end_resume_and_report_only(study, monkeypatch, capsys):
    args = ["compare", "--config", str(study), "--no-progress"]
    # a signal during the first cell's training: it checkpoints, and the next sitting resumes it
    monkeypatch.setattr(console.StopSignals, "__enter__", lambda self: setattr(self, "signum", signal.SIGTERM) or self)
    assert main(args) == 143
    assert "PromptKD__seed1: stopped by SIGTERM" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(runner, "code_revision", lambda: dict(CLEAN))
    assert main(args) == 0
    results = study.parent / "results"
    assert sorted(p.name for p in (results / "cells").iterdir()) == [
        "GKD__seed1.json", "GKD__seed2.json", "PromptKD__seed1.json", "PromptKD__seed2.json"]
    run = study.parent / "runs" / "PromptKD__seed1"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / "checkpoints").exists() and (run / "final" / "student").is_dir()

    cell = json.loads((results / "cells" / "PromptKD__seed1.json").read_text())
    assert (cell["arm"], cell["seed"], cell["method"], cell["revision"]) == ("PromptKD", 1, "promptkd", "abc1234")
    assert cell["train_config"]["train"]["seed"] == 1 and cell["train_config"]["train"]["max_steps"] == 2
    assert set(cell["sets"]["tiny"]["per_seed"]) == {"10", "20"} and len(cell["sets"]["tiny"]["per_prompt"]) == 4
    assert cell["score"] == pytest.approx(cell["sets"]["tiny"]["mean"])
    assert cell["seconds"]["train"] > 0 and cell["seconds"]["eval"] > 0 and cell["trained_tokens"] > 0
    assert [s for s, _ in cell["traces"]["prompt/drift"]] == [1, 2]
    assert "sampling.max_new_tokens 6 (protocol: 256)" in cell["eval_deviations"]

    report = (results / "report.md").read_text()
    assert "| PromptKD − GKD | 2 |" in report and "![Paired differences](paired_differences.png)" in report
    (results / "report.md").unlink()
    assert main(["compare", "--config", str(study), "--report-only"]) == 0
    assert (results / "report.md").read_text() == report
    capsys.readouterr()
    assert main(args) == 0 and "nothing to run" in capsys.readouterr().out


@pytest.mark.slow
def test_the_report_needs_neither_models_nor_torch(study):
    cfg = load_compare_config(study)
    fake_cell(cfg, "PromptKD", 1, 6.0)
    fake_cell(cfg, "GKD", 1, 5.0)
    report = build_report(cfg).read_text()
    (Path(cfg.results) / "report.md").unlink()
    # (the CLI's parser imports promptkd.config, and with it torch; the library path does not)
    code = ("import sys; from promptkd.compare.config import load_compare_config; from promptkd.compare.report "
            "import build_report; build_report(load_compare_config(sys.argv[1], check_arms=False)); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(study)], check=True, capture_output=True)
    assert (Path(cfg.results) / "report.md").read_text() == report


@pytest.mark.slow
def test_workers_run_cells_in_processes_of_their_own(study):
    """Two cells at once, each a `promptkd compare --cells ONE` process. The processes see the real
    revision, not this test's, so they run with --allow-revision and their cells are marked."""
    assert main(["compare", "--config", str(study), "--workers", "2", "--cells", "PromptKD__seed1,GKD__seed1",
                 "--allow-revision", "--no-progress"]) == 0
    cells = sorted((study.parent / "results" / "cells").iterdir())
    assert [p.name for p in cells] == ["GKD__seed1.json", "PromptKD__seed1.json"]
    assert all(json.loads(p.read_text())["revision_mismatch"] for p in cells)
    assert "GKD__seed1: starting" in (study.parent / "runs" / "GKD__seed1" / "compare.log").read_text()


@pytest.mark.slow
def test_a_cell_under_a_two_process_launch_trains_on_both_and_is_written_once(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """`torchrun --nproc_per_node 2 -m promptkd.cli compare --cells ONE`: both processes train the
    cell (the run's world size is 2), the main process alone evaluates and writes the cell file;
    more than one cell under such a launch is refused."""
    from launch import env

    study = write_study(tmp_path, *tiny_pair_dirs, tiny_jsonl)
    data = yaml.safe_load(study.read_text())
    data["base"]["train"]["cpu"] = True  # gloo on CPU (without it accelerate gives each rank a run of its own)
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "promptkd.cli", "compare", "--config", str(study), "--allow-revision", "--no-progress"]
    refused = subprocess.run(torchrun, env=env(), capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "a sitting runs one cell" in refused.stderr
    done = subprocess.run([*torchrun, "--cells", "PromptKD__seed1"], env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("PromptKD__seed1: starting") == 1  # said once, by the main process
    cells = list((study.parent / "results" / "cells").iterdir())
    assert [p.name for p in cells] == ["PromptKD__seed1.json"]
    cell = json.loads(cells[0].read_text())
    assert cell["processes"] == 2 and set(cell["sets"]["tiny"]["per_seed"]) == {"10", "20"}  # the trainer's count
    run = study.parent / "runs" / "PromptKD__seed1"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "times.json").read_text())["train"] > 0


def test_a_seqkd_cell_trains_on_teacher_responses_to_the_prompts_the_other_arms_read(
        tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """SeqKD's cell generates its training data first: the teacher's responses to exactly the
    prompts GKD's cell reads with the same seed, step by step (data.train has prompts the trainer
    drops, so the order must be taken over the kept ones), and records the generation's compute."""
    from promptkd.compare.seqkd import generate_teacher_responses
    from promptkd.config import Config
    from promptkd.training.loop import Trainer

    monkeypatch.setattr(runner, "code_revision", lambda: dict(CLEAN))
    train = tmp_path / "data" / "train_with_long.jsonl"
    long = json.dumps({"instruction": "x" * 300, "input": "", "output": "y"}) + "\n"
    lines = tiny_jsonl.read_text().splitlines(keepends=True)
    train.write_text("".join(long + line for line in lines[:6]) + "".join(lines[6:]))
    study = write_study(tmp_path, *tiny_pair_dirs, train, seeds=[3],
                        arms=[{"name": "GKD", "method": "gkd"}, {"name": "SeqKD", "method": "seqkd"}])
    edit(study, evaluation={**yaml.safe_load(study.read_text())["evaluation"], "seeds": [10]})
    prompts = {}  # method -> the prompts of every optimizer step
    next_micro_batches = Trainer.next_micro_batches

    def record(self):
        micro_batches = next_micro_batches(self)
        prompts.setdefault(self.cfg.method, []).append([e.prompt_ids for mb in micro_batches for e in mb])
        return micro_batches

    monkeypatch.setattr(Trainer, "next_micro_batches", record)
    assert main(["compare", "--config", str(study), "--no-progress"]) == 0
    assert len(prompts["gkd"]) == 2 and prompts["seqkd"] == prompts["gkd"]

    results, run = tmp_path / "results", tmp_path / "runs" / "SeqKD__seed3"
    cell = json.loads((results / "cells" / "SeqKD__seed3.json").read_text())
    assert cell["train_config"]["data"]["teacher_responses"] == str(run / "teacher_responses.jsonl")
    responses = [json.loads(x) for x in (run / "teacher_responses.jsonl").read_text().splitlines()]
    assert len(responses) == 4 and all("ended" in r for r in responses)
    c = cell["compute"]
    assert cell["seconds"]["generation"] > 0 and c["compute/teacher_generation_generated_tokens"] > 0
    n_teacher = json.loads((tmp_path / "runs" / "GKD__seed3" / "precision.json").read_text())["matmul_params"]["teacher"]
    assert c["compute/teacher_generation_flops"] == 2 * n_teacher * c["compute/teacher_generation_forward_tokens"]
    report = (results / "report.md").read_text()
    compute_rows = report.split("## Compute")[1].split("\n\n")[1].splitlines()
    row = next(line.split(" | ") for line in compute_rows if line.startswith("| SeqKD |"))
    assert row[2] == f"{c['compute/generated_tokens'] + c['compute/teacher_generation_generated_tokens']:,.0f}"
    assert row[-1] == f"{c['compute/flops'] + c['compute/teacher_generation_flops']:,.0f} |"
    assert "teacher generation of its training responses is added in" in report

    # resumable: a generation cut after its first batch continues into the same file
    full = (run / "teacher_responses.jsonl").read_text()
    (run / "teacher_responses.jsonl").write_text("".join(full.splitlines(keepends=True)[:2]))
    counts = {}
    cfg = load_compare_config(study)
    generate_teacher_responses(Config.from_dict(cfg.cell_config(cfg.arm_list()[1], 3, run)), run, counts, False)
    assert (run / "teacher_responses.jsonl").read_text() == full
    assert 0 < counts["forward_tokens"] < c["compute/teacher_generation_forward_tokens"]


def test_the_score_against_compute_plot_places_each_arm_at_its_mean_flops(study):
    """Each arm's point: the mean of its cells' FLOPs (a SeqKD cell's teacher generation added) and
    its mean score with the t-interval; cells that logged no FLOPs are left out, and without any
    FLOPs there is no plot."""
    pytest.importorskip("matplotlib")
    from scipy import stats

    from promptkd.compare.report import read_cells, score_against_compute

    cfg = load_compare_config(study)
    results = Path(cfg.results)
    fake_cell(cfg, "GKD", 1, 5.0)
    assert "Score against compute" not in build_report(cfg).read_text()
    assert not (results / "score_vs_flops.png").exists()
    fake_cell(cfg, "PromptKD", 1, 6.0, compute={"compute/flops": 3.0e12})
    fake_cell(cfg, "PromptKD", 2, 7.0, compute={"compute/flops": 1.0e12, "compute/teacher_generation_flops": 4.0e12})
    fake_cell(cfg, "GKD", 2, 4.0, compute={"compute/flops": 2.0e12})
    by_arm = {arm: [c for c in read_cells(results).values() if c["arm"] == arm] for arm in ("PromptKD", "GKD")}
    (arm, flops, (mean, low, high), cells), (arm2, flops2, (mean2, low2, _), cells2) = score_against_compute(by_arm, 0.05)
    assert (arm, flops, mean, sorted(cells)) == ("PromptKD", 4.0e12, 6.5, [(3.0e12, 6.0), (5.0e12, 7.0)])
    half = stats.t.ppf(0.975, 1) * stats.tstd([6.0, 7.0]) / 2 ** 0.5
    assert (low, high) == pytest.approx((6.5 - half, 6.5 + half), rel=1e-12)
    assert (arm2, flops2, mean2, cells2) == ("GKD", 2.0e12, 4.0, [(2.0e12, 4.0)]) and low2 != low2  # one cell: no interval
    assert "![Score against compute](score_vs_flops.png)" in build_report(cfg).read_text()
    assert (results / "score_vs_flops.png").stat().st_size > 0


# ----------------------------------------------------------------------------- FLOPs budget

FLOPS_ARM = {"name": "GKD-F", "method": "gkd", "budget": {"flops_of": "PromptKD", "per_step_from": "GKD"}}


def test_a_flops_budget_must_name_arms_with_steps_budgets(study):
    data = yaml.safe_load(study.read_text())
    data["arms"] += [{"name": "A", "method": "gkd", "budget": {"flops_of": "PromptKD"}},
                     {"name": "B", "method": "gkd", "budget": {"flops_of": "GKD", "per_step_from": "PromptKD"},
                      "overrides": {"train": {"max_steps": 3}}},
                     {"name": "C", "method": "gkd", "budget": {"flops_of": "X", "per_step_from": "GKD"}}]
    study.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_compare_config(study, check_arms=False)
    assert e.value.problems == [
        "'arms[2].budget': give both flops_of (the arm whose FLOPs to match) and per_step_from (an arm of method "
        "'gkd' whose cells give the FLOPs per step)",
        "'arms[3].overrides.train.max_steps' is set, but arm 'B' has a FLOPs budget, which plans its steps: remove it",
        "'arms[3].budget.per_step_from' = 'PromptKD' is a promptkd arm: the FLOPs per step of arm 'B' come from an "
        "arm of its own method, gkd",
        "'arms[4].budget.flops_of' = 'X' is not another arm; arms: PromptKD, GKD, A, B, C"]
    data["arms"] = data["arms"][:2] + [FLOPS_ARM, {**FLOPS_ARM, "name": "D", "budget": {"flops_of": "GKD-F",
                                                                                         "per_step_from": "GKD"}}]
    study.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="'arms.3..budget.flops_of' = 'GKD-F' has a FLOPs budget itself"):
        load_compare_config(study, check_arms=False)


def test_flops_budget_cells_run_after_the_cells_they_are_planned_from_or_are_skipped(study, monkeypatch, capsys):
    data = edit(study, arms=yaml.safe_load(study.read_text())["arms"] + [FLOPS_ARM])
    cfg = load_compare_config(study, check_arms=False)
    assert cfg.order() == ["PromptKD__seed1", "GKD__seed1", "GKD-F__seed1", "PromptKD__seed2", "GKD__seed2",
                           "GKD-F__seed2"]
    calls = []
    monkeypatch.setattr(runner, "run_cell", lambda cfg, arm, seed, **kw: calls.append(f"{arm.name}__seed{seed}"))
    assert runner.run_study(cfg, cells=["GKD-F__seed1", "GKD__seed1"]) == ["GKD__seed1"]
    assert "GKD-F__seed1: skipped, its FLOPs budget is planned from cell(s) PromptKD__seed1" in capsys.readouterr().out

    def cell(arm, flops, steps):
        fake_cell(cfg, arm, 1, 5.0, compute={"compute/flops": flops}, train_config={"train": {"max_steps": steps}})

    cell("PromptKD", 9.0e12, 160)
    cell("GKD", 5.0e12, 160)  # f = 3.125e10 per step
    arm = cfg.arm_list()[2]
    assert runner.plan_steps(cfg, arm, 1, runner.read_cells(Path(cfg.results))) == {
        "flops_of": "PromptKD", "reference_flops": 9.0e12, "per_step_from": "GKD", "flops_per_step": 3.125e10,
        "max_steps": 288}
    cell("GKD-F", 9.1e12, 288)
    assert "| GKD-F | 288 |" in build_report(cfg).read_text()
    assert "| 1.011 |" in build_report(cfg).read_text()  # GKD-F's FLOPs / PromptKD's
    assert data["arms"][2] == FLOPS_ARM


def test_a_flops_budget_cell_trains_the_planned_steps_end_to_end(study, monkeypatch):
    data = yaml.safe_load(study.read_text())
    edit(study, arms=data["arms"] + [FLOPS_ARM], seeds=[1], evaluation={**data["evaluation"], "seeds": [10]})
    assert main(["compare", "--config", str(study), "--no-progress"]) == 0
    cells = {p.stem: json.loads(p.read_text()) for p in (study.parent / "results" / "cells").iterdir()}
    budget = cells["GKD-F__seed1"]["budget"]
    assert budget["reference_flops"] == cells["PromptKD__seed1"]["compute"]["compute/flops"]
    assert budget["flops_per_step"] == cells["GKD__seed1"]["compute"]["compute/flops"] / 2
    assert budget["max_steps"] == round(budget["reference_flops"] / budget["flops_per_step"]) > 2
    assert cells["GKD-F__seed1"]["train_config"]["train"]["max_steps"] == budget["max_steps"]
    assert budget["flops"] == cells["GKD-F__seed1"]["compute"]["compute/flops"]
    assert "FLOPs / PromptKD" in (study.parent / "results" / "report.md").read_text()


# ----------------------------------------------------------------------------- prepare stages


def test_prepare_stages_need_a_seed_outside_the_study_and_known_names(study):
    data = yaml.safe_load(study.read_text())
    data["prepare"] = {"init": {"method": "sft", "train": {"seed": 2}}, "teacher": {"method": "sft"},
                       "x": {"model": {"student": "prepare:init"}, "train": {"seed": 9, "output_dir": "o"}}}
    data["base"]["model"]["teacher"] = "prepare:teachr"
    study.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_compare_config(study, check_arms=False)
    assert [p.split(":")[0] for p in e.value.problems] == [
        "'prepare.init.train.seed' = 2", "'prepare.teacher.train.seed' = None", "'prepare.x.train.output_dir' is set by "
        "the study", "'prepare.x.model.student' = 'prepare", "'base.model.teacher' = 'prepare"]
    assert "names no prepare stage; stages: init, teacher, x" in e.value.problems[-1]


def test_prepare_stage_runs_once_is_recorded_and_its_output_is_checked(study, tiny_jsonl, monkeypatch):
    data = yaml.safe_load(study.read_text())
    student = data["base"]["model"]["student"]
    data["prepare"] = {"init": {"method": "sft", "model": {"student": student}, "data": {"train": str(tiny_jsonl)},
                                "train": {"max_steps": 2, "batch_size": 2, "seed": 7, "save_every_minutes": 0}}}
    data["base"]["model"]["student"] = "prepare:init"
    edit(study, prepare=data["prepare"], base=data["base"], seeds=[1],
         evaluation={**data["evaluation"], "seeds": [10]})
    assert main(["compare", "--config", str(study), "--no-progress"]) == 0
    results, output = study.parent / "results", study.parent / "runs" / "prepare" / "init" / "final" / "student"
    record = json.loads((results / "prepare" / "init.json").read_text())
    weights = (output / "model.safetensors").read_bytes()
    assert record["sha256"] == hashlib.sha256(weights).hexdigest() and record["revision"] == "abc1234"
    assert record["train_config"]["train"]["seed"] == 7 and record["compute"]["compute/flops"] > 0
    cell = json.loads((results / "cells" / "GKD__seed1.json").read_text())
    assert cell["train_config"]["model"]["student"] == str(output)
    assert f"output sha256 {record['sha256']}" in (results / "report.md").read_text()

    assert record["machine"] == cell["machine"] == machine_description()
    assert f"Machines: {machine_description()} (2 cells)." in (results / "report.md").read_text()

    (results / "cells" / "GKD__seed1.json").unlink()
    (output / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # another init
    with pytest.raises(UserError, match="prepare stage 'init': .* is not the output recorded in"):
        runner.run_study(load_compare_config(study))

    # the run directory lost (a new machine): trained again, it must give the recorded output
    shutil.rmtree(study.parent / "runs" / "prepare" / "init")
    changed = yaml.safe_load(study.read_text())["prepare"]
    changed["init"]["train"]["max_steps"] = 3
    edit(study, prepare=changed)  # a stage config edited since its record: refused before any training
    with pytest.raises(UserError, match=r"has no output, and the stage's config is not the one recorded in .*init.json "
                                        r"\(train.max_steps: 2 -> 3\), so training it again would not give the recorded"):
        runner.run_study(load_compare_config(study))
    assert not (study.parent / "runs" / "prepare" / "init" / "config.yaml").exists()
    edit(study, prepare=data["prepare"])
    write_json(results / "prepare" / "init.json", {**record, "sha256": "f" * 64, "machine": "another CPU"})
    with pytest.raises(UserError, match=r"trained again on this machine \(.*\), it gave sha256 .* not the ffff.* \(trained "
                                        r"on another CPU, revision abc1234\); finish the study on a machine like that one"):
        runner.run_study(load_compare_config(study))
    set_aside = output.parent.parent / "final-mismatch" / "student" / "model.safetensors"
    assert set_aside.read_bytes() == weights and not output.exists()  # the same machine repeats its training
    write_json(results / "prepare" / "init.json", record)
    assert runner.run_study(load_compare_config(study)) == ["GKD__seed1"]  # trained again: it matches
    assert (output / "model.safetensors").read_bytes() == weights
    assert not (output.parent.parent / "checkpoints").exists()
    assert json.loads((results / "prepare" / "init.json").read_text()) == record
    (results / "cells" / "GKD__seed1.json").unlink()
    (results / "prepare" / "init.json").unlink()
    with pytest.raises(UserError, match="has no record .* but cells exist"):
        runner.run_study(load_compare_config(study))


# ----------------------------------------------------------------------------- the plan and cpu3


def test_the_plan_estimates_from_finished_cells_and_packs_sittings(study, capsys):
    from promptkd.compare.plan import ROUGH, Item, sittings

    data = edit(study, arms=yaml.safe_load(study.read_text())["arms"] + [FLOPS_ARM])
    cfg = load_compare_config(study)
    fake_cell(cfg, "GKD", 1, 5.0, seconds=600)
    assert main(["compare", "--config", str(study), "--plan", "--max-minutes", "30"]) == 0
    out = capsys.readouterr().out
    assert "5 to run (5 cells, 0 prepare stages), 1 cells done; 1 worker(s), sittings of at most 30 min" in out
    assert re.search(r"GKD__seed2 +10.0 min \(measured\)", out)  # the mean of GKD's finished cells
    def rough(method):  # 2 steps of batch 2; 4 prompts x 2 seeds of 6 new tokens
        return ROUGH["step"][method] * 2 * 2 / 4 + ROUGH["eval"] * 4 * 2 * 6 / 48

    # scaled by the finished cells' time over their rough estimates: 600 s against GKD's rough
    assert re.search(rf"PromptKD__seed1 +{rough('promptkd') * 600 / rough('gkd') / 60:.1f} min \(rough\)", out)
    assert data["arms"][2] == FLOPS_ARM

    items = [Item("A", 20, True), Item("B", 30, True), Item("C", 10, True, needs=["A", "B"]), Item("D", 25, True)]
    plan = sittings(items, 45, workers=2)  # C waits for B (ends at 30); D would end at 55 > 45: a new sitting
    assert [[(i.name, start) for i, start in s] for s in plan] == [[("A", 0), ("B", 0), ("C", 30)], [("D", 0)]]
    stage = Item("prepare x", 5, False, stage=True)
    assert [(i.name, start) for i, start in sittings([stage] + items[:2], None, workers=2)[0]] == [
        ("prepare x", 0), ("A", 5), ("B", 5)]


def test_the_cpu3_study_loads():
    cfg = load_compare_config(Path(__file__).parents[1] / "benchmarks" / "cpu3.yaml")
    arms = {a.name: a for a in cfg.arm_list()}
    assert list(arms) == ["PromptKD", "GKD", "DistiLLM", "KD", "SeqKD", "GKD-PromptKD-FLOPs"]
    assert arms["GKD-PromptKD-FLOPs"].budget.flops_of == "PromptKD" and cfg.seeds == [1, 2, 3, 4, 5]
    assert cfg.base["model"] == {"teacher": "prepare:teacher", "student": "prepare:init"}
    assert len(cfg.evaluation.seeds) == 5 and not {s["train"]["seed"] for s in cfg.prepare.values()} & set(cfg.seeds)


def test_the_cpu3_fp32_study_is_cpu3_in_float32():
    """benchmarks/cpu3-fp32.yaml is cpu3's design for a CPU without native bf16: only its names and
    its precision differ."""
    benchmarks = Path(__file__).parents[1] / "benchmarks"
    cpu3, fp32 = (yaml.safe_load((benchmarks / f"{name}.yaml").read_text()) for name in ("cpu3", "cpu3-fp32"))
    sections = [fp32["base"]] + list(fp32["prepare"].values())
    assert {s["train"].pop("mixed_precision") for s in sections} == {"no"}
    for s in [cpu3["base"]] + list(cpu3["prepare"].values()):
        assert s["train"].pop("mixed_precision") == "bf16"
    renamed = {"name": "cpu3-fp32", "results": "benchmarks/results/cpu3-fp32", "runs": "runs/cpu3-fp32"}
    assert fp32 == {**cpu3, **renamed}
    load_compare_config(benchmarks / "cpu3-fp32.yaml")


def test_the_smoke_study_is_cpu3_on_a_tiny_budget():
    """benchmarks/smoke.yaml checks cpu3's setup end to end: the same prepare stages and arms."""
    benchmarks = Path(__file__).parents[1] / "benchmarks"
    smoke, cpu3 = (load_compare_config(benchmarks / f"{name}.yaml") for name in ("smoke", "cpu3"))
    assert list(smoke.prepare) == list(cpu3.prepare) and smoke.base["model"] == cpu3.base["model"]
    for a, b in zip(smoke.arm_list(), cpu3.arm_list(), strict=True):
        assert (a.name, a.method, a.budget) == (b.name, b.method, b.budget)
        assert a.overrides == b.overrides or a.method == "distillm"  # DistiLLM checks its dev loss every step


def test_the_cpu2_report_rebuilds_byte_identically_from_its_committed_cells(tmp_path):
    """benchmarks/cpu2.yaml is the finished study of benchmarks/results/cpu2: --report-only rebuilds
    its committed report.md from the committed cells alone, without torch or a model."""
    pytest.importorskip("matplotlib")  # without it the report says there are no plots
    committed = Path(__file__).parents[1] / "benchmarks" / "results" / "cpu2"
    shutil.copytree(committed / "cells", tmp_path / "cells")
    shutil.copy(committed / "study.json", tmp_path)
    code = ("import sys; from promptkd.compare.config import load_compare_config; from promptkd.compare.report "
            "import build_report; cfg = load_compare_config(sys.argv[1], check_arms=False); cfg.results = sys.argv[2]; "
            "build_report(cfg); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(committed.parents[1] / "cpu2.yaml"), str(tmp_path)], check=True)
    assert (tmp_path / "report.md").read_bytes() == (committed / "report.md").read_bytes()


def test_the_cpu2_study_cannot_run_again_and_says_why():
    """Its guard arms set promptkd.max_drift, which the code no longer has: only --report-only loads it."""
    with pytest.raises(ConfigError) as e:
        load_compare_config(Path(__file__).parents[1] / "benchmarks" / "cpu2.yaml")
    assert len(e.value.problems) == 3
    assert all("'promptkd.max_drift' was removed: the drift guard was removed" in p for p in e.value.problems)


# ----------------------------------------------------------------------------- exposure bias


def test_cells_measure_exposure_bias_and_the_report_gives_its_t_interval(study):
    data = yaml.safe_load(study.read_text())
    data["base"]["train"]["mixed_precision"] = "no"  # the study's one precision (auto could pick bf16)
    edit(study, seeds=[1], base=data["base"],
         evaluation={**data["evaluation"], "seeds": [10], "exposure_bias_prompts": 2, "exposure_bias_samples": 1})
    assert main(["compare", "--config", str(study), "--no-progress", "--cells", "GKD__seed1"]) == 0
    cell = json.loads((study.parent / "results" / "cells" / "GKD__seed1.json").read_text())
    eb = cell["exposure_bias"]
    assert (eb["prompts"], eb["samples"]) == (2, 1) and len(eb["exaccerr"]) == data["evaluation"]["max_new_tokens"]
    assert cell["seconds"]["exposure_bias"] > 0
    # evaluation and ExAccErr run in the precision the cell trained in
    run = study.parent / "runs" / "GKD__seed1"
    assert json.loads((run / "eval" / "scores.json").read_text())["precision"]["requested"] == "no"
    assert json.loads((run / "exposure_bias" / "exposure_bias.json").read_text())["precision"]["requested"] == "no"


def test_exposure_bias_table_is_the_mean_over_seeds_with_scipy_t_interval(study):
    from scipy import stats

    cfg = load_compare_config(edit(study, evaluation={
        **yaml.safe_load(study.read_text())["evaluation"], "exposure_bias_prompts": 2}) and study)
    curves = {1: [10.0, 20.0, 30.0, 40.0], 2: [12.0, 22.0, 34.0, 46.0], 3: [8.0, 18.0, 26.0, "inf"]}
    for seed, curve in curves.items():
        fake_cell(cfg, "GKD", seed, 5.0, exposure_bias={"prompts": 2, "samples": 3, "exaccerr": curve})
    report = build_report(cfg).read_text()
    last = [40.0, 46.0]  # seed 3's curve has a non-finite point: left out
    half = stats.t.ppf(0.975, 1) * stats.tstd(last) / 2 ** 0.5
    assert "| arm | n | l = 1 | l = 2 | l = 4 |" in report
    assert "| GKD | 2 | 11.0 [" in report and f"43.0 [{43 - half:.1f}, {43 + half:.1f}] |" in report
    assert (Path(cfg.results) / "exposure_bias.png").is_file()
