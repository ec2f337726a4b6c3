"""Each method's `step` driven through `promptkd.testing.FakeContext` alone (no trainer, no accelerate).

    .venv/bin/python -m pytest -q tests/test_method_units.py

The fake context records every operation a method asks for, so these tests pin the order of a
PromptKD step (sample -> prompt update -> student target from the updated prompt -> student
update), which data GKD trains on, and the supervised loss of KD / SFT / SeqKD, each computed
here independently (float64, full logits, the formulas written out).
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from fakes import FakeContext

from promptkd.config import config_from_dict
from promptkd.data.batch import SequenceBatch, position_ids_from_mask
from promptkd.data.collate import collate_sequences
from promptkd.data.dataset import Example
from promptkd.losses import loss_terms
from promptkd.methods import base as methods_base
from promptkd.methods import promptkd as promptkd_module
from promptkd.methods.gkd import GKD
from promptkd.methods.kd import KD
from promptkd.methods.promptkd import PromptKD
from promptkd.methods.seqkd import SeqKD
from promptkd.methods.sft import SFT
from promptkd.testing import byte_tokenizer, tiny_llama

K = 4  # max_steps
TOK = byte_tokenizer()
PAD = TOK.pad_token_id
TEACHER = tiny_llama(num_layers=2, seed=0)
STUDENT = tiny_llama(num_layers=1, seed=1)
PAIRS = [("Say hello.\n", "hello"), ("Add 2 and 3.\n", "5"), ("Name a colour.\n", "blue"),
         ("Repeat: cat\n", "cat cat"), ("Give an animal.\n", "dog"), ("Spell abc backwards.\n", "cba")]
EXAMPLES = [Example(TOK.encode(p), TOK.encode(r) + [TOK.eos_token_id], [r]) for p, r in PAIRS]


def make_cfg(method: str, **sections):
    data = {"method": method, "train": {"max_steps": K, "seed": 5, "learning_rate": 1e-2}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return config_from_dict(data, check_required=False)


def make_ctx(teacher: bool = True, **kwargs) -> FakeContext:
    """A fresh context on copies of the tiny pair (methods change the student and wrap the teacher)."""
    return FakeContext(copy.deepcopy(STUDENT), copy.deepcopy(TEACHER) if teacher else None, TOK,
                       max_steps=K, **kwargs)


def fake_sampler(examples, *, from_teacher=False) -> SequenceBatch:
    """A deterministic stand-in for sampling: the examples' own responses."""
    return collate_sequences(examples, PAD)


def index_of(calls, call, start=0) -> int:
    return calls.index(call, start)


# ---------------------------------------------------------------------------- independent maths


