"""One PromptKD optimizer step, pinned against a straight-line float64 computation of it.

    .venv/bin/python -m pytest -q tests/test_promptkd_step_pinned.py

The trainer's step (float32, `response_logits` slices, chunked KL with a closed-form backward,
fused AdamW) must equal `reference_step`: plain forwards with full (B, T, V) logits in float64,
the KLs written out, `torch.autograd.grad`, and AdamW's first update written as a formula. Both
see the SAME sampled batch: the test records what the step context's `sample` returned and each
parameter set's gradients as its `apply_update` receives them (before clipping and the optimizer
step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from test_methods import trainer_for

from promptkd.data.batch import SequenceBatch

K = 4  # max_steps: the first step's lambda is base_coef * (1 - 1/K) = 0.75
LR, PROMPT_LR = 1e-3, 3e-3  # different, so swapping the two would show
WD, PROMPT_WD = 0.1, 0.05
EPS = 1e-8  # torch.optim.AdamW's default; build_optimizer passes none
CLIP = 1e-6  # clipped gradients of order AdamW's eps, where clipping changes the update


# ------------------------------------------------------------------------------------------
# The straight-line reference
# ------------------------------------------------------------------------------------------


def plain_forward(model, batch: SequenceBatch) -> torch.Tensor:
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding skipped
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos, use_cache=False)
    return out.logits  # (B, T, V)


def prompted_forward(teacher, prompt: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """The teacher with the n soft-prompt vectors (n, H) in front of every row."""
    B, n = batch.input_ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.expand(B, n, -1), teacher.get_input_embeddings()(batch.input_ids)], 1)  # (B, n+T, H)
    mask = torch.cat([batch.attention_mask.new_ones(B, n), batch.attention_mask], 1)  # (B, n+T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, n+T): prompt at 0..n-1, real tokens from n on
    out = teacher(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.logits[:, n:]  # (B, T, V): virtual positions dropped


def kl_sum(logits_a, logits_b, batch: SequenceBatch) -> torch.Tensor:
    """sum over response positions of KL(a || b) = sum_v a (log a - log b); position t predicts t+1."""
    log_a, log_b = logits_a[:, :-1].log_softmax(-1), logits_b[:, :-1].log_softmax(-1)  # (B, T-1, V)
    kl = (log_a.exp() * (log_a - log_b)).sum(-1)  # (B, T-1)
    return kl[batch.loss_mask[:, 1:]].sum()


def adamw_first_step(p, g, *, lr, weight_decay, betas=(0.9, 0.999)):
    """torch.optim.AdamW from zero state, step 1: decoupled decay, bias-corrected moments."""
    b1, b2 = betas
    m, v = (1 - b1) * g, (1 - b2) * g * g  # moments after one update from zero
    m_hat, v_hat = m / (1 - b1), v / (1 - b2)  # bias correction with t = 1
    return p * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + EPS)


def clipped(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1."""
    if max_norm <= 0:
        return grads
    norm = torch.stack([g.norm() for g in grads]).norm()
    return [g * (max_norm / (norm + 1e-6)).clamp(max=1.0) for g in grads]


