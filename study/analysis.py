"""What the study's tables say about depth: groups of runs, the declared contrasts and their outcomes.

The question is declared before looking (docs/method.md): per setting (the recipe after its last
epoch, each matched budget, the tuned depths) depth 4 minus depth 3 and depth 4 minus depth 5. These
primary contrasts are one Holm family per dataset; every other pair of a setting is secondary
(exploratory, its own Holm family). A contrast is paired by seed (seed k fixes the initialisation and
batch order of every depth: common random numbers) and ends in one of four outcomes against a
declared margin: better, worse, equivalent within +-margin (TOST), or inconclusive (with the seeds
that would resolve it). A run that ends at or below twice chance, or with a loss that is not finite,
is a failed run: counted, compared by Fisher's exact test, and kept out of accuracy statistics.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import factorial, stats
from .config import DEFAULT_MARGIN, TRIAL_STATES, failed_run
from .stats import ALPHA

SOURCE_DEPTH = 4
NEIGHBOURS = (3, 5)  # "why four layers, not three or five?"
UNRELIABLE_SHARE = 0.25  # a depth failing in this share of its runs is unreliable to train there
DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
OUTCOMES = ("better", "worse", "equivalent", "inconclusive")
CHECK_WORDS = {"horizon": "twice the epochs"}


# --- groups ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One depth's retrained runs in one setting."""

    depth: int
    trained: pd.Series  # test accuracy of trained runs, indexed by seed
    failed: dict  # seed -> test accuracy (nan when diverged) of failed runs
    n_params: int = 0
    train_flops: float = math.nan  # mean per run
    train_seconds: float = math.nan  # mean per run, beside the FLOPs only
    widths: str = ""

    @property
    def runs(self) -> int:
        return len(self.trained) + len(self.failed)

    @property
    def n(self) -> int:
        return len(self.trained)

    @property
    def accuracies(self) -> np.ndarray:
        return self.trained.to_numpy(float)

    @property
    def mean(self) -> float:
        return float(self.trained.mean()) if self.n else math.nan

    @property
    def std(self) -> float:
        return float(self.trained.std(ddof=1)) if self.n > 1 else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        """95% t-interval of the trained runs' mean, within [0, 1] (an accuracy cannot leave it)."""
        lo, hi = stats.t_interval(self.accuracies)
        return (max(lo, 0.0), min(hi, 1.0)) if math.isfinite(lo) else (lo, hi)

    @property
    def unreliable(self) -> bool:
        return self.runs > 0 and len(self.failed) >= UNRELIABLE_SHARE * self.runs


def exact_accuracy(runs: pd.DataFrame) -> pd.Series:
    """Each run's test accuracy, from its count of correct images where the run recorded one (the exact figure:
    per-seed differences are then whole numbers of images over the same denominator), else as stored."""
    acc = pd.to_numeric(runs["test_accuracy"], errors="coerce")
    if {"test_correct", "test_images"} <= set(runs.columns):
        counted = runs["test_correct"].notna() & runs["test_images"].notna() & (runs["test_images"] > 0)
        acc = acc.where(~counted, runs["test_correct"] / runs["test_images"])
    return acc.astype(float)


def groups_of(final: pd.DataFrame, depths=()) -> dict[int, Group]:
    """Groups by depth of one setting's final runs; `depths` the study asked for (missing ones become
    groups without runs, named where they are needed)."""
    out = {}
    present = {int(x) for x in final["depth"].unique()} if len(final) else set()
    for d in sorted(set(depths) | present):
        g = final[final["depth"] == d]
        loss = g["test_loss"] if "test_loss" in g else pd.Series(0.0, index=g.index)
        diverged = g["diverged"].fillna(False).astype(bool) if "diverged" in g else pd.Series(False, index=g.index)
        acc = exact_accuracy(g)
        bad = pd.Series([failed_run(a, lo, dv) for a, lo, dv in zip(acc, loss, diverged)], index=g.index, dtype=bool)
        ok = g[~bad]
        out[d] = Group(
            depth=d,
            trained=pd.Series(acc[~bad].to_numpy(float), index=ok["seed"].astype(int).to_numpy()),
            failed={int(s): float(a) for s, a in zip(g[bad]["seed"], acc[bad])},
            n_params=int(g["n_params"].iloc[0]) if len(g) else 0,
            train_flops=float(g["train_flops"].mean()) if len(g) and "train_flops" in g else math.nan,
            train_seconds=float(g["train_seconds"].mean()) if len(g) and "train_seconds" in g else math.nan,
            widths=str(g["widths"].fillna("").iloc[0]) if len(g) and "widths" in g else "",
        )
    return out


