"""The on-policy sampler and the response-logits helper.

The sampler returns a `promptkd.data.SequenceBatch` (see docs/conventions.md): left-padded
prompt + right-padded response, with a loss mask over response tokens up to and including the
first EOS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from promptkd.data.batch import SequenceBatch
from promptkd.errors import ConfigError, UserError
from promptkd.options import field_problems, opt


def response_logits(
    model: torch.nn.Module, batch: SequenceBatch, vocab_size: int | None = None, **model_kwargs
) -> torch.Tensor:
    """Next-token logits predicting the response columns: (B, T - P, V), aligned with loss_mask[:, P:].

    Prompts are left-padded, so every response token sits at a column >= P and only the last
    T - P + 1 positions need the LM head (`logits_to_keep`): the same values as slicing the full
    (B, T, V) output, without materialising it. vocab_size cuts padding columns of the LM head.
    """
    keep = batch.input_ids.shape[1] - batch.prompt_length + 1
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=keep,
        use_cache=False,
        **model_kwargs,
    )
    return out.logits[:, :-1, :vocab_size]


# --------------------------------------------------------------------------------------------
# On-policy sampling
# --------------------------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    """How responses are sampled: the one generation-settings record of every command.

    Training (`sampling:` in a train config), `promptkd generate`, `promptkd eval` and
    `promptkd exposure-bias` all hold one; the class defaults are the paper's training sampler
    and the evaluation protocol changes no_repeat_ngram_size to 6 (see promptkd.config).
    Every field is passed to `generate` explicitly, so a checkpoint's own generation_config.json
    (e.g. `top_k: 50`, `repetition_penalty: 1.1`) never changes what is sampled. Built with bad
    values it raises ConfigError listing every problem (promptkd.options does the checking).
    """

    max_new_tokens: int = opt(
        256, "Most new tokens per response (paper: 256, in training and in evaluation).", min=1
    )
    temperature: float = opt(
        1.0,
        "Softmax temperature (paper: 1.0).",
        min=0.0,
        min_exclusive=True,
        fix="for greedy decoding set sampling.do_sample false",
    )
    top_k: int = opt(0, "Keep only the k most likely tokens; 0 = off (paper).", min=0)
    top_p: float = opt(
        1.0, "Nucleus sampling mass; 1.0 = off (paper).", min=0.0, max=1.0, min_exclusive=True
    )
    no_repeat_ngram_size: int = opt(
        0,
        "Forbid repeating any n-gram of this size; 0 = off. The evaluation protocol uses 6 "
        "(MiniLLM / PromptKD evaluation); training samples use 0.",
        min=0,
    )
    do_sample: bool = opt(
        True, "Sample (true) or decode greedily (false: temperature, top_k, top_p are ignored)."
    )
    eos_at_cap: bool | None = opt(
        None,
        "Training only. A sample that hits max_new_tokens without EOS gets EOS as its last token, "
        "so capped samples are trained to end. null = the method's default: on for promptkd "
        "(reference code overwrites the last position), off for gkd (like TRL's GKDTrainer, which "
        "trains capped samples as they are). generate / eval / exposure-bias keep responses as "
        "sampled and refuse true.",
    )

    def __post_init__(self):
        problems = field_problems(self, "sampling.")
        if problems:
            raise ConfigError(problems)
        if not self.do_sample:
            ignored = [
                f"{name}={getattr(self, name)!r}"
                for name, neutral in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))
                if getattr(self, name) != neutral
            ]
            if ignored:
                warnings.warn(
                    f"sampling: do_sample=False (greedy decoding) ignores {', '.join(ignored)}",
                    UserWarning,
                    stacklevel=3,
                )

    def to_sampling_config(self, eos_at_cap_default: bool = False) -> SamplingConfig:
        """The record for the sampler in training: a copy whose null eos_at_cap takes the
        method's default (`eos_at_cap_default`)."""
        default = self.eos_at_cap is None
        return dataclasses.replace(self, eos_at_cap=eos_at_cap_default if default else self.eos_at_cap)


def _eos_id_list(eos_token_ids: int | Sequence[int]) -> list[int]:
    try:
        ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    except TypeError:  # None or another non-iterable
        ids = []
    if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise UserError(
            f"eos_token_ids = {eos_token_ids!r} is invalid: give one or more non-negative token "
            "ids (the tokenizer's eos_token_id, plus e.g. an end-of-turn id)"
        )
    return ids


