"""promptkd.models.head and the losses on hidden states + LM heads, chunk by chunk.

    .venv/bin/python -m pytest -q tests/test_head.py

Every equality test builds tiny randomly initialised causal LMs in float64 (Llama, Qwen2 tied
and untied, GPT-2; Gemma 2 for soft-capping, Cohere for logit_scale) and compares
`promptkd.losses.loss_terms` on hidden states and LM heads, in chunks of CHUNK positions, with
plain autograd on the models' own (B, R, V) response logits, values and gradients: the student's
parameters (its tied embedding / head included) and the soft prompt of a PromptedTeacher, whose
gradient reaches it through the teacher's hidden states. The driver on logits is tested in
tests/test_losses.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from promptkd import losses
from promptkd.data.batch import SequenceBatch
from promptkd.errors import UserError
from promptkd.losses import CROSS_ENTROPY, DIVERGENCES, Outputs, divergence, loss_terms
from promptkd.methods.base import outputs_of
from promptkd.models import PromptedTeacher
from promptkd.models.head import LMHead, hidden_states_for_response, lm_head_of
from promptkd.sampling import response_logits
from promptkd.testing import tiny_llama

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
]

V = 259  # the byte tokenizer's vocabulary
CHUNK = 3  # positions per chunk in these tests (the batch has 13 response positions in the loss)
PARAMS = {"skew_forward_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.1}, "generalized_jsd": {"beta": 0.3},
          "alpha_beta_divergence": {"ab_alpha": 0.2, "ab_beta": 0.7}}
# float64 end to end: the chunked and unchunked sums differ only in summation order
F64 = {"rtol": 1e-10, "atol": 1e-12}




@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Chunks of CHUNK positions, so every test crosses chunk boundaries (and a ragged last chunk)."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", CHUNK * V)


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


def _mask(batch: SequenceBatch) -> torch.Tensor:
    return batch.loss_mask[:, batch.prompt_length:]  # (B, R)


def _keep(batch: SequenceBatch) -> int:
    return batch.input_ids.shape[1] - batch.prompt_length + 1


def _setup(pair: str):
    student, teacher = PAIRS[pair]()
    student = student.double().train(False)
    prompted = PromptedTeacher(teacher.double(), None, num_virtual_tokens=3, init="random")
    prompt = prompted.prompt_parameters()[0]
    with torch.no_grad():  # PEFT's random init is tiny; make the prompt matter
        prompt.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    return student, prompted, prompt


def _div(name: str):
    return divergence(name, **PARAMS.get(name, {}))


def _masked_sum(div, logits, target, mask) -> torch.Tensor:
    """The unchunked reference: the row function on every masked row of full logits, summed."""
    return div(logits[mask], target[mask]).sum()


def _both_paths(student, teacher, batch, div, *, upcast=False):
    """(the unchunked reference over full logits, the loss_terms loss over hidden states + LM
    heads, the student's head) of the student against the teacher on one batch."""
    mask = _mask(batch)
    s_logits = response_logits(student, batch, V)
    with torch.no_grad():
        t_logits = response_logits(teacher, batch, V)
        th = hidden_states_for_response(teacher, batch)
    if upcast:  # low-precision models: the divergences run in float32 on both paths
        s_logits, t_logits = s_logits.float(), t_logits.float()
    ref = _masked_sum(div, s_logits, t_logits, mask)
    head = lm_head_of(student, V)
    h = hidden_states_for_response(student, batch)
    got, _ = loss_terms(Outputs(h, head), [(div, Outputs(th, lm_head_of(teacher, V)), 1.0)], mask)
    return ref, got, head


def _grads(loss, params, *, retain_graph=False):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)


def _assert_close(got, ref, what, **tol):
    assert got is not None and ref is not None, what
    torch.testing.assert_close(got, ref, **(tol or F64), msg=what)