def common_seeds(a: Group, b: Group) -> list[int]:
    """The seeds both depths trained, in order: the pairs of a paired contrast."""
    return sorted(set(a.trained.index) & set(b.trained.index))


def aligned(a: Group, b: Group) -> tuple[np.ndarray, np.ndarray]:
    """Accuracies of the seeds both depths trained, in seed order."""
    seeds = common_seeds(a, b)
    return a.trained.loc[seeds].to_numpy(float), b.trained.loc[seeds].to_numpy(float)


# --- contrasts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contrast:
    """Depth a minus depth b in one setting, paired by seed, with its outcome in its Holm family."""

    setting: str
    a: int
    b: int
    outcome: str  # one of OUTCOMES, or "not computed"
    n: int = 0  # seeds both depths trained
    diff: float = math.nan  # mean per-seed difference a - b (accuracy fraction)
    sd: float = math.nan  # spread of the per-seed differences
    corr: float = math.nan  # correlation of a and b over seeds
    ci: tuple[float, float] = (math.nan, math.nan)  # at `level` (Holm-consistent): excludes 0 iff better/worse
    level: float = math.nan
    p: float = math.nan
    p_holm: float = math.nan
    ci_equivalence: tuple[float, float] = (math.nan, math.nan)  # 1 - 2 * its level: inside +-margin iff equivalent
    p_equivalence_holm: float = math.nan
    p_wilcoxon: float = math.nan
    seeds_needed: int | None = None  # for an inconclusive contrast
    reason: str | None = None  # why it could not be computed
    # What the interval carries (markdown.ESTIMATE_WORDS: chosen, crossed, searched or seeds) and what it gives:
    estimate: str = "seeds"
    var: float = math.nan  # of the difference: every source the estimate carries
    var_seeds: float = math.nan  # of which the seeds' part (with the choice, for "chosen")
    bound: float = math.nan  # the equivalence bound: the smallest margin TOST passes at its Holm level
    moved: float = math.nan  # "chosen": the share of seed resamples in which a depth's chosen rate moved
    margins: tuple = ()  # (margin, outcome in this family at that margin) for each of REPORT_MARGINS

    @property
    def sd_total(self) -> float:
        """The per-seed spread giving the estimate's variance (what seeds are planned and power computed from)."""
        return math.sqrt(self.var * self.n) if self.n and math.isfinite(self.var) else self.sd

    @property
    def label(self) -> str:
        return f"{self.a} minus {self.b}"


def clip(ci: tuple[float, float], bound: float) -> tuple[float, float]:
    """An interval cut to the values the quantity can take (a difference of two accuracies lies in
    [-1, 1], a difference of two such differences in [-2, 2]): still a valid confidence set."""
    return (max(ci[0], -bound), min(ci[1], bound))


REPORT_MARGINS = (0.001, 0.0015, 0.002, 0.0025)  # the primary table's outcomes at each (points: 0.10 ... 0.25)


