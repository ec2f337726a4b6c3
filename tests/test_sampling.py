"""Tests for the on-policy sampler (promptkd/sampling.py).

Two kinds of model: `ScriptedLM`, a transformers causal LM whose logits put all the mass on a
scripted token per row and step (so EOS placement is exact and the real `generate` loop runs:
early stopping, pad filling, left-padded prompts), and a random tiny Llama for the smoke tests.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from promptkd.data.batch import SequenceBatch, position_ids_from_mask, prompt_batch_from_ids
from promptkd.errors import ConfigError, UserError
from promptkd.sampling import (
    SamplingConfig,
    mask_after_first_eos,
    response_logits,
    sample_responses,
)
from promptkd.testing import tiny_llama

# --------------------------------------------------------------------------------------------
# A scripted model
# --------------------------------------------------------------------------------------------


class ScriptedConfig(PretrainedConfig):
    model_type = "promptkd-scripted-test"

    def __init__(self, vocab_size: int = 16, **kwargs):
        self.vocab_size = vocab_size
        self.num_hidden_layers = 1  # generate sizes its KV cache from this
        super().__init__(**kwargs)


class ScriptedLM(PreTrainedModel, GenerationMixin):
    """Row b's t-th generated token is script[b, t] (the last column repeats past the end)."""

    config_class = ScriptedConfig

    def __init__(self, script, vocab_size: int = 16, **config_kwargs):
        super().__init__(ScriptedConfig(vocab_size=vocab_size, **config_kwargs))
        self.weight = torch.nn.Parameter(torch.zeros(1))
        width = max(len(row) for row in script)
        # Rows may be ragged: each row's last token repeats to the common width.
        self.script = torch.tensor(
            [row + row[-1:] * (width - len(row)) for row in script]
        )  # (B, S)
        self.step = 0
        self.seen = []  # (training, grad enabled) per forward call
        self.post_init()

    def generate(self, *args, **kwargs):
        self.step = 0
        return super().generate(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        # Count forward calls instead of reading lengths: generate drops an all-ones attention
        # mask and slices input_ids to the uncached suffix, both version-dependent details.
        self.seen.append((self.training, torch.is_grad_enabled()))
        token = self.script[:, min(self.step, self.script.shape[1] - 1)]  # (B,)
        self.step += 1
        logits = torch.full((*input_ids.shape, self.config.vocab_size), -1e4)  # (B, T, V)
        logits[:, -1].scatter_(-1, token[:, None], 0.0)
        return CausalLMOutputWithPast(logits=logits)


def run_scripted(prompts, script, *, eos, pad, max_new_tokens=6, **kwargs):
    ids, mask = prompt_batch_from_ids(prompts, pad)
    model = ScriptedLM(script)
    config = SamplingConfig(max_new_tokens=max_new_tokens, **kwargs)
    batch = sample_responses(model, ids, mask, eos_token_ids=eos, pad_token_id=pad, config=config)
    return batch, model, ids, mask


def check_invariants(batch: SequenceBatch, prompt_mask: torch.Tensor):
    """Invariants every SequenceBatch from the sampler satisfies."""
    p = batch.prompt_length
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.loss_mask.shape
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    assert batch.loss_mask.dtype == torch.bool
    assert torch.equal(batch.attention_mask[:, :p], prompt_mask)
    assert not batch.loss_mask[:, :p].any()
    response_mask = batch.attention_mask[:, p:]
    assert torch.equal(batch.loss_mask[:, p:], response_mask.bool())
    # Response masks are prefixes (1..1 0..0), every response has >= 1 token, none is all pad.
    assert (response_mask[:, 1:] <= response_mask[:, :-1]).all()
    assert (response_mask[:, 0] == 1).all()
    assert response_mask.sum(-1).max() == response_mask.shape[1]


# --------------------------------------------------------------------------------------------
# Scripted-model tests
# --------------------------------------------------------------------------------------------


def test_pad_equals_eos_cuts_after_first_eos_and_ignores_prompt_padding():
    eos = pad = 2
    # Prompts are ragged; the left padding is the EOS id and one prompt contains EOS itself.
    prompts = [[5, 6, 7], [8], [2, 9]]
    script = [[5, 6, 2, 7], [7, 2, 7, 7], [8, 9, 10, 11]]
    batch, _, ids, mask = run_scripted(prompts, script, eos=eos, pad=pad, max_new_tokens=6)

    assert batch.prompt_length == 3
    assert torch.equal(batch.input_ids[:, :3], ids)
    expected_response = torch.tensor(
        [[5, 6, 2, 2, 2, 2], [7, 2, 2, 2, 2, 2], [8, 9, 10, 11, 11, 11]]
    )
    expected_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert torch.equal(batch.input_ids[:, 3:], expected_response)
    assert torch.equal(batch.attention_mask[:, 3:], expected_mask)
    assert torch.equal(batch.attention_mask[:, :3], torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]]))
    assert batch.num_loss_tokens == 3 + 2 + 6
    check_invariants(batch, mask)