def plain_forward(model, batch: SequenceBatch) -> torch.Tensor:
    """(B, T, V) logits; position t predicts token t + 1."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=position_ids_from_mask(batch.attention_mask), use_cache=False).logits


def prompted_forward(teacher, prompt: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """(B, T, V) logits of the teacher with the (n, H) prompt vectors in front of every row."""
    B, n = batch.input_ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.expand(B, n, -1), teacher.get_input_embeddings()(batch.input_ids)], 1)  # (B, n+T, H)
    mask = torch.cat([batch.attention_mask.new_ones(B, n), batch.attention_mask], 1)  # (B, n+T)
    out = teacher(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    return out.logits[:, n:]  # (B, T, V)


def response_part(full_logits: torch.Tensor, batch: SequenceBatch, vocab_size: int) -> torch.Tensor:
    """(B, R, V): the columns predicting the response tokens, as `response_logits` returns them."""
    return full_logits[:, batch.prompt_length - 1 : -1, :vocab_size]


def kl_sum(logits_a, logits_b, mask) -> torch.Tensor:
    """sum over masked positions of KL(a || b)."""
    log_a, log_b = logits_a.double().log_softmax(-1), logits_b.double().log_softmax(-1)
    return (log_a.exp() * (log_a - log_b)).sum(-1)[mask].sum()


def rmask(batch: SequenceBatch) -> torch.Tensor:
    return batch.loss_mask[:, batch.prompt_length :]  # (B, R)


def num_tokens(batches) -> float:
    return float(sum(rmask(b).sum() for b in batches))


# ---------------------------------------------------------------------------- the fake itself


def test_fake_context_provides_every_operation_methods_use():
    """Everything StepContext declares, and every `ctx.<name>` a method file uses, is on the fake."""
    ctx = make_ctx()
    declared = set(methods_base.StepContext.__annotations__) | {
        n for n, v in vars(methods_base.StepContext).items() if callable(v) and not n.startswith("_")}
    used = set()
    for module in (methods_base, *(inspect.getmodule(m) for m in (PromptKD, GKD, KD, SeqKD, SFT))):
        used |= set(re.findall(r"\bctx\.(\w+)", inspect.getsource(module)))
    missing = sorted(n for n in declared | used if not hasattr(ctx, n))
    assert not missing, missing


# ---------------------------------------------------------------------------- PromptKD


def promptkd_cfg(**promptkd):
    return make_cfg("promptkd", promptkd={"num_virtual_tokens": 3, "teacher_dropout": False, **promptkd})


def promptkd_setup(samples, monkeypatch, **promptkd):
    """(ctx, method, initial prompt, recorded student-loss inputs) for a PromptKD step on `samples`:
    the (B, R, V) student logits and target logits of each student loss (the fake serves logits)."""
    ctx = make_ctx(samples=samples, optimizer="adamw")  # AdamW: the prompt moves ~lr per entry
    method = PromptKD(promptkd_cfg(**promptkd).promptkd)
    method.setup(ctx)
    seen = []

    def recording(trained, terms, mask):
        if terms[0][0] is method.student_loss:
            seen.append((trained.states.detach().clone(), terms[0][1].states.detach().clone()))
        return loss_terms(trained, terms, mask)

    monkeypatch.setattr(promptkd_module, "distill_terms", recording)
    return ctx, method, method.prompt_params[0].detach().clone(), seen


def test_promptkd_step_order_and_student_target_from_updated_prompt(monkeypatch):
    batch = collate_sequences(EXAMPLES[:3], PAD)
    ctx, method, prompt0, seen = promptkd_setup([batch], monkeypatch)
    student0 = copy.deepcopy(ctx.student_module)
    result = method.step(ctx, [EXAMPLES[:3]])
    calls = ctx.calls

    # sample -> prompt backward -> prompt update -> target forward -> student backward -> student update
    i_sample = index_of(calls, ("sample", False))
    i_prompt = index_of(calls, ("apply_update", "prompt", result.metrics["prompt/loss"]))
    i_target = index_of(calls, ("phase", "teacher_fwd_target"))
    i_student = index_of(calls, ("apply_update", "student", result.metrics["student/loss"]))
    assert i_sample < i_prompt < i_target < i_student
    backwards = [i for i, c in enumerate(calls) if c[0] == "backward"]
    assert len(backwards) == 2 and backwards[0] < i_prompt < i_target < backwards[1] < i_student
    assert [c[1] for c in ctx.calls_named("apply_update")] == ["prompt", "student"]
    # one micro-batch, no student dropout: one student forward serves target and loss
    assert ctx.calls_named("student_forward") == [("student_forward", False)]
    assert ctx.open_phases == []

    prompt1 = method.prompt_params[0].detach()
    assert not torch.equal(prompt1, prompt0), "prompt did not move"
    ((s_logits, target),) = seen
    teacher = method.prompted.teacher
    with torch.no_grad():
        updated = response_part(prompted_forward(teacher, prompt1, batch), batch, ctx.vocab_size)
        before = response_part(prompted_forward(teacher, prompt0, batch), batch, ctx.vocab_size)
        s0 = response_part(plain_forward(student0, batch), batch, ctx.vocab_size)
    torch.testing.assert_close(target, updated, rtol=1e-5, atol=1e-5)
    assert (target - before).abs().max() > 100 * 1e-5, "target indistinguishable from the pre-update prompt's"
    torch.testing.assert_close(s_logits, s0, rtol=1e-5, atol=1e-5)  # the student before its update
    n = num_tokens([batch])
    assert result.metrics["student/loss"] == pytest.approx(float(kl_sum(s0, updated, rmask(batch))) / n, rel=1e-4)
    assert result.trained_tokens == result.generated_tokens == n


@pytest.mark.parametrize("step,lam", [(0, 1 - 1 / K), (K - 1, 0.0)])
def test_promptkd_lambda_at_step_k(step, lam, monkeypatch):
    """lambda_k = base_coef (1 - k/K) for step k = ctx.step + 1; at the last step the regulariser
    leaves the loss, but its plain-teacher forward (one per micro-batch, as at every step) still
    measures the drift."""
    ctx, method, _, _ = promptkd_setup([collate_sequences(EXAMPLES[:2], PAD)], monkeypatch)
    ctx.step = step
    metrics = method.step(ctx, [EXAMPLES[:2]]).metrics
    assert metrics["prompt/lambda"] == pytest.approx(lam, abs=1e-12)
    assert ctx.phases.count("teacher_fwd_base") == 1
    assert metrics["prompt/loss"] == pytest.approx(metrics["prompt/kl_to_student"] + lam * metrics["prompt/drift"])
    assert metrics["prompt/drift"] > 0  # the initial text prompt already moves the teacher


def test_promptkd_two_micro_batches_one_prompt_and_one_student_update(monkeypatch):
    batches = [collate_sequences(EXAMPLES[:2], PAD), collate_sequences(EXAMPLES[2:5], PAD)]
    ctx, method, _, seen = promptkd_setup(list(batches), monkeypatch)
    result = method.step(ctx, [EXAMPLES[:2], EXAMPLES[2:5]])
    calls = ctx.calls
    assert [c[1] for c in ctx.calls_named("apply_update")] == ["prompt", "student"]
    i_prompt = index_of(calls, ("apply_update", "prompt", result.metrics["prompt/loss"]))
    # two micro-batches: eval-mode student targets for the prompt loss, then the training forwards
    targets = [i for i, c in enumerate(calls) if c == ("student_forward", True)]
    forwards = [i for i, c in enumerate(calls) if c == ("student_forward", False)]
    assert len(targets) == 2 and max(targets) < i_prompt
    assert len(forwards) == 2 and min(forwards) > i_prompt
    after = calls[i_prompt:]
    assert [c for c in after if c[0] == "accumulate"] == [("accumulate", False), ("accumulate", True)]
    assert [c for c in after if c == ("phase", "teacher_fwd_target")] == [("phase", "teacher_fwd_target")] * 2
    assert len([c for c in calls[:i_prompt] if c[0] == "backward"]) == 2
    assert [s.shape[0] for s, _ in seen] == [2, 3]
    assert result.trained_tokens == result.generated_tokens == num_tokens(batches)


def test_promptkd_on_own_samples_reports_sampled_tokens():
    """With the fake's own (seeded) sampler: the step trains on what was sampled."""
    ctx = make_ctx(optimizer="adamw", max_new_tokens=5, eos_at_cap=True)
    method = PromptKD(promptkd_cfg().promptkd)
    method.setup(ctx)
    result = method.step(ctx, [EXAMPLES[:3]])
    (batch,) = ctx.batches
    assert ctx.calls_named("sample") == [("sample", False)]
    assert result.trained_tokens == result.generated_tokens == num_tokens([batch]) > 0


