"""The divergences, and the one driver that turns them into a training loss.

1. **Divergences.** Each is one short torch function of two rows of logits::

       fn(logits, target_logits) -> one value per row   # (..., V), (..., V) -> (...)

   q = softmax(logits) is the trained distribution, p = softmax(target_logits) the target:
   ``forward_kl`` is KL(p || q) (mode covering), ``reverse_kl`` KL(q || p) (mode seeking).
   Autograd differentiates them. Entries of probability 0 (logits -inf) contribute 0
   (0 log 0 = 0). Pass float32 or float64 logits: callers upcast.

2. **The driver.** ``loss_terms(trained, terms, mask)`` is ``sum_k w_k D_k(trained, target_k)``
   summed over the masked positions, with the K sums for logging. ``trained`` and the targets are
   ``Outputs``: a model's final hidden states and its LM head (the default), or its logits (head
   None: MiniLLM, and heads that cannot be chunked). Chunk by chunk of positions it computes the
   logits, the weighted terms and their gradient with respect to the chunk's logits
   (``torch.func``, compiled with ``torch.compile`` once a chunk is large), and pushes that
   gradient through the head at once, into the hidden states' and the head weight's gradient
   buffers. No (B, R, V) tensor is kept; backward only scales the buffers. Targets get no
   gradient (they are the stop-gradient side of every loss here).

Precision: the head's matmul runs in the forward's autocast dtype (as the model's own head
would), the divergences in float32 (float64 inputs stay float64), the gradient buffers in
float32 until backward has scaled them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from promptkd.errors import UserError
from promptkd.models.head import LMHead, output_transform

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk: max(1, CHUNK_ELEMENTS // V) positions, e.g. 130 of a 128,256 vocabulary
(a 64 MiB float32 chunk)."""

COMPILE_MIN_ELEMENTS = 1 << 22
"""Chunks of fewer logits run eagerly: compiling costs a few seconds once per process and loss,
which only LLM-sized chunks repay (toy models and unit tests stay eager)."""

BLOCK_ELEMENTS = 1 << 19
"""On CPU the per-chunk function runs over blocks of about this many logits per thread: each
row takes several passes (max, sum, value, gradient), and a block that stays in cache between
them measured 2.5x faster than passes over a whole 16M-logit chunk (a PromptKD step of the
benchmark's models, float32, one thread: 0.5 s against 0.2 s of divergence work)."""


# ---------------------------------------------------------------------------------------------
# 1. Divergences over rows of logits
# ---------------------------------------------------------------------------------------------


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a (log a - log b) from log-probabilities; 0 where a is 0."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b), in log space (in probability space it underflows to 0)."""
    floor = torch.finfo(log_a.dtype).min  # -inf (masked vocabulary) would give NaN gradients
    return torch.logaddexp(log_a.clamp(min=floor) + math.log(w), log_b.clamp(min=floor) + math.log1p(-w))


def _skew_kl(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(a || alpha a + (1 - alpha) b): the plain KL at alpha 0, exactly 0 at alpha 1."""
    if alpha == 0:
        return _kl(log_a, log_b)
    if alpha == 1:
        return _kl(log_a, log_a)
    return _kl(log_a, _log_mixture(log_a, log_b, alpha))


def forward_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q): q covers every mode of p (the KD baseline; GKD with beta 0)."""
    return _kl(target_logits.log_softmax(-1), logits.log_softmax(-1))


def reverse_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(q || p): q seeks p's modes (PromptKD's student and prompt losses; GKD with beta 1)."""
    return _kl(logits.log_softmax(-1), target_logits.log_softmax(-1))


def skew_forward_kl(logits: torch.Tensor, target_logits: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's SKL: KL(p || alpha p + (1 - alpha) q), bounded by -log alpha."""
    return _skew_kl(target_logits.log_softmax(-1), logits.log_softmax(-1), alpha)