def test_several_eos_ids_first_of_any_ends_the_response():
    prompts = [[5, 5], [6, 6]]
    script = [[7, 3, 2, 7], [7, 7, 2, 3]]
    batch, _, _, mask = run_scripted(prompts, script, eos=[2, 3], pad=0, max_new_tokens=8)
    assert torch.equal(batch.input_ids[:, 2:], torch.tensor([[7, 3, 0], [7, 7, 2]]))
    assert torch.equal(batch.attention_mask[:, 2:], torch.tensor([[1, 1, 0], [1, 1, 1]]))
    check_invariants(batch, mask)


def test_no_eos_keeps_every_generated_token():
    batch, model, _, mask = run_scripted(
        [[4, 5], [6]], [[7, 8, 9], [9, 8, 7]], eos=2, pad=0, max_new_tokens=5
    )
    assert batch.input_ids.shape == (2, 2 + 5)
    assert torch.equal(batch.input_ids[:, 2:], torch.tensor([[7, 8, 9, 9, 9], [9, 8, 7, 7, 7]]))
    assert batch.loss_mask[:, 2:].all()
    assert len(model.seen) == 5  # one forward per new token (prefill included)
    check_invariants(batch, mask)


def test_first_token_eos_gives_a_length_one_response():
    batch, _, _, mask = run_scripted(
        [[4, 5], [6, 7]], [[2, 9], [9, 9, 2]], eos=2, pad=2, max_new_tokens=6
    )
    assert torch.equal(batch.input_ids[:, 2:], torch.tensor([[2, 2, 2], [9, 9, 2]]))
    assert torch.equal(batch.loss_mask[0], torch.tensor([False, False, True, False, False]))
    check_invariants(batch, mask)


def test_all_rows_finishing_early_stops_generation_and_trims_the_width():
    batch, model, _, mask = run_scripted(
        [[4], [5, 6]], [[9, 2], [9, 9, 2]], eos=2, pad=0, max_new_tokens=50
    )
    assert batch.input_ids.shape == (2, 2 + 3)
    assert len(model.seen) == 3  # generate stopped once every row had its EOS
    check_invariants(batch, mask)

    # All responses are a lone EOS: width 1.
    batch, model, _, mask = run_scripted([[4], [5]], [[2], [2]], eos=2, pad=2, max_new_tokens=50)
    assert batch.input_ids.shape == (2, 1 + 1)
    assert batch.loss_mask[:, 1].all()
    check_invariants(batch, mask)


def test_prompt_containing_eos_is_not_mistaken_for_a_response_end():
    # Real prompt tokens equal to EOS (e.g. a chat template's end-of-turn) are prompt, not response.
    batch, _, _, mask = run_scripted([[2, 5, 2]], [[7, 8, 2]], eos=2, pad=0, max_new_tokens=6)
    assert torch.equal(batch.input_ids, torch.tensor([[2, 5, 2, 7, 8, 2]]))
    assert batch.loss_mask.tolist() == [[False] * 3 + [True] * 3]
    check_invariants(batch, mask)


def test_eval_mode_and_no_grad_during_generation_and_train_mode_restored():
    ids, mask = prompt_batch_from_ids([[4, 5]], 0)
    model = ScriptedLM([[2]])
    model.train()
    frozen = torch.nn.Linear(1, 1).eval()  # a submodule kept in eval mode on purpose
    model.frozen = frozen
    sample_responses(model, ids, mask, eos_token_ids=2, pad_token_id=0, config=SamplingConfig())
    assert model.seen and all(not training and not grad for training, grad in model.seen)
    assert model.training and not frozen.training


