"""Divergences computed from final hidden states and LM heads, a chunk of positions at a time.

The token-level losses of ``promptkd.losses`` take (B, R, V) logits. With a 128k-152k
vocabulary those logits, their float32 copies and their gradients dominate a distillation
step's memory. Here every divergence is computed from the two models' final hidden states
(B, R, H) and their output layers instead::

    head = lm_head_of(student, vocab_size)                      # LMHead: weight, bias, transform
    target_head = lm_head_of(prompted_teacher, vocab_size)
    h = hidden_states_for_response(student, batch)              # (B, R, H), with grad
    with torch.no_grad():
        target_h = hidden_states_for_response(prompted_teacher, batch)
    loss = head_divergence("reverse_kl", h, head, target_h, target_head, mask, reduction="sum")
    loss.backward()   # into the student's layers *and* its head weight (tied: the embedding)

The training steps use this path by default (``train.chunked_lm_head``: the step context hands
methods ``promptkd.methods.base.HiddenStates`` instead of logits). ``head_divergences`` computes
several terms, divergences (``HeadTerm``) and cross-entropy (``CrossEntropyTerm``), from one
computation of the trained side's logits per chunk.

``head_divergence`` takes ``chunk_size`` selected positions at a time, computes both sides'
(chunk, V) logits, the divergence's row values and their gradient with respect to both logits,
and pushes that gradient through the heads at once: into an (B, R, H) buffer for each side's
hidden states and an (V_head, H) float32 accumulator for each trainable head weight. Nothing
(chunk, V) outlives its chunk, so no (B, R, V) or (N, V) tensor is ever allocated, forward or
backward. Backward only scales those buffers by the upstream gradient (``reduction`` "sum" or
"mean"); with ``reduction="none"`` backward recomputes the chunks with the upstream row weights.

Gradients go wherever the inputs require them: the student's hidden states and head weight,
and the teacher side's hidden states (through which the soft prompt is trained); a frozen
teacher head gets none. The divergences are those of ``promptkd.losses`` (same names, same
direction: the first argument is the trained distribution q, the second the target p), called
on each chunk's logits, so values and gradients equal the unchunked path to float rounding.

Precision: the (chunk, V) matmul runs in the wider of the hidden states' and the weight's
dtypes (under autocast: the autocast dtype, like the model's own head); the divergence runs in
float32 (float64 inputs stay float64); the gradients are accumulated and kept in float32 until
backward has scaled them (then autograd casts each to its input's dtype).

Not supported (``lm_head_of`` refuses with a UserError naming ``train.chunked_lm_head false``):
a PEFT-wrapped head (LoRA on lm_head, modules_to_save), a head that is not a plain nn.Linear
(quantized, offloaded), a sharded head weight (FSDP, DeepSpeed ZeRO-3), and an output
transform other than the known scale / soft-capping (caught by a check forward).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from promptkd.data.batch import SequenceBatch
from promptkd.errors import UserError
from promptkd.losses import get_divergence
from promptkd.models.prompted_teacher import PromptedTeacher

__all__ = [
    "CHUNK_ELEMENTS",
    "CHUNKING_FLAG",
    "CrossEntropyTerm",
    "HeadTerm",
    "LMHead",
    "capture_head_input",
    "head_cross_entropy",
    "head_divergence",
    "head_divergences",
    "hidden_states_for_response",
    "lm_head_of",
]

CHUNKING_FLAG = "train.chunked_lm_head false"
"""The config setting that turns LM-head chunking off (named in every refusal here)."""

CHUNK_ELEMENTS = 1 << 24
"""chunk_size=None picks about this many logits per chunk: max(1, CHUNK_ELEMENTS // V) rows,
e.g. 130 rows of a 128,256 vocabulary: each (chunk, V) float32 temporary is then 64 MiB."""

REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------------
# The output layer.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LMHead:
    """A causal LM's output layer: logits = transform(h @ weight[:V].T + bias[:V]).

    Attributes:
        weight: (V_head, H), the model's own Parameter (for a model with tied embeddings it is
            the input embedding matrix, which then gets this loss's gradient too).
        bias: (V_head,) or None.
        vocab_size: V, the columns compared (V <= V_head): padded head rows are cut.
        scale: logits are multiplied by this (Cohere's ``logit_scale``, Granite's
            1 / ``logits_scaling``, Falcon-H1's ``lm_head_multiplier``); None = 1.
        softcap: final logit soft-capping, cap * tanh(z / cap) after the scale (Gemma 2's
            ``final_logit_softcapping``); None = off.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    vocab_size: int | None = None
    scale: float | None = None
    softcap: float | None = None

    def __post_init__(self):
        w = self.weight
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or not w.is_floating_point():
            raise UserError(
                f"LMHead: weight must be a floating (V_head, H) tensor, got "
                f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}"
            )
        if self.vocab_size is None:
            object.__setattr__(self, "vocab_size", int(w.shape[0]))
        v = self.vocab_size
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= w.shape[0]:
            raise UserError(
                f"LMHead: vocab_size must be an int in 1..{w.shape[0]} (the head's rows), got {v!r}"
            )
        if self.bias is not None and tuple(self.bias.shape) != (w.shape[0],):
            raise UserError(
                f"LMHead: bias shape {tuple(self.bias.shape)} does not match weight {tuple(w.shape)}"
            )
        for name in ("scale", "softcap"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value != 0
            ):
                raise UserError(f"LMHead: {name} must be a finite non-zero number or None, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, float(value))
        if self.softcap is not None and self.softcap < 0:
            raise UserError(f"LMHead: softcap must be positive, got {self.softcap}")

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def detached(self) -> LMHead:
        """This head with its weight and bias detached: a target side that must get no gradient
        (e.g. the student as PromptKD's prompt-loss target, like ``logits.detach()``)."""
        return LMHead(self.weight.detach(), None if self.bias is None else self.bias.detach(),
                      self.vocab_size, self.scale, self.softcap)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits, plain autograd, all at once: the unchunked reference."""
        z = F.linear(h, self.weight[: self.vocab_size],
                     None if self.bias is None else self.bias[: self.vocab_size])
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / DataParallel / a DeepSpeed engine, a PromptedTeacher
    or a PeftModel."""
    for _ in range(8):
        if isinstance(model, PromptedTeacher):
            model = model.teacher
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) or (
            type(model).__name__ == "DeepSpeedEngine" and isinstance(getattr(model, "module", None), torch.nn.Module)
        ):
            model = model.module
        elif type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model
    return model


def _output_module(model: torch.nn.Module) -> torch.nn.Module:
    inner = _unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if module is None:
        raise UserError(
            f"{type(inner).__name__} has no output embeddings (get_output_embeddings() is None): "
            f"LM-head chunking needs a causal LM with an LM head; set {CHUNKING_FLAG}"
        )
    return module


def _refusal(module: torch.nn.Module) -> str | None:
    """Why this output module cannot be chunked, or None when it is a plain Linear."""
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__.startswith("peft."):
        return (
            f"the LM head is wrapped by PEFT ({name}: a LoRA / adapter or modules_to_save layer "
            "on lm_head), so its output is not weight @ h; LM-head chunking supports a plain "
            f"nn.Linear head only: leave lm_head out of the adapter's target modules, or set "
            f"{CHUNKING_FLAG}"
        )
    plain = (
        isinstance(module, torch.nn.Linear)
        and cls.forward is torch.nn.Linear.forward
        and "forward" not in vars(module)  # e.g. accelerate's offloading hooks
        and not torch.nn.utils.parametrize.is_parametrized(module)
    )
    if not plain:
        return (
            f"the LM head is a {name}, not a plain torch.nn.Linear (e.g. quantized, offloaded or "
            f"reparametrised); LM-head chunking computes weight @ h itself: set {CHUNKING_FLAG}"
        )
    weight = module.weight
    if (
        type(weight).__name__ not in ("Parameter", "Tensor")
        or weight.ndim != 2
        or not weight.is_floating_point()
        or weight.is_meta
        or weight.numel() == 0
    ):
        return (
            f"the LM head's weight is a {type(weight).__name__} {weight.dtype} "
            f"{tuple(weight.shape)} (sharded, quantized or not materialised, e.g. under FSDP or "
            f"DeepSpeed ZeRO-3); LM-head chunking needs the whole weight: set {CHUNKING_FLAG}"
        )
    return None


def _transform_of(config) -> tuple[float | None, float | None]:
    """(scale, softcap) from a transformers config, for the architectures that have them."""
    if config is None:
        return None, None
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    scale = 1.0
    for attr, divide in (("logit_scale", False), ("logits_scaling", True),
                         ("lm_head_multiplier", False)):
        value = getattr(config, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            scale = scale / value if divide else scale * value
    softcap = getattr(config, "final_logit_softcapping", None)
    softcap = float(softcap) if isinstance(softcap, (int, float)) and softcap else None
    return (None if scale == 1.0 else scale), softcap


def lm_head_of(model: torch.nn.Module, vocab_size: int | None = None, *,
               check: bool = True) -> LMHead:
    """The ``LMHead`` of a transformers causal LM (or a PromptedTeacher / DDP / PeftModel on one).

    Args:
        model: the model whose ``get_output_embeddings()`` is a plain ``torch.nn.Linear``.
        vocab_size: the logit columns to compare (padded head rows beyond it are cut);
            None = every head row.
        check: run the model once on 3 tokens (no grad) and require the head's logits of the
            hidden states that entered ``lm_head`` to equal the model's own logits. This catches
            an output transform promptkd does not know (it raises instead of training on wrong
            logits). The transforms known: ``logit_scale`` (Cohere), ``logits_scaling``
            (Granite), ``lm_head_multiplier`` (Falcon-H1), ``final_logit_softcapping`` (Gemma 2).

    Raises:
        UserError: a PEFT-wrapped head (LoRA on lm_head), a head that is not a plain Linear
            (quantized, offloaded), a sharded weight, a bad vocab_size, or a failed check. The
            message says to set ``train.chunked_lm_head false``.
    """
    module = _output_module(model)
    why = _refusal(module)
    if why is not None:
        raise UserError(why)
    inner = _unwrap(model)
    scale, softcap = _transform_of(getattr(inner, "config", None))
    head = LMHead(module.weight, module.bias, vocab_size, scale, softcap)
    if check:
        _check_head(inner, module, head)
    return head


def _check_head(model: torch.nn.Module, module: torch.nn.Module, head: LMHead) -> None:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = embed.weight.device if embed is not None else head.weight.device
    ids = (torch.arange(3, device=device) % head.vocab_size).unsqueeze(0)  # (1, 3)
    # a model in train mode draws dropout masks: leave the training run's random streams as
    # they were (runs and resumes stay reproducible whether or not chunking is on)
    rng_devices = [device] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=rng_devices),
        torch.no_grad(),
        capture_head_input(module, skip=False) as captured,
    ):
        out = model(input_ids=ids, use_cache=False)
    if not captured:
        raise UserError(
            f"{type(model).__name__}'s forward never called its output embeddings "
            f"({type(module).__name__}); LM-head chunking cannot reproduce its logits: set "
            f"{CHUNKING_FLAG}"
        )
    logits = getattr(out, "logits", None)
    with torch.no_grad():
        mine = head.logits(captured[0].to(head.weight.dtype)).double()
    if logits is None or logits.shape[-1] < head.vocab_size:
        raise UserError(f"{type(model).__name__} returned no logits to check the LM head against")
    theirs = logits[..., : head.vocab_size].to(mine.device).double()
    precise = head.weight.dtype in (torch.float32, torch.float64) and logits.dtype in (
        torch.float32, torch.float64)
    tolerance = (1e-4 if precise else 3e-2) * (1.0 + float(theirs.abs().max()))
    error = float((mine - theirs).abs().max()) if mine.shape == theirs.shape else math.inf
    if not error <= tolerance:
        raise UserError(
            f"{type(model).__name__}: its logits differ from weight @ h as promptkd computes them "
            f"(max error {error:.3g}, scale={head.scale}, softcap={head.softcap}): the "
            f"architecture transforms its LM head output in a way LM-head chunking does not "
            f"know; set {CHUNKING_FLAG}"
        )


