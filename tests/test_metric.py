"""ROUGE-L pinned to hand-computed values.

rouge-score's tokenizer: lowercase, every non [a-z0-9] run is a separator, Porter stemming
of tokens longer than 3 characters. ROUGE-L: LCS over tokens, P = LCS / |prediction|,
R = LCS / |reference|, F = 2PR / (P + R); we report 100 F, max over references.
"""

from __future__ import annotations

import pytest

from promptkd.errors import UserError
from promptkd.metric import corpus_rouge_l, rouge_l


def test_identical_is_100():
    assert rouge_l("The cat sat on the mat.", ["The cat sat on the mat."]) == pytest.approx(100.0)


def test_stemming():
    # prediction "running dogs" -> [run, dog]  ("running" and "dogs" are > 3 chars: stemmed)
    # reference  "the dog runs" -> [the, dog, run]  ("the", "dog" are <= 3 chars: kept)
    # LCS([run, dog], [the, dog, run]) = 1; P = 1/2, R = 1/3
    # F = 2 * (1/2) * (1/3) / (1/2 + 1/3) = (1/3) / (5/6) = 0.4
    assert rouge_l("running dogs", ["the dog runs"]) == pytest.approx(40.0)
    # same order: [dog, run] vs [the, dog, run]: LCS 2, P = 1, R = 2/3, F = (4/3) / (5/3) = 0.8
    assert rouge_l("dogs running", ["the dog runs"]) == pytest.approx(80.0)


def test_punctuation_and_case_ignored():
    # both tokenize to [the, dog, run]
    assert rouge_l("THE DOG -- RUNS!!!", ["the dog runs"]) == pytest.approx(100.0)
    # "it's" -> [it, s]; "its" -> [its]: [it, s, fine] vs [its, fine]: LCS 1 (fine)
    # P = 1/3, R = 1/2, F = (1/3) / (5/6) = 0.4
    assert rouge_l("it's fine", ["its fine"]) == pytest.approx(40.0)


def test_max_over_references():
    # prediction [a, b, c, d]
    # ref 1 [a, b]:          LCS 2, P = 2/4, R = 1,   F = 1 / 1.5     = 2/3
    # ref 2 [a, b, c, d, e]: LCS 4, P = 1,   R = 4/5, F = 1.6 / 1.8   = 8/9
    # ref 3 [z]:             0
    assert rouge_l("a b c d", ["a b", "a b c d e", "z"]) == pytest.approx(800.0 / 9.0)
    assert rouge_l("a b c d", ["a b c d e", "a b"]) == pytest.approx(800.0 / 9.0)


def test_empty_prediction_is_zero():
    assert rouge_l("", ["the dog runs"]) == 0.0
    assert rouge_l("   ", ["the dog runs"]) == 0.0
    assert rouge_l("!!!", ["the dog runs"]) == 0.0


def test_reference_argument_errors():
    with pytest.raises(UserError, match="at least one reference"):
        rouge_l("x", [])
    with pytest.raises(UserError, match="list of reference"):
        rouge_l("x", "x")


def test_corpus_mean():
    # (100 + 40 + 0) / 3
    score = corpus_rouge_l(
        ["the dog runs", "running dogs", ""], [["the dog runs"], ["the dog runs"], ["x"]]
    )
    assert score == pytest.approx(140.0 / 3.0)


def test_corpus_count_mismatch_raises_never_truncates():
    with pytest.raises(UserError) as err:
        corpus_rouge_l(["a", "b", "c"], [["a"], ["b"]])
    assert "3 predictions" in str(err.value) and "2 reference lists" in str(err.value)
    with pytest.raises(UserError, match="1 predictions and 2"):
        corpus_rouge_l(["a"], [["a"], ["b"]])
    with pytest.raises(UserError, match="empty"):
        corpus_rouge_l([], [])