def contrast_family(
    pairs: list[tuple[str, Group, Group]],
    margin: float,
    alpha: float = ALPHA,
    estimates: list[tuple[str, stats.Estimate] | None] | None = None,
) -> list[Contrast]:
    """Every declared contrast (setting, a, b) of one Holm family, a minus b. A contrast that cannot be
    computed stays in the family with p = 1, so the family never shrinks. `estimates` (one per pair, or None):
    (kind, estimate) whose mean, variance and degrees of freedom replace the paired t's (factorial: the whole
    uncertainty); the per-seed statistics (n, spread, correlation, Wilcoxon) stay the seeds'."""
    estimates = estimates or [None] * len(pairs)
    tests, reasons, samples = [], [], []
    for _, ga, gb in pairs:
        x, y = aligned(ga, gb)
        samples.append((x, y))
        try:
            tests.append(stats.paired(x, y, margin))
            reasons.append(None)
        except ValueError as e:
            missing = [g.depth for g in (ga, gb) if g.runs == 0]
            tests.append(None)
            reasons.append(f"depth {missing[0]} has no retrained runs yet" if missing else str(e))
    for i, est in enumerate(estimates):
        if tests[i] is not None and est is not None and est[0] == "refused":
            tests[i], reasons[i] = None, est[1]  # not computed, with why: never a quietly narrower interval
    estimates = [None if e is not None and e[0] == "refused" else e for e in estimates]
    p = [t.p if t else 1.0 for t in tests]
    p_eq = [t.p_equivalence if t else 1.0 for t in tests]
    for i, (t, est) in enumerate(zip(tests, estimates)):
        if t is not None and est is not None:
            p[i], p_eq[i] = est[1].p, est[1].p_equivalence(margin)
    p_holm, p_eq_holm = stats.holm(p, alpha), stats.holm(p_eq, alpha)
    levels, levels_eq = stats.holm_levels(p, alpha), stats.holm_levels(p_eq, alpha)
    strictest = alpha / max(len(pairs), 1)
    out = []
    for i, ((setting, ga, gb), t) in enumerate(zip(pairs, tests)):
        if t is None:
            out.append(Contrast(setting, ga.depth, gb.depth, "not computed", reason=reasons[i]))
            continue
        x, y = samples[i]
        est = estimates[i]
        mean = est[1].mean if est else t.mean
        if p_holm[i] <= alpha:
            outcome = "better" if mean > 0 else "worse"
        elif p_eq_holm[i] <= alpha:
            outcome = "equivalent"
        else:
            outcome = "inconclusive"
        level_eq = min(2 * levels_eq[i], 1.0)
        if est is not None:  # the whole-uncertainty estimate: its own interval, and seeds planned with a fixed part
            kind, e = est
            ci, ci_eq = clip(e.interval(levels[i]), 1.0), clip(e.interval(level_eq), 1.0)
            var, var_seeds = e.var, getattr(e, "var_seeds", e.var)
            moved = getattr(e, "moved", math.nan)
            plan = stats.seeds_with_floor(math.sqrt(var_seeds * t.n), var - var_seeds, margin, strictest)
        else:  # the seeds alone: the paired t
            kind, moved = "seeds", math.nan
            ci, ci_eq = (
                clip(stats.paired_interval(x, y, levels[i]), 1.0),
                clip(stats.paired_interval(x, y, level_eq), 1.0),
            )
            var = var_seeds = t.sd**2 / t.n
            plan = stats.seeds_to_resolve(t.sd, margin, strictest)
        out.append(
            Contrast(
                setting,
                ga.depth,
                gb.depth,
                outcome,
                t.n,
                mean,
                t.sd,
                t.corr,
                ci,
                levels[i],
                p[i],
                p_holm[i],
                ci_eq,
                p_eq_holm[i],
                t.p_wilcoxon,
                plan if outcome == "inconclusive" else None,
                None,
                estimate=kind,
                var=var,
                var_seeds=var_seeds if est is None or hasattr(est[1], "var_seeds") else math.nan,
                bound=max(abs(ci_eq[0]), abs(ci_eq[1])),
                moved=moved,
            )
        )
    return out


# --- settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting of one experiment: the recipe at an epoch, a matched budget, or the tuned depths."""

    key: str  # shared across datasets: "recipe, 10 epochs", "matched, 242,762 parameters", "tuned"
    experiment: str
    groups: dict[int, Group]
    primary: bool  # holds primary contrasts (the recipe's 2-epoch check does not)
    secondary: list[Contrast] = field(default_factory=list)  # exploratory pairs, own Holm family
    studies: dict = field(default_factory=dict)  # depth -> the final studies (final.csv's `study`) of its group

    @property
    def declared(self) -> list[tuple[int, int]]:
        """This setting's primary contrasts (a minus b), from the depths the study asked for."""
        if not self.primary or SOURCE_DEPTH not in self.groups:
            return []
        return [(SOURCE_DEPTH, n) for n in NEIGHBOURS if n in self.groups]

    @property
    def unreliable(self) -> list[int]:
        return [d for d, g in self.groups.items() if g.unreliable]


