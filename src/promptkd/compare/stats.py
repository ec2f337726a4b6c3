"""Statistics of a method comparison study: paired t-tests over training seeds, Holm, TOST.

A cell is one (arm, training seed): one trained model, scored by the mean ROUGE-L over the
evaluation prompts and evaluation seeds. Arms are compared by a paired t-test over training
seeds, on the differences score(arm, seed) - score(baseline, seed). Why this test:

- The training seed is the unit that is replicated, so n is the number of seeds, not prompts.
- Every arm is evaluated on the same prompts, so prompt effects cancel in the paired difference.
- With balanced cells, the mixed model with prompts nested in seeds gives the same fixed-effect
  test as this t-test on the seed means; the t-test is the short way to the same answer.
- A bootstrap over 3 seeds has 27 resamples; each extreme (one seed drawn three times) carries
  3.7% of the mass, more than a 2.5% tail, so it over-rejects.

A report tests several comparisons, so each p is Holm-adjusted over all of them. "No better
than" is a claim of its own: it needs a declared equivalence margin and a TOST (two one-sided
tests), Holm-adjusted over the report's equivalence tests. tests/test_compare_stats.py pushes
simulated null studies through `compare` to show how often it calls a difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats

from promptkd.errors import UserError


@dataclass(frozen=True)
class Comparison:
    """One arm against its baseline, paired by training seed."""

    arm: str  # the arm compared
    baseline: str  # against this arm
    seeds: tuple[int, ...]  # training seeds present in both arms (the pairs)
    differences: tuple[float, ...]  # per seed: score(arm, seed) - score(baseline, seed)
    mean: float  # mean paired difference (nan without a common seed)
    ci: tuple[float, float]  # two-sided (1 - alpha) t-interval of `mean` over seeds (n - 1 df), unadjusted
    p: float  # two-sided paired t-test p; nan when n < 2 or all differences are 0
    p_holm: float  # `p` Holm-adjusted over every difference test of the report
    p_equivalence: float | None  # TOST p against +/- margin; None without a margin
    p_equivalence_holm: float | None  # Holm-adjusted over the report's equivalence tests
    verdict: str  # "better" | "worse" | "equivalent" | "unresolved"


class _PairedTest(NamedTuple):
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    ci: tuple[float, float]
    p: float
    p_equivalence: float | None


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of `pvalues`, returned in their order.

    With m p-values, the k-th smallest (k = 1..m) becomes (m - k + 1) * p, made non-decreasing
    in k and capped at 1. A nan stays nan and is not counted in m. Calling a difference where the
    adjusted p < alpha keeps the family-wise error rate at most alpha, whatever the dependence.
    """
    adjusted = [math.nan] * len(pvalues)
    ranked = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    running_max = 0.0
    for k, (p, i) in enumerate(ranked):
        running_max = max(running_max, min(1.0, (len(ranked) - k) * p))
        adjusted[i] = running_max
    return adjusted


