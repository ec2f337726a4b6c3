"""Token-level divergences between two next-token distributions, computed from logits.

Every loss here is a pure function with one signature::

    fn(logits, target_logits, mask=None, *, chunk_size=1024, reduction="mean", <param>)

- ``logits`` (..., V): the distribution being trained, q = softmax(logits).
- ``target_logits`` (..., V): the target distribution, p = softmax(target_logits).
- ``mask`` (...) bool: True on positions that count (None = every position).
- ``chunk_size``: at most this many rows are processed at once, a memory bound (None = no
  bound).
- ``reduction``: "mean" = sum over selected positions / their number (0 when none is
  selected, never NaN); "sum" = sum over selected positions (the training loop divides by a
  global token count); "none" = one value per selected position, shape (N,).

The direction is in the name: ``forward_kl`` is KL(p || q) (mode covering), ``reverse_kl`` is
KL(q || p) (mode seeking). Gradients flow into whichever argument requires grad (both may).

How the work is done:

1. Only selected positions are read: masked positions cost nothing, and NaN there does not
   leak into the loss.
2. Everything is computed in float32 (float64 inputs stay float64), whatever the input dtype:
   each block of rows is upcast on its own.
3. Each divergence is one row kernel (``_kl_rows``, ``_skew_kl_rows``, ``_jsd_rows``,
   ``_tv_rows``) that returns the per-row values *and* their analytic gradients: no autograd
   graph through log-softmax, exp and the mixture. A custom autograd function (``_Rows``)
   gathers, upcasts and evaluates blocks of rows (at most ``chunk_size``; on CPU about
   ``BLOCK_ELEMENTS`` elements per thread, which stay in cache across the passes of a row) and
   writes each block's gradient into an input-shaped buffer, in the input's dtype, before
   moving on; backward only scales those rows by the upstream gradient. Extra memory is the
   gradient buffer plus a few (block, V) float32 temporaries; no (N, V) intermediate is held
   from forward to backward. Results do not depend on ``chunk_size`` beyond float rounding.
   Gradients are first order only (no double backward through a divergence).
4. Fused or eager: the same kernels run either as written (eager) or through
   ``torch.compile(dynamic=True)`` (fused: one vectorised loop nest per kernel instead of a
   dozen whole-tensor passes). Fused is the default for calls of at least
   ``FUSED_MIN_ELEMENTS`` selected rows x vocabulary; ``set_fused`` / ``fused`` switch it
   (``PROMPTKD_FUSED_LOSSES=0`` turns it off at import), and a compiler failure falls back to
   eager once and for all, with a warning. ``benchmarks/bench_losses.py`` measures both.
5. ``0 log 0 = 0``: vocabulary entries with probability 0 (e.g. logits set to -inf to mask
   part of the vocabulary) contribute nothing and get zero gradient, never NaN. A target with
   mass where the trained distribution has none gives +inf, as the formula says.

``DIVERGENCES`` maps names to functions; ``get_divergence(name, **params)`` validates a name
and its parameters (e.g. from a config file) and returns a ready-to-call loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.autograd.function import once_differentiable

from promptkd.errors import UserError

__all__ = [
    "DIVERGENCES",
    "FUSED_MIN_ELEMENTS",
    "forward_kl",
    "fused",
    "fused_enabled",
    "generalized_jsd",
    "get_divergence",
    "reverse_kl",
    "set_fused",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
]

REDUCTIONS = ("mean", "sum", "none")

FUSED_MIN_ELEMENTS = 1 << 22
"""Default size threshold of the fused path: a call whose selected rows x vocabulary is smaller
runs eagerly. Compiling a kernel took 2-7 s on 2 shared cores (0.1-0.4 s from a warm inductor
cache), the process's first one 12-22 s (3.6 s warm), once per process; a fused training call
saved 3-11 ns per element over eager (1 thread, benchmarks/results/bench_losses_20261202.md).
Below ~4M elements (e.g. 32 rows of a 128k vocabulary) that is < 50 ms a call, so the warm-up
would only pay off after hundreds of calls: unit tests and toy models stay eager, LLM-sized
batches (512 x 49,152 = 25M elements) are fused."""

BLOCK_ELEMENTS = 1 << 19
"""On CPU, rows are evaluated in blocks of about this many elements per intra-op thread (at
most ``chunk_size`` rows, at least one row per thread). Each row takes several passes over the
vocabulary (max, sum, value, gradient); a block small enough to stay in cache between passes
measured faster than passes over the whole (N, V) tensor (reverse KL, 512 x 49,152 float32, 1
thread, forward + backward: eager 3.6x, fused 1.8x)."""

_FUSED_ENV = "PROMPTKD_FUSED_LOSSES"

# A row kernel maps (n, V) logits u and w (float32 or float64, contiguous), a parameter tensor
# (or None) and two static flags to the (n,) per-row values and the gradients of their sum
# with respect to u and w (None where the flag is False).
Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


# ---------------------------------------------------------------------------------------------
# Fused (torch.compile) or eager: the process-wide switch.
# ---------------------------------------------------------------------------------------------


def _env_enabled() -> bool:
    return os.environ.get(_FUSED_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


_LOCK = threading.Lock()
_STATE = {
    "enabled": _env_enabled(),
    "min_elements": FUSED_MIN_ELEMENTS,
    "failure": None,  # "<ExceptionType>: <message>" once the compiler has failed
}
# (kernel, need_u, need_w) -> the compiled kernel; filled lazily, one torch.compile each.
_COMPILED: dict[tuple[Kernel, bool, bool], Callable] = {}


def set_fused(enabled: bool, *, min_elements: int | None = None) -> None:
    """Evaluate the divergences fused (torch.compile) or eagerly, process-wide.

    Fused and eager run the same row kernels (one definition of each value and its analytic
    gradient); fused compiles each kernel with ``torch.compile(dynamic=True)`` the first time
    it is needed (a few seconds on CPU: once per kernel, gradient pattern and float32/float64;
    bfloat16 inputs are upcast and share the float32 kernel; row counts and vocabulary sizes
    do not recompile, except that inductor specialises vocabularies above 4,096 once, and a
    new ``torch.set_num_threads`` compiles again). If compiling or running a compiled kernel
    fails, a warning is issued once and every later call runs eagerly; the failing call's
    result is computed eagerly.
    The default is on, unless the environment variable ``PROMPTKD_FUSED_LOSSES=0`` was set
    when ``promptkd.losses`` was imported.

    Args:
        enabled: True = fused for calls of at least ``min_elements`` selected rows x
            vocabulary (eager below); False = always eager. Passing True also re-arms the
            fused path after a compiler failure.
        min_elements: the size threshold (``FUSED_MIN_ELEMENTS`` by default); None keeps the
            current one; 0 = fused for every call (tests).
    """
    if min_elements is not None and (
        isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 0
    ):
        raise ValueError(f"min_elements must be a non-negative int, got {min_elements!r}")
    with _LOCK:
        _STATE["enabled"] = bool(enabled)
        if enabled:
            _STATE["failure"] = None
        if min_elements is not None:
            _STATE["min_elements"] = min_elements


def fused_enabled() -> bool:
    """True when large calls try the fused path: switched on, and no compiler failure since."""
    return bool(_STATE["enabled"]) and _STATE["failure"] is None


@contextlib.contextmanager
def fused(enabled: bool, *, min_elements: int | None = None) -> Iterator[None]:
    """``set_fused(enabled, min_elements=...)`` for a with-block; the previous setting (and
    failure state) is restored on exit. Process-wide, not per thread."""
    with _LOCK:
        previous = dict(_STATE)
    set_fused(enabled, min_elements=min_elements)
    try:
        yield
    finally:
        with _LOCK:
            _STATE.update(previous)


def _compile_options() -> dict:
    options: dict = {"dynamic": True, "fullgraph": True}
    # torch >= 2.13: each kernel gets its own recompile budget (they share one code object).
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        options["isolate_recompiles"] = True
    return options


def _compiled(kernel: Kernel, need_u: bool, need_w: bool) -> Callable:
    key = (kernel, need_u, need_w)
    compiled = _COMPILED.get(key)
    if compiled is None:
        with _LOCK:
            compiled = _COMPILED.get(key)
            if compiled is None:

                def rows(u, w, params):
                    return kernel(u, w, params, need_u, need_w)

                compiled = torch.compile(rows, **_compile_options())
                _COMPILED[key] = compiled
    return compiled


def _mark_rows_dynamic(*tensors: torch.Tensor) -> None:
    """No recompile for a 1-row block (a chunk's tail): dim 0 is never specialised to 0 or 1."""
    try:
        from torch._dynamo.decorators import mark_unbacked
    except ImportError:  # older torch: a 1-row block compiles once more, that is all
        return
    for t in tensors:
        mark_unbacked(t, 0)


def _compiler_failed(error: Exception) -> None:
    with _LOCK:
        if _STATE["failure"] is not None or not _STATE["enabled"]:
            return
        _STATE["failure"] = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"promptkd.losses: the fused (torch.compile) divergences failed "
        f"({type(error).__name__}: {str(error)[:500]}); they run eagerly from now on, with the "
        f"same results, only slower. Set {_FUSED_ENV}=0 or call "
        "promptkd.losses.set_fused(False) to skip the attempt.",
        RuntimeWarning,
        stacklevel=2,
    )