# ---------------------------------------------------------------------------------------------
# Equality with plain autograd on full logits: values and gradients, student and prompt.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_equals_full_logits_values_and_gradients(pair, name):
    """Both sides trained in turn (the target is the stop-gradient side): the student against
    the prompted teacher (the student's gradients), then the prompted teacher against the
    student (the prompt's gradient, through the teacher's hidden states)."""
    student, prompted, prompt = _setup(pair)
    batch = _batch()
    mask = _mask(batch)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    trainable = [p for p in student.parameters() if p.requires_grad]
    div = _div(name)

    s_logits = response_logits(student, batch, V)  # (B, R, V)
    t_logits = prompted(batch.input_ids, batch.attention_mask, logits_to_keep=_keep(batch))[:, :-1, :V]
    ref_student = _masked_sum(div, s_logits, t_logits.detach(), mask)
    ref_prompt = _masked_sum(div, t_logits, s_logits.detach(), mask)
    ref_grads = _grads(ref_student, trainable)
    (ref_prompt_grad,) = _grads(ref_prompt, [prompt])

    h = hidden_states_for_response(student, batch)  # (B, R, H)
    th = hidden_states_for_response(prompted, batch)  # (B, R, H_t)
    assert h.shape[:2] == th.shape[:2] == mask.shape
    student_out = Outputs(h, lm_head_of(student, V))
    prompted_out = Outputs(th, lm_head_of(prompted, V))
    head = student_out.head

    got, (value,) = loss_terms(student_out, [(div, prompted_out, 1.0)], mask)
    assert got.dtype == torch.float64
    _assert_close(got, ref_student.detach(), "student loss")
    assert value == pytest.approx(float(ref_student.detach()), rel=1e-12)
    got_grads = _grads(got, trainable + [prompt])
    assert got_grads[-1] is None  # the target (here the prompted teacher, with grad) gets none
    for n, g, r in zip(names, got_grads[:-1], ref_grads, strict=True):
        if r is None:
            assert g is None or not g.any(), n
            continue
        _assert_close(g, r, f"grad of {n}")
    head_grad = got_grads[[p is head.weight for p in trainable].index(True)]
    assert head_grad.abs().sum() > 0  # the student's head got one (the embedding when tied)

    got, (value,) = loss_terms(prompted_out, [(div, student_out.detach(), 1.0)], mask)
    _assert_close(got, ref_prompt.detach(), "prompt loss")
    assert value == pytest.approx(float(ref_prompt.detach()), rel=1e-12)
    (got_prompt_grad,) = _grads(got, [prompt])
    # the prompt is float32 (cast to the float64 teacher per forward): both gradients are the
    # same float64 sum rounded to float32, a few ulp (2^-24) apart at most
    _assert_close(got_prompt_grad, ref_prompt_grad, "prompt grad", rtol=1e-6, atol=1e-9)
    assert got_prompt_grad.abs().sum() > 0


@pytest.mark.parametrize("params", [{"ab_alpha": 1.5, "ab_beta": 0.4}, {"ab_alpha": 0.0, "ab_beta": 0.4}])
def test_abkd_off_the_defaults_equals_full_logits(monkeypatch, params):
    """ABKD beyond alpha + beta = 1 and on its beta axis, through hidden states and LM heads (its
    defaults run in test_equals_full_logits_values_and_gradients with every divergence)."""
    monkeypatch.setitem(PARAMS, "alpha_beta_divergence", params)
    test_equals_full_logits_values_and_gradients("llama", "alpha_beta_divergence")