def test_promptkd_exception_inside_step_leaves_the_context_consistent(monkeypatch):
    ctx, method, _, _ = promptkd_setup([collate_sequences(EXAMPLES[:2], PAD)], monkeypatch)
    prompt_update = ctx.apply_update

    def failing_after_the_prompt(name, loss_value):
        out = prompt_update(name, loss_value)
        monkeypatch.setattr(promptkd_module, "distill_terms", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        return out

    monkeypatch.setattr(ctx, "apply_update", failing_after_the_prompt)
    ctx.student_module.train()
    with pytest.raises(RuntimeError, match="boom"):
        method.step(ctx, [EXAMPLES[:2]])
    assert ctx.open_phases == []
    assert ctx.student_module.training
    assert [c[1] for c in ctx.calls_named("apply_update")] == ["prompt"]  # the student was not updated


# ---------------------------------------------------------------------------- GKD


def gkd_draws(cfg, steps, *, rng_seed) -> list[tuple[int, bool, dict]]:
    """(step, on-policy, sample/collate calls) for one step at each ctx.step in `steps`."""
    out = []
    ctx = make_ctx(sampler=fake_sampler, seed=cfg.train.seed)
    method = GKD(cfg.gkd)
    method.setup(ctx)
    torch.manual_seed(rng_seed)  # the draw must not read the global RNG
    for step in steps:
        ctx.step = step
        ctx.calls.clear()
        result = method.step(ctx, [EXAMPLES[:2]])
        on_policy = bool(result.metrics["on_policy"])
        sources = [c for c in ctx.calls if c[0] in ("sample", "collate")]
        assert sources == ([("sample", False)] if on_policy else [("collate",)])
        assert result.generated_tokens == (result.trained_tokens if on_policy else 0.0)
        out.append((step, on_policy))
    return out


def test_gkd_on_policy_draw_depends_on_step_and_seed_only():
    cfg = make_cfg("gkd", gkd={"lmbda": 0.5})
    steps = [0, 1, 2, 3, 4, 5]
    first = gkd_draws(cfg, steps, rng_seed=0)
    again = gkd_draws(cfg, steps[::-1], rng_seed=123)  # other order, other global RNG state
    assert sorted(first) == sorted(again)
    assert {p for _, p in first} == {True, False}  # both kinds of step were exercised
    assert [on for _, on in first] == [GKD(cfg.gkd).on_policy(s, cfg.train.seed) for s in steps]
    other_seed = make_cfg("gkd", gkd={"lmbda": 0.5}, train={"seed": 6})
    assert [GKD(cfg.gkd).on_policy(s, 5) for s in range(32)] != [GKD(other_seed.gkd).on_policy(s, 6) for s in range(32)]


def test_gkd_off_policy_seq_kd_samples_from_the_teacher():
    ctx = make_ctx(max_new_tokens=4)
    method = GKD(make_cfg("gkd", gkd={"lmbda": 0.0, "seq_kd": True}).gkd)
    method.setup(ctx)
    result = method.step(ctx, [EXAMPLES[:2]])
    assert ctx.calls_named("sample") == [("sample", True)] and not ctx.calls_named("collate")
    assert result.metrics["on_policy"] == 0.0
    assert result.trained_tokens == result.generated_tokens == num_tokens(ctx.batches)  # the teacher sampled them


def test_gkd_lmbda_zero_trains_on_dataset_responses_with_its_divergence():
    ctx = make_ctx()
    student0 = copy.deepcopy(ctx.student_module)
    method = GKD(make_cfg("gkd", gkd={"lmbda": 0.0}).gkd)  # generalized_jsd, beta 1 = reverse KL
    method.setup(ctx)
    result = method.step(ctx, [EXAMPLES[:3]])
    assert ctx.calls_named("collate") == [("collate",)] and not ctx.calls_named("sample")
    (batch,) = ctx.batches
    expected = collate_sequences(EXAMPLES[:3], PAD)
    assert torch.equal(batch.input_ids, expected.input_ids) and torch.equal(batch.loss_mask, expected.loss_mask)
    with torch.no_grad():
        s = response_part(plain_forward(student0, batch), batch, ctx.vocab_size)
        t = response_part(plain_forward(ctx.teacher, batch), batch, ctx.vocab_size)
    kd = float(kl_sum(s, t, rmask(batch))) / num_tokens([batch])
    assert result.metrics["student/kd"] == pytest.approx(kd, rel=1e-4)
    assert result.metrics["student/loss"] == pytest.approx(kd, rel=1e-4)


# ---------------------------------------------------------------------------- KD / SFT / SeqKD


def supervised_reference(student, teacher, batches, kd_ratio, vocab_size):
    """(loss, ce, kl, grads): (1 - r) CE + r KL(p_T || p_S), token mean over all batches, float64."""
    student = copy.deepcopy(student).double()
    teacher = copy.deepcopy(teacher).double() if teacher is not None else None
    n = num_tokens(batches)
    ce = kl = torch.zeros((), dtype=torch.float64)
    for b in batches:
        mask = rmask(b)
        s = response_part(plain_forward(student, b), b, vocab_size)  # (B, R, V)
        targets = b.input_ids[:, b.prompt_length :]  # (B, R)
        ce = ce - s.log_softmax(-1).gather(-1, targets[..., None])[..., 0][mask].sum()
        if kd_ratio > 0:
            with torch.no_grad():
                t = response_part(plain_forward(teacher, b), b, vocab_size)
            kl = kl + kl_sum(t, s, mask)
    loss = ((1 - kd_ratio) * ce + kd_ratio * kl) / n
    grads = torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad])
    return float(loss.detach()), float(ce.detach()) / n, float(kl.detach()) / n, grads


