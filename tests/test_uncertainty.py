"""The crossed seeds x test-images interval: its mean squares against statsmodels' two-way ANOVA, and its
coverage on simulated studies whose true difference is known."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from scipy.special import expit

from study import stats


def test_mean_squares_are_statsmodels_two_way_anova():
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    rng = np.random.default_rng(0)
    table = rng.integers(-1, 2, size=(4, 7)).astype(float) + rng.normal(0, 0.3, size=(4, 1))
    long = pd.DataFrame([(s, i, table[s, i]) for s in range(4) for i in range(7)], columns=["seed", "image", "d"])
    anova = anova_lm(ols("d ~ C(seed) + C(image)", long).fit())
    ms = anova["mean_sq"]
    n, m = table.shape
    got = stats.crossed(table)
    assert got.mean == pytest.approx(table.mean())
    assert got.var_seeds == pytest.approx(ms["C(seed)"] / (n * m))
    expected = (ms["C(seed)"] + ms["C(image)"] - ms["Residual"]) / (n * m)
    assert got.var == pytest.approx(max(expected, got.var_seeds))
    # Seeds-only: the paired t interval of the per-seed means (scipy), the figure the old reports printed.
    seed_means = table.mean(axis=1)
    assert got.var_seeds == pytest.approx(seed_means.var(ddof=1) / n)


def test_a_table_without_spread_has_an_exact_mean_and_too_small_tables_are_refused():
    assert stats.crossed(np.zeros((3, 5))).interval(0.05) == (0.0, 0.0)
    with pytest.raises(ValueError):
        stats.crossed(np.zeros((1, 5)))


def mean_accuracy(mu: float, sd: float) -> float:
    """E[expit(X)] for X ~ N(mu, sd^2), by Gauss-Hermite quadrature (exact to ~1e-12 here)."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    return float(np.sum(w * expit(mu + sd * x)) / math.sqrt(2 * math.pi))


def simulated_studies(studies: int, n: int, m: int, rng: np.random.Generator):
    """Studies of two depths on `n` seeds and `m` test images drawn from one population: an image's difficulty
    is shared by both depths (correlated errors), each depth has image-specific strengths (the test set's own
    variance), each run a seed effect, and each image a Bernoulli draw per run (the interaction). Yields each
    study's seeds x images table of correct(a) - correct(b); the true difference is known in closed form."""
    mu, difficulty, own, seed_sd = (4.0, 3.85), 1.5, 1.2, 0.1
    truth = mean_accuracy(mu[0], math.hypot(difficulty, own, seed_sd)) - mean_accuracy(
        mu[1], math.hypot(difficulty, own, seed_sd)
    )
    for _ in range(studies):
        z = rng.normal(0, difficulty, m)
        correct = [
            rng.random((n, m)) < expit(mu[k] + z + rng.normal(0, own, m) + rng.normal(0, seed_sd, (n, 1)))
            for k in range(2)
        ]
        yield correct[0].astype(np.int8) - correct[1].astype(np.int8), truth


def test_nominal_95_percent_intervals_cover_the_true_difference_in_93_to_97_percent_of_1000_studies():
    rng = np.random.default_rng(2026)
    covered = covered_by_seeds = 0
    studies = 1000
    for table, truth in simulated_studies(studies, n=10, m=1000, rng=rng):
        est = stats.crossed(table)
        low, high = est.interval(0.05)
        covered += low <= truth <= high
        half = scipy_stats.t.ppf(0.975, 9) * math.sqrt(est.var_seeds)  # seeds alone: the test set taken as fixed
        covered_by_seeds += est.mean - half <= truth <= est.mean + half
    assert 0.93 <= covered / studies <= 0.97, covered / studies
    # The control: intervals from the seeds alone leave the test set's variance out and miss far more often.
    assert covered_by_seeds / studies < 0.90, covered_by_seeds / studies


def test_the_equivalence_bound_is_the_margin_at_which_two_one_sided_tests_just_pass():
    rng = np.random.default_rng(5)
    table, _ = next(simulated_studies(1, n=10, m=2000, rng=rng))
    est = stats.crossed(table)
    bound = est.equivalence_bound(0.05)
    se = math.sqrt(est.var)
    for margin, equivalent in ((bound * 1.001, True), (bound * 0.999, False)):
        p_low = scipy_stats.t.sf((est.mean + margin) / se, est.df)  # H0: mean <= -margin
        p_high = scipy_stats.t.cdf((est.mean - margin) / se, est.df)  # H0: mean >= +margin
        assert bool(max(p_low, p_high) <= 0.05) is equivalent


def chosen_studies(
    studies: int,
    n: int,
    m: int,
    rng: np.random.Generator,
    mu=((4.0, 4.08, 4.05), (3.95, 4.02, 4.07)),
    seed_sd=0.1,
    val_sd=0.0015,
):
    """Studies of a factorial: two depths, each at three rates, `n` seeds, `m` test images. A run's seed effect
    (its network's quality) moves its validation and its test accuracy alike, so the rate a depth chooses on
    validation also picks its luckier seeds; the validation read adds its own sampling noise. Yields (val_a,
    val_b, test_a, test_b) per study; with them, the expected value of the whole procedure (choose on
    validation, read the test difference at the chosen rates), by Monte Carlo over 200,000 draws of seeds."""
    mu = np.array(mu)  # (depth, rate) logits: near-ties, so choices move
    difficulty, own = 1.5, 1.2
    spread = math.hypot(difficulty, own)
    x, w = np.polynomial.hermite_e.hermegauss(60)

    def g(logit):  # expected accuracy over the image population at a run's logit offset
        return np.sum(w * expit(logit[..., None] + spread * x), axis=-1) / math.sqrt(2 * math.pi)

    def draws(k):
        u = rng.normal(0, seed_sd, (k, 2, 3, n))
        val = g(mu[None, :, :, None] + u) + rng.normal(0, val_sd, (k, 2, 3, n))
        return u, val

    u, val = draws(200_000 // n)
    pick = np.argmax(val.mean(axis=3), axis=2)  # (k, depth)
    k = np.arange(len(u))
    at = [g(mu[d][pick[:, d], None] + u[k, d, pick[:, d]]).mean(axis=1) for d in range(2)]
    truth = float(np.mean(at[0] - at[1]))
    for _ in range(studies):
        u, val = draws(1)
        z = rng.normal(0, difficulty, m)
        tests = []
        for d in range(2):
            logit = mu[d][:, None, None] + u[0, d][:, :, None] + z + rng.normal(0, own, m)
            tests.append(rng.random((3, n, m)) < expit(logit))
        yield val[0, 0], val[0, 1], tests[0], tests[1], truth


def test_with_the_rate_chosen_inside_every_resample_95_percent_intervals_cover_in_93_to_97_percent():
    # Near-tied rates with noisy validation: in most studies a depth's choice moves between resamples.
    rng = np.random.default_rng(7)
    covered = moved = 0
    studies = 1000
    design = {"mu": ((4.0, 4.03, 3.98), (4.0, 3.98, 4.03)), "seed_sd": 0.15, "val_sd": 0.002}
    for val_a, val_b, test_a, test_b, truth in chosen_studies(studies, n=10, m=4000, rng=rng, **design):
        est = stats.chosen(val_a, val_b, test_a, test_b, resamples=400, seed=1)
        low, high = est.interval(0.05)
        covered += low <= truth <= high
        moved += est.moved > 0.2
    assert 0.93 <= covered / studies <= 0.97, covered / studies
    assert moved / studies > 0.5, moved / studies  # the choices do move: the test is about them