def _evaluate(kernel: Kernel, u, w, params, need_u: bool, need_w: bool, fused_path: bool):
    """One block through the compiled kernel (fused_path) or the plain one."""
    if fused_path and _STATE["failure"] is None:
        try:
            compiled = _compiled(kernel, need_u, need_w)
            _mark_rows_dynamic(u, w)
            return compiled(u, w, params)
        except Exception as error:  # the compiler's failure, unless eager fails the same way
            result = kernel(u, w, params, need_u, need_w)
            _compiler_failed(error)
            return result
    return kernel(u, w, params, need_u, need_w)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", bool)())


def _use_fused(num_elements: int) -> bool:
    return (
        fused_enabled()
        and num_elements >= _STATE["min_elements"]
        and num_elements > 0
        and not _is_compiling()  # inside a caller's torch.compile: let it trace the kernels
    )


# ---------------------------------------------------------------------------------------------
# Row kernels: each divergence's per-row value and analytic gradients on one (n, V) block,
# written once as plain tensor code. The eager path calls them as they are; the fused path
# calls torch.compile of the same functions. Conventions: u, w are logits in float32 or
# float64; a = softmax(u), b = softmax(w); gradients are those of the plain sum of the values;
# entries with zero probability contribute 0 to values and gradients (0 log 0 = 0): the log
# ratio is zeroed there, so -inf - -inf = NaN never leaves an unused branch.
# ---------------------------------------------------------------------------------------------


