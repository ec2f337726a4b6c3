"""Training steps on hidden states + LM heads equal the same steps on full logits.

    .venv/bin/python -m pytest -q tests/test_chunked_step.py

Every method that computes its losses from hidden states and LM heads (PromptKD, GKD, KD, SeqKD,
SFT, DistiLLM) runs two steps twice from the same models on the same batches, through
`fakes.FakeContext`: once with forwards that serve final hidden states + LM heads (`heads=True`,
as the trainer does; `promptkd.losses.loss_terms` makes the logits a chunk at a time) and once
with forwards that serve (B, R, V) logits (the fallback for a head that cannot be chunked); the
trained parameters (student and prompt), the gradients and the logged metrics agree to float32
rounding. Models: a tiny Llama with tied embeddings, GPT-2 (its head tied to the token embedding,
Conv1D layers) and an untied Qwen2. Through the Trainer: KD's steps and the dev loss, the
fallback to logits for a head that cannot be chunked (LoRA on lm_head), and the removed config
keys. The PromptKD step against its float64 reference, in both forms, is in
tests/test_promptkd_step_pinned.py.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from fakes import FakeContext
from test_head import LargestLogits
from test_methods import trainer_for

from promptkd import losses
from promptkd.config import config_from_dict
from promptkd.data.collate import collate_sequences
from promptkd.data.dataset import Example
from promptkd.errors import ConfigError
from promptkd.methods import get_method_class
from promptkd.testing import byte_tokenizer, tiny_llama

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
]

K = 4  # max_steps: lambda_k = 0.75, 0.5 in the two steps
V = 259  # the byte tokenizer's vocabulary
TOK = byte_tokenizer()
PAD = TOK.pad_token_id
PAIRS = [("Say hello.\n", "hello"), ("Add 2 and 3.\n", "5"), ("Name a colour.\n", "blue"),
         ("Repeat: cat\n", "cat cat"), ("Give an animal.\n", "dog"), ("Spell abc backwards.\n", "cba")]
EXAMPLES = [Example(TOK.encode(p), TOK.encode(r) + [TOK.eos_token_id], [r]) for p, r in PAIRS]


def _gpt2(seed: int, *, layers: int, hidden: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=V, n_positions=128, n_embd=hidden, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def _qwen2_untied(seed: int, *, layers: int, hidden: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


# (student, teacher); the teacher is deeper and, for Llama, wider than the student
ARCHS = {
    "llama_tied": lambda: (tiny_llama(num_layers=1, seed=1), tiny_llama(num_layers=2, hidden_size=48, seed=0)),
    "gpt2": lambda: (_gpt2(1, layers=1, hidden=32), _gpt2(0, layers=2, hidden=32)),
    "qwen2_untied": lambda: (_qwen2_untied(1, layers=1, hidden=32), _qwen2_untied(0, layers=2, hidden=32)),
}

# name: (method, config sections, micro-batches of EXAMPLES indices)
ONE = [[0, 1, 2]]
TWO = [[0, 1], [2, 3, 4]]  # accumulation: PromptKD's student target is its own forward then
CASES = {
    "promptkd": ("promptkd", {}, ONE),
    "promptkd_accumulation": ("promptkd", {}, TWO),
    "promptkd_jsd_student": ("promptkd", {"promptkd": {"divergence": "generalized_jsd"}}, ONE),
    "promptkd_no_regulariser": ("promptkd", {"promptkd": {"base_coef": 0.0}}, TWO),
    "gkd_jsd": ("gkd", {"gkd": {"lmbda": 1.0, "beta": 0.3}}, ONE),
    "gkd_off_policy_reverse_kl": ("gkd", {"gkd": {"lmbda": 0.0, "beta": 1.0}}, TWO),
    "kd": ("kd", {}, TWO),
    "seqkd": ("seqkd", {}, ONE),
    "sft": ("sft", {}, TWO),
    "distillm": ("distillm", {"distillm": {"initial_student_prob": 0.0, "prob_step": 0.0}}, ONE),
}


def make_cfg(method: str, sections: dict):
    data = {"method": method, "train": {"max_steps": K, "seed": 5, "learning_rate": 1e-2}}
    if method == "promptkd":
        data["promptkd"] = {"num_virtual_tokens": 3, "teacher_dropout": False}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return config_from_dict(data, check_required=False)


def fixed_sampler(examples, *, from_teacher=False):
    """Samples that do not depend on the student: the examples' own responses."""
    return collate_sequences(examples, PAD)


def record_outputs(ctx, method) -> list[tuple[str, bool, bool]]:
    """Wraps the context's forwards (and PromptKD's prompted-teacher forward) to record, per call,
    (name, logits asked for, the Outputs carry an LM head)."""
    record = []

    def wrap(owner, name):
        forward = getattr(owner, name)

        def wrapped(*args, **kwargs):
            out = forward(*args, **kwargs)
            record.append((name, kwargs.get("logits", False), out.head is not None))
            return out

        setattr(owner, name, wrapped)

    wrap(ctx, "student_forward")
    wrap(ctx, "teacher_forward")
    if hasattr(method, "prompted_outputs"):
        wrap(method, "prompted_outputs")
    return record


