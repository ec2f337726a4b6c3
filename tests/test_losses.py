"""Tests for promptkd.losses: brute-force references, properties, gradients, chunking, masks.

The reference implementations below loop over positions and vocabulary entries in plain
Python float64 and spell out each formula, so they also pin down the conventions (which
argument is p, which weight goes where in the mixtures).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from promptkd.errors import UserError
from promptkd.losses import (
    DIVERGENCES,
    forward_kl,
    fused,
    generalized_jsd,
    get_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

NAMES = sorted(DIVERGENCES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny; with the CPU cores shared by other processes, OpenMP
    workers waiting at barriers make tiny ops up to 100x slower than on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, params=["eager", "fused"])
def path(request):
    """Every test runs twice: on the eager kernels and on their torch.compile'd versions (the
    fused path, forced here for tiny tensors too; tests/test_losses_fused.py checks that it
    really runs compiled code). Both must meet the same float64 references; float64 inputs
    are compiled too, so gradcheck checks the compiled kernels' gradients as well."""
    with fused(request.param == "fused", min_elements=0):
        yield request.param


# ---------------------------------------------------------------------------------------------
# Slow float64 references: one position at a time, one vocabulary entry at a time.
# ---------------------------------------------------------------------------------------------


def _softmax_ref(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl_ref(a: list[float], b: list[float]) -> float:
    """KL(a || b) with 0 log 0 = 0 and a > 0 = b -> +inf."""
    total = 0.0
    for a_v, b_v in zip(a, b, strict=True):
        if a_v == 0.0:
            continue
        if b_v == 0.0:
            return math.inf
        total += a_v * (math.log(a_v) - math.log(b_v))
    return total


def _mix_ref(a: list[float], b: list[float], weight_a: float) -> list[float]:
    return [weight_a * a_v + (1.0 - weight_a) * b_v for a_v, b_v in zip(a, b, strict=True)]


def _row_ref(name: str, q_logits: list[float], p_logits: list[float], **params) -> float:
    """One position: q = softmax(logits) is trained, p = softmax(target_logits) is the target."""
    p, q = _softmax_ref(p_logits), _softmax_ref(q_logits)
    if name == "forward_kl":
        return _kl_ref(p, q)
    if name == "reverse_kl":
        return _kl_ref(q, p)
    if name == "skew_forward_kl":
        alpha = params.get("alpha", 0.1)
        return _kl_ref(p, _mix_ref(p, q, alpha))  # KL(p || alpha p + (1-alpha) q)
    if name == "skew_reverse_kl":
        alpha = params.get("alpha", 0.1)
        return _kl_ref(q, _mix_ref(q, p, alpha))  # KL(q || alpha q + (1-alpha) p), DistiLLM
    if name == "generalized_jsd":
        beta = params.get("beta", 0.5)
        if beta == 0.0:
            return _kl_ref(p, q)
        if beta == 1.0:
            return _kl_ref(q, p)
        m = _mix_ref(p, q, beta)  # M = beta p + (1-beta) q
        return beta * _kl_ref(p, m) + (1.0 - beta) * _kl_ref(q, m)
    if name == "total_variation":
        return 0.5 * sum(abs(p_v - q_v) for p_v, q_v in zip(p, q, strict=True))
    raise AssertionError(name)


def _loss_ref(name, logits, target_logits, mask=None, reduction="mean", **params):
    logits = np.asarray(logits, dtype=np.float64)
    target_logits = np.asarray(target_logits, dtype=np.float64)
    lead = logits.shape[:-1]
    mask = np.ones(lead, dtype=bool) if mask is None else np.asarray(mask)
    values = []
    for idx in np.ndindex(*lead):
        if mask[idx]:
            values.append(_row_ref(name, list(logits[idx]), list(target_logits[idx]), **params))
    if reduction == "none":
        return np.array(values)
    if reduction == "sum":
        return sum(values)
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------


def _inputs(shape=(2, 5, 11), scale=3.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(shape, generator=gen)).to(dtype)
    target = (scale * torch.randn(shape, generator=gen)).to(dtype)
    mask = torch.rand(shape[:-1], generator=gen) < 0.7
    return logits, target, mask


def _asymmetric_pair():
    """A peaked target p and a two-mode q: KL(q||p) is about 1.4 x KL(p||q)."""
    p_logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    q_logits = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    return q_logits, p_logits


# ---------------------------------------------------------------------------------------------
# Values against the reference.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_brute_force(name, reduction, chunk_size):
    logits, target, mask = _inputs()
    got = DIVERGENCES[name](logits, target, mask, chunk_size=chunk_size, reduction=reduction)
    want = _loss_ref(name, logits, target, mask, reduction)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("skew_forward_kl", {"alpha": 0.3}),
        ("skew_reverse_kl", {"alpha": 0.7}),
        ("generalized_jsd", {"beta": 0.1}),
        ("generalized_jsd", {"beta": 0.9}),
    ],
)
def test_matches_brute_force_with_params_in_float64(name, params):
    logits, target, mask = _inputs(dtype=torch.float64)
    got = DIVERGENCES[name](logits, target, mask, reduction="none", **params)
    assert got.dtype == torch.float64  # float64 is not downcast to float32
    want = _loss_ref(name, logits, target, mask, "none", **params)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)


