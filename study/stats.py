"""The statistics the report uses, as thin wrappers over scipy.stats and statsmodels.

Each function takes plain arrays of accuracies (fractions) and returns numbers; what they mean for
depths lives in `study.analysis`. Hand-written here is only what the libraries do not do:
Holm-consistent interval levels, and the number of seeds that would resolve a contrast; and two ways
around a library's cost (the Wilcoxon permutation branch vectorised, statsmodels' forced collection
skipped), each giving the library's own numbers.
"""

from __future__ import annotations

import contextlib
import gc
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired
from statsmodels.tools.sm_exceptions import ConvergenceWarning

ALPHA = 0.05  # family-wise error rate of each Holm family
POWER = 0.80  # for the seeds needed to resolve an inconclusive contrast


def t_interval(x: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """Student-t interval of a mean (nan, nan) for fewer than two values."""
    if len(x) < 2:
        return (math.nan, math.nan)
    if np.ptp(x) == 0:
        return (float(x[0]), float(x[0]))
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(1 - alpha)
    return (float(ci.low), float(ci.high))


def holm(p_values: list[float], alpha: float = ALPHA) -> list[float]:
    """Holm-adjusted p-values in the order given (statsmodels); reject where adjusted <= alpha."""
    if not p_values:
        return []
    with no_forced_collection():
        return [float(p) for p in multipletests(p_values, alpha=alpha, method="holm")[1]]


@contextlib.contextmanager
def no_forced_collection():
    """statsmodels' Holm branch calls gc.collect() on every call: 0.05-0.25 s in a process holding PyTorch and
    the study's tables, 14 s of a report's rendering. The collector still runs as it always does."""
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect


def holm_levels(p_values: list[float], alpha: float = ALPHA) -> list[float]:
    """The level at which each hypothesis's interval is drawn so that it excludes the null exactly
    when Holm rejects it: alpha / (m - k + 1) for the k-th smallest p-value while Holm keeps
    rejecting; from the first hypothesis it keeps, every later one stays at that first kept level
    (its p-value is larger, so its interval covers the null, as Holm decides)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    levels = [alpha] * m
    stopped = None
    for step, i in enumerate(order):
        level = alpha / (m - step) if stopped is None else stopped
        if stopped is None and p_values[i] > level:
            stopped = level
        levels[i] = level
    return levels


@dataclass(frozen=True)
class Paired:
    """Per-seed differences x - y of two depths trained with the same seeds (common random numbers)."""

    n: int
    mean: float  # mean difference (accuracy fraction)
    sd: float  # standard deviation of the differences
    corr: float  # Pearson correlation of x and y over seeds (nan when undefined)
    p: float  # paired t, two-sided, H0: mean difference 0
    p_equivalence: float  # TOST, H0: |mean difference| >= margin
    p_wilcoxon: float  # Wilcoxon signed-rank, two-sided (a check on the t-test's normality)


def paired(x: np.ndarray, y: np.ndarray, margin: float) -> Paired:
    """Paired t (scipy), TOST within +-margin (statsmodels) and Wilcoxon signed-rank (scipy) on x - y.
    Needs two or more pairs whose differences are not all equal (raises ValueError otherwise)."""
    d = x - y
    if len(d) < 2:
        raise ValueError(f"{len(d)} paired seed(s): an interval needs 2 or more")
    if np.ptp(d) == 0:
        raise ValueError("every seed gave the same difference: no spread to test against")
    corr = float(np.corrcoef(x, y)[0, 1]) if np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan
    p_eq = float(ttost_paired(x, y, -margin, margin)[0])
    p_w = wilcoxon_p(d)
    return Paired(len(d), float(d.mean()), float(d.std(ddof=1)), corr, float(stats.ttest_rel(x, y).pvalue), p_eq, p_w)


TEST_IMAGES = 10_000  # both datasets' test split: an accuracy difference is a whole number of these images
WILCOXON = {"zero_method": "pratt", "method": "auto"}  # zeros ranked, then dropped (Pratt 1959); exact when it can
PERMUTATION_SEEDS = 13  # scipy's "auto": with ties or zeros, the exact permutation test up to 13 (2**13 < 9999)


def image_counts(d: np.ndarray, images: int = TEST_IMAGES) -> np.ndarray:
    """Accuracy differences as whole numbers of test images, when they are (up to float rounding), so seeds
    that differ by the same number of images tie exactly; otherwise `d` as it is."""
    counts = d * images
    rounded = np.round(counts)
    return rounded if np.all(np.abs(counts - rounded) < 1e-6 * images) else d


def wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences, counted in test images: scipy.stats.wilcoxon
    with WILCOXON (Pratt's treatment of zero differences; method "auto": the exact distribution without ties
    or zeros, the exact sign-flip permutation distribution with them up to 13 seeds, beyond that the
    tie-corrected normal approximation). 1 when every difference is zero.

    The permutation branch is computed here, with scipy.stats.permutation_test and the same statistic (the
    positive ranks' sum; flipping signs leaves the ranks of |d| fixed), vectorised over the 2**n sign
    patterns: scipy's own wilcoxon evaluates them one at a time in Python (0.7 s a contrast; the report has
    hundreds). The p-values are the same (tested against scipy.stats.wilcoxon)."""
    counts = image_counts(np.asarray(d, float))
    if not np.any(counts):
        return 1.0
    ranks = stats.rankdata(np.abs(counts))
    if len(counts) <= PERMUTATION_SEEDS and (np.any(counts == 0) or len(np.unique(ranks)) < len(ranks)):
        positive_ranks = ranks * (counts != 0)  # Pratt: zeros are ranked, then count on neither side

        def r_plus(x, axis=-1):
            return np.sum(np.where(x > 0, positive_ranks, 0.0), axis=axis)

        test = stats.permutation_test(
            (counts,), r_plus, permutation_type="samples", vectorized=True, alternative="two-sided"
        )
        return float(test.pvalue)
    return float(stats.wilcoxon(counts, **WILCOXON).pvalue)


@dataclass(frozen=True)
class Estimate:
    """A mean with the variance of its estimate and Satterthwaite degrees of freedom: the t reference that
    every interval and test of a primary contrast is read from (the paired t test is the case of seeds alone)."""

    mean: float
    var: float
    df: float

    @property
    def se(self) -> float:
        return math.sqrt(self.var)

    def interval(self, level: float) -> tuple[float, float]:
        """Two-sided (1 - level) interval of the mean."""
        half = float(stats.t.ppf(1 - level / 2, self.df)) * self.se
        return (self.mean - half, self.mean + half)

    def equivalence_bound(self, level: float) -> float:
        """The smallest margin at which two one-sided tests at `level` each declare the mean inside +-margin:
        the farther end of the (1 - 2 level) interval from zero."""
        low, high = self.interval(2 * level)
        return max(abs(low), abs(high))

    @property
    def p(self) -> float:
        """Two-sided p of H0: mean 0."""
        return float(2 * stats.t.sf(abs(self.mean) / self.se, self.df)) if self.se > 0 else float(self.mean == 0)

    def p_equivalence(self, margin: float) -> float:
        """Two one-sided tests of H0: |mean| >= margin (the larger of the two p-values)."""
        if not self.se > 0:
            return 0.0 if abs(self.mean) < margin else 1.0
        lower = stats.t.sf((self.mean + margin) / self.se, self.df)
        upper = stats.t.cdf((self.mean - margin) / self.se, self.df)
        return float(max(lower, upper))


@dataclass(frozen=True)
class Crossed(Estimate):
    """The mean of a seeds x test-images table of per-image values (a contrast: 1, 0 or -1 where one depth's
    run classifies the image correctly and the other's does not), with the variance of that mean from both
    samples: the seeds (initialisation, batch order, split) and the test images (a sample of the images the
    answer is about), crossed, and their interaction.

    The variance is the two-way ANOVA (random effects, no replication) moment estimator: with seed, image and
    interaction components s2_seed, s2_image, s2_both, Var(mean) = s2_seed / n + s2_image / m + s2_both / nm,
    and E[MS_seeds + MS_images - MS_residual] = nm Var(mean) exactly, whatever the distribution (Hoeffding's
    decomposition of a crossed exchangeable array). Floored at the seeds-only variance MS_seeds / nm, the
    interval the seeds alone give, which is what it adds to. Its degrees of freedom are Satterthwaite's."""

    var_seeds: float  # MS_seeds / nm: the paired t interval's variance (per-seed means on one fixed test set)
    n: int
    m: int
    var_images: float = 0.0  # (MS_images - MS_residual) / nm: the test images' part, fixed however many seeds
    df_images: float = math.inf  # its Satterthwaite degrees of freedom


def crossed(table: np.ndarray) -> Crossed:
    """Crossed estimate of a (seeds, images) table's mean; needs at least two seeds and two images."""
    d = np.asarray(table, dtype=float)
    n, m = d.shape
    if n < 2 or m < 2:
        raise ValueError("needs at least two seeds and two test images")
    grand = d.mean()
    seeds, images = d.mean(axis=1), d.mean(axis=0)
    ss_seeds = m * float(np.sum((seeds - grand) ** 2))
    ss_images = n * float(np.sum((images - grand) ** 2))
    ss_both = float(np.sum((d - grand) ** 2)) - ss_seeds - ss_images
    df_seeds, df_images, df_both = n - 1, m - 1, (n - 1) * (m - 1)
    ms = (ss_seeds / df_seeds, ss_images / df_images, max(ss_both, 0.0) / df_both)
    var_seeds = ms[0] / (n * m)
    var = (ms[0] + ms[1] - ms[2]) / (n * m)
    if not var > var_seeds:
        return Crossed(float(grand), var_seeds, float(df_seeds), var_seeds, n, m)
    terms = ((ms[0], df_seeds), (ms[1], df_images), (-ms[2], df_both))
    df = (var * n * m) ** 2 / sum(t * t / k for t, k in terms)
    df_img = (ms[1] - ms[2]) ** 2 / (ms[1] ** 2 / df_images + ms[2] ** 2 / df_both)
    return Crossed(float(grand), float(var), float(df), var_seeds, n, m, float(var - var_seeds), float(df_img))


@dataclass(frozen=True)
class Chosen(Estimate):
    """A contrast with each depth at its own best rate, the choice made on validation: the mean test difference
    at the chosen rates, and the variance of that whole procedure. The seeds' part (with the choice) comes from
    a bootstrap over seeds that makes the choice again in every resample; the test images' part from the
    crossed decomposition at the chosen rates (the choice reads no test image, so the two add)."""

    choices: tuple[int, int]  # the rate index each depth chose
    moved: float  # the share of resamples in which either depth chose another rate
    var_seeds: float  # the seeds' part, the choice made again in every resample
    n: int


def chosen(
    val_a: np.ndarray, val_b: np.ndarray, test_a: np.ndarray, test_b: np.ndarray, resamples: int = 2000, seed: int = 0
) -> Chosen:
    """`val_x` (rates, seeds): validation accuracy of depth x at each rate of the band, seed by seed; `test_x`
    (rates, seeds, images): its correctness on each test image (0/1). The same seeds at every rate and depth."""
    rates, n = val_a.shape
    acc_a, acc_b = test_a.mean(axis=2), test_b.mean(axis=2)  # (rates, seeds)
    ca, cb = int(np.argmax(val_a.mean(axis=1))), int(np.argmax(val_b.mean(axis=1)))
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1 / n), size=resamples) / n  # (resamples, seeds) weights
    ra = np.argmax(w @ val_a.T, axis=1)  # (resamples,)
    rb = np.argmax(w @ val_b.T, axis=1)
    boot = np.einsum("bs,bs->b", w, acc_a[ra] - acc_b[rb])
    var_seeds = float(boot.var(ddof=1)) * n / (n - 1)
    at = crossed(test_a[ca].astype(np.int8) - test_b[cb].astype(np.int8))
    var_images = at.var_images
    mean = float(acc_a[ca].mean() - acc_b[cb].mean())
    moved = float(np.mean((ra != ca) | (rb != cb)))
    var = var_seeds + var_images
    parts = var_seeds**2 / (n - 1) + (var_images**2 / at.df_images if var_images > 0 else 0.0)
    df = var**2 / parts if var > 0 else float(n - 1)  # Satterthwaite, each part with its own degrees of freedom
    return Chosen(mean, var, float(df), (ca, cb), moved, var_seeds, n)