@pytest.mark.parametrize("cls,sections,kd_ratio", [
    (SFT, {}, 0.0),
    (KD, {"kd": {"kd_ratio": 0.5}}, 0.5),
    (KD, {"kd": {"kd_ratio": 0.25}}, 0.25),
    (SeqKD, {}, 0.5),  # the reference's SeqKD: 0.5 CE + 0.5 forward KL
    (SeqKD, {"seqkd": {"kd_ratio": 0.0}}, 0.0),
], ids=["sft", "kd-0.5", "kd-0.25", "seqkd", "seqkd-ce-only"])
def test_supervised_loss_is_ce_plus_forward_kl(cls, sections, kd_ratio):
    """Two micro-batches with different token counts: one update, the loss and its gradient are
    the token mean over the whole step of (1 - r) CE + r KL(p_T || p_S)."""
    cfg = make_cfg(cls.name, **sections)
    options = getattr(cfg, cls.name, None)  # the method's own section (SFT has none)
    ctx = make_ctx(teacher=cls.needs_teacher(options))
    student0 = copy.deepcopy(ctx.student_module)
    method = cls(options)
    method.setup(ctx)
    micro_batches = [EXAMPLES[:2], EXAMPLES[2:5]]
    result = method.step(ctx, micro_batches)
    assert len(ctx.calls_named("collate")) == 2 and not ctx.calls_named("sample")
    assert [c[1] for c in ctx.calls_named("apply_update")] == ["student"]
    assert [c[1] for c in ctx.calls_named("accumulate")] == [False, True]
    assert len(ctx.calls_named("teacher_forward")) == (2 if kd_ratio > 0 else 0)
    assert result.trained_tokens == num_tokens(ctx.batches) and result.generated_tokens == 0.0

    loss, ce, kl, grads = supervised_reference(student0, ctx.teacher, ctx.batches, kd_ratio, ctx.vocab_size)
    assert result.metrics["student/ce"] == pytest.approx(ce, rel=1e-5)
    assert result.metrics["student/loss"] == pytest.approx(loss, rel=1e-5)
    if kd_ratio > 0:
        assert result.metrics["student/kd"] == pytest.approx(kl, rel=1e-4)
    else:
        assert "student/kd" not in result.metrics
    scale = max(float(g.abs().max()) for g in grads)
    for i, (got, want) in enumerate(zip(ctx.grads["student"], grads, strict=True)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, i=i: f"grad {i}: {m}")


def test_sft_never_calls_the_teacher():
    ctx = make_ctx(teacher=False)
    method = SFT()
    method.setup(ctx)
    method.step(ctx, [EXAMPLES[:3]])
    assert not ctx.calls_named("teacher_forward")
    assert "teacher_fwd_base" not in ctx.phases
