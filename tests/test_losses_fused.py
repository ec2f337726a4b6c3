"""The fused (torch.compile) path of promptkd.losses: the switch, the size threshold, the eager
fallback when the compiler fails, no recompiles across shapes and dtypes, thread safety, and
agreement with the eager path at a vocabulary size where the compiled code differs.

Every test of tests/test_losses.py also runs on the fused path (its ``path`` fixture); these
are the tests that only make sense for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from promptkd import losses
from promptkd.losses import DIVERGENCES, fused, fused_enabled, reverse_kl, set_fused

NAMES = sorted(DIVERGENCES)
PARAMS = {"skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.3}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def compiled_calls(monkeypatch):
    """The names of the kernels whose compiled version ran, one entry per block."""
    calls = []
    real = losses._compiled

    def counting(kernel, need_u, need_w):
        compiled = real(kernel, need_u, need_w)

        def call(*args):
            calls.append(kernel.__name__)
            return compiled(*args)

        return call

    monkeypatch.setattr(losses, "_compiled", counting)
    return calls


def _inputs(shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(shape, generator=gen)).to(dtype)
    target = (3 * torch.randn(shape, generator=gen)).to(dtype)
    mask = torch.rand(shape[:-1], generator=gen) < 0.7
    return logits, target, mask


def _value_and_grads(name, logits, target, mask, **kwargs):
    lg, tg = logits.clone().requires_grad_(), target.clone().requires_grad_()
    value = DIVERGENCES[name](lg, tg, mask, reduction="none", **PARAMS.get(name, {}), **kwargs)
    weights = torch.linspace(0.5, 2.0, value.numel())  # per-row upstream gradients
    (value * weights).sum().backward()
    return value.detach(), lg.grad, tg.grad


# ---------------------------------------------------------------------------------------------
# The switch and the threshold.
# ---------------------------------------------------------------------------------------------


def test_switch_and_its_context_manager():
    with fused(True):
        assert fused_enabled()
        with fused(False):
            assert not fused_enabled()
        assert fused_enabled()
    with pytest.raises(ValueError, match="min_elements"):
        set_fused(True, min_elements=-1)


def test_environment_variable_turns_it_off_at_import(monkeypatch):
    for value, expected in (("0", False), ("off", False), ("false", False), ("1", True)):
        monkeypatch.setenv("PROMPTKD_FUSED_LOSSES", value)
        assert losses._env_enabled() is expected
    monkeypatch.delenv("PROMPTKD_FUSED_LOSSES")
    assert losses._env_enabled()
    code = "import promptkd.losses as m; print(m.fused_enabled())"
    env = {**os.environ, "PROMPTKD_FUSED_LOSSES": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_threshold_counts_selected_rows_times_vocabulary(compiled_calls):
    logits, target, _ = _inputs((4, 25))  # 100 elements
    mask = torch.tensor([True, True, False, False])  # 50 selected
    with fused(True, min_elements=101):
        reverse_kl(logits, target)
    assert compiled_calls == []
    with fused(True, min_elements=100):
        reverse_kl(logits, target)
        assert compiled_calls == ["_kl_rows"]
        reverse_kl(logits, target, mask)
        assert len(compiled_calls) == 1
    with fused(False, min_elements=0):
        reverse_kl(logits, target)
    assert len(compiled_calls) == 1
    with fused(True):  # the default threshold: tiny calls stay eager
        assert losses._STATE["min_elements"] == losses.FUSED_MIN_ELEMENTS
        reverse_kl(logits, target)
    assert len(compiled_calls) == 1


# ---------------------------------------------------------------------------------------------
# Agreement with the eager path, recompiles, threads.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fused_matches_eager_at_a_large_vocabulary(name, compiled_calls):
    """V > 4096: inductor specialises its reductions there, so this is the compiled code that
    LLM vocabularies run (test_losses.py's tiny vocabularies run the other variant)."""
    logits, target, mask = _inputs((2, 3, 4099), seed=1)
    logits[0, 0, :100] = -float("inf")  # masked vocabulary: 0 log 0 = 0 on both paths
    target[0, 0, :100] = -float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        results = {}
        for path in ("eager", "fused"):
            with fused(path == "fused", min_elements=0):
                results[path] = _value_and_grads(
                    name, logits.to(dtype), target.to(dtype), mask, chunk_size=2
                )
        (v0, gl0, gt0), (v1, gl1, gt1) = results["eager"], results["fused"]
        assert v1.dtype == torch.float32 and gl1.dtype == dtype
        torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
        for g0, g1 in ((gl0, gl1), (gt0, gt1)):
            assert torch.all(torch.isfinite(g1))
            assert torch.all(g1[0, 0, :100] == 0)
            scale = g0.abs().max().item()
            tol = {"rtol": 1e-4, "atol": 1e-5 * scale}
            if dtype == torch.bfloat16:  # one bfloat16 rounding of each may differ
                tol = {"rtol": 2e-2, "atol": 1e-2 * scale}
            torch.testing.assert_close(g1.float(), g0.float(), **tol)
    assert len(compiled_calls) > 0


def test_no_recompiles_across_row_counts_vocabularies_masks_and_bfloat16():
    counters = torch._dynamo.utils.counters
    with fused(True, min_elements=0):

        def run(shape, dtype=torch.float32, chunk_size=1024, with_mask=True):
            logits, target, mask = _inputs(shape, dtype=dtype)
            logits.requires_grad_()
            mask = mask if with_mask else None
            for name in ("reverse_kl", "generalized_jsd"):
                DIVERGENCES[name](logits, target, mask, chunk_size=chunk_size).backward()

        run((2, 5, 40))  # compiles what the calls below need (if nothing did before)
        before = counters["stats"]["unique_graphs"]
        run((1, 40), with_mask=False)  # one row
        run((3, 7, 300), chunk_size=4)  # chunks of 4 and a tail
        run((9, 13), chunk_size=8, with_mask=False)  # a 1-row tail
        run((2, 5, 40), dtype=torch.bfloat16)  # upcast per block: the float32 kernel
        assert counters["stats"]["unique_graphs"] == before


def test_concurrent_calls_from_threads_agree_with_eager():
    inputs = [_inputs((3, 4, 30), seed=seed) for seed in range(4)]
    with fused(False):
        want = [_value_and_grads("skew_reverse_kl", *args) for args in inputs]
    got = [None] * len(inputs)
    errors = []

    def work(i):
        try:
            got[i] = _value_and_grads("skew_reverse_kl", *inputs[i])
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    with fused(True, min_elements=0):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Falling back to eager.
# ---------------------------------------------------------------------------------------------


def _several_calls():
    """Every divergence, a few blocks each (chunk_size=2), values and gradients."""
    logits, target, mask = _inputs((2, 5, 11), seed=5)
    return [_value_and_grads(name, logits, target, mask, chunk_size=2) for name in NAMES]


@pytest.mark.parametrize("when", ["compiling", "running"])
def test_compiler_failure_warns_once_and_falls_back_to_eager(monkeypatch, when):
    with fused(False):
        want = _several_calls()

    def broken_compile(fn, **kwargs):
        if when == "compiling":
            raise RuntimeError("no C++ compiler here")

        def broken_call(*args):
            raise RuntimeError("no C++ compiler here")

        return broken_call

    monkeypatch.setattr(losses, "_COMPILED", {})  # nothing compiled before counts
    monkeypatch.setattr(torch, "compile", broken_compile)
    with fused(True, min_elements=0):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _several_calls()
            again = _several_calls()
        assert not fused_enabled()
        assert len(caught) == 1  # once, although every block of every call failed
        assert caught[0].category is RuntimeWarning
        assert "no C++ compiler here" in str(caught[0].message)
        assert "eagerly" in str(caught[0].message)
    assert fused_enabled()  # the context manager restored the setting before it
    for results in (got, again):
        for g, w in zip(results, want, strict=True):
            for a, b in zip(g, w, strict=True):
                assert torch.equal(a, b)  # the very same eager computation


def test_an_error_of_the_kernel_itself_is_not_blamed_on_the_compiler(monkeypatch):
    def failing_kernel(u, w, params, need_u, need_w):
        raise ValueError("the kernel's own error")

    monkeypatch.setattr(losses, "_COMPILED", {})
    monkeypatch.setattr(losses, "_kl_rows", failing_kernel)
    logits, target, _ = _inputs((4, 9))
    with fused(True, min_elements=0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning either
            with pytest.raises(ValueError, match="the kernel's own error"):
                reverse_kl(logits, target)
        assert fused_enabled()
