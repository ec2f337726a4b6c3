"""Config loading: shipped YAMLs validate, every problem is reported at once, overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from promptkd.config import (
    COMMANDS,
    Config,
    EvalConfig,
    ExposureBiasConfig,
    GenerateConfig,
    config_from_dict,
    config_reference_markdown,
    fit_warmup,
    load_command_config,
    load_config,
    parse_overrides,
    validate_config,
)
from promptkd.errors import ConfigError, UserError
from promptkd.options import leaves
from promptkd.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "compare" not in p.parts)  # compare/: tests/test_compare.py
MINIMAL = {"model": {"teacher": "t", "student": "s"}, "data": {"train": "x.jsonl"}}


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"promptkd.yaml", "gkd.yaml", "kd.yaml", "seqkd.yaml", "sft.yaml"} <= names
    assert len([p for p in SHIPPED if p.parent.name == "paper"]) >= 7


@pytest.mark.parametrize("path", [p for p in SHIPPED if "accelerate" not in p.parts], ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.method in {"promptkd", "gkd", "kd", "seqkd", "sft", "minillm", "distillm"}


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
    assert (p.divergence, p.base_coef) == ("reverse_kl", 1.0)
    t = c.train
    assert (t.weight_decay, t.warmup_steps, t.max_grad_norm, t.lr_scheduler) == (0.01, 100, 1.0, "constant_with_warmup")
    s = c.sampling
    assert (s.temperature, s.top_k, s.top_p, s.max_new_tokens) == (1.0, 0, 1.0, 256)


def test_all_problems_reported_at_once():
    bad = {
        **MINIMAL,
        "trian": {},
        "train": {"max_steps": 0, "learning_rate": -1.0, "bogus": 1},
        "promptkd": {"divergence": "sideways", "num_virtual_tokens": "seven"},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(bad)
    msg = str(e.value)
    assert "unknown key 'trian'" in msg and "did you mean 'train'" in msg
    assert "unknown key 'train.bogus'" in msg
    assert "'train.max_steps' = 0: must be >= 1" in msg
    assert "'train.learning_rate' = -1.0: must be > 0.0" in msg
    assert "'promptkd.divergence' = 'sideways': must be one of " in msg
    assert "'promptkd.num_virtual_tokens' = 'seven': expected int" in msg
    assert len(e.value.problems) == 6


@pytest.mark.parametrize("section,key,replacement", [
    ("promptkd", "max_drift", "lower promptkd.prompt_learning_rate"),
    ("promptkd", "freeze_prompt", "method gkd at its defaults"),
    ("promptkd", "lagged_target", "always the updated prompt"),
    ("promptkd", "kd_direction", "KL(p_TP || p_S)"),
    ("promptkd", "reg_direction", "KL(p_TP || p_T)"),
    ("train", "fused_losses", "compile themselves"),
    ("train", "chunked_lm_head", "full logits otherwise"),
    ("promptkd", "student_divergence", "renamed promptkd.divergence"),
])
def test_a_removed_key_is_an_error_naming_its_replacement(section, key, replacement):
    with pytest.raises(ConfigError) as e:
        config_from_dict({**MINIMAL, section: {key: True}})
    (problem,) = e.value.problems
    assert problem.startswith(f"'{section}.{key}' was removed: ") and replacement in problem


def test_the_lora_alpha_is_named_as_in_peft():
    with pytest.raises(ConfigError, match=r"'model.student_lora.alpha' was removed: renamed model.student_lora.lora_alpha"):
        config_from_dict({**MINIMAL, "model": {**MINIMAL["model"], "student_lora": {"alpha": 8}}})
    assert config_from_dict({**MINIMAL, "model": {**MINIMAL["model"], "student_lora": {"lora_alpha": 8}}}).model.student_lora.lora_alpha == 8


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


@pytest.mark.parametrize("command", list(COMMANDS))
def test_docs_config_reference_is_current(command):
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    start, end = f"<!-- config-reference:{command}:start -->\n", f"<!-- config-reference:{command}:end -->"
    assert start in page and end in page, f"docs/configuration.md has no table for '{command}'"
    section = page.split(start, 1)[1].split(end, 1)[0]
    assert section == config_reference_markdown(command), "run: python scripts/update_config_reference.py"


def test_seqkd_default_is_the_references_half_ce_half_forward_kl():
    """Reference SeqKD = --type kd --kd-ratio 0.5 on teacher responses (PromptKD / MiniLLM
    scripts/gpt2/seqkd/seqkd_base.sh): the default and every shipped seqkd recipe use 0.5."""
    seqkd = {"method": "seqkd", "model": {"teacher": "t", "student": "s"}, "data": {"teacher_responses": "r.jsonl"}}
    assert config_from_dict(seqkd).seqkd.kd_ratio == 0.5
    with pytest.raises(ConfigError, match="seqkd.kd_ratio 0 trains"):  # 0.5 needs the teacher
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


# --------------------------------------------------------------------------- method knobs


@pytest.mark.parametrize(
    "section, divergence, knob, value, fix",
    [
        ("kd", "forward_kl", "beta", 0.3, "set kd.divergence to generalized_jsd"),
        ("kd", "generalized_jsd", "alpha", 0.2, "set kd.divergence to skew_forward_kl or skew_reverse_kl"),
        ("gkd", "skew_reverse_kl", "beta", 0.5, "set gkd.divergence to generalized_jsd"),
        ("gkd", "generalized_jsd", "alpha", 0.1, "set gkd.divergence to skew_forward_kl or skew_reverse_kl"),
        ("gkd", "generalized_jsd", "ab_alpha", 0.2, "set gkd.divergence to alpha_beta_divergence"),
        ("kd", "alpha_beta_divergence", "beta", 0.5, "set kd.divergence to generalized_jsd"),
        ("promptkd", "reverse_kl", "ab_beta", 0.7, "set promptkd.divergence to alpha_beta_divergence"),
        ("distillm", "skew_reverse_kl", "ab_alpha", 0.1, "set distillm.divergence to alpha_beta_divergence"),
    ],
)
def test_a_knob_the_divergence_does_not_read_is_an_error(section, divergence, knob, value, fix):
    """Set by the user (in the mapping), even to its default value: it would be ignored."""
    data = {**MINIMAL, "method": section, section: {"divergence": divergence, knob: value}}
    if section == "distillm":  # it adapts from the dev loss
        data["data"] = {**MINIMAL["data"], "dev": "d.jsonl"}
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    (problem,) = e.value.problems
    assert problem.startswith(f"'{section}.{knob}' = {value!r} is set but {section}.divergence '{divergence}' does not use it")
    assert f"remove {section}.{knob}" in problem and fix in problem


def test_knobs_the_divergence_reads_or_nobody_set_are_fine():
    config_from_dict({**MINIMAL, "method": "kd", "kd": {"divergence": "generalized_jsd", "beta": 0.3}})
    config_from_dict({**MINIMAL, "method": "kd", "kd": {"divergence": "skew_reverse_kl", "alpha": 0.3}})
    config_from_dict({**MINIMAL, "method": "gkd", "gkd": {"divergence": "reverse_kl"}})  # defaults left alone


@pytest.mark.parametrize("method", ["kd", "gkd", "promptkd", "distillm"])
def test_abkd_is_selectable_with_its_parameters(tmp_path, method):
    """Each method with a divergence takes ABKD's, with the reference's defaults (0.2, 0.7) or the
    user's; both parameters 0 is an error; the saved config keeps them and loads again."""
    base = {**MINIMAL, "data": {**MINIMAL["data"], "dev": "d.jsonl"}}  # distillm adapts from the dev loss
    cfg = config_from_dict({**base, "method": method, method: {"divergence": "alpha_beta_divergence"}})
    assert (getattr(cfg, method).ab_alpha, getattr(cfg, method).ab_beta) == (0.2, 0.7)
    cfg = config_from_dict({**base, "method": method,
                            method: {"divergence": "alpha_beta_divergence", "ab_alpha": 0.1, "ab_beta": 0.8}})
    cfg.save(tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved[method]["ab_alpha"], saved[method]["ab_beta"]) == (0.1, 0.8)
    assert load_config(tmp_path / "config.yaml") == cfg
    with pytest.raises(ConfigError, match=f"'{method}.ab_alpha' and '{method}.ab_beta' are both 0"):
        config_from_dict({**base, "method": method,
                          method: {"divergence": "alpha_beta_divergence", "ab_alpha": 0.0, "ab_beta": 0.0}})


