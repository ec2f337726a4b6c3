"""Token-level divergences between two next-token distributions, computed from logits.

Every loss here is a pure function with one signature::

    fn(logits, target_logits, mask=None, *, chunk_size=1024, reduction="mean", <param>)

- ``logits`` (..., V): the distribution being trained, q = softmax(logits).
- ``target_logits`` (..., V): the target distribution, p = softmax(target_logits).
- ``mask`` (...) bool: True on positions that count (None = every position).
- ``chunk_size``: rows processed at once (None = all at once, plain autograd).
- ``reduction``: "mean" = sum over selected positions / their number (0 when none is
  selected, never NaN); "sum" = sum over selected positions (the training loop divides by a
  global token count); "none" = one value per selected position, shape (N,).

The direction is in the name: ``forward_kl`` is KL(p || q) (mode covering), ``reverse_kl`` is
KL(q || p) (mode seeking). Gradients flow into whichever argument requires grad (both may).

How the work is done:

1. Only selected positions are read: masked positions cost nothing, and NaN there does not
   leak into the loss.
2. Log-softmax is taken in float32 (float64 inputs stay float64), whatever the input dtype.
3. Up to ``chunk_size`` selected rows (or chunk_size=None): plain autograd on the gathered
   (N, V) rows, ``logits[mask]``. More rows: a custom autograd function gathers, upcasts and
   evaluates ``chunk_size`` rows at a time and computes each chunk's gradient during the
   forward pass, writing it into an input-shaped buffer, before moving on; backward only
   scales those rows by the upstream gradient. Peak extra memory is then the gradient plus a
   few (chunk_size, V) float32 tensors, instead of (N, V) copies of the selected rows plus a
   few (N, V) float32 intermediates held from forward to backward. Chunked and unchunked
   results agree to float rounding, values and gradients. ``benchmarks/bench_losses.py``
   measures both.
4. ``0 log 0 = 0``: vocabulary entries with probability 0 (e.g. logits set to -inf to mask
   part of the vocabulary) contribute nothing and get zero gradient, never NaN. A target with
   mass where the trained distribution has none gives +inf, as the formula says.

``DIVERGENCES`` maps names to functions; ``get_divergence(name, **params)`` validates a name
and its parameters (e.g. from a config file) and returns a ready-to-call loss.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from promptkd.errors import UserError

__all__ = [
    "DIVERGENCES",
    "forward_kl",
    "generalized_jsd",
    "get_divergence",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
]

REDUCTIONS = ("mean", "sum", "none")

# A row function maps (n, V) logits and (n, V) target logits to (n,) per-row divergences.
RowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Per-row math on one (n, V) block. Inputs are raw logits in any float dtype.
# ---------------------------------------------------------------------------------------------


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, in float32 at least (float64 stays float64)."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.log_softmax(logits.to(compute_dtype), dim=-1)


def _kl_from_log_probs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a (log a - log b), per row: (n, V), (n, V) -> (n,).

    Entries with a == 0 contribute exactly 0. The difference is zeroed *before* the product so
    that -inf - -inf = NaN in the unused branch never reaches a gradient.
    """
    a = log_a.exp()  # (n, V)
    log_ratio = torch.where(a > 0, log_a - log_b, 0.0)  # (n, V)
    return (a * log_ratio).sum(dim=-1)  # (n,)


