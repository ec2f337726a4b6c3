"""Cross-tokenizer distillation (promptkd.cross_tokenizer): alignment, shared vocabulary, the hybrid
loss, its equality with the exact path for one tokenizer, and every method across two tokenizers.

    .venv/bin/python -m pytest -q tests/test_cross_tokenizer.py

Two genuinely different tokenizers, built in-process: `byte_tokenizer` (259 tokens: the 256 bytes,
then <s>, </s>, <pad>) and `bpe_tokenizer` (a byte-level BPE trained here: <|endoftext|> at id 0,
the bytes, then merges such as "ĠResponse").
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from promptkd.config import config_from_dict
from promptkd.cross_tokenizer import (
    Aligned,
    Alignment,
    CrossTokenizer,
    align,
    char_ends,
    cross_terms,
    group_log_probs,
    hybrid,
    shared_columns,
    token_surfaces,
    uld,
)
from promptkd.data.collate import collate_sequences
from promptkd.data.dataset import Example
from promptkd.errors import UserError
from promptkd.losses import Outputs, divergence, loss_terms
from promptkd.methods.base import distill_terms, outputs_of, response_mask
from promptkd.testing import (
    bpe_tokenizer,
    byte_tokenizer,
    chat_tokenizer,
    tiny_llama,
    write_tiny_jsonl,
)
from promptkd.training.loop import Trainer


def batch_of(tokenizer, pairs, *, eos=True):
    """A SequenceBatch of (prompt text, response text) pairs, responses ending in EOS."""
    examples = [Example(tokenizer(p)["input_ids"],
                        tokenizer(r, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else []), [])
                for p, r in pairs]
    return collate_sequences(examples, tokenizer.pad_token_id)


PAIRS = [("### Instruction:\nSay hello.\n\n### Response:\n", "hello world"),
         ("Name a colour.\n", "blue, héllo wörld")]


# ------------------------------------------------------------------------------ alignment


def test_align_groups_multi_token_words():
    # "hello world": student h|ello|Ġworld, teacher hel|lo|Ġwor|ld
    assert align([1, 5, 11], [3, 5, 9, 11]) == [(range(0, 2), range(0, 2)), (range(2, 3), range(2, 4))]


def test_align_one_to_one_and_leftovers():
    assert align([1, 2, 3], [1, 2, 3]) == [(range(i, i + 1), range(i, i + 1)) for i in range(3)]
    # texts of different lengths: what follows the last common boundary joins the last group
    assert align([2, 4, 6], [2, 5]) == [(range(0, 1), range(0, 1)), (range(1, 3), range(1, 2))]
    assert align([2, 4], [2]) == [(range(0, 2), range(0, 1))]
    assert align([], [1]) == [] and align([1], []) == []


def test_align_zero_width_token_joins_the_next_group():
    # a student token that only starts a character (end unchanged) joins the token that completes it
    assert align([1, 1, 2], [1, 2]) == [(range(0, 1), range(0, 1)), (range(1, 3), range(1, 2))]


def test_char_ends_whitespace_and_multibyte():
    student, teacher = byte_tokenizer(), bpe_tokenizer()
    ids = student("a é", add_special_tokens=False)["input_ids"]  # a, Ġ, 0xC3, 0xA9
    assert char_ends(student, ids) == [1, 2, 2, 3]  # the first byte of é ends nowhere: the second owns é
    ids = teacher("### Response:", add_special_tokens=False)["input_ids"]
    assert teacher.convert_ids_to_tokens(ids) == ["###", "ĠResponse", ":"]
    assert char_ends(teacher, ids) == [3, 12, 13]  # the leading-space token spans its space


# ------------------------------------------------------------------------------ vocabulary


def test_shared_columns_byte_level_against_bpe():
    student, teacher = byte_tokenizer(), bpe_tokenizer()
    pairs = shared_columns(student, teacher)
    assert len(pairs) == 257  # the 256 bytes, and EOS by role ("</s>" against "<|endoftext|>")
    assert pairs[student.eos_token_id] == teacher.eos_token_id == 0
    for text in ("a", " ", "\n"):
        assert pairs[student.convert_tokens_to_ids(student.tokenize(text))[0]] == teacher(text)["input_ids"][0]
    assert teacher.convert_tokens_to_ids("ĠResponse") not in pairs.values()  # a merge the student lacks


def sentencepiece_style_tokenizer():
    """A Metaspace BPE ('▁' marks a word's leading space), trained here on the same text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(["### Response: hello world"] * 8,
                                trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def test_leading_space_markers_match_across_conventions():
    sp, bpe = sentencepiece_style_tokenizer(), bpe_tokenizer(texts=["### Response: hello world"] * 8)
    assert token_surfaces(sp)[sp.convert_tokens_to_ids("▁hello")] == b" hello"
    assert token_surfaces(bpe)[bpe.convert_tokens_to_ids("Ġhello")] == b" hello"
    pairs = shared_columns(sp, bpe)
    assert pairs[sp.convert_tokens_to_ids("▁hello")] == bpe.convert_tokens_to_ids("Ġhello")
    assert sp.convert_tokens_to_ids("hel") in pairs  # no marker: a word's inside, on both sides
    assert pairs[sp.eos_token_id] == bpe.eos_token_id  # by role
    assert token_surfaces(sp)[sp.unk_token_id] == ("special", "<unk>")


def test_byte_fallback_pieces_give_way_to_ordinary_tokens_of_the_same_text():
    """A SentencePiece vocabulary lists its byte-fallback pieces first (Llama 2: '<0x2E>' at id 49, '.' at
    29889): the shared vocabulary pairs the token the model writes, '.', not the byte piece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "<0x2E>": 2, "<0x61>": 3, ".": 4, "a": 5, "▁": 6, "▁a": 7}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()])
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    bpe = bpe_tokenizer(texts=["a. a."] * 8)
    assert token_surfaces(sp)[2] == token_surfaces(sp)[4] == b"."
    pairs = shared_columns(sp, bpe)
    assert pairs[4] == bpe.convert_tokens_to_ids(".") and pairs[5] == bpe.convert_tokens_to_ids("a")
    assert 2 not in pairs and 3 not in pairs


# ------------------------------------------------------------------------------ teacher batch


def test_teacher_batch_retokenizes_and_maps_special_tokens():
    student, teacher = byte_tokenizer(), bpe_tokenizer()
    batch = batch_of(student, PAIRS)
    a = CrossTokenizer(student, teacher).teacher_batch(batch)
    t = a.teacher_batch
    for b, (prompt, response) in enumerate(PAIRS):
        prompt_ids = t.input_ids[b, : t.prompt_length][t.attention_mask[b, : t.prompt_length].bool()].tolist()
        assert teacher.decode(prompt_ids) == prompt
        response_ids = t.input_ids[b, t.prompt_length :][t.loss_mask[b, t.prompt_length :]].tolist()
        assert response_ids == teacher(response, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
        groups = a.row == b
        s_ids, t_ids = a.student_ids[b].tolist(), a.teacher_ids[b].tolist()
        texts = [(student.decode(s_ids[s0 : s1 + 1]), teacher.decode(t_ids[t0 : t1 + 1]))
                 for (s0, s1), (t0, t1) in zip(a.student_span[groups].tolist(), a.teacher_span[groups].tolist(), strict=True)]
        assert all(x == y for x, y in texts[:-1])  # each group: the same text on both sides
        assert texts[-1] == ("</s>", "<|endoftext|>")  # EOS, its own group
        spans = a.student_span[groups].tolist()
        assert [s0 for s0, _ in spans] == [0] + [s1 + 1 for _, s1 in spans[:-1]]  # the groups tile the response
    assert (a.num_student_tokens > 1).any()  # some groups merge several student tokens ("Ġworld" ...)


def test_text_that_spells_a_teacher_special_token_stays_text():
    """The data rule (promptkd.data.dataset): text never becomes a special token, on the teacher's side too."""
    student, teacher = byte_tokenizer(), bpe_tokenizer()
    response = "a <|endoftext|> b"
    batch = collate_sequences([Example(student("Say it.")["input_ids"],
                                       student(response, add_special_tokens=False)["input_ids"] + [student.eos_token_id],
                                       [])], student.pad_token_id)
    t = CrossTokenizer(student, teacher).teacher_batch(batch).teacher_batch
    response_ids = t.input_ids[0, t.prompt_length :].tolist()
    assert response_ids.count(teacher.eos_token_id) == 1 and response_ids[-1] == teacher.eos_token_id
    assert teacher.decode(response_ids[:-1]) == response


def test_chat_template_prompt_maps_markers_and_bos():
    """A ChatML student and a Llama-3-style teacher: the student's end-of-turn EOS maps to the teacher's
    by role, a marker the teacher lacks is left out, and the teacher's own BOS leads its prompt."""
    student, teacher = chat_tokenizer("chatml"), chat_tokenizer("llama3")
    prompt = student.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    batch = collate_sequences([Example(student(prompt, add_special_tokens=False)["input_ids"],
                                       student("yes", add_special_tokens=False)["input_ids"] + [student.eos_token_id], [])],
                              student.pad_token_id)
    a = CrossTokenizer(student, teacher).teacher_batch(batch)
    t = a.teacher_batch
    ids = t.input_ids[0].tolist()
    assert ids[0] == teacher.bos_token_id
    assert teacher.decode(ids[1 : t.prompt_length]) == "user\nhi<|eot_id|>\nassistant\n"  # <|im_start|> left out
    assert ids[t.prompt_length :] == teacher("yes", add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]


# ------------------------------------------------------------------------------ the loss


def test_uld_and_hybrid_by_hand():
    q, p = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64), torch.tensor([[0.4, 0.6]], dtype=torch.float64)
    assert uld(q, p).item() == pytest.approx(abs(0.5 - 0.6) + abs(0.3 - 0.4) + 0.2)
    # column 0 of q is column 1 of p (shared); the rest ULD, weighted 1/2
    log_q, log_p = q.log(), torch.tensor([[0.3, 0.5, 0.2]], dtype=torch.float64).log()
    div = divergence("forward_kl")
    value = hybrid(div, log_q, log_p, (torch.tensor([0]), torch.tensor([1])), 0.5)
    exact = 0.0  # one shared column renormalises to probability 1 on both sides
    outside = abs(0.5 - 0.3) + abs(0.3 - 0.2)  # q's {0.5, 0.3} against p's {0.3, 0.2}
    assert value.item() == pytest.approx(0.5 * exact + 0.5 * outside)