def test_bfloat16_inputs_are_upcast():
    logits, target, mask = _inputs()
    logits16 = logits.bfloat16().requires_grad_()
    got = reverse_kl(logits16, target.bfloat16(), mask)
    assert got.dtype == torch.float32
    want = _loss_ref("reverse_kl", logits16.detach().float(), target.bfloat16().float(), mask)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert logits16.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_zero_on_identical_inputs(name):
    logits, _, mask = _inputs()
    got = DIVERGENCES[name](logits, logits.clone(), mask, reduction="none")
    assert torch.all(got.abs() <= 1e-6)


_rows = st.integers(1, 4).flatmap(
    lambda n: st.integers(2, 9).flatmap(
        lambda v: st.tuples(
            arrays(np.float32, (n, v), elements=st.floats(-30, 30, width=32)),
            arrays(np.float32, (n, v), elements=st.floats(-30, 30, width=32)),
            arrays(np.float32, (n, 1), elements=st.floats(-50, 50, width=32)),
        )
    )
)


@settings(max_examples=40, deadline=None)
@given(data=_rows, name=st.sampled_from(NAMES))
def test_non_negative_and_shift_invariant(data, name):
    logits, target, shift = (torch.from_numpy(a) for a in data)
    fn = DIVERGENCES[name]
    value = fn(logits, target, reduction="none")
    assert torch.all(torch.isfinite(value))
    assert torch.all(value >= -1e-6)
    # Softmax ignores a constant added to a row, so the divergences must too.
    shifted = fn(logits + shift, target - 2 * shift, reduction="none")
    torch.testing.assert_close(shifted, value, rtol=1e-4, atol=1e-4)


def test_alpha_and_beta_endpoints_are_the_plain_kls():
    logits, target, mask = _inputs()
    fkl = forward_kl(logits, target, mask, reduction="none")
    rkl = reverse_kl(logits, target, mask, reduction="none")
    assert torch.equal(skew_forward_kl(logits, target, mask, reduction="none", alpha=0.0), fkl)
    assert torch.equal(skew_reverse_kl(logits, target, mask, reduction="none", alpha=0.0), rkl)
    assert torch.equal(generalized_jsd(logits, target, mask, reduction="none", beta=0.0), fkl)
    assert torch.equal(generalized_jsd(logits, target, mask, reduction="none", beta=1.0), rkl)
    for skew in (skew_forward_kl, skew_reverse_kl):
        assert torch.all(skew(logits, target, mask, reduction="none", alpha=1.0) == 0.0)


