"""Tiny in-process models, tokenizers and data for tests, examples and smoke runs.

Nothing here touches the network: the tokenizer is byte-level BPE with no merges (every byte
is one token) plus three special tokens, and models are randomly initialised Llama configs a
few kilobytes in size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A 259-token byte-level tokenizer (256 bytes + <pad>, <s>, </s>) built in memory."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_byte_backend(), pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


# Chat templates of two model families, reduced to their turn structure (no default system
# prompt, no tools): ChatML as Qwen2 / Qwen2.5 / SmolLM2 write it, and Llama 3's (which writes
# the BOS itself, so a tokenizer that also adds one must not double it).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# family -> (template, pad, bos, eos, other special tokens, whether the tokenizer adds BOS);
# eos is the end-of-turn token, as the instruct models' tokenizers set it.
_CHAT_FAMILIES = {
    "chatml": (CHATML_TEMPLATE, "<|endoftext|>", None, "<|im_end|>", ["<|im_start|>"], False),
    "llama3": (
        LLAMA3_CHAT_TEMPLATE,
        "<|finetune_right_pad_id|>",
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
        True,
    ),
}
CHAT_FAMILIES = tuple(_CHAT_FAMILIES)


def chat_tokenizer(family: str = "chatml", eos_token: str | None = None):
    """A byte-level tokenizer with a model family's special tokens and chat template.

    family: "chatml" (Qwen2 / SmolLM2 style: no BOS, eos <|im_end|>) or "llama3" (adds
        <|begin_of_text|> like Llama 3's tokenizer, and its template writes it too; eos <|eot_id|>).
    eos_token: override the EOS (e.g. "<|endoftext|>", as a base model's tokenizer has).
    Ids: the 256 bytes, then the family's special tokens (no model needed: data tests only).
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    template, pad, bos, eos, others, adds_bos = _CHAT_FAMILIES[family]
    specials = {"pad_token": pad, "eos_token": eos, "additional_special_tokens": others}
    if bos is not None:
        specials["bos_token"] = bos
    tok = PreTrainedTokenizerFast(tokenizer_object=_byte_backend(), **specials)
    if adds_bos:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
        )
    if eos_token is not None:
        tok.eos_token = eos_token
    tok.chat_template = template
    return tok


def bpe_tokenizer(vocab_size: int = 320, texts=None, *, eos_token: str = "<|endoftext|>"):
    """A byte-level BPE tokenizer trained in memory on `texts` (default: the Alpaca prompts and
    responses of TINY_RECORDS), a different vocabulary from `byte_tokenizer`'s: its special token
    <|endoftext|> (eos and pad, id 0) first, then the 256 bytes, then merges up to `vocab_size`
    (e.g. "Ġthe", "Response"). For cross-tokenizer tests: teacher and student read the same text
    through different tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from promptkd.data.records import InstructionRecord
    from promptkd.data.templates import format_prompt

    if texts is None:
        texts = []
        for r in TINY_RECORDS:
            response = r.get("output") or r["outputs"][0]
            texts.append(format_prompt(InstructionRecord(r["instruction"], r["input"], [response])) + response)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, pad_token=eos_token)


def _byte_backend():
    """Byte-level BPE without merges: every byte is one token (ids 0-255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def tiny_llama(
    vocab_size: int = 259,
    num_layers: int = 4,
    hidden_size: int = 32,
    seed: int = 0,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
):
    """A randomly initialised Llama causal LM with tied embeddings (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_ids = byte_tokenizer() if pad_token_id is None else None
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id if pad_token_id is not None else tok_ids.pad_token_id,
        eos_token_id=eos_token_id if eos_token_id is not None else (tok_ids.eos_token_id if tok_ids else None),
        bos_token_id=bos_token_id if bos_token_id is not None else (tok_ids.bos_token_id if tok_ids else None),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def save_tiny_pair(root: str | Path, teacher_layers: int = 4, student_layers: int = 2, seed: int = 0):
    """Save a tiny teacher and student (sharing the byte tokenizer) under root; return their dirs."""
    root = Path(root)
    tok = byte_tokenizer()
    out = []
    for name, layers, s in (("teacher", teacher_layers, seed), ("student", student_layers, seed + 1)):
        d = root / name
        model = tiny_llama(num_layers=layers, seed=s)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out.append(d)
    return out[0], out[1]


TINY_RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "hello"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "blue"},
    {"instruction": "Repeat the word.", "input": "cat", "output": "cat cat"},
    {"instruction": "Give an animal.", "input": "", "output": "dog"},
    {"instruction": "Opposite of up?", "input": "", "output": "down"},
    {"instruction": "Spell it backwards.", "input": "abc", "output": "cba"},
    {"instruction": "Pick a number.", "input": "", "outputs": ["7", "seven"]},
]


def write_tiny_jsonl(path: str | Path, num_records: int = 16) -> Path:
    """Write num_records instruction records (cycling TINY_RECORDS) as JSONL; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(num_records):
            f.write(json.dumps(TINY_RECORDS[i % len(TINY_RECORDS)]) + "\n")
    return path