def secondary_family(key: str, groups: dict[int, Group], exclude: list[tuple[int, int]], margin: float):
    """Every other pair of depths, deeper minus shallower (exploratory)."""
    skip = {frozenset(p) for p in exclude}
    pairs = [
        (key, groups[b], groups[a])
        for a, b in itertools.combinations(sorted(groups), 2)
        if frozenset((a, b)) not in skip
    ]
    return contrast_family(pairs, margin)


def recipe_at_epoch(epochs: pd.DataFrame, final: pd.DataFrame, epoch: int) -> pd.DataFrame:
    """The recipe's final runs as rows of (depth, seed, test accuracy, cost so far) after `epoch` epochs."""
    epochs, final = declared(epochs), declared(final)
    runs = epochs[(epochs["experiment"] == "recipe") & (epochs["run"] == "final") & (epochs["epoch"] == epoch)]
    rec = final[final["experiment"] == "recipe"]
    keep = [c for c in ("depth", "seed", "n_params", "widths", "train_flops", "param_epochs") if c in rec]
    merged = runs[["depth", "seed", "test_accuracy", "train_seconds", "train_loss"]].merge(
        rec[keep], on=["depth", "seed"]
    )
    # Failed at this epoch: at or below twice chance, or a training loss that is no longer finite.
    merged = merged.rename(columns={"train_loss": "test_loss"})
    if "train_flops" in merged and "param_epochs" in merged:
        merged = merged.assign(train_flops=merged["train_flops"] * epoch / merged["param_epochs"])
    return merged


def studies_of(rows: pd.DataFrame) -> dict[int, set]:
    """{depth: the final studies its rows come from} (tables without a study column: none)."""
    if "study" not in rows:
        return {}
    return {int(d): set(g["study"]) for d, g in rows.groupby("depth")}