def test_two_teacher_sides_compare_every_teacher_position_weighted_by_its_group():
    """PromptKD's regulariser across tokenizers (prompted vs base teacher, both on the teacher's tokens):
    every teacher position counts, a group's m_g positions sharing its n_g student tokens."""
    torch.manual_seed(0)
    # one row; groups (student 0-1, teacher 0) and (student 2, teacher 1-3); teacher position 4 is padding
    a = Alignment(teacher_batch=None, row=torch.tensor([0, 0]), student_span=torch.tensor([[0, 1], [2, 2]]),
                  teacher_span=torch.tensor([[0, 0], [1, 3]]), student_ids=torch.zeros(1, 3, dtype=torch.long),
                  teacher_ids=torch.zeros(1, 5, dtype=torch.long), student_columns=torch.arange(6),
                  teacher_columns=torch.arange(6))
    q = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    p = torch.randn(1, 5, 6, dtype=torch.float64)
    div = divergence("reverse_kl")
    loss, (value,) = cross_terms(Aligned(Outputs(q), a), [(div, Aligned(Outputs(p), a), 1.0)])
    kl = div(q, p)[0]  # (5,)
    expected = 2.0 * kl[0] + (kl[1] + kl[2] + kl[3]) / 3.0
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0.0)
    assert value == pytest.approx(float(expected.detach()), rel=1e-14)
    loss.backward()
    assert bool((q.grad[0, 4] == 0).all()) and bool((q.grad[0, :4] != 0).any())  # padding gets no gradient


