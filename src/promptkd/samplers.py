"""Pluggable on-policy samplers: how the trainer turns prompts into sampled responses.

`train.sampler` names the backend; the default "hf" is transformers `generate` through
`promptkd.sampling.sample_responses`. Another backend registers a factory that receives the
run's training context:

    from promptkd.samplers import register_sampler

    class MySampler:
        def __init__(self, context): ...
        def __call__(self, model, prompt_ids, prompt_mask, *, eos_token_ids, pad_token_id, config):
            ...  # -> SequenceBatch

    register_sampler("mine", MySampler)        # then: --train.sampler mine

Contract of a sampler call (what every method relies on, see docs/conventions.md):
- `model` is the model to sample from: the current (unwrapped) student, or another model a
  method passes explicitly. Its weights change after every optimizer step, so a backend that
  keeps its own copy (a vLLM engine) must refresh it before sampling from new weights.
- `prompt_ids` / `prompt_mask`: (B, P) long on the training device, prompts LEFT-padded.
- `config`: a `promptkd.sampling.SamplingConfig` (temperature, top_k, top_p, do_sample,
  max_new_tokens, eos_at_cap); every knob must be honoured.
- returns a `SequenceBatch` on the same device: prompt + response, each response cut after its
  first EOS (kept), `attention_mask` / `loss_mask` as in `sample_responses`, `prompt_length` P.
- a backend with `supports_logits_processor = True` also takes `logits_processor=[...]`
  (transformers logits processors; MiniLLM's teacher-mixed sampling needs one); the trainer
  refuses that feature on a backend without it.
- randomness comes from the process's torch RNG (seeded per run and restored on resume) or is
  documented by the backend as not reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from promptkd.errors import UserError
from promptkd.sampling import SamplingConfig, SequenceBatch, sample_responses


class Sampler(Protocol):
    def __call__(
        self,
        model: torch.nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        eos_token_ids: list[int],
        pad_token_id: int,
        config: SamplingConfig,
    ) -> SequenceBatch: ...


class HFSampler:
    """transformers `generate` (batched, KV cache) via `sample_responses`: the default."""

    def __init__(self, context=None):
        """Built as `HFSampler(context)` like every factory; generate needs nothing from the context."""

    supports_logits_processor = True

    def __call__(self, model, prompt_ids, prompt_mask, *, eos_token_ids, pad_token_id, config,
                 logits_processor=None) -> SequenceBatch:
        return sample_responses(
            model, prompt_ids, prompt_mask, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, config=config,
            logits_processor=logits_processor,
        )


_REGISTRY: dict[str, Callable[..., Sampler]] = {"hf": HFSampler}


def register_sampler(name: str, factory: Callable[..., Sampler], *, replace: bool = False) -> None:
    """Make `train.sampler: name` build `factory(context)` (the run's TrainingContext)."""
    if not name or not isinstance(name, str):
        raise UserError(f"sampler name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise UserError(f"sampler {name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[name] = factory


def available_samplers() -> list[str]:
    return sorted(_REGISTRY)


def build_sampler(name: str, context=None) -> Sampler:
    """The sampler `train.sampler` names, built for this run's training context."""
    if name not in _REGISTRY:
        raise UserError(
            f"train.sampler = {name!r} is not a registered sampler; available: "
            f"{', '.join(available_samplers())} (register others with promptkd.samplers.register_sampler)"
        )
    return _REGISTRY[name](context)