# ---------------------------------------------------------------------------------------------
# Hidden states.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture_head_input(module: torch.nn.Module, *, skip: bool = True):
    """Record what enters ``module`` (an LM head) in a with-block; yields the list of inputs.

    skip=True hands the head an empty (B, 0, H) slice instead, so the model's forward computes
    no logits at all (it returns (B, 0, V) logits); the captured tensor keeps its autograd graph.
    """
    captured: list[torch.Tensor] = []

    def hook(mod, args, kwargs):
        if args:
            x, rest = args[0], args[1:]
        else:
            x, rest = kwargs.pop("input"), ()
        captured.append(x)
        if skip:
            x = x[..., :0, :]
        return (x, *rest), kwargs

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def hidden_states_for_response(
    model: torch.nn.Module, batch: SequenceBatch, *, base: bool = False, **model_kwargs
) -> torch.Tensor:
    """(B, R, H) final hidden states predicting the response columns [P-1 : T-1].

    Exactly what ``promptkd.sampling.response_logits`` sends through the LM head, aligned with
    ``loss_mask[:, P:]``: the input of the model's ``get_output_embeddings()`` (after the final
    norm), captured by a forward pre-hook that hands the head an empty slice, so no logits are
    computed. Works for any transformers causal LM (also DDP-wrapped or a PeftModel) and for a
    ``PromptedTeacher`` (called as ``model(input_ids, attention_mask, logits_to_keep=...)``, or
    its ``forward_base`` with base=True; the virtual positions never reach the head).

    Args:
        model: the causal LM or PromptedTeacher. Grad mode, autocast and train/eval mode are the
            caller's, as for ``response_logits``.
        batch: the SequenceBatch (prompts left-padded to P columns).
        base: PromptedTeacher only: the teacher without its prompt (``forward_base``).
        **model_kwargs: passed to a plain causal LM's forward.

    Returns:
        (B, T - P, H) in the model's hidden dtype.
    """
    keep = batch.input_ids.shape[1] - batch.prompt_length + 1
    module = _output_module(model)
    with capture_head_input(module, skip=True) as captured:
        if isinstance(model, PromptedTeacher):
            forward = model.forward_base if base else model
            forward(batch.input_ids, batch.attention_mask, logits_to_keep=keep)
        else:
            if base:
                raise ValueError("base=True needs a PromptedTeacher")
            model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                logits_to_keep=keep,
                use_cache=False,
                **model_kwargs,
            )
    if len(captured) != 1:
        raise RuntimeError(
            f"{type(_unwrap(model)).__name__}'s forward called its LM head {len(captured)} times "
            f"(expected once); set {CHUNKING_FLAG}"
        )
    hidden = captured[0]
    if hidden.ndim != 3 or hidden.shape[1] != keep:
        raise RuntimeError(
            f"the LM head received {tuple(hidden.shape)}, expected (B, {keep}, H): the model does "
            f"not honour logits_to_keep; set {CHUNKING_FLAG}"
        )
    return hidden[:, :-1]  # (B, R, H)