def _log_mixture(log_a, log_b, log_weight_a, log_weight_b):
    """log(w a + (1 - w) b) = logaddexp(log a + log w, log b + log(1 - w)), in log space.

    In probability space the mixture underflows to 0 wherever a and b both do (logit gaps of
    ~100 in float32), and 0 * log 0 turns into NaN. -inf log-probs (masked vocabulary) are
    clamped to the most negative finite float: such entries are zeroed by the caller anyway.
    """
    floor = torch.finfo(log_a.dtype).min
    return torch.logaddexp(
        log_a.clamp(min=floor) + log_weight_a, log_b.clamp(min=floor) + log_weight_b
    )  # (n, V)


def _kl_rows(u, w, params, need_u: bool, need_w: bool):
    """KL(a || b) = sum_v a (log a - log b).

    d/du = a (log a - log b - KL); d/dw = b - a. (params: unused.)
    """
    log_a = torch.log_softmax(u, dim=-1)  # (n, V)
    log_b = torch.log_softmax(w, dim=-1)  # (n, V)
    a = log_a.exp()
    log_ratio = torch.where(a > 0, log_a - log_b, 0.0)  # (n, V)
    kl = (a * log_ratio).sum(dim=-1)  # (n,)
    grad_u = a * (log_ratio - kl.unsqueeze(-1)) if need_u else None
    grad_w = log_b.exp() - a if need_w else None
    return kl, grad_u, grad_w


