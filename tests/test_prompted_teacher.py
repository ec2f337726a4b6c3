"""PromptedTeacher: shapes, frozen teacher, prompt init, alignment, adapters, checkpointing."""

from __future__ import annotations

import pytest
import torch

from promptkd.data.batch import position_ids_from_mask
from promptkd.errors import UserError
from promptkd.models import PromptedTeacher, prompt_init_ids
from promptkd.testing import tiny_llama

PAD = 258
IDS = torch.tensor(
    [[10, 20, 30, 40, 50, 60, 70, 80, 90], [256, 72, 101, 108, 108, 111, 32, 33, 257]]
)
MASK = torch.ones_like(IDS)


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=259, n_positions=64, n_embd=32, n_layer=3, n_head=4)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def prompted(tokenizer):
    return PromptedTeacher(tiny_llama(num_layers=4, seed=0), tokenizer)


def test_output_shape_matches_input(prompted):
    out = prompted(IDS, MASK)
    assert out.shape == (2, 9, 259)
    assert prompted.forward_base(IDS, MASK).shape == (2, 9, 259)


def test_only_prompt_requires_grad(prompted):
    trainable = [p for p in prompted.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is prompted.prompt_parameters()[0]
    assert trainable[0].shape == (7, 32) and trainable[0].dtype == torch.float32
    assert not any(p.requires_grad for p in prompted.teacher.parameters())


def test_text_init_uses_tiled_or_cut_ids(tokenizer):
    assert prompt_init_ids(tokenizer, "ab", 7) == [64, 65] * 3 + [64]
    assert (
        prompt_init_ids(tokenizer, "Suppose you are a student.", 7)
        == tokenizer("Suppose")["input_ids"]
    )
    for text, expected_ids in (
        ("ab", [64, 65, 64, 65, 64, 65, 64]),
        ("Suppose you", tokenizer("Suppose")["input_ids"]),
    ):
        teacher = tiny_llama()
        prompted = PromptedTeacher(
            teacher, tokenizer, num_virtual_tokens=7, init="text", init_text=text
        )
        expected = teacher.get_input_embeddings().weight[torch.tensor(expected_ids)]
        assert torch.equal(prompted.prompt_parameters()[0], expected)


def test_pad_and_random_init(tokenizer):
    teacher = tiny_llama()
    with torch.no_grad():  # the tiny model zeroes the padding_idx row; make it distinctive
        teacher.get_input_embeddings().weight[PAD] = torch.arange(32.0)
    prompted = PromptedTeacher(teacher, tokenizer, num_virtual_tokens=3, init="pad")
    assert torch.equal(prompted.prompt_parameters()[0], torch.arange(32.0).expand(3, 32))
    text = PromptedTeacher(tiny_llama(), tokenizer, init="text").prompt_parameters()[0]
    random = PromptedTeacher(tiny_llama(), tokenizer, init="random").prompt_parameters()[0]
    assert random.shape == text.shape and not torch.equal(random, text)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"init": "vocab"}, "not one of"),
        ({"num_virtual_tokens": 0}, "positive integer"),
        ({"init_text": ""}, "no tokens"),
    ],
)
def test_invalid_arguments(tokenizer, kwargs, expected):
    with pytest.raises(UserError, match=expected):
        PromptedTeacher(tiny_llama(), tokenizer, **kwargs)


def test_forward_base_equals_base_model(prompted):
    teacher = tiny_llama(num_layers=4, seed=0)
    mask = MASK.clone()
    mask[1, :3] = 0
    ids = IDS.masked_fill(mask == 0, PAD)
    with torch.no_grad():
        expected = teacher(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
        plain = teacher(input_ids=IDS).logits
    assert torch.equal(prompted.forward_base(ids, mask), expected)
    assert torch.equal(prompted.forward_base(IDS, MASK), plain)


def test_forward_matches_peft_forward_on_unpadded_rows(prompted):
    with torch.no_grad():
        peft_logits = prompted.peft_model(
            input_ids=IDS, attention_mask=MASK
        ).logits  # (B, n + T, V)
        ours = prompted(IDS, MASK)
    assert peft_logits.shape[1] == 7 + 9
    torch.testing.assert_close(ours, peft_logits[:, 7:], rtol=0, atol=1e-6)
    assert not torch.allclose(
        ours, prompted.forward_base(IDS, MASK), atol=1e-3
    )  # the prompt matters


def test_left_padding_invariance(prompted):
    row = IDS[1:, 3:]  # (1, 6)
    padded = torch.cat([torch.full((1, 3), PAD), row], dim=1)  # (1, 9)
    ids = torch.cat([IDS[:1], padded])  # batch with a full row and a left-padded row
    mask = torch.cat([MASK[:1], torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])])
    with torch.no_grad():
        batched = prompted(ids, mask)
        alone = prompted(row, torch.ones_like(row))
        full_alone = prompted(IDS[:1], MASK[:1])
    torch.testing.assert_close(batched[1:, 3:], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[:1], full_alone, rtol=0, atol=1e-5)


