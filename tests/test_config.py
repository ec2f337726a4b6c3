"""Config loading: shipped YAMLs validate, every problem is reported at once, overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptkd.config import (
    Config,
    config_from_dict,
    config_reference_markdown,
    load_config,
    parse_overrides,
)
from promptkd.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))
MINIMAL = {"model": {"teacher": "t", "student": "s"}, "data": {"train": "x.jsonl"}}


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"promptkd.yaml", "gkd.yaml", "kd.yaml", "seqkd.yaml", "sft.yaml"} <= names
    assert len([p for p in SHIPPED if p.parent.name == "paper"]) >= 7


@pytest.mark.parametrize("path", [p for p in SHIPPED if "accelerate" not in p.parts], ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.method in {"promptkd", "gkd", "kd", "seqkd", "sft"}


def test_paper_recipes_follow_spec_hyperparameters():
    base = load_config(ROOT / "configs/paper/gpt2-base_promptkd.yaml")
    assert base.train.learning_rate == 5e-5 and base.promptkd.prompt_learning_rate is None
    assert base.train.batch_size * base.train.gradient_accumulation_steps * 8 == 256
    assert base.promptkd.num_virtual_tokens == 7 and base.promptkd.base_coef == 1.0
    assert base.train.weight_decay == 0.01 and base.train.warmup_steps == 100 and base.train.max_grad_norm == 1.0
    medium = load_config(ROOT / "configs/paper/gpt2-medium_promptkd.yaml")
    assert medium.train.learning_rate == 1e-5
    assert medium.train.batch_size * medium.train.gradient_accumulation_steps * 8 == 64


def test_defaults_are_the_papers():
    c = config_from_dict(MINIMAL)
    p = c.promptkd
    assert (p.num_virtual_tokens, p.prompt_init, p.prompt_init_text) == (7, "text", "Suppose you are a student.")
    assert (p.kd_direction, p.reg_direction, p.student_divergence, p.base_coef) == ("reverse", "reverse", "reverse_kl", 1.0)
    t = c.train
    assert (t.weight_decay, t.warmup_steps, t.max_grad_norm, t.lr_scheduler) == (0.01, 100, 1.0, "constant_with_warmup")
    s = c.sampling
    assert (s.temperature, s.top_k, s.top_p, s.max_new_tokens) == (1.0, 0, 1.0, 256)


def test_all_problems_reported_at_once():
    bad = {
        **MINIMAL,
        "trian": {},
        "train": {"max_steps": 0, "learning_rate": -1.0, "bogus": 1},
        "promptkd": {"kd_direction": "sideways", "num_virtual_tokens": "seven"},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(bad)
    msg = str(e.value)
    assert "unknown key 'trian'" in msg and "did you mean 'train'" in msg
    assert "unknown key 'train.bogus'" in msg
    assert "'train.max_steps' = 0: must be >= 1" in msg
    assert "'train.learning_rate' = -1.0: must be > 0.0" in msg
    assert "'promptkd.kd_direction' = 'sideways': must be one of reverse, forward" in msg
    assert "'promptkd.num_virtual_tokens' = 'seven': expected int" in msg
    assert len(e.value.problems) == 6


def test_missing_required_fields_named():
    with pytest.raises(ConfigError) as e:
        config_from_dict({})
    msg = str(e.value)
    assert "'model.student' is not set" in msg and "'model.teacher' is not set" in msg and "'data.train' is not set" in msg


def test_sft_needs_no_teacher_and_seqkd_needs_responses():
    config_from_dict({"method": "sft", "model": {"student": "s"}, "data": {"train": "x"}})
    with pytest.raises(ConfigError, match="data.teacher_responses"):
        config_from_dict({"method": "seqkd", "model": {"student": "s"}, "data": {"train": "x"}})


def test_cross_field_check_prompt_length():
    with pytest.raises(ConfigError, match="max_prompt_length' = 600 must be smaller"):
        config_from_dict({**MINIMAL, "data": {"train": "x", "max_prompt_length": 600, "max_length": 512}})


def test_overrides_parse_and_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: promptkd\nmodel: {teacher: t, student: s}\ndata: {train: x}\ntrain: {max_steps: 10}\n")
    cfg = load_config(f, ["--train.max_steps", "3", "--promptkd.base_coef=0", "--train.learning_rate", "1e-4", "--train.trackers", "tensorboard"])
    assert cfg.train.max_steps == 3 and cfg.promptkd.base_coef == 0.0 and cfg.train.learning_rate == 1e-4
    assert cfg.train.trackers == ["tensorboard"]
    assert parse_overrides(["--a.b", "true"]) == {"a": {"b": True}}
    with pytest.raises(UserError, match="has no value"):
        parse_overrides(["--train.max_steps"])
    with pytest.raises(UserError, match="unexpected argument"):
        parse_overrides(["train.max_steps", "3"])


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("method: promptkd\ntrain:\n  max_steps: [1, 2\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    assert "bad.yaml:" in str(e.value) and "invalid YAML" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = config_from_dict(MINIMAL)
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_config_reference_lists_every_key():
    ref = config_reference_markdown()
    for key in ("`promptkd.base_coef`", "`train.learning_rate`", "`sampling.top_k`", "`gkd.lmbda`", "`kd.kd_ratio`"):
        assert key in ref


def test_readme_config_reference_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- config-reference:start -->\n", 1)[1].split("<!-- config-reference:end -->", 1)[0]
    assert section == config_reference_markdown(), "run: python scripts/update_readme_config.py"


def test_seqkd_default_is_the_references_half_ce_half_forward_kl():
    """Reference SeqKD = --type kd --kd-ratio 0.5 on teacher responses (PromptKD / MiniLLM
    scripts/gpt2/seqkd/seqkd_base.sh): the default and every shipped seqkd recipe use 0.5."""
    seqkd = {"method": "seqkd", "model": {"teacher": "t", "student": "s"}, "data": {"teacher_responses": "r.jsonl"}}
    assert config_from_dict(seqkd).seqkd.kd_ratio == 0.5
    with pytest.raises(ConfigError, match="--seqkd.kd_ratio 0"):  # 0.5 needs the teacher
        config_from_dict({**seqkd, "model": {"student": "s"}})
    recipes = [load_config(p) for p in SHIPPED if "accelerate" not in p.parts]
    shipped = [c for c in recipes if c.method == "seqkd"]
    assert len(shipped) >= 2 and all(c.seqkd.kd_ratio == 0.5 and c.model.teacher for c in shipped)

    paper = load_config(ROOT / "configs/paper/gpt2-base_seqkd.yaml")
    t = paper.train
    assert (t.learning_rate, t.lr_scheduler, t.warmup_steps, t.weight_decay, t.max_grad_norm) == (5e-4, "cosine", 0, 0.01, 1.0)
    assert t.batch_size * t.gradient_accumulation_steps * 8 == 32
    assert t.max_steps == (11_435 // 32) * 20 and t.eval_every == 11_435 // 32  # 20 epochs, eval each epoch
    assert (paper.data.max_prompt_length, paper.data.max_length) == (256, 512)
