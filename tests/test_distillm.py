"""DistiLLM (promptkd.methods.distillm) driven through promptkd.testing.FakeContext.

    .venv/bin/python -m pytest -q tests/test_distillm.py

The schedule (fresh fraction, source choice, adaptive student-data probability, the dev-loss
checks every adapt_every steps or once per epoch), the replay buffer (first in first out,
global order, replay batches drawn from it, checkpoint round trip) and the loss (skew KL and
CE, recomputed here in float64 from plain full forwards) are each checked on their own.
"""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from fakes import FakeContext

from promptkd.config import config_from_dict
from promptkd.data.batch import SequenceBatch, position_ids_from_mask
from promptkd.data.collate import collate_sequences
from promptkd.data.dataset import Example
from promptkd.methods import distillm as dl
from promptkd.methods.distillm import DistiLLM
from promptkd.testing import byte_tokenizer, tiny_llama

K = 8  # max_steps
TOK = byte_tokenizer()
PAD, EOS = TOK.pad_token_id, TOK.eos_token_id


def with_own_head(model, seed: int, scale: float):
    """An untied random LM head with logits of std ~scale: distributions far from uniform."""
    vocab, hidden = model.lm_head.weight.shape
    g = torch.Generator().manual_seed(seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * scale / hidden**0.5)
    return model


TEACHER = with_own_head(tiny_llama(num_layers=2, seed=0), 100, 3.0)
STUDENT = with_own_head(tiny_llama(num_layers=1, seed=1), 101, 2.5)
PAIRS = [("Say hello.\n", "hello"), ("Add 2 and 3.\n", "5"), ("Name a colour.\n", "blue"),
         ("Repeat: cat\n", "cat cat"), ("Give an animal.\n", "dog"), ("Spell abc backwards.\n", "cba")]
EXAMPLES = [Example(TOK.encode(p), TOK.encode(r) + [EOS], [r]) for p, r in PAIRS]


def make_cfg(**distillm):
    data = {"method": "distillm", "train": {"max_steps": K, "seed": 5, "learning_rate": 1e-2},
            "distillm": distillm}
    return config_from_dict(data, check_required=False)


class CountingSampler:
    """A deterministic stand-in for the student's sampler: row n of all rows sampled so far gets
    the response [65 + n % 50, 120 + n % 50, EOS], different from every dataset response."""

    def __init__(self):
        self.n = 0
        self.produced: list[tuple[list[int], list[int]]] = []

    def __call__(self, examples, *, from_teacher=False) -> SequenceBatch:
        assert not from_teacher
        rows = []
        for ex in examples:
            resp = [65 + self.n % 50, 120 + self.n % 50, EOS]
            self.n += 1
            rows.append(Example(list(ex.prompt_ids), resp, []))
            self.produced.append((list(ex.prompt_ids), resp))
        return collate_sequences(rows, PAD)


def make_ctx(sampler=None, **kwargs) -> FakeContext:
    return FakeContext(copy.deepcopy(STUDENT), copy.deepcopy(TEACHER), TOK, max_steps=K,
                       sampler=sampler if sampler is not None else CountingSampler(), **kwargs)


def setup(cfg, **kwargs) -> tuple[FakeContext, DistiLLM]:
    ctx = make_ctx(**kwargs)
    ctx.seed = cfg.train.seed  # what the trainer's context holds
    method = DistiLLM(cfg.distillm)
    method.setup(ctx)
    return ctx, method