def declared(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of cells as declared: not a recipe variant nor a matched check (tables from before variants
    have no such column: every row is declared)."""
    return df[df["variant"].fillna("") == ""] if "variant" in df else df


def of_shape(df: pd.DataFrame, shape: str) -> pd.DataFrame:
    return df[df["shape"].fillna("funnel") == shape] if "shape" in df else (df if shape == "funnel" else df.iloc[:0])


def matched_key(budget: int, shape: str = "funnel", check: str = "") -> str:
    key = f"matched, {int(budget):,} parameters" + (", constant width" if shape == "constant" else "")
    return key + (f", {CHECK_WORDS[check]}" if check else "")


def settings_of(epochs: pd.DataFrame, final: pd.DataFrame, config: dict) -> list[Setting]:
    """Every setting of the experiments the study ran, in report order. The constant-width setting
    borrows depth 2 from the funnel: with one hidden layer both shapes are the same network."""
    exps = config.get("experiments", {})
    out: list[Setting] = []
    final_declared = declared(final)
    rec = final_declared[final_declared["experiment"] == "recipe"]
    if "recipe" in exps or len(rec):
        r = exps.get("recipe", {})
        depths = r.get("depths", [])
        last = int(r.get("epochs", 10))
        checks = sorted({int(ep) for _, ep, _ in r.get("claims", [])} - {last})
        checks = [ep for ep in checks if ep < last]
        out.append(Setting(f"recipe, {last} epochs", "recipe", groups_of(rec, depths), True, studies=studies_of(rec)))
        out += [
            Setting(f"recipe, {ep} epochs", "recipe", groups_of(recipe_at_epoch(epochs, final, ep), depths), False)
            for ep in checks
        ]
    m = final_declared[(final_declared["experiment"] == "matched") & (final_declared["depth"] > 1)]
    mexp = exps.get("matched", {})
    budgets = mexp.get("budgets", []) or sorted(int(b) for b in m["budget"].dropna().unique())
    for b in budgets:
        at = m[m["budget"] == b]
        depths = [d for d in mexp.get("depths", []) if d > 1]
        funnel = of_shape(at, "funnel")
        out.append(Setting(matched_key(b), "matched", groups_of(funnel, depths), True, studies=studies_of(funnel)))
        constant = of_shape(at, "constant")
        if len(constant) or b in mexp.get("constant_budgets", []):
            both = pd.concat([constant, of_shape(at, "funnel")[lambda x: x["depth"] == 2]])
            key = matched_key(b, "constant")
            out.append(Setting(key, "matched", groups_of(both, depths), True, studies=studies_of(both)))
    tuned = final_declared[final_declared["experiment"] == "tuned"]
    if "tuned" in exps or len(tuned):
        groups = groups_of(tuned, exps.get("tuned", {}).get("depths", []))
        out.append(Setting("tuned", "tuned", groups, True, studies=studies_of(tuned)))
    return out


@dataclass(frozen=True)
class Analysis:
    dataset: str
    margin: float
    settings: list[Setting]
    primary: list[Contrast]  # one Holm family: every declared contrast of every primary setting

    @property
    def name(self) -> str:
        return DATASET_NAMES.get(self.dataset, self.dataset)

    def setting(self, key: str) -> Setting | None:
        return next((s for s in self.settings if s.key == key), None)

    def four_beats_both(self) -> tuple[int, int]:
        """(settings where depth 4 is better than both neighbours, settings with both contrasts)."""
        by: dict[str, list[Contrast]] = {}
        for c in self.primary:
            by.setdefault(c.setting, []).append(c)
        full = [cs for cs in by.values() if len(cs) == len(NEIGHBOURS)]
        return sum(all(c.outcome == "better" for c in cs) for cs in full), len(full)


def analyse(
    epochs: pd.DataFrame,
    final: pd.DataFrame,
    config: dict,
    margin: float = DEFAULT_MARGIN,
    predictions: factorial.Predictions | None = None,
) -> Analysis:
    """The settings and contrasts of a study's tables. `final` is every final run (a factorial cell's runs at
    every rate, a tuned cell's runners-up): the groups read factorial.retrained(final), one run per cell and
    seed; with `predictions`, each primary contrast's interval carries the test images (and, in a factorial
    setting, the rate choice) too, and its outcome is also given at each of REPORT_MARGINS."""
    every = final
    final = factorial.retrained(final)
    settings = settings_of(epochs, final, config)
    pairs = [(s.key, s.groups[a], s.groups[b]) for s in settings for a, b in s.declared]
    estimates = [primary_estimate(s, a, b, final, every, predictions) for s in settings for a, b in s.declared]
    primary = contrast_family(pairs, margin, estimates=estimates)
    others = {m: contrast_family(pairs, m, estimates=estimates) for m in REPORT_MARGINS}
    primary = [
        dataclasses.replace(c, margins=tuple((m, others[m][i].outcome) for m in REPORT_MARGINS))
        for i, c in enumerate(primary)
    ]
    settings = [
        dataclasses.replace(s, secondary=secondary_family(s.key, s.groups, s.declared, margin)) for s in settings
    ]
    return Analysis(config.get("dataset", "mnist"), margin, settings, primary)


def primary_estimate(
    s: Setting, a: int, b: int, final: pd.DataFrame, every: pd.DataFrame, preds: factorial.Predictions | None
) -> tuple[str, stats.Estimate | str] | None:
    """The whole-uncertainty estimate of depth a minus b in setting `s` (factorial module): (kind, estimate); None
    where the tables have no predictions (seeds only, and the report says so); ("refused", why) where they have
    them but this contrast's cannot be computed whole (a factorial cell with a rate missing for some seed, runs
    without predictions): never a quietly narrower interval."""
    if preds is None:
        return None
    rows = {d: setting_rows(s, d, final) for d in (a, b)}
    if any(r.empty for r in rows.values()):
        return None  # a depth without runs: the contrast is not computed anyway
    paired = len(common_seeds(s.groups[a], s.groups[b]))
    try:
        if "band_point" in final and all(r["band_point"].notna().all() for r in rows.values()):
            cells = {
                d: factorial.band_rows(every, factorial.cell_key(r.iloc[0][factorial.CELL])) for d, r in rows.items()
            }
            est = factorial.chosen_estimate(cells[a], cells[b], preds)
            kind, what = "chosen", "with every rate of the band trained and predicted for both depths"
        else:
            trained = {d: r[~r["seed"].astype(int).isin(s.groups[d].failed)] for d, r in rows.items()}
            est = factorial.crossed_estimate(trained[a], trained[b], preds)
            kind, what = "crossed", "with both depths' predictions"
            if s.experiment == "tuned":
                est = factorial.with_search(est, every, a, b)
                kind = "searched" if isinstance(est, stats.Searched) else kind
    except ValueError as e:
        return "refused", f"the whole interval needs {e}"
    if est.n != paired:
        return "refused", f"{est.n} of the {paired} paired seeds {what}: the band or the predictions are incomplete"
    return kind, est


def setting_rows(s: Setting, depth: int, final: pd.DataFrame) -> pd.DataFrame:
    """The retrained final runs behind setting `s`'s group of `depth` (its study column names the cell)."""
    g = s.groups.get(depth)
    if g is None or "study" not in final or not s.studies.get(depth):
        return final.iloc[:0]
    return final[final["study"].isin(s.studies[depth])]


