"""MiniLLM (promptkd.methods.minillm) driven through promptkd.testing.FakeContext.

    .venv/bin/python -m pytest -q tests/test_minillm.py

Every quantity of a step (token log-probabilities, importance weights, rewards, discounted and
length-normalised returns, whitening, the clipped PPO loss, the exact single-step KL, the LM
term) is recomputed here in float64 from plain full forwards, with explicit loops over the
tokens, and compared to the method's metrics, its rollouts and the gradient it hands to the
optimizer. The teacher-mixed sampler (promptkd.sampling.TeacherMixture) is checked against a
full teacher forward at every generated token.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from fakes import FakeContext

from promptkd.config import config_from_dict
from promptkd.data.batch import SequenceBatch, position_ids_from_mask
from promptkd.data.collate import collate_prompts, collate_sequences
from promptkd.data.dataset import Example
from promptkd.losses import Outputs, loss_terms
from promptkd.methods import minillm as mm
from promptkd.methods.minillm import MiniLLM
from promptkd.sampling import SamplingConfig, TeacherMixture, sample_responses
from promptkd.testing import byte_tokenizer, tiny_llama

K = 6  # max_steps
TOK = byte_tokenizer()
PAD, EOS = TOK.pad_token_id, TOK.eos_token_id


def with_own_head(model, seed: int, scale: float):
    """Give the tiny random model an untied LM head with logits of std ~scale, so its next-token
    distributions are far from uniform and differ between the two models (with the tied
    embedding of a fresh init every log-ratio, weight and reward is ~0 / ~1 and proves little)."""
    vocab, hidden = model.lm_head.weight.shape
    g = torch.Generator().manual_seed(seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * scale / hidden**0.5)
    return model


TEACHER = with_own_head(tiny_llama(num_layers=2, seed=0), 100, 3.0)
STUDENT = with_own_head(tiny_llama(num_layers=1, seed=1), 101, 2.5)
PAIRS = [("Say hello.\n", "hello"), ("Add 2 and 3.\n", "5"), ("Name a colour.\n", "blue"),
         ("Repeat: cat\n", "cat cat"), ("Give an animal.\n", "dog"), ("Spell abc backwards.\n", "cba")]
EXAMPLES = [Example(TOK.encode(p), TOK.encode(r) + [EOS], [r]) for p, r in PAIRS]
LM_TEXTS = ["The sky is blue.", "Cats purr", "1 2 3 4", "ok"]
LM_EXAMPLES = [Example(TOK.encode("x"), TOK.encode(t) + [EOS], [t]) for t in LM_TEXTS]


def make_cfg(**minillm):
    data = {"method": "minillm", "train": {"max_steps": K, "seed": 5, "learning_rate": 1e-2}, "minillm": {}}
    if minillm.pop("lm_data", False):  # lm_data=True: the context serves LM_EXAMPLES as its examples (make_ctx)
        minillm["lm_data"] = "lm.jsonl"
    data["minillm"].update(minillm)
    return config_from_dict(data, check_required=False)


def make_ctx(**kwargs) -> FakeContext:
    return FakeContext(copy.deepcopy(STUDENT), copy.deepcopy(TEACHER), TOK, max_steps=K,
                       extra_examples={"minillm.lm_data": LM_EXAMPLES}, **kwargs)


def fake_sampler(examples, *, from_teacher=False) -> SequenceBatch:
    return collate_sequences(examples, PAD)


# ---------------------------------------------------------------------------- independent maths


def plain_forward(model, batch: SequenceBatch) -> torch.Tensor:
    """(B, T, V) logits; position t predicts token t + 1."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=position_ids_from_mask(batch.attention_mask), use_cache=False).logits


def response_part(full_logits: torch.Tensor, batch: SequenceBatch, vocab_size: int) -> torch.Tensor:
    """(B, R, V): the columns predicting the response tokens."""
    return full_logits[:, batch.prompt_length - 1 : -1, :vocab_size]


def rmask(batch: SequenceBatch) -> torch.Tensor:
    return batch.loss_mask[:, batch.prompt_length :]  # (B, R)


def num_tokens(batches) -> int:
    return int(sum(int(rmask(b).sum()) for b in batches))


def targets_of(batch: SequenceBatch) -> torch.Tensor:
    return batch.input_ids[:, batch.prompt_length :]