def run_steps(student, teacher, method: str, sections: dict, micro_batches, *, heads: bool, steps: int = 2):
    """(ctx, the metrics of each step, the forwards' record) after `steps` steps of `method` on
    copies of the models."""
    cls = get_method_class(method)
    cfg = make_cfg(method, sections)
    options = getattr(cfg, method, None)  # the method's own section (SFT has none)
    ctx = FakeContext(copy.deepcopy(student), copy.deepcopy(teacher) if cls.needs_teacher(options) else None, TOK,
                      vocab_size=V, max_steps=K, sampler=fixed_sampler, heads=heads)
    assert (ctx.student_head is not None) is heads, ctx.chunked_fallback
    m = cls(options)
    m.setup(ctx)
    record = record_outputs(ctx, m)
    metrics = []
    for step in range(steps):
        ctx.step = step
        metrics.append(m.step(ctx, [[EXAMPLES[i] for i in mb] for mb in micro_batches]).metrics)
    return ctx, metrics, record


def trained_tensors(ctx) -> dict[str, list[torch.Tensor]]:
    return {name: [p.detach() for p in params] for name, (params, _) in ctx.param_sets.items()}


# Both paths sum the same float32 terms in different orders (chunks of positions, blocks of
# rows, the head matmul split or not): an entry built from n terms may differ by about
# n * 2^-24 of their absolute sum, which near a zero entry is an absolute error. With a few dozen
# positions that is ~1e-6 of the tensor's largest entry; 1e-5 allows for sums larger than it
# (observed 1.4e-6 under ONEDNN_MAX_CPU_ISA=AVX2, whose kernels round differently).
GRAD_ATOL = 1e-5


def assert_tensors_close(got, expected, what):
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        scale = float(b.abs().max()) or 1.0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=GRAD_ATOL * scale, msg=lambda m, i=i: f"{what} {i}: {m}")


# ---------------------------------------------------------------------------- both forms, every method


# every case on the tied Llama; the main path of each loss kind on the other architectures
RUNS = [(case, "llama_tied") for case in CASES] + [
    (case, arch) for arch in ("gpt2", "qwen2_untied") for case in ("promptkd", "promptkd_accumulation", "gkd_jsd", "kd")
]