def test_group_log_probs_is_the_chain_rule():
    torch.manual_seed(0)
    logits, ids = torch.randn(1, 3, 5, dtype=torch.float64), torch.tensor([[4, 2, 1]])
    rows = group_log_probs(logits, ids, torch.tensor([0, 0]), torch.tensor([[0, 1], [2, 2]]))
    log_p = logits.log_softmax(-1)[0]
    torch.testing.assert_close(rows[0], log_p[1] + log_p[0, 4], rtol=0, atol=1e-14)
    torch.testing.assert_close(rows[1], log_p[2], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "skew_reverse_kl",
                                  "alpha_beta_divergence"])
def test_cross_tokenizer_equals_exact_path_for_one_tokenizer(name):
    """float64: identical tokenizers through the cross-tokenizer path give the exact path's value and
    gradient, for the student's loss and for a loss trained on the teacher's side (PromptKD's)."""
    tok = byte_tokenizer()
    batch = batch_of(tok, PAIRS)
    a = CrossTokenizer(tok, tok).teacher_batch(batch)
    assert torch.equal(a.teacher_batch.input_ids, batch.input_ids)
    assert torch.equal(a.num_student_tokens, torch.ones(len(a.row), dtype=torch.float64))
    student, teacher = tiny_llama(num_layers=1, seed=1).double(), tiny_llama(num_layers=2, seed=0).double()
    div = divergence(name, alpha=0.1, beta=0.3)
    mask = response_mask(batch)
    with torch.no_grad():
        target = outputs_of(teacher, batch, None, len(tok))
    logits = outputs_of(student, batch, None, len(tok)).states.detach().requires_grad_(True)
    exact, (exact_value,) = loss_terms(Outputs(logits), [(div, target, 1.0)], mask)
    (exact_grad,) = torch.autograd.grad(exact, logits)
    cross, (cross_value,) = distill_terms(Outputs(logits), [(div, Aligned(target, a), 1.0)], mask)
    (cross_grad,) = torch.autograd.grad(cross, logits)
    torch.testing.assert_close(cross, exact, rtol=1e-12, atol=1e-13)
    assert cross_value == pytest.approx(exact_value, rel=1e-12)
    torch.testing.assert_close(cross_grad, exact_grad, rtol=1e-10, atol=1e-13)
    # trained on the teacher's tokenization, against the student and against itself (prompt loss)
    trained = Aligned(Outputs(logits), a)
    cross, values = cross_terms(trained, [(div, target, 1.0),
                                          (div, Aligned(target, a), 0.5)])
    exact, exact_values = loss_terms(Outputs(logits), [(div, target, 1.0), (div, target, 0.5)], mask)
    torch.testing.assert_close(cross, exact, rtol=1e-12, atol=1e-13)
    assert values == pytest.approx(exact_values, rel=1e-12)