# ---------------------------------------------------------------------------------------------
# The chunked computation.
# ---------------------------------------------------------------------------------------------

# A row function maps one chunk's (c, V) logits u (trained side) and w (target side, or None),
# the chunk's row index (one (c,) tensor per leading dim), the rows' weights (c,) and two flags
# to (values (c,), d(sum of weights * values)/du or None, .../dw or None), in the compute dtype.
RowFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def _divergence_rows(loss: Callable[..., torch.Tensor]) -> RowFn:
    """A row function from a promptkd.losses divergence: its values and autograd gradients."""

    def rows(u, w, index, weights, need_u, need_w):
        if not (need_u or need_w):
            return loss(u, w, None, chunk_size=None, reduction="none"), None, None
        u = u.detach().requires_grad_(need_u)
        w = w.detach().requires_grad_(need_w)
        with torch.enable_grad():
            values = loss(u, w, None, chunk_size=None, reduction="none")  # (c,)
            wanted = [x for x, need in ((u, need_u), (w, need_w)) if need]
            grads = list(torch.autograd.grad(values, wanted, grad_outputs=weights.to(values.dtype)))
        grad_u = grads.pop(0) if need_u else None
        grad_w = grads.pop(0) if need_w else None
        return values.detach(), grad_u, grad_w

    return rows


