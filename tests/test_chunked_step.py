"""train.chunked_lm_head: training steps on hidden states + LM heads equal the logits path.

    .venv/bin/python -m pytest -q tests/test_chunked_step.py

Every method that takes the chunked path (PromptKD in each of its variants, GKD, KD, SeqKD, SFT,
DistiLLM) runs two steps twice from the same models on the same batches, once with the losses
on hidden states and LM heads (`promptkd.head_losses`) and once on (B, R, V) logits, through
`promptkd.testing.FakeContext`; the trained parameters (student and prompt), the gradients and
the logged metrics agree to float32 rounding. Models: a tiny Llama with tied embeddings, GPT-2
(its head tied to the token embedding, Conv1D layers) and an untied Qwen2. Through the Trainer: KD's steps and the
dev loss, the fallback to logits for a head that cannot be chunked (LoRA on lm_head), and
`false` really taking the logits path. The PromptKD step against its float64 reference, on both
paths, is in tests/test_promptkd_step_pinned.py.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from test_head_losses import LargestLogits
from test_methods import trainer_for

from promptkd import head_losses
from promptkd.config import config_from_dict
from promptkd.data.collate import collate_sequences
from promptkd.data.dataset import Example
from promptkd.methods import base as methods_base
from promptkd.methods import get_method_class
from promptkd.testing import FakeContext, byte_tokenizer, tiny_llama

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
    "promptkd_forward_directions": ("promptkd", {"promptkd": {"kd_direction": "forward", "reg_direction": "forward",
                                                              "student_divergence": "generalized_jsd"}}, ONE),
    "promptkd_lagged_target": ("promptkd", {"promptkd": {"lagged_target": True}}, ONE),
    "promptkd_freeze_prompt": ("promptkd", {"promptkd": {"freeze_prompt": True}}, ONE),
    "promptkd_no_regulariser": ("promptkd", {"promptkd": {"base_coef": 0.0}}, TWO),
    # the drift guard keeps step 1's update (drift 3.0e-4 -> 1.57e-3) and undoes step 2's (-> 2.0e-3)
    "promptkd_max_drift": ("promptkd", {"promptkd": {"base_coef": 0.0, "prompt_learning_rate": 10.0,
                                                     "max_drift": 1.8e-3}}, TWO),
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


def run_steps(student, teacher, method: str, sections: dict, micro_batches, *, chunked: bool, steps: int = 2):
    """(ctx, the metrics of each step) after `steps` steps of `method` on copies of the models."""
    cls = get_method_class(method)
    cfg = make_cfg(method, sections)
    ctx = FakeContext(copy.deepcopy(student), copy.deepcopy(teacher) if cls.needs_teacher(cfg) else None, TOK,
                      vocab_size=V, max_steps=K, sampler=fixed_sampler, chunked_lm_head=chunked)
    assert ctx.chunked is chunked, ctx.chunked_fallback
    m = cls(cfg)
    m.setup(ctx)
    metrics = []
    for step in range(steps):
        ctx.step = step
        metrics.append(m.step(ctx, [[EXAMPLES[i] for i in mb] for mb in micro_batches]).metrics)
    return ctx, metrics


def trained_tensors(ctx) -> dict[str, list[torch.Tensor]]:
    return {name: [p.detach() for p in params] for name, (params, _) in ctx.param_sets.items()}


def assert_tensors_close(got, expected, what):
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        scale = float(b.abs().max()) or 1.0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale, msg=lambda m, i=i: f"{what} {i}: {m}")


# ---------------------------------------------------------------------------- both paths, every method


# every case on the tied Llama; the main path of each loss kind on the other architectures
RUNS = [(case, "llama_tied") for case in CASES] + [
    (case, arch) for arch in ("gpt2", "qwen2_untied") for case in ("promptkd", "promptkd_accumulation", "gkd_jsd", "kd")
]


@pytest.mark.parametrize("case,arch", RUNS, ids=[f"{c}-{a}" for c, a in RUNS])
def test_two_steps_equal_the_logits_path(case, arch):
    method, sections, micro_batches = CASES[case]
    student, teacher = ARCHS[arch]()
    (ctx_c, metrics_c), (ctx_l, metrics_l) = (
        run_steps(student, teacher, method, sections, micro_batches, chunked=chunked) for chunked in (True, False)
    )
    # the chunked run took no logits, the logits run no hidden states
    assert not any(c[0].endswith("_logits") for c in ctx_c.calls)
    assert not any(c[0].endswith("_hidden") for c in ctx_l.calls)
    assert ctx_c.calls_named("student_hidden")
    trained_c, trained_l = trained_tensors(ctx_c), trained_tensors(ctx_l)
    assert trained_c.keys() == trained_l.keys() == ({"student", "prompt"} if method == "promptkd" else {"student"})
    assert ctx_c.grads.keys() == ctx_l.grads.keys()  # freeze_prompt: no prompt update
    for name in ctx_c.grads:
        assert_tensors_close(ctx_c.grads[name], ctx_l.grads[name], f"{name} grad (last step)")
    for name in trained_c:
        assert_tensors_close(trained_c[name], trained_l[name], f"{name} after 2 steps")
    moved = [not torch.equal(a, b) for a, b in zip(trained_c["student"], student.parameters(), strict=True)]
    assert any(moved)  # the steps did train
    if case == "promptkd_max_drift":
        assert [m["prompt/frozen_by_guard"] for m in metrics_c] == [0.0, 1.0]
    for got, expected in zip(metrics_c, metrics_l, strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_no_logits_sized_tensor_in_a_chunked_promptkd_or_kd_step(monkeypatch):
    """With chunks of 3 positions, no tensor in any pass of a whole step (forwards, losses,
    backward, both optimizer updates) has a vocabulary dim with more than 3 rows, except the
    (V, H) head / embedding weights and their gradients."""
    monkeypatch.setattr(head_losses, "CHUNK_ELEMENTS", 3 * V)
    student, teacher = ARCHS["llama_tied"]()
    for method, sections, micro_batches in (CASES["promptkd"], CASES["promptkd_accumulation"],
                                            CASES["promptkd_max_drift"], CASES["kd"]):
        mode = LargestLogits({V}, {32, 48}, limit=3)
        with mode:
            run_steps(student, teacher, method, sections, micro_batches, chunked=True, steps=1)
        assert mode.offenders == [], (method, mode.offenders[:5])
    # the same step on logits does make them
    mode = LargestLogits({V}, {32, 48}, limit=3)
    with mode:
        run_steps(student, teacher, "promptkd", {}, ONE, chunked=False, steps=1)
    assert mode.offenders


def test_minillm_keeps_the_logits_path():
    """MiniLLM needs per-token log-probabilities of the sampled tokens (rewards, importance
    weights, the PPO ratio), so it takes logits whatever the flag says."""
    student, teacher = ARCHS["llama_tied"]()
    cfg = make_cfg("minillm", {"minillm": {"teacher_mix_alpha": 0.0, "ppo_epochs": 1}})
    ctx = FakeContext(student, teacher, TOK, vocab_size=V, max_steps=K, sampler=fixed_sampler, chunked_lm_head=True)
    assert ctx.chunked
    m = get_method_class("minillm")(cfg)
    m.setup(ctx)
    m.step(ctx, [EXAMPLES[:2]])
    assert ctx.calls_named("student_logits") and not ctx.calls_named("student_hidden")


# ---------------------------------------------------------------------------- through the Trainer


def _dev_cfg(tiny_jsonl):
    return {"data": {"dev": str(tiny_jsonl), "max_dev_examples": 4}}


def test_trainer_kd_steps_and_dev_loss_equal_the_logits_path(tmp_path, tiny_pair_dirs, tiny_jsonl):
    runs = {}
    for chunked in (True, False):
        tr = trainer_for(tmp_path / str(chunked), tiny_pair_dirs, tiny_jsonl, "kd",
                         train={"chunked_lm_head": chunked}, **_dev_cfg(tiny_jsonl))
        assert tr.ctx.chunked is chunked and tr.ctx.chunked_fallback is None
        assert (tr.ctx.student_head is not None) is chunked and (tr.ctx.teacher_head is not None) is chunked
        dev0 = tr.evaluate()["dev/loss"]
        metrics = [tr.train_step().metrics for _ in range(2)]
        runs[chunked] = (dev0, metrics, [p.detach().clone() for p in tr.unwrapped_student.parameters()],
                         tr.evaluate()["dev/loss"])
    (dev0_c, m_c, p_c, dev_c), (dev0_l, m_l, p_l, dev_l) = runs[True], runs[False]
    assert dev0_c == pytest.approx(dev0_l, rel=1e-6) and dev_c == pytest.approx(dev_l, rel=1e-6)
    for got, expected in zip(m_c, m_l, strict=True):
        for key in ("student/ce", "student/kd", "student/loss"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    # AdamW's first steps are about lr * sign(g): a gradient entry near 0 may take either sign
    # under float rounding, so parameters are compared to a fraction of the learning rate
    lr = 1e-3
    for a, b in zip(p_c, p_l, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0.05 * lr)


def test_lora_on_the_lm_head_falls_back_to_logits_with_one_info_line(tmp_path, tiny_pair_dirs, tiny_jsonl, caplog):
    model = {"student_lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "lm_head"]}}
    with caplog.at_level(logging.INFO, logger="promptkd.training.context"):
        tr = trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "promptkd", model=model)
    assert not tr.ctx.chunked and tr.ctx.student_head is None
    assert "PEFT" in tr.ctx.chunked_fallback and "student" in tr.ctx.chunked_fallback
    lines = [r.getMessage() for r in caplog.records if "chunked_lm_head" in r.getMessage()]
    assert len(lines) == 1 and "full" in lines[0] and "lm_head" in lines[0], lines
    assert all(r.levelno == logging.INFO for r in caplog.records if "chunked_lm_head" in r.getMessage())
    metrics = tr.train_step().metrics
    assert torch.isfinite(torch.tensor(metrics["student/loss"]))


def test_fake_context_falls_back_like_the_trainer():
    from peft import LoraConfig, get_peft_model

    student, teacher = ARCHS["llama_tied"]()
    student = get_peft_model(student, LoraConfig(r=2, target_modules=["lm_head"]))
    ctx = FakeContext(student, teacher, TOK, vocab_size=V, chunked_lm_head=True)
    assert not ctx.chunked and "train.chunked_lm_head false" in ctx.chunked_fallback


def test_flag_off_never_touches_head_losses(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """chunked_lm_head false: the heads are not even looked up, and a step that called any
    chunked loss would fail here."""
    def refuse(*args, **kwargs):
        raise AssertionError("a chunked loss ran with train.chunked_lm_head false")

    for name in ("head_divergence", "head_divergences", "hidden_states_for_response"):
        monkeypatch.setattr(methods_base, name, refuse)
    monkeypatch.setattr("promptkd.training.context.lm_head_of", refuse)
    monkeypatch.setattr("promptkd.training.dev_eval.head_cross_entropy", refuse)
    for method in ("promptkd", "gkd"):
        tr = trainer_for(tmp_path / method, tiny_pair_dirs, tiny_jsonl, method,
                         train={"chunked_lm_head": False}, **_dev_cfg(tiny_jsonl))
        assert not tr.ctx.chunked and tr.ctx.chunked_fallback is None
        tr.train_step()
        tr.evaluate()
    # and the same patches do break the default (on)
    with pytest.raises(AssertionError, match="chunked loss ran"):
        trainer_for(tmp_path / "on", tiny_pair_dirs, tiny_jsonl, "gkd")


def test_the_flag_defaults_to_on():
    cfg = config_from_dict({"method": "sft"}, check_required=False)
    assert cfg.train.chunked_lm_head is True