def _skew_kl_rows(u, w, params, need_u: bool, need_w: bool):
    """KL(a || m) with m = alpha a + (1 - alpha) b, 0 < alpha < 1.

    params = (alpha, log alpha, log(1 - alpha)). With r = a / m (at most 1 / alpha):
    d/du = a (log a - log m - alpha r - KL + alpha sum_v a r);
    d/dw = (1 - alpha) b (sum_v b r - r).
    """
    alpha = params[0]
    log_a = torch.log_softmax(u, dim=-1)  # (n, V)
    log_b = torch.log_softmax(w, dim=-1)  # (n, V)
    a = log_a.exp()
    log_m = _log_mixture(log_a, log_b, params[1], params[2])  # (n, V)
    log_ratio = torch.where(a > 0, log_a - log_m, 0.0)  # (n, V)
    kl = (a * log_ratio).sum(dim=-1)  # (n,)
    grad_u = grad_w = None
    if need_u or need_w:
        r = torch.where(a > 0, log_ratio.exp(), 0.0)  # (n, V) a / m
    if need_u:
        centre = kl.unsqueeze(-1) - alpha * (a * r).sum(dim=-1, keepdim=True)  # (n, 1)
        grad_u = a * (log_ratio - alpha * r - centre)
    if need_w:
        b = log_b.exp()
        grad_w = (1.0 - alpha) * b * ((b * r).sum(dim=-1, keepdim=True) - r)
    return kl, grad_u, grad_w


def _jsd_rows(u, w, params, need_u: bool, need_w: bool):
    """beta KL(a || m) + (1 - beta) KL(b || m) with m = beta a + (1 - beta) b, 0 < beta < 1.

    params = (beta, log beta, log(1 - beta)). The 1 / m terms of the gradient cancel because
    beta a + (1 - beta) b = m: d/du = beta a (log a - log m - KL(a || m)), and likewise
    d/dw = (1 - beta) b (log b - log m - KL(b || m)).
    """
    beta = params[0]
    log_a = torch.log_softmax(u, dim=-1)  # (n, V)
    log_b = torch.log_softmax(w, dim=-1)  # (n, V)
    a, b = log_a.exp(), log_b.exp()
    log_m = _log_mixture(log_a, log_b, params[1], params[2])  # (n, V)
    ratio_a = torch.where(a > 0, log_a - log_m, 0.0)  # (n, V)
    ratio_b = torch.where(b > 0, log_b - log_m, 0.0)  # (n, V)
    kl_a = (a * ratio_a).sum(dim=-1, keepdim=True)  # (n, 1)
    kl_b = (b * ratio_b).sum(dim=-1, keepdim=True)  # (n, 1)
    value = (beta * kl_a + (1.0 - beta) * kl_b).squeeze(-1)  # (n,)
    grad_u = beta * a * (ratio_a - kl_a) if need_u else None
    grad_w = (1.0 - beta) * b * (ratio_b - kl_b) if need_w else None
    return value, grad_u, grad_w


def _tv_rows(u, w, params, need_u: bool, need_w: bool):
    """TV(a, b) = 0.5 sum_v |a - b|; with s = 0.5 sign(a - b) (0 where a == b):
    d/du = a (s - sum_v a s); d/dw = b (sum_v b s - s). (params: unused.)"""
    a = torch.log_softmax(u, dim=-1).exp()  # (n, V)
    b = torch.log_softmax(w, dim=-1).exp()  # (n, V)
    diff = a - b
    value = 0.5 * diff.abs().sum(dim=-1)  # (n,)
    s = 0.5 * diff.sign()  # (n, V)
    grad_u = a * (s - (a * s).sum(dim=-1, keepdim=True)) if need_u else None
    grad_w = b * ((b * s).sum(dim=-1, keepdim=True) - s) if need_w else None
    return value, grad_u, grad_w


def _zero_rows(u, w, params, need_u: bool, need_w: bool):
    """KL(a || a) = 0 (a skew KL with alpha = 1), exactly, with zero gradients. Never compiled."""
    zeros = torch.zeros_like(u)
    return u.new_zeros(u.shape[0]), zeros if need_u else None, zeros if need_w else None


def _mixture_params(weight: float) -> tuple[float, float, float]:
    return weight, math.log(weight), math.log1p(-weight)


