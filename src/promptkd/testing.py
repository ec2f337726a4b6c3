"""Tiny in-process models, tokenizers and data for tests, examples and smoke runs.

Nothing here touches the network: the tokenizer is byte-level BPE with no merges (every byte
is one token) plus three special tokens, and models are randomly initialised Llama configs a
few kilobytes in size.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from promptkd.data.collate import collate_prompts, collate_sequences
from promptkd.errors import UserError
from promptkd.head_losses import lm_head_of
from promptkd.methods.base import HiddenStates
from promptkd.sampling import SamplingConfig, TeacherMixture, response_logits, sample_responses

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


class FakeContext:
    """A `promptkd.methods.base.StepContext` for unit tests: plain CPU forwards, no accelerate.

    It drives a method's `setup` / `step` with tiny in-process models and records what the
    method asked for, in order, so a test can check the order of operations and the values:

    calls:    every operation as a tuple, e.g. ("sample", from_teacher), ("phase", name),
              ("apply_update", name, loss_value), ("backward", loss_value), ("accumulate", is_last).
    phases:   the names of the phases entered; open_phases: those not yet left (empty after a
              step, also one that raised).
    batches:  every batch `sample` / `collate` returned; grads: {set name: gradients as
              `apply_update` received them (None as zeros)} of the last update of that set.

    `sample` returns the queued `samples` first (pre-built SequenceBatches), then asks
    `sampler(examples, from_teacher=...)` when one is given, else samples with
    `promptkd.sampling.sample_responses` seeded by `seed` and the number of samples drawn so far
    (deterministic). Each parameter set gets a plain SGD (or AdamW) optimizer, no clipping, no
    schedule; the student's set ("student") is added here, as the trainer does.

    chunked_lm_head: serve the losses hidden states and LM heads (`student_hidden`, ...), as the
    trainer does by default, falling back to logits like it when a head cannot be chunked
    (`chunked_fallback` says why). Off by default here, so that tests of a method's logits
    (what its loss functions receive) see them.
    """

    def __init__(self, student, teacher=None, tokenizer=None, *, vocab_size: int | None = None,
                 max_steps: int = 10, samples=None, sampler=None, learning_rate: float = 1e-2,
                 optimizer: str = "sgd", max_new_tokens: int = 6, eos_at_cap: bool = False, seed: int = 0,
                 chunked_lm_head: bool = False):
        self.student_module = student
        self.teacher = teacher
        self.tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
        if vocab_size is None:
            sizes = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher) if m is not None]
            vocab_size = min(sizes)
        self.vocab_size = vocab_size
        self.step = 0
        self.epoch = 0.0
        self.max_steps = max_steps
        self.device = torch.device("cpu")
        self.is_main_process = True
        self.num_processes = 1
        self.process_index = 0
        self.dev_losses: list[float] = []
        self.samples = list(samples or [])
        self.sampler = sampler
        self.optimizer = optimizer
        self.max_new_tokens = max_new_tokens
        self.eos_at_cap = eos_at_cap
        self.seed = seed
        self.calls: list[tuple] = []
        self.phases: list[str] = []
        self.open_phases: list[str] = []
        self.batches: list = []
        self.grads: dict[str, list[torch.Tensor]] = {}
        self.param_sets: dict[str, tuple[list, torch.optim.Optimizer]] = {}
        self.num_samples = 0
        self.student_head = self.teacher_head = None
        self.chunked_fallback: str | None = None
        if chunked_lm_head:
            try:
                heads = [lm_head_of(m, vocab_size) if m is not None else None for m in (student, teacher)]
            except UserError as err:
                self.chunked_fallback = str(err)
                logger.info("train.chunked_lm_head: the losses use full logits: %s", err)
            else:
                self.student_head, self.teacher_head = heads
        self.add_parameter_set("student", [p for p in student.parameters() if p.requires_grad],
                               learning_rate=learning_rate, weight_decay=0.0)
        self.calls.clear()

    def calls_named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]

    @property
    def chunked(self) -> bool:
        return self.student_head is not None

    # ------------------------------------------------------------ context managers
    def phase(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def entered():
            self.calls.append(("phase", name))
            self.phases.append(name)
            self.open_phases.append(name)
            try:
                yield
            finally:
                self.open_phases.pop()

        return entered()

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def accumulate(self, is_last: bool):
        import contextlib

        self.calls.append(("accumulate", is_last))
        return contextlib.nullcontext()

    # ------------------------------------------------------------ batches
    def sample(self, examples, *, from_teacher: bool = False, teacher_mix: float = 0.0):

        self.calls.append(("sample", from_teacher) + ((teacher_mix,) if teacher_mix else ()))
        if self.samples:
            batch = self.samples.pop(0)
        elif self.sampler is not None:
            batch = self.sampler(examples, from_teacher=from_teacher)
        else:
            model = self.teacher if from_teacher else self.student_module
            prompt_ids, prompt_mask = collate_prompts(examples, self.tokenizer.pad_token_id)
            config = SamplingConfig(max_new_tokens=self.max_new_tokens,
                                    eos_at_cap=self.eos_at_cap and not from_teacher)
            processors = None
            if teacher_mix and not from_teacher:
                processors = [TeacherMixture(self.teacher, prompt_mask, alpha=teacher_mix, vocab_size=self.vocab_size)]
            batch = sample_responses(model, prompt_ids, prompt_mask, eos_token_ids=[self.tokenizer.eos_token_id],
                                     pad_token_id=self.tokenizer.pad_token_id, config=config,
                                     generator_seed=self.seed + self.num_samples, logits_processor=processors)
        self.num_samples += 1
        self.batches.append(batch)
        return batch

    def collate(self, examples):

        self.calls.append(("collate",))
        batch = collate_sequences(examples, self.tokenizer.pad_token_id)
        self.batches.append(batch)
        return batch

    # ------------------------------------------------------------ forwards
    def student_logits(self, batch) -> torch.Tensor:

        self.calls.append(("student_logits",))
        return response_logits(self.student_module, batch, self.vocab_size)  # (B, R, V), with grad

    def student_target_logits(self, batch) -> torch.Tensor:

        self.calls.append(("student_target_logits",))
        model = self.student_module
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return response_logits(model, batch, self.vocab_size)  # (B, R, V)
        finally:
            model.train(was_training)

    def teacher_logits(self, batch) -> torch.Tensor:

        self.calls.append(("teacher_logits",))
        if self.teacher is None:
            raise RuntimeError("FakeContext: teacher_logits called but the context has no teacher")
        with self.phase("teacher_fwd_base"), torch.no_grad():
            return response_logits(self.teacher, batch, self.vocab_size)  # (B, R, V)

    def student_hidden(self, batch) -> HiddenStates:

        self.calls.append(("student_hidden",))
        return HiddenStates.of(self.student_module, batch, self.student_head)  # (B, R, H), with grad

    def student_target_hidden(self, batch) -> HiddenStates:

        self.calls.append(("student_target_hidden",))
        model = self.student_module
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return HiddenStates.of(model, batch, self.student_head)  # (B, R, H)
        finally:
            model.train(was_training)

    def teacher_hidden(self, batch) -> HiddenStates:

        self.calls.append(("teacher_hidden",))
        if self.teacher is None:
            raise RuntimeError("FakeContext: teacher_hidden called but the context has no teacher")
        with self.phase("teacher_fwd_base"), torch.no_grad():
            return HiddenStates.of(self.teacher, batch, self.teacher_head)  # (B, R, H)

    # ------------------------------------------------------------ normalisation and backward
    def global_token_count(self, batches) -> float:
        return float(sum(int(b.loss_mask[:, b.prompt_length :].sum()) for b in batches))

    def loss_scale(self, global_tokens: float) -> float:
        return 1.0 / max(global_tokens, 1.0)

    def backward(self, loss: torch.Tensor) -> None:
        self.calls.append(("backward", float(loss.detach())))
        loss.backward()

    def reduce_sum(self, value: float) -> float:
        return float(value)

    def all_reduce_grads(self, params: list) -> None:
        self.calls.append(("all_reduce_grads",))

    def gather_object(self, obj) -> list:
        return [obj]

    def dev_loss(self) -> float | None:
        """The next of `dev_losses` (a list a test sets), or None when there are none."""
        self.calls.append(("dev_loss",))
        return self.dev_losses.pop(0) if self.dev_losses else None

    def load_examples(self, source) -> list:
        """`source` itself when it is a list of examples (tests pass them directly)."""
        return list(source)

    # ------------------------------------------------------------ parameter sets
    def add_parameter_set(self, name: str, params: list, *, learning_rate: float, weight_decay: float) -> None:
        if name in self.param_sets:
            raise ValueError(f"parameter set {name!r} exists already")
        params = list(params)
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
        self.param_sets[name] = (params, opt)
        self.calls.append(("add_parameter_set", name))

    def apply_update(self, name: str, loss_value: float) -> dict[str, float]:
        params, opt = self.param_sets[name]
        self.calls.append(("apply_update", name, float(loss_value)))
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        self.grads[name] = grads
        grad_norm = float(torch.stack([g.float().norm() for g in grads]).norm()) if grads else 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {f"{name}/grad_norm": grad_norm, f"{name}/lr": opt.param_groups[0]["lr"]}

    def snapshot_update(self, name: str) -> dict:
        params, opt = self.param_sets[name]
        self.calls.append(("snapshot_update", name))
        return {"params": [p.detach().clone() for p in params], "optimizer": copy.deepcopy(opt.state_dict())}

    def restore_update(self, name: str, snapshot: dict) -> None:
        params, opt = self.param_sets[name]
        self.calls.append(("restore_update", name))
        with torch.no_grad():
            for p, saved in zip(params, snapshot["params"], strict=True):
                p.copy_(saved)
        opt.load_state_dict(snapshot["optimizer"])