@dataclass(frozen=True, eq=False)
class HeadTerm:
    """One divergence term of ``head_divergences``: ``weight * name(q, p_target)``.

    Attributes:
        name: a key of ``promptkd.losses.DIVERGENCES``.
        target_h: (..., H_t) the target's hidden states (same leading shape as the trained h).
        target_head: the target's LMHead. Terms whose (target_h, target_head) are the same
            objects share one target logits computation per chunk.
        weight: the term's coefficient in the returned loss; 0 = computed for its value only
            (no gradient work), e.g. a logged distance.
        params: the divergence's parameters (``alpha``, ``beta``).
    """

    name: str
    target_h: torch.Tensor
    target_head: LMHead
    weight: float = 1.0
    params: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class CrossEntropyTerm:
    """A cross-entropy term of ``head_divergences``: ``weight * CE(targets)`` of the trained side.

    Shares the trained side's logits with the divergence terms, e.g. the supervised steps'
    ``(1 - r) CE + r KL`` (or CE logged at weight 0 next to a divergence) in one pass.

    Attributes:
        targets: (...) long token ids with the trained hidden states' leading shape, each in
            [0, vocab_size) where the mask selects.
        weight: the term's coefficient; 0 = its value only.
    """

    targets: torch.Tensor
    weight: float = 1.0


@dataclass
class _Side:
    """One model's side: its head, the matmul operands, and what needs a gradient.

    The autograd inputs are (h, weight, bias) as given (the model's Parameters, or their
    autocast copies); ``mm_weight`` / ``mm_bias`` are their first V rows in the matmul dtype.
    """

    head: LMHead
    mm_weight: torch.Tensor  # (V, H)
    mm_bias: torch.Tensor | None  # (V,)
    need_h: bool
    need_weight: bool
    need_bias: bool

    @property
    def need_logits(self) -> bool:
        return self.need_h or self.need_weight or self.need_bias


