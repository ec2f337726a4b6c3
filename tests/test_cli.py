"""CLI: --help for every subcommand, user errors exit 2 with one message, train + resume."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import yaml

from promptkd import cli
from promptkd import config as config_module
from promptkd.cli import build_parser, flag_for, main
from promptkd.config import COMMANDS, METHOD_SECTIONS, METHODS
from promptkd.methods import get_method_class
from promptkd.models import loading
from promptkd.options import leaves, type_name

SUBCOMMANDS = ["train", "generate", "make-student", "eval", "exposure-bias", "demo", "plot", "config-reference", "compare"]


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


def test_top_level_help_names_every_method_of_the_registry(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"({', '.join(METHODS)})" in out
    assert [get_method_class(name).name for name in METHODS] == list(METHODS)


def test_console_lines_have_no_source_lines_and_transformers_bars_need_verbose(monkeypatch, capsys):
    """Warnings print as one `promptkd: warning:` line; transformers' per-load and per-save bars
    ("Loading weights", "Writing model shards") are off unless -v; both are restored afterwards."""
    from transformers.utils import logging as hf_logging

    seen = []
    monkeypatch.setitem(cli.RUN, "plot", lambda cfg, args: seen.append(
        (warnings.formatwarning("warm-up too long", UserWarning, "loop.py", 759, "self.setup()"),
         hf_logging.is_progress_bar_enabled())) or 0)
    hf_logging.enable_progress_bar()
    try:
        assert main(["plot", "r"]) == 0 and main(["-v", "plot", "r"]) == 0
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.disable_progress_bar()  # as tests/conftest.py keeps it
    assert seen == [("promptkd: warning: warm-up too long\n", False), ("promptkd: warning: warm-up too long\n", True)]
    assert "loop.py" in warnings.formatwarning("x", UserWarning, "loop.py", 759, "self.setup()")
    record = logging.LogRecord("promptkd.training.loop", logging.WARNING, "loop.py", 1, "a %s", ("notice",), None)
    assert cli._Console().format(record) == "promptkd: warning: a notice"


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


def test_plot_a_real_run_and_bad_directories(tmp_path, tiny_pair_dirs, tiny_jsonl, capsys):
    cfg = write_config(tmp_path, *tiny_pair_dirs, tiny_jsonl, max_steps=2)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("prompt/kl_to_student" in r and "prompt/drift" in r for r in records)
    assert main(["plot", str(run)]) == 0
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "figs" / "drift.png"
    assert main(["plot", "--run-dir", str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptkd: error:") and "no metrics.jsonl" in err and "Traceback" not in err
    (empty / "metrics.jsonl").write_text("")
    assert main(["plot", str(empty)]) == 2
    assert "no step records" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["plot"]) == 2
    assert "'run_dir' is not set" in capsys.readouterr().err


def test_a_feature_whose_extra_is_missing_prints_the_pip_command(tmp_path, monkeypatch, capsys):
    """gguf (.gguf models: the demo's) and matplotlib (plots) are extras: without one, one line says
    what to install (import failures simulated)."""
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "student/loss": 1.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(run)]) == 2
    assert capsys.readouterr().err == ("promptkd: error: promptkd plot needs the 'matplotlib' package, which is not "
                                       "installed: pip install matplotlib (promptkd's 'plot' extra)\n")
    assert main(["exposure-bias", "--student", "s", "--teacher", "t", "--out", str(tmp_path / "eb")]) == 2
    assert "the exposure-bias plot needs the 'matplotlib' package" in capsys.readouterr().err
    model = tmp_path / "model.Q4_0.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setenv("PROMPTKD_DENSE_GGUF", "0")
    assert main(["make-student", "--teacher", str(model), "--num-layers", "1", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == (f"promptkd: error: loading the GGUF file {model.name} needs the 'gguf' package, "
                                       "which is not installed: pip install gguf (promptkd's 'gguf' extra)\n")


def test_make_student_cli(tmp_path, tiny_pair_dirs, capsys):
    teacher, _ = tiny_pair_dirs
    out = tmp_path / "student"
    assert main(["make-student", "--teacher", str(teacher), "--layers", "0,3", "--out", str(out)]) == 0
    info = json.loads((out / "promptkd_student.json").read_text())
    assert info["layers"] == [0, 3]
    # a pruned student writes gibberish: the command says it must be healed first, and how
    said = capsys.readouterr().out
    assert "Heal it before distilling" in said and "(KD or SFT)" in said
    assert (f"promptkd train --config configs/kd.yaml --model.teacher {teacher} --model.student {out} "
            f"--train.output_dir {out}-healed") in said


def test_generate_cli_is_resumable(tmp_path, tiny_pair_dirs, tiny_jsonl, capsys, monkeypatch):
    teacher, _ = tiny_pair_dirs
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--model", str(teacher), "--data", str(tiny_jsonl), "--out", str(out),
            "--batch-size", "4", "--sampling.max_new_tokens", "5", "--limit", "8"]
    assert main(args) == 0
    full = out.read_text().splitlines()
    assert len(full) == 8
    # simulate a crash mid-batch: keep 5 lines + a torn line; resuming redoes the second batch
    out.write_text("\n".join(full[:5]) + "\n" + full[5][:10])
    assert main(args) == 0
    assert out.read_text().splitlines() == full

    # a finished file is left as it is (no model loads), also when its length is not a whole number of batches
    args10 = [a if a != "8" else "10" for a in args]
    out.unlink()
    assert main(args10) == 0
    ten = out.read_text()
    assert len(ten.splitlines()) == 10
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda spec: pytest.fail("a model loaded"))
    assert main(args10) == 0 and out.read_text() == ten
    monkeypatch.undo()

    # another generation's lines are never continued: other settings, a model rewritten at the same
    # path, or an unfinished file without a sidecar
    sidecar = tmp_path / "gen.jsonl.meta.json"
    assert main(args10 + ["--seed", "7"]) == 2
    assert "holds 10 responses of another generation (it differs in seed)" in capsys.readouterr().err
    out.write_text("".join(ten.splitlines(keepends=True)[:6]))
    weights = teacher / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert main(args10) == 2
    assert "holds 6 responses of another generation (it differs in model_files)" in capsys.readouterr().err
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    saved = sidecar.read_text()
    sidecar.unlink()
    assert main(args10) == 2
    assert "gen.jsonl.meta.json is missing or unreadable" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 6
    sidecar.write_text(saved)  # the same generation, resumed under another spelling of the model's path
    relative = os.path.relpath(teacher)
    assert main([relative if a == str(teacher) else a for a in args10]) == 0 and out.read_text() == ten
    assert main([str(tmp_path) if a == str(out) else a for a in args10]) == 2
    assert f"- 'out' = '{tmp_path}' is a directory: give the file to write" in capsys.readouterr().err


def test_config_reference(capsys):
    assert main(["config-reference"]) == 0
    assert "`promptkd.num_virtual_tokens`" in capsys.readouterr().out
    assert main(["config-reference", "--command", "eval"]) == 0
    out = capsys.readouterr().out
    assert "| `sampling.no_repeat_ngram_size` | `6` |" in out and "promptkd." not in out


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


# --------------------------------------------------------------------------- flags from the configs

# What each command needs besides the key under test (make-student takes one of two keys).
REQUIRED = {
    "train": {"model.teacher": "t", "model.student": "s", "data.train": "x.jsonl"},
    "generate": {"model": "m", "data": "d.jsonl", "out": "o.jsonl"},
    "eval": {"model": "m", "out": "o"},
    "exposure-bias": {"student": "s", "teacher": "t", "out": "o"},
    "make-student": {"teacher": "t", "out": "o", "num_layers": 2},
    "demo": {},
    "plot": {"run_dir": "r"},
}


def other_value(leaf):
    """A valid value that differs from the key's default (and passes the cross-field checks)."""
    meta, default, tp = leaf.field.metadata, leaf.default, type_name(leaf.type)
    if leaf.key == "data_dir":  # must be an existing directory
        return str(Path(__file__).parent)
    if meta.get("choices"):
        return next(c for c in meta["choices"] if c != default)
    if tp.startswith("bool"):
        return False if default in (None, True) else True
    if "list[int]" in tp:
        return [3, 4]
    if tp.startswith("list"):
        return ["a/one.jsonl", "b/two.jsonl"]
    if tp.startswith("int"):
        return 2 if default is None else default + 1
    if tp.startswith("float"):
        return 0.5 if default is None else default / 2 if default else 0.5
    return f"value-of-{leaf.key}"


def as_flag_text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def parsed(monkeypatch, command, flags: dict):
    """The config `main` hands to the command for these {key: value} flags."""
    seen = []
    monkeypatch.setitem(cli.RUN, command, lambda cfg, args: seen.append(cfg) or 0)
    argv = [command]
    for key, value in flags.items():
        argv += [flag_for(key), as_flag_text(value)]
    assert main(argv) == 0
    return seen[0]


def get_key(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


CASES = [(command, leaf) for command, cls in COMMANDS.items() for leaf in leaves(cls)]


@pytest.mark.parametrize("command, leaf", CASES, ids=[f"{c}:{leaf.key}" for c, leaf in CASES])
def test_every_config_key_is_a_flag_that_round_trips(monkeypatch, command, leaf):
    value = other_value(leaf)
    flags = {**REQUIRED[command], leaf.key: value}
    if command == "train" and leaf.key.split(".")[0] in METHOD_SECTIONS:
        # a method's knob under another method is an error (tests/test_config.py); only the flag is tested here
        monkeypatch.setattr(config_module, "_method_knob_problems", lambda cfg: [])
    if command == "make-student" and leaf.key == "layers":
        del flags["num_layers"]
    cfg = parsed(monkeypatch, command, flags)
    assert isinstance(cfg, COMMANDS[command])
    assert get_key(cfg, leaf.key) == value != leaf.default


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_config_key(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for leaf in leaves(COMMANDS[command]):
        assert flag_for(leaf.key) in out


def test_flag_spelling_hyphens_and_underscores_are_interchangeable(monkeypatch):
    seen = []
    monkeypatch.setitem(cli.RUN, "eval", lambda cfg, args: seen.append(cfg) or 0)
    assert main(["eval", "--model", "m", "--out=o", "--batch_size", "3", "--sampling.max-new-tokens=7",
                 "--prompt_truncation", "keep_last", "--seeds", "10"]) == 0
    cfg = seen[0]
    assert (cfg.batch_size, cfg.sampling.max_new_tokens, cfg.prompt_truncation, cfg.seeds) == (3, 7, "keep_last", [10])


def test_config_file_for_every_command_and_flags_override_it(tmp_path, monkeypatch):
    f = tmp_path / "gen.yaml"
    f.write_text("model: m\ndata: d.jsonl\nout: o.jsonl\nsampling: {max_new_tokens: 9, top_k: 5}\n")
    seen = []
    monkeypatch.setitem(cli.RUN, "generate", lambda cfg, args: seen.append(cfg) or 0)
    assert main(["generate", "--config", str(f), "--sampling.top_k", "7"]) == 0
    assert (seen[0].model, seen[0].sampling.max_new_tokens, seen[0].sampling.top_k) == ("m", 9, 7)


def test_string_keys_keep_their_text_and_null_clears_an_optional_key(monkeypatch):
    cfg = parsed(monkeypatch, "eval", {"model": "1e-5", "out": "true", "data_dir": "null"})
    assert (cfg.model, cfg.out, cfg.data_dir) == ("1e-5", "true", None)


def test_old_flags_get_the_new_spelling_in_the_error(capsys):
    assert main(["eval", "--model", "m", "--out", "o", "--max-new-tokens", "5", "--greedy", "true"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'max_new_tokens'; did you mean 'sampling.max_new_tokens'?" in err
    assert "unknown key 'greedy'" in err and "Traceback" not in err


def test_flag_errors_are_one_clean_message(capsys):
    assert main(["eval", "--model", "m", "--out", "o", "--batch-size", "0", "--sampling.top_p", "2"]) == 2
    err = capsys.readouterr().err
    assert "'batch_size' = 0: must be >= 1" in err and "'sampling.top_p' = 2.0: must be > 0.0 and <= 1.0" in err
    assert main(["eval", "--model"]) == 2
    assert capsys.readouterr().err == "promptkd: error: option '--model' has no value: write --model VALUE\n"
    assert main(["make-student", "--teacher", "t", "--out", "o", "--layers", "0,3", "--num-layers", "2"]) == 2
    assert "'layers' = [0, 3] and 'num_layers' = 2 are both set" in capsys.readouterr().err