def test_model_generation_config_cannot_leak_into_sampling():
    ids, mask = prompt_batch_from_ids([[4, 5], [6, 7]], 0)
    model = ScriptedLM([[9, 2], [2]])
    own = model.generation_config
    # Each of these would change the scripted output if generate picked it up.
    own.suppress_tokens = [2]
    own.min_new_tokens = 4
    own.top_k = 1
    own.max_length = 3
    own.repetition_penalty = 5.0
    batch = sample_responses(
        model, ids, mask, eos_token_ids=2, pad_token_id=0, config=SamplingConfig(max_new_tokens=8)
    )
    assert torch.equal(batch.input_ids[:, 2:], torch.tensor([[9, 2], [2, 0]]))
    assert model.generation_config is own and own.suppress_tokens == [2]  # restored untouched


def test_every_sampling_setting_is_passed_to_generate(monkeypatch):
    ids, mask = prompt_batch_from_ids([[4, 5]], 0)
    model = ScriptedLM([[2]])
    captured = {}
    real_generate = model.generate

    def spy(*args, **kwargs):
        captured.update(kwargs)
        captured["model_defaults"] = model.generation_config.to_diff_dict()
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    config = SamplingConfig(
        max_new_tokens=7, temperature=0.7, top_k=0, top_p=0.9, no_repeat_ngram_size=3
    )
    sample_responses(model, ids, mask, eos_token_ids=[2, 3], pad_token_id=0, config=config)
    gc = captured["generation_config"]
    assert isinstance(gc, GenerationConfig)
    assert (gc.do_sample, gc.temperature, gc.top_k, gc.top_p) == (True, 0.7, 0, 0.9)
    assert (gc.max_new_tokens, gc.no_repeat_ngram_size, gc.use_cache) == (7, 3, True)
    assert (gc.eos_token_id, gc.pad_token_id, gc.num_beams) == ([2, 3], 0, 1)
    assert torch.equal(captured["attention_mask"], mask)
    # During the call the model's own defaults are blank (only bookkeeping keys remain).
    assert set(captured["model_defaults"]) <= {"transformers_version"}


def test_greedy_decoding_with_do_sample_false():
    batch, _, _, _ = run_scripted([[4]], [[9, 8, 2]], eos=2, pad=0, do_sample=False)
    assert batch.input_ids.tolist() == [[4, 9, 8, 2]]


@pytest.mark.parametrize(
    "ids, mask",
    [
        ([[4, 5, 0]], [[1, 1, 0]]),  # right padded
        ([[0, 0]], [[0, 0]]),  # empty prompt
        ([[4, 0, 5]], [[1, 0, 1]]),  # hole in the middle
    ],
)
def test_prompts_must_be_left_padded_and_non_empty(ids, mask):
    model = ScriptedLM([[2]])
    with pytest.raises(UserError, match="LEFT-padded"):
        sample_responses(
            model,
            torch.tensor(ids),
            torch.tensor(mask),
            eos_token_ids=2,
            pad_token_id=0,
            config=SamplingConfig(),
        )


@pytest.mark.parametrize("eos", [[], [-1], ["2"], None])
def test_bad_eos_ids_are_user_errors(eos):
    ids, mask = prompt_batch_from_ids([[4]], 0)
    with pytest.raises(UserError, match="eos_token_ids"):
        sample_responses(
            ScriptedLM([[2]]),
            ids,
            mask,
            eos_token_ids=eos,
            pad_token_id=0,
            config=SamplingConfig(),
        )


@pytest.mark.parametrize("pad", [None, -1])
def test_bad_pad_id_is_a_user_error(pad):
    ids, mask = prompt_batch_from_ids([[4]], 0)
    with pytest.raises(UserError, match="pad_token_id"):
        sample_responses(
            ScriptedLM([[2]]), ids, mask, eos_token_ids=2, pad_token_id=pad, config=SamplingConfig()
        )


# --------------------------------------------------------------------------------------------
# SamplingConfig and prompt_batch_from_ids
# --------------------------------------------------------------------------------------------