def mask_after_first_eos(
    response_ids: torch.Tensor, eos_token_ids: int | Sequence[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every response after its first EOS, keeping that EOS.

    Args:
        response_ids: (B, L) generated tokens only (no prompt columns), so a prompt's
            left-padding never counts as an EOS even when pad == eos.
        eos_token_ids: one id or several; the first occurrence of any of them ends a response.
        pad_token_id: written after the first EOS.

    Returns:
        (response_ids, response_mask), both (B, L): ids with every position after the first EOS
        replaced by pad_token_id, and a long mask that is 1 up to and including the first EOS
        (the whole row when it has no EOS) and 0 after it. Same shape as the input: no trimming.
    """
    eos = torch.as_tensor(
        _eos_id_list(eos_token_ids), dtype=response_ids.dtype, device=response_ids.device
    )
    is_eos = torch.isin(response_ids, eos).long()  # (B, L)
    # A token is part of the response iff no EOS occurs strictly before it.
    eos_before = is_eos.cumsum(-1) - is_eos  # (B, L)
    keep = eos_before == 0  # (B, L)
    return response_ids.masked_fill(~keep, pad_token_id), keep.long()


def _check_prompts(prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_attention_mask.shape:
        raise UserError(
            f"prompt_ids {tuple(prompt_ids.shape)} and prompt_attention_mask "
            f"{tuple(prompt_attention_mask.shape)} must both be (batch, prompt_length)"
        )
    if prompt_ids.numel() == 0:
        raise UserError(
            f"empty prompt batch {tuple(prompt_ids.shape)}: need >= 1 prompt of >= 1 token"
        )
    mask = prompt_attention_mask.long()
    # Left padding <=> each mask row is non-decreasing; a non-empty prompt ends in a real token.
    if (
        ((mask != 0) & (mask != 1)).any()
        or (mask[:, 1:] < mask[:, :-1]).any()
        or (mask[:, -1] == 0).any()
    ):
        raise UserError(
            "prompts must be LEFT-padded and non-empty (attention mask rows of the form 0..0 1..1): "
            "use prompt_batch_from_ids or a tokenizer with padding_side='left'"
        )


def _generation_config(config: SamplingConfig, eos_ids: list[int], pad_token_id: int):
    """A fresh GenerationConfig that sets every knob affecting which tokens are drawn."""
    from transformers import GenerationConfig

    settings = dict(
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        eos_token_id=eos_ids,
        pad_token_id=pad_token_id,
        use_cache=True,
        # Neutral values for processors a checkpoint's generation_config might switch on.
        num_beams=1,
        num_return_sequences=1,
        min_length=0,
        repetition_penalty=1.0,
        return_dict_in_generate=False,
    )
    if config.do_sample:
        # top_k must be given even when 0: transformers fills an unset top_k with 50.
        settings.update(
            temperature=float(config.temperature),
            top_k=config.top_k,
            top_p=float(config.top_p),
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
    return GenerationConfig(**settings)


@contextlib.contextmanager
def _generation_defaults_set_aside(model: torch.nn.Module):
    """Temporarily blank the generation_config of every submodule that owns one.

    `generate` fills each knob left unset in the config it is given from the model's own
    generation_config (bad_words_ids, suppress_tokens, min_new_tokens, ... have no neutral value
    we could set instead), so for the call the model's defaults are replaced by empty ones.
    """
    from transformers import GenerationConfig

    owners = [
        m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)
    ]
    saved = [m.generation_config for m in owners]
    try:
        for m in owners:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, gc in zip(owners, saved, strict=True):
            m.generation_config = gc


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode for the call; every submodule's own train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _forked_seed(seed: int | None, device: torch.device):
    """Seed the CPU generator and `device`'s generator, restoring both RNG states afterwards."""
    if seed is None:
        yield
        return
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    device_module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else device_module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.random.default_generator.manual_seed(seed)
        with device_module.device(index):
            device_module.manual_seed(seed)
        yield


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def sample_responses(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    eos_token_ids: int | list[int],
    pad_token_id: int,
    config: SamplingConfig,
    generator_seed: int | None = None,
    logits_processor: list | None = None,
) -> SequenceBatch:
    """Sample one response per prompt from `model` (on-policy data for KD/GKD/PromptKD).

    One batched `model.generate` call with a KV cache; generation stops as soon as every row
    has produced an EOS. Every sampling knob comes from `config` (the model's own
    generation_config is set aside for the call). The model is put in eval mode for the call
    and each submodule's train/eval flag is restored afterwards; no gradients are recorded.

    Randomness: by default sampling draws from the global torch RNG (so a run seeded once with
    `torch.manual_seed` is reproducible, and resuming restores the same stream). With
    `generator_seed`, the call seeds the CPU and model-device generators with it inside a
    `torch.random.fork_rng`, so the result depends only on the seed and the global RNG state is
    left exactly as it was.

    Args:
        model: a causal LM with `generate` (transformers GenerationMixin).
        prompt_ids: (B, P) long, LEFT-padded.
        prompt_attention_mask: (B, P), 1 on real prompt tokens, 0 on left padding.
        eos_token_ids: id(s) that end a response; the first one is kept as part of it.
        pad_token_id: id written after the first EOS (may equal an EOS id).
        config: the sampling settings.
        generator_seed: optional seed for this call only (see Randomness).
        logits_processor: extra transformers logits processors, applied after the config's
            own (e.g. `TeacherMixture`, MiniLLM's teacher-mixed sampling).

    Returns:
        SequenceBatch with input_ids = prompt + response (B, P + R), attention_mask 1 on prompt
        tokens and on response tokens up to and including the first EOS, loss_mask True on
        exactly those response tokens, prompt_length P. R is the longest kept response, so
        trailing all-padding columns are trimmed; a response without EOS keeps all its tokens,
        its last one replaced by eos_token_ids[0] when `config.eos_at_cap` (null counts as off).
        Tensors are on the model's device.

    Raises:
        UserError: prompts not left-padded / empty, bad eos_token_ids or pad_token_id.
    """
    eos_ids = _eos_id_list(eos_token_ids)
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
        raise UserError(
            f"pad_token_id = {pad_token_id!r} is invalid: need a non-negative token id (set "
            "tokenizer.pad_token, e.g. to the EOS token, before sampling)"
        )
    _check_prompts(prompt_ids, prompt_attention_mask)
    device = _model_device(model)
    prompt_ids = prompt_ids.to(device=device, dtype=torch.long)  # (B, P)
    prompt_attention_mask = prompt_attention_mask.to(device=device, dtype=torch.long)  # (B, P)
    prompt_length = prompt_ids.shape[1]
    generation_config = _generation_config(config, eos_ids, pad_token_id)

    # no_grad rather than inference_mode: the sampled ids feed a later forward with autograd.
    with (
        torch.no_grad(),
        _eval_mode(model),
        _generation_defaults_set_aside(model),
        _forked_seed(generator_seed, device),
    ):
        sequences = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_attention_mask,
            generation_config=generation_config,
            **({"logits_processor": logits_processor} if logits_processor else {}),
        )  # (B, P + L)
    assert sequences.shape[1] >= prompt_length, "generate dropped prompt columns"

    response_ids, response_mask = mask_after_first_eos(
        sequences[:, prompt_length:], eos_ids, pad_token_id
    )  # (B, L), (B, L)
    width = int(response_mask.sum(-1).max().item()) if response_mask.numel() else 0
    response_ids, response_mask = response_ids[:, :width], response_mask[:, :width]  # (B, R)
    if config.eos_at_cap and width > 0:
        # A row without EOS ran to the cap (generate stops early only once every row ended),
        # so its last column is its last token: overwrite it with EOS, as the reference does.
        eos = torch.as_tensor(eos_ids, device=device)
        capped = ~torch.isin(response_ids, eos).any(-1)  # (B,)
        response_ids[capped, width - 1] = eos_ids[0]

    return SequenceBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_attention_mask, response_mask], dim=1),
        loss_mask=torch.cat(
            [torch.zeros_like(prompt_ids, dtype=torch.bool), response_mask.bool()], dim=1
        ),
        prompt_length=prompt_length,
    )


