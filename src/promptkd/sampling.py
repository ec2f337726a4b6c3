"""Sequence batches and the on-policy sampler.

`SequenceBatch` is the one record every method trains on (see docs/conventions.md):
left-padded prompt + right-padded response, with a loss mask over response tokens up to and
including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class SequenceBatch:
    """Prompt + response token batch.

    input_ids:      (B, T) long, prompt left-padded, response right-padded.
    attention_mask: (B, T) long, 1 on real tokens.
    loss_mask:      (B, T) bool, True on response tokens to predict (up to and incl. first EOS).
    prompt_length:  P, the padded prompt width; response tokens start at column P.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    prompt_length: int

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            loss_mask=self.loss_mask.to(device),
            prompt_length=self.prompt_length,
        )

    def split(self, num_chunks: int) -> list[SequenceBatch]:
        """Split along the batch dimension (for micro-batching)."""
        parts = [torch.chunk(getattr(self, f.name), num_chunks) for f in fields(self) if f.name != "prompt_length"]
        return [
            SequenceBatch(input_ids=a, attention_mask=m, loss_mask=lm, prompt_length=self.prompt_length)
            for a, m, lm in zip(*parts)
        ]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only attended tokens: cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def shift_logits_and_mask(logits: torch.Tensor, loss_mask: torch.Tensor):
    """Align next-token logits with their targets: (B, T, V), (B, T) -> (B, T-1, V), (B, T-1)."""
    return logits[:, :-1], loss_mask[:, 1:]