# ---------------------------------------------------------------------------------------------
# Masking, blocking, reduction: shared by every divergence.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How ``_Rows`` evaluates one call (everything but the two input tensors)."""

    kernel: Kernel
    swap: bool  # the kernel's first argument is target_logits (else logits)
    params: torch.Tensor | None  # the kernel's parameters, in the compute dtype
    block_rows: int
    # None: the inputs are (M, V) and every row counts (blocks are row slices, no copy). Else
    # one (N,) row index tensor per leading dim of the inputs (blocks are gathered, so
    # unselected rows are never read) and the leading-shaped bool tensor of the rows that do
    # not count (None if all do), whose gradient rows are zero.
    positions: tuple[torch.Tensor, ...] | None
    unselected: torch.Tensor | None
    need_grads: tuple[bool, bool]  # decided by the caller: grad mode is off inside forward
    fused: bool


class _Rows(torch.autograd.Function):
    """Per-position divergence of the selected rows, one block of rows at a time.

    Forward upcasts each block, runs the kernel (fused or eager), which returns the values and
    the analytic gradients of their plain sum, and writes those gradients into a buffer shaped
    like the input, in the input's dtype; nothing else outlives the block. Each row's value
    depends on that row only, so the gradient for any upstream weights is the buffer with every
    row scaled by its weight: that is all backward does. Compared with recomputing the kernel
    in backward, this keeps one (N, V) buffer per input that needs a gradient from forward to
    backward instead of both inputs (the teacher's logits could not be freed); the price is
    that the gradient is computed even if backward never runs (evaluate under
    ``torch.no_grad()``, which skips it).
    """

    @staticmethod
    def forward(ctx, plan: _Plan, logits, target):
        inputs = (logits, target)
        compute_dtype = torch.promote_types(
            torch.promote_types(logits.dtype, target.dtype), torch.float32
        )
        positions = plan.positions
        num_rows = logits.shape[0] if positions is None else positions[0].numel()
        values = torch.empty(num_rows, dtype=compute_dtype, device=logits.device)
        grads = [
            torch.empty_like(x, memory_format=torch.contiguous_format) if need else None
            for x, need in zip(inputs, plan.need_grads, strict=True)
        ]
        if plan.unselected is not None:  # every other row is written block by block below
            for grad in grads:
                if grad is not None:
                    grad[plan.unselected] = 0
        need_u, need_w = plan.need_grads[::-1] if plan.swap else plan.need_grads
        for start in range(0, num_rows, plan.block_rows):
            stop = min(start + plan.block_rows, num_rows)
            if positions is None:
                rows = slice(start, stop)
            else:
                rows = tuple(index[start:stop] for index in positions)
            # (block, V) each, upcast and contiguous: a fresh copy unless already so. Detached:
            # a view of an input that requires grad would still say so in no-grad mode.
            block = [
                x[rows].detach().to(dtype=compute_dtype, memory_format=torch.contiguous_format)
                for x in inputs
            ]
            u, w = block[::-1] if plan.swap else block
            block_values, grad_u, grad_w = _evaluate(
                plan.kernel, u, w, plan.params, need_u, need_w, plan.fused
            )
            values[start:stop] = block_values
            block_grads = (grad_w, grad_u) if plan.swap else (grad_u, grad_w)
            for grad, block_grad in zip(grads, block_grads, strict=True):
                if grad is not None:
                    grad[rows] = block_grad.to(grad.dtype)
        ctx.num_index = 0 if positions is None else len(positions)
        ctx.has_grad = [grad is not None for grad in grads]
        ctx.lead_shape = logits.shape[:-1]
        ctx.save_for_backward(*(positions or ()), *(grad for grad in grads if grad is not None))
        return values  # (N,)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values):
        saved = ctx.saved_tensors
        positions, stored = saved[: ctx.num_index], iter(saved[ctx.num_index :])
        if positions:  # the upstream weight of every row, 0 on rows that were not selected
            weights = grad_values.new_zeros(ctx.lead_shape)
            weights[positions] = grad_values
        else:
            weights = grad_values
        in_place = _graph_is_freed_after_backward()
        grads = [
            _scale_rows(next(stored), weights, in_place) if has else None for has in ctx.has_grad
        ]
        return None, *grads