def reference_step(teacher, student, prompt, batches, *, lam, target="updated", max_norm=0.0):
    """The PromptKD step (methods/promptkd.py docstring) in float64 on the given micro-batches.

    target: the student's target, "updated" (prompt after its update: the paper), "lagged"
    (prompt before it) or "plain" (the teacher without prompt: freeze_prompt, no prompt update).
    """
    teacher, student = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
    prompt = prompt.detach().double().requires_grad_(True)  # (n, H)
    num_tokens = sum(b.loss_mask.sum() for b in batches)  # response tokens of the whole step
    with torch.no_grad():
        s_logits = [plain_forward(student, b) for b in batches]  # sg p_S, (B, T, V) each
        t_logits = [plain_forward(teacher, b) for b in batches]  # sg p_T
    out = {}
    if target != "plain":
        # 1. prompt update: L = KL(p_TP || sg p_S) + lambda KL(p_TP || sg p_T)
        tp_logits = [prompted_forward(teacher, prompt, b) for b in batches]
        loss = sum(
            kl_sum(tp, s, b) + lam * kl_sum(tp, t, b)
            for tp, s, t, b in zip(tp_logits, s_logits, t_logits, batches, strict=True)
        )
        out["prompt/loss"] = float(loss.detach() / num_tokens)
        (g,) = torch.autograd.grad(loss / num_tokens, prompt)  # (n, H)
        out["prompt_grad"] = g
        (g,) = clipped([g], max_norm)
        out["prompt"] = adamw_first_step(prompt.detach(), g, lr=PROMPT_LR, weight_decay=PROMPT_WD)
    with torch.no_grad():
        targets = {
            "updated": lambda: [prompted_forward(teacher, out["prompt"], b) for b in batches],
            "lagged": lambda: [tp.detach() for tp in tp_logits],
            "plain": lambda: t_logits,
        }[target]()
    # 2. student update: L = KL(p_S || sg target)
    params = list(student.parameters())
    loss = sum(kl_sum(plain_forward(student, b), tgt, b) for tgt, b in zip(targets, batches, strict=True))
    out["student/loss"] = float(loss.detach() / num_tokens)
    out["student_grads"] = torch.autograd.grad(loss / num_tokens, params)
    out["student"] = [  # build_optimizer: no weight decay on 1-D tensors (norm weights)
        adamw_first_step(p.detach(), g, lr=LR, weight_decay=WD if p.ndim >= 2 else 0.0)
        for p, g in zip(params, clipped(out["student_grads"], max_norm), strict=True)
    ]
    return out


# ------------------------------------------------------------------------------------------
# The trainer's step, recorded
# ------------------------------------------------------------------------------------------


def promptkd_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl, *, train=None, promptkd=None):
    train = {"max_steps": K, "batch_size": 2, "max_grad_norm": 0.0, "warmup_steps": 0, "lr_scheduler": "constant",
             "learning_rate": LR, "weight_decay": WD, **(train or {})}
    promptkd = {"teacher_dropout": False, "prompt_learning_rate": PROMPT_LR, "prompt_weight_decay": PROMPT_WD,
                **(promptkd or {})}
    return trainer_for(tmp_path, tiny_pair_dirs, tiny_jsonl, "promptkd", train=train, promptkd=promptkd)


def ended_early(batch: SequenceBatch, row: int, length: int, eos_id: int, pad_id: int) -> SequenceBatch:
    """The batch with `row`'s response ending in EOS after `length` tokens: a sample the student
    could have drawn, so responses are ragged (right padding inside the loss region's width)."""
    ids, attn, loss = batch.input_ids.clone(), batch.attention_mask.clone(), batch.loss_mask.clone()
    end = batch.prompt_length + length  # first column after the response
    ids[row, end - 1], ids[row, end:] = eos_id, pad_id
    attn[row, end:], loss[row, end:] = 0, False
    return SequenceBatch(ids, attn, loss, batch.prompt_length)


def rows(batch: SequenceBatch, index: list) -> SequenceBatch:
    """These rows alone, without all-padding columns: the layout collate gives them."""
    ids, attn, loss = batch.input_ids[index], batch.attention_mask[index], batch.loss_mask[index]
    used = attn.bool().any(0)  # (T,)
    lead, trail = int(used.long().argmax()), int(used.flip(0).long().argmax())
    cols = slice(lead, used.numel() - trail)
    return SequenceBatch(ids[:, cols], attn[:, cols], loss[:, cols], batch.prompt_length - lead)


@dataclass
class Run:
    prompt0: torch.Tensor  # (n, H), before the step
    student0: torch.nn.Module  # a copy, before the step
    batches: list  # the micro-batches the step trained on
    grads: dict  # {"prompt": [...], "student": [...]} as apply_update received them
    metrics: dict
    prompt1: torch.Tensor  # after the step
    student1: list  # parameters after the step


