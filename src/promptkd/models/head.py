"""A causal LM's output layer as data (`LMHead`), and the final hidden states that enter it.

The losses (promptkd.losses) compute logits from these a chunk of positions at a time, so no
(batch, response, vocabulary) logits tensor is built. `lm_head_of` refuses, with the reason, a
head it cannot reproduce as weight @ h (LoRA on lm_head, a quantized or offloaded head, a sharded
weight, an unknown output transform); the trainer then uses full logits and says so once.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promptkd.data.batch import SequenceBatch
from promptkd.errors import UserError
from promptkd.models.prompted_teacher import PromptedTeacher


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

    def __post_init__(self):  # lm_head_of builds heads from a model; this guards hand-built ones
        rows = self.weight.shape[0]
        if self.vocab_size is None:
            object.__setattr__(self, "vocab_size", int(rows))
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or not 1 <= self.vocab_size <= rows:
            raise UserError(f"LMHead: vocab_size must be an int in 1..{rows} (the head's rows), got {self.vocab_size!r}")

    def detached(self) -> LMHead:
        """This head with its weight and bias detached: a target side that must get no gradient
        (e.g. the student as PromptKD's prompt-loss target, like ``logits.detach()``)."""
        return LMHead(self.weight.detach(), None if self.bias is None else self.bias.detach(),
                      self.vocab_size, self.scale, self.softcap)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits, plain autograd, all at once: the unchunked reference."""
        z = F.linear(h, self.weight[: self.vocab_size],
                     None if self.bias is None else self.bias[: self.vocab_size])
        return output_transform(z, self.scale, self.softcap)


def output_transform(z: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    """An LM head's logits from its raw weight @ h: times ``scale``, then soft-capped (None: skip)."""
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / DataParallel / a DeepSpeed engine, a PromptedTeacher
    or a PeftModel. (Not accelerate's extract_model_from_parallel: it walks every submodule of the
    model at each call, and this runs at every forward.)"""
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
            f"LM-head chunking needs a causal LM with an LM head"
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
            f"nn.Linear head only: leave lm_head out of the adapter's target modules"
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
            f"reparametrised); LM-head chunking computes weight @ h itself"
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
            f"DeepSpeed ZeRO-3); LM-head chunking needs the whole weight"
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
            (quantized, offloaded), a sharded weight, a bad vocab_size, or a failed check. The trainer
            then computes full logits instead.
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
            f"({type(module).__name__}); LM-head chunking cannot reproduce its logits"
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
            f"know"
        )


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
            f"(expected once)"
        )
    hidden = captured[0]
    if hidden.ndim != 3 or hidden.shape[1] != keep:
        raise RuntimeError(
            f"the LM head received {tuple(hidden.shape)}, expected (B, {keep}, H): the model does "
            f"not honour logits_to_keep"
        )
    return hidden[:, :-1]  # (B, R, H)
