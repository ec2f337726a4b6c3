"""Tests for promptkd.losses: the divergences against brute-force references, their properties,
and the chunked driver `loss_terms` against plain autograd on full logits.

The references loop over vocabulary entries in plain Python float64 and spell out each formula,
so they also pin down the conventions (which argument is p, which weight goes where in the
mixtures). Hidden states + LM heads (architectures, transforms, refusals) are in test_head.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from promptkd import losses
from promptkd.errors import UserError
from promptkd.losses import (
    CROSS_ENTROPY,
    DIVERGENCES,
    Outputs,
    alpha_beta_divergence,
    cross_entropy,
    divergence,
    forward_kl,
    generalized_jsd,
    loss_terms,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
)

NAMES = sorted(DIVERGENCES)
PARAMS = {"skew_forward_kl": {"alpha": 0.3}, "skew_reverse_kl": {"alpha": 0.3}, "generalized_jsd": {"beta": 0.3},
          "alpha_beta_divergence": {"ab_alpha": 0.3, "ab_beta": 0.5}}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Slow float64 references, one vocabulary entry at a time.
# ---------------------------------------------------------------------------------------------


def _softmax_ref(row):
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def _kl_ref(a, b):
    """KL(a || b) with 0 log 0 = 0."""
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b, strict=True) if x > 0)


def _mix_ref(a, b, weight_a):
    return [weight_a * x + (1.0 - weight_a) * y for x, y in zip(a, b, strict=True)]


def _ab_ref(p, q, a, b):
    """ABKD's D^(a, b)(p || q): the reference's general case (ghwang-s/abkd distillation_llm/distillm/
    losses.py:64-84), and on the axes the limits of that formula (Cichocki et al. 2011, eqs. 4-5)."""
    if b == 0:  # 1/a^2 sum_v [p^a log(p^a / q^a) - p^a + q^a]
        return sum((x**a * math.log(x**a / y**a) if x > 0 else 0.0) - x**a + y**a for x, y in zip(p, q, strict=True)) / a**2
    if a == 0:  # 1/b^2 sum_v [q^b log(q^b / p^b) - q^b + p^b]
        return sum((y**b * math.log(y**b / x**b) if y > 0 else 0.0) - y**b + x**b for x, y in zip(p, q, strict=True)) / b**2
    s = a + b
    return -sum(x**a * y**b - a / s * x**s - b / s * y**s for x, y in zip(p, q, strict=True)) / (a * b)


def _row_ref(name, q_logits, p_logits, alpha=0.1, beta=0.5, ab_alpha=0.2, ab_beta=0.7):
    """One position: q = softmax(logits) is trained, p = softmax(target_logits) the target."""
    p, q = _softmax_ref(p_logits), _softmax_ref(q_logits)
    if name == "forward_kl":
        return _kl_ref(p, q)
    if name == "reverse_kl":
        return _kl_ref(q, p)
    if name == "skew_forward_kl":
        return _kl_ref(p, _mix_ref(p, q, alpha))  # KL(p || alpha p + (1 - alpha) q)
    if name == "skew_reverse_kl":
        return _kl_ref(q, _mix_ref(q, p, alpha))  # KL(q || alpha q + (1 - alpha) p), DistiLLM
    if name == "generalized_jsd":
        m = _mix_ref(p, q, beta)  # beta p + (1 - beta) q
        return beta * _kl_ref(p, m) + (1.0 - beta) * _kl_ref(q, m)
    if name == "total_variation":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
    if name == "alpha_beta_divergence":
        return _ab_ref(p, q, ab_alpha, ab_beta)  # p the teacher (target), q the student (trained)
    raise AssertionError(name)


def _pair(shape=(2, 5, 11), scale=3.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(dtype), (scale * torch.randn(shape, generator=gen)).to(dtype)


# ---------------------------------------------------------------------------------------------
# 1. The divergences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_matches_brute_force(name):
    logits, target = _pair()
    got = divergence(name, **{k: v for k, v in PARAMS.get(name, {}).items()})(logits, target)  # (2, 5)
    assert got.shape == logits.shape[:-1] and got.dtype == torch.float64
    for idx in [(i, j) for i in range(2) for j in range(5)]:
        want = _row_ref(name, logits[idx].tolist(), target[idx].tolist(), **PARAMS.get(name, {}))
        assert float(got[idx]) == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_directions_are_not_swapped():
    """A peaked p and a two-mode q: KL(q || p) is about 1.4 x KL(p || q), so a swap shows."""
    q, p = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64), torch.tensor([[3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert float(forward_kl(q, p)) == pytest.approx(_row_ref("forward_kl", q[0].tolist(), p[0].tolist()), rel=1e-12)
    assert float(reverse_kl(q, p)) == pytest.approx(_row_ref("reverse_kl", q[0].tolist(), p[0].tolist()), rel=1e-12)
    assert float(reverse_kl(q, p)) > 1.3 * float(forward_kl(q, p))
    # generalized_jsd's beta weighs the target p (TRL): near 0 it is beta * KL(p || q)
    small = float(generalized_jsd(q, p, beta=1e-4))
    assert small / 1e-4 == pytest.approx(float(forward_kl(q, p)), rel=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_zero_on_identical_inputs(name):
    logits, _ = _pair()
    assert torch.allclose(divergence(name)(logits, logits), torch.zeros(2, 5, dtype=torch.float64), atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-50, 50), name=st.sampled_from(NAMES))
def test_non_negative_and_shift_invariant(seed, shift, name):
    logits, target = _pair(seed=seed)
    div = divergence(name)
    values = div(logits, target)
    assert bool((values >= -1e-12).all())
    torch.testing.assert_close(div(logits + shift, target - shift), values, rtol=1e-9, atol=1e-10)


def test_endpoints_are_the_plain_kls():
    logits, target = _pair()
    torch.testing.assert_close(skew_forward_kl(logits, target, alpha=0.0), forward_kl(logits, target), rtol=0, atol=0)
    torch.testing.assert_close(skew_reverse_kl(logits, target, alpha=0.0), reverse_kl(logits, target), rtol=0, atol=0)
    torch.testing.assert_close(generalized_jsd(logits, target, beta=0.0), forward_kl(logits, target), rtol=0, atol=0)
    torch.testing.assert_close(generalized_jsd(logits, target, beta=1.0), reverse_kl(logits, target), rtol=0, atol=0)
    assert torch.equal(skew_forward_kl(logits, target, alpha=1.0), torch.zeros(2, 5, dtype=torch.float64))


def test_skew_reverse_kl_is_skew_forward_kl_with_roles_swapped():
    logits, target = _pair()
    torch.testing.assert_close(skew_reverse_kl(logits, target, alpha=0.2), skew_forward_kl(target, logits, alpha=0.2),
                               rtol=1e-12, atol=1e-14)


def test_mixture_is_in_log_space():
    """Logit gaps of 1000: in probability space the mixture underflows and 0 log 0 gives NaN."""
    logits = torch.tensor([[0.0, -1000.0, -1000.0]])
    target = torch.tensor([[-1000.0, 0.0, -1000.0]])
    for name in NAMES:
        value = divergence(name)(logits, target)
        assert bool(torch.isfinite(value).all()), name


@pytest.mark.parametrize("name", NAMES)
def test_minus_inf_logits_are_probability_zero(name):
    """A masked vocabulary (-inf on both sides) adds nothing to values and gets no NaN gradient."""
    logits, target = _pair(shape=(3, 6))
    logits.requires_grad_(True)
    inf = torch.full((3, 2), -math.inf, dtype=torch.float64)
    value = divergence(name)(torch.cat([logits, inf], -1), torch.cat([target, inf], -1)).sum()
    (grad,) = torch.autograd.grad(value, logits)
    torch.testing.assert_close(value, divergence(name)(logits, target).sum(), rtol=1e-12, atol=1e-14)
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    logits, target = _pair(shape=(3, 7), scale=1.0)
    div = divergence(name, **PARAMS.get(name, {}))
    assert torch.autograd.gradcheck(lambda a, b: div(a, b), (logits.requires_grad_(), target.requires_grad_()))


def test_cross_entropy_is_torch_cross_entropy():
    logits, _ = _pair()
    ids = torch.randint(0, 11, (2, 5))
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), ids.reshape(-1), reduction="none").view(2, 5)
    torch.testing.assert_close(cross_entropy(logits, ids), want, rtol=1e-12, atol=1e-14)


def test_divergence_errors_name_the_problem():
    with pytest.raises(UserError, match="unknown divergence 'kl'.*forward_kl"):
        divergence("kl")
    with pytest.raises(UserError, match="skew_forward_kl: alpha must be a number in \\[0, 1\\], got 1.5"):
        divergence("skew_forward_kl", alpha=1.5)
    with pytest.raises(UserError, match="generalized_jsd: beta"):
        divergence("generalized_jsd", beta=-0.1)
    assert divergence("reverse_kl", alpha=5.0) == divergence("reverse_kl")  # a parameter it does not take is unused


AB_POINTS = [(0.2, 0.7), (0.1, 0.8), (0.5, 0.5), (0.8, 0.3), (1.5, 0.4), (0.3, 0.0), (0.0, 0.4), (1.0, 0.0), (0.0, 1.0)]


@pytest.mark.parametrize(("a", "b"), AB_POINTS)
def test_abkd_matches_brute_force(a, b):
    """The reference's defaults (0.2, 0.7; 0.1, 0.8), its argparse default (0.5, 0.5), beyond
    alpha + beta = 1, the axes and the two KL points."""
    logits, target = _pair()
    got = divergence("alpha_beta_divergence", ab_alpha=a, ab_beta=b)(logits, target)  # (2, 5)
    for idx in [(i, j) for i in range(2) for j in range(5)]:
        want = _row_ref("alpha_beta_divergence", logits[idx].tolist(), target[idx].tolist(), ab_alpha=a, ab_beta=b)
        assert float(got[idx]) == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_abkd_is_forward_kl_at_1_0_and_reverse_kl_at_0_1():
    logits, target = _pair()
    torch.testing.assert_close(alpha_beta_divergence(logits, target, 1.0, 0.0), forward_kl(logits, target), rtol=0, atol=0)
    torch.testing.assert_close(alpha_beta_divergence(logits, target, 0.0, 1.0), reverse_kl(logits, target), rtol=0, atol=0)
    # and the roles: D^(a, b)(p || q) = D^(b, a)(q || p)
    torch.testing.assert_close(alpha_beta_divergence(logits, target, 0.2, 0.7), alpha_beta_divergence(target, logits, 0.7, 0.2),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("eps", [1e-4, 1e-6, 1e-8])
def test_abkd_general_formula_tends_to_the_kls_and_to_its_axes(eps):
    """The general case (both parameters > 0) approaches forward KL as (1, eps) or (1 - eps, eps),
    reverse KL as (eps, 1) or (eps, 1 - eps), and the axis values as one parameter -> 0: the error
    is first order in eps (measured on these rows, KLs of 1.8 to 13: at most 97 eps for forward KL,
    46 eps for reverse KL, 275 eps on the axes, the same at eps 1e-4, 1e-6 and 1e-8)."""
    logits, target = _pair()
    fkl, rkl = forward_kl(logits, target), reverse_kl(logits, target)
    ab = functools.partial(alpha_beta_divergence, logits, target)
    tol = {"rtol": 0, "atol": 1000 * eps}
    torch.testing.assert_close(ab(1.0, eps), fkl, **tol)
    torch.testing.assert_close(ab(1.0 - eps, eps), fkl, **tol)
    torch.testing.assert_close(ab(eps, 1.0), rkl, **tol)
    torch.testing.assert_close(ab(eps, 1.0 - eps), rkl, **tol)
    torch.testing.assert_close(ab(0.5, eps), ab(0.5, 0.0), **tol)
    torch.testing.assert_close(ab(eps, 0.5), ab(0.0, 0.5), **tol)


@pytest.mark.parametrize(("a", "b"), [(0.2, 0.7), (1.5, 0.4), (0.3, 0.0), (0.0, 0.4)])
def test_abkd_gradcheck_float64(a, b):
    logits, target = _pair(shape=(3, 7), scale=1.0)
    div = divergence("alpha_beta_divergence", ab_alpha=a, ab_beta=b)
    assert torch.autograd.gradcheck(lambda x, y: div(x, y), (logits.requires_grad_(), target.requires_grad_()))


@pytest.mark.parametrize(("a", "b"), [(0.2, 0.7), (0.3, 0.0), (0.0, 0.4)])
def test_abkd_masked_vocabulary_and_extreme_logits(a, b):
    """-inf logits on both sides add nothing and no NaN gradient; gaps of 1000 stay finite."""
    logits, target = _pair(shape=(3, 6))
    logits.requires_grad_(True)
    inf = torch.full((3, 2), -math.inf, dtype=torch.float64)
    div = divergence("alpha_beta_divergence", ab_alpha=a, ab_beta=b)
    value = div(torch.cat([logits, inf], -1), torch.cat([target, inf], -1)).sum()
    (grad,) = torch.autograd.grad(value, logits)
    torch.testing.assert_close(value, div(logits, target).sum(), rtol=1e-12, atol=1e-14)
    assert bool(torch.isfinite(grad).all())
    far = div(torch.tensor([[0.0, -1000.0, -1000.0]]), torch.tensor([[-1000.0, 0.0, -1000.0]]))
    assert bool(torch.isfinite(far).all())


def test_abkd_parameters_are_checked():
    with pytest.raises(UserError, match="alpha_beta_divergence: ab_beta must be a number >= 0, got -0.1"):
        divergence("alpha_beta_divergence", ab_beta=-0.1)
    with pytest.raises(UserError, match="ab_alpha and ab_beta are both 0"):
        divergence("alpha_beta_divergence", ab_alpha=0.0, ab_beta=0.0)
    assert divergence("alpha_beta_divergence") == divergence("alpha_beta_divergence", ab_alpha=0.2, ab_beta=0.7, beta=0.9)
    assert divergence("generalized_jsd", ab_alpha=5.0) == divergence("generalized_jsd")


@pytest.mark.parametrize(("a", "b"), [(0.2, 0.7), (1.0, 0.0), (0.0, 0.4)])
def test_abkd_loss_terms_equal_plain_autograd(monkeypatch, a, b):
    """Chunked (one position per chunk) and in one chunk, both equal to autograd on full logits."""
    logits, target = _pair(seed=4)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(6)) < 0.7
    terms = [(divergence("alpha_beta_divergence", ab_alpha=a, ab_beta=b), Outputs(target), 1.0)]
    y = logits.clone().requires_grad_(True)
    ref, _ = _full_terms(y, terms, mask)
    (ref_grad,) = torch.autograd.grad(ref, y)
    for elements in (11, 1 << 24):
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", elements)
        x = logits.clone().requires_grad_(True)
        loss, _ = loss_terms(Outputs(x), terms, mask)
        (grad,) = torch.autograd.grad(loss, x)
        assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 2. The driver on logits (hidden states + heads: test_head.py)
# ---------------------------------------------------------------------------------------------


def _full_terms(logits, terms, mask):
    """The plain-autograd reference: every term on the masked rows of full logits."""
    values = []
    for div, target, _ in terms:
        t = target[mask] if not isinstance(target, Outputs) else target.logits()[mask]
        values.append(div(logits[mask], t).sum())
    return sum(w * v for (_, _, w), v in zip(terms, values, strict=True)), values


@pytest.mark.parametrize("name", NAMES)
def test_loss_terms_on_logits_equal_plain_autograd(name):
    logits, target = _pair(seed=3)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(1)) < 0.6
    ids = torch.randint(0, 11, (2, 5))
    terms = [(divergence(name, **PARAMS.get(name, {})), Outputs(target), 0.7), (CROSS_ENTROPY, ids, 0.3),
             (divergence("forward_kl"), Outputs(target), 0.0)]
    x = logits.clone().requires_grad_(True)
    loss, values = loss_terms(Outputs(x), terms, mask)
    (grad,) = torch.autograd.grad(loss, x)
    y = logits.clone().requires_grad_(True)
    ref, ref_values = _full_terms(y, terms, mask)
    (ref_grad,) = torch.autograd.grad(ref, y)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    assert values == pytest.approx([float(v.detach()) for v in ref_values], rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert bool((grad[~mask] == 0).all())  # unselected positions get exactly no gradient


def test_a_weight_zero_term_is_logged_not_trained():
    logits, target = _pair()
    mask = torch.ones(2, 5, dtype=torch.bool)
    x = logits.clone().requires_grad_(True)
    loss, values = loss_terms(Outputs(x), [(divergence("reverse_kl"), Outputs(target), 1.0),
                                           (divergence("forward_kl"), Outputs(target), 0.0)], mask)
    (grad,) = torch.autograd.grad(loss, x)
    (only,) = torch.autograd.grad(reverse_kl(x, target).sum(), x)
    torch.testing.assert_close(grad, only, rtol=1e-12, atol=1e-14)
    assert values[1] == pytest.approx(float(forward_kl(logits, target).sum()), rel=1e-12)


@pytest.mark.parametrize("block_elements", [11, 1 << 19], ids=["blocks_of_rows", "one_block"])
def test_chunks_do_not_change_the_result(monkeypatch, block_elements):
    """One position per chunk against everything in one chunk, each chunk in one block of rows or
    in blocks of a few rows (what a large vocabulary gets on CPU)."""
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", block_elements)
    logits, target = _pair(shape=(3, 4, 11), seed=5)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(2)) < 0.7
    results = []
    for elements in (11, 1 << 24):
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", elements)
        x = logits.clone().requires_grad_(True)
        loss, values = loss_terms(Outputs(x), [(divergence("generalized_jsd"), Outputs(target), 1.0)], mask)
        results.append((float(loss.detach()), values, torch.autograd.grad(loss, x)[0]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-12, atol=1e-15)


def test_no_grad_gives_values_only_and_an_empty_mask_gives_zero():
    logits, target = _pair()
    x = logits.clone().requires_grad_(True)
    with torch.no_grad():
        loss, values = loss_terms(Outputs(x), [(divergence("reverse_kl"), Outputs(target), 1.0)],
                                  torch.ones(2, 5, dtype=torch.bool))
    assert loss.grad_fn is None and values[0] == pytest.approx(float(reverse_kl(logits, target).sum()), rel=1e-12)
    loss, values = loss_terms(Outputs(x), [(divergence("reverse_kl"), Outputs(target), 1.0)],
                              torch.zeros(2, 5, dtype=torch.bool))
    loss.backward()
    assert float(loss) == 0.0 and values == [0.0] and bool((x.grad == 0).all())


def test_a_target_that_is_neither_outputs_nor_token_ids_is_refused_naming_distill_terms():
    logits, target = _pair()
    with pytest.raises(TypeError, match=r"got a torch.float(32|64) tensor .*distill_terms"):  # float logits passed bare
        loss_terms(Outputs(logits), [(divergence("reverse_kl"), target, 1.0)], torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="got tuple"):
        loss_terms(Outputs(logits), [(divergence("reverse_kl"), (target,), 1.0)], torch.ones(2, 5, dtype=torch.bool))


def test_backward_twice_with_retain_graph():
    logits, target = _pair()
    x = logits.clone().requires_grad_(True)
    loss, _ = loss_terms(Outputs(x), [(divergence("reverse_kl"), Outputs(target), 1.0)], torch.ones(2, 5, dtype=torch.bool))
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_targets_get_no_gradient():
    """Every target is the stop-gradient side, even one that requires grad."""
    logits, target = _pair()
    x, t = logits.clone().requires_grad_(True), target.clone().requires_grad_(True)
    loss, _ = loss_terms(Outputs(x), [(divergence("reverse_kl"), Outputs(t), 1.0)], torch.ones(2, 5, dtype=torch.bool))
    loss.backward()
    assert t.grad is None and x.grad is not None


def test_compiled_chunks_equal_eager(monkeypatch):
    """The torch.compile'd per-chunk function gives eager's values and gradients (float32)."""
    logits, target = _pair(shape=(4, 6, 50), seed=7, dtype=torch.float32)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) < 0.8
    ids = torch.randint(0, 50, (4, 6))
    terms = [(divergence("skew_reverse_kl"), Outputs(target), 0.6), (CROSS_ENTROPY, ids, 0.4)]
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 100)  # blocks of 2 to 3 rows of the 24
    results = []
    for threshold in (1 << 40, 0):  # eager, then compiled
        monkeypatch.setattr(losses, "COMPILE_MIN_ELEMENTS", threshold)
        x = logits.clone().requires_grad_(True)
        loss, values = loss_terms(Outputs(x), terms, mask)
        results.append((values, torch.autograd.grad(loss, x)[0]))
    assert not losses._COMPILE_FAILED
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-7)


def test_misuse_errors():
    logits, target = _pair()
    with pytest.raises(UserError, match="11 and 12 vocabulary columns"):
        loss_terms(Outputs(logits), [(divergence("reverse_kl"), Outputs(torch.zeros(2, 5, 12)), 1.0)],
                   torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        loss_terms(Outputs(logits), [(divergence("reverse_kl"), Outputs(target), 1.0)], torch.ones(2, 5))