def recorded_step(tr, monkeypatch, feed=None) -> Run:
    """One trainer step, recording its batches and gradients.

    feed: micro-batches for `tr.ctx.sample` to return (in order) instead of sampling. Without it,
    row 0 of each sampled micro-batch is made to end early (`ended_early`).
    """
    ctx = tr.ctx
    sample, apply_update = ctx.sample, ctx.apply_update
    batches, grads = [], {}

    def record_sample(examples, *args, **kwargs):
        if feed:
            batch = feed.pop(0)
        else:
            batch = ended_early(sample(examples, *args, **kwargs), 0, 3, ctx.eos_token_ids[0], ctx.pad_token_id)
        batches.append(batch)
        return batch

    def record_update(name, loss_value):
        params = list(tr.student.parameters()) if name == "student" else ctx.param_sets[name].params
        grads[name] = [p.grad.detach().clone() for p in params]
        return apply_update(name, loss_value)

    monkeypatch.setattr(ctx, "sample", record_sample)
    monkeypatch.setattr(ctx, "apply_update", record_update)
    prompt0, student0 = tr.method.prompt_params[0].detach().clone(), copy.deepcopy(tr.unwrapped_student)
    metrics = tr.train_step().metrics
    return Run(prompt0, student0, batches, grads, metrics, tr.method.prompt_params[0].detach().clone(),
               [p.detach().clone() for p in tr.unwrapped_student.parameters()])


# ------------------------------------------------------------------------------------------
# Comparisons. Observed float32-vs-float64 errors (tiny Llama pair, CPU) are in the comments.
# ------------------------------------------------------------------------------------------


GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # the atol is relative to the parameter set's largest gradient entry