@pytest.mark.parametrize("pair", ["llama", "gpt2"])
def test_prompt_loss_terms_in_one_pass(pair):
    """PromptKD's prompt loss KL(p_TP || sg p_S) + lambda KL(p_TP || sg p_T) (plus a logged
    distance, weight 0) from one loss_terms call: the prompted teacher's logits once per chunk;
    the student, target of two terms, gets no gradient through its detached outputs."""
    student, prompted, prompt = _setup(pair)
    batch = _batch()
    mask = _mask(batch)
    lam = 0.3
    kl, logged = divergence("reverse_kl"), divergence("forward_kl")
    with torch.no_grad():
        s_logits = response_logits(student, batch, V)
        base = prompted.forward_base(batch.input_ids, batch.attention_mask, logits_to_keep=_keep(batch))[:, :-1, :V]
    tp = prompted(batch.input_ids, batch.attention_mask, logits_to_keep=_keep(batch))[:, :-1, :V]
    l_kd, l_reg = _masked_sum(kl, tp, s_logits, mask), _masked_sum(kl, tp, base, mask)
    l_logged = _masked_sum(logged, tp, s_logits, mask)
    (ref_grad,) = _grads(l_kd + lam * l_reg, [prompt])

    s_head, t_head = lm_head_of(student, V), lm_head_of(prompted, V)
    student_out = Outputs(hidden_states_for_response(student, batch), s_head)  # with grad, as a shared forward
    prompted_out = Outputs(hidden_states_for_response(prompted, batch), t_head)
    with torch.no_grad():
        base_out = Outputs(hidden_states_for_response(prompted, batch, base=True), t_head.detached())
    target = student_out.detach()
    loss, per_term = loss_terms(prompted_out, [(kl, target, 1.0), (kl, base_out, lam), (logged, target, 0.0)], mask)
    assert isinstance(per_term, list) and len(per_term) == 3
    assert per_term == pytest.approx([float(v.detach()) for v in (l_kd, l_reg, l_logged)], rel=1e-12)
    _assert_close(loss, (l_kd + lam * l_reg).detach(), "loss")
    got_grad, student_grad = _grads(loss, [prompt, s_head.weight])
    _assert_close(got_grad, ref_grad, "prompt grad", rtol=1e-6, atol=1e-9)  # float32 prompt, as above
    assert student_grad is None  # the detached student is no part of the graph


def test_padded_vocabulary_rows_are_cut():
    """A head with more rows than the shared vocabulary (Qwen2.5's 151,936 vs its tokenizer):
    only the first V columns are compared; the padded rows get exactly zero gradient."""
    student = _qwen2(1, tied=False, vocab=V + 5).double()
    teacher = _qwen2(2, tied=True, vocab=V + 2).double()
    ref, got, head = _both_paths(student, teacher, _batch(), divergence("reverse_kl"))
    assert head.weight.shape[0] == V + 5 and head.vocab_size == V
    ref_grads = _grads(ref, list(student.parameters()))
    _assert_close(got, ref.detach(), "value")
    got_grads = _grads(got, list(student.parameters()))
    for g, r in zip(got_grads, ref_grads, strict=True):
        _assert_close(g, r, "grad")
    head_grad = got_grads[[p is head.weight for p in student.parameters()].index(True)]
    assert head_grad.shape == (V + 5, 32) and not head_grad[V:].any() and head_grad[:V].any()


@pytest.mark.parametrize("arch", ["gemma2", "cohere"])
def test_soft_capping_and_logit_scale(arch):
    """Gemma 2's final_logit_softcapping and Cohere's logit_scale are read from the config and
    applied (values and gradients through the transform), in the chunks as in `head.logits`."""
    make = _gemma2 if arch == "gemma2" else _cohere
    student, teacher = make(1).double().eval(), make(2).double().eval()
    head, t_head = lm_head_of(student, V), lm_head_of(teacher, V)
    assert (head.softcap, head.scale) == ((2.0, None) if arch == "gemma2" else (None, 0.25))
    # Gemma 2's eager attention gives NaN on left-padded rows (a fully masked pad query),
    # in its own logits too; no left padding here
    batch = _batch(left_pad=False)
    mask = _mask(batch)
    div = divergence("forward_kl")
    h = hidden_states_for_response(student, batch)
    with torch.no_grad():
        th = hidden_states_for_response(teacher, batch)
    s_logits = head.logits(h)  # plain autograd through the transform
    torch.testing.assert_close(s_logits, response_logits(student, batch, V), **F64)  # = the model's own
    if arch == "gemma2":
        assert s_logits.abs().max() < 2.0  # capped
    ref = _masked_sum(div, s_logits, t_head.logits(th), mask)
    got, _ = loss_terms(Outputs(h, head), [(div, Outputs(th, t_head), 1.0)], mask)
    _assert_close(got, ref.detach(), "value")
    params = list(student.parameters())
    ref_grads = _grads(ref, params, retain_graph=True)  # ref and got share the student's forward
    for g, r in zip(_grads(got, params), ref_grads, strict=True):
        _assert_close(g, r, "grad")