def test_another_methods_section_is_an_error_naming_the_section_and_the_method(tmp_path):
    """A `gkd:` section under method promptkd, in YAML or as flags, would be silently ignored."""
    expected = ["the 'gkd' section sets gkd.lmbda, gkd.beta but method is 'promptkd', which never reads that "
                "section: remove it, or set method gkd"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "method": "promptkd", "gkd": {"beta": 0.5, "lmbda": 0.5}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == expected
    path.write_text(yaml.safe_dump({**MINIMAL, "method": "promptkd"}))
    with pytest.raises(ConfigError) as e:
        load_config(path, ["--gkd.beta", "0.5", "--gkd.lmbda=0.5"])
    assert e.value.problems == expected
    # a section at its defaults changes nothing: every saved config.yaml holds one for each method
    config_from_dict({**MINIMAL, "method": "promptkd", "gkd": {"beta": 1.0}})
    cfg = config_from_dict({**MINIMAL, "method": "promptkd"})
    cfg.kd.kd_ratio = 0.9  # set in Python
    with pytest.raises(ConfigError, match="the 'kd' section sets kd.kd_ratio but method is 'promptkd'"):
        validate_config(cfg)


@pytest.mark.parametrize(("warmup", "max_steps", "fitted"), [(100, 3, 0), (100, 100, 10), (100, 250, 100), (0, 3, 0)])
def test_a_warmup_as_long_as_the_run_is_scaled_to_a_tenth_of_it(warmup, max_steps, fitted):
    cfg = config_from_dict({**MINIMAL, "train": {"warmup_steps": warmup, "max_steps": max_steps}})
    out, note = fit_warmup(cfg)
    assert out.train.warmup_steps == fitted and cfg.train.warmup_steps == warmup  # the caller's config is kept
    if warmup < max_steps:
        assert out is cfg and note is None
    else:
        assert note == (f"train.warmup_steps = {warmup} is not shorter than train.max_steps = {max_steps}: warming up "
                        f"over {fitted} steps instead (a tenth of the run); set train.warmup_steps to choose")


def test_knob_set_in_python_counts_when_it_differs_from_its_default():
    from promptkd.config import validate_config

    cfg = config_from_dict({**MINIMAL, "method": "kd", "kd": {"kd_ratio": 0.4}})
    cfg.kd.beta = 0.5  # the default: nothing to report
    validate_config(cfg)
    cfg.kd.beta = 0.9
    with pytest.raises(ConfigError, match="'kd.beta' = 0.9 is set but kd.divergence 'forward_kl'"):
        validate_config(cfg)


def test_gkd_seq_kd_needs_off_policy_steps():
    with pytest.raises(ConfigError, match="'gkd.seq_kd' = True has no effect with gkd.lmbda = 1.0"):
        config_from_dict({**MINIMAL, "method": "gkd", "gkd": {"seq_kd": True}})
    config_from_dict({**MINIMAL, "method": "gkd", "gkd": {"seq_kd": True, "lmbda": 0.5}})


@pytest.mark.parametrize("method", ["kd", "gkd", "promptkd"])
def test_saved_config_leaves_out_unused_knobs_and_loads_again(tmp_path, method):
    """The resolved config of a kd run must load again (with --resume) under the knob rule."""
    cfg = config_from_dict({**MINIMAL, "method": method})
    cfg.save(tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "beta" not in saved["kd"] and "alpha" not in saved["kd"] and "alpha" not in saved["gkd"]
    assert not {"ab_alpha", "ab_beta"} & (saved["kd"].keys() | saved["gkd"].keys() | saved["promptkd"].keys())
    assert saved["gkd"]["beta"] == 1.0  # generalized_jsd reads it
    assert load_config(tmp_path / "config.yaml") == cfg


# --------------------------------------------------------------------------- every command's config


def test_every_command_has_a_default_constructible_config_with_help_on_every_key():
    for command, cls in COMMANDS.items():
        keys = [leaf.key for leaf in leaves(cls)]
        assert keys and len(keys) == len(set(keys)), command
        for leaf in leaves(cls):
            assert leaf.help.strip(), f"{command}: {leaf.key} has no help text"


def test_one_sampling_record_for_training_generation_evaluation_and_exposure_bias():
    for command in ("train", "generate", "eval", "exposure-bias"):
        assert isinstance(COMMANDS[command]().sampling, SamplingConfig)


def test_eval_defaults_are_the_papers_protocol():
    cfg = EvalConfig()
    s = cfg.sampling
    assert (s.temperature, s.top_k, s.top_p, s.no_repeat_ngram_size, s.max_new_tokens, s.do_sample) == (1.0, 0, 1.0, 6, 256, True)
    assert (cfg.max_prompt_length, cfg.prompt_truncation, cfg.seeds) == (256, "keep_first", [10, 20, 30, 40, 50])
    assert (cfg.datasets, cfg.template) == (["dolly", "selfinst", "vicuna"], "alpaca")
    # the other commands sample as in training
    assert GenerateConfig().sampling == SamplingConfig()
    assert ExposureBiasConfig().sampling == SamplingConfig(max_new_tokens=64)


def test_command_configs_report_every_problem_with_key_value_and_guess():
    with pytest.raises(ConfigError) as e:
        load_command_config("eval", overrides={
            "batch_size": 0, "max_new_tokens": 5, "sampling": {"top_p": 2, "temperatur": 1.0},
            "prompt_truncation": "left", "seeds": "10,x",
        })
    assert sorted(e.value.problems) == sorted([
        "'batch_size' = 0: must be >= 1",
        "unknown key 'max_new_tokens'; did you mean 'sampling.max_new_tokens'?",
        "'sampling.top_p' = 2.0: must be > 0.0 and <= 1.0",
        "unknown key 'sampling.temperatur'; did you mean 'sampling.temperature'?",
        "'prompt_truncation' = 'left': must be one of keep_first, keep_last",
        "'seeds' = '10,x': expected list[int]",
    ])


def test_command_configs_required_and_cross_field_checks():
    with pytest.raises(ConfigError) as e:
        load_command_config("generate", overrides={"sampling": {"eos_at_cap": True}})
    msg = str(e.value)
    assert "'model' is not set" in msg and "'data' is not set" in msg and "'out' is not set" in msg
    assert "'sampling.eos_at_cap' = True: only training samples can end in a forced EOS" in msg
    with pytest.raises(ConfigError) as e:
        load_command_config("eval", overrides={"model": "m", "out": "o", "seeds": [10, 10], "datasets": ["a/x.jsonl", "b/x.jsonl"]})
    assert "'seeds' = [10, 10] repeats a seed" in str(e.value) and "two sets the same name ['x', 'x']" in str(e.value)
    with pytest.raises(ConfigError, match="'layers' = \\[0, 3\\] and 'num_layers' = 2 are both set"):
        load_command_config("make-student", overrides={"teacher": "t", "out": "o", "layers": "0,3", "num_layers": 2})
    with pytest.raises(ConfigError, match="neither 'layers' nor 'num_layers' is set"):
        load_command_config("make-student", overrides={"teacher": "t", "out": "o"})
    with pytest.raises(ConfigError, match="'student' is not set"):
        load_command_config("exposure-bias", overrides={"teacher": "t", "out": "o"})


def test_command_config_from_yaml_file_with_overrides(tmp_path):
    f = tmp_path / "eval.yaml"
    f.write_text("model: m\nout: o\nseeds: [1, 2]\nsampling: {max_new_tokens: 64}\n")
    cfg = load_command_config("eval", f, ["--sampling.top_k", "5", "--limit", "3"])
    assert (cfg.seeds, cfg.limit, cfg.sampling.max_new_tokens, cfg.sampling.top_k) == ([1, 2], 3, 64, 5)
    assert cfg.sampling.no_repeat_ngram_size == 6  # the protocol default survives a partial section


def test_configs_built_in_python_are_validated_by_the_library():
    from promptkd.evaluation.runner import run_evaluation
    from promptkd.generate import run_generation

    with pytest.raises(ConfigError) as e:
        run_evaluation(EvalConfig(model="m", out="o", batch_size=0, seeds=[]))
    assert e.value.problems == ["'batch_size' = 0: must be >= 1"]  # cross-field rules wait for valid fields
    with pytest.raises(ConfigError, match="'seeds' is empty"):
        run_evaluation(EvalConfig(model="m", out="o", seeds=[]))
    with pytest.raises(ConfigError, match="'sampling' = 3: expected a SamplingConfig"):
        run_generation(GenerateConfig(model="m", data="d", out="o", sampling=3))


def test_config_reference_for_every_command():
    for command, cls in COMMANDS.items():
        ref = config_reference_markdown(command)
        for leaf in leaves(cls):
            assert f"| `{leaf.key}` | `{leaf.default!r}` |" in ref
    assert "| `sampling.no_repeat_ngram_size` | `6` |" in config_reference_markdown("eval")
    assert config_reference_markdown() == config_reference_markdown("train")


@pytest.mark.parametrize("method,section,refused", [
    ("promptkd", {}, "method promptkd"),
    ("minillm", {}, None),
    ("minillm", {"minillm": {"lm_coef": 1.0, "lm_data": "lm.jsonl"}}, "minillm.lm_coef"),
    ("distillm", {}, None),
])
def test_deepspeed_refuses_methods_that_call_backward_twice_per_step(method, section, refused):
    """accelerate's DeepSpeed backward also steps the engine, so a second backward per step is refused."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from promptkd.training.assembly import check_distributed_backend

    cfg = config_from_dict({"method": method, **section}, check_required=False)
    ds_config = {"train_micro_batch_size_per_gpu": "auto"}
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config)))
    if refused:
        with pytest.raises(UserError, match=refused):
            check_distributed_backend(cfg, accelerator)
    else:
        check_distributed_backend(cfg, accelerator)
        assert ds_config["train_micro_batch_size_per_gpu"] == cfg.train.batch_size


def test_paper_minillm_and_distillm_budgets_are_the_references():
    """The three paper-config fixes of the reference audit (configs/paper/*.yaml headers cite the lines).

    MiniLLM stops after 10 passes over the prompts (--epochs 10), not at --total-iters: 11,435 prompts,
    a drop_last DistributedSampler over 16 GPUs (714 each), rollout phases of 16 prompts per GPU (44 a
    pass), 4 PPO epochs of one optimizer step each per phase. DistiLLM keeps 1,000 replayed samples per
    GPU on 16 GPUs, here 8 processes (the config's accelerate launch), and its dev loss reads 1,000
    records (--dev-num 1000)."""
    minillm = load_config(ROOT / "configs/paper/gpt2-base_minillm.yaml")
    phases_per_pass = (11_435 // 16) // 16
    assert minillm.train.max_steps == 10 * phases_per_pass * minillm.minillm.ppo_epochs == 1_760
    distillm = load_config(ROOT / "configs/paper/gpt2-base_distillm.yaml")
    assert distillm.distillm.capacity * 8 == 16 * 1_000
    assert distillm.data.max_dev_examples == 1_000