def mean_interval(values: Sequence[float], alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its two-sided (1 - alpha) Student t-interval.

    The values are replicates, one per training seed (one arm's scores, or one trace value per
    seed). The interval is mean +/- t * s / sqrt(n): s is the sample standard deviation (n - 1
    denominator) and t the 1 - alpha/2 quantile of Student's t with n - 1 degrees of freedom
    (scipy.stats.t.ppf). It is not adjusted for multiplicity. With one value, low and high are nan.
    Raises UserError without values or when alpha is not in (0, 1).
    """
    _check_alpha(alpha)
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise UserError("mean_interval needs at least one value, got none")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half_width = float(stats.t.ppf(1 - alpha / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half_width, mean + half_width


def describe_interval(alpha: float, n: int) -> str:
    """The sentence a report prints under a table of `compare` intervals over n training seeds."""
    _check_alpha(alpha)
    seeds = "training seed" if n == 1 else "training seeds"
    return (f"{100 * (1 - alpha):g}% t-interval of the mean paired difference over {n} {seeds} "
            f"({n - 1} df), not adjusted for multiplicity")


def compare(
    scores: Mapping[str, Mapping[int, float]],
    pairs: Sequence[tuple[str, str]],
    *,
    alpha: float = 0.05,
    margin: float | None = None,
) -> list[Comparison]:
    """Compare each (arm, baseline) of `pairs` over the training seeds both arms have.

    Args:
        scores: scores[arm][training_seed] is the cell's score (mean ROUGE-L over its evaluation
            prompts and evaluation seeds). A seed missing from one arm drops out of its pairs.
        pairs: (arm, baseline) comparisons, in the report's order.
        alpha: level of every test and of the (1 - alpha) intervals.
        margin: equivalence margin, in score units; with it, each pair also gets a TOST of
            |true difference| < margin.

    Returns one Comparison per pair. Its verdict is "better" or "worse" (the sign of the mean)
    when the Holm-adjusted p < alpha; else "equivalent" when a margin is given and the
    Holm-adjusted TOST p < alpha; else "unresolved". A pair with fewer than 2 common seeds has
    no test: nan p-values and interval, "unresolved".

    Raises UserError for an arm without scores, an arm paired with itself, a non-finite score,
    alpha not in (0, 1) or a margin that is not a positive number.
    """
    _check_alpha(alpha)
    if margin is not None and not (math.isfinite(margin) and margin > 0):
        raise UserError(f"the equivalence margin must be a positive number of score units, got {margin}")
    for arm, by_seed in scores.items():
        for seed, score in by_seed.items():
            if not math.isfinite(score):
                raise UserError(f"arm {arm!r}, training seed {seed}: score {score} is not a finite number")
    for arm, baseline in pairs:
        for name in (arm, baseline):
            if name not in scores:
                raise UserError(f"pair ({arm!r}, {baseline!r}): arm {name!r} has no scores; "
                                f"arms with scores: {', '.join(map(repr, scores))}")
        if arm == baseline:
            raise UserError(f"pair ({arm!r}, {baseline!r}) compares an arm with itself")

    tests = [_paired_test(scores[arm], scores[baseline], alpha, margin) for arm, baseline in pairs]
    p_holm = holm([test.p for test in tests])
    if margin is None:
        p_equivalence_holm: list[float | None] = [None] * len(tests)
    else:
        p_equivalence_holm = holm([test.p_equivalence for test in tests])
    return [
        Comparison(arm, baseline, **test._asdict(), p_holm=ph, p_equivalence_holm=pe,
                   verdict=_verdict(test.mean, ph, pe, alpha))
        for (arm, baseline), test, ph, pe in zip(pairs, tests, p_holm, p_equivalence_holm, strict=True)
    ]


def _paired_test(arm: Mapping[int, float], baseline: Mapping[int, float], alpha: float,
                 margin: float | None) -> _PairedTest:
    seeds = tuple(sorted(set(arm) & set(baseline)))
    a = np.array([arm[s] for s in seeds], dtype=float)
    b = np.array([baseline[s] for s in seeds], dtype=float)
    differences = a - b
    if len(seeds) < 2:
        mean = float(differences.mean()) if seeds else math.nan
        return _PairedTest(seeds, tuple(differences.tolist()), mean, (math.nan, math.nan), math.nan,
                           None if margin is None else math.nan)
    mean, low, high = mean_interval(differences, alpha)
    p = float(stats.ttest_rel(a, b).pvalue)
    p_equivalence = None
    if margin is not None:
        # TOST: equivalence needs both one-sided tests to reject, mean > -margin and mean < +margin.
        # One scipy call runs both, the second as mean(-differences) > -margin; p is the larger.
        one_sided = stats.ttest_1samp(np.stack([differences, -differences]), -margin, axis=1, alternative="greater")
        p_equivalence = float(one_sided.pvalue.max())
    return _PairedTest(seeds, tuple(differences.tolist()), mean, (low, high), p, p_equivalence)


def _verdict(mean: float, p_holm: float, p_equivalence_holm: float | None, alpha: float) -> str:
    if p_holm < alpha:
        return "better" if mean > 0 else "worse"
    if p_equivalence_holm is not None and p_equivalence_holm < alpha:
        return "equivalent"
    return "unresolved"


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha}")