def test_skew_reverse_kl_is_skew_forward_kl_with_roles_swapped():
    """DistiLLM's SRKL: alpha weighs the KL's first argument in both skew KLs."""
    logits, target, mask = _inputs()
    srkl = skew_reverse_kl(logits, target, mask, alpha=0.2)
    assert srkl.item() == pytest.approx(skew_forward_kl(target, logits, mask, alpha=0.2).item())
    assert srkl.item() != pytest.approx(skew_reverse_kl(logits, target, mask, alpha=0.8).item())


def test_generalized_jsd_beta_is_not_swapped():
    """beta weighs the target (teacher) p in M and in KL(p||M): TRL's GKD convention.

    The slope of JSD_beta is KL(p||q) at beta = 0 and -KL(q||p) at beta = 1, so near
    beta = 1 the JSD is (1 - beta) x reverse KL and near 0 it is beta x forward KL. A swapped
    beta (the bug TRL once had) exchanges the two.
    """
    q_logits, p_logits = _asymmetric_pair()
    fkl, rkl = forward_kl(q_logits, p_logits).item(), reverse_kl(q_logits, p_logits).item()
    assert rkl > 1.3 * fkl  # the example really is asymmetric

    def jsd(beta, q=q_logits, p=p_logits):
        return generalized_jsd(q, p, beta=beta).item()

    assert jsd(0.999) / 0.001 == pytest.approx(rkl, rel=1e-2)
    assert jsd(0.001) / 0.001 == pytest.approx(fkl, rel=1e-2)
    # beta = 0.9 inherits the reverse KL's larger value here; with the roles of p and q
    # exchanged (so that the forward KL is the larger one) it is the smaller one.
    assert jsd(0.9) > 1.1 * jsd(0.1)
    assert jsd(0.9, q=p_logits, p=q_logits) < jsd(0.1, q=p_logits, p=q_logits) / 1.1
    for beta in (0.1, 0.9):
        assert jsd(beta) == pytest.approx(
            _loss_ref("generalized_jsd", q_logits, p_logits, beta=beta)
        )
    # Exchanging p and q is the same as exchanging beta and 1 - beta.
    assert jsd(0.9) == pytest.approx(jsd(0.1, q=p_logits, p=q_logits))


def test_generalized_jsd_mixture_is_in_log_space():
    """Logit gaps of 1e4: every probability but one underflows to 0 in float32.

    A mixture formed in probability space gives log M = log(0) = -inf where p and q both
    underflow, and 0 * -inf = NaN. In log space every term stays finite.
    """
    big = 1e4
    logits = torch.tensor([[big, 0.0, -big, -big], [0.0, big, -big, 0.0]], requires_grad=True)
    target = torch.tensor([[-big, 0.0, big, -big], [0.0, big, -big, -big]], requires_grad=True)
    beta = 0.3
    value = generalized_jsd(logits, target, reduction="none", beta=beta)
    # Row 0: p and q are disjoint one-hots, so JSD_beta = the entropy of (beta, 1 - beta).
    entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert value[0].item() == pytest.approx(entropy, rel=1e-6)
    assert value[1].item() == pytest.approx(0.0, abs=1e-6)  # same one-hot
    value.sum().backward()
    assert torch.all(torch.isfinite(logits.grad)) and torch.all(torch.isfinite(target.grad))
    for name in ("skew_forward_kl", "skew_reverse_kl", "total_variation"):
        assert torch.all(torch.isfinite(DIVERGENCES[name](logits, target, reduction="none")))


@pytest.mark.parametrize("name", NAMES)
def test_minus_inf_logits_mean_zero_probability(name):
    """-inf on the same vocabulary entries of both == those entries removed; grads stay finite."""
    logits, target, mask = _inputs(shape=(2, 4, 9))
    banned = torch.tensor([1, 4, 8])
    kept = torch.tensor([v for v in range(9) if v not in banned.tolist()])
    logits[..., banned] = -math.inf
    target[..., banned] = -math.inf
    logits.requires_grad_()
    target.requires_grad_()
    got = DIVERGENCES[name](logits, target, mask, chunk_size=3)
    want = _loss_ref(name, logits.detach()[..., kept], target.detach()[..., kept], mask)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    for grad in (logits.grad, target.grad):
        assert torch.all(torch.isfinite(grad))
        assert torch.all(grad[..., banned] == 0.0)