def opening_sentence(an: Analysis) -> str:
    """The answer in one computed sentence (at most 40 words)."""
    if not an.primary:
        return (
            f"On {an.name}, this study has no setting with depth 4 and a neighbour, so it does not answer "
            '"why four layers?"; the sections below describe what it ran.'
        )
    counts = {o: sum(c.outcome == o for c in an.primary) for o in (*OUTCOMES, "not computed")}
    listed = ", ".join(f"{k} {o}" for o, k in counts.items() if k or o in OUTCOMES)  # "0 worse" is news too
    wins, both = an.four_beats_both()
    if both == 1:
        where = "in its one setting" if wins else "in none of its one setting"
    else:
        where = ("in none" if wins == 0 else "in every one" if wins == both else f"in {wins}") + f" of {both} settings"
    return (
        f"On {an.name}, four layers beats both three and five {where}; of its "
        f"{plural(len(an.primary), 'paired contrast')} with them (Holm, margin ±{100 * an.margin:.2f} points): "
        f"{listed}."
    )


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --- across datasets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interaction:
    """(depth a minus depth b) on one dataset minus the same on another: does the effect carry over?"""

    setting: str
    a: int
    b: int
    outcome: str  # "differs", "carries over", "inconclusive" or "not computed"
    n: int = 0  # seeds with both contrasts
    diff_first: float = math.nan  # mean per-seed difference on each dataset, over those seeds
    diff_second: float = math.nan
    diff: float = math.nan  # first minus second
    corr: float = math.nan  # correlation of the two datasets' per-seed differences
    ci: tuple[float, float] = (math.nan, math.nan)  # Holm-consistent level: excludes 0 iff "differs"
    level: float = math.nan
    p_holm: float = math.nan
    ci_equivalence: tuple[float, float] = (math.nan, math.nan)
    p_equivalence_holm: float = math.nan
    reason: str | None = None
    sd: float = math.nan  # spread of the per-seed differences-in-differences
    strictest: float = math.nan  # the family's strictest level (alpha / family size)

    @property
    def detectable(self) -> float:
        """The smallest difference-in-differences found with 80% power at the strictest level, at the
        measured spread and n (nan when it cannot be computed)."""
        if not (self.n > 1 and self.sd > 0 and math.isfinite(self.strictest)):
            return math.nan
        return stats.detectable(self.sd, self.n, self.strictest)


def seed_differences(s: Setting, a: int, b: int) -> pd.Series:
    """Per-seed accuracy of depth a minus depth b, over the seeds both trained, indexed by seed."""
    ga, gb = s.groups[a], s.groups[b]
    seeds = common_seeds(ga, gb)
    return ga.trained.loc[seeds] - gb.trained.loc[seeds]