@dataclass
class _Term:
    rows: RowFn
    target: int | None  # index of the target side (None: a one-sided term, e.g. CE)
    coef: float


@dataclass
class _Spec:
    terms: list[_Term]
    positions: tuple[torch.Tensor, ...]  # (N,) per leading dim of h
    chunk_size: int
    compute_dtype: torch.dtype
    sides: list[_Side]  # sides[0]: the trained distribution q
    row_weight: float | None  # uniform weight (sum: 1, mean: 1/N); None = recompute in backward


def _logits(side: _Side, h_rows: torch.Tensor, dtype: torch.dtype):
    """(c, H) hidden rows -> (x: the rows in the matmul dtype, (c, V) transformed logits in
    `dtype`, d(logits)/d(raw logits): a number, a (c, V) tensor, or None for the identity)."""
    x = h_rows.to(side.mm_weight.dtype)
    z = F.linear(x, side.mm_weight, side.mm_bias).to(dtype)  # (c, V)
    head, slope = side.head, None
    if head.scale is not None:
        z = z * head.scale
        slope = head.scale
    if head.softcap is not None:
        t = torch.tanh(z / head.softcap)  # (c, V)
        z = t * head.softcap
        slope = (1.0 - t * t) * (1.0 if slope is None else slope)
    return x, z, slope


def _run(spec: _Spec, tensors: list[torch.Tensor | None], weights: torch.Tensor | None,
         need_grads: bool):
    """The chunk loop. tensors: (h, weight, bias) of each side, flattened.

    weights: (N,) row weights (recompute mode), or None: spec.row_weight for every row.
    Returns the (N, K) values of the K terms and, when need_grads, the gradients of
    sum_rows weight * sum_k coef_k * value_k for each tensor that needs one (None elsewhere),
    shaped like that tensor, in float32 (float64 for float64 tensors).
    """
    num_rows = spec.positions[0].numel()
    device = tensors[0].device
    values = torch.empty(num_rows, len(spec.terms), dtype=spec.compute_dtype, device=device)
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    for s, side in enumerate(spec.sides):
        h, weight, bias = tensors[3 * s: 3 * s + 3]
        # gradients are kept in float32 (float64) until backward has scaled them: unscaled,
        # a float16 buffer could underflow where a GradScaler's factor would have saved it
        # (autograd casts each to its input's dtype after backward)
        if need_grads and side.need_h:
            grads[3 * s] = torch.zeros(h.shape, device=h.device,
                                       dtype=torch.promote_types(h.dtype, torch.float32))
        # accumulators of the whole head, padded rows included (they stay 0)
        if need_grads and side.need_weight:
            grads[3 * s + 1] = torch.zeros(weight.shape, device=weight.device,
                                           dtype=torch.promote_types(weight.dtype, torch.float32))
        if need_grads and side.need_bias:
            grads[3 * s + 2] = torch.zeros(bias.shape, device=bias.device,
                                           dtype=torch.promote_types(bias.dtype, torch.float32))
    need = [need_grads and side.need_logits for side in spec.sides]
    for start in range(0, num_rows, spec.chunk_size):
        stop = min(start + spec.chunk_size, num_rows)
        index = tuple(p[start:stop] for p in spec.positions)
        if weights is not None:
            row_weights = weights[start:stop]
        else:
            fill = 1.0 if spec.row_weight is None else spec.row_weight  # None: values only
            row_weights = torch.full((stop - start,), fill, dtype=spec.compute_dtype,
                                     device=device)
        xs, zs, slopes = [], [], []
        for s, side in enumerate(spec.sides):
            x, z, slope = _logits(side, tensors[3 * s][index], spec.compute_dtype)
            xs.append(x)
            zs.append(z)
            slopes.append(slope)
        grad_zs: list[torch.Tensor | None] = [None] * len(spec.sides)
        for k, term in enumerate(spec.terms):
            t = term.target
            need_u = need[0] and term.coef != 0
            need_w = t is not None and need[t] and term.coef != 0
            term_values, grad_u, grad_w = term.rows(
                zs[0], None if t is None else zs[t], index, row_weights * term.coef,
                need_u, need_w,
            )
            values[start:stop, k] = term_values
            for s, g in ((0, grad_u), (t, grad_w)):
                if g is not None:
                    grad_zs[s] = g if grad_zs[s] is None else grad_zs[s].add_(g)
            del term_values, grad_u, grad_w
        del zs
        for s, side in enumerate(spec.sides):
            grad_z = grad_zs[s]
            if grad_z is None:
                continue
            grad_zs[s] = None
            if slopes[s] is not None:
                grad_z = grad_z * slopes[s]  # (c, V): through the scale / soft-capping
            rows = side.mm_weight.shape[0]
            if side.need_h:
                grad_h = grad_z.to(side.mm_weight.dtype) @ side.mm_weight  # (c, H)
                grads[3 * s][index] = grad_h.to(grads[3 * s].dtype)
            if side.need_weight:
                acc = grads[3 * s + 1]
                if side.mm_weight.dtype == acc.dtype:
                    acc[:rows].addmm_(grad_z.t().to(acc.dtype), xs[s])
                else:
                    # a bfloat16 / float16 head (autocast): the (V, H) product in that dtype, as
                    # the logits path's backward computes it, summed into the float32
                    # accumulator (a float32 matmul here was 3x slower on CPU)
                    acc[:rows].add_(grad_z.to(side.mm_weight.dtype).t() @ xs[s])
            if side.need_bias:
                acc = grads[3 * s + 2]
                acc[:rows] += grad_z.sum(dim=0).to(acc.dtype)
            del grad_z
        del xs, slopes
    return values, grads