def test_cross_entropy_equals_unchunked():
    student = _gpt2(1).double().eval()
    batch = _batch()
    mask = _mask(batch)
    targets = batch.input_ids[:, batch.prompt_length:]
    logits = response_logits(student, batch, V)
    ref = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    got, (value,) = loss_terms(Outputs(hidden_states_for_response(student, batch), lm_head_of(student, V)),
                               [(CROSS_ENTROPY, targets, 1.0)], mask)
    _assert_close(got, ref.detach(), "value")
    assert value == pytest.approx(float(ref.detach()), rel=1e-12)
    params = list(student.parameters())
    for g, r in zip(_grads(got, params), _grads(ref, params), strict=True):
        _assert_close(g, r, "grad")


@pytest.mark.parametrize("ce_weight", [0.5, 0.0])
def test_cross_entropy_term_shares_the_pass_with_a_divergence(ce_weight):
    """The supervised steps' (1 - r) CE + r KL in one loss_terms call (CE at weight 0, as GKD
    logs it, gives its value and no gradient)."""
    student, prompted, _ = _setup("qwen2_untied")
    teacher = prompted.teacher
    batch = _batch()
    mask = _mask(batch)
    targets = batch.input_ids[:, batch.prompt_length:]
    params = list(student.parameters())
    kd_div = divergence("forward_kl")
    logits = response_logits(student, batch, V)
    with torch.no_grad():
        t_logits = response_logits(teacher, batch, V)
    ce = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    kd = _masked_sum(kd_div, logits, t_logits, mask)
    ref_grads = _grads(ce_weight * ce + 0.5 * kd, params)
    h = hidden_states_for_response(student, batch)
    with torch.no_grad():
        th = hidden_states_for_response(teacher, batch)
    loss, per_term = loss_terms(Outputs(h, lm_head_of(student, V)), [
        (CROSS_ENTROPY, targets, ce_weight),
        (kd_div, Outputs(th, lm_head_of(teacher, V).detached()), 0.5),
    ], mask)
    assert per_term == pytest.approx([float(ce.detach()), float(kd.detach())], rel=1e-12)
    _assert_close(loss, (ce_weight * ce + 0.5 * kd).detach(), "loss")
    for g, r in zip(_grads(loss, params), ref_grads, strict=True):
        _assert_close(g, r, "grad")


def test_base_teacher_hidden_states_match_forward_base():
    _, prompted, _ = _setup("llama")
    batch = _batch()
    base = prompted.forward_base(batch.input_ids, batch.attention_mask, logits_to_keep=_keep(batch))
    h = hidden_states_for_response(prompted, batch, base=True)
    assert not h.requires_grad  # forward_base runs under no_grad
    torch.testing.assert_close(lm_head_of(prompted, V).logits(h), base[:, :-1, :V], **F64)


# ---------------------------------------------------------------------------------------------
# Compiled chunks, precision.
# ---------------------------------------------------------------------------------------------


def test_compiled_chunks_equal_eager(monkeypatch):
    """The torch.compile'd per-chunk function (forced on for these tiny chunks) gives eager's
    values and gradients on hidden states + heads, a float32 student and prompted teacher."""
    student, prompted, prompt = _setup("llama")
    student, prompted = student.float(), prompted.float()
    batch = _batch()
    mask = _mask(batch)
    targets = batch.input_ids[:, batch.prompt_length:]
    s_head, t_head = lm_head_of(student, V), lm_head_of(prompted, V)
    params = [p for p in student.parameters() if p.requires_grad]
    compiles = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiles.append(k) or compile_(*a, **k))
    monkeypatch.setattr(losses, "_COMPILE_FAILED", [])
    results = []
    losses._chunk_function.cache_clear()
    try:
        for threshold in (1 << 40, 0):  # eager, then compiled
            monkeypatch.setattr(losses, "COMPILE_MIN_ELEMENTS", threshold)
            student_out = Outputs(hidden_states_for_response(student, batch), s_head)
            with torch.no_grad():
                target = Outputs(hidden_states_for_response(prompted, batch), t_head.detached())
            loss, values = loss_terms(student_out, [(divergence("skew_reverse_kl"), target, 0.6),
                                                    (CROSS_ENTROPY, targets, 0.4)], mask)
            results.append((values, _grads(loss, params)))
    finally:
        losses._chunk_function.cache_clear()
    assert compiles and not losses._COMPILE_FAILED  # the compiled function did run
    (eager_values, eager_grads), (compiled_values, compiled_grads) = results
    assert compiled_values == pytest.approx(eager_values, rel=1e-5)
    for g, r in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))