@dataclass(frozen=True)
class Searched(Estimate):
    """A tuned contrast with the search's pick as a random factor: the crossed estimate at each depth's best trial,
    plus the variance between the configurations its search ranked at the top (best and runners-up, retrained on
    common seeds), each depth's part a one-way random-effects (ANOVA moment) estimate over its picks."""

    var_seeds: float
    var_images: float
    var_search: float  # both depths' picks
    n: int


def pick_variance(x: np.ndarray) -> tuple[float, float]:
    """(variance between picks, its Satterthwaite degrees of freedom) of a (picks, seeds) table of test accuracies
    on common seeds: two-way ANOVA with the picks random, (MS_picks - MS_residual) / seeds, floored at 0."""
    k, s = x.shape
    rows, cols, grand = x.mean(axis=1), x.mean(axis=0), x.mean()
    ms_picks = s * float(np.sum((rows - grand) ** 2)) / (k - 1)
    resid = x - rows[:, None] - cols[None, :] + grand
    ms_resid = float(np.sum(resid**2)) / ((k - 1) * (s - 1))
    var = max(ms_picks - ms_resid, 0.0) / s
    if var == 0.0:
        return 0.0, math.inf
    df = (ms_picks - ms_resid) ** 2 / (ms_picks**2 / (k - 1) + ms_resid**2 / ((k - 1) * (s - 1)))
    return var, float(df)