def test_trained_side_minus_inf_is_bounded_by_the_skew():
    """q = 0 where p > 0: forward KL is +inf, the skew KL stays finite (<= -log alpha)."""
    logits, target, _ = _inputs(shape=(3, 7))
    logits[:, 0] = -math.inf
    assert math.isinf(forward_kl(logits, target).item())
    alpha = 0.1
    skl = skew_forward_kl(logits.requires_grad_(), target, alpha=alpha, reduction="none")
    assert torch.all(skl <= -math.log(alpha) + 1e-6)
    skl.sum().backward()
    assert torch.all(torch.isfinite(logits.grad))


# ---------------------------------------------------------------------------------------------
# Gradients and chunking.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name, chunk_size):
    logits, target, mask = _inputs(shape=(2, 3, 5), dtype=torch.float64, seed=1)
    mask[0, 0] = True  # at least 5 selected rows, so chunk_size=2 really chunks (2 + 2 + 1)
    mask[1, :] = True
    logits.requires_grad_()
    target.requires_grad_()

    def fn(lg, tg):
        return DIVERGENCES[name](lg, tg, mask, chunk_size=chunk_size, reduction="none")

    assert torch.autograd.gradcheck(fn, (logits, target), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("needs_grad", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked(name, needs_grad):
    logits, target, mask = _inputs(shape=(3, 4, 13), seed=2)
    mask[:] = False
    mask.view(-1)[:7] = True  # 7 selected rows, chunk_size 3 does not divide 7
    results = []
    for chunk_size in (None, 3):
        lg = logits.clone().requires_grad_(needs_grad[0])
        tg = target.clone().requires_grad_(needs_grad[1])
        value = DIVERGENCES[name](lg, tg, mask, chunk_size=chunk_size, reduction="none")
        weights = torch.linspace(0.5, 2.0, value.numel())  # per-row upstream grads
        (value * weights).sum().backward()
        results.append((value.detach(), lg.grad, tg.grad))
    (v0, gl0, gt0), (v1, gl1, gt1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-7)
    for g0, g1, needed in ((gl0, gl1, needs_grad[0]), (gt0, gt1, needs_grad[1])):
        if needed:
            torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
        else:
            assert g0 is None and g1 is None


def test_chunked_handles_non_contiguous_inputs():
    """Shifted logits (``logits[:, :-1]``) are strided views; chunks index them directly."""
    logits, target, mask = _inputs(shape=(3, 6, 10), seed=3)
    mask[:, :-1] = True
    logits.requires_grad_()
    target.requires_grad_()
    grads = []
    for chunk_size in (None, 4):
        value = skew_reverse_kl(logits[:, :-1], target[:, :-1], mask[:, 1:], chunk_size=chunk_size)
        grads.append(torch.autograd.grad(value, (logits, target)))
        want = _loss_ref(
            "skew_reverse_kl", logits[:, :-1].detach(), target[:, :-1].detach(), mask[:, 1:]
        )
        assert value.item() == pytest.approx(want, rel=1e-5)
    for g_unchunked, g_chunked in zip(*grads, strict=True):
        torch.testing.assert_close(g_chunked, g_unchunked, rtol=1e-6, atol=1e-7)
        assert torch.all(g_chunked[:, -1] == 0.0)


def _kept_for_backward_bytes(fn, *inputs):
    """Bytes of the tensors autograd still keeps for backward after ``fn()`` returned.

    Storages of ``inputs`` (alive anyway) are not counted; neither is anything saved and
    already freed again during the forward.
    """
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()  # keeps the graph, hence what it saved, alive
    exclude = {x.untyped_storage().data_ptr() for x in inputs}
    alive = {}
    for ref in saved:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in exclude:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del loss
    return sum(alive.values())


def test_chunked_forward_keeps_no_intermediates_for_backward():
    """No (N, V) float32 intermediates are held until backward, chunked or not.

    The forward keeps only the gradient buffer of each input that needs one (already computed,
    block by block, by the closed-form kernels) and the selected row indices, if any.
    """
    logits = torch.randn(64, 50, requires_grad=True)
    target = torch.randn(64, 50)
    grad_bytes = logits.numel() * logits.element_size()
    index_bytes = 64 * 8  # the selected row indices, int64

    def kept(chunk_size, target=target):
        fn = lambda: generalized_jsd(logits, target, chunk_size=chunk_size)  # noqa: E731
        return _kept_for_backward_bytes(fn, logits, target)

    assert kept(8) <= grad_bytes + index_bytes
    assert kept(8, target.clone().requires_grad_()) <= 2 * grad_bytes + index_bytes
    assert kept(None) <= grad_bytes  # every row selected: no index tensors either


def test_chunked_under_no_grad_computes_values_only():
    logits, target, mask = _inputs(seed=4)
    logits.requires_grad_()
    with torch.no_grad():
        value = forward_kl(logits, target, mask, chunk_size=2)
    assert value.grad_fn is None
    assert value.item() == pytest.approx(forward_kl(logits, target, mask).item(), rel=1e-6)


def test_chunked_backward_can_run_twice_with_retain_graph():
    logits, target, mask = _inputs(seed=5)
    logits.requires_grad_()
    loss = reverse_kl(logits, target, mask, chunk_size=2)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * first)


def test_chunked_bfloat16_gradients_match_unchunked():
    logits, target, mask = _inputs(seed=6)
    grads = []
    for chunk_size in (None, 3):
        lg = logits.bfloat16().requires_grad_()
        skew_forward_kl(lg, target.bfloat16(), mask, chunk_size=chunk_size).backward()
        assert lg.grad.dtype == torch.bfloat16
        grads.append(lg.grad.float())
    # The chunked gradient is rounded to bfloat16 twice (before and after the upstream scale).
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Masks and reductions.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", NAMES)
def test_all_masked_batch_is_zero_with_zero_grads(name, chunk_size):
    logits, target, _ = _inputs(shape=(2, 3, 6))
    logits.requires_grad_()
    target.requires_grad_()
    mask = torch.zeros(2, 3, dtype=torch.bool)
    fn = DIVERGENCES[name]
    loss = fn(logits, target, mask, chunk_size=chunk_size)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert torch.equal(target.grad, torch.zeros_like(target))
    assert fn(logits, target, mask, reduction="sum").item() == 0.0
    assert fn(logits, target, mask, reduction="none").shape == (0,)


@pytest.mark.parametrize("name", NAMES)
def test_reductions_are_consistent(name):
    logits, target, mask = _inputs()
    fn = DIVERGENCES[name]
    per_position = fn(logits, target, mask, reduction="none")
    assert per_position.shape == (int(mask.sum()),)
    total = fn(logits, target, mask, reduction="sum")
    mean = fn(logits, target, mask, reduction="mean")
    torch.testing.assert_close(total, per_position.sum())
    torch.testing.assert_close(mean, total / mask.sum())
    # mask=None selects everything.
    assert fn(logits, target, reduction="none").shape == (mask.numel(),)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_single_distribution_and_no_leading_dims(chunk_size):
    logits, target, _ = _inputs(shape=(7,))
    want = _loss_ref("reverse_kl", logits[None], target[None])
    got = reverse_kl(logits, target, chunk_size=chunk_size)
    assert got.item() == pytest.approx(want, rel=1e-6)
    got = reverse_kl(logits, target, torch.tensor(True), chunk_size=chunk_size)
    assert got.item() == pytest.approx(want, rel=1e-6)
    got = reverse_kl(logits, target, torch.tensor(False), chunk_size=chunk_size, reduction="sum")
    assert got.item() == 0.0


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_unselected_positions_get_exactly_zero_gradient(chunk_size):
    logits, target, mask = _inputs(seed=7)
    assert 0 < int(mask.sum()) < mask.numel()
    logits.requires_grad_()
    target.requires_grad_()
    generalized_jsd(logits, target, mask, chunk_size=chunk_size).backward()
    for grad in (logits.grad, target.grad):
        assert torch.all(grad[~mask] == 0.0)
        assert torch.all(grad[mask].abs().sum(-1) > 0)


def test_masked_positions_are_never_read():
    logits, target, mask = _inputs()
    clean = generalized_jsd(logits, target, mask)
    logits[~mask] = math.nan
    target[~mask] = math.inf
    assert generalized_jsd(logits, target, mask).item() == clean.item()


# ---------------------------------------------------------------------------------------------
# Registry and validation.
# ---------------------------------------------------------------------------------------------


def test_registry_names():
    assert set(DIVERGENCES) == {
        "forward_kl",
        "reverse_kl",
        "skew_forward_kl",
        "skew_reverse_kl",
        "generalized_jsd",
        "total_variation",
    }
    assert DIVERGENCES["total_variation"] is total_variation


def test_get_divergence_binds_params():
    logits, target, mask = _inputs()
    loss = get_divergence("generalized_jsd", beta=0.25, chunk_size=2)
    direct = generalized_jsd(logits, target, mask, beta=0.25)
    torch.testing.assert_close(loss(logits, target, mask), direct)
    torch.testing.assert_close(
        loss(logits, target, mask, reduction="sum"), direct * mask.sum(), rtol=1e-6, atol=1e-6
    )


def test_get_divergence_errors():
    with pytest.raises(UserError, match=r"'kl'.*forward_kl.*reverse_kl"):
        get_divergence("kl")
    with pytest.raises(UserError, match=r"'forward_kl' does not take alpha"):
        get_divergence("forward_kl", alpha=0.1)
    with pytest.raises(UserError, match=r"alpha.*1\.5"):
        get_divergence("skew_reverse_kl", alpha=1.5)


@pytest.mark.parametrize(
    ("fn", "params"),
    [
        (skew_forward_kl, {"alpha": -0.1}),
        (skew_reverse_kl, {"alpha": 1.5}),
        (generalized_jsd, {"beta": 2.0}),
        (generalized_jsd, {"beta": math.nan}),
    ],
)
def test_weight_out_of_range_is_a_value_error_naming_it(fn, params):
    logits, target, _ = _inputs()
    ((key, value),) = params.items()
    with pytest.raises(ValueError, match=rf"{key}.*{value}"):
        fn(logits, target, **params)


def test_input_validation():
    logits, target, mask = _inputs()
    with pytest.raises(UserError, match=r"\(2, 5, 11\).*\(2, 5, 12\)"):
        forward_kl(logits, torch.randn(2, 5, 12))
    with pytest.raises(TypeError, match="bool"):
        forward_kl(logits, target, mask.long())
    with pytest.raises(ValueError, match="mask shape"):
        forward_kl(logits, target, mask[:, :3])
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(logits, target, reduction="batchmean")
    with pytest.raises(ValueError, match="chunk_size"):
        forward_kl(logits, target, chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_closed_form_kl_backward_matches_autograd(name, dtype):
    """forward_kl / reverse_kl use a closed-form backward: same grads (and dtypes) as autograd."""
    torch.manual_seed(3)
    logits = (torch.randn(6, 50) * 3).to(dtype).requires_grad_()
    target = (torch.randn(6, 50) * 3).to(dtype).requires_grad_()
    weights = torch.rand(6)  # a non-uniform incoming gradient per row
    (DIVERGENCES[name](logits, target, reduction="none") * weights).sum().backward()

    lg, tg = logits.detach().float().requires_grad_(), target.detach().float().requires_grad_()
    log_q, log_p = torch.log_softmax(lg, -1), torch.log_softmax(tg, -1)
    a, b = (log_p, log_q) if name == "forward_kl" else (log_q, log_p)
    ((a.exp() * (a - b)).sum(-1) * weights).sum().backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    for got, want in ((logits.grad, lg.grad), (target.grad, tg.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, **tol)