def gathered_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, R) float64 log softmax(logits)[target]."""
    return logits.double().log_softmax(-1).gather(-1, targets[..., None])[..., 0]


def kl_rows(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """(...,) KL(softmax a || softmax b) per position, float64."""
    log_a, log_b = logits_a.double().log_softmax(-1), logits_b.double().log_softmax(-1)
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def row_length(mask_row: torch.Tensor) -> int:
    """Number of masked tokens of a row, checking they are a prefix (as the layout promises)."""
    n = int(mask_row.sum())
    assert bool(mask_row[:n].all()), "masked response tokens are not a prefix of the row"
    return n


def discounted_returns(r: list[float], gamma: float, include_current: bool, length_norm: bool) -> list[float]:
    """G_t over one row's n tokens, written out: with the current reward
    G_t = sum_{s=t}^{n-1} gamma^(s-t) r_s, else the paper's R_{t+1} = sum_{s=t+1}^{n-1} gamma^(s-t-1) r_s;
    length_norm divides by the number of terms (at least 1)."""
    n, out = len(r), []
    for t in range(n):
        start = t if include_current else t + 1
        g = 0.0
        for s in range(start, n):
            g += gamma ** (s - start) * r[s]
        if length_norm:
            g /= max(n - start, 1)
        out.append(g)
    return out


def reference_step(old_student, student, teacher, batches, c, vocab, lm_batches=()):
    """One MiniLLM step in float64 with the formulas written out.

    Rollout constants from `old_student` (the student when the rollouts were collected), the
    loss and its gradient at `student`. Returns a dict of the pieces and the gradients."""
    old = copy.deepcopy(old_student).double()
    cur = copy.deepcopy(student).double()
    teach = copy.deepcopy(teacher).double()
    a = c.teacher_mix_alpha
    per_batch = []
    all_g, log_ratios, weights, clipped_rewards = [], [], [], 0
    with torch.no_grad():
        for b in batches:
            mask, tgt = rmask(b), targets_of(b)
            lq = gathered_logprob(response_part(plain_forward(old, b), b, vocab), tgt)
            lp = gathered_logprob(response_part(plain_forward(teach, b), b, vocab), tgt)
            B, R = tgt.shape
            w = torch.ones(B, R, dtype=torch.float64)
            r = torch.zeros(B, R, dtype=torch.float64)
            g = torch.zeros(B, R, dtype=torch.float64)
            for i in range(B):
                n = row_length(mask[i])
                rows = []
                for t in range(n):
                    q_y, p_y = math.exp(float(lq[i, t])), math.exp(float(lp[i, t]))
                    w[i, t] = q_y / ((1 - a) * q_y + a * p_y)
                    raw = (float(lp[i, t]) - float(lq[i, t])) / c.reward_scaling
                    clipped_rewards += abs(raw) > c.cliprange_reward
                    rows.append(min(max(raw, -c.cliprange_reward), c.cliprange_reward))
                    log_ratios.append(float(lp[i, t]) - float(lq[i, t]))
                    weights.append(float(w[i, t]))
                r[i, :n] = torch.tensor(rows, dtype=torch.float64)
                g[i, :n] = torch.tensor(discounted_returns(rows, c.gamma, c.include_current_reward, c.length_norm),
                                        dtype=torch.float64)
                all_g += g[i, :n].tolist()
            per_batch.append((b, mask, tgt, lq, lp, w, r, g))
    N = len(all_g)
    assert N == num_tokens(batches)
    if c.whiten:
        mean = sum(all_g) / N
        var = sum((x - mean) ** 2 for x in all_g) / N
    eps = c.cliprange
    pg = single = torch.zeros((), dtype=torch.float64)
    clipped, advantages = 0, []
    for b, mask, tgt, lq, _lp, w, _r, g in per_batch:
        logits = response_part(plain_forward(cur, b), b, vocab)  # (B, R, V), with grad
        logq = logits.log_softmax(-1).gather(-1, tgt[..., None])[..., 0]
        adv = torch.zeros_like(g)
        for i in range(tgt.shape[0]):
            for t in range(row_length(mask[i])):
                A = (float(g[i, t]) - mean) / math.sqrt(var + 1e-8) if c.whiten else float(g[i, t])
                adv[i, t] = A
                rho = torch.exp(logq[i, t] - lq[i, t]) * w[i, t]
                unclipped = -A * rho
                clipped_term = -A * rho.clamp(1 - eps, 1 + eps)
                clipped += bool(clipped_term > unclipped)
                pg = pg + torch.maximum(unclipped, clipped_term)
        advantages.append(adv)
        if c.single_step_reg:
            with torch.no_grad():
                t_logits = response_part(plain_forward(teach, b), b, vocab)
            single = single + kl_rows(logits, t_logits)[mask].sum()
    loss = (pg + single) / N
    out = {"pg": float(pg.detach()) / N, "single": float(single.detach()) / N, "clip_frac": clipped / N,
           "log_ratio": sum(log_ratios) / N, "weight": sum(weights) / N, "clipped_rewards": clipped_rewards,
           "advantages": advantages, "batches": per_batch}
    if lm_batches:
        n_lm = num_tokens(lm_batches)
        ce = kl = torch.zeros((), dtype=torch.float64)
        for b in lm_batches:
            mask, tgt = rmask(b), targets_of(b)
            logits = response_part(plain_forward(cur, b), b, vocab)
            ce = ce - logits.log_softmax(-1).gather(-1, tgt[..., None])[..., 0][mask].sum()
            with torch.no_grad():
                t_logits = response_part(plain_forward(teach, b), b, vocab)
            kl = kl + kl_rows(t_logits, logits)[mask].sum()  # forward KL(p_T || p_S)
        lm = ((1 - c.lm_kd_ratio) * ce + c.lm_kd_ratio * kl) / n_lm
        out["lm"] = float(lm.detach())
        loss = loss + c.lm_coef * lm
    out["loss"] = float(loss.detach())
    out["grads"] = torch.autograd.grad(loss, [p for p in cur.parameters() if p.requires_grad])
    return out


def assert_grads_close(got, want, rtol=1e-4):
    scale = max(float(g.abs().max()) for g in want)
    assert scale > 0
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(x.double(), y, rtol=rtol, atol=1e-4 * scale, msg=lambda m, i=i: f"grad {i}: {m}")


# ---------------------------------------------------------------------------- 1. the loss pieces

CASES = {
    # the reference scripts' settings, rollouts sampled by the fake (teacher-mixed), two micro-batches
    "defaults-sampled": dict(cfg={}, sampled=True),
    "paper-return-no-norm-no-whiten": dict(cfg={"include_current_reward": False, "length_norm": False,
                                                "whiten": False, "teacher_mix_alpha": 0.3}),
    "paper-return-small-clip": dict(cfg={"include_current_reward": False, "cliprange": 0.02,
                                         "teacher_mix_alpha": 0.5}, clips=True),
    "current-no-norm-reward-clip": dict(cfg={"length_norm": False, "gamma": 0.8, "reward_scaling": 2.0,
                                             "cliprange_reward": 0.3, "teacher_mix_alpha": 0.1}, reward_clips=True),
    "no-single-step": dict(cfg={"single_step_reg": False, "teacher_mix_alpha": 0.0}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_step_equals_the_formulas(case):
    """Two steps of one PPO phase (fresh rollouts, then the same rollouts with the updated
    student): metrics, stored rollout constants and gradients equal the float64 formulas."""
    spec = CASES[case]
    cfg = make_cfg(ppo_epochs=2, **spec["cfg"])
    c = cfg.minillm
    micro = [EXAMPLES[:2], EXAMPLES[2:5]]
    if spec.get("sampled"):
        ctx = make_ctx(max_new_tokens=5)
    else:
        ctx = make_ctx(samples=[collate_sequences(mb, PAD) for mb in micro])
    method = MiniLLM(cfg.minillm)
    method.setup(ctx)
    student0 = copy.deepcopy(ctx.student_module)
    r0 = method.step(ctx, micro)
    batches = list(ctx.batches)
    assert len(batches) == 2
    mix = (c.teacher_mix_alpha,) if c.teacher_mix_alpha else ()
    assert ctx.calls_named("sample") == [("sample", False, *mix)] * 2
    ref0 = reference_step(student0, student0, ctx.teacher, batches, c, ctx.vocab_size)
    m = r0.metrics
    assert m["minillm/fresh_rollouts"] == 1.0
    assert m["minillm/pg"] == pytest.approx(ref0["pg"], rel=1e-4, abs=1e-6)
    assert m["minillm/clip_frac"] == pytest.approx(ref0["clip_frac"], abs=1e-12)
    assert m["minillm/log_ratio"] == pytest.approx(ref0["log_ratio"], rel=1e-4, abs=1e-6)
    assert m["minillm/importance_weight"] == pytest.approx(ref0["weight"], rel=1e-5)
    if c.single_step_reg:
        assert m["minillm/single_step"] == pytest.approx(ref0["single"], rel=1e-4)
        assert ref0["single"] > 1e-3
    else:
        assert "minillm/single_step" not in m
        assert len(ctx.calls_named("teacher_forward")) == 2  # the rollouts' lp only
    assert m["student/loss"] == pytest.approx(ref0["loss"], rel=1e-4, abs=1e-6)
    assert r0.trained_tokens == r0.generated_tokens == num_tokens(batches)
    assert_grads_close(ctx.grads["student"], ref0["grads"])
    # the stored rollout constants
    pieces = zip(method.rollouts, ref0["batches"], ref0["advantages"], strict=True)
    for ro, (b, mask, _, lq, _, w, _, _), adv in pieces:
        assert ro.batch is b
        torch.testing.assert_close(ro.old_logprobs[mask].double(), lq[mask], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ro.weights[mask].double(), w[mask], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ro.advantages.double(), adv, rtol=1e-4, atol=1e-4)
        assert not ro.advantages[~mask].any()
    if c.whiten:  # whitened over every token of the step: mean 0, variance 1
        all_a = torch.cat([a[rmask(b)] for a, b in zip(ref0["advantages"], batches, strict=True)])
        assert float(all_a.mean()) == pytest.approx(0.0, abs=1e-9)
        assert float(all_a.var(unbiased=False)) == pytest.approx(1.0, rel=1e-6)
    if spec.get("clips"):
        assert m["minillm/clip_frac"] > 0  # the importance weight alone leaves [1 - eps, 1 + eps]
    if spec.get("reward_clips"):
        assert ref0["clipped_rewards"] > 0

    # second step of the phase: no sampling, old log-probs from student0, ratios from the update
    student1 = copy.deepcopy(ctx.student_module)
    ctx.step = 1
    ctx.calls.clear()
    r1 = method.step(ctx, micro)
    assert not ctx.calls_named("sample") and ("student_forward", True) not in ctx.calls
    ref1 = reference_step(student0, student1, ctx.teacher, batches, c, ctx.vocab_size)
    m = r1.metrics
    assert m["minillm/fresh_rollouts"] == 0.0
    assert r1.generated_tokens == 0.0 and r1.trained_tokens == num_tokens(batches)
    assert m["minillm/pg"] == pytest.approx(ref1["pg"], rel=1e-4, abs=1e-6)
    assert m["minillm/pg"] != pytest.approx(ref0["pg"], rel=1e-6, abs=0)  # the ratio moved off w
    assert m["minillm/clip_frac"] == pytest.approx(ref1["clip_frac"], abs=1e-12)
    assert m["student/loss"] == pytest.approx(ref1["loss"], rel=1e-4, abs=1e-6)
    # rollout statistics are those of the phase's rollouts
    assert m["minillm/log_ratio"] == pytest.approx(ref0["log_ratio"], rel=1e-4, abs=1e-6)
    assert_grads_close(ctx.grads["student"], ref1["grads"])


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("length_norm", [True, False])
def test_helper_functions_equal_the_formulas(include_current, length_norm):
    """token_logprobs, importance_weights, rewards, returns, ppo_terms on one fixed batch."""
    torch.manual_seed(0)
    batch = collate_sequences(EXAMPLES[:4], PAD)
    mask, tgt = rmask(batch), targets_of(batch)
    with torch.no_grad():
        s = response_part(plain_forward(STUDENT, batch), batch, 259)
        t = response_part(plain_forward(TEACHER, batch), batch, 259)
    lq, lp = gathered_logprob(s, tgt), gathered_logprob(t, tgt)
    got_lq = mm.token_logprobs(s, tgt)
    assert got_lq.dtype == torch.float32
    torch.testing.assert_close(got_lq.double(), lq, rtol=1e-5, atol=1e-5)

    a = 0.35
    w = mm.importance_weights(lq, lp, a)
    want_w = lq.exp() / ((1 - a) * lq.exp() + a * lp.exp())
    torch.testing.assert_close(w, want_w, rtol=1e-10, atol=0)
    assert (w - 1).abs().max() > 0.05
    torch.testing.assert_close(mm.importance_weights(lq, lp, 1.0), lq.exp() / lp.exp(), rtol=1e-10, atol=0)

    lq0, lp0 = lq * mask, lp * mask
    scaling, clip, gamma = 0.5, 1.5, 0.9
    r = mm.rewards(lq0, lp0, mask, scaling=scaling, clip=clip)
    g = mm.returns(r, mask, gamma=gamma, include_current=include_current, length_norm=length_norm)
    n_clipped = 0
    for i in range(tgt.shape[0]):
        n = row_length(mask[i])
        rows = []
        for k in range(n):
            raw = (float(lp[i, k]) - float(lq[i, k])) / scaling
            n_clipped += abs(raw) > clip
            rows.append(min(max(raw, -clip), clip))
        assert r[i, :n].tolist() == pytest.approx(rows, rel=1e-12, abs=1e-12)
        assert not r[i, n:].any() and not g[i, n:].any()
        want = discounted_returns(rows, gamma, include_current, length_norm)
        assert g[i, :n].tolist() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert n_clipped > 0

    # PPO: a perturbed current log-prob, so the ratio exp(logq - lq) w moves both ways
    logq = (lq + 0.3 * torch.randn_like(lq)).requires_grad_(True)
    adv = torch.randn_like(lq) * mask
    eps = 0.1
    loss, n_clip = mm.ppo_terms(logq, lq, w, adv, mask, eps)
    want_loss, want_clip = torch.zeros((), dtype=torch.float64), 0
    for i in range(tgt.shape[0]):
        for k in range(row_length(mask[i])):
            rho = math.exp(float(logq[i, k].detach()) - float(lq[i, k])) * float(w[i, k])
            A = float(adv[i, k])
            un, cl = -A * rho, -A * min(max(rho, 1 - eps), 1 + eps)
            want_clip += cl > un
            want_loss += max(un, cl)
    assert float(loss.detach()) == pytest.approx(float(want_loss), rel=1e-10)
    assert int(n_clip) == want_clip > 0
    # the gradient flows through logq only: -A rho where unclipped, 0 where the clipped term wins
    (grad,) = torch.autograd.grad(loss, logq)
    rho = torch.exp(logq.detach() - lq) * w
    unclipped_wins = (-adv * rho) >= (-adv * rho.clamp(1 - eps, 1 + eps))
    torch.testing.assert_close(grad, torch.where(mask & unclipped_wins, -adv * rho, 0.0), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- 2. importance weights


def test_importance_weights_are_one_when_alpha_is_zero():
    lq = torch.log(torch.tensor([[0.2, 0.5, 0.01]]))
    lp = torch.log(torch.tensor([[0.7, 0.1, 0.3]]))
    assert torch.equal(mm.importance_weights(lq, lp, 0.0), torch.ones(1, 3))
    assert not torch.allclose(mm.importance_weights(lq, lp, 0.2), torch.ones(1, 3), atol=1e-2)

    ctx = make_ctx(sampler=fake_sampler)
    method = MiniLLM(make_cfg(teacher_mix_alpha=0.0).minillm)
    method.setup(ctx)
    result = method.step(ctx, [EXAMPLES[:3]])
    assert ctx.calls_named("sample") == [("sample", False)]  # no teacher mixing asked for
    (ro,) = method.rollouts
    assert torch.equal(ro.weights, torch.ones_like(ro.weights))
    assert result.metrics["minillm/importance_weight"] == 1.0


def test_importance_weights_with_alpha_are_ps_over_the_mixture():
    a = 0.4
    ctx = make_ctx(sampler=fake_sampler)
    method = MiniLLM(make_cfg(teacher_mix_alpha=a).minillm)
    method.setup(ctx)
    method.step(ctx, [EXAMPLES[:3], EXAMPLES[3:]])
    assert ctx.calls_named("sample") == [("sample", False, a)] * 2
    student64, teacher64 = copy.deepcopy(STUDENT).double(), copy.deepcopy(TEACHER).double()
    for ro in method.rollouts:
        b, mask = ro.batch, rmask(ro.batch)
        with torch.no_grad():
            ps = response_part(plain_forward(student64, b), b, 259).softmax(-1)
            pt = response_part(plain_forward(teacher64, b), b, 259).softmax(-1)
        tgt = targets_of(b)[..., None]
        ps_y, pt_y = ps.gather(-1, tgt)[..., 0], pt.gather(-1, tgt)[..., 0]
        want = ps_y / ((1 - a) * ps_y + a * pt_y)
        torch.testing.assert_close(ro.weights[mask].double(), want[mask], rtol=1e-4, atol=1e-6)
        assert torch.equal(ro.weights[~mask], torch.ones_like(ro.weights[~mask]))
        assert (ro.weights[mask] - 1).abs().max() > 0.05


# ---------------------------------------------------------------------------- 3. the single-step gradient


def analytic_reverse_kl_grad(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """d/dz KL(softmax z || softmax t) = q (log q - log p - KL), q = softmax z, p = softmax t."""
    log_q, log_p = z.log_softmax(-1), t.log_softmax(-1)
    q = log_q.exp()
    kl = (q * (log_q - log_p)).sum(-1, keepdim=True)
    return q * (log_q - log_p - kl)


def test_single_step_term_gradient_is_the_analytic_reverse_kl_gradient():
    torch.manual_seed(1)
    ctx = make_ctx(sampler=fake_sampler)
    method = MiniLLM(make_cfg().minillm)
    method.setup(ctx)
    z = (3 * torch.randn(2, 4, 11, dtype=torch.float64)).requires_grad_(True)
    t = 3 * torch.randn(2, 4, 11, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    value, _ = loss_terms(Outputs(z), [(method.single_step, Outputs(t), 1.0)], mask)
    assert float(value.detach()) == pytest.approx(float(kl_rows(z.detach(), t)[mask].sum()), rel=1e-12)
    (grad,) = torch.autograd.grad(value, z)
    want = torch.where(mask[..., None], analytic_reverse_kl_grad(z.detach(), t), 0.0)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    # and the same as autograd through the plain formula
    (plain,) = torch.autograd.grad(kl_rows(z, t)[mask].sum(), z)
    torch.testing.assert_close(grad, plain, rtol=1e-10, atol=1e-12)


def test_single_step_gradient_of_a_step_with_zero_advantages():
    """With the advantages of the phase set to 0 the PG term is 0 and the student's gradient is
    the analytic reverse-KL gradient (1/N) sum_t q (log q - log p - KL), chained into the model."""
    micro = [EXAMPLES[:2], EXAMPLES[2:5]]
    ctx = make_ctx(samples=[collate_sequences(mb, PAD) for mb in micro])
    method = MiniLLM(make_cfg(ppo_epochs=2).minillm)
    method.setup(ctx)
    method.step(ctx, micro)
    for ro in method.rollouts:
        ro.advantages = torch.zeros_like(ro.advantages)
    student = copy.deepcopy(ctx.student_module)
    ctx.step = 1
    metrics = method.step(ctx, micro).metrics
    assert metrics["minillm/pg"] == 0.0
    assert metrics["student/loss"] == metrics["minillm/single_step"] > 0

    cur, teach = student.double(), copy.deepcopy(ctx.teacher).double()
    batches = [ro.batch for ro in method.rollouts]
    n = num_tokens(batches)
    params = [p for p in cur.parameters() if p.requires_grad]
    want = [torch.zeros_like(p) for p in params]
    kl = 0.0
    for b in batches:
        z = response_part(plain_forward(cur, b), b, ctx.vocab_size)
        with torch.no_grad():
            t = response_part(plain_forward(teach, b), b, ctx.vocab_size)
            kl += float(kl_rows(z, t)[rmask(b)].sum())
        dz = torch.where(rmask(b)[..., None], analytic_reverse_kl_grad(z.detach(), t), 0.0) / n
        for acc, g in zip(want, torch.autograd.grad(z, params, grad_outputs=dz, allow_unused=True), strict=True):
            if g is not None:
                acc += g
    assert metrics["minillm/single_step"] == pytest.approx(kl / n, rel=1e-4)
    assert_grads_close(ctx.grads["student"], want)


# ---------------------------------------------------------------------------- 4. teacher-mixed sampling


class Recording:
    """Wraps a logits processor and keeps (input_ids, scores, output) of every call."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, input_ids, scores):
        out = self.inner(input_ids, scores)
        self.seen.append((input_ids.clone(), scores.clone(), out.clone()))
        return out