class TeacherMixture:
    """A `generate` logits processor that samples from (1 - alpha) p_S + alpha p_T (MiniLLM).

    `generate` runs the student; at every new token this processor runs the teacher on the
    tokens it has not seen yet (one KV cache of its own, the prompts' left padding masked as in
    the student's call) and returns log((1 - alpha) softmax(scores / T) + alpha
    softmax(teacher_logits / T)) over the first `vocab_size` columns (the rest get -inf), T =
    `temperature`. It applies T itself: `generate` runs custom processors *before* its own
    temperature, top-k and top-p warpers, so the generation config must have temperature 1 and
    no top-k / top-p (`TrainingContext.sample` passes the run's temperature here and 1 to
    `generate`). Built fresh for every `generate` call.

    LMOps' MiniLLM mixes the same way, in probability space after temperature (its patched
    transformers, generation/utils.py `mix_in_alpha`).
    """

    def __init__(self, teacher, prompt_mask: torch.Tensor, *, alpha: float, vocab_size: int,
                 temperature: float = 1.0, autocast=None):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"teacher mixing alpha must be in (0, 1], got {alpha}")
        self.teacher = teacher
        self.prompt_mask = prompt_mask.long()  # (B, P)
        self.alpha = alpha
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.autocast = autocast or contextlib.nullcontext
        self.cache = None
        self.seen = 0  # columns of input_ids the teacher's cache holds

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape  # (B, P + generated so far)
        prompt_length = self.prompt_mask.shape[1]
        generated = torch.ones(batch, length - prompt_length, dtype=torch.long, device=input_ids.device)
        mask = torch.cat([self.prompt_mask.to(input_ids.device), generated], dim=1)  # (B, L)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        new = slice(self.seen, length)
        # transformers >= 5.x names the KV cache `cache`; earlier releases `past_key_values`
        key = "cache" if "cache" in inspect.signature(self.teacher.forward).parameters else "past_key_values"
        with self.autocast():
            out = self.teacher(
                input_ids=input_ids[:, new], attention_mask=mask, position_ids=positions[:, new],
                use_cache=True, logits_to_keep=1, **{key: self.cache},
            )
        self.cache, self.seen = getattr(out, key), length
        v = self.vocab_size
        log_t = torch.log_softmax(out.logits[:, -1, :v].float() / self.temperature, dim=-1)  # (B, V)
        log_s = torch.log_softmax(scores[:, :v].float() / self.temperature, dim=-1)  # (B, V)
        if self.alpha >= 1.0:
            mixed = log_t
        else:
            mixed = torch.logaddexp(log_s + math.log1p(-self.alpha), log_t + math.log(self.alpha))  # (B, V)
        out_scores = torch.full_like(scores, float("-inf"))
        out_scores[:, :v] = mixed.to(scores.dtype)
        return out_scores