def searched(base: Crossed, picks_a: np.ndarray, picks_b: np.ndarray) -> Searched:
    """`base` plus both searches' pick variance (pick_variance of each depth's (picks, seeds) table)."""
    parts = [(base.var_seeds, base.n - 1), (base.var_images, base.df_images)]
    parts += [pick_variance(np.asarray(p, float)) for p in (picks_a, picks_b)]
    var = sum(v for v, _ in parts)
    denominator = sum(v * v / d for v, d in parts if v > 0 and math.isfinite(d))
    df = var**2 / denominator if denominator > 0 else float(base.n - 1)
    return Searched(base.mean, var, float(df), base.var_seeds, base.var_images, parts[2][0] + parts[3][0], base.n)


def paired_interval(x: np.ndarray, y: np.ndarray, level: float) -> tuple[float, float]:
    """Two-sided (1 - level) interval of mean(x - y) from the paired t-test (scipy)."""
    ci = stats.ttest_rel(x, y).confidence_interval(1 - level)
    return (float(ci.low), float(ci.high))


def seeds_to_resolve(sd: float, margin: float, level: float, power: float = POWER) -> int:
    """A planning number, not a promise: the paired seeds at which, if the spread of per-seed
    differences is `sd` (as estimated from the seeds at hand), a true difference of +-margin would be
    found at two-sided `level` with `power`, and a true difference of 0 would be shown equivalent
    within +-margin (TOST at `level`) with `power`; the larger of the two (statsmodels' t-test power;
    for TOST each one-sided test gets power (1 + power) / 2, a union bound). A true difference between
    0 and the margin needs more seeds than either."""
    if not (sd > 0 and margin > 0):
        raise ValueError("needs a positive spread and margin")
    effect = margin / sd
    differ = seeds_for(effect, level, power, "two-sided")
    equal = seeds_for(effect, level, (1 + power) / 2, "larger")
    return max(2, differ, equal)