def last_logits(model, input_ids, prompt_mask) -> torch.Tensor:
    """(B, V) float64 next-token logits of a full forward (no cache) on left-padded prompts + generated."""
    mask = torch.cat([prompt_mask, torch.ones(input_ids.shape[0], input_ids.shape[1] - prompt_mask.shape[1],
                                              dtype=prompt_mask.dtype)], 1)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False)
    return out.logits[:, -1].double()


@pytest.mark.parametrize("alpha,vocab", [(0.3, 256), (0.8, 259)])
def test_teacher_mixture_is_the_log_of_the_mixed_distribution(alpha, vocab):
    """At every generated token the processor returns log((1 - a) softmax(s) + a softmax(t)) over
    the first `vocab` columns (-inf beyond), t the teacher's next-token logits by a full forward
    on left-padded prompts of different lengths (the processor uses its own KV cache)."""
    examples = EXAMPLES[:3]
    prompt_ids, prompt_mask = collate_prompts(examples, PAD)
    assert len({len(e.prompt_ids) for e in examples}) == 3 and (prompt_mask == 0).any()
    student, teacher = copy.deepcopy(STUDENT), copy.deepcopy(TEACHER)
    rec = Recording(TeacherMixture(teacher, prompt_mask, alpha=alpha, vocab_size=vocab))
    batch = sample_responses(student, prompt_ids, prompt_mask, eos_token_ids=[EOS], pad_token_id=PAD,
                             config=SamplingConfig(max_new_tokens=5), generator_seed=3, logits_processor=[rec])
    assert len(rec.seen) >= 3, "too few generation steps to exercise the teacher's cache"
    teacher64, student64 = copy.deepcopy(TEACHER).double(), copy.deepcopy(STUDENT).double()
    P = prompt_ids.shape[1]
    for k, (ids, scores, out) in enumerate(rec.seen):
        assert ids.shape[1] == P + k
        # the student's raw next-token logits reach the processor (plain sampling)
        torch.testing.assert_close(scores.double(), last_logits(student64, ids, prompt_mask), rtol=1e-4, atol=1e-4)
        t = last_logits(teacher64, ids, prompt_mask)[:, :vocab]
        mixed = (1 - alpha) * scores[:, :vocab].double().softmax(-1) + alpha * t.softmax(-1)
        torch.testing.assert_close(out[:, :vocab].double(), mixed.log(), rtol=1e-4, atol=1e-4)
        assert torch.isinf(out[:, vocab:]).all() and (out[:, vocab:] < 0).all()
        assert float((out[:, :vocab].double().exp().sum(-1) - 1).abs().max()) < 1e-5
        # the mixture differs from both ends
        assert (out[:, :vocab].double() - scores[:, :vocab].double().log_softmax(-1)).abs().max() > 1e-2
        # the sequences returned are the ones the processor was shown
        assert torch.equal(batch.input_ids[:, : P + k], ids)
        if k:  # the token drawn at the previous step had mass under the mixture
            drawn = ids[:, -1]
            assert torch.isfinite(rec.seen[k - 1][2].gather(-1, drawn[:, None])).all()
    if vocab == 256:
        resp = targets_of(batch)[rmask(batch)]
        assert (resp < 256).all()  # columns past vocab_size are never drawn