# bf16 heads: the chunks' logits are the same bf16 products as the model's head (a different
# blocking may round a logit one bf16 ulp, 2^-8, apart), the divergences float32 in both. The
# reference's gradient is rounded to bf16 at the logits (<= 2^-9 relative per entry) and the bf16
# matmuls round again: a few 2^-8 of the gradient's norm.
BF16_VALUE_RTOL = 2**-8 / 4
BF16_GRAD_RTOL = 4 * 2**-8


def test_bfloat16_close_to_unchunked():
    """bf16 models: the matmul in bf16 like the model's head, the divergence in float32."""
    student = tiny_llama(num_layers=2, seed=1).to(torch.bfloat16)
    teacher = tiny_llama(num_layers=2, seed=2).to(torch.bfloat16)
    ref, got, head = _both_paths(student, teacher, _batch(), divergence("reverse_kl"), upcast=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=BF16_VALUE_RTOL, atol=0)
    (g,) = torch.autograd.grad(got, [head.weight])
    (r,) = torch.autograd.grad(ref, [head.weight])
    assert g.dtype == torch.bfloat16
    assert (g.float() - r.float()).norm() <= BF16_GRAD_RTOL * r.float().norm()


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matrix product whose output has a vocabulary-sized last dim."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.dtypes = vocab_size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "mm" in str(func) and isinstance(out, torch.Tensor) and out.shape[-1] == self.vocab_size:
            self.dtypes.append(out.dtype)
        return out