def interactions(first: Analysis, second: Analysis, alpha: float = ALPHA) -> list[Interaction]:
    """For each primary contrast both datasets declare, the difference between datasets of its per-seed
    differences. Seed k fixes the same initialisation and batch order on both datasets, so the two are
    paired by seed: paired t and TOST within +-margin on the difference-in-differences, one Holm family."""
    keys = [(c.setting, c.a, c.b) for c in first.primary]
    keys = [k for k in keys if any((c.setting, c.a, c.b) == k for c in second.primary)]
    items = [
        ((key, a, b), seed_differences(first.setting(key), a, b), seed_differences(second.setting(key), a, b))
        for key, a, b in keys
    ]
    return difference_family(items, first.margin, alpha)


def difference_family(items: list[tuple[tuple, pd.Series, pd.Series]], margin: float, alpha: float = ALPHA):
    """Per item ((setting, a, b), per-seed differences d1, per-seed differences d2), d1 minus d2 over the
    seeds both have, paired by seed: paired t and TOST within +-margin, one Holm family."""
    pairs, tests, reasons = [], [], []
    for _, d1, d2 in items:
        seeds = sorted(set(d1.index) & set(d2.index))
        x, y = d1.loc[seeds].to_numpy(float), d2.loc[seeds].to_numpy(float)
        pairs.append((x, y))
        if len(x) and np.array_equal(x, y):  # e.g. two runs of the same computation on the same processor
            tests.append(None)
            reasons.append("identical seed for seed: the same computation on both sides, nothing to test")
            continue
        try:
            tests.append(stats.paired(x, y, margin))
            reasons.append(None)
        except ValueError as e:
            tests.append(None)
            reasons.append(str(e))
    p = [t.p if t else 1.0 for t in tests]
    p_eq = [t.p_equivalence if t else 1.0 for t in tests]
    p_holm, p_eq_holm = stats.holm(p, alpha), stats.holm(p_eq, alpha)
    levels, levels_eq = stats.holm_levels(p, alpha), stats.holm_levels(p_eq, alpha)
    out = []
    for i, (((key, a, b), _, _), t, (x, y)) in enumerate(zip(items, tests, pairs)):
        if t is None:
            out.append(Interaction(key, a, b, "not computed", reason=reasons[i]))
            continue
        outcome = "differs" if p_holm[i] <= alpha else "carries over" if p_eq_holm[i] <= alpha else "inconclusive"
        out.append(
            Interaction(
                key,
                a,
                b,
                outcome,
                t.n,
                float(x.mean()),
                float(y.mean()),
                t.mean,
                t.corr,
                clip(stats.paired_interval(x, y, levels[i]), 2.0),
                levels[i],
                p_holm[i],
                clip(stats.paired_interval(x, y, min(2 * levels_eq[i], 1.0)), 2.0),
                p_eq_holm[i],
                sd=float(np.std(x - y, ddof=1)) if len(x) > 1 else math.nan,
                strictest=alpha / max(len(items), 1),
            )
        )
    return out


# --- cost ------------------------------------------------------------------------------------------


def flops_to_reach(trials: pd.DataFrame, epochs: pd.DataFrame, thresholds: list[float]) -> pd.DataFrame:
    """Per tuned depth and threshold, the fewest training FLOPs any trial spent until the first epoch at
    which its validation accuracy reached the threshold (its validation curve; nan if none)."""
    t = trials[(trials["experiment"] == "tuned") & trials["state"].isin(["complete", "pruned"])]
    t = t.dropna(subset=["train_flops"])
    t = t[t["epochs_run"] > 0] if "epochs_run" in t else t
    curves = epochs[(epochs["experiment"] == "tuned") & (epochs["run"] == "tuning")]
    rows = []
    for depth, g in t.groupby("depth"):
        c = curves[curves["depth"] == depth].merge(g[["trial", "train_flops", "epochs_run"]], on="trial")
        c = c.assign(flops=c["train_flops"] / c["epochs_run"] * c["epoch"])
        for th in thresholds:
            reach = c[c["val_accuracy"] >= th - 1e-12]
            rows.append(
                {"depth": int(depth), "threshold": th, "flops": reach["flops"].min() if len(reach) else math.nan}
            )
    return pd.DataFrame(rows, columns=["depth", "threshold", "flops"])