def plain_forward(model, batch: SequenceBatch) -> torch.Tensor:
    """(B, T, V) logits; position t predicts token t + 1."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=position_ids_from_mask(batch.attention_mask), use_cache=False).logits


def response_part(full_logits: torch.Tensor, batch: SequenceBatch, vocab_size: int) -> torch.Tensor:
    return full_logits[:, batch.prompt_length - 1 : -1, :vocab_size]


def rmask(batch: SequenceBatch) -> torch.Tensor:
    return batch.loss_mask[:, batch.prompt_length :]  # (B, R)


def num_tokens(batches) -> int:
    return int(sum(int(rmask(b).sum()) for b in batches))


def rows_of(batch: SequenceBatch) -> list[tuple[list[int], list[int]]]:
    """(prompt without its left padding, trained response tokens) of every row, read directly."""
    out = []
    P = batch.prompt_length
    for i in range(batch.input_ids.shape[0]):
        prompt = [int(x) for x, a in zip(batch.input_ids[i, :P], batch.attention_mask[i, :P], strict=True) if a]
        resp = [int(x) for x, m in zip(batch.input_ids[i, P:], batch.loss_mask[i, P:], strict=True) if m]
        out.append((prompt, resp))
    return out


SOURCE = {0.0: "data", 1.0: "fresh", 2.0: "replay"}


# ---------------------------------------------------------------------------- 7. the schedule


@pytest.mark.parametrize("ratio,want", [("decreasing", 0.6 * 0.75), ("constant", 0.3), ("increasing", 0.6 * 0.25)])
def test_fresh_fraction(ratio, want):
    assert dl.fresh_fraction(0.6, 0.25, ratio) == pytest.approx(want, abs=1e-15)
    assert dl.fresh_fraction(0.0, 0.25, ratio) == 0.0


def test_fresh_fraction_ends():
    assert dl.fresh_fraction(0.8, 0.0, "decreasing") == pytest.approx(0.8)
    assert dl.fresh_fraction(0.8, 1.0, "decreasing") == 0.0
    assert dl.fresh_fraction(0.8, 0.0, "increasing") == 0.0
    assert dl.fresh_fraction(0.8, 1.0, "increasing") == pytest.approx(0.8)


@pytest.mark.parametrize("u,phi,fresh,full,want", [
    (0.10, 0.5, 0.2, True, "fresh"),    # u < fresh
    (0.10, 0.5, 0.2, False, "fresh"),
    (0.30, 0.5, 0.2, False, "fresh"),   # fresh <= u < phi, buffer not yet full
    (0.30, 0.5, 0.2, True, "replay"),   # fresh <= u < phi, buffer full
    (0.20, 0.5, 0.2, True, "replay"),   # u == fresh is not below it
    (0.50, 0.5, 0.2, True, "data"),     # u == phi is not below it
    (0.50, 0.5, 0.2, False, "data"),
    (0.90, 0.5, 0.2, False, "data"),
    (0.00, 0.0, 0.0, False, "data"),    # phi 0: only the dataset
    (0.999, 1.0, 0.0, True, "replay"),  # phi 1, no fresh share: always the buffer once full
    (0.999, 1.0, 0.0, False, "fresh"),
])
def test_choose_source_branches(u, phi, fresh, full, want):
    assert dl.choose_source(u, phi=phi, fresh=fresh, buffer_full=full) == want


@pytest.mark.parametrize("phi,prev,dev,want", [
    (0.2, 1.0, 1.5, (0.45, 1.5)),     # rose by more than eps: grow, the reference moves
    (0.2, 1.0, 1.25, (0.45, 1.25)),   # rose by exactly eps (exact in binary): grow
    (0.2, 1.0, 1.1875, (0.2, 1.0)),   # rose by less than eps: unchanged, reference kept
    (0.2, 1.0, 0.5, (0.2, 1.0)),      # fell: unchanged
    (0.9, 1.0, 2.0, (1.0, 2.0)),      # capped at 1
    (1.0, 1.0, 2.0, (1.0, 2.0)),
])
def test_adapted_prob(phi, prev, dev, want):
    got = dl.adapted_prob(phi, prev, dev, loss_eps=0.25, prob_step=0.25)
    assert got[0] == pytest.approx(want[0], abs=1e-15) and got[1] == want[1]
    assert got[0] <= 1.0


def test_adapted_prob_with_zero_eps_grows_on_an_equal_loss():
    assert dl.adapted_prob(0.0, 1.5, 1.5, loss_eps=0.0, prob_step=0.1) == (0.1, 1.5)
    assert dl.adapted_prob(0.0, 1.5, 1.4999, loss_eps=0.0, prob_step=0.1) == (0.0, 1.5)


def run_steps(ctx, method, steps, micro=None, epochs=None):
    """One step per entry; returns [(metrics, dev_loss calls, sources)] per step."""
    out = []
    for i, step in enumerate(steps):
        ctx.step = step
        if epochs is not None:
            ctx.epoch = epochs[i]
        ctx.calls.clear()
        result = method.step(ctx, micro or [EXAMPLES[:2]])
        out.append((result.metrics, len(ctx.calls_named("dev_loss")), SOURCE[result.metrics["distillm/source"]]))
    return out


def test_phi_grows_every_adapt_every_steps_against_the_loss_at_the_last_growth():
    ctx, method = setup(make_cfg(initial_student_prob=0.0, prob_step=0.25, loss_eps=0.1, adapt_every=2))
    # initial; after step 1 (+0.05: no); step 3 (+0.2: grow, ref 1.2); step 5 (+0.05 over 1.2: no);
    # step 7 (+0.11 over 1.2: grow; had the reference moved to 1.25 it would not)
    ctx.dev_losses = [1.0, 1.05, 1.2, 1.25, 1.31]
    out = run_steps(ctx, method, range(8))
    assert [n for _, n, _ in out] == [1, 1, 0, 1, 0, 1, 0, 1]
    assert [m["distillm/student_prob"] for m, _, _ in out] == [0.0] * 4 + [0.25] * 4
    assert [m.get("distillm/dev_loss") for m, _, _ in out] == [None, 1.05, None, 1.2, None, 1.25, None, 1.31]
    assert method.phi == pytest.approx(0.5) and method.prev_loss == 1.31
    assert ctx.dev_losses == []
    assert all(src == "data" for _, _, src in out[:4])  # phi 0: never student data


def test_phi_stops_growing_at_one_and_then_no_more_dev_loss_is_asked():
    ctx, method = setup(make_cfg(initial_student_prob=0.9, prob_step=0.25, loss_eps=0.1, adapt_every=1))
    ctx.dev_losses = [1.0, 2.0, 3.0]
    out = run_steps(ctx, method, range(3))
    assert [n for _, n, _ in out] == [2, 0, 0]  # the initial loss and the check after step 0
    assert method.phi == 1.0 and method.prev_loss == 2.0
    assert ctx.dev_losses == [3.0]
    assert [m["distillm/student_prob"] for m, _, _ in out] == [0.9, 1.0, 1.0]


def test_no_dev_loss_without_prob_step():
    ctx, method = setup(make_cfg(initial_student_prob=0.3, prob_step=0.0, adapt_every=1))
    ctx.dev_losses = [1.0, 5.0, 9.0]
    run_steps(ctx, method, range(3))
    assert ctx.dev_losses == [1.0, 5.0, 9.0] and method.phi == 0.3 and method.prev_loss is None


def test_phi_checked_once_per_completed_epoch():
    """adapt_every 0: a check when ctx.epoch crosses an integer (including a sum of tenths that
    falls a hair short of 1), once per step even when it crosses two."""
    ctx, method = setup(make_cfg(initial_student_prob=0.0, prob_step=0.25, loss_eps=0.1, adapt_every=0))
    ctx.max_steps = 20
    epochs, e = [], 0.0
    for _ in range(10):
        e += 0.1
        epochs.append(e)
    assert epochs[-1] < 1.0  # 0.9999999999999999
    epochs += [1.5, 3.2, 3.9, 4.0]
    ctx.dev_losses = [1.0, 1.5, 1.55, 2.0]
    out = run_steps(ctx, method, range(len(epochs)), epochs=epochs)
    calls = [n for _, n, _ in out]
    assert calls == [1] + [0] * 8 + [1, 0, 1, 0, 1]
    checked = [i for i, (m, _, _) in enumerate(out) if "distillm/dev_loss" in m]
    assert checked == [9, 11, 13]
    assert method.checked == 4
    assert method.phi == pytest.approx(0.5) and method.prev_loss == 2.0  # 1.5 grew, 1.55 not, 2.0 grew
    assert ctx.dev_losses == []


def test_source_follows_the_step_draw_and_not_the_global_rng():
    """Same seed and step -> same source, whatever the global RNG; both student-data kinds and
    the dataset appear over the steps with phi 1/2."""
    cfg = make_cfg(initial_student_prob=0.5, prob_step=0.0, capacity=2, replay_ratio="constant")
    sources = []
    for rng in (0, 1):
        ctx, method = setup(cfg)
        torch.manual_seed(rng)
        sources.append([src for _, _, src in run_steps(ctx, method, range(K))])
    assert sources[0] == sources[1]
    assert set(sources[0]) == {"data", "fresh", "replay"}
    other = make_cfg(initial_student_prob=0.5, prob_step=0.0, capacity=2, replay_ratio="constant")
    other.train.seed = 6
    ctx, method = setup(other)
    assert [src for _, _, src in run_steps(ctx, method, range(K))] != sources[0]


# ---------------------------------------------------------------------------- 8. the buffer


def test_push_keeps_fifo_order_and_capacity():
    ctx, method = setup(make_cfg(capacity=5))
    a = collate_sequences(EXAMPLES[:3], PAD)
    method.push(ctx, [a])
    assert method.buffer == [(e.prompt_ids, e.response_ids) for e in EXAMPLES[:3]]
    b, c = collate_sequences(EXAMPLES[3:5], PAD), collate_sequences(EXAMPLES[5:6] + EXAMPLES[:1], PAD)
    method.push(ctx, [b, c])
    want = [(e.prompt_ids, e.response_ids) for e in EXAMPLES[:6] + EXAMPLES[:1]][-5:]
    assert method.buffer == want and len(method.buffer) == 5


def test_capacity_is_per_process():
    """Two processes: the shared buffer keeps 2 x capacity (the reference: capacity on each GPU,
    distillm/buffer.py:19), and it is full only then."""
    ctx, method = setup(make_cfg(capacity=2))
    ctx.num_processes = 2
    theirs = [[(EXAMPLES[4].prompt_ids, [1, EOS]), (EXAMPLES[5].prompt_ids, [2, EOS])]]
    ctx.gather_object = lambda local: [local, theirs]
    method.push(ctx, [collate_sequences(EXAMPLES[:1], PAD)])
    assert len(method.buffer) == 3 and method.capacity(ctx) == 4
    method.push(ctx, [collate_sequences(EXAMPLES[1:3], PAD)])
    want = [(EXAMPLES[1].prompt_ids, EXAMPLES[1].response_ids), (EXAMPLES[2].prompt_ids, EXAMPLES[2].response_ids)]
    assert method.buffer == want + theirs[0]  # the last 4 of 7, in global batch order
    ctx.num_processes = 1
    assert method.capacity(ctx) == 2


def test_push_keeps_only_the_trained_tokens_of_a_sample():
    """A sampled row: the prompt without its left padding, the response up to its first EOS."""
    ctx, method = setup(make_cfg())
    ids = torch.tensor([[PAD, 10, 11, 20, EOS, PAD], [12, 13, 14, 21, 22, 23]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    loss = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    method.push(ctx, [SequenceBatch(ids, attn, loss, 3)])
    assert method.buffer == [([10, 11], [20, EOS]), ([12, 13, 14], [21, 22, 23])]


def test_push_orders_micro_batch_then_process():
    ctx, method = setup(make_cfg(capacity=100))
    mine = [collate_sequences(EXAMPLES[:1], PAD), collate_sequences(EXAMPLES[1:2], PAD)]
    theirs = [[(EXAMPLES[4].prompt_ids, [1, EOS])], [(EXAMPLES[5].prompt_ids, [2, EOS])]]
    ctx.gather_object = lambda local: [local, theirs]  # two processes
    method.push(ctx, mine)
    assert method.buffer == [(EXAMPLES[0].prompt_ids, EXAMPLES[0].response_ids), theirs[0][0],
                             (EXAMPLES[1].prompt_ids, EXAMPLES[1].response_ids), theirs[1][0]]


def test_fresh_steps_fill_the_buffer_then_replay_draws_only_from_it():
    """phi 1 and no fresh share (increasing, progress 0): fresh while the buffer is not full,
    then replay batches, made of buffer sequences only (distinct rows: buffer >= batch)."""
    cfg = make_cfg(initial_student_prob=1.0, prob_step=0.0, capacity=4, replay_ratio="increasing")
    ctx, method = setup(cfg)
    sampler = ctx.sampler
    micro = [EXAMPLES[:2], EXAMPLES[2:3]]
    out = run_steps(ctx, method, [0, 0], micro=micro)
    student = copy.deepcopy(ctx.student_module)
    out += run_steps(ctx, method, [0], micro=micro)
    assert [src for _, _, src in out] == ["fresh", "fresh", "replay"]
    assert len(ctx.calls_named("collate")) == 2 and not ctx.calls_named("sample")  # the replay step
    assert method.buffer == sampler.produced[-4:]  # 6 sampled, the last 4 kept
    assert [m["distillm/buffer"] for m, _, _ in out] == [3.0, 4.0, 4.0]
    replay = ctx.batches[-2:]
    assert [b.input_ids.shape[0] for b in replay] == [2, 1]
    rows = [r for b in replay for r in rows_of(b)]
    assert all(r in method.buffer for r in rows)
    assert len({(tuple(p), tuple(r)) for p, r in rows}) == 3
    assert not any(r in [(e.prompt_ids, e.response_ids) for e in EXAMPLES] for r in rows)
    # the step trained on those rows
    ref = reference_loss(student, ctx.teacher, replay, cfg, ctx.vocab_size)
    assert out[2][0]["student/loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert out[2][0]["student/kd"] == pytest.approx(ref["kd"], rel=1e-4)


def test_replay_from_a_buffer_smaller_than_the_batch_repeats_its_sequences():
    cfg = make_cfg(initial_student_prob=1.0, prob_step=0.0, capacity=1, replay_ratio="increasing")
    ctx, method = setup(cfg)
    out = run_steps(ctx, method, [0, 0], micro=[EXAMPLES[:3]])
    assert [src for _, _, src in out] == ["fresh", "replay"]
    (entry,) = method.buffer
    assert entry == ctx.sampler.produced[2]
    assert rows_of(ctx.batches[-1]) == [entry] * 3


def clone_run(ctx, method, cfg):
    """A new context and method continuing from `method`'s checkpointed state (through bytes)."""
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    ctx2 = FakeContext(copy.deepcopy(ctx.student_module), copy.deepcopy(TEACHER), TOK, max_steps=K,
                       sampler=copy.deepcopy(ctx.sampler), seed=ctx.seed)
    method2 = DistiLLM(cfg.distillm)
    method2.setup(ctx2)
    method2.load_state_dict(state)
    return ctx2, method2