def test_backward_reaches_only_the_prompt(prompted):
    teacher_before = {k: v.clone() for k, v in prompted.teacher.state_dict().items()}
    prompt_before = prompted.prompt_parameters()[0].detach().clone()
    optimizer = torch.optim.AdamW(prompted.prompt_parameters(), lr=1e-2, weight_decay=0.01)
    loss = prompted(IDS, MASK).float().log_softmax(-1)[..., 5].mean()
    loss.backward()
    grad = prompted.prompt_parameters()[0].grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in prompted.teacher.parameters())
    optimizer.step()
    assert not torch.equal(prompted.prompt_parameters()[0], prompt_before)
    assert all(torch.equal(v, teacher_before[k]) for k, v in prompted.teacher.state_dict().items())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")
def test_adapter_roundtrip_is_exact(tmp_path, tokenizer):
    from peft import PeftModel

    trained = PromptedTeacher(tiny_llama(seed=0), tokenizer)
    with torch.no_grad():
        trained.prompt_parameters()[0].add_(torch.randn(7, 32))
    with torch.no_grad():
        expected = trained(IDS, MASK)
    out = trained.save_adapter(tmp_path / "prompt")
    assert (out / "adapter_config.json").is_file()

    fresh = PromptedTeacher(tiny_llama(seed=0), tokenizer, init="random")
    param = fresh.prompt_parameters()[0]
    fresh.load_adapter(out)
    assert fresh.prompt_parameters()[0] is param  # restored in place
    assert torch.equal(param, trained.prompt_parameters()[0])
    with torch.no_grad():
        assert torch.equal(fresh(IDS, MASK), expected)

    peft_model = PeftModel.from_pretrained(tiny_llama(seed=0), str(out))
    loaded = peft_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(loaded, trained.prompt_parameters()[0])

    with pytest.raises(UserError, match="num_virtual_tokens=7"):
        PromptedTeacher(tiny_llama(), tokenizer, num_virtual_tokens=5).load_adapter(out)
    with pytest.raises(UserError, match="not a PEFT adapter"):
        fresh.load_adapter(tmp_path / "missing")


def test_prompt_state_dict_roundtrip(prompted, tokenizer):
    state = prompted.prompt_state_dict()
    other = PromptedTeacher(tiny_llama(), tokenizer, init="random")
    other.load_prompt_state_dict(state)
    assert torch.equal(other.prompt_parameters()[0], prompted.prompt_parameters()[0])
    with pytest.raises(UserError, match=r"\(5, 32\)"):
        other.load_prompt_state_dict({"prompt_embeddings": torch.zeros(5, 32)})


def test_bf16_teacher_keeps_float32_prompt(tokenizer):
    prompted = PromptedTeacher(tiny_llama().to(torch.bfloat16), tokenizer)
    prompt = prompted.prompt_parameters()[0]
    assert prompt.dtype == torch.float32
    out = prompted(IDS, MASK)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 9, 259)
    out.float().logsumexp(-1).mean().backward()
    assert prompt.grad.dtype == torch.float32 and prompt.grad.abs().sum() > 0


def _prompt_grad_and_calls(prompted, module):
    """Prompt grad of a fixed loss, and how many times `module` ran (forward + any recompute)."""
    calls = []
    forward = module.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counting_forward  # (module hooks do not fire on transformers' recompute)
    try:
        prompted(IDS, MASK).float().log_softmax(-1)[..., 7].mean().backward()
    finally:
        del module.forward
    return prompted.prompt_parameters()[0].grad.clone(), len(calls)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_same_prompt_grad(tokenizer, arch):
    build = (lambda: tiny_llama(seed=0)) if arch == "llama" else (lambda: tiny_gpt2(seed=0))
    plain = PromptedTeacher(build(), tokenizer)
    checkpointed = PromptedTeacher(build(), tokenizer, gradient_checkpointing=True)

    def mlp(p):
        return p.teacher.model.layers[0].mlp if arch == "llama" else p.teacher.transformer.h[0].mlp

    grad, calls = _prompt_grad_and_calls(plain, mlp(plain))
    grad_ckpt, calls_ckpt = _prompt_grad_and_calls(checkpointed, mlp(checkpointed))
    assert calls == 1 and calls_ckpt == 2  # the layer really was recomputed in backward
    assert grad.abs().sum() > 0
    # GPT-2 has dropout 0.1 in its config: equal grads also show dropout stayed off.
    torch.testing.assert_close(grad_ckpt, grad, rtol=1e-5, atol=1e-7)