def cost_thresholds(trials: pd.DataFrame) -> list[float]:
    """Five validation accuracies a quarter point apart, the highest half a point below the best that
    every tuned depth reached, so no ratio hinges on one trial's last epoch near one threshold."""
    done = trials[(trials["experiment"] == "tuned") & trials["state"].isin(["complete", "pruned"])]
    if done.empty or done["val_accuracy"].isna().all():
        return []
    top = done.groupby("depth")["best_epoch_val_accuracy" if "best_epoch_val_accuracy" in done else "val_accuracy"]
    top = math.floor((top.max().min() - 0.005) * 400) / 400
    return [round(top - 0.0025 * k, 4) for k in range(4, -1, -1) if top - 0.0025 * k > 0]


# --- sanity checks ---------------------------------------------------------------------------------

EDGE_FRACTION = 0.05  # a best value within 5% of its (log) range of an edge is "on the edge"


def edge_warnings(trials: pd.DataFrame, config: dict, caps_declared: dict) -> tuple[list[str], list[str]]:
    """(warnings, declared caps): best tuned values within EDGE_FRACTION of a range's edge (log where
    tuned so). An upper limit the design declares a cap is reported as such, not as an edge."""
    warnings, caps = [], []
    space = config.get("experiments", {}).get("tuned", {}).get("space", {})
    ranges = {
        "lr": (space.get("lr"), True),
        "width": (space.get("width"), True),
        "taper": (space.get("taper"), False),
        "epochs": ([1, space.get("max_epochs")], False),
    }
    best = trials[trials["retrained"].astype(bool) & (trials["experiment"] == "tuned")] if len(trials) else trials
    for _, row in best.iterrows():
        where = row["experiment"]
        for name, (rng, log) in ranges.items():
            col = f"param_{name}"
            if rng is None or None in rng or col not in row or pd.isna(row[col]) or rng[0] == rng[1]:
                continue
            lo, hi = (math.log(v) for v in rng) if log else rng
            frac = ((math.log(row[col]) if log else row[col]) - lo) / (hi - lo)
            if frac >= 1 - EDGE_FRACTION and name in caps_declared:
                caps.append(
                    f"{where}, depth {row['depth']}: best {name} = {row[col]:.4g} is at or near its "
                    f"{caps_declared[name]}."
                )
            elif (frac <= EDGE_FRACTION and name != "epochs") or frac >= 1 - EDGE_FRACTION:  # 1 epoch: no lower
                side = "lower" if frac <= EDGE_FRACTION else "upper"
                warnings.append(
                    f"{where}, depth {row['depth']}: best {name} = {row[col]:.4g} sits on the {side} "
                    f"edge of its range [{rng[0]}, {rng[1]}]; widen the range and rerun."
                )
    return warnings, caps


def state_counts(trials: pd.DataFrame) -> pd.DataFrame:
    keys = ["experiment", "budget", "shape", "depth"] if "shape" in trials else ["experiment", "budget", "depth"]
    if trials.empty:
        return pd.DataFrame(columns=[*keys, *TRIAL_STATES[:5]])
    counts = trials.assign(budget=trials["budget"].astype("string").fillna("")).pivot_table(
        index=keys, columns="state", values="trial", aggfunc="count", fill_value=0
    )
    shown = [s for s in TRIAL_STATES if s in TRIAL_STATES[:5] or s in counts]  # in flight only where there is some
    for s in shown:
        if s not in counts:
            counts[s] = 0
    return counts[shown].reset_index()


def pareto(df: pd.DataFrame, cost: str, value: str) -> pd.DataFrame:
    """Rows not beaten by any cheaper-or-equal row (lower cost, higher value), sorted by cost."""
    rows, best = [], -math.inf
    for _, r in df.sort_values([cost, value], ascending=[True, False]).iterrows():
        if r[value] > best:
            rows.append(r)
            best = r[value]
    return pd.DataFrame(rows)