def _graph_is_freed_after_backward() -> bool:
    """True when this backward runs without retain_graph / create_graph: the saved gradient
    buffers are never read again, so they may be scaled in place (no new (N, V) tensor)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _scale_rows(unit_grad: torch.Tensor, weights: torch.Tensor, in_place: bool) -> torch.Tensor:
    """unit_grad (..., V) with each row times its weight (...), in the weights' precision.

    In place when allowed (one pass, nothing allocated); otherwise a new tensor, so that the
    saved buffer stays intact for another backward (retain_graph), and a low-precision
    gradient is then scaled a block at a time, with no (N, V) float32 temporary.
    """
    weights = weights.unsqueeze(-1)  # (..., 1)
    if in_place:  # computed in the promoted dtype, rounded once to the buffer's
        return unit_grad.mul_(weights)
    if torch.promote_types(unit_grad.dtype, weights.dtype) == unit_grad.dtype:
        return unit_grad * weights.to(unit_grad.dtype)
    vocab = unit_grad.shape[-1]
    out = torch.empty_like(unit_grad)
    flat_in, flat_out = unit_grad.view(-1, vocab), out.view(-1, vocab)
    flat_weights = weights.reshape(-1, 1)
    step = max(1, BLOCK_ELEMENTS // max(vocab, 1))
    for start in range(0, flat_in.shape[0], step):
        rows = slice(start, start + step)
        flat_out[rows] = flat_in[rows] * flat_weights[rows]
    return out


def _block_rows(num_rows: int, vocab: int, chunk_size: int | None, device: torch.device) -> int:
    rows = num_rows if chunk_size is None else chunk_size
    if device.type == "cpu":
        # Each intra-op thread takes its share of a block's rows in every pass: about
        # BLOCK_ELEMENTS elements per thread stay in its cache, and there are few blocks (few
        # parallel regions, each a barrier that a busy machine makes expensive).
        per_thread = -(-BLOCK_ELEMENTS // max(vocab, 1))
        rows = min(rows, per_thread * torch.get_num_threads())
    return max(rows, 1)


def _check_unit_interval(name: str, value: float, loss: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise UserError(f"{loss}: {name} must be a number in [0, 1], got {value!r}")


def _divergence(
    kernel: Kernel,
    swap: bool,
    params: tuple[float, ...] | None,
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None,
    chunk_size: int | None,
    reduction: str,
) -> torch.Tensor:
    """Validate, select the rows, evaluate ``kernel`` block by block (fused or eager), reduce.

    ``swap``: the kernel's first argument is ``target_logits`` (else ``logits``).
    """
    if logits.shape != target_logits.shape:
        raise UserError(
            f"logits {tuple(logits.shape)} and target_logits {tuple(target_logits.shape)} must "
            "have the same shape; a different last dim means the two models do not share a "
            "vocabulary, which token-level distillation requires (use one tokenizer for both, "
            "or pad the smaller vocabulary's logits with -inf)"
        )
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits need a non-empty last (vocabulary) dim, got {tuple(logits.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    if mask is not None and mask.dtype != torch.bool:
        # An integer 0/1 mask would silently index rows 0 and 1 instead of selecting.
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}; pass mask.bool()")
    if mask is not None and mask.shape != logits.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits shape without its last "
            f"dim, {tuple(logits.shape[:-1])}"
        )

    if logits.ndim == 1:  # a single distribution is one row
        logits, target_logits = logits.unsqueeze(0), target_logits.unsqueeze(0)
        mask = None if mask is None else mask.reshape(1)
    vocab = logits.shape[-1]
    positions = unselected = None
    if mask is not None:
        positions = mask.nonzero(as_tuple=True)  # one (N,) row index per leading dim
        if positions[0].numel() < mask.numel():
            unselected = ~mask
    if unselected is None:
        # Every position counts: blocks are row slices of (M, V) views, when views exist.
        try:
            logits, target_logits = logits.view(-1, vocab), target_logits.view(-1, vocab)
            positions = None
        except RuntimeError:  # e.g. logits[:, :-1] of a batch: gather rows, never copy it all
            if positions is None:
                positions = torch.ones(
                    logits.shape[:-1], dtype=torch.bool, device=logits.device
                ).nonzero(as_tuple=True)
    num_rows = logits.shape[0] if positions is None else positions[0].numel()

    compute_dtype = torch.promote_types(
        torch.promote_types(logits.dtype, target_logits.dtype), torch.float32
    )
    plan = _Plan(
        kernel=kernel,
        swap=swap,
        params=None
        if params is None
        else torch.tensor(params, dtype=compute_dtype, device=logits.device),
        block_rows=_block_rows(num_rows, vocab, chunk_size, logits.device),
        positions=positions,
        unselected=unselected,
        need_grads=(
            torch.is_grad_enabled() and logits.requires_grad,
            torch.is_grad_enabled() and target_logits.requires_grad,
        ),
        fused=kernel is not _zero_rows and _use_fused(num_rows * vocab),
    )
    per_row = _Rows.apply(plan, logits, target_logits)  # (N,)

    if reduction == "none":
        return per_row
    total = per_row.sum()  # an empty sum is 0 and still carries a grad_fn when inputs need one
    if reduction == "sum":
        return total
    return total / max(num_rows, 1)


def _skew_kl(first_is_target: bool, alpha: float, *args) -> torch.Tensor:
    """KL(a || alpha a + (1 - alpha) b), a = softmax(target_logits) if first_is_target."""
    if alpha == 0.0:  # exactly the plain KL
        kernel, params = _kl_rows, None
    elif alpha == 1.0:  # KL(a || a)
        kernel, params = _zero_rows, None
    else:
        kernel, params = _skew_kl_rows, _mixture_params(alpha)
    return _divergence(kernel, first_is_target, params, *args)


# ---------------------------------------------------------------------------------------------
# Public losses.
# ---------------------------------------------------------------------------------------------


def forward_kl(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL, KL(p || q) = sum_v p(v) (log p(v) - log q(v)), per selected position.

    p = softmax(target_logits), q = softmax(logits). Mode covering: q is pushed to put mass
    wherever p has some. This is the KD baseline's term and TRL's GKD with beta = 0.

    Args:
        logits: (..., V) logits of the trained distribution q.
        target_logits: (..., V) logits of the target distribution p.
        mask: (...) bool, True where the position counts; None selects every position.
        chunk_size: at most this many rows at once (a memory bound); None: no bound.
        reduction: "mean" (token-level mean, 0 if nothing selected), "sum", or "none".

    Returns:
        A float32 scalar, or an (N,) vector for reduction="none" (N = selected positions);
        float64 when the inputs are float64.

    Raises:
        UserError: logits and target_logits differ in shape (e.g. vocabulary sizes).
        ValueError, TypeError: bad mask shape / dtype, reduction or chunk_size.
    """
    return _divergence(_kl_rows, True, None, logits, target_logits, mask, chunk_size, reduction)


