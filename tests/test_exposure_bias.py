"""Exposure bias (ExAccErr, docs/method.md section 7) on tiny in-process models: definition, edge cases, outputs, CLI."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from promptkd.cli import main
from promptkd.config import ExposureBiasConfig
from promptkd.data.dataset import build_examples
from promptkd.data.records import read_jsonl_records
from promptkd.errors import UserError
from promptkd.evaluation.exposure_bias import (
    curve_from_sums,
    exaccerr,
    exposure_bias_curve,
    exposure_bias_over_checkpoints,
    load_model_for_eval,
    run_exposure_bias,
)
from promptkd.sampling import SamplingConfig
from promptkd.testing import tiny_llama


def _examples(tokenizer, path, n=4):
    records = read_jsonl_records(path)[:n]
    examples, _ = build_examples(records, tokenizer, max_prompt_length=128, max_length=160,
                                 drop_long_prompts=False, with_responses=False)
    return examples


def test_exaccerr_zero_division():
    assert exaccerr(0.0, 0.0) == 0.0
    assert exaccerr(1.0, 0.0) == math.inf
    assert exaccerr(3.0, 2.0) == pytest.approx(50.0)
    assert exaccerr(1.0, 2.0) == pytest.approx(-50.0)


def test_curve_from_sums_ended_modes():
    # 2 sequences per model; per-step KL sums and running counts over L = 3 steps
    ks, rs = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), torch.tensor([2, 1, 0])
    kt, rt = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([2, 2, 2])
    zero = curve_from_sums(ks, rs, 2, kt, rt, 2, ended="zero")
    assert zero.lengths == [1, 2, 3]
    assert zero.R == pytest.approx([1.0, 1.5, 1.5])  # ended sequences contribute 0
    assert zero.eps == pytest.approx([0.5, 1.0, 1.5])
    assert zero.exaccerr == pytest.approx([100.0, 50.0, 0.0])
    alive = curve_from_sums(ks, rs, 2, kt, rt, 2, ended="alive")
    assert alive.R == pytest.approx([1.0, 2.0, 2.0])  # mean over the running sequences only
    assert alive.eps == pytest.approx([0.5, 1.0, 1.5])
    with pytest.raises(UserError):
        curve_from_sums(ks, rs, 2, kt, rt, 2, ended="bogus")


def test_identical_student_and_teacher_give_zero(tokenizer, tiny_jsonl):
    model = tiny_llama(num_layers=2, seed=3)
    curve = exposure_bias_curve(model, model, tokenizer, _examples(tokenizer, tiny_jsonl),
                                samples_per_prompt=3, sampling=SamplingConfig(max_new_tokens=6), seed=1, batch_size=3)
    assert curve.lengths == list(range(1, 7))
    assert curve.R == [0.0] * 6 and curve.eps == [0.0] * 6
    assert curve.exaccerr == [0.0] * 6
    assert curve.num_sequences == 12
    assert len(curve.student_running) == len(curve.teacher_running) == 6


def test_different_models_shapes_and_monotone(tokenizer, tiny_jsonl, teacher_model, student_model):
    curve = exposure_bias_curve(student_model, teacher_model, tokenizer, _examples(tokenizer, tiny_jsonl),
                                samples_per_prompt=2, sampling=SamplingConfig(max_new_tokens=5), seed=2, batch_size=4)
    assert len(curve.R) == len(curve.eps) == len(curve.exaccerr) == 5
    assert curve.R[0] > 0 and curve.eps[0] > 0
    assert all(b >= a for a, b in zip(curve.R, curve.R[1:], strict=False))  # ended sequences add 0
    assert all(b >= a for a, b in zip(curve.eps, curve.eps[1:], strict=False))
    assert all(math.isfinite(v) for v in curve.exaccerr)
    assert curve.exaccerr[2] == pytest.approx(100 * (curve.R[2] - curve.eps[2]) / curve.eps[2])
    # the running counts never exceed the number of samples and never grow
    assert curve.student_running[0] == curve.num_sequences == 8
    assert all(b <= a for a, b in zip(curve.student_running, curve.student_running[1:], strict=False))
    # same seeds -> same curve
    again = exposure_bias_curve(student_model, teacher_model, tokenizer, _examples(tokenizer, tiny_jsonl),
                                samples_per_prompt=2, sampling=SamplingConfig(max_new_tokens=5), seed=2, batch_size=4)
    assert again.R == curve.R and again.eps == curve.eps


def test_run_exposure_bias_writes_csv_and_png(tmp_path, tiny_pair_dirs, tiny_jsonl):
    teacher, student = tiny_pair_dirs
    job = ExposureBiasConfig(student=str(student), teacher=str(teacher), data=str(tiny_jsonl), num_prompts=3,
                             samples_per_prompt=2, sampling=SamplingConfig(max_new_tokens=4), seed=5, out=str(tmp_path / "eb"))
    text = run_exposure_bias(job)
    assert "ExAccErr" in text
    with open(tmp_path / "eb" / "exposure_bias.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["l"]) for r in rows] == [1, 2, 3, 4]
    assert {"l", "R", "eps", "ExAccErr"} <= set(rows[0])
    png = (tmp_path / "eb" / "exposure_bias.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "eb" / "exposure_bias.json").is_file()


def test_prompts_alone_are_enough_and_bad_data_fails_before_any_model_loads(tmp_path, tiny_pair_dirs, tiny_jsonl,
                                                                               monkeypatch):
    """ExAccErr compares two models' distributions on sampled responses: no reference is read."""
    import json
    from dataclasses import replace

    from promptkd.evaluation import exposure_bias

    teacher, student = tiny_pair_dirs
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in tiny_jsonl.read_text().splitlines()[:2]]
    prompts.write_text("".join(json.dumps({"instruction": r["instruction"], "input": r.get("input", "")}) + "\n"
                               for r in rows))
    job = ExposureBiasConfig(student=str(student), teacher=str(teacher), data=str(prompts), num_prompts=2,
                             samples_per_prompt=1, sampling=SamplingConfig(max_new_tokens=2), out=str(tmp_path / "eb"))
    run_exposure_bias(job)
    assert (tmp_path / "eb" / "exposure_bias.json").is_file()
    monkeypatch.setattr(exposure_bias, "load_model_for_eval", lambda *a: pytest.fail("a model loaded before the data"))
    with pytest.raises(UserError, match="missing.jsonl"):
        run_exposure_bias(replace(job, data=str(tmp_path / "missing.jsonl")))


