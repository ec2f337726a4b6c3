"""LoRA students (`model.student_lora`): only the adapters train, and export and resume are exact.

Tiny in-process models (tests/conftest.py); each test runs a step or a few. The kill-and-resume
and multi-process variants are in tests/test_kill_resume.py and tests/test_multiprocess.py.
"""

from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch
from fakes import crash_in_step
from safetensors.torch import load_file
from test_methods import make_cfg, snapshot, trainer_for

from promptkd.errors import UserError
from promptkd.testing import byte_tokenizer, tiny_llama
from promptkd.training.loop import Trainer

TIMING_KEYS = {"step_time", "trained_tokens_per_s"}


def lora_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl, method="promptkd", lora=None, **sections):
    """A set-up Trainer whose student gets LoRA adapters (r 4, alpha 8, plus `lora`)."""
    model = {"student_lora": {"r": 4, "lora_alpha": 8, **(lora or {})}}
    return trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, method, model=model, **sections)


def is_adapter_key(name: str) -> bool:
    return "lora_" in name


def optimizer_params(optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def fixed_batch(vocab_size: int = 259) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size - 3, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


@torch.no_grad()
def logits_of(model, ids, mask) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- what trains


def test_lora_student_is_a_peft_model_whose_optimizer_holds_exactly_the_adapters(tmp_path, tiny_pair_dirs, tiny_jsonl):
    from peft import PeftModel

    tr = lora_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl)
    student = tr.unwrapped_student
    assert isinstance(student, PeftModel)
    named = dict(student.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all(is_adapter_key(n) for n in trainable), sorted(trainable)
    assert {n for n in named if is_adapter_key(n)} == trainable  # every adapter trains
    held = optimizer_params(tr.ctx.param_sets["student"].optimizer)
    assert len(held) == len(trainable)
    assert {id(p) for p in held} == {id(named[n]) for n in trainable}
    # every linear layer but the LM head (peft's "all-linear"); embeddings and norms stay frozen
    adapted = {n.split(".")[-1] for n, m in student.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not tr.method.student_dropout  # lora_dropout 0: one student forward serves both updates
    # the prompt's optimizer holds no student parameter
    prompt_held = {id(p) for p in optimizer_params(tr.ctx.param_sets["prompt"].optimizer)}
    assert not prompt_held & {id(p) for p in student.parameters()}


@pytest.mark.parametrize("method", ["promptkd", "kd"])
def test_a_step_changes_only_adapter_weights(tmp_path, tiny_pair_dirs, tiny_jsonl, method):
    tr = lora_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl, method)
    before = snapshot(tr.unwrapped_student)
    metrics = tr.train_step().metrics
    assert metrics["student/grad_norm"] > 0
    after = snapshot(tr.unwrapped_student)
    assert after.keys() == before.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(is_adapter_key(k) for k in moved), sorted(moved)
    assert any("lora_B" in k for k in moved)  # B starts at 0: the update made the adapter non-zero


def test_target_modules_restrict_where_adapters_go(tmp_path, tiny_pair_dirs, tiny_jsonl):
    tr = lora_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl, lora={"target_modules": ["q_proj", "v_proj"]})
    student = tr.unwrapped_student
    adapted = [n for n, m in student.named_modules() if hasattr(m, "lora_A")]
    assert sorted({n.split(".")[-1] for n in adapted}) == ["q_proj", "v_proj"]
    assert len(adapted) == 2 * 2  # two layers
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".q_proj.lora_" in n or ".v_proj.lora_" in n for n in trainable)


def test_a_target_module_the_student_lacks_is_a_user_error_naming_the_setting(tmp_path, tiny_pair_dirs, tiny_jsonl):
    with pytest.raises(UserError, match=r"model\.student_lora\.target_modules: \['nope_proj'\] not found.*'q_proj'") as e:
        lora_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl, lora={"target_modules": ["q_proj", "nope_proj"]})
    assert "\n" not in str(e.value)


def test_a_target_that_is_no_linear_layer_is_a_one_line_user_error(student_model):
    from promptkd.models.lora import with_lora

    with pytest.raises(UserError, match=r"model\.student_lora\.target_modules = \['model'\] cannot be adapted") as e:
        with_lora(student_model, r=4, alpha=8, dropout=0.0, target_modules=["model"])
    assert "\n" not in str(e.value) and len(str(e.value)) < 600


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("merge", [False, True])
def test_export_writes_a_loadable_adapter_and_with_merge_the_merged_student(tmp_path, tiny_pair_dirs, tiny_jsonl, merge):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, student_dir = tiny_pair_dirs
    tr = lora_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl, lora={"merge": merge})
    assert tr.train()["step"] == 2
    final = tr.output_dir / "final"
    ids, mask = fixed_batch()
    trained = logits_of(tr.unwrapped_student, ids, mask)

    adapter_dir = final / "student_adapter"
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert saved and all(is_adapter_key(k) for k in saved)  # the adapter only, no base weights
    assert (adapter_dir / "tokenizer_config.json").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir), adapter_dir)
    assert torch.equal(logits_of(loaded, ids, mask), trained)
    assert (final / "prompt_adapter" / "adapter_model.safetensors").is_file()
    # promptkd eval / generate load the adapter directory as the merged student
    from promptkd.models.loading import load_model_and_tokenizer

    merged_on_load, tok = load_model_and_tokenizer(str(adapter_dir))
    torch.testing.assert_close(logits_of(merged_on_load, ids, mask), trained, rtol=1e-5, atol=1e-5)
    assert tok.pad_token is not None

    assert (final / "student").exists() == merge
    if merge:
        merged = AutoModelForCausalLM.from_pretrained(final / "student")
        assert not any(is_adapter_key(k) for k in merged.state_dict())
        torch.testing.assert_close(logits_of(merged, ids, mask), trained, rtol=1e-5, atol=1e-5)
        assert (final / "student" / "tokenizer_config.json").is_file()
    # the wrapped student itself is unchanged by the export (the merge works on a copy)
    assert torch.equal(logits_of(tr.unwrapped_student, ids, mask), trained)