def test_sampling_config_defaults_match_the_paper():
    c = SamplingConfig()
    assert (c.max_new_tokens, c.temperature, c.top_k, c.top_p) == (256, 1.0, 0, 1.0)
    assert (c.no_repeat_ngram_size, c.do_sample) == (0, True)


@pytest.mark.parametrize(
    "field_name, value, valid_range",
    [
        ("max_new_tokens", 0, "must be >= 1"),
        ("max_new_tokens", 2.5, "expected int"),
        ("temperature", 0.0, "must be > 0.0; for greedy decoding set sampling.do_sample false"),
        ("temperature", float("nan"), "must be a finite number"),
        ("top_k", -1, "must be >= 0"),
        ("top_k", True, "expected int"),
        ("top_p", 0.0, "must be > 0.0 and <= 1.0"),
        ("top_p", 1.5, "must be > 0.0 and <= 1.0"),
        ("no_repeat_ngram_size", -2, "must be >= 0"),
        ("do_sample", "yes", "expected bool"),
        ("eos_at_cap", 1, "expected bool | None"),
    ],
)
def test_sampling_config_range_errors_name_field_value_and_range(field_name, value, valid_range):
    """Built in Python, the record is checked by the same validator as a config file."""
    with pytest.raises(UserError) as info:
        SamplingConfig(**{field_name: value})
    assert str(info.value).endswith(f"'sampling.{field_name}' = {value!r}: {valid_range}")


def test_sampling_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        SamplingConfig(max_new_tokens=0, top_p=2.0)
    assert len(info.value.problems) == 2


def test_greedy_config_warns_about_ignored_sampling_knobs():
    with pytest.warns(UserWarning, match="ignores temperature=0.5"):
        SamplingConfig(do_sample=False, temperature=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SamplingConfig(do_sample=False)


def test_prompt_batch_from_ids_left_pads():
    ids, mask = prompt_batch_from_ids([[1, 2, 3], [4], (5, 6)], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(UserError, match=r"index \[1\]"):
        prompt_batch_from_ids([[1], []], pad_token_id=0)
    with pytest.raises(UserError, match="no prompts"):
        prompt_batch_from_ids([], pad_token_id=0)


# --------------------------------------------------------------------------------------------
# mask_after_first_eos: property tests against a per-row reference
# --------------------------------------------------------------------------------------------


def reference_mask_after_first_eos(rows, eos_ids, pad):
    out_ids, out_mask = [], []
    for row in rows:
        ids, mask, ended = [], [], False
        for token in row:
            ids.append(pad if ended else token)
            mask.append(0 if ended else 1)
            ended = ended or token in eos_ids
        out_ids.append(ids)
        out_mask.append(mask)
    return out_ids, out_mask


@st.composite
def responses(draw):
    vocab = draw(st.integers(2, 8))
    batch = draw(st.integers(1, 5))
    length = draw(st.integers(0, 12))
    eos_ids = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=3, unique=True))
    pad = draw(st.one_of(st.sampled_from(eos_ids), st.integers(0, vocab - 1)))
    token = st.integers(0, vocab - 1)
    rows = draw(
        st.lists(st.lists(token, min_size=length, max_size=length), min_size=batch, max_size=batch)
    )
    return rows, eos_ids, pad, length


@settings(max_examples=300, deadline=None)
@given(responses())
def test_mask_after_first_eos_matches_reference(case):
    rows, eos_ids, pad, length = case
    response = torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)
    eos_arg = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    ids, mask = mask_after_first_eos(response, eos_arg, pad)
    ref_ids, ref_mask = reference_mask_after_first_eos(rows, set(eos_ids), pad)
    assert ids.tolist() == ref_ids and mask.tolist() == ref_mask
    assert mask.dtype == torch.long and ids.shape == response.shape

    is_eos = torch.isin(response, torch.tensor(eos_ids))  # (B, L)
    # First EOS index, or L when there is none (a sentinel column keeps argmax defined at L=0).
    first = torch.cat([is_eos, torch.ones(len(rows), 1, dtype=torch.bool)], 1).long().argmax(-1)
    expected_len = (first + 1).clamp(max=length)
    assert torch.equal(mask.sum(-1), expected_len)  # covers exactly up to and incl. first EOS
    kept = mask.bool()
    assert torch.equal(ids[kept], response[kept])  # kept tokens untouched
    assert (ids[~kept] == pad).all()  # everything after is pad
    assert (is_eos & kept).sum(-1).le(1).all()  # at most one EOS counts per row
    assert torch.equal(mask_after_first_eos(ids, eos_arg, pad)[0], ids)  # idempotent


