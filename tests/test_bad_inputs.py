"""The bad-input matrix (docs/bad_inputs.md), through the CLI: `main([...])` returns 2 and prints
one `promptkd: error: ...` message naming the file / line / field / flag, never a traceback.

Also: --overwrite removes only promptkd's own files, and a run stopped by the non-finite guard
exits 3 with one line and can be resumed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from promptkd.cli import main
from promptkd.testing import byte_tokenizer, save_tiny_pair, tiny_llama, write_tiny_jsonl

GOOD = json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"})


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matmuls: a second intra-op thread only waits at barriers (seconds on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("models"))


def write_config(tmp_path: Path, teacher, student, train_file, method="promptkd", **sections) -> Path:
    cfg = {
        "method": method,
        "model": {"teacher": None if method == "sft" else str(teacher), "student": str(student)},
        "data": {"train": str(train_file), "template": "plain", "max_prompt_length": 40, "max_length": 56},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "warmup_steps": 0, "seed": 3},
        "sampling": {"max_new_tokens": 4},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "cfg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def user_error(capsys, args, *needles, code=2, one_line=True) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == code, err
    prefix = "promptkd: error: " if code == 2 else "promptkd: training stopped: "
    assert err.startswith(prefix), err
    assert "Traceback" not in err
    if one_line:
        assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


# --------------------------------------------------------------------------- training data

BAD_RECORDS = {
    "malformed-json": (b'{"instruction": "a", "output": ', ["line 2: malformed JSON"]),
    "wrong-type": (json.dumps({"instruction": 3, "output": "x"}).encode(), ["line 2: field 'instruction' must be a string"]),
    "wrong-type-outputs": (json.dumps({"instruction": "x", "outputs": [1]}).encode(), ["line 2: field 'outputs' must be a list of strings"]),
    "missing-instruction": (json.dumps({"input": "", "output": "x"}).encode(), ["line 2: missing field 'instruction'"]),
    "missing-output": (json.dumps({"instruction": "x"}).encode(), ["line 2: missing field 'output'"]),
    "empty-instruction": (json.dumps({"instruction": "  ", "output": "x"}).encode(), ["line 2: field 'instruction' is empty"]),
    "non-utf8": (b'{"instruction": "caf\xe9", "output": "x"}', ["line 2: invalid UTF-8 byte 0xe9", "byte offset"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_training_record(tmp_path, pair, capsys, case):
    line, needles = BAD_RECORDS[case]
    data = tmp_path / "bad.jsonl"
    data.write_bytes(GOOD.encode() + b"\n" + line + b"\n" + GOOD.encode() + b"\n")
    # a missing reference is an error only for methods that train on references (not PromptKD)
    cfg = write_config(tmp_path, *pair, data, method="kd" if case == "missing-output" else "promptkd")
    user_error(capsys, ["train", "--config", str(cfg)], f"{data} line 2", *needles)


def test_on_policy_methods_train_on_prompt_only_records(tmp_path, pair, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"task {i}"}) + "\n" for i in range(4)))
    for method in ("promptkd", "gkd"):
        cfg = write_config(tmp_path / method, *pair, data, method=method)
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 0, capsys.readouterr().err


def test_missing_data_file(tmp_path, pair, capsys):
    data = tmp_path / "nope" / "train.jsonl"
    cfg = write_config(tmp_path, *pair, data)
    user_error(capsys, ["train", "--config", str(cfg)], "data file not found", str(data))


def test_dataset_empty_after_length_filter(tmp_path, pair, capsys):
    data = write_tiny_jsonl(tmp_path / "train.jsonl", 4)
    cfg = write_config(tmp_path, *pair, data, data={"max_prompt_length": 3, "max_length": 8})
    user_error(capsys, ["train", "--config", str(cfg)], str(data), "4 records", "data.max_prompt_length")


def test_long_prompts_are_dropped_counted_and_reported(tmp_path, pair, capsys, caplog):
    data = write_tiny_jsonl(tmp_path / "train.jsonl", 4)
    with data.open("a") as f:
        for _ in range(2):
            f.write(json.dumps({"instruction": "x" * 60, "output": "y"}) + "\n")
    cfg = write_config(tmp_path, *pair, data, method="sft")
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    shown = [r for r in caplog.records if r.levelno >= logging.WARNING and "dropped (prompt too long)" in r.getMessage()]
    assert len(shown) == 1 and shown[0].name.startswith("promptkd")  # WARNING reaches the CLI's stderr
    assert "4/6 examples kept; 2 dropped (prompt too long)" in shown[0].getMessage()
    assert str(data) in shown[0].getMessage()


# --------------------------------------------------------------------------- config

BAD_CONFIGS = {
    "unknown-key": ({"train": {"max_stpes": 3}}, ["unknown key 'train.max_stpes'; did you mean 'train.max_steps'?"]),
    "wrong-type": ({"train": {"batch_size": "two"}}, ["'train.batch_size' = 'two': expected int"]),
    "out-of-range": ({"train": {"max_steps": 0}, "promptkd": {"base_coef": -1}},
                     ["'train.max_steps' = 0: must be >= 1", "'promptkd.base_coef' = -1.0: must be >= 0.0"]),
    "bad-choice": ({"train": {"nonfinite": "ignore"}}, ["'train.nonfinite' = 'ignore': must be one of skip, stop"]),
    "missing-required": ({"model": {"student": ""}}, ["'model.student' is not set"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_value(tmp_path, pair, tiny_jsonl, capsys, case):
    sections, needles = BAD_CONFIGS[case]
    cfg = write_config(tmp_path, *pair, tiny_jsonl, **sections)
    user_error(capsys, ["train", "--config", str(cfg)], "invalid configuration", *needles, one_line=False)


def test_bad_override_flag(tmp_path, pair, tiny_jsonl, capsys):
    cfg = write_config(tmp_path, *pair, tiny_jsonl)
    user_error(capsys, ["train", "--config", str(cfg), "--train.max_steps"],
               "option '--train.max_steps' has no value: write --train.max_steps VALUE")


@pytest.mark.parametrize(
    "method, section, needle",
    [
        ("kd", {"kd": {"beta": 0.3}}, "'kd.beta' = 0.3 is set but kd.divergence 'forward_kl' does not use it "
                                      "(beta is a parameter of generalized_jsd): remove kd.beta, or set "
                                      "kd.divergence to generalized_jsd"),
        ("gkd", {"gkd": {"alpha": 0.2}}, "'gkd.alpha' = 0.2 is set but gkd.divergence 'generalized_jsd' does not use it"),
        ("gkd", {"gkd": {"seq_kd": True}}, "'gkd.seq_kd' = True has no effect with gkd.lmbda = 1.0"),
    ],
)
def test_method_knob_that_does_not_apply(tmp_path, pair, tiny_jsonl, capsys, method, section, needle):
    cfg = write_config(tmp_path, *pair, tiny_jsonl, method=method, **section)
    user_error(capsys, ["train", "--config", str(cfg)], "invalid configuration", needle, one_line=False)
    # the same knob as a flag
    (name, knobs), = section.items()
    (knob, value), = knobs.items()
    cfg = write_config(tmp_path, *pair, tiny_jsonl, method=method)
    user_error(capsys, ["train", "--config", str(cfg), f"--{name}.{knob}", str(value)], needle, one_line=False)


# --------------------------------------------------------------------------- other commands' flags

COMMAND_ERRORS = {
    "old-flag": (["eval", "--model", "m", "--out", "o", "--max-new-tokens", "5"],
                 ["unknown key 'max_new_tokens'; did you mean 'sampling.max_new_tokens'?"]),
    "required": (["generate"], ["'model' is not set", "'data' is not set", "'out' is not set"]),
    "out-of-range": (["exposure-bias", "--student", "s", "--teacher", "t", "--out", "o", "--num-prompts", "0",
                      "--sampling.temperature", "0"],
                     ["'num_prompts' = 0: must be >= 1",
                      "'sampling.temperature' = 0.0: must be > 0.0; for greedy decoding set sampling.do_sample false"]),
    "eos-at-cap": (["eval", "--model", "m", "--out", "o", "--sampling.eos_at_cap", "true"],
                   ["'sampling.eos_at_cap' = True: only training samples can end in a forced EOS; eval keeps responses "
                    "as they were sampled"]),
    "both-layer-keys": (["make-student", "--teacher", "t", "--out", "o", "--layers", "0,3", "--num-layers", "2"],
                        ["'layers' = [0, 3] and 'num_layers' = 2 are both set: give only one"]),
}


@pytest.mark.parametrize("case", sorted(COMMAND_ERRORS))
def test_bad_command_flags(capsys, case):
    argv, needles = COMMAND_ERRORS[case]
    user_error(capsys, argv, "invalid configuration", *needles, one_line=False)


def test_output_and_data_paths_of_the_wrong_kind(tmp_path, capsys):
    """Caught with the flags, before any model loads: an existing file as an output directory,
    a directory as generate's output file, and a --data-dir that does not exist (which would
    otherwise read the set from the Hub)."""
    scores = tmp_path / "scores.txt"
    scores.write_text("")
    user_error(capsys, ["eval", "--model", "m", "--out", str(scores), "--data-dir", str(tmp_path / "typo")],
               "invalid configuration", f"- 'out' = '{scores}' is a file: give the directory to write",
               f"- 'data_dir' = '{tmp_path / 'typo'}' is not a directory", one_line=False)
    user_error(capsys, ["exposure-bias", "--student", "s", "--teacher", "t", "--out", str(scores)],
               f"- 'out' = '{scores}' is a file: give the directory to write", one_line=False)
    user_error(capsys, ["generate", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path)],
               f"- 'out' = '{tmp_path}' is a directory: give the file to write", one_line=False)


def test_command_flag_without_value(capsys):
    user_error(capsys, ["eval", "--model", "m", "--out"], "option '--out' has no value: write --out VALUE")


def test_invalid_yaml(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("train:\n  max_steps: [1, 2\nmodel: {}\n")
    user_error(capsys, ["train", "--config", str(cfg)], f"invalid YAML in {cfg}:")


def test_missing_config_file(tmp_path, capsys):
    user_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml")], "config file not found")


# --------------------------------------------------------------------------- models


def test_missing_gguf_file(tmp_path, pair, tiny_jsonl, capsys):
    gguf = tmp_path / "student.Q4_0.gguf"
    cfg = write_config(tmp_path, pair[0], gguf, tiny_jsonl)
    user_error(capsys, ["train", "--config", str(cfg)], f"model file {gguf} does not exist", ".gguf")


def test_teacher_student_tokenizer_mismatch(tmp_path, pair, tiny_jsonl, capsys):
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    student = tmp_path / "other_student"
    tiny_llama(vocab_size=260, num_layers=1).save_pretrained(student)
    tok.save_pretrained(student)
    cfg = write_config(tmp_path, pair[0], student, tiny_jsonl)
    # model.cross_tokenizer auto (the default) distils such a pair (tests/test_cross_tokenizer.py); off refuses it
    user_error(capsys, ["train", "--config", str(cfg), "--model.cross_tokenizer", "off"],
               "teacher tokenizer has 259 tokens but student tokenizer has 260", "set model.cross_tokenizer auto")


def test_vocab_padding_only_warns_and_slices(tmp_path, pair, tiny_jsonl, capsys):
    teacher = tmp_path / "padded_teacher"
    tiny_llama(vocab_size=264).save_pretrained(teacher)
    byte_tokenizer().save_pretrained(teacher)
    cfg = write_config(tmp_path, teacher, pair[1], tiny_jsonl)
    with pytest.warns(UserWarning, match="teacher model vocab size 264 != student model vocab size 259.*first 259"):
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert torch.isfinite(torch.tensor(record["student/loss"]))


# --------------------------------------------------------------------------- output directory


def test_output_dir_holding_a_run_is_refused(tmp_path, pair, tiny_jsonl, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: sft\n")
    cfg = write_config(tmp_path, *pair, tiny_jsonl)
    user_error(capsys, ["train", "--config", str(cfg)], f"output directory {run} already holds a run",
               "--resume", "--overwrite")
    assert (run / "config.yaml").read_text() == "method: sft\n"


def test_errors_raised_to_python_callers_name_the_trainer_arguments(tmp_path, pair, tiny_jsonl):
    """The command line's wording (--resume, --overwrite) is the CLI's; Python callers read theirs."""
    from promptkd.config import load_config
    from promptkd.errors import UserError
    from promptkd.training.loop import Trainer

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: sft\n")
    cfg = load_config(write_config(tmp_path, *pair, tiny_jsonl))
    with pytest.raises(UserError) as e:
        Trainer(cfg, show_progress=False).setup()
    assert str(e.value) == (f"output directory {run} already holds a run; pass resume=True to continue it or "
                            "overwrite=True to replace it")
    assert e.value.cli == f"output directory {run} already holds a run; pass --resume to continue it or --overwrite to replace it"
    with pytest.raises(UserError, match=r"^resume=True: no complete checkpoint under .*start without resume=True\)$"):
        Trainer(cfg, resume=True, show_progress=False).setup()


def test_resume_without_checkpoint_or_run(tmp_path, pair, tiny_jsonl, capsys):
    user_error(capsys, ["train", "--resume", str(tmp_path / "nothing")], "no config.yaml there")
    cfg = write_config(tmp_path, *pair, tiny_jsonl)
    user_error(capsys, ["train", "--config", str(cfg), "--resume"], "--resume: no complete checkpoint under")


def test_resume_and_overwrite_together(tmp_path, capsys):
    user_error(capsys, ["train", "--resume", str(tmp_path), "--overwrite"], "--resume continues a run and --overwrite")


def test_resume_with_another_method_or_student_architecture(tmp_path, pair, tiny_jsonl, capsys):
    cfg = write_config(tmp_path, *pair, tiny_jsonl, method="sft")
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    other = write_config(tmp_path / "b", *pair, tiny_jsonl, method="kd", train={"output_dir": str(run)})
    user_error(capsys, ["train", "--config", str(other), "--resume"], f"--resume: {run} holds a 'sft' run",
               "method 'kd'", "omit --config")
    student = tmp_path / "one_layer"
    tiny_llama(num_layers=1).save_pretrained(student)
    byte_tokenizer().save_pretrained(student)
    other = write_config(tmp_path / "c", pair[0], student, tiny_jsonl, method="sft", train={"output_dir": str(run)})
    user_error(capsys, ["train", "--config", str(other), "--resume"], "--resume: checkpoint",
               "does not fit this configuration")


def test_overwrite_removes_only_promptkd_artefacts(tmp_path, pair, capsys):
    run = tmp_path / "run"
    data = write_tiny_jsonl(run / "data" / "train.jsonl", 4)  # the user's data inside the run dir
    (run / "notes.txt").write_text("keep me")
    (run / "config.yaml").write_text("method: sft\n")
    (run / "metrics.jsonl").write_text('{"step": 99}\n')
    for d in ("checkpoints/step-00000099", "final/student", "best/student", "promptkd/1700000000"):
        (run / d).mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-00000099\n")
    (run / "promptkd" / "events.out.tfevents.1700000000.host").write_bytes(b"tb")
    (run / "promptkd" / "1700000000" / "hparams.yml").write_text("a: 1\n")
    cfg = write_config(tmp_path, *pair, data, method="sft")
    assert main(["train", "--config", str(cfg), "--overwrite", "--no-progress"]) == 0
    assert (run / "notes.txt").read_text() == "keep me"
    assert (run / "data" / "train.jsonl").is_file()
    assert not (run / "best").exists() and not (run / "promptkd").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "sft"


def test_overwrite_keeps_a_tracker_named_dir_with_user_files(tmp_path, pair, capsys):
    run = tmp_path / "run"
    (run / "promptkd").mkdir(parents=True)
    (run / "promptkd" / "events.out.tfevents.1.host").write_bytes(b"tb")
    (run / "promptkd" / "my_code.py").write_text("print(1)\n")
    (run / "config.yaml").write_text("method: sft\n")
    cfg = write_config(tmp_path, *pair, write_tiny_jsonl(tmp_path / "train.jsonl", 4), method="sft")
    assert main(["train", "--config", str(cfg), "--overwrite", "--no-progress"]) == 0
    assert (run / "promptkd" / "my_code.py").is_file()


# --------------------------------------------------------------------------- non-finite guard


def test_nonfinite_stop_exits_3_with_one_line_and_resumes(tmp_path, pair, tiny_jsonl, capsys, monkeypatch):
    from promptkd.methods.promptkd import PromptKD

    setup = PromptKD.setup

    def poisoned_setup(self, ctx):
        setup(self, ctx)
        self.student_loss = lambda *a, **k: torch.tensor(float("inf"), requires_grad=True)

    monkeypatch.setattr(PromptKD, "setup", poisoned_setup)
    cfg = write_config(tmp_path, *pair, tiny_jsonl, train={"nonfinite": "stop", "max_steps": 2})
    run = tmp_path / "run"
    user_error(capsys, ["train", "--config", str(cfg), "--no-progress"],
               "non-finite student update at step 1 (loss inf", f"checkpoint at step 1 in {run / 'checkpoints'}",
               "train.nonfinite skip", f"--resume {run}", code=3)
    assert not (run / "final").exists()
    monkeypatch.setattr(PromptKD, "setup", setup)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["nonfinite_skips"] == 1
    assert (run / "final" / "student" / "config.json").is_file()