# --------------------------------------------------------------------------- resume


def _metrics(run) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_in_process_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """4 steps in one go == 2 steps, a crash, and a resume to 4 (LoRA dropout on: the RNG matters)."""
    sections = {"model": {"student_lora": {"r": 4, "lora_alpha": 8, "dropout": 0.1}},
                "train": {"max_steps": 4, "save_every": 1, "deterministic": True}}
    ref = Trainer(make_cfg(tmp_path / "ref", *tiny_pair_dirs, tiny_jsonl, **sections), show_progress=False)
    ref.train()

    cfg = make_cfg(tmp_path / "run", *tiny_pair_dirs, tiny_jsonl, **sections)
    crashed = Trainer(cfg, show_progress=False).setup()
    assert crashed.method.student_dropout  # the LoRA dropout is seen: student targets in eval mode
    crash_in_step(crashed, monkeypatch)  # in step 3
    assert [r["step"] for r in _metrics(crashed.output_dir)] == [1, 2]

    resumed = Trainer(cfg, resume=True, show_progress=False)
    assert resumed.train()["step"] == 4
    assert _metrics(resumed.output_dir) == _metrics(ref.output_dir)
    for rel in ("final/student_adapter/adapter_model.safetensors", "final/prompt_adapter/adapter_model.safetensors"):
        a, b = load_file(ref.output_dir / rel), load_file(resumed.output_dir / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    # the live models too: the resumed student, base weights included, is the reference's
    a, b = snapshot(ref.unwrapped_student), snapshot(resumed.unwrapped_student)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- other set-ups


def test_gradient_checkpointing_with_lora_takes_the_same_step(tmp_path, tiny_pair_dirs, tiny_jsonl):
    plain = lora_trainer(tmp_path / "plain", tiny_pair_dirs, tiny_jsonl, "kd")
    ckpt = lora_trainer(tmp_path / "ckpt", tiny_pair_dirs, tiny_jsonl, "kd", train={"gradient_checkpointing": True})
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.unwrapped_student.modules())
    m_plain, m_ckpt = plain.train_step().metrics, ckpt.train_step().metrics
    assert m_ckpt["student/grad_norm"] > 0
    assert m_ckpt["student/grad_norm"] == pytest.approx(m_plain["student/grad_norm"], rel=1e-5)
    a, b = snapshot(plain.unwrapped_student), snapshot(ckpt.unwrapped_student)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("config_r", [0, 8])
def test_a_peft_student_passed_in_is_trained_as_it_is(tmp_path, tiny_pair_dirs, tiny_jsonl, config_r):
    """The user's own PeftModel is not wrapped again: its adapters train (model.student_lora's
    r, alpha, dropout and target modules do not apply to it) and it exports as an adapter."""
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(tiny_llama(num_layers=2, seed=1),
                             LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    cfg = make_cfg(tmp_path, *tiny_pair_dirs, tiny_jsonl, model={"student_lora": {"r": config_r}})
    ignored = pytest.warns(UserWarning, match="model.student_lora") if config_r else contextlib.nullcontext()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*student_lora.*")  # r 0: nothing is ignored, no warning
        with ignored:
            tr = Trainer(cfg, student=student, tokenizer=byte_tokenizer(), show_progress=False).setup()
    assert tr.unwrapped_student is student
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".q_proj.lora_" in n for n in trainable)
    held = optimizer_params(tr.ctx.param_sets["student"].optimizer)
    assert {id(p) for p in held} == {id(p) for p in student.parameters() if p.requires_grad}
    before = snapshot(student)
    tr.train()
    moved = {k for k, v in snapshot(student).items() if not torch.equal(v, before[k])}
    assert moved and all(".q_proj.lora_" in k for k in moved)
    saved = load_file(tr.output_dir / "final" / "student_adapter" / "adapter_model.safetensors")
    assert saved and all(".q_proj.lora_" in k for k in saved)


@pytest.mark.parametrize("backend,zero_stage,refused", [
    ("MULTI_CPU", None, False), ("MULTI_GPU", None, False), ("FSDP", None, True),
    ("DEEPSPEED", 2, False), ("DEEPSPEED", 3, True),
])
def test_sharded_backends_are_refused_for_a_lora_student(backend, zero_stage, refused):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from promptkd.models.lora import check_lora_backend

    accelerator = SimpleNamespace(distributed_type=DistributedType[backend],
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)))
    if refused:
        with pytest.raises(UserError, match=r"model\.student_lora .*not supported under (FSDP|DeepSpeed ZeRO-3).*DDP"):
            check_lora_backend(accelerator)
    else:
        check_lora_backend(accelerator)