# ------------------------------------------------------------------------------ training runs


def cross_pair():
    teacher_tokenizer = bpe_tokenizer()
    teacher = tiny_llama(vocab_size=len(teacher_tokenizer), num_layers=2, seed=0, pad_token_id=0, eos_token_id=0,
                         bos_token_id=0)
    return tiny_llama(num_layers=1, seed=1), teacher, byte_tokenizer(), teacher_tokenizer


def run(tmp_path, method, *, mode="auto", same=False, steps=2, **sections):
    data = write_tiny_jsonl(tmp_path / "train.jsonl", 8)
    cfg = {"method": method, "model": {"cross_tokenizer": mode}, "data": {"train": str(data)},
           "train": {"output_dir": str(tmp_path / f"run_{method}_{mode}"), "max_steps": steps, "batch_size": 2,
                     "warmup_steps": 0, "learning_rate": 1e-3, "seed": 3, "save_every_minutes": 0},
           "sampling": {"max_new_tokens": 6}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    student, teacher, tokenizer, teacher_tokenizer = cross_pair()
    if same:
        teacher, teacher_tokenizer = tiny_llama(num_layers=2, seed=0), None
    trainer = Trainer(config_from_dict(cfg, check_required=False), student=student, teacher=teacher,
                      tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer, show_progress=False)
    trainer.train()
    return trainer


@pytest.mark.parametrize("method,sections", [
    ("kd", {}), ("gkd", {}), ("promptkd", {"promptkd": {"num_virtual_tokens": 2}}),
    ("distillm", {"distillm": {"prob_step": 0.0, "initial_student_prob": 0.5}}),
])
def test_cross_tokenizer_methods_train(tmp_path, caplog, method, sections):
    with caplog.at_level(logging.INFO, logger="promptkd.training.assembly"):
        trainer = run(tmp_path, method, **sections)
    lines = [r.getMessage() for r in caplog.records if "distillation" in r.getMessage()]
    assert len(lines) == 1 and "tokenizers differ: cross-tokenizer distillation (257 shared tokens" in lines[0]
    assert trainer.ctx.cross_tokenizer is not None and trainer.step == 2
    records = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    key = {"promptkd": "prompt/kl_to_student", "distillm": "student/kd"}.get(method, "student/kd")
    assert len(records) == 2 and all(0.0 < r[key] < 50.0 for r in records), records  # a real divergence, not 0 / inf


def test_auto_does_not_take_a_model_too_small_for_its_tokenizer_for_two_tokenizers(tmp_path):
    """One tokenizer, a teacher with fewer output rows than its ids: the checkpoint is wrong, not the path."""
    data = write_tiny_jsonl(tmp_path / "train.jsonl", 8)
    cfg = config_from_dict({"method": "kd", "data": {"train": str(data)},
                            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2}},
                           check_required=False)
    trainer = Trainer(cfg, student=tiny_llama(num_layers=1, seed=1), teacher=tiny_llama(vocab_size=200, num_layers=1, pad_token_id=0),
                      tokenizer=byte_tokenizer(), show_progress=False)
    with pytest.raises(UserError, match="teacher model has 200 output rows but its tokenizer has 259 tokens"):
        trainer.setup()