def grad_tolerance(expected: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per entry, how far a float32 gradient may be from the float64 one (observed: <= 2.1e-6 of the
    parameter set's largest entry)."""
    scale = max(float(e.abs().max()) for e in expected)
    return [GRAD_ATOL * scale + GRAD_RTOL * e.abs() for e in expected]


def assert_grads_close(actual, expected, what):
    for i, (a, e, tol) in enumerate(zip(actual, expected, grad_tolerance(expected), strict=True)):
        err = (a.double() - e).abs()
        assert bool((err <= tol).all()), (
            f"{what} {i}: {int((err > tol).sum())} / {err.numel()} elements out of tolerance, "
            f"greatest absolute difference {float(err.max()):.3e}")


# torch's float32 AdamW step rounds about 12 times (moments, bias corrections, sqrt, eps, the
# division, the step size, the decay, the subtraction), each by up to 2^-24 of a value no larger
# than |p| + lr: one unit of 2^-24 (|p| + lr) per rounding bounds their sum (observed: up to 4.7).
F32_UPDATE_ROUNDING = 12


def first_adam_step_tolerance(g, delta, lr):
    """Bound on how far AdamW's first update can move when its gradient moves by up to `delta`.

    Less its decay (exact), the first step is u(x) = lr * x / (|x| + EPS) (m_hat = x, sqrt(v_hat) =
    |x|), with |u'(x)| = lr * EPS / (|x| + EPS)^2: flat where |x| >> EPS, steep near 0. So a gradient
    within `delta` of g moves u by at most lr * delta * EPS / (m + EPS)^2, m the smallest |x| within
    delta of g, and never by more than 2 lr (a sign flip of a gradient at noise level).
    """
    nearest = (g.abs() - delta).clamp(min=0)
    return lr * torch.clamp(delta * EPS / (nearest + EPS) ** 2, max=2.0)


def assert_updated(after, before, grads, expected, what, *, lr, weight_decays, max_norm, ref_grads):
    """Parameters after the optimizer step.

    Tight: AdamW's formula applied to the trainer's own gradients (pins lr, decoupled decay,
    the no-decay 1-D tensors, eps, clipping; observed error 6e-8, float32 rounding of 1.0).
    End to end, against the float64 step: the update from the reference gradients, within what
    gradients inside assert_grads_close's tolerance can move it (first_adam_step_tolerance: near
    zero, Adam's normalisation turns float32 noise into up to 2 lr), plus the float32 rounding of
    the update (F32_UPDATE_ROUNDING).
    """
    clipped_grads = clipped([g.double() for g in grads], max_norm)
    ref_clipped = clipped(list(ref_grads), max_norm)
    delta = grad_tolerance(list(ref_grads))
    if max_norm > 0:  # both are scaled by about c = max_norm / norm, whose relative error is the norm's
        norm = float(torch.stack([h.norm() for h in ref_grads]).norm())
        c, rel = min(1.0, max_norm / (norm + 1e-6)), float(torch.stack([d.norm() for d in delta]).norm()) / norm
        delta = [c * (d + h.abs() * rel) for d, h in zip(delta, ref_grads, strict=True)]
    for i, (a, p0, g, wd, e, h, d) in enumerate(
            zip(after, before, clipped_grads, weight_decays, expected, ref_clipped, delta, strict=True)):
        formula = adamw_first_step(p0.double(), g, lr=lr, weight_decay=wd)
        torch.testing.assert_close(a.double(), formula, rtol=1e-6, atol=1e-9, msg=lambda m, i=i: f"{what} {i} (AdamW): {m}")
        err = (a.double() - e).abs()
        tol = first_adam_step_tolerance(h, d, lr) + F32_UPDATE_ROUNDING * 2.0**-24 * (p0.double().abs() + lr)
        assert bool((err <= tol).all()), (
            f"{what} {i}: {int((err > tol).sum())} / {err.numel()} elements out of tolerance, greatest absolute "
            f"difference {float(err.max()):.3e}, greatest over its tolerance {float((err / tol).max()):.3g}x")


def assert_step_matches(run: Run, ref: dict, *, max_norm=0.0):
    if "prompt" in ref:
        assert_grads_close(run.grads["prompt"], [ref["prompt_grad"]], "prompt grad")
        assert_updated([run.prompt1], [run.prompt0], run.grads["prompt"], [ref["prompt"]], "prompt",
                       lr=PROMPT_LR, weight_decays=[PROMPT_WD], max_norm=max_norm, ref_grads=[ref["prompt_grad"]])
        assert run.metrics["prompt/loss"] == pytest.approx(ref["prompt/loss"], rel=1e-4)  # observed 6e-6
        assert run.metrics["prompt/lambda"] == 1 - 1 / K
    else:
        assert "prompt" not in run.grads and "prompt/loss" not in run.metrics
        assert torch.equal(run.prompt1, run.prompt0)
    student0 = list(run.student0.parameters())
    assert_grads_close(run.grads["student"], ref["student_grads"], "student grad")
    assert_updated(run.student1, student0, run.grads["student"], ref["student"], "student", lr=LR,
                   weight_decays=[WD if p.ndim >= 2 else 0.0 for p in student0], max_norm=max_norm,
                   ref_grads=ref["student_grads"])
    assert run.metrics["student/loss"] == pytest.approx(ref["student/loss"], rel=1e-4)  # observed 4e-6


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------


def test_reference_prompted_forward_is_the_prompted_teacher(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """The reference's own prompt-in-front forward equals PromptedTeacher's (ragged padding)."""
    tr = promptkd_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl)
    batch = ended_early(tr.ctx.sample(tr.train_examples[:3]), 1, 2, tr.ctx.eos_token_ids[0], tr.ctx.pad_token_id)
    assert batch.attention_mask[:, 0].tolist().count(0) >= 1  # some prompt is left-padded
    prompted = tr.method.prompted
    with torch.no_grad():
        expected = prompted(batch.input_ids, batch.attention_mask)  # (B, T, V) float32
        got = prompted_forward(copy.deepcopy(tr.teacher).double(), prompted.prompt_parameters()[0].double(), batch)
    torch.testing.assert_close(got, expected.double(), rtol=1e-5, atol=1e-5)


CASES = {  # name: (config sections, the student's target in the reference, force two student forwards)
    "shared_student_forward": ({}, "updated", False),
    "two_student_forwards": ({}, "updated", True),
    "clipped": ({"train": {"max_grad_norm": CLIP}}, "updated", False),
}


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked_lm_head", "logits"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_step_equals_the_float64_reference(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch, case, chunked):
    """Both forms of outputs: hidden states + LM heads (the default) and full logits (the
    fallback for heads that cannot be chunked)."""
    sections, target, two_forwards = CASES[case]
    tr = promptkd_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl, **sections)
    assert tr.ctx.student_head is not None and tr.ctx.teacher_head is not None
    if not chunked:
        monkeypatch.setattr(tr.ctx, "student_head", None)
        monkeypatch.setattr(tr.ctx, "teacher_head", None)
    if two_forwards:  # what a student with dropout gets: an eval-mode target forward + a train forward
        monkeypatch.setattr(tr.method, "student_dropout", True)
    target_forwards = []
    student_forward = tr.ctx.student_forward
    monkeypatch.setattr(tr.ctx, "student_forward", lambda b, target=False, **kw: (
        target_forwards.append(b) if target else None) or student_forward(b, target=target, **kw))
    run = recorded_step(tr, monkeypatch)
    assert len(target_forwards) == int(two_forwards)  # the path under test was taken
    max_norm = tr.cfg.train.max_grad_norm
    ref = reference_step(tr.teacher, run.student0, run.prompt0, run.batches, lam=1 - 1 / K, target=target, max_norm=max_norm)
    assert_step_matches(run, ref, max_norm=max_norm)


def test_two_half_micro_batches_make_the_same_step_as_one(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """Accumulation: 2 micro-batches of B/2 (each padded for its own rows, with different token
    counts) give the step of 1 micro-batch of B on the same samples: one prompt update over
    both, the token mean over the whole step, the student target from the updated prompt."""
    whole = promptkd_trainer(tmp_path / "whole", tiny_pair_dirs, tiny_jsonl, train={"batch_size": 4})
    run_whole = recorded_step(whole, monkeypatch)
    (batch,) = run_whole.batches
    by_prompt_length = batch.attention_mask[:, : batch.prompt_length].sum(1).argsort().tolist()
    halves = [rows(batch, by_prompt_length[:2]), rows(batch, by_prompt_length[2:])]
    assert halves[0].prompt_length < halves[1].prompt_length  # less left padding in the first
    assert halves[0].num_loss_tokens != halves[1].num_loss_tokens  # a per-micro-batch mean would differ
    split = promptkd_trainer(tmp_path / "split", tiny_pair_dirs, tiny_jsonl,
                             train={"batch_size": 2, "gradient_accumulation_steps": 2})
    run_split = recorded_step(split, monkeypatch, feed=list(halves))
    assert all(a is b for a, b in zip(run_split.batches, halves, strict=True))

    ref = reference_step(whole.teacher, run_whole.student0, run_whole.prompt0, [batch], lam=1 - 1 / K)
    assert_step_matches(run_whole, ref)
    assert_step_matches(run_split, ref)
    for name, grads in run_whole.grads.items():  # and directly, float32 against float32
        assert_grads_close(run_split.grads[name], [g.double() for g in grads], f"{name} grad (split vs whole)")


def test_the_comparison_catches_a_wrong_step(tmp_path, tiny_pair_dirs, tiny_jsonl, monkeypatch):
    """The tolerances are sharp. Observed gaps, as a fraction of the largest gradient entry
    (1e-5 allowed, <= 2.1e-6 for the real step): lambda_k with k = 0 moves the prompt gradient by
    0.35; the student target from the pre-update prompt moves the student gradient by 0.063;
    swapping both KL directions moves the prompt gradient by 0.075 (the student's by 0.11).
    (Without clipping in the clipped case, the prompt lands 2.7e-3 away, against 6e-5 allowed.)"""
    tr = promptkd_trainer(tmp_path, tiny_pair_dirs, tiny_jsonl)
    run = recorded_step(tr, monkeypatch)

    def ref(lam=1 - 1 / K, **kwargs):
        return reference_step(tr.teacher, run.student0, run.prompt0, run.batches, lam=lam, **kwargs)

    assert_step_matches(run, ref())
    with pytest.raises(AssertionError, match="prompt grad"):
        assert_step_matches(run, ref(lam=1.0))  # lambda_k counted from k = 0
    with pytest.raises(AssertionError, match="student grad"):
        assert_step_matches(run, ref(target="lagged"))  # student target before the prompt update
    kl = kl_sum
    monkeypatch.setitem(globals(), "kl_sum", lambda a, b, batch: kl(b, a, batch))
    with pytest.raises(AssertionError, match="prompt grad"):
        assert_step_matches(run, ref())  # KL(sg p_S || p_TP) etc.