def test_teacher_mixture_alpha_one_decodes_like_the_teacher():
    examples = EXAMPLES[1:4]
    prompt_ids, prompt_mask = collate_prompts(examples, PAD)

    def run(model, processor, do_sample):
        return sample_responses(model, prompt_ids, prompt_mask, eos_token_ids=[EOS], pad_token_id=PAD,
                                config=SamplingConfig(max_new_tokens=6, do_sample=do_sample), generator_seed=11,
                                logits_processor=processor)

    for do_sample in (False, True):
        mixed = run(STUDENT, [TeacherMixture(TEACHER, prompt_mask, alpha=1.0, vocab_size=259)], do_sample)
        teacher = run(TEACHER, None, do_sample)
        student = run(STUDENT, None, do_sample)
        assert torch.equal(mixed.input_ids, teacher.input_ids), do_sample
        assert not torch.equal(mixed.input_ids, student.input_ids), do_sample


def test_teacher_mixture_at_a_temperature_mixes_the_tempered_distributions():
    """sampling.temperature T != 1: the processor applies T to both distributions itself, since
    generate runs custom processors before its own temperature warper; with generate at T = 1
    and alpha 1 it samples exactly what the teacher samples at T."""
    temperature = 0.5
    prompt_ids, prompt_mask = collate_prompts(EXAMPLES[1:4], PAD)

    def run(model, processor, t):
        return sample_responses(model, prompt_ids, prompt_mask, eos_token_ids=[EOS], pad_token_id=PAD,
                                config=SamplingConfig(max_new_tokens=8, temperature=t),
                                generator_seed=4, logits_processor=processor)

    rec = Recording(TeacherMixture(TEACHER, prompt_mask, alpha=1.0, vocab_size=259, temperature=temperature))
    mixed = run(STUDENT, [rec], 1.0)
    teacher = run(TEACHER, None, temperature)
    ids, scores, _ = rec.seen[0]
    student_logits = last_logits(copy.deepcopy(STUDENT).double(), ids, prompt_mask)
    torch.testing.assert_close(scores.double(), student_logits, rtol=1e-4, atol=1e-4)  # untempered in
    assert torch.equal(mixed.input_ids, teacher.input_ids)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_teacher_mixture_rejects_alpha_outside_zero_one(alpha):
    with pytest.raises(ValueError, match="alpha"):
        TeacherMixture(TEACHER, torch.ones(1, 2, dtype=torch.long), alpha=alpha, vocab_size=259)


