"""promptkd.compare.stats: Holm by hand, compare() on a hand-made study, and simulated studies.

The simulations push whole studies through `compare` (the report's own code): under the null it
calls a difference at most about 5% of the time at every seed spread (the old 3-seed bootstrap
did not), it finds a real 1-point difference, and its TOST keeps its size at the margin.
Run with -s to see the measured rates.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import stats

from promptkd.compare.stats import Comparison, compare, describe_interval, holm, mean_interval
from promptkd.errors import UserError

SEEDS = (1, 2, 3, 4, 5)


# --- Holm -------------------------------------------------------------------------------------

def test_holm_worked_example():
    # sorted: 0.005 (x4) = 0.02, 0.01 (x3) = 0.03, 0.03 (x2) = 0.06, 0.04 (x1) = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_is_capped_at_one_and_monotone():
    # 0.6 x 3, 0.7 x 2 cap at 1; 0.9 x 1 = 0.9 is raised to 1 by the step-down.
    assert holm([0.6, 0.7, 0.9]) == [1.0, 1.0, 1.0]
    # 0.3 x 2 = 0.6, then 0.5 x 1 = 0.5 is raised to 0.6.
    assert holm([0.5, 0.3]) == pytest.approx([0.6, 0.6])


def test_holm_passes_nan_through_and_does_not_count_it():
    adjusted = holm([0.01, math.nan, 0.04])
    assert math.isnan(adjusted[1])
    assert [adjusted[0], adjusted[2]] == pytest.approx([0.02, 0.04])  # m = 2, not 3
    assert holm([]) == []
    assert all(math.isnan(p) for p in holm([math.nan, math.nan]))


# --- compare() on a hand-made study -----------------------------------------------------------

BASELINE = dict(zip(SEEDS, [10.0, 10.2, 9.9, 10.1, 10.0], strict=True))


def shifted(differences, seeds=SEEDS):
    return {s: BASELINE[s] + d for s, d in zip(seeds, differences, strict=True)}


STUDY = {
    "baseline": BASELINE,
    "strong": shifted([1.0, 1.1, 0.9, 1.05, 0.95]),
    "weak": shifted([-1.0, -0.9, -1.1, -0.95, -1.05]),
    "noisy": shifted([0.5, -0.6, 0.4, -0.3, 0.1]),
    "same": shifted([0.01, -0.02, 0.015, -0.01, 0.005]),
    "partial": {1: 10.5, 2: 10.4, 3: 10.3, 6: 11.0},  # seed 6 is not in the baseline, 4 and 5 are not here
    "single": {1: 10.5},
}
PAIRS = [(arm, "baseline") for arm in STUDY if arm != "baseline"]


@pytest.fixture(scope="module")
def report() -> dict[str, Comparison]:
    return {c.arm: c for c in compare(STUDY, PAIRS, margin=0.3)}


def test_verdicts(report):
    assert {arm: c.verdict for arm, c in report.items()} == {
        "strong": "better", "weak": "worse", "noisy": "unresolved", "same": "equivalent",
        "partial": "unresolved", "single": "unresolved",
    }


def test_pairs_are_the_common_seeds(report):
    assert report["strong"].seeds == SEEDS
    assert report["strong"].differences == pytest.approx([1.0, 1.1, 0.9, 1.05, 0.95])
    assert report["partial"].seeds == (1, 2, 3)
    assert report["partial"].differences == pytest.approx([0.5, 0.2, 0.4])
    assert report["partial"].mean == pytest.approx(1.1 / 3)


def test_tests_and_interval_are_scipys(report):
    for arm in ("strong", "weak", "noisy", "same", "partial"):
        c = report[arm]
        a = [STUDY[arm][s] for s in c.seeds]
        b = [BASELINE[s] for s in c.seeds]
        scipy_test = stats.ttest_rel(a, b)
        assert c.p == pytest.approx(scipy_test.pvalue, rel=1e-9)
        assert c.ci == pytest.approx(tuple(scipy_test.confidence_interval(0.95)), rel=1e-9)
        lower = stats.ttest_1samp(c.differences, -0.3, alternative="greater").pvalue
        upper = stats.ttest_1samp(c.differences, 0.3, alternative="less").pvalue
        assert c.p_equivalence == pytest.approx(max(lower, upper), rel=1e-9)
    comparisons = list(report.values())
    assert [c.p_holm for c in comparisons] == pytest.approx(holm([c.p for c in comparisons]), nan_ok=True)
    assert [c.p_equivalence_holm for c in comparisons] == pytest.approx(
        holm([c.p_equivalence for c in comparisons]), nan_ok=True)


def test_a_single_common_seed_has_no_test(report):
    c = report["single"]
    assert c.seeds == (1,) and c.mean == pytest.approx(0.5)
    assert all(math.isnan(x) for x in (c.p, c.p_holm, c.p_equivalence, c.p_equivalence_holm, *c.ci))
    (disjoint,) = compare({"a": {7: 10.0}, "b": {1: 10.0}}, [("a", "b")])
    assert disjoint.seeds == () and math.isnan(disjoint.mean) and disjoint.verdict == "unresolved"


def test_no_margin_no_equivalence():
    comparisons = compare(STUDY, [("same", "baseline")])
    assert comparisons[0].p_equivalence is None and comparisons[0].p_equivalence_holm is None
    assert comparisons[0].verdict == "unresolved"


@pytest.mark.parametrize("scores, pairs, kwargs, message", [
    (STUDY, [("strong", "missing")], {}, "'missing' has no scores"),
    (STUDY, [("strong", "strong")], {}, "with itself"),
    ({"a": {1: 1.0, 2: math.nan}, "b": {1: 1.0, 2: 2.0}}, [("a", "b")], {}, "arm 'a', training seed 2"),
    (STUDY, PAIRS, {"alpha": 1.5}, "alpha"),
    (STUDY, PAIRS, {"margin": -0.1}, "margin"),
])
def test_bad_input_is_named(scores, pairs, kwargs, message):
    with pytest.raises(UserError, match=message):
        compare(scores, pairs, **kwargs)


def test_mean_interval():
    values = [6.90, 6.90, 6.94, 7.10, 6.85]
    mean, low, high = mean_interval(values, 0.1)
    assert mean == pytest.approx(np.mean(values))
    expected = stats.t.interval(0.9, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (low, high) == pytest.approx(expected, rel=1e-12)
    assert mean_interval([7.0])[0] == 7.0 and all(math.isnan(x) for x in mean_interval([7.0])[1:])
    with pytest.raises(UserError, match="at least one value"):
        mean_interval([])


def test_describe_interval():
    assert describe_interval(0.05, 5) == ("95% t-interval of the mean paired difference over 5 training seeds "
                                          "(4 df), not adjusted for multiplicity")
    assert describe_interval(0.1, 3).startswith("90% t-interval") and "(2 df)" in describe_interval(0.1, 3)


# --- simulated studies ------------------------------------------------------------------------

NUM_PROMPTS = 200
PROMPT_SD = 8.0  # prompt difficulty, shared by every arm and seed
NOISE_SD = 1.5  # per (arm, seed, prompt): a cell's noise SE is 1.5 / sqrt(200) = 0.106


def simulate(rng, num_studies: int, arm_means, seed_sd: float) -> np.ndarray:
    """Cell scores (study, arm, seed): each the mean over NUM_PROMPTS simulated prompt scores.

    A prompt's score is its prompt effect (shared by all arms) + the arm's true mean + the
    (arm, seed) effect, SD seed_sd + noise per (arm, seed, prompt).
    """
    shape = (num_studies, len(arm_means), len(SEEDS))
    per_prompt = rng.normal(0.0, NOISE_SD, (*shape, NUM_PROMPTS))
    per_prompt += rng.normal(0.0, PROMPT_SD, (num_studies, 1, 1, NUM_PROMPTS))
    per_prompt += rng.normal(0.0, seed_sd, (*shape, 1))
    per_prompt += np.asarray(arm_means, dtype=float)[:, None, None]
    return per_prompt.mean(axis=-1)


def run_studies(cells: np.ndarray, arms, pairs, **kwargs) -> list[list[Comparison]]:
    return [compare({arm: dict(zip(SEEDS, study[a].tolist(), strict=True)) for a, arm in enumerate(arms)}, pairs, **kwargs)
            for study in cells]


def test_null_studies_call_a_difference_at_most_five_percent_of_the_time():
    """All arms have the same true mean; a study is falsely "resolved" when any verdict is
    better/worse. 4,000 studies per seed SD: the Monte-Carlo SE of a 5% rate is 0.34%."""
    rng = np.random.default_rng(20261201)
    arms = ("baseline", "a", "b")
    pairs = [("a", "baseline"), ("b", "baseline")]
    rates = {}
    start = time.perf_counter()
    for seed_sd in (0.0, 0.1, 0.2, 0.3, 0.5):
        studies = run_studies(simulate(rng, 4000, [25.0, 25.0, 25.0], seed_sd), arms, pairs)
        rates[seed_sd] = np.mean([any(c.verdict in ("better", "worse") for c in study) for study in studies])
    print("\nnull studies called resolved, by seed SD: "
          + ", ".join(f"{sd}: {rate:.2%}" for sd, rate in rates.items())
          + f" ({time.perf_counter() - start:.1f} s)")
    assert all(rate <= 0.06 for rate in rates.values()), rates


def test_a_one_point_difference_is_found():
    rng = np.random.default_rng(7)
    studies = run_studies(simulate(rng, 500, [25.0, 26.0], 0.2), ("baseline", "better"), [("better", "baseline")])
    power = np.mean([study[0].verdict == "better" for study in studies])
    print(f"\npower at a true difference of 1.0, seed SD 0.2, 5 seeds: {power:.1%}")
    assert power >= 0.8


def test_equivalence_keeps_its_size_at_the_margin_and_finds_a_null_difference():
    """True differences of exactly +margin and -margin: "equivalent" (and a TOST p < alpha before
    Holm) at most about 5% of the time on each side. A true difference 0 is found equivalent.

    At the margin, seed SD 0.3 keeps "better"/"worse" from pre-empting most equivalence verdicts
    (with a small seed SD a difference of one margin is itself found), so the verdict is tested too."""
    margin = 0.5
    rng = np.random.default_rng(11)
    arms = ("baseline", "above", "below")
    pairs = [("above", "baseline"), ("below", "baseline")]
    studies = run_studies(simulate(rng, 3000, [25.0, 25.0 + margin, 25.0 - margin], 0.3), arms, pairs,
                          margin=margin)
    equivalent = np.mean([[c.verdict == "equivalent" for c in study] for study in studies], axis=0)
    tost_size = np.mean([[c.p_equivalence < 0.05 for c in study] for study in studies], axis=0)

    studies = run_studies(simulate(rng, 1000, [25.0, 25.0], 0.1), ("baseline", "same"), [("same", "baseline")],
                          margin=margin)
    found = np.mean([study[0].verdict == "equivalent" for study in studies])
    print(f"\nat +/- margin: equivalent {equivalent[0]:.2%} / {equivalent[1]:.2%}, "
          f"TOST p < 0.05 {tost_size[0]:.2%} / {tost_size[1]:.2%}; at 0: equivalent {found:.1%}")
    assert all(equivalent <= 0.06) and all(tost_size <= 0.06)
    assert found > 0.5
