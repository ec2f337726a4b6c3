"""ROUGE-L as MiniLLM / PromptKD report it.

F-measure of `rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`, the
maximum over an example's references, averaged over examples and scaled to [0, 100].
rouge-score lowercases, treats every non [a-z0-9] character as a separator and Porter-stems
tokens longer than 3 characters (so text in non-Latin scripts has no tokens and scores 0).

Unlike the reference evaluation script, a count mismatch between predictions and references
is an error, never a silent truncation.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from promptkd.errors import UserError


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure x 100 of one prediction, max over its references; in [0, 100].

    An empty prediction (or one with no alphanumeric token) scores 0.
    Raises UserError when `references` is empty or a bare string.
    """
    if isinstance(references, str):
        raise UserError("rouge_l expects a list of reference strings, got a single string")
    if len(references) == 0:
        raise UserError("rouge_l needs at least one reference, got an empty list")
    scorer = _scorer()
    # RougeScorer.score(target, prediction): the reference comes first.
    best = max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)
    return 100.0 * best


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean per-example ROUGE-L (see `rouge_l`) in [0, 100].

    Raises UserError when the two lists differ in length (both counts in the message) or
    are empty.
    """
    if len(predictions) != len(references):
        raise UserError(
            f"ROUGE-L needs one reference list per prediction: got {len(predictions)} predictions "
            f"and {len(references)} reference lists"
        )
    if len(predictions) == 0:
        raise UserError("ROUGE-L of an empty set of predictions is undefined")
    total = sum(rouge_l(p, refs) for p, refs in zip(predictions, references, strict=True))
    return total / len(predictions)