def reverse_kl(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reverse KL, KL(q || p) = sum_v q(v) (log q(v) - log p(v)), per selected position.

    p = softmax(target_logits), q = softmax(logits). Mode seeking: q is pushed off regions
    where p is small. This is PromptKD's student loss (q = student, p = prompted teacher)
    and TRL's GKD with beta = 1. Args, returns and raises as in ``forward_kl``.
    """
    return _divergence(_kl_rows, False, None, logits, target_logits, mask, chunk_size, reduction)


def skew_forward_kl(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = 1024,
    reduction: str = "mean",
    alpha: float = 0.1,
) -> torch.Tensor:
    """Skew KL (DistiLLM's SKL), KL(p || m) with m = alpha p + (1 - alpha) q.

    p = softmax(target_logits), q = softmax(logits); m is formed in log space. alpha = 0
    gives ``forward_kl`` exactly; alpha = 1 gives 0. Mixing a little p into q keeps the
    divergence bounded (by -log alpha) where q has no mass.

    Args:
        alpha: weight of the target p in the mixture, in [0, 1] (DistiLLM default 0.1).
        Others as in ``forward_kl``.

    Raises:
        UserError: alpha outside [0, 1]; and as in ``forward_kl``.
    """
    _check_unit_interval("alpha", alpha, "skew_forward_kl")
    return _skew_kl(True, float(alpha), logits, target_logits, mask, chunk_size, reduction)


def skew_reverse_kl(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = 1024,
    reduction: str = "mean",
    alpha: float = 0.1,
) -> torch.Tensor:
    """Skew reverse KL (DistiLLM's SRKL), KL(q || m) with m = alpha q + (1 - alpha) p.

    p = softmax(target_logits), q = softmax(logits); m is formed in log space. As in
    DistiLLM's code, alpha weighs the trained distribution q (the KL's first argument), so
    alpha = 0 gives ``reverse_kl`` exactly and alpha = 1 gives 0, mirroring
    ``skew_forward_kl``: ``skew_reverse_kl(a, b) == skew_forward_kl(b, a)``.

    Args:
        alpha: weight of q in the mixture, in [0, 1] (DistiLLM default 0.1).
        Others as in ``forward_kl``.

    Raises:
        UserError: alpha outside [0, 1]; and as in ``forward_kl``.
    """
    _check_unit_interval("alpha", alpha, "skew_reverse_kl")
    return _skew_kl(False, float(alpha), logits, target_logits, mask, chunk_size, reduction)


def generalized_jsd(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = 1024,
    reduction: str = "mean",
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (GKD), per selected position.

        JSD_beta = beta KL(p || M) + (1 - beta) KL(q || M),   M = beta p + (1 - beta) q

    with p = softmax(target_logits) (teacher), q = softmax(logits) (student). log M is
    computed in log space (logaddexp of log p + log beta and log q + log(1 - beta)), so
    extreme logits give no inf/NaN. The formula tends to 0 at both ends, so, following TRL's
    GKD convention, the endpoints are defined as the plain KLs:

        beta = 0 -> ``forward_kl`` (KL(p || q)) exactly; beta = 1 -> ``reverse_kl`` exactly.

    For 0 < beta < 1 it behaves like beta * KL(p || q) near beta = 0 and like
    (1 - beta) * KL(q || p) near beta = 1. beta = 0.5 is the usual (symmetric) JSD.

    Args:
        beta: interpolation weight in [0, 1] (TRL default 0.5). Others as in ``forward_kl``.

    Raises:
        UserError: beta outside [0, 1]; and as in ``forward_kl``.
    """
    _check_unit_interval("beta", beta, "generalized_jsd")
    beta = float(beta)
    if beta in (0.0, 1.0):  # TRL's convention: the endpoints are the plain KLs
        swap, kernel, params = beta == 0.0, _kl_rows, None
    else:  # a = p (the target) gets weight beta
        swap, kernel, params = True, _jsd_rows, _mixture_params(beta)
    return _divergence(kernel, swap, params, logits, target_logits, mask, chunk_size, reduction)


def total_variation(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """Total variation distance, TV(p, q) = 0.5 sum_v |p(v) - q(v)|, in [0, 1], per position.

    p = softmax(target_logits), q = softmax(logits). Symmetric. Where p(v) == q(v) exactly
    the subgradient used is 0. Args, returns and raises as in ``forward_kl``.
    """
    return _divergence(_tv_rows, False, None, logits, target_logits, mask, chunk_size, reduction)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
}


def get_divergence(name: str, **params) -> Callable[..., torch.Tensor]:
    """Look up a divergence by name and bind its parameters.

    Args:
        name: a key of ``DIVERGENCES``.
        **params: keyword arguments of that loss, e.g. ``alpha=0.1`` for the skew KLs,
            ``beta=0.5`` for ``generalized_jsd``, or ``chunk_size``; validated here.

    Returns:
        ``loss(logits, target_logits, mask=None, *, reduction="mean", ...)``.

    Raises:
        UserError: unknown name (the message lists the valid ones), a parameter the loss does
            not take, or an out-of-range alpha / beta.
    """
    if name not in DIVERGENCES:
        raise UserError(
            f"unknown divergence {name!r}; valid divergences: {', '.join(sorted(DIVERGENCES))}"
        )
    fn = DIVERGENCES[name]
    accepted = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise UserError(
            f"divergence {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(accepted)}"
        )
    for weight in ("alpha", "beta"):
        if weight in params:
            _check_unit_interval(weight, params[weight], name)
    return functools.partial(fn, **params)