@pytest.mark.parametrize("case,arch", RUNS, ids=[f"{c}-{a}" for c, a in RUNS])
def test_two_steps_equal_the_logits_path(case, arch):
    method, sections, micro_batches = CASES[case]
    student, teacher = ARCHS[arch]()
    (ctx_h, metrics_h, record_h), (ctx_l, metrics_l, record_l) = (
        run_steps(student, teacher, method, sections, micro_batches, heads=heads) for heads in (True, False)
    )
    # the run on heads got hidden states + heads from every forward, the other run logits only
    assert record_h and all(has_head for _, _, has_head in record_h), record_h
    assert record_l and not any(has_head for _, _, has_head in record_l), record_l
    assert [r[:2] for r in record_h] == [r[:2] for r in record_l]  # the same forwards, in order
    trained_h, trained_l = trained_tensors(ctx_h), trained_tensors(ctx_l)
    assert trained_h.keys() == trained_l.keys() == ({"student", "prompt"} if method == "promptkd" else {"student"})
    assert ctx_h.grads.keys() == ctx_l.grads.keys() == trained_h.keys()
    for name in ctx_h.grads:
        assert_tensors_close(ctx_h.grads[name], ctx_l.grads[name], f"{name} grad (last step)")
    for name in trained_h:
        assert_tensors_close(trained_h[name], trained_l[name], f"{name} after 2 steps")
    moved = [not torch.equal(a, b) for a, b in zip(trained_h["student"], student.parameters(), strict=True)]
    assert any(moved)  # the steps did train
    for got, expected in zip(metrics_h, metrics_l, strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_no_logits_sized_tensor_in_a_promptkd_or_kd_step_on_heads(monkeypatch):
    """With chunks of 3 positions, no tensor in any pass of a whole step (forwards, losses,
    backward, both optimizer updates) has a vocabulary dim with more than 3 rows, except the
    (V, H) head / embedding weights and their gradients."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * V)
    student, teacher = ARCHS["llama_tied"]()
    for case in ("promptkd", "promptkd_accumulation", "kd"):
        method, sections, micro_batches = CASES[case]
        mode = LargestLogits({V}, {32, 48}, limit=3)
        with mode:
            run_steps(student, teacher, method, sections, micro_batches, heads=True, steps=1)
        assert mode.offenders == [], (case, mode.offenders[:5])
    # the same step on logits does make them
    mode = LargestLogits({V}, {32, 48}, limit=3)
    with mode:
        run_steps(student, teacher, "promptkd", {}, ONE, heads=False, steps=1)
    assert mode.offenders


def test_minillm_uses_full_logits():
    """MiniLLM needs per-token log-probabilities of the sampled tokens (rewards, importance
    weights, the PPO ratio), so its forwards ask for full logits even where the heads are there."""
    student, teacher = ARCHS["llama_tied"]()
    cfg = make_cfg("minillm", {"minillm": {"teacher_mix_alpha": 0.0, "ppo_epochs": 1}})
    ctx = FakeContext(student, teacher, TOK, vocab_size=V, max_steps=K, sampler=fixed_sampler, heads=True)
    assert ctx.student_head is not None and ctx.teacher_head is not None
    m = get_method_class("minillm")(cfg.minillm)
    m.setup(ctx)
    record = record_outputs(ctx, m)
    m.step(ctx, [EXAMPLES[:2]])
    assert {r[0] for r in record} == {"student_forward", "teacher_forward"}
    assert all(logits and not has_head for _, logits, has_head in record), record


# ---------------------------------------------------------------------------- through the Trainer


def _dev_cfg(tiny_jsonl):
    return {"data": {"dev": str(tiny_jsonl), "max_dev_examples": 4}}


def test_trainer_kd_steps_and_dev_loss_equal_the_logits_path(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    runs = {}
    for heads in (True, False):
        tr = trainer_for(tmp_path / str(heads), tiny_pair_dirs, tiny_jsonl, "kd", **_dev_cfg(tiny_jsonl))
        assert tr.ctx.student_head is not None and tr.ctx.teacher_head is not None
        assert tr.ctx.chunked_fallback is None
        if not heads:  # what a head that cannot be chunked gets
            monkeypatch.setattr(tr.ctx, "student_head", None)
            monkeypatch.setattr(tr.ctx, "teacher_head", None)
        record = record_outputs(tr.ctx, tr.method)
        dev0 = tr.evaluate()["dev/loss"]
        metrics = [tr.train_step().metrics for _ in range(2)]
        runs[heads] = (dev0, metrics, [p.detach().clone() for p in tr.unwrapped_student.parameters()],
                       tr.evaluate()["dev/loss"])
        # the dev loss and the steps took the form under test
        assert {r[0] for r in record} == {"student_forward", "teacher_forward"}
        assert {has_head for _, _, has_head in record} == {heads}
    (dev0_h, m_h, p_h, dev_h), (dev0_l, m_l, p_l, dev_l) = runs[True], runs[False]
    assert dev0_h == pytest.approx(dev0_l, rel=1e-6) and dev_h == pytest.approx(dev_l, rel=1e-6)
    for got, expected in zip(m_h, m_l, strict=True):
        for key in ("student/ce", "student/kd", "student/loss"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    # AdamW's first steps are about lr * sign(g): a gradient entry near 0 may take either sign
    # under float rounding, so parameters are compared to a fraction of the learning rate
    lr = 1e-3
    for a, b in zip(p_h, p_l, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0.05 * lr)


FALLBACK = "the losses use full (batch, response, vocabulary) logits"


def test_lora_on_the_lm_head_falls_back_to_logits_with_one_info_line(tmp_path, tiny_pair_dirs, tiny_jsonl, caplog):
    model = {"student_lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"]}}
    with caplog.at_level(logging.INFO, logger="promptkd.training.context"):
        tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "promptkd", model=model)
    assert tr.ctx.student_head is None and tr.ctx.teacher_head is None
    assert tr.ctx.chunked_fallback.startswith("student: ") and "PEFT" in tr.ctx.chunked_fallback
    records = [r for r in caplog.records if FALLBACK in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.INFO, [r.getMessage() for r in records]
    assert "lm_head" in records[0].getMessage() and "chunked_lm_head" not in records[0].getMessage()
    metrics = tr.train_step().metrics
    assert torch.isfinite(torch.tensor(metrics["student/loss"]))


def test_fake_context_falls_back_like_the_trainer():
    from peft import LoraConfig, get_peft_model

    student, teacher = ARCHS["llama_tied"]()
    student = get_peft_model(student, LoraConfig(r=2, target_modules=["lm_head"]))
    ctx = FakeContext(student, teacher, TOK, vocab_size=V, heads=True)
    assert ctx.student_head is None and ctx.teacher_head is None
    assert "PEFT" in ctx.chunked_fallback and "lm_head" in ctx.chunked_fallback
    batch = collate_sequences(EXAMPLES[:2], PAD)
    assert ctx.student_forward(batch).head is None and ctx.teacher_forward(batch).head is None


@pytest.mark.parametrize("key,replacement", [
    ("chunked_lm_head", "the losses use hidden states and LM heads where the head allows, full logits otherwise"),
    ("fused_losses", "the losses compile themselves when a chunk is large"),
])
@pytest.mark.parametrize("value", [True, False])
def test_the_removed_flags_are_config_errors_naming_the_replacement(key, replacement, value):
    with pytest.raises(ConfigError, match=rf"'train\.{key}' was removed: {replacement}") as err:
        config_from_dict({"method": "sft", "train": {key: value}}, check_required=False)
    assert len(err.value.problems) == 1


def test_both_removed_flags_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"method": "kd", "train": {"chunked_lm_head": True, "fused_losses": False}},
                         check_required=False)
    assert sorted(p.split("'")[1] for p in err.value.problems) == ["train.chunked_lm_head", "train.fused_losses"]