def skew_reverse_kl(logits: torch.Tensor, target_logits: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's SRKL: KL(q || alpha q + (1 - alpha) p) (alpha weighs q, as DistiLLM's code)."""
    return _skew_kl(logits.log_softmax(-1), target_logits.log_softmax(-1), alpha)


def generalized_jsd(logits: torch.Tensor, target_logits: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; beta 0 and 1
    are forward and reverse KL (TRL's convention), 0.5 the symmetric JSD."""
    if beta == 0:
        return forward_kl(logits, target_logits)
    if beta == 1:
        return reverse_kl(logits, target_logits)
    log_p, log_q = target_logits.log_softmax(-1), logits.log_softmax(-1)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def alpha_beta_divergence(
    logits: torch.Tensor, target_logits: torch.Tensor, ab_alpha: float = 0.2, ab_beta: float = 0.7
) -> torch.Tensor:
    """ABKD's alpha-beta divergence D^(a, b)(p || q), a = ab_alpha, b = ab_beta (Wang et al., ICML 2025):

        1 / (a b) sum_v [a / (a + b) p^(a+b) + b / (a + b) q^(a+b) - p^a q^b]

    p the target (teacher), q trained (ghwang-s/abkd distillation_llm/distillm/losses.py:20-84), the
    powers taken in log space. (1, 0) is forward_kl and (0, 1) reverse_kl, exactly; elsewhere on the
    lines a = 0 or b = 0 it is the formula's limit there (see ``_alpha_beta``). Needs a, b >= 0, a + b > 0.
    """
    return _alpha_beta(target_logits.log_softmax(-1), logits.log_softmax(-1), ab_alpha, ab_beta)