UNREACHABLE = 10**9  # seeds_with_floor's answer where no number of seeds resolves the contrast


def seeds_with_floor(
    sd: float, fixed: float, margin: float, level: float, power: float = POWER, most: int = 10_000
) -> int:
    """seeds_to_resolve where part of the variance does not shrink with seeds: Var(mean) = sd**2 / N + `fixed` (the
    test images' part, fixed by the 10,000 images; a search's pick). The smallest N at which seeds_to_resolve, at
    the per-seed spread that gives that variance, asks for at most N; UNREACHABLE when none up to `most` does
    (the fixed part alone is too wide for the margin)."""
    if fixed <= 0:
        return seeds_to_resolve(sd, margin, level, power)

    def enough(n: int) -> bool:
        return seeds_to_resolve(math.sqrt(sd * sd + n * fixed), margin, level, power) <= n

    if not enough(most):
        return UNREACHABLE
    lo, hi = 2, most
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return lo


def seeds_for(effect: float, level: float, power: float, alternative: str, most: int = 10**7) -> int:
    """Smallest n whose paired t-test reaches `power` (statsmodels' solver; where its root finder does not
    converge, as for a tiny spread, the same power function searched by bisection; capped at `most`)."""
    power_of = TTestPower()
    with warnings.catch_warnings():  # a root finder that fails says so by returning nan: handled below
        warnings.simplefilter("ignore", ConvergenceWarning)
        n = power_of.solve_power(effect_size=effect, alpha=level, power=power, alternative=alternative)
    if n is not None and math.isfinite(float(n)):
        return math.ceil(float(n))

    def enough(k: int) -> bool:
        return power_of.power(effect_size=effect, nobs=k, alpha=level, alternative=alternative) >= power

    lo, hi = 2, 2
    while not enough(hi) and hi < most:
        lo, hi = hi, min(2 * hi, most)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return hi


