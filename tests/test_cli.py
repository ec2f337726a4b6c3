"""CLI: --help for every subcommand, user errors exit 2 with one message, train + resume."""

from __future__ import annotations

import json

import pytest
import yaml

from promptkd.cli import build_parser, main

SUBCOMMANDS = ["train", "generate", "make-student", "eval", "exposure-bias", "demo", "config-reference"]


def test_every_subcommand_is_tested_here():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(SUBCOMMANDS)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: promptkd" in capsys.readouterr().out


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert cmd in out


def write_config(tmp_path, teacher, student, data, **train):
    cfg = {
        "method": "promptkd",
        "model": {"teacher": str(teacher), "student": str(student)},
        "data": {"train": str(data), "max_prompt_length": 256, "max_length": 300},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 2, "warmup_steps": 1,
                  "save_every": 2, "seed": 3, **train},
        "sampling": {"max_new_tokens": 6},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_unknown_key_is_a_clean_user_error(tmp_path, tiny_pair_dirs, tiny_jsonl, capsys):
    cfg = write_config(tmp_path, *tiny_pair_dirs, tiny_jsonl)
    rc = main(["train", "--config", str(cfg), "--train.max_stpes", "3", "--promptkd.base_coef", "-1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("promptkd: error: invalid configuration")
    assert "unknown key 'train.max_stpes'; did you mean 'train.max_steps'?" in err
    assert "'promptkd.base_coef' = -1.0: must be >= 0.0" in err
    assert "Traceback" not in err


def test_malformed_jsonl_names_file_and_line(tmp_path, tiny_pair_dirs, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    cfg = write_config(tmp_path, *tiny_pair_dirs, data)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and "Traceback" not in err


def test_missing_model_path(tmp_path, tiny_jsonl, capsys):
    cfg = write_config(tmp_path, tmp_path / "no_teacher", tmp_path / "no_student", tiny_jsonl)
    assert main(["train", "--config", str(cfg)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_then_resume_end_to_end(tmp_path, tiny_pair_dirs, tiny_jsonl, capsys):
    cfg = write_config(tmp_path, *tiny_pair_dirs, tiny_jsonl, max_steps=2)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert (run / "final" / "student" / "config.json").is_file()
    assert (run / "final" / "prompt_adapter" / "adapter_config.json").is_file()
    assert (run / "config.yaml").is_file()
    # the same output dir again is refused without --resume / --overwrite
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # resume with a longer horizon continues from step 2
    assert main(["train", "--resume", str(run), "--train.max_steps", "4", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_make_student_cli(tmp_path, tiny_pair_dirs):
    teacher, _ = tiny_pair_dirs
    out = tmp_path / "student"
    assert main(["make-student", "--teacher", str(teacher), "--layers", "0,3", "--out", str(out)]) == 0
    info = json.loads((out / "promptkd_student.json").read_text())
    assert info["layers"] == [0, 3]


def test_generate_cli_is_resumable(tmp_path, tiny_pair_dirs, tiny_jsonl):
    teacher, _ = tiny_pair_dirs
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", str(teacher), "--data", str(tiny_jsonl), "--out", str(out),
            "--batch-size", "4", "--max-new-tokens", "5", "--limit", "8"]
    assert main(args) == 0
    full = out.read_text().splitlines()
    assert len(full) == 8
    # simulate a crash mid-batch: keep 5 lines + a torn line; resuming redoes the second batch
    out.write_text("\n".join(full[:5]) + "\n" + full[5][:10])
    assert main(args) == 0
    assert out.read_text().splitlines() == full


def test_config_reference(capsys):
    assert main(["config-reference"]) == 0
    assert "`promptkd.num_virtual_tokens`" in capsys.readouterr().out


def test_prompt_truncation_flag_reaches_generate_and_exposure_bias_jobs(monkeypatch, capsys):
    from promptkd import generate
    from promptkd.evaluation import exposure_bias

    jobs = []
    monkeypatch.setattr(generate, "run_generation", lambda job: jobs.append(job) or "out.jsonl")
    monkeypatch.setattr(exposure_bias, "run_exposure_bias", lambda job: jobs.append(job) or "summary")
    gen = ["generate", "--model", "m", "--data", "d.jsonl", "--out", "o.jsonl"]
    eb = ["exposure-bias", "--student", "s", "--teacher", "t", "--out", "o"]
    for argv in (gen, gen + ["--prompt-truncation", "keep_last"], eb, eb + ["--prompt-truncation", "keep_last"]):
        assert main(argv) == 0
    assert [j.prompt_truncation for j in jobs] == ["keep_first", "keep_last"] * 2