# ---------------------------------------------------------------------------- 5. PPO epochs and state


def test_fresh_rollouts_every_ppo_epochs_steps():
    ctx = make_ctx(max_new_tokens=4)
    method = MiniLLM(make_cfg(ppo_epochs=3, teacher_mix_alpha=0.2).minillm)
    method.setup(ctx)
    prompts = [EXAMPLES[:2], EXAMPLES[2:4], EXAMPLES[4:6]]
    fresh, samples, phases = [], [], []
    for step in range(7):
        ctx.step = step
        ctx.calls.clear()
        result = method.step(ctx, [prompts[step // 3]])
        fresh.append(result.metrics["minillm/fresh_rollouts"])
        samples.append(len(ctx.calls_named("sample")))
        phases.append(method.rollouts[0])
        assert result.trained_tokens == num_tokens([method.rollouts[0].batch])
        assert result.generated_tokens == (result.trained_tokens if fresh[-1] else 0.0)
    assert fresh == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert samples == [1, 0, 0, 1, 0, 0, 1]
    assert phases[0] is phases[1] is phases[2] and phases[3] is phases[4] is phases[5]
    assert phases[2] is not phases[3] and phases[5] is not phases[6]
    # the phase's rollouts are for the prompts of its first step
    for start in (0, 3, 6):
        rows = phases[start].batch.input_ids[:, : phases[start].batch.prompt_length]
        want, _ = collate_prompts(prompts[start // 3], PAD)
        assert torch.equal(rows, want)


def test_a_step_without_rollouts_samples_even_inside_a_phase():
    ctx = make_ctx(sampler=fake_sampler)
    method = MiniLLM(make_cfg(ppo_epochs=4).minillm)
    method.setup(ctx)
    ctx.step = 2  # e.g. a run resumed mid-phase from a checkpoint without rollouts
    result = method.step(ctx, [EXAMPLES[:2]])
    assert len(ctx.calls_named("sample")) == 1 and result.metrics["minillm/fresh_rollouts"] == 1.0


def continue_both(ctx_a, method_a, ctx_b, method_b, micro, step):
    ctx_a.step = ctx_b.step = step
    ctx_a.calls.clear()
    ctx_b.calls.clear()
    ra, rb = method_a.step(ctx_a, micro), method_b.step(ctx_b, micro)
    return ra, rb


def test_state_dict_round_trip_continues_the_phase_identically():
    cfg = make_cfg(ppo_epochs=3, teacher_mix_alpha=0.3, lm_coef=0.5, lm_data=True)
    micro = [EXAMPLES[:2], EXAMPLES[2:5]]
    ctx_a = make_ctx(max_new_tokens=4)
    a = MiniLLM(cfg.minillm)
    a.setup(ctx_a)
    a.step(ctx_a, micro)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["lm_position"] == 5

    ctx_b = FakeContext(copy.deepcopy(ctx_a.student_module), copy.deepcopy(TEACHER), TOK, max_steps=K,
                        max_new_tokens=4, seed=99, extra_examples=ctx_a.extra_examples)  # its own sampler would draw other rollouts
    b = MiniLLM(cfg.minillm)
    b.setup(ctx_b)
    b.load_state_dict(state)
    for step in (1, 2):
        ra, rb = continue_both(ctx_a, a, ctx_b, b, micro, step)
        assert not ctx_b.calls_named("sample") and not ctx_a.calls_named("sample")
        assert rb.metrics == pytest.approx(ra.metrics, rel=1e-6, abs=1e-9)
        assert rb.metrics["minillm/fresh_rollouts"] == 0.0
        assert rb.trained_tokens == ra.trained_tokens
        for x, y in zip(ctx_a.grads["student"], ctx_b.grads["student"], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
        # the same LM examples were read
        lm_a, lm_b = ctx_a.batches[-2:], ctx_b.batches[-2:]
        assert [x.input_ids.tolist() for x in lm_a] == [x.input_ids.tolist() for x in lm_b]
    for x, y in zip(a.rollouts, b.rollouts, strict=True):
        assert torch.equal(x.batch.input_ids, y.batch.input_ids) and torch.equal(x.advantages, y.advantages)

    # without the state a new instance would sample fresh rollouts at step 1
    ctx_c = FakeContext(copy.deepcopy(STUDENT), copy.deepcopy(TEACHER), TOK, max_steps=K, max_new_tokens=4,
                        extra_examples=ctx_a.extra_examples)
    c = MiniLLM(cfg.minillm)
    c.setup(ctx_c)
    ctx_c.step = 1
    assert c.step(ctx_c, micro).metrics["minillm/fresh_rollouts"] == 1.0


def test_rollouts_of_another_world_size_are_dropped_with_a_warning():
    ctx = make_ctx(sampler=fake_sampler)
    method = MiniLLM(make_cfg(ppo_epochs=3).minillm)
    method.setup(ctx)
    method.step(ctx, [EXAMPLES[:2]])
    state = method.state_dict()
    state["world_size"] = 2
    other = MiniLLM(make_cfg(ppo_epochs=3).minillm)
    ctx2 = make_ctx(sampler=fake_sampler)
    other.setup(ctx2)
    with pytest.warns(UserWarning, match="rollouts"):
        other.load_state_dict(state)
    assert other.rollouts == []
    ctx2.step = 1
    assert other.step(ctx2, [EXAMPLES[:2]]).metrics["minillm/fresh_rollouts"] == 1.0


# ---------------------------------------------------------------------------- 6. the LM term


def test_lm_term_is_added_with_its_coefficient():
    """loss = L_pg + L_single + lm_coef ((1 - r) CE + r KL(p_T || p_S)) on minillm.lm_data, laid out
    like the training batches (same micro-batch sizes), cycling through the examples."""
    cfg = make_cfg(ppo_epochs=1, teacher_mix_alpha=0.2, lm_coef=0.7, lm_kd_ratio=0.3, lm_data=True)
    micro = [EXAMPLES[:2], EXAMPLES[2:5]]
    ctx = make_ctx(sampler=fake_sampler)
    method = MiniLLM(cfg.minillm)
    method.setup(ctx)
    expected_rows = [[[0, 1], [2, 3, 0]], [[1, 2], [3, 0, 1]]]  # positions 0..4, then 5..9 mod 4
    for step in range(2):
        ctx.step = step
        ctx.batches.clear()
        student = copy.deepcopy(ctx.student_module)
        result = method.step(ctx, micro)
        rollouts, lm_batches = ctx.batches[:2], ctx.batches[2:]
        assert len(lm_batches) == 2
        for got, rows in zip(lm_batches, expected_rows[step], strict=True):
            want = collate_sequences([LM_EXAMPLES[i] for i in rows], PAD)
            assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.loss_mask, want.loss_mask)
        ref = reference_step(student, student, ctx.teacher, rollouts, cfg.minillm, ctx.vocab_size, lm_batches)
        m = result.metrics
        assert m["minillm/lm"] == pytest.approx(ref["lm"], rel=1e-4)
        assert m["minillm/pg"] == pytest.approx(ref["pg"], rel=1e-4, abs=1e-6)
        assert m["student/loss"] == pytest.approx(ref["loss"], rel=1e-4)
        assert m["student/loss"] == pytest.approx(m["minillm/pg"] + m["minillm/single_step"] + 0.7 * m["minillm/lm"],
                                                  rel=1e-12)
        assert ref["lm"] > 1.0  # CE of a random model is large: the term weighs in
        assert_grads_close(ctx.grads["student"], ref["grads"])
        assert result.trained_tokens == num_tokens(rollouts)  # the LM tokens are not rollout tokens
    assert method.lm_position == 10


def test_lm_term_is_off_by_default():
    ctx = make_ctx(sampler=fake_sampler)
    method = MiniLLM(make_cfg().minillm)
    method.setup(ctx)
    result = method.step(ctx, [EXAMPLES[:2]])
    assert "minillm/lm" not in result.metrics and len(ctx.batches) == 1
    assert result.metrics["student/loss"] == pytest.approx(
        result.metrics["minillm/pg"] + result.metrics["minillm/single_step"], rel=1e-12)


# ---------------------------------------------------------------------------- 7. one student forward per rollout


REUSE_CASES = {
    "defaults": {},
    "no-single-step": {"single_step_reg": False},
    "lm-term": {"lm_coef": 0.5, "lm_kd_ratio": 0.3, "lm_data": True},
}


@pytest.mark.parametrize("case", list(REUSE_CASES), ids=list(REUSE_CASES))
def test_one_micro_batch_rollout_step_runs_the_student_once_with_the_same_update(case, monkeypatch):
    """One micro-batch: the rollout step's student forward with grad gives both lq and the
    update's logits. One student forward on the rollouts instead of two (the LM term's own
    forward aside), and the parameters after a phase equal those of the two-forward path."""
    runs = {}
    for reuse in (True, False):
        cfg = make_cfg(ppo_epochs=2, teacher_mix_alpha=0.2, **REUSE_CASES[case])
        ctx = make_ctx(sampler=fake_sampler)  # no generation: every student forward scores or trains
        method = MiniLLM(cfg.minillm)
        method.setup(ctx)
        if not reuse:  # the path of several micro-batches: a no-grad scoring forward, then the update's
            monkeypatch.setattr(method, "reuses_rollout_forwards", lambda micro_batches: False)
        forwards = []
        ctx.student_module.register_forward_hook(lambda *args, seen=forwards: seen.append(1))
        student0 = copy.deepcopy(ctx.student_module)
        counts, metrics = [], []
        for step in range(2):  # a fresh rollout step, then a step on the same rollouts
            ctx.step = step
            ctx.batches.clear()
            forwards.clear()
            metrics.append(method.step(ctx, [EXAMPLES[:3]]).metrics)
            counts.append(len(forwards))
            if step == 0 and reuse:  # the shared forward's gradient is the formulas' gradient
                rollout, lm_batches = ctx.batches[:1], ctx.batches[1:]
                ref = reference_step(student0, student0, ctx.teacher, rollout, cfg.minillm, ctx.vocab_size,
                                     lm_batches)
                assert metrics[0]["student/loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
                assert_grads_close(ctx.grads["student"], ref["grads"])
        runs[reuse] = (counts, metrics, [p.detach().clone() for p in ctx.student_module.parameters()])
    lm = 1 if "lm_coef" in REUSE_CASES[case] else 0
    assert runs[True][0] == [1 + lm, 1 + lm]  # rollout step: one forward on the rollouts
    assert runs[False][0] == [2 + lm, 1 + lm]
    for got, want in zip(runs[True][1], runs[False][1], strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    for got, want in zip(runs[True][2], runs[False][2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