def test_cross_tokenizer_seqkd_trains_on_teacher_responses(tmp_path):
    responses = write_tiny_jsonl(tmp_path / "teacher_responses.jsonl", 8)
    trainer = run(tmp_path, "seqkd", data={"teacher_responses": str(responses)})
    assert trainer.step == 2


def test_one_tokenizer_takes_the_exact_path_and_on_forces_the_other(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="promptkd.training.assembly"):
        exact = run(tmp_path, "kd", same=True)
        forced = run(tmp_path, "kd", mode="on", same=True)
    assert exact.ctx.cross_tokenizer is None and forced.ctx.cross_tokenizer is not None
    messages = [r.getMessage() for r in caplog.records if "distillation" in r.getMessage()]
    assert "tokenizers match: token-level distillation" in messages[0]
    assert messages[1].startswith("model.cross_tokenizer on: cross-tokenizer distillation (259 shared tokens")
    for p, q in zip(exact.unwrapped_student.parameters(), forced.unwrapped_student.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)  # the same two KD steps (float32)


def test_off_refuses_two_tokenizers_and_methods_that_need_one(tmp_path):
    with pytest.raises(UserError, match="model.cross_tokenizer auto"):
        run(tmp_path, "kd", mode="off")
    with pytest.raises(UserError, match="minillm samples with the teacher"):
        run(tmp_path, "minillm")


def test_cross_tokenizer_promptkd_20_steps_lower_the_students_divergence_to_the_teacher():
    """The issue's 20-step run, as benchmarks/cross_tokenizer_promptkd.py makes it (a byte-tokenizer student,
    a BPE teacher): the student's hybrid reverse KL to the teacher on fixed responses falls. Measured:
    6.20 -> 4.89, falling at every step; the bound asks for a fall of a tenth, well inside that."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cross_tokenizer_promptkd.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "20"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    curve = result["divergence_curve"]
    assert len(curve) == 21 and curve[-1] < 0.9 * curve[0], curve