# --------------------------------------------------------------------------------------------
# Smoke tests with a real tiny Llama (random weights)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def llama_prompts(tokenizer):
    texts = ["Say hello.", "Add 2 and 3, please.", "Hi"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return prompt_batch_from_ids(ids, tokenizer.pad_token_id)


def llama_sample(model, tokenizer, ids, mask, seed=None, eos=None, **kwargs):
    return sample_responses(
        model,
        ids,
        mask,
        eos_token_ids=tokenizer.eos_token_id if eos is None else eos,
        pad_token_id=tokenizer.pad_token_id,
        config=SamplingConfig(**{"max_new_tokens": 8, **kwargs}),
        generator_seed=seed,
    )


def test_llama_shapes_masks_and_seeded_reproducibility(student_model, tokenizer, llama_prompts):
    ids, mask = llama_prompts
    a = llama_sample(student_model, tokenizer, ids, mask, seed=123)
    check_invariants(a, mask)
    assert a.input_ids.shape[0] == 3 and a.prompt_length == ids.shape[1]
    assert a.input_ids.shape[1] <= ids.shape[1] + 8
    assert torch.equal(a.input_ids[:, : ids.shape[1]], ids)

    state = torch.get_rng_state()
    b = llama_sample(student_model, tokenizer, ids, mask, seed=123)
    assert torch.equal(torch.get_rng_state(), state)  # generator_seed leaves the global RNG alone
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    c = llama_sample(student_model, tokenizer, ids, mask, seed=124)
    assert not torch.equal(a.input_ids, c.input_ids)

    # Without generator_seed the global RNG drives sampling (reproducible under torch.manual_seed).
    torch.manual_seed(7)
    d = llama_sample(student_model, tokenizer, ids, mask)
    torch.manual_seed(7)
    e = llama_sample(student_model, tokenizer, ids, mask)
    assert torch.equal(d.input_ids, e.input_ids)


def test_llama_with_many_eos_ids_cuts_real_generations(student_model, tokenizer, llama_prompts):
    ids, mask = llama_prompts
    eos = list(range(0, 259, 2))  # half the vocabulary ends a response: EOS comes early
    batch = llama_sample(student_model, tokenizer, ids, mask, seed=0, eos=eos, max_new_tokens=16)
    check_invariants(batch, mask)
    response = batch.input_ids[:, batch.prompt_length :]
    kept = batch.attention_mask[:, batch.prompt_length :].bool()
    is_eos = torch.isin(response, torch.tensor(eos))
    lengths = kept.sum(-1)
    last = response.gather(1, (lengths - 1)[:, None])[:, 0]
    ended = torch.isin(last, torch.tensor(eos))
    assert ended.any()
    assert ((is_eos & kept).sum(-1) == ended.long()).all()  # only the final kept token is EOS
    assert (response[~kept] == tokenizer.pad_token_id).all()


def test_llama_model_top_k_default_does_not_make_sampling_greedy(
    student_model, tokenizer, llama_prompts
):
    ids, mask = llama_prompts
    student_model.generation_config.top_k = 1  # would be greedy if it leaked into sampling
    student_model.generation_config.do_sample = True
    samples = [
        llama_sample(student_model, tokenizer, ids, mask, seed=s).input_ids for s in range(3)
    ]
    assert not all(torch.equal(samples[0], s) for s in samples[1:])
    assert student_model.generation_config.top_k == 1


def test_llama_temperature_is_applied(student_model, tokenizer, llama_prompts):
    ids, mask = llama_prompts
    greedy = llama_sample(student_model, tokenizer, ids, mask, do_sample=False)
    cold = llama_sample(student_model, tokenizer, ids, mask, seed=1, temperature=1e-6)
    hot = llama_sample(student_model, tokenizer, ids, mask, seed=1, temperature=1.0)
    assert torch.equal(cold.input_ids, greedy.input_ids)
    assert not torch.equal(hot.input_ids, greedy.input_ids)


def test_llama_left_padding_matches_unpadded_generation(tokenizer):
    # Position ids come from the attention mask, so a left-padded row decodes like the same
    # prompt alone with no padding.
    model = tiny_llama(num_layers=2, seed=3)
    prompts = [[10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32]]
    ids, mask = prompt_batch_from_ids(prompts, tokenizer.pad_token_id)
    batch = llama_sample(model, tokenizer, ids, mask, do_sample=False)
    assert torch.equal(batch.position_ids[1, 4:6], torch.tensor([0, 1]))
    assert torch.equal(batch.position_ids, position_ids_from_mask(batch.attention_mask))
    for row, prompt in enumerate(prompts):
        one = torch.tensor([prompt])
        alone = llama_sample(model, tokenizer, one, torch.ones_like(one), do_sample=False)
        n = alone.input_ids.shape[1] - len(prompt)
        response = batch.input_ids[row, batch.prompt_length :]
        assert torch.equal(response[:n], alone.input_ids[0, len(prompt) :])


# --------------------------------------------------------------------------------------------
# sample_responses end to end: property test with the scripted model
# --------------------------------------------------------------------------------------------


@st.composite
def scripted_cases(draw):
    vocab = 16
    batch = draw(st.integers(1, 4))
    max_new = draw(st.integers(1, 7))
    eos_ids = draw(st.lists(st.integers(1, vocab - 1), min_size=1, max_size=2, unique=True))
    pad = draw(st.one_of(st.sampled_from(eos_ids), st.integers(0, vocab - 1)))
    token = st.integers(0, vocab - 1)  # prompts and responses may contain EOS and pad ids
    prompts = draw(st.lists(st.lists(token, min_size=1, max_size=5), min_size=batch, max_size=batch))
    script = draw(
        st.lists(st.lists(token, min_size=max_new, max_size=max_new), min_size=batch, max_size=batch)
    )
    return prompts, script, eos_ids, pad, max_new


@settings(max_examples=40, deadline=None)
@given(scripted_cases())
def test_sampled_loss_mask_is_exactly_the_response_up_to_the_first_eos(case):
    """For random prompt lengths (left padding), EOS positions (or none), several EOS ids and a
    pad id equal to an EOS or not: the loss mask covers exactly the generated tokens up to and
    including the first EOS, never a prompt or pad column; the width is the longest response."""
    prompts, script, eos_ids, pad, max_new = case
    batch, _, ids, mask = run_scripted(prompts, script, eos=eos_ids, pad=pad, max_new_tokens=max_new)
    check_invariants(batch, mask)
    P = max(len(p) for p in prompts)
    lengths = [next((t + 1 for t, tok in enumerate(row) if tok in eos_ids), max_new) for row in script]
    assert batch.prompt_length == P and batch.input_ids.shape == (len(prompts), P + max(lengths))
    assert torch.equal(batch.input_ids[:, :P], ids)
    for b, (row, n) in enumerate(zip(script, lengths, strict=True)):
        response_ids = batch.input_ids[b, P:].tolist()
        assert batch.loss_mask[b].tolist() == [False] * P + [True] * n + [False] * (max(lengths) - n)
        assert response_ids[:n] == row[:n]
        assert response_ids[n:] == [pad] * (max(lengths) - n)
        assert sum(tok in eos_ids for tok in response_ids[:n]) == (1 if row[n - 1] in eos_ids else 0)


def test_response_logits_equal_slicing_the_full_output():
    model = tiny_llama(num_layers=2, seed=5).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (3, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding of the prompt (P = 4)
    attn[2, 7:] = 0  # right padding of the response
    batch = SequenceBatch(input_ids=ids, attention_mask=attn, loss_mask=attn.bool() & (torch.arange(9) >= 4),
                          prompt_length=4)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn, position_ids=batch.position_ids).logits
        got = response_logits(model, batch, vocab_size=250)
    assert got.shape == (3, 5, 250)  # T - P positions, aligned with loss_mask[:, P:]
    torch.testing.assert_close(got, full[:, 3:-1, :250], rtol=1e-5, atol=1e-6)
