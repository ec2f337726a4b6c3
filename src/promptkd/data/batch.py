"""`SequenceBatch`, the one record every method trains on, and the helpers that build its layout.

Layout (docs/conventions.md): prompt LEFT-padded to P columns, response from column P on,
RIGHT-padded; `loss_mask` is True exactly on the response tokens up to and including the first
EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from promptkd.errors import UserError


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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only attended tokens: cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_batch_from_ids(
    prompt_ids: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of prompts into one batch.

    Args:
        prompt_ids: B token-id lists, each non-empty.
        pad_token_id: id written into the padding columns (their attention mask is 0, so the
            value only matters for readability; pad == eos is fine).

    Returns:
        ids (B, P) long and attention_mask (B, P) long, P = the longest prompt; row b is
        `[pad] * (P - len_b) + prompt_b` with mask `[0] * (P - len_b) + [1] * len_b`.

    Raises:
        UserError: if the list is empty or a prompt is empty.
    """
    if len(prompt_ids) == 0:
        raise UserError("prompt_batch_from_ids: got no prompts; pass at least one token-id list")
    lengths = [len(p) for p in prompt_ids]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise UserError(
            f"prompt_batch_from_ids: prompt(s) at index {empty} are empty; every prompt needs at "
            "least one token (drop empty records or add a template)"
        )
    width = max(lengths)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)  # (B, P)
    for row, (prompt, n) in enumerate(zip(prompt_ids, lengths, strict=True)):
        ids[row, width - n :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - n :] = 1
    return ids, mask
