"""promptkd.head_losses: divergences from hidden states + LM heads, chunk by chunk.

Every equality test builds tiny randomly initialised causal LMs in float64 (Llama, Qwen2 tied
and untied, GPT-2; Gemma 2 for soft-capping, Cohere for logit_scale) and compares the chunked
path (hidden states -> head_divergence) with the unchunked one (response logits ->
promptkd.losses), values and gradients: the student's parameters (its tied embedding / head
included) and the soft prompt of a PromptedTeacher, whose gradient reaches it through the
teacher's hidden states.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from promptkd.data.batch import SequenceBatch
from promptkd.errors import UserError
from promptkd.head_losses import (
    CrossEntropyTerm,
    HeadTerm,
    LMHead,
    head_cross_entropy,
    head_divergence,
    head_divergences,
    hidden_states_for_response,
    lm_head_of,
)
from promptkd.losses import DIVERGENCES
from promptkd.models import PromptedTeacher
from promptkd.sampling import response_logits
from promptkd.testing import tiny_llama

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
]

V = 259  # the byte tokenizer's vocabulary
CHUNK = 3
DIVERGENCE_CASES = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("generalized_jsd", {"beta": 0.3}),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Tiny models and a batch.
# ---------------------------------------------------------------------------------------------


def _qwen2(seed, *, tied, vocab=V, layers=2, hidden=32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def _gpt2(seed, *, layers=2, hidden=32):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=V, n_positions=64, n_embd=hidden, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def _gemma2(seed, *, softcap=2.0, hidden=32):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, max_position_embeddings=128, final_logit_softcapping=softcap,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(config)


def _cohere(seed, *, hidden=32):
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, logit_scale=0.25, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return CohereForCausalLM(config)


# (student, teacher) factories per architecture; the teacher is deeper and (mostly) wider
PAIRS = {
    "llama": lambda: (tiny_llama(num_layers=2, seed=1),
                      tiny_llama(num_layers=3, hidden_size=48, seed=2)),
    "qwen2_tied": lambda: (_qwen2(1, tied=True), _qwen2(2, tied=True, layers=3, hidden=48)),
    "qwen2_untied": lambda: (_qwen2(1, tied=False), _qwen2(2, tied=False, layers=3)),
    "gpt2": lambda: (_gpt2(1), _gpt2(2, layers=3, hidden=48)),
}


def _batch(left_pad: bool = True) -> SequenceBatch:
    """2 rows, prompts left-padded to P = 3, responses right-padded, a hole in the loss mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (2, 11), generator=g)
    attention = torch.ones_like(ids)
    if left_pad:
        attention[1, :2] = 0  # row 1: a 1-token prompt
        ids[1, :2] = 0
    attention[0, 9:] = 0  # row 0: a 6-token response
    ids[0, 9:] = 0
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[0, 3:9] = True
    loss_mask[1, 3:] = True
    loss_mask[1, 5] = False  # a hole
    return SequenceBatch(ids, attention, loss_mask, prompt_length=3)


def _setup(pair: str):
    student, teacher = PAIRS[pair]()
    student = student.double().train(False)
    prompted = PromptedTeacher(teacher.double(), None, num_virtual_tokens=3, init="random")
    prompt = prompted.prompt_parameters()[0]
    with torch.no_grad():  # PEFT's random init is tiny; make the prompt matter
        prompt.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    return student, prompted, prompt


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_close(got, ref, what, rtol=1e-9, atol=1e-11):
    assert got is not None and ref is not None, what
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=what)