class _KLFromLogits(torch.autograd.Function):
    """KL(a || b) per row for a = softmax(logits_a), b = softmax(logits_b), closed-form backward.

    The value is `_kl_from_log_probs(_log_probs(logits_a), _log_probs(logits_b))`; the
    gradients are the analytic ones, d/d logits_a = a * (log a - log b - KL) and
    d/d logits_b = b - a (times the incoming row gradient), so backward is one elementwise
    pass per input instead of autograd's chain through exp, where, sub and two log_softmax
    backwards, and only a, the log ratio (and log b when logits_b needs a gradient) are kept
    from forward to backward. Entries with a == 0 get a zero log ratio, so they contribute 0
    to the value and to d/d logits_a (never NaN); the result equals autograd's to rounding.
    """

    @staticmethod
    def forward(ctx, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        log_a, log_b = _log_probs(logits_a), _log_probs(logits_b)  # (n, V) each
        a = log_a.exp()  # (n, V)
        log_ratio = (log_a - log_b).masked_fill_(a == 0, 0.0)  # (n, V)
        del log_a
        kl = (a * log_ratio).sum(dim=-1)  # (n,)
        need_a, need_b = ctx.needs_input_grad
        ctx.save_for_backward(
            a if need_a or need_b else None,
            log_ratio if need_a else None,
            kl if need_a else None,
            log_b if need_b else None,
        )
        ctx.dtypes = (logits_a.dtype, logits_b.dtype)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        a, log_ratio, kl, log_b = ctx.saved_tensors
        grad_rows = grad_kl.unsqueeze(-1).to(a.dtype)  # (n, 1)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = (log_ratio - kl.unsqueeze(-1)).mul_(a).mul_(grad_rows).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_b = log_b.exp().sub_(a).mul_(grad_rows).to(ctx.dtypes[1])
        return grad_a, grad_b


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b) computed in log space: logaddexp(log a + log w, log b + log(1-w)).

    Computing the mixture in probability space and taking its log underflows to log(0) = -inf
    wherever both a and b underflow (logit gaps of ~100 in float32), which turns 0 * -inf into
    NaN. In log space it stays finite. -inf log-probs (masked vocabulary) are clamped to the
    most negative finite float first: the forward value is unchanged (the term is zeroed by
    the caller) and logaddexp's backward never sees -inf - -inf.
    """
    if weight_a == 1.0:
        return log_a
    if weight_a == 0.0:
        return log_b
    floor = torch.finfo(log_a.dtype).min
    return torch.logaddexp(
        log_a.clamp(min=floor) + math.log(weight_a),
        log_b.clamp(min=floor) + math.log1p(-weight_a),
    )  # (n, V)


def _forward_kl_rows(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    return _KLFromLogits.apply(target_logits, logits)


def _reverse_kl_rows(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    return _KLFromLogits.apply(logits, target_logits)


def _skew_forward_kl_rows(
    logits: torch.Tensor, target_logits: torch.Tensor, *, alpha: float
) -> torch.Tensor:
    log_p, log_q = _log_probs(target_logits), _log_probs(logits)
    return _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, alpha))


def _skew_reverse_kl_rows(
    logits: torch.Tensor, target_logits: torch.Tensor, *, alpha: float
) -> torch.Tensor:
    log_p, log_q = _log_probs(target_logits), _log_probs(logits)
    return _kl_from_log_probs(log_q, _log_mixture(log_q, log_p, alpha))


def _generalized_jsd_rows(
    logits: torch.Tensor, target_logits: torch.Tensor, *, beta: float
) -> torch.Tensor:
    # TRL convention: the endpoints are the plain KLs, not the (zero) limits of the formula.
    if beta == 0.0:
        return _forward_kl_rows(logits, target_logits)
    if beta == 1.0:
        return _reverse_kl_rows(logits, target_logits)
    log_p, log_q = _log_probs(target_logits), _log_probs(logits)
    log_m = _log_mixture(log_p, log_q, beta)  # (n, V), M = beta p + (1 - beta) q
    return beta * _kl_from_log_probs(log_p, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q, log_m)


def _total_variation_rows(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    p, q = _log_probs(target_logits).exp(), _log_probs(logits).exp()  # (n, V) each
    return 0.5 * (p - q).abs().sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Masking, chunking, reduction: shared by every divergence.
# ---------------------------------------------------------------------------------------------


class _ChunkedRows(torch.autograd.Function):
    """Per-position divergence of the selected rows, ``chunk_size`` rows at a time.

    ``positions`` holds one (N,) row index tensor per leading dim of the inputs
    (``mask.nonzero(as_tuple=True)``, or an arange over (M, V) inputs when there is no mask).
    ``need_grads`` says which of the two inputs needs a gradient (decided by the caller,
    because grad mode is always off inside ``forward``).

    Forward gathers one chunk, evaluates it with autograd on and, right away, takes the
    gradient of the chunk's summed values and scatters it into a zero-initialised buffer
    shaped like the input; then the chunk's intermediates are freed. Each row's value depends
    on that row only, so the gradient for any upstream weights is the buffer with every row
    scaled by its weight: that is all backward does. Compared with recomputing each chunk in
    backward (checkpointing), this saves one forward per chunk (about 1.5x faster measured in
    benchmarks/bench_losses.py) at about the same peak; the price is that the gradient buffer lives
    from forward to backward and is computed even if backward never runs (evaluate under
    ``torch.no_grad()``, which skips it).
    """

    @staticmethod
    def forward(ctx, row_fn, chunk_size, positions, need_grads, logits, target_logits):
        inputs = (logits, target_logits)
        grads = [
            torch.zeros_like(x) if need else None
            for x, need in zip(inputs, need_grads, strict=True)
        ]
        values = []
        for start in range(0, positions[0].numel(), chunk_size):
            rows = tuple(index[start : start + chunk_size] for index in positions)
            # (chunk, V) fresh copies, leaves of the chunk's own little graph.
            chunk = [
                x[rows].requires_grad_(need) for x, need in zip(inputs, need_grads, strict=True)
            ]
            with torch.enable_grad():
                chunk_values = row_fn(*chunk)  # (chunk,)
                wanted = [x for x in chunk if x.requires_grad]
                chunk_grads = iter(
                    torch.autograd.grad(chunk_values.sum(), wanted) if wanted else ()
                )
            values.append(chunk_values.detach())
            for grad in grads:
                if grad is not None:
                    grad[rows] = next(chunk_grads)
        ctx.chunk_size = chunk_size
        ctx.num_index = len(positions)
        ctx.has_grad = [grad is not None for grad in grads]
        ctx.save_for_backward(*positions, *(grad for grad in grads if grad is not None))
        return torch.cat(values)  # (N,)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values):
        saved = ctx.saved_tensors
        positions, stored = saved[: ctx.num_index], iter(saved[ctx.num_index :])
        out = []
        for has_grad in ctx.has_grad:
            if not has_grad:
                out.append(None)
                continue
            unit_grad = next(stored)  # gradient of the plain sum of the per-row values
            grad = torch.zeros_like(unit_grad)
            # Scale row by row, a chunk at a time, in the gradient's compute precision; no
            # input-sized temporary, and the buffer saved for backward is left untouched
            # (backward may run again with retain_graph=True).
            for start in range(0, positions[0].numel(), ctx.chunk_size):
                rows = tuple(index[start : start + ctx.chunk_size] for index in positions)
                weights = grad_values[start : start + ctx.chunk_size].unsqueeze(-1)  # (chunk, 1)
                compute_dtype = torch.promote_types(unit_grad.dtype, weights.dtype)
                grad[rows] = (unit_grad[rows].to(compute_dtype) * weights).to(grad.dtype)
            out.append(grad)
        return None, None, None, None, *out


def _check_unit_interval(name: str, value: float, loss: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise UserError(f"{loss}: {name} must be a number in [0, 1], got {value!r}")


def _divergence(
    row_fn: RowFn,
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None,
    chunk_size: int | None,
    reduction: str,
) -> torch.Tensor:
    """Validate, gather the selected rows, evaluate ``row_fn`` (chunked or not), reduce."""
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
    if mask is None:
        # Every position is selected: (M, V) views, no copy for contiguous inputs.
        logits = logits.reshape(-1, logits.shape[-1])
        target_logits = target_logits.reshape(-1, logits.shape[-1])
        positions = (torch.arange(logits.shape[0], device=logits.device),)
        selected = slice(None)
    else:
        positions = mask.nonzero(as_tuple=True)  # one (N,) row index per leading dim
        selected = positions

    if chunk_size is None or positions[0].numel() <= chunk_size:
        # Everything fits in one chunk: plain autograd reaches the same peak, more simply.
        per_row = row_fn(logits[selected], target_logits[selected])  # (N, V) each -> (N,)
    else:
        need_grads = tuple(
            torch.is_grad_enabled() and x.requires_grad for x in (logits, target_logits)
        )
        per_row = _ChunkedRows.apply(
            row_fn, chunk_size, positions, need_grads, logits, target_logits
        )
    num_rows = per_row.shape[0]

    if reduction == "none":
        return per_row
    total = per_row.sum()  # an empty sum is 0 and still carries a grad_fn when inputs need one
    if reduction == "sum":
        return total
    return total / max(num_rows, 1)


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
        chunk_size: rows per chunk (memory bound); None computes all rows at once.
        reduction: "mean" (token-level mean, 0 if nothing selected), "sum", or "none".

    Returns:
        A float32 scalar, or an (N,) vector for reduction="none" (N = selected positions);
        float64 when the inputs are float64.

    Raises:
        UserError: logits and target_logits differ in shape (e.g. vocabulary sizes).
        ValueError, TypeError: bad mask shape / dtype, reduction or chunk_size.
    """
    return _divergence(_forward_kl_rows, logits, target_logits, mask, chunk_size, reduction)


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
    return _divergence(_reverse_kl_rows, logits, target_logits, mask, chunk_size, reduction)


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
    row_fn = functools.partial(_skew_forward_kl_rows, alpha=float(alpha))
    return _divergence(row_fn, logits, target_logits, mask, chunk_size, reduction)


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
    row_fn = functools.partial(_skew_reverse_kl_rows, alpha=float(alpha))
    return _divergence(row_fn, logits, target_logits, mask, chunk_size, reduction)


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
    row_fn = functools.partial(_generalized_jsd_rows, beta=float(beta))
    return _divergence(row_fn, logits, target_logits, mask, chunk_size, reduction)


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
    return _divergence(_total_variation_rows, logits, target_logits, mask, chunk_size, reduction)


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