def _alpha_beta(log_p: torch.Tensor, log_q: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """D^(a, b)(p || q) from log-probabilities. On the lines a = 0 and b = 0 the reference's branches
    (losses.py:32-53) divide by b (or a) where the limit of its general case divides by b^2 (a^2):
    the two agree at (0, 1) and (1, 0), the points its scripts and the paper use; here the limit."""
    if a == 1 and b == 0:
        return _kl(log_p, log_q)
    if a == 0:
        return _alpha_beta(log_q, log_p, b, a)  # D^(a, b)(p || q) = D^(b, a)(q || p)
    if b == 0:  # the b -> 0 limit: 1 / a^2 sum_v [p^a log(p^a / q^a) - p^a + q^a]
        p_a, q_a = (a * log_p).exp(), (a * log_q).exp()
        return (p_a * torch.where(p_a > 0, a * (log_p - log_q), 0.0) - p_a + q_a).sum(-1) / a**2
    s = a + b
    return (a / s * (s * log_p).exp() + b / s * (s * log_q).exp() - (a * log_p + b * log_q).exp()).sum(-1) / (a * b)


def total_variation(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = 0.5 sum_v |p - q|, in [0, 1]."""
    return 0.5 * (target_logits.softmax(-1) - logits.softmax(-1)).abs().sum(-1)


def cross_entropy(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """-log q(target): the supervised term, with token ids as its target."""
    return -logits.log_softmax(-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
    "alpha_beta_divergence": alpha_beta_divergence,
}
_PARAMETERS = {"skew_forward_kl": ("alpha",), "skew_reverse_kl": ("alpha",), "generalized_jsd": ("beta",),
               "alpha_beta_divergence": ("ab_alpha", "ab_beta")}


@dataclass(frozen=True)
class Divergence:
    """A divergence by name with its parameters bound: ``div(logits, target_logits)``."""

    name: str
    params: tuple[tuple[str, float], ...] = ()

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.name == "cross_entropy":
            return cross_entropy(logits, target)
        return DIVERGENCES[self.name](logits, target, **dict(self.params))


CROSS_ENTROPY = Divergence("cross_entropy")
"""The cross-entropy term of ``loss_terms``: its target is a (B, R) tensor of token ids."""


def divergence(name: str, *, alpha: float = 0.1, beta: float = 0.5, ab_alpha: float = 0.2,
               ab_beta: float = 0.7) -> Divergence:
    """The divergence ``name`` with the parameters it takes (skew KLs: alpha; generalized_jsd: beta;
    alpha_beta_divergence: ab_alpha and ab_beta).

    Raises:
        UserError: an unknown name (the valid ones listed), alpha or beta outside [0, 1], ab_alpha or
            ab_beta negative or both 0.
    """
    if name not in DIVERGENCES:
        raise UserError(f"unknown divergence {name!r}; valid divergences: {', '.join(sorted(DIVERGENCES))}")
    given = {"alpha": alpha, "beta": beta, "ab_alpha": ab_alpha, "ab_beta": ab_beta}
    params = tuple((key, given[key]) for key in _PARAMETERS.get(name, ()))
    for key, value in params:
        upper = math.inf if key.startswith("ab_") else 1.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= upper:
            where = "a number >= 0" if upper == math.inf else "a number in [0, 1]"
            raise UserError(f"{name}: {key} must be {where}, got {value!r}")
    if name == "alpha_beta_divergence" and ab_alpha == ab_beta == 0:
        raise UserError(f"{name}: ab_alpha and ab_beta are both 0; set at least one above 0 (1, 0 is forward KL, "
                        "0, 1 reverse KL)")
    return Divergence(name, tuple((key, float(value)) for key, value in params))


# ---------------------------------------------------------------------------------------------
# 2. The chunked driver
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Outputs:
    """A model's predictions for the response columns of a batch.

    states:         (B, R, H) final hidden states, or (B, R, V) logits when ``head`` is None.
    head:           the LMHead that turns the states into logits (``lm_head_of``), or None.
    autocast_dtype: the autocast dtype the forward ran under (None: none); the head's matmul
                    runs in it too.
    """

    states: torch.Tensor
    head: LMHead | None = None
    autocast_dtype: torch.dtype | None = None

    def detach(self) -> Outputs:
        """A target no gradient reaches (like ``logits.detach()``): states and head weight."""
        return Outputs(self.states.detach(), self.head and self.head.detached(), self.autocast_dtype)

    def logits(self) -> torch.Tensor:
        """The (B, R, V) logits, all at once (differentiable)."""
        if self.head is None:
            return self.states
        with _autocast(self.states.device.type, self.autocast_dtype):
            return self.head.logits(self.states)


Term = tuple[Divergence, "Outputs | torch.Tensor", float]
"""(divergence, target, weight): the target's Outputs, or token ids for ``CROSS_ENTROPY``; a term
of weight 0 adds its value to the log, not to the loss."""


def loss_terms(trained: Outputs, terms: Sequence[Term], mask: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """(sum_k weight_k * sum over ``mask`` of D_k(trained, target_k), [each term's sum]).

    The loss is differentiable into whatever of ``trained`` requires grad (its states, and its
    head weight and bias); under ``torch.no_grad()`` only the values are computed.
    """
    if mask.dtype != torch.bool or mask.shape != trained.states.shape[:-1]:
        raise ValueError(f"mask must be bool {tuple(trained.states.shape[:-1])}, got {mask.dtype} {tuple(mask.shape)}")
    sides, targets = [trained], []
    for _, target, _ in terms:
        if isinstance(target, Outputs):
            if _vocab(target) != _vocab(trained):
                raise UserError(
                    f"the two models compare {_vocab(trained)} and {_vocab(target)} vocabulary columns; token-level "
                    "distillation needs one vocabulary")
            if not any(target is s for s in sides):
                sides.append(target)
            targets.append(next(i for i, s in enumerate(sides) if s is target))
        elif isinstance(target, torch.Tensor) and target.dtype == torch.long:  # token ids
            sides.append(target)
            targets.append(len(sides) - 1)
        else:
            what = f"a {target.dtype} tensor" if isinstance(target, torch.Tensor) else type(target).__name__
            raise TypeError(f"loss_terms: a term's target is Outputs or a torch.long tensor of token ids, got {what}"
                            " (a teacher's Aligned outputs of a two-tokenizer run go through "
                            "promptkd.methods.base.distill_terms)")
    spec = _Spec(tuple(div for div, _, _ in terms), tuple(targets), tuple(float(w) != 0 for _, _, w in terms),
                 tuple(_transform_of(s.head) if isinstance(s, Outputs) else None for s in sides))
    weights = torch.tensor([float(w) for _, _, w in terms], dtype=torch.float64)
    head = trained.head
    inputs = (trained.states, head and head.weight, head and head.bias)
    with _autocast(trained.states.device.type, None):  # the driver sets each matmul's dtype itself
        loss, values = _ChunkedTerms.apply(spec, sides, mask, weights, torch.is_grad_enabled(), *inputs)
    return loss, values.tolist()


def _vocab(out: Outputs) -> int:
    return out.states.shape[-1] if out.head is None else out.head.vocab_size


def _transform_of(head: LMHead | None) -> tuple[float | None, float | None] | None:
    return None if head is None else (head.scale, head.softcap)


@dataclass(frozen=True)
class _Spec:
    """What the compiled per-chunk function depends on (hashable: one compile per spec)."""

    divergences: tuple[Divergence, ...]
    targets: tuple[int, ...]  # each term's side: an index into the sides (0 = trained)
    weighted: tuple[bool, ...]  # False: a weight-0 term, logged only (no gradient work)
    transforms: tuple  # each side's (scale, softcap), None for logits or token ids


def _autocast(device_type: str, dtype: torch.dtype | None):
    if dtype is not None:
        return torch.autocast(device_type, dtype=dtype)
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _chunk_loss(spec: _Spec, z, others, weights):
    """One chunk's weighted loss and (K, c) term values; z: the trained side's raw logits."""
    dtype = torch.promote_types(z.dtype, torch.float32)

    def logits(x, transform):
        if not x.is_floating_point():
            return x  # token ids
        return x.to(dtype) if transform is None else output_transform(x.to(dtype), *transform)

    sides = [logits(z, spec.transforms[0])] + [logits(x, t) for x, t in zip(others, spec.transforms[1:], strict=True)]
    values = torch.stack([div(sides[0] if weighted else sides[0].detach(), sides[j])
                          for div, j, weighted in zip(spec.divergences, spec.targets, spec.weighted, strict=True)])
    loss = (weights.to(dtype) @ values).sum()
    return loss, values.detach()


_COMPILE_FAILED: list[str] = []


@functools.cache
def _chunk_function(spec: _Spec, need_grad: bool, compiled: bool) -> Callable:
    def fn(z, others, weights):
        return _chunk_loss(spec, z, others, weights)

    if need_grad:  # (d loss / d z, (loss, values))
        fn = torch.func.grad_and_value(fn, has_aux=True)
    if not compiled:
        return fn
    # every spec's function shares torch.func's wrapper code object: without isolate_recompiles
    # (torch >= 2.13) they would count as recompiles of one function, against one cache limit
    isolate = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}
    return torch.compile(fn, dynamic=True, fullgraph=True, **isolate)


def _run_chunk(spec: _Spec, need_grad: bool, compiled: bool, z, others, weights):
    """The per-chunk function, compiled for large chunks; a compiler failure warns once and
    every later chunk runs eagerly (same values)."""
    if compiled and not _COMPILE_FAILED:
        try:
            return _chunk_function(spec, need_grad, True)(z, others, weights)
        except Exception as error:  # the compiler's, unless eager fails the same way below
            result = _chunk_function(spec, need_grad, False)(z, others, weights)
            _COMPILE_FAILED.append(f"{type(error).__name__}: {error}")
            warnings.warn(f"promptkd.losses: torch.compile failed ({_COMPILE_FAILED[0][:300]}); the losses run "
                          "eagerly from now on, with the same values, only slower", RuntimeWarning, stacklevel=2)
            return result
    return _chunk_function(spec, need_grad, False)(z, others, weights)


def _run_blocks(spec: _Spec, need_grad: bool, z, others, weights):
    """(d loss / d z or None, (K,) value sums) of one chunk, a cache-sized block of rows at a time
    on CPU (whole chunks on an accelerator)."""
    rows = z.shape[0]
    blocks = 1
    if z.device.type == "cpu":
        per_block = max(1, BLOCK_ELEMENTS // z.shape[1]) * torch.get_num_threads()
        blocks = max(1, min(rows // 2, -(-rows // per_block)))  # blocks of >= 2 rows: none for the compiler to specialise
    bounds = [rows * i // blocks for i in range(blocks + 1)]  # near-equal blocks
    compiled = z.numel() >= COMPILE_MIN_ELEMENTS
    grad_z = torch.empty(z.shape, dtype=torch.promote_types(z.dtype, torch.float32), device=z.device) if need_grad else None
    values = torch.zeros(len(spec.divergences), dtype=torch.float64, device=z.device)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        part = slice(start, stop)
        out = _run_chunk(spec, need_grad, compiled, z[part], [x[part] for x in others], weights)
        if need_grad:
            grad, (_, block_values) = out
            grad_z[part] = grad
        else:
            _, block_values = out
        values += block_values.sum(-1).double()
    return grad_z, values


def _matmul_operands(out: Outputs):
    """(weight rows, bias rows) of the head in the matmul dtype, or None for logits."""
    head = out.head
    if head is None:
        return None
    dtype = out.autocast_dtype or torch.promote_types(out.states.dtype, head.weight.dtype)
    v = head.vocab_size
    return head.weight[:v].to(dtype), None if head.bias is None else head.bias[:v].to(dtype)


class _ChunkedTerms(torch.autograd.Function):
    """Forward runs the chunks, computing every gradient as it goes; backward scales them."""

    @staticmethod
    def forward(ctx, spec, sides, mask, weights, grad, states, weight, bias):
        need = [grad and t is not None and t.requires_grad for t in (states, weight, bias)]
        positions = mask.nonzero(as_tuple=True)  # (N,) per leading dim
        num_rows = positions[0].numel()
        trained = sides[0]
        ops = [_matmul_operands(s) if isinstance(s, Outputs) else None for s in sides]
        wide = lambda t: torch.zeros(t.shape, device=t.device, dtype=torch.promote_types(t.dtype, torch.float32))  # noqa: E731
        grads = [wide(t) if n else None for t, n in zip((states, weight, bias), need, strict=True)]
        values = torch.zeros(len(spec.divergences), dtype=torch.float64, device=states.device)
        rows = max(1, CHUNK_ELEMENTS // _vocab(trained))
        if num_rows % rows == 1 and rows > 2:
            rows -= 1  # no 1-row last chunk: torch.compile would specialise (and compile again) for it
        for start in range(0, num_rows, rows):
            index = tuple(p[start : start + rows] for p in positions)
            x = trained.states[index].detach()  # (c, H), or (c, V) logits
            if ops[0] is not None:
                x = x.to(ops[0][0].dtype)
                z = F.linear(x, *ops[0])  # (c, V)
            else:
                z = x
            others = [_chunk_side(s, o, index) for s, o in zip(sides[1:], ops[1:], strict=True)]
            grad_z, chunk_values = _run_blocks(spec, any(need), z, others, weights.to(z.device))
            del z, others  # freed before the next chunk's logits exist (so is grad_z below)
            values += chunk_values
            if not any(need):
                continue
            if ops[0] is None:  # logits: the gradient is the states'
                grads[0][index] = grad_z.to(grads[0].dtype)
                continue
            head_weight = ops[0][0]
            grad_z = grad_z.to(head_weight.dtype)
            if need[0]:
                grads[0][index] = (grad_z @ head_weight).to(grads[0].dtype)
            if need[1]:
                rows_v = head_weight.shape[0]
                if head_weight.dtype == grads[1].dtype:
                    grads[1][:rows_v].addmm_(grad_z.t(), x)
                else:  # a bf16 / fp16 head (autocast): the product in that dtype, summed in float32
                    grads[1][:rows_v].add_(grad_z.t() @ x)
            if need[2]:
                grads[2][: grad_z.shape[1]] += grad_z.sum(0).to(grads[2].dtype)
            del grad_z
        ctx.grads = grads
        loss = (weights.to(values.device) * values).sum().to(torch.promote_types(states.dtype, torch.float32))
        ctx.mark_non_differentiable(values)
        return loss, values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_values):
        if ctx.grads is None:
            raise RuntimeError("loss_terms: a second backward through one loss that was not retained")
        if _graph_is_kept():  # another backward may follow: leave the buffers intact
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads]
        else:  # the last use: scale in place
            grads, ctx.grads = ctx.grads, None
            for g in grads:
                if g is not None:
                    g.mul_(grad_loss.to(g.dtype))
        return None, None, None, None, None, *grads


def _chunk_side(side, ops, index) -> torch.Tensor:
    """A target's rows of this chunk: raw logits (no grad), or token ids."""
    if not isinstance(side, Outputs):
        return side[index]
    x = side.states[index].detach()
    if ops is None:
        return x
    weight, bias = ops
    return F.linear(x.to(weight.dtype), weight.detach(), None if bias is None else bias.detach())


def _graph_is_kept() -> bool:
    """True when this backward runs with retain_graph (or torch cannot tell)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is None or bool(keep_graph())