def test_dropout_only_on_grad_forwards(tokenizer):
    prompted = PromptedTeacher(tiny_gpt2(), tokenizer, dropout=True)
    torch.manual_seed(0)
    a, b = prompted(IDS, MASK), prompted(IDS, MASK)
    assert not torch.equal(a, b)  # train mode: dropout on
    with torch.no_grad():
        assert torch.equal(prompted(IDS, MASK), prompted(IDS, MASK))  # targets: eval mode
    assert torch.equal(prompted.forward_base(IDS, MASK), prompted.forward_base(IDS, MASK))
    prompted.train()
    assert not prompted.teacher.training  # the wrapper's mode does not leak into the teacher


def test_gradient_checkpointing_refuses_layer_level_dropout(tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=259,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        pad_token_id=258,
    )
    with pytest.raises(UserError, match="dropout"):
        PromptedTeacher(OPTForCausalLM(config), tokenizer, gradient_checkpointing=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_to_keep_equals_slicing_the_full_output(tokenizer, arch):
    build = (lambda: tiny_llama(seed=0)) if arch == "llama" else (lambda: tiny_gpt2(seed=0))
    prompted = PromptedTeacher(build(), tokenizer)
    ids = IDS.clone()
    ids[1, :2] = PAD  # left padding on one row
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    weight = prompted.prompt_parameters()[0]

    full = prompted(ids, mask)  # (2, 9, V)
    full[:, -4:].float().log_softmax(-1)[..., 5].sum().backward()
    grad_full, weight.grad = weight.grad.clone(), None
    kept = prompted(ids, mask, logits_to_keep=4)  # (2, 4, V)
    kept.float().log_softmax(-1)[..., 5].sum().backward()
    assert kept.shape == (2, 4, 259)
    torch.testing.assert_close(kept, full[:, -4:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight.grad, grad_full, rtol=1e-5, atol=1e-7)

    base = prompted.forward_base(ids, mask)
    torch.testing.assert_close(prompted.forward_base(ids, mask, logits_to_keep=3), base[:, -3:])
    for k in (0, 9, 50):  # 0 and anything >= T mean every position
        assert prompted(ids, mask, logits_to_keep=k).shape == (2, 9, 259)
        assert prompted.forward_base(ids, mask, logits_to_keep=k).shape == (2, 9, 259)
    with pytest.raises(UserError, match="logits_to_keep"):
        prompted(ids, mask, logits_to_keep=-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_low_precision_linear_weights_are_exact_under_autocast(tokenizer, arch):
    """Holding a frozen teacher's linear weights in bf16 changes nothing under bf16 autocast."""
    from promptkd.models.loading import cast_frozen_linear_weights

    build = (lambda: tiny_llama(seed=1)) if arch == "llama" else (lambda: tiny_gpt2(seed=1))
    results = []
    for cast in (False, True):
        torch.manual_seed(0)
        p = PromptedTeacher(build(), tokenizer, num_virtual_tokens=3, init="random")
        if cast:
            n = cast_frozen_linear_weights(p.teacher, torch.bfloat16)
            assert n > 0
            emb = p.teacher.get_input_embeddings().weight
            assert emb.dtype == torch.float32  # tied LM head left alone (llama ties it)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = p(IDS, MASK)
            base = p.forward_base(IDS, MASK)
        logits.float().log_softmax(-1)[..., 7].sum().backward()
        results.append((logits.detach(), base.detach(), p.prompt_parameters()[0].grad.clone()))
    for a, b in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b)


def test_cast_frozen_linear_weights_refuses_trainable_weights():
    from promptkd.models.loading import cast_frozen_linear_weights

    with pytest.raises(ValueError, match="trainable"):
        cast_frozen_linear_weights(tiny_llama(num_layers=1), torch.bfloat16)