class _HeadRows(torch.autograd.Function):
    """(loss, per-term values) from hidden states and heads; only the loss is differentiable.

    loss = sum_k coef_k * term_k, reduced over rows (sum / mean) or per row (none). Sum / mean:
    forward runs the chunk loop once, computing every gradient as it goes, and backward scales
    them by the upstream scalar (in place, unless retain_graph keeps them for another backward).
    None: forward computes the values only; backward runs the loop again with the upstream row
    weights.
    """

    @staticmethod
    def forward(ctx, spec, reduction, *tensors):
        ctx.spec = spec
        ctx.reduction = reduction
        ctx.grads = None
        wanted = any(side.need_logits for side in spec.sides)
        coefs = torch.tensor([term.coef for term in spec.terms], dtype=spec.compute_dtype,
                             device=tensors[0].device)
        if reduction == "none":
            values, _ = _run(spec, list(tensors), None, need_grads=False)  # (N, K)
            ctx.present = [t is not None for t in tensors]
            if wanted:
                ctx.save_for_backward(*(t for t in tensors if t is not None))
            loss, per_term = values @ coefs, values
        else:
            values, grads = _run(spec, list(tensors), None, need_grads=wanted)
            ctx.grads = grads
            per_term = values.sum(dim=0)  # (K,)
            if reduction == "mean":
                per_term = per_term / max(values.shape[0], 1)
            loss = per_term @ coefs
        ctx.mark_non_differentiable(per_term)
        return loss, per_term

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_per_term):
        if ctx.reduction == "none":
            saved = iter(ctx.saved_tensors)
            tensors = [next(saved) if present else None for present in ctx.present]
            _, grads = _run(ctx.spec, tensors, grad_loss.to(ctx.spec.compute_dtype),
                            need_grads=True)
            return None, None, *grads
        if ctx.grads is None:
            raise RuntimeError(
                "head_divergence: a second backward through one result whose first backward "
                "ran without retain_graph=True (its gradient buffers were used up)"
            )
        if _graph_is_kept():  # another backward may follow: leave the buffers intact
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads]
        else:  # the last use: scale in place, nothing new allocated
            grads, ctx.grads = ctx.grads, None
            for g in grads:
                if g is not None:
                    g.mul_(grad_loss.to(g.dtype))
        return None, None, *grads