def test_state_dict_round_trip_continues_identically():
    cfg = make_cfg(initial_student_prob=0.5, prob_step=0.25, loss_eps=0.1, adapt_every=0, capacity=3,
                   replay_ratio="constant")
    ctx, method = setup(cfg)
    losses = [1.0, 1.3, 1.35, 1.7, 1.72, 1.9]
    ctx.dev_losses = list(losses)
    epochs = [0.5 * (i + 1) for i in range(K)]
    run_steps(ctx, method, range(4), epochs=epochs[:4])  # checks after steps 1 and 3
    assert method.checked == 2 and method.prev_loss == 1.3 and method.phi == 0.75
    assert len(method.buffer) == 3

    ctx2, method2 = clone_run(ctx, method, cfg)
    assert (method2.phi, method2.prev_loss, method2.checked, method2.buffer) == (
        method.phi, method.prev_loss, method.checked, method.buffer)
    ctx2.dev_losses = list(ctx.dev_losses)
    seen = []
    for step in range(4, K):
        a = run_steps(ctx, method, [step], epochs=[epochs[step]])[0]
        calls_a = [c[0] for c in ctx.calls]
        b = run_steps(ctx2, method2, [step], epochs=[epochs[step]])[0]
        assert [c[0] for c in ctx2.calls] == calls_a
        assert b[0] == pytest.approx(a[0], rel=1e-6, abs=1e-9)
        assert b[1:] == a[1:]
        for x, y in zip(ctx.grads["student"], ctx2.grads["student"], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
        seen.append(a[2])
        assert method2.buffer == method.buffer and method2.phi == method.phi
    assert "replay" in seen  # the restored buffer was used
    # step 5 (epoch 3): 1.7 >= 1.3 + 0.1 -> phi 1, which ends the checks (step 7 asks nothing)
    assert method2.phi == 1.0 and method2.prev_loss == 1.7 and method2.checked == 4
    assert ctx.dev_losses == ctx2.dev_losses == [1.72, 1.9]

    # a new instance without the state asks for an initial dev loss and holds no buffer
    ctx3 = make_ctx()
    fresh = DistiLLM(cfg.distillm)
    fresh.setup(ctx3)
    ctx3.dev_losses = [1.0]
    run_steps(ctx3, fresh, [4], epochs=[epochs[4]])
    assert len(ctx3.calls_named("dev_loss")) == 2


# ---------------------------------------------------------------------------- 9. the loss


def reference_loss(student, teacher, batches, cfg, vocab):
    """(1 - r) CE + r D token means in float64, D the skew KL written out, and its gradient."""
    c = cfg.distillm
    s_model = copy.deepcopy(student).double()
    t_model = copy.deepcopy(teacher).double() if teacher is not None else None
    n = num_tokens(batches)
    ce = kd = torch.zeros((), dtype=torch.float64)
    for b in batches:
        mask, tgt = rmask(b), b.input_ids[:, b.prompt_length :]
        s = response_part(plain_forward(s_model, b), b, vocab)
        log_q = s.log_softmax(-1)
        ce = ce - log_q.gather(-1, tgt[..., None])[..., 0][mask].sum()
        if t_model is None:
            continue
        with torch.no_grad():
            log_p = response_part(plain_forward(t_model, b), b, vocab).log_softmax(-1)
        q, p, a = log_q.exp(), log_p.exp(), c.alpha
        if c.divergence == "skew_reverse_kl":  # KL(q || a q + (1 - a) p)
            rows = (q * (log_q - torch.log(a * q + (1 - a) * p))).sum(-1)
        else:  # skew_forward_kl: KL(p || a p + (1 - a) q)
            rows = (p * (log_p - torch.log(a * p + (1 - a) * q))).sum(-1)
        kd = kd + rows[mask].sum()
    loss = ((1 - c.kd_ratio) * ce + c.kd_ratio * kd) / n
    grads = torch.autograd.grad(loss, [p for p in s_model.parameters() if p.requires_grad]) if t_model else None
    return {"ce": float(ce.detach()) / n, "kd": float(kd.detach()) / n, "loss": float(loss.detach()), "grads": grads}


@pytest.mark.parametrize("divergence,alpha,kd_ratio", [
    ("skew_reverse_kl", 0.1, 1.0),
    ("skew_reverse_kl", 0.1, 0.6),
    ("skew_reverse_kl", 0.4, 0.25),
    ("skew_forward_kl", 0.1, 1.0),
])
def test_loss_is_the_skew_kl_and_ce_mix(divergence, alpha, kd_ratio):
    cfg = make_cfg(divergence=divergence, alpha=alpha, kd_ratio=kd_ratio, initial_student_prob=0.0, prob_step=0.0)
    ctx, method = setup(cfg)
    student0 = copy.deepcopy(ctx.student_module)
    micro = [EXAMPLES[:2], EXAMPLES[2:5]]
    result = method.step(ctx, micro)
    assert len(ctx.calls_named("collate")) == 2 and not ctx.calls_named("sample")
    ref = reference_loss(student0, ctx.teacher, ctx.batches, cfg, ctx.vocab_size)
    m = result.metrics
    assert m["distillm/source"] == 0.0
    assert m["student/kd"] == pytest.approx(ref["kd"], rel=1e-4)
    assert m["student/ce"] == pytest.approx(ref["ce"], rel=1e-5)
    assert m["student/loss"] == pytest.approx(ref["loss"], rel=1e-4)
    if kd_ratio == 1.0:
        assert m["student/loss"] == m["student/kd"]
    else:
        assert m["student/loss"] == pytest.approx((1 - kd_ratio) * m["student/ce"] + kd_ratio * m["student/kd"],
                                                  rel=1e-12)
    assert result.trained_tokens == num_tokens(ctx.batches) and result.generated_tokens == 0.0
    scale = max(float(g.abs().max()) for g in ref["grads"])
    for i, (got, want) in enumerate(zip(ctx.grads["student"], ref["grads"], strict=True)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * scale,
                                   msg=lambda s, i=i: f"grad {i}: {s}")


def test_skew_reverse_kl_is_not_the_plain_reverse_kl():
    """The default alpha 0.1 changes the value: KL(q || 0.1 q + 0.9 p) < KL(q || p) here."""
    cfg = make_cfg(initial_student_prob=0.0, prob_step=0.0)
    assert (cfg.distillm.divergence, cfg.distillm.alpha, cfg.distillm.kd_ratio) == ("skew_reverse_kl", 0.1, 1.0)
    ctx, method = setup(cfg)
    student0 = copy.deepcopy(ctx.student_module)
    kd = method.step(ctx, [EXAMPLES[:3]]).metrics["student/kd"]
    (b,) = ctx.batches
    with torch.no_grad():
        log_q = response_part(plain_forward(student0.double(), b), b, 259).log_softmax(-1)
        log_p = response_part(plain_forward(copy.deepcopy(TEACHER).double(), b), b, 259).log_softmax(-1)
    rkl = float((log_q.exp() * (log_q - log_p)).sum(-1)[rmask(b)].mean())
    skew = float((log_q.exp() * (log_q - torch.log(0.1 * log_q.exp() + 0.9 * log_p.exp()))).sum(-1)[rmask(b)].mean())
    assert kd == pytest.approx(skew, rel=1e-4)
    assert kd < rkl - 0.05


def test_fresh_step_trains_on_the_samples_and_reports_them_generated():
    cfg = make_cfg(initial_student_prob=1.0, prob_step=0.0, kd_ratio=0.5)
    ctx, method = setup(cfg)
    student0 = copy.deepcopy(ctx.student_module)
    result = method.step(ctx, [EXAMPLES[:3]])
    assert result.metrics["distillm/source"] == 1.0 and ctx.calls_named("sample") == [("sample", False)]
    (b,) = ctx.batches
    assert rows_of(b) == ctx.sampler.produced
    ref = reference_loss(student0, ctx.teacher, [b], cfg, ctx.vocab_size)
    assert result.metrics["student/loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert result.generated_tokens == result.trained_tokens == num_tokens([b]) == 9


# ---------------------------------------------------------------------------- through the Trainer


def test_phi_check_and_the_evaluation_of_the_same_step_share_one_dev_pass(tmp_path, tiny_pair_dirs, tiny_jsonl):
    """adapt_every 1 with train.eval_every 1: the phi check after each step (ctx.dev_loss) and the
    trainer's evaluation of that step see the same student, so one pass over the dev set serves
    both (one more before training: the reference loss); outside train() nothing is reused."""
    from promptkd.training.loop import Trainer

    teacher, student = tiny_pair_dirs
    steps = 3
    cfg = config_from_dict({
        "method": "distillm",
        "model": {"teacher": str(teacher), "student": str(student)},
        "data": {"train": str(tiny_jsonl), "dev": str(tiny_jsonl), "max_dev_examples": 4},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": steps, "batch_size": 2, "seed": 5,
                  "warmup_steps": 0, "eval_every": 1, "eval_metric": "loss"},
        "sampling": {"max_new_tokens": 4},
        "distillm": {"initial_student_prob": 0.5, "adapt_every": 1, "loss_eps": 10.0},
    })
    trainer = Trainer(cfg, show_progress=False).setup()
    passes = []
    dev_pass = trainer.dev.pass_loss

    def counted(**kwargs) -> float:
        passes.append(trainer.ctx.updates_applied)
        return dev_pass(**kwargs)

    trainer.dev.pass_loss = counted
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert passes == [0, 1, 2, 3]  # the reference loss, then one pass per step (two before)
    for r in records:
        assert r["dev/loss"] == r["distillm/dev_loss"]
    assert len({r["dev/loss"] for r in records}) == steps  # each step's own student
    # the memo lives inside train(): a later evaluation runs the dev set and agrees
    assert trainer.evaluate()["dev/loss"] == pytest.approx(records[-1]["dev/loss"], rel=1e-6)
    assert passes == [0, 1, 2, 3, 3]