def resolving_power(sd: float, n: int, margin: float, level: float) -> tuple[float, float]:
    """(power to find a true difference of +-margin, power to show a true difference of 0 equivalent
    within +-margin) of a paired t-test / TOST on n pairs with spread `sd` at `level` (statsmodels' t-test
    power; for TOST the union bound 1 - 2 (1 - one-sided power), as in seeds_to_resolve)."""
    if not (sd > 0 and n > 1):
        return math.nan, math.nan
    effect = margin / sd
    differ, one_sided = (t_power(effect, n, level, alt) for alt in ("two-sided", "larger"))
    return differ, max(0.0, 1 - 2 * (1 - one_sided))


def t_power(effect: float, n: int, level: float, alternative: str) -> float:
    """Power of a one-sample (paired) t-test: statsmodels' TTestPower, or where it returns nan (scipy's
    noncentral t gives nan for the far tail against a large effect), the noncentral-t tails from scipy
    directly, that far tail (at most level / 2) counted as 0."""
    power = TTestPower().power(effect_size=effect, nobs=n, alpha=level, alternative=alternative)
    if math.isfinite(power):
        return float(power)
    df, nc = n - 1, effect * math.sqrt(n)
    if alternative == "larger":
        return float(stats.nct.sf(stats.t.isf(level, df), df, nc))
    crit = stats.t.isf(level / 2, df)
    lower = stats.nct.cdf(-crit, df, abs(nc))  # the far tail against the effect: below level / 2, often nan here
    return float(stats.nct.sf(crit, df, abs(nc)) + (lower if math.isfinite(lower) else 0.0))


def detectable(sd: float, n: int, level: float, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided paired t-test on n pairs with spread `sd` finds at
    `level` with `power` (statsmodels' t-test power, solved for the effect size)."""
    effect = TTestPower().solve_power(nobs=n, alpha=level, power=power, alternative="two-sided")
    return float(effect * sd)


def fisher(failed_a: int, runs_a: int, failed_b: int, runs_b: int) -> float:
    """Two-sided p of Fisher's exact test that two failure rates are equal (scipy)."""
    return float(stats.fisher_exact([[failed_a, runs_a - failed_a], [failed_b, runs_b - failed_b]]).pvalue)