def test_autocast_runs_the_matmul_in_the_autocast_dtype():
    """Under autocast (as ctx.autocast() gives), the head matmul runs in bfloat16 like the
    model's own head; gradients reach the float32 parameters through the cast."""
    student = tiny_llama(num_layers=2, seed=1)
    teacher = tiny_llama(num_layers=2, seed=2)
    batch = _batch()
    mask = _mask(batch)
    div = divergence("reverse_kl")
    head, t_head = lm_head_of(student, V), lm_head_of(teacher, V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_logits = response_logits(student, batch, V)
        with torch.no_grad():
            t_logits = response_logits(teacher, batch, V)
        student_out = outputs_of(student, batch, head, V)
        with torch.no_grad():
            teacher_out = outputs_of(teacher, batch, t_head, V)
    ref = _masked_sum(div, s_logits.float(), t_logits.float(), mask)
    assert s_logits.dtype == torch.bfloat16 and student_out.states.dtype == torch.float32  # the residual stream
    assert student_out.autocast_dtype == teacher_out.autocast_dtype == torch.bfloat16
    with MatmulDtypes(V) as mode:
        got, _ = loss_terms(student_out, [(div, teacher_out, 1.0)], mask)
    assert mode.dtypes and set(mode.dtypes) == {torch.bfloat16}, mode.dtypes
    torch.testing.assert_close(got, ref, rtol=BF16_VALUE_RTOL, atol=0)
    (g,) = torch.autograd.grad(got, [head.weight])
    (r,) = torch.autograd.grad(ref, [head.weight])
    assert g.dtype == torch.float32
    assert (g - r).norm() <= BF16_GRAD_RTOL * r.norm()


def test_no_grad_and_empty_mask():
    student = tiny_llama(num_layers=1, seed=0)
    head = lm_head_of(student, V)
    div = divergence("reverse_kl")
    h = torch.randn(2, 4, 32, requires_grad=True)
    with torch.no_grad():
        value, (logged,) = loss_terms(Outputs(h, head), [(div, Outputs(h * 2, head), 1.0)], torch.ones(2, 4, dtype=torch.bool))
    assert value.grad_fn is None and value > 0 and logged == pytest.approx(float(value), rel=1e-6)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    loss, values = loss_terms(Outputs(h, head.detached()), [(div, Outputs(h.detach() * 2, head.detached()), 1.0)], empty)
    assert float(loss.detach()) == 0.0 and values == [0.0]
    loss.backward()
    assert h.grad is not None and not h.grad.any()


def test_the_check_forward_leaves_the_random_streams_alone():
    model = tiny_llama(num_layers=1, seed=0)
    model.config.attention_dropout = 0.5
    model.train()  # dropout on: the check forward draws masks
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    lm_head_of(model, V)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


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
    mask = _mask(batch)
    head, t_head = lm_head_of(student, V), lm_head_of(prompted, V)
    div = divergence("reverse_kl")
    mode = LargestLogits({V}, {32, 48}, limit=CHUNK)
    with mode:
        student_out = Outputs(hidden_states_for_response(student, batch), head)
        prompted_out = Outputs(hidden_states_for_response(prompted, batch), t_head)
        loss, _ = loss_terms(prompted_out, [(div, student_out.detach(), 1.0)], mask)
        loss.backward()
        loss, _ = loss_terms(student_out, [(div, prompted_out.detach(), 1.0)], mask)
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
    with pytest.raises(UserError, match=r"(?s)PEFT.*lm_head.*target modules") as err:
        lm_head_of(model, V)
    assert "chunked_lm_head" not in str(err.value)  # the removed flag is no fix


def test_lora_elsewhere_is_fine():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(num_layers=1, seed=0),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    head = lm_head_of(model, V)
    assert head.weight is model.get_base_model().lm_head.weight
    batch = _batch()
    with torch.no_grad():
        h = hidden_states_for_response(model, batch)  # through PeftModel.forward
        # one float32 matmul, on all positions or on the response slice: rounding apart at most
        torch.testing.assert_close(head.logits(h), response_logits(model, batch, V), rtol=1e-5, atol=1e-6)


def test_unknown_head_module_or_transform_is_refused():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = tiny_llama(num_layers=1, seed=0)
    old = model.lm_head
    model.lm_head = Scaled(old.in_features, old.out_features, bias=False)
    with pytest.raises(UserError, match=r"not a plain torch\.nn\.Linear") as err:
        lm_head_of(model, V)
    assert "chunked_lm_head" not in str(err.value)
    # a config transform the architecture does not apply: caught by the check forward
    model = tiny_llama(num_layers=1, seed=0)
    model.config.logit_scale = 0.5
    with pytest.raises(UserError, match=r"differ from weight @ h") as err:
        lm_head_of(model, V)
    assert "chunked_lm_head" not in str(err.value)
    assert lm_head_of(model, V, check=False).scale == 0.5


def test_misuse_errors():
    student = tiny_llama(num_layers=1, seed=0)
    head = lm_head_of(student, V)
    div = divergence("reverse_kl")
    h = torch.randn(2, 4, 32, requires_grad=True)
    ones = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(UserError, match=f"{V} and {V - 1} vocabulary columns"):
        loss_terms(Outputs(h, head), [(div, Outputs(h.detach(), LMHead(head.weight, None, V - 1)), 1.0)], ones)
    with pytest.raises(UserError, match=f"{V} and {V + 1} vocabulary columns"):  # a logits target
        loss_terms(Outputs(h, head), [(div, Outputs(torch.zeros(2, 4, V + 1)), 1.0)], ones)
    with pytest.raises(ValueError, match="mask must be bool"):
        loss_terms(Outputs(h, head), [(div, Outputs(h.detach(), head), 1.0)], torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"mask must be bool \(2, 4\)"):
        loss_terms(Outputs(h, head), [(div, Outputs(h.detach(), head), 1.0)], ones[:, :3])
    with pytest.raises(UserError, match="vocab_size"):
        LMHead(head.weight, None, V + 1)
    loss, _ = loss_terms(Outputs(h, head.detached()), [(div, Outputs(h.detach() * 2, head), 1.0)], ones)
    loss.backward(retain_graph=True)  # buffers kept: a second backward gives the same gradient
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first, rtol=0, atol=0)  # the same buffer added twice: exact
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