def test_identical_saved_models_via_job(tmp_path, tiny_pair_dirs, tiny_jsonl):
    teacher, _ = tiny_pair_dirs
    job = ExposureBiasConfig(student=str(teacher), teacher=str(teacher), data=str(tiny_jsonl), num_prompts=2,
                             samples_per_prompt=3, sampling=SamplingConfig(max_new_tokens=3), out=str(tmp_path / "same"))
    run_exposure_bias(job)
    with open(tmp_path / "same" / "exposure_bias.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["R"]) == 0.0 and float(r["eps"]) == 0.0 and float(r["ExAccErr"]) == 0.0 for r in rows)


def test_over_checkpoints_shares_teacher_samples(tmp_path, tiny_pair_dirs, tiny_jsonl):
    teacher, student = tiny_pair_dirs
    job = ExposureBiasConfig(teacher=str(teacher), data=str(tiny_jsonl), num_prompts=2,
                             samples_per_prompt=2, sampling=SamplingConfig(max_new_tokens=3), out=str(tmp_path / "curves"))
    curves = exposure_bias_over_checkpoints({"teacher": teacher, "student": student}, job)
    assert list(curves) == ["teacher", "student"]
    assert curves["teacher"].exaccerr == [0.0] * 3
    assert curves["student"].eps[-1] > 0
    with open(tmp_path / "curves" / "exposure_bias_curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["label"] for r in rows} == {"teacher", "student"}
    assert (tmp_path / "curves" / "exposure_bias_curves.png").is_file()


def test_training_checkpoint_loads(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """An accelerate checkpoint written during training (no config.json) loads as a student."""
    from promptkd.config import config_from_dict
    from promptkd.training.loop import Trainer

    teacher, student = tiny_pair_dirs
    cfg = config_from_dict({
        "method": "kd", "model": {"teacher": str(teacher), "student": str(student)},
        "data": {"train": str(tiny_jsonl), "max_prompt_length": 256, "max_length": 300},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2, "warmup_steps": 0,
                  "save_every": 1, "learning_rate": 1e-2},
    })
    Trainer(cfg, show_progress=False).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    assert not (ckpt / "config.json").exists()
    model, _ = load_model_for_eval(ckpt)
    final, _ = load_model_for_eval(tmp_path / "run" / "final" / "student")
    base, _ = load_model_for_eval(student)
    name = "model.layers.0.self_attn.q_proj.weight"
    sd, sf, sb = model.state_dict(), final.state_dict(), base.state_dict()
    assert not torch.equal(sd[name], sb[name])  # trained for one step
    assert not torch.equal(sd[name], sf[name])  # and not yet the final weights
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()  # still tied
    job = ExposureBiasConfig(teacher=str(teacher), data=str(tiny_jsonl), num_prompts=2,
                             samples_per_prompt=1, sampling=SamplingConfig(max_new_tokens=3), out=str(tmp_path / "through"))
    curves = exposure_bias_over_checkpoints([ckpt, tmp_path / "run" / "checkpoints" / "step-00000002"], job)
    assert list(curves) == ["step 1", "step 2"]


def test_cli_exposure_bias(tmp_path, tiny_pair_dirs, tiny_jsonl, capsys):
    teacher, student = tiny_pair_dirs
    out = tmp_path / "cli"
    rc = main(["exposure-bias", "--student", str(student), "--teacher", str(teacher), "--data", str(tiny_jsonl),
               "--num-prompts", "2", "--samples-per-prompt", "2", "--sampling.max_new_tokens", "3", "--out", str(out)])
    assert rc == 0
    assert "ExAccErr" in capsys.readouterr().out
    assert (out / "exposure_bias.csv").is_file() and (out / "exposure_bias.png").is_file()


def test_cli_exposure_bias_user_errors(tmp_path, tiny_pair_dirs, tiny_jsonl, capsys):
    teacher, student = tiny_pair_dirs
    rc = main(["exposure-bias", "--student", str(student), "--teacher", str(teacher), "--data", str(tiny_jsonl),
               "--num-prompts", "0", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "'num_prompts' = 0: must be >= 1" in capsys.readouterr().err
    rc = main(["exposure-bias", "--student", str(tmp_path / "missing"), "--teacher", str(teacher),
               "--data", str(tiny_jsonl), "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