# ---------------------------------------------------------------------------------------------
# Equality with the unchunked path: values and gradients, student and prompt.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("name,params", DIVERGENCE_CASES, ids=[c[0] for c in DIVERGENCE_CASES])
def test_equals_unchunked_values_and_gradients(pair, name, params):
    student, prompted, prompt = _setup(pair)
    batch = _batch()
    mask = batch.loss_mask[:, batch.prompt_length:]
    keep = batch.input_ids.shape[1] - batch.prompt_length + 1
    trainable = [p for p in student.parameters() if p.requires_grad]
    params_all = trainable + [prompt]

    s_logits = response_logits(student, batch, V)  # (B, R, V)
    t_logits = prompted(batch.input_ids, batch.attention_mask, logits_to_keep=keep)[:, :-1, :V]
    ref = DIVERGENCES[name](s_logits, t_logits, mask, reduction="sum", **params)
    ref_grads = _grads(ref, params_all)

    h = hidden_states_for_response(student, batch)  # (B, R, H)
    th = hidden_states_for_response(prompted, batch)  # (B, R, H_t)
    assert h.shape[:2] == th.shape[:2] == mask.shape
    head, t_head = lm_head_of(student, V), lm_head_of(prompted, V)
    got = head_divergence(name, h, head, th, t_head, mask, chunk_size=CHUNK, reduction="sum",
                          **params)
    got_grads = _grads(got, params_all)

    assert got.dtype == torch.float64
    _assert_close(got, ref, "value")
    names = [n for n, p in student.named_parameters() if p.requires_grad] + ["prompt"]
    for n, g, r in zip(names, got_grads, ref_grads, strict=True):
        if r is None:
            assert g is None or not g.any(), n
            continue
        # the prompt is float32 (cast to the float64 teacher per forward)
        tol = {"rtol": 1e-6, "atol": 1e-9} if n == "prompt" else {}
        _assert_close(g, r, f"grad of {n}", **tol)
    assert got_grads[-1].abs().sum() > 0  # the prompt did get a gradient
    head_grad = got_grads[[p is head.weight for p in params_all].index(True)]
    assert head_grad.abs().sum() > 0  # and the student's head (the embedding when tied)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mean_and_none_reductions(reduction):
    student, prompted, prompt = _setup("qwen2_untied")
    batch = _batch()
    mask = batch.loss_mask[:, batch.prompt_length:]
    params_all = list(student.parameters()) + [prompt]
    keep = batch.input_ids.shape[1] - batch.prompt_length + 1
    s_logits = response_logits(student, batch, V)
    t_logits = prompted(batch.input_ids, batch.attention_mask, logits_to_keep=keep)[:, :-1, :V]
    ref = DIVERGENCES["reverse_kl"](s_logits, t_logits, mask, reduction=reduction)
    weights = torch.linspace(0.5, 2.0, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
    ref_grads = _grads((ref * weights).sum(), params_all)
    h, th = hidden_states_for_response(student, batch), hidden_states_for_response(prompted, batch)
    got = head_divergence("reverse_kl", h, lm_head_of(student, V), th, lm_head_of(prompted, V),
                          mask, chunk_size=2, reduction=reduction)
    _assert_close(got, ref, "values")
    for g, r in zip(_grads((got * weights).sum(), params_all), ref_grads, strict=True):
        if r is not None:
            _assert_close(g, r, "grad", rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("pair", ["llama", "gpt2"])
def test_prompt_loss_terms_in_one_pass(pair):
    """PromptKD's prompt loss L_kd + lambda L_reg (plus a logged distance, weight 0) from one
    head_divergences call: the prompted teacher's logits once per chunk; the student, the
    target of L_kd, gets no gradient through its detached head."""
    student, prompted, prompt = _setup(pair)
    batch = _batch()
    mask = batch.loss_mask[:, batch.prompt_length:]
    keep = batch.input_ids.shape[1] - batch.prompt_length + 1
    lam = 0.3
    with torch.no_grad():
        s_logits = response_logits(student, batch, V)
        base = prompted.forward_base(batch.input_ids, batch.attention_mask,
                                     logits_to_keep=keep)[:, :-1, :V]
    tp = prompted(batch.input_ids, batch.attention_mask, logits_to_keep=keep)[:, :-1, :V]
    l_kd = DIVERGENCES["forward_kl"](tp, s_logits, mask, reduction="sum")
    l_reg = DIVERGENCES["reverse_kl"](tp, base, mask, reduction="sum")
    logged = DIVERGENCES["reverse_kl"](tp, s_logits, mask, reduction="sum")
    (ref_grad,) = _grads(l_kd + lam * l_reg, [prompt])

    s_head, t_head = lm_head_of(student, V), lm_head_of(prompted, V)
    h = hidden_states_for_response(student, batch)  # with grad, as in a shared student forward
    th = hidden_states_for_response(prompted, batch)
    with torch.no_grad():
        bh = hidden_states_for_response(prompted, batch, base=True)
    target_h, target_head = h.detach(), s_head.detached()
    loss, per_term = head_divergences(th, t_head, [
        HeadTerm("forward_kl", target_h, target_head),
        HeadTerm("reverse_kl", bh, t_head, weight=lam),
        HeadTerm("reverse_kl", target_h, target_head, weight=0.0),
    ], mask, chunk_size=CHUNK)
    assert per_term.shape == (3,) and not per_term.requires_grad
    _assert_close(per_term, torch.stack([l_kd, l_reg, logged]).detach(), "terms")
    _assert_close(loss, l_kd + lam * l_reg, "loss")
    got_grad, student_grad = _grads(loss, [prompt, s_head.weight])
    _assert_close(got_grad, ref_grad, "prompt grad", rtol=1e-6, atol=1e-9)
    assert student_grad is None  # the detached student head is no part of the graph


def test_padded_vocabulary_rows_are_cut():
    """A head with more rows than the shared vocabulary (Qwen2.5's 151,936 vs its tokenizer):
    only the first V columns are compared; the padded rows get exactly zero gradient."""
    student = _qwen2(1, tied=False, vocab=V + 5).double()
    teacher = _qwen2(2, tied=True, vocab=V + 2).double()
    batch = _batch()
    mask = batch.loss_mask[:, batch.prompt_length:]
    s_logits = response_logits(student, batch, V)
    with torch.no_grad():
        t_logits = response_logits(teacher, batch, V)
    ref = DIVERGENCES["reverse_kl"](s_logits, t_logits, mask, reduction="sum")
    ref_grads = _grads(ref, list(student.parameters()))
    head = lm_head_of(student, V)
    assert head.weight.shape[0] == V + 5 and head.vocab_size == V
    h = hidden_states_for_response(student, batch)
    with torch.no_grad():
        th = hidden_states_for_response(teacher, batch)
    got = head_divergence("reverse_kl", h, head, th, lm_head_of(teacher, V), mask, chunk_size=4)
    _assert_close(got, ref, "value")
    got_grads = _grads(got, list(student.parameters()))
    for g, r in zip(got_grads, ref_grads, strict=True):
        _assert_close(g, r, "grad")
    head_grad = got_grads[[p is head.weight for p in student.parameters()].index(True)]
    assert head_grad.shape == (V + 5, 32) and not head_grad[V:].any() and head_grad[:V].any()


@pytest.mark.parametrize("arch", ["gemma2", "cohere"])
def test_soft_capping_and_logit_scale(arch):
    """Gemma 2's final_logit_softcapping and Cohere's logit_scale are read from the config and
    applied (values and gradients through the transform)."""
    make = _gemma2 if arch == "gemma2" else _cohere
    student, teacher = make(1).double().eval(), make(2).double().eval()
    head = lm_head_of(student, V)
    assert (head.softcap, head.scale) == ((2.0, None) if arch == "gemma2" else (None, 0.25))
    # Gemma 2's eager attention gives NaN on left-padded rows (a fully masked pad query),
    # in its own logits too; no left padding here
    batch = _batch(left_pad=False)
    mask = batch.loss_mask[:, batch.prompt_length:]
    s_logits = response_logits(student, batch, V)
    if arch == "gemma2":
        assert s_logits.abs().max() < 2.0  # capped
    with torch.no_grad():
        t_logits = response_logits(teacher, batch, V)
    ref = DIVERGENCES["forward_kl"](s_logits, t_logits, mask, reduction="sum")
    h = hidden_states_for_response(student, batch)
    torch.testing.assert_close(head.logits(h), s_logits, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        th = hidden_states_for_response(teacher, batch)
    got = head_divergence("forward_kl", h, head, th, lm_head_of(teacher, V), mask, chunk_size=CHUNK)
    _assert_close(got, ref, "value")
    params = list(student.parameters())
    for g, r in zip(_grads(got, params), _grads(ref, params), strict=True):
        _assert_close(g, r, "grad")


def test_cross_entropy_equals_unchunked():
    student = _gpt2(1).double().eval()
    batch = _batch()
    mask = batch.loss_mask[:, batch.prompt_length:]
    targets = batch.input_ids[:, batch.prompt_length:]
    logits = response_logits(student, batch, V)
    ref = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    got = head_cross_entropy(hidden_states_for_response(student, batch), lm_head_of(student, V),
                             targets, mask, chunk_size=CHUNK)
    _assert_close(got, ref, "value")
    params = list(student.parameters())
    for g, r in zip(_grads(got, params), _grads(ref, params), strict=True):
        _assert_close(g, r, "grad")


@pytest.mark.parametrize("ce_weight", [0.5, 0.0])
def test_cross_entropy_term_shares_the_pass_with_a_divergence(ce_weight):
    """The supervised steps' (1 - r) CE + r KL in one head_divergences call (CE at weight 0,
    as GKD logs it, gives its value and no gradient)."""
    student, prompted, _ = _setup("qwen2_untied")
    teacher = prompted.teacher
    batch = _batch()
    mask = batch.loss_mask[:, batch.prompt_length:]
    targets = batch.input_ids[:, batch.prompt_length:]
    params = list(student.parameters())
    logits = response_logits(student, batch, V)
    with torch.no_grad():
        t_logits = response_logits(teacher, batch, V)
    ce = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    kd = DIVERGENCES["forward_kl"](logits, t_logits, mask, reduction="sum")
    ref_grads = _grads(ce_weight * ce + 0.5 * kd, params)
    h = hidden_states_for_response(student, batch)
    with torch.no_grad():
        th = hidden_states_for_response(teacher, batch)
    loss, per_term = head_divergences(h, lm_head_of(student, V), [
        CrossEntropyTerm(targets, ce_weight),
        HeadTerm("forward_kl", th, lm_head_of(teacher, V), 0.5),
    ], mask, chunk_size=CHUNK)
    _assert_close(per_term, torch.stack([ce, kd]).detach(), "terms")
    _assert_close(loss, ce_weight * ce + 0.5 * kd, "loss")
    for g, r in zip(_grads(loss, params), ref_grads, strict=True):
        _assert_close(g, r, "grad")


def test_base_teacher_hidden_states_match_forward_base():
    _, prompted, _ = _setup("llama")
    batch = _batch()
    keep = batch.input_ids.shape[1] - batch.prompt_length + 1
    base = prompted.forward_base(batch.input_ids, batch.attention_mask, logits_to_keep=keep)
    h = hidden_states_for_response(prompted, batch, base=True)
    assert not h.requires_grad  # forward_base runs under no_grad
    torch.testing.assert_close(lm_head_of(prompted, V).logits(h), base[:, :-1, :V],
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Memory: no logits tensor larger than a chunk, in any pass.
# ---------------------------------------------------------------------------------------------


class LargestLogits(TorchDispatchMode):
    """Records the shapes of every op output with a vocabulary-sized dim and more than
    `limit` rows of it (hidden-size dims excepted: the head weight and its gradient)."""

    def __init__(self, vocab_sizes, hidden_sizes, limit):
        super().__init__()
        self.vocab_sizes, self.hidden_sizes, self.limit = set(vocab_sizes), set(hidden_sizes), limit
        self.offenders = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                shape = tuple(t.shape)
                if (
                    self.vocab_sizes & set(shape)
                    and not self.hidden_sizes & set(shape)
                    and t.numel() > self.limit * max(self.vocab_sizes & set(shape))
                ):
                    self.offenders.append((str(func), shape))
        return out


def test_no_logits_tensor_beyond_a_chunk_in_any_pass():
    student, prompted, prompt = _setup("llama")
    batch = _batch()
    mask = batch.loss_mask[:, batch.prompt_length:]
    head, t_head = lm_head_of(student, V), lm_head_of(prompted, V)
    mode = LargestLogits({V}, {32, 48}, limit=CHUNK)
    with mode:
        h = hidden_states_for_response(student, batch)
        th = hidden_states_for_response(prompted, batch)
        loss = head_divergence("reverse_kl", h, head, th, t_head, mask, chunk_size=CHUNK)
        loss.backward()
    assert mode.offenders == []
    assert prompt.grad is not None and head.weight.grad is not None
    # the check itself sees full logits when they are made
    mode = LargestLogits({V}, {32, 48}, limit=CHUNK)
    with mode, torch.no_grad():
        response_logits(student, batch, V)
    assert mode.offenders


# ---------------------------------------------------------------------------------------------
# Heads that cannot be chunked, and misuse.
# ---------------------------------------------------------------------------------------------


def test_peft_wrapped_lm_head_is_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(num_layers=1, seed=0),
                           LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(UserError, match=r"(?s)PEFT.*lm_head.*train\.chunked_lm_head false"):
        lm_head_of(model, V)


def test_lora_elsewhere_is_fine():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(num_layers=1, seed=0),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    head = lm_head_of(model, V)
    assert head.weight is model.get_base_model().lm_head.weight
    batch = _batch()
    with torch.no_grad():
        h = hidden_states_for_response(model, batch)  # through PeftModel.forward
        torch.testing.assert_close(head.logits(h), response_logits(model, batch, V))


def test_unknown_head_module_or_transform_is_refused():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = tiny_llama(num_layers=1, seed=0)
    old = model.lm_head
    model.lm_head = Scaled(old.in_features, old.out_features, bias=False)
    with pytest.raises(UserError, match=r"not a plain torch\.nn\.Linear.*chunked_lm_head false"):
        lm_head_of(model, V)
    # a config transform the architecture does not apply: caught by the check forward
    model = tiny_llama(num_layers=1, seed=0)
    model.config.logit_scale = 0.5
    with pytest.raises(UserError, match="differ from weight @ h.*chunked_lm_head false"):
        lm_head_of(model, V)
    assert lm_head_of(model, V, check=False).scale == 0.5


def test_misuse_errors():
    student = tiny_llama(num_layers=1, seed=0)
    head = lm_head_of(student, V)
    h = torch.randn(2, 4, 32, requires_grad=True)
    with pytest.raises(UserError, match="vocabulary"):
        head_divergence("reverse_kl", h, head, h.detach(), LMHead(head.weight, None, V - 1))
    with pytest.raises(UserError, match="unknown divergence"):
        head_divergence("kl", h, head, h.detach(), head)
    with pytest.raises(UserError, match="does not take"):
        head_divergence("reverse_kl", h, head, h.detach(), head, beta=0.5)
    with pytest.raises(TypeError, match="bool"):
        head_divergence("reverse_kl", h, head, h.detach(), head, torch.ones(2, 4))
    with pytest.raises(ValueError, match="hidden size"):
        head_divergence("reverse_kl", h[..., :16], head, h.detach(), head)
    with pytest.raises(UserError, match="vocab_size"):
        LMHead(head.weight, None, V + 1)
    loss = head_divergence("reverse_kl", h, head.detached(), h.detach() * 2, head.detached())
    loss.backward(retain_graph=True)  # buffers kept: a second backward gives the same gradient
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_no_grad_and_empty_mask():
    student = tiny_llama(num_layers=1, seed=0)
    head = lm_head_of(student, V)
    h = torch.randn(2, 4, 32, requires_grad=True)
    with torch.no_grad():
        value = head_divergence("reverse_kl", h, head, h * 2, head, chunk_size=3)
    assert value.grad_fn is None and value > 0
    empty = torch.zeros(2, 4, dtype=torch.bool)
    loss = head_divergence("reverse_kl", h, head, h.detach() * 2, head, empty, reduction="mean")
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert not h.grad.any()


def test_bfloat16_close_to_unchunked():
    """bf16 models: the matmul in bf16 like the model's head, the divergence in float32."""
    student = tiny_llama(num_layers=2, seed=1).to(torch.bfloat16)
    teacher = tiny_llama(num_layers=2, seed=2).to(torch.bfloat16)
    batch = _batch()
    mask = batch.loss_mask[:, batch.prompt_length:]
    s_logits = response_logits(student, batch, V)
    with torch.no_grad():
        t_logits = response_logits(teacher, batch, V)
    ref = DIVERGENCES["reverse_kl"](s_logits, t_logits, mask, reduction="sum")
    h = hidden_states_for_response(student, batch)
    with torch.no_grad():
        th = hidden_states_for_response(teacher, batch)
    head = lm_head_of(student, V)
    got = head_divergence("reverse_kl", h, head, th, lm_head_of(teacher, V), mask, chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    (g,) = torch.autograd.grad(got, [head.weight])
    (r,) = torch.autograd.grad(ref, [head.weight])
    assert g.dtype == torch.bfloat16
    assert (g.float() - r.float()).norm() <= 0.02 * r.float().norm()


def test_autocast_runs_the_matmul_in_the_autocast_dtype():
    """Under autocast (as ctx.autocast() gives), the head matmul runs in bfloat16 like the
    model's own head; gradients reach the float32 parameters through the cast."""
    student = tiny_llama(num_layers=2, seed=1)
    teacher = tiny_llama(num_layers=2, seed=2)
    batch = _batch()
    mask = batch.loss_mask[:, batch.prompt_length:]
    head, t_head = lm_head_of(student, V), lm_head_of(teacher, V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_logits = response_logits(student, batch, V)
        with torch.no_grad():
            t_logits = response_logits(teacher, batch, V)
        ref = DIVERGENCES["reverse_kl"](s_logits, t_logits, mask, reduction="sum")
        h = hidden_states_for_response(student, batch)
        with torch.no_grad():
            th = hidden_states_for_response(teacher, batch)
        got = head_divergence("reverse_kl", h, head, th, t_head, mask, chunk_size=4)
    assert s_logits.dtype == torch.bfloat16  # (h is float32: the residual stream)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    (g,) = torch.autograd.grad(got, [head.weight])
    (r,) = torch.autograd.grad(ref, [head.weight])
    assert g.dtype == torch.float32
    assert (g - r).norm() <= 0.02 * r.norm()


def test_the_check_forward_leaves_the_random_streams_alone():
    model = tiny_llama(num_layers=1, seed=0)
    model.config.attention_dropout = 0.5
    model.train()  # dropout on: the check forward draws masks
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    lm_head_of(model, V)
    torch.testing.assert_close(torch.rand(4), expected)


def test_fused_divergences_give_the_same_result():
    """promptkd.losses' fused (torch.compile) row kernels, forced on for these tiny chunks:
    head_divergence calls the public losses, so it follows their process-wide switch."""
    from promptkd.losses import fused

    with fused(True, min_elements=0):
        test_equals_unchunked_values_and_gradients("llama", "reverse_kl", {})
