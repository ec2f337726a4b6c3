"""Batch collation: left-padded prompts, and prompt + response `SequenceBatch`es.

Layout (docs/conventions.md): prompts are LEFT-padded to P = the longest prompt in the
batch, responses start at column P and are RIGHT-padded. `loss_mask` is True exactly on the
response tokens (the final EOS included), `attention_mask` is 1 on every real token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from promptkd.data.batch import SequenceBatch
from promptkd.data.dataset import Example


def _lengths(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    return torch.tensor([len(s) for s in seqs], dtype=torch.long)


def _fill(out: torch.Tensor, rows: Sequence[Sequence[int]], starts: torch.Tensor) -> None:
    """Write each row's ids into out[b, starts[b] : starts[b] + len(row)]."""
    for b, (row, start) in enumerate(zip(rows, starts.tolist(), strict=True)):
        if len(row):
            out[b, start : start + len(row)] = torch.as_tensor(row, dtype=torch.long)


def collate_prompts(
    examples: Sequence[Example], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation.

    Returns (prompt_ids (B, P) long, prompt_attention_mask (B, P) long) where P is the longest
    prompt; padding is on the left so every prompt ends at column P - 1.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token before collating")
    prompts = [ex.prompt_ids for ex in examples]
    prompt_lens = _lengths(prompts)  # (B,)
    width = int(prompt_lens.max()) if len(prompts) else 0
    prompt_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # (B, P)
    _fill(prompt_ids, prompts, width - prompt_lens)
    cols = torch.arange(width)  # (P,)
    attention_mask = (cols[None, :] >= (width - prompt_lens)[:, None]).long()  # (B, P)
    return prompt_ids, attention_mask


def collate_sequences(examples: Sequence[Example], pad_token_id: int) -> SequenceBatch:
    """Prompt + reference response batch for teacher-forced training (SFT, KD, ...).

    input_ids (B, P + R): prompt left-padded to P, response right-padded to R (the longest
    response). loss_mask is True on the response tokens, attention_mask is 1 on prompt and
    response tokens; prompt_length = P.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token before collating")
    if any(ex.response_ids is None for ex in examples):
        raise ValueError(
            "collate_sequences needs response_ids; build examples with with_responses=True"
        )
    prompt_ids, prompt_mask = collate_prompts(examples, pad_token_id)  # (B, P)
    responses = [ex.response_ids for ex in examples]
    response_lens = _lengths(responses)  # (B,)
    resp_width = int(response_lens.max()) if len(responses) else 0
    response_ids = torch.full(
        (len(responses), resp_width), pad_token_id, dtype=torch.long
    )  # (B, R)
    _fill(response_ids, responses, torch.zeros_like(response_lens))
    response_mask = torch.arange(resp_width)[None, :] < response_lens[:, None]  # (B, R) bool

    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, T)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)  # (B, T)
    loss_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), response_mask], dim=1)
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        prompt_length=prompt_ids.shape[1],
    )