def _graph_is_kept() -> bool:
    """True when this backward runs with retain_graph / create_graph (or when torch cannot
    tell): the saved gradient buffers may be read again, so they are not scaled in place."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is None or bool(keep_graph())


def _side(head: LMHead, h: torch.Tensor, what: str):
    """The _Side of (h, head) and its autograd inputs (h, weight, bias), cast under autocast."""
    if not isinstance(head, LMHead):
        raise TypeError(f"{what}: expected an LMHead (see lm_head_of), got {type(head).__name__}")
    if h.ndim < 2 or h.shape[-1] != head.hidden_size:
        raise ValueError(
            f"{what}: hidden states {tuple(h.shape)} do not end in the head's hidden size "
            f"{head.hidden_size}"
        )
    weight, bias = head.weight, head.bias
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        # as the model's own head would run: the matmul in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    mm_dtype = torch.promote_types(h.dtype, weight.dtype)
    v = head.vocab_size
    mm_weight = weight[:v].to(mm_dtype)  # a view unless a wider dtype is needed
    mm_bias = None if bias is None else bias[:v].to(mm_dtype)
    grad = torch.is_grad_enabled()
    side = _Side(
        head=head,
        mm_weight=mm_weight,
        mm_bias=mm_bias,
        need_h=grad and h.requires_grad,
        need_weight=grad and weight.requires_grad,
        need_bias=grad and bias is not None and bias.requires_grad,
    )
    return side, [h, weight, bias]


def _apply(h: torch.Tensor, head: LMHead, terms: list[tuple[RowFn, torch.Tensor | None,
           LMHead | None, float]], mask: torch.Tensor | None, chunk_size: int | None,
           reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """terms: (row function, target hidden states or None, target head or None, coefficient)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    lead = h.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=h.device)
    elif mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}; pass mask.bool()")
    elif mask.shape != lead:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the hidden states' shape without its "
            f"last dim, {tuple(lead)}"
        )
    side, inputs = _side(head, h, "hidden states")
    sides, keys, spec_terms = [side], {}, []
    for rows, target_h, target_head, coef in terms:
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
            raise ValueError(f"a term's weight must be a finite number, got {coef!r}")
        if target_h is None:
            spec_terms.append(_Term(rows, None, float(coef)))
            continue
        if target_h.shape[:-1] != lead:
            raise ValueError(
                f"target hidden states {tuple(target_h.shape)} and hidden states "
                f"{tuple(h.shape)} must agree except in the last (hidden size) dim"
            )
        if not isinstance(target_head, LMHead) or target_head.vocab_size != head.vocab_size:
            raise UserError(
                f"the two heads compare {head.vocab_size} and "
                f"{getattr(target_head, 'vocab_size', None)} vocabulary columns; token-level "
                "distillation needs one vocabulary (pass the same vocab_size to lm_head_of)"
            )
        key = (id(target_h), id(target_head))
        if key not in keys:
            target_side, target_inputs = _side(target_head, target_h, "target hidden states")
            keys[key] = len(sides)
            sides.append(target_side)
            inputs += target_inputs
        spec_terms.append(_Term(rows, keys[key], float(coef)))
    compute_dtype = torch.float32
    for t in inputs:
        if t is not None:
            compute_dtype = torch.promote_types(compute_dtype, t.dtype)
    positions = mask.nonzero(as_tuple=True)  # (N,) per leading dim
    num_rows = positions[0].numel()
    if reduction == "none":
        row_weight = None
    else:
        row_weight = 1.0 / max(num_rows, 1) if reduction == "mean" else 1.0
    spec = _Spec(
        terms=spec_terms,
        positions=positions,
        chunk_size=chunk_size or max(1, CHUNK_ELEMENTS // head.vocab_size),
        compute_dtype=compute_dtype,
        sides=sides,
        row_weight=row_weight,
    )
    with _no_autocast(h.device.type):
        return _HeadRows.apply(spec, reduction, *inputs)


def _no_autocast(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def head_divergence(
    name: str,
    h: torch.Tensor,
    head: LMHead,
    target_h: torch.Tensor,
    target_head: LMHead,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    reduction: str = "sum",
    **params,
) -> torch.Tensor:
    """The divergence ``name`` of promptkd.losses between two models' next-token distributions,
    from their final hidden states and LM heads, ``chunk_size`` selected positions at a time.

    Equal, values and gradients to float rounding, to::

        DIVERGENCES[name](head.logits(h), target_head.logits(target_h), mask,
                          reduction=reduction, **params)

    without ever holding more than a few (chunk_size, V) logit-sized tensors.

    Args:
        name: a key of ``promptkd.losses.DIVERGENCES`` (``reverse_kl``, ``forward_kl``,
            ``skew_reverse_kl``, ``generalized_jsd``, ...).
        h: (..., H) hidden states of the trained distribution q (e.g. the student).
        head: its LMHead (``lm_head_of``).
        target_h: (..., H_t) hidden states of the target p (e.g. the prompted teacher), with
            h's leading shape.
        target_head: its LMHead, with head's vocab_size. A target that must get no gradient
            while its weight requires one (the student as a target): ``head.detached()``.
        mask: (...) bool, True on positions that count; None = all.
        chunk_size: positions per chunk; None = max(1, CHUNK_ELEMENTS // V).
        reduction: "sum" (default, as the training steps use it), "mean" (0 when nothing is
            selected) or "none" ((N,) values; backward then recomputes the chunks).
        **params: the divergence's parameters (``alpha``, ``beta``), validated by
            ``get_divergence``.

    Returns:
        A scalar (sum / mean) or (N,) values, float32 (float64 for float64 inputs).

    Gradients flow to h, target_h and each head's weight / bias, wherever they require grad
    (a tied head's weight is the embedding matrix: it gets this gradient too). With "sum" /
    "mean" every gradient is computed during the forward, as the chunks go by (under
    ``torch.no_grad()`` none is); backward only scales them (in place unless retain_graph).

    Raises:
        UserError: unknown divergence or bad parameter, different vocab sizes.
        ValueError, TypeError: bad shapes, mask, reduction or chunk_size.
    """
    loss, _ = head_divergences(h, head, [HeadTerm(name, target_h, target_head, 1.0, params)],
                               mask, chunk_size=chunk_size, reduction=reduction)
    return loss


def head_divergences(
    h: torch.Tensor,
    head: LMHead,
    terms: list[HeadTerm | CrossEntropyTerm],
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several divergences from one trained side, its logits computed once per chunk.

    ``loss = sum_k terms[k].weight * D_k`` with ``D_k = head_divergence(terms[k].name, h, head,
    terms[k].target_h, terms[k].target_head, mask, **terms[k].params)``, e.g. PromptKD's prompt
    loss ``L_kd + lambda L_reg`` plus the logged distances (weight 0) in one pass: the trained
    side's logits and their gradient are computed once per chunk for every term, and terms with
    the same target objects share its logits. A ``CrossEntropyTerm`` adds
    ``head_cross_entropy(h, head, term.targets, mask)`` the same way (the supervised steps' CE).

    Returns:
        (loss, per_term): loss as head_divergence returns it (differentiable); per_term the
        K values D_k, (K,) for "sum" / "mean" or (N, K) for "none", not differentiable.

    Other arguments and errors as in ``head_divergence`` and ``head_cross_entropy``.
    """
    if not terms:
        raise ValueError("head_divergences needs at least one term")
    rows = []
    for term in terms:
        if isinstance(term, CrossEntropyTerm):
            rows.append((_cross_entropy_rows(h, head, term.targets, mask), None, None, term.weight))
            continue
        if not isinstance(term, HeadTerm):
            raise TypeError(
                f"terms must be HeadTerm or CrossEntropyTerm objects, got {type(term).__name__}"
            )
        loss = get_divergence(term.name, **term.params)  # UserError: unknown names / params
        rows.append((_divergence_rows(loss), term.target_h, term.target_head, term.weight))
    return _apply(h, head, rows, mask, chunk_size, reduction)


def head_cross_entropy(
    h: torch.Tensor,
    head: LMHead,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Cross-entropy of ``targets`` under softmax(head.logits(h)), chunked like head_divergence.

    Equal to ``F.cross_entropy(head.logits(h)[mask].float(), targets[mask], reduction=...)``
    ("mean": over the selected positions, 0 when none), e.g. for the supervised steps' CE term.

    Args:
        h: (..., H) hidden states; head: their LMHead.
        targets: (...) long token ids, each in [0, head.vocab_size) where selected.
        mask, chunk_size, reduction: as in ``head_divergence``.
    """
    rows = _cross_entropy_rows(h, head, targets, mask)
    loss, _ = _apply(h, head, [(rows, None, None, 1.0)], mask, chunk_size, reduction)
    return loss


def _cross_entropy_rows(h: torch.Tensor, head: LMHead, targets: torch.Tensor,
                        mask: torch.Tensor | None) -> RowFn:
    """The row function of -log softmax(u)[target], after checking the targets."""
    if targets.shape != h.shape[:-1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} must have the hidden states' leading shape "
            f"{tuple(h.shape[:-1])}"
        )
    chosen = targets if mask is None or mask.dtype != torch.bool else targets[mask]
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= head.vocab_size):
        raise UserError(
            f"a selected target token id is outside the {head.vocab_size}-token vocabulary "
            f"(ids {int(chosen.min())}..{int(chosen.max())})"
        )

    def rows(u, w, index, weights, need_u, need_w):
        ids = targets[index].unsqueeze(-1)  # (c, 1)
        log_p = torch.log_softmax(u, dim=-1)  # (c, V)
        values = -log_p.gather(-1, ids).squeeze(-1)  # (c,)
        grad_u = None
        if need_u:  # (softmax - one_hot) * weight
            grad_u = log_p.exp_()
            grad_u.scatter_add_(-1, ids, grad_u.new_full(ids.shape, -1.0))
            grad_u.mul_(weights.to(grad_u.dtype).unsqueeze(-1))
        return values, grad_u, None

    return rows
