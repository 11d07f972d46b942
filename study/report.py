"""The report: "why four layers?" answered from three experiments, rendered from saved tables only.

    python -m study.report --results results                # from trials/epochs/final.csv
    python -m study.report --storage URL --out DIR          # from an Optuna storage (any worker)

Every comparison uses retrained runs (each seed one observation). Per experiment, every pair of
depths gets Welch's difference of means with an interval at its Holm-corrected level; "a beats b"
only when the Holm-adjusted p-value is below 0.05, and beside every "no detectable difference" the
smallest difference the design could have detected with 80% power. Cost is exact training FLOPs;
seconds only beside them. Nothing is concluded about a depth that cannot be compared (fewer than
two seeds, a diverged seed, no runs yet), and no answer rests on a tie-break between numbers the
report calls indistinguishable.
"""
from __future__ import annotations

from mnist_bench import cli

cli.starting(__name__)

import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from mnist_bench.errors import UsageError, UserError  # noqa: E402
from mnist_bench.interrupt import Interrupted  # noqa: E402

ALPHA = 0.05  # family-wise error rate per experiment (Holm)
POWER = 0.80  # for the smallest detectable difference
EDGE_FRACTION = 0.05  # a best value within 5% of its (log) range of an edge is "on the edge"
SOURCE_DEPTH = 4
NEIGHBOURS = (3, 5)  # "why four layers, not three or five?"
DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
OUTCOME_WORDS = {"better": "beats", "worse": "is beaten by", "indistinguishable": "is indistinguishable from"}


# --- statistics ----------------------------------------------------------------------------------


def t_interval(x: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    if len(x) < 2:
        return (math.nan, math.nan)
    half = stats.t.ppf(1 - alpha / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return (x.mean() - half, x.mean() + half)


def welch(a: np.ndarray, b: np.ndarray, alpha: float = ALPHA) -> tuple[float, float, float, float, float, float]:
    """(mean(b) - mean(a), CI low, high at 1 - alpha, two-sided p, standard error, Welch df)."""
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        raise ValueError("Welch's test needs spread in at least one group")
    diff = b.mean() - a.mean()
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(1 - alpha / 2, df) * se
    p = 2 * stats.t.sf(abs(diff) / se, df)
    return diff, diff - half, diff + half, p, se, df


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given (reject where adjusted <= alpha)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for step, i in enumerate(order):
        running = max(running, min(1.0, (m - step) * p_values[i]))
        adjusted[i] = running
    return adjusted


def holm_levels(p_values: list[float], alpha: float = ALPHA) -> list[float]:
    """Each comparison's Holm step level alpha / (m - k + 1), k its rank by p (1 = smallest)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    levels = [alpha] * m
    for step, i in enumerate(order):
        levels[i] = alpha / (m - step)
    return levels


@dataclass(frozen=True)
class Comparison:
    a: int  # shallower depth
    b: int  # deeper depth
    diff: float  # mean(b) - mean(a), accuracy fraction
    ci_low: float  # interval at the Holm-corrected level `level`
    ci_high: float
    p_value: float
    p_holm: float
    level: float  # the Holm step level the interval is drawn at (0.05 / (m - k + 1))
    detectable_size: float  # smallest |difference| detectable with 80% power at that level
    reason: str | None = None  # why nothing could be computed; then nothing is concluded

    @property
    def detectable(self) -> bool:
        return self.reason is None and self.p_holm <= ALPHA


@dataclass(frozen=True)
class Group:
    """One depth's retrained runs in one experiment (and budget)."""

    depth: int
    accuracies: np.ndarray  # non-diverged runs
    runs: int
    diverged: int
    n_params: int
    train_flops: float  # mean training FLOPs per run
    train_seconds: float  # mean per run, beside the FLOPs only
    widths: str

    @property
    def n(self) -> int:
        return len(self.accuracies)

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean()) if self.n else math.nan

    @property
    def std(self) -> float:
        return float(self.accuracies.std(ddof=1)) if self.n > 1 else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return t_interval(self.accuracies)

    @property
    def problem(self) -> str | None:
        if self.runs == 0:
            return "no retrained runs yet"
        if self.diverged:
            return f"{self.diverged} of {self.runs} retrained seeds diverged"
        if self.n < 2:
            return f"only {self.n} retrained seed (an interval needs 2 or more)"
        return None


def groups_of(final: pd.DataFrame, depths: list[int] | None = None) -> dict[int, Group]:
    """Groups by depth of one experiment's final runs; `depths` the study asked for (missing ones
    become groups without runs, which cannot be compared)."""
    out = {}
    for d in sorted(set(depths or []) | {int(x) for x in final["depth"].unique()}):
        g = final[final["depth"] == d]
        diverged = g["test_accuracy"].isna()
        if "diverged" in g:
            diverged |= g["diverged"].fillna(False).astype(bool)
        ok = g[~diverged]
        out[d] = Group(depth=d, accuracies=ok["test_accuracy"].to_numpy(float), runs=len(g), diverged=int(diverged.sum()),
                       n_params=int(g["n_params"].iloc[0]) if len(g) else 0,
                       train_flops=float(g["train_flops"].mean()) if len(g) and "train_flops" in g else math.nan,
                       train_seconds=float(g["train_seconds"].mean()) if len(g) else math.nan,
                       widths=str(g["widths"].fillna("").iloc[0]) if len(g) else "")
    return out


def compare(groups: dict[int, Group], alpha: float = ALPHA) -> list[Comparison]:
    """Every pair of depths, Holm-corrected over the computable pairs of this family."""
    pairs, raw = [], []
    for a, b in itertools.combinations(sorted(groups), 2):
        ga, gb = groups[a], groups[b]
        reason = ga.problem and f"depth {a}: {ga.problem}" or gb.problem and f"depth {b}: {gb.problem}"
        if not reason and np.ptp(ga.accuracies) == 0 and np.ptp(gb.accuracies) == 0:
            reason = "every seed of both depths scored the same: no spread to test against"
        pairs.append((a, b, reason))
        raw.append(None if reason else welch(ga.accuracies, gb.accuracies)[3])
    computable = [p for p in raw if p is not None]
    adjusted, levels = iter(holm(computable)), iter(holm_levels(computable, alpha))
    out = []
    for (a, b, reason), p in zip(pairs, raw):
        if reason:
            out.append(Comparison(a, b, groups[b].mean - groups[a].mean, math.nan, math.nan, math.nan, math.nan,
                                  math.nan, math.nan, reason))
            continue
        p_holm, level = next(adjusted), next(levels)
        diff, lo, hi, p, se, df = welch(groups[a].accuracies, groups[b].accuracies, level)
        size = (stats.t.ppf(1 - level / 2, df) + stats.t.ppf(POWER, df)) * se
        out.append(Comparison(a, b, diff, lo, hi, p, p_holm, level, size))
    return out


def pts(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def describe(c: Comparison) -> str:
    """One plain sentence per pair of depths."""
    if c.reason is not None:
        return f"Depth {c.a} and depth {c.b} cannot be compared: {c.reason}."
    conf = f"{100 * (1 - c.level):.2f}% interval (Holm)"
    if not c.detectable:
        return (f"No detectable difference between depth {c.a} and depth {c.b}: depth {c.b} minus depth {c.a} "
                f"{pts(c.diff)} points, {conf} [{pts(c.ci_low)}, {pts(c.ci_high)}], Holm p = {c.p_holm:.3g}; "
                f"the design would have detected {pts(c.detectable_size)} points or more (80% power).")
    win, lose = (c.b, c.a) if c.diff > 0 else (c.a, c.b)
    lo, hi = (c.ci_low, c.ci_high) if c.diff > 0 else (-c.ci_high, -c.ci_low)
    return (f"Depth {win} beats depth {lose} by {pts(abs(c.diff))} points ({conf} [{pts(lo)}, {pts(hi)}], "
            f"Holm p = {c.p_holm:.3g}).")


@dataclass(frozen=True)
class Verdict:
    """What one family of comparisons says. `best` etc. are None when it refuses to conclude."""

    best: int | None  # highest mean
    not_worse: tuple[int, ...]  # depths not detectably worse than the best (the best included)
    four: dict[int, str]  # neighbour depth -> "better", "worse", "indistinguishable" (depth 4 against it)
    refused: str | None  # why no verdict


def verdict(groups: dict[int, Group], comparisons: list[Comparison]) -> Verdict:
    bad = [f"depth {d}: {g.problem}" for d, g in groups.items() if g.problem]
    bad += [f"depths {c.a} and {c.b}: {c.reason}" for c in comparisons if c.reason and "depth" not in c.reason[:6]]
    if bad:
        return Verdict(None, (), {}, "these depths cannot be compared, so nothing is concluded: " + "; ".join(bad))
    if len(groups) < 2:
        only = f"depth {next(iter(groups))}" if groups else "no depth"
        return Verdict(None, (), {}, f"only {only} was studied: there is nothing to compare it with")
    pair = {(c.a, c.b): c for c in comparisons}
    best = max(groups.values(), key=lambda g: g.mean).depth
    not_worse = tuple(d for d in sorted(groups) if d == best or not pair[(min(d, best), max(d, best))].detectable)
    four = {}
    for n in NEIGHBOURS:
        if SOURCE_DEPTH in groups and n in groups:
            c = pair[(min(n, SOURCE_DEPTH), max(n, SOURCE_DEPTH))]
            four[n] = ("indistinguishable" if not c.detectable else
                       "better" if (c.diff > 0) == (SOURCE_DEPTH > n) else "worse")
    return Verdict(best, not_worse, four, None)


def four_phrase(v: Verdict, comparisons: list[Comparison]) -> str:
    """'depth 4 is detectably better than 3 and not detectably different from 5 (...)'."""
    if not v.four:
        return "depth 4 was not compared with 3 and 5"
    pair = {(c.a, c.b): c for c in comparisons}
    parts = []
    for n, outcome in v.four.items():
        c = pair[(min(n, SOURCE_DEPTH), max(n, SOURCE_DEPTH))]
        four_minus = c.diff if SOURCE_DEPTH == c.b else -c.diff
        word = OUTCOME_WORDS[outcome]
        extra = (f"; a difference of {pts(c.detectable_size)} points would have been detected"
                 if outcome == "indistinguishable" else "")
        parts.append(f"{word} depth {n} ({'+' if four_minus >= 0 else ''}{pts(four_minus)} points{extra})")
    return "depth 4 " + " and ".join(parts)


# --- the experiments -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One family of comparisons: an experiment (and, for matched, a budget)."""

    title: str
    groups: dict[int, Group]
    comparisons: list[Comparison]
    verdict: Verdict


def family(title: str, final: pd.DataFrame, depths: list[int]) -> Family:
    groups = groups_of(final, depths)
    comparisons = compare(groups)
    return Family(title, groups, comparisons, verdict(groups, comparisons))


def recipe_at_epoch(epochs: pd.DataFrame, final: pd.DataFrame, epoch: int) -> pd.DataFrame:
    """The recipe's final runs as rows of (depth, seed, test_accuracy, cost so far) after `epoch` epochs."""
    runs = epochs[(epochs["experiment"] == "recipe") & (epochs["run"] == "final") & (epochs["epoch"] == epoch)]
    rec = final[final["experiment"] == "recipe"]
    merged = runs[["depth", "seed", "test_accuracy", "train_seconds"]].merge(
        rec[["depth", "seed", "n_params", "widths", "diverged", "train_flops", "param_epochs"]], on=["depth", "seed"])
    return merged.assign(train_flops=merged["train_flops"] * epoch / merged["param_epochs"])


def claims_sentence(recipe: dict[int, Family], claims: list) -> str | None:
    """How the text's own claims fare on the recipe's runs (same runs, 2 and 10 epochs)."""
    parts, reached = [], 0
    for depth, ep, claim in claims:
        g = recipe[ep].groups.get(depth) if ep in recipe else None
        if g is None or not g.n:
            continue
        reached += g.mean >= claim
        parts.append(f"depth {depth} after {ep} epochs {pts(g.mean)}% against {pts(claim)}%")
    if not parts:
        return None
    return f"The text's own claims: {reached} of {len(parts)} reached ({'; '.join(parts)}; n={g.n} each)."


def summary_sentence(name: str, f: Family) -> str:
    v = f.verdict
    if v.refused:
        return f"{name}: no verdict ({v.refused})."
    best = f.groups[v.best]
    tied = [d for d in v.not_worse if d != v.best]
    tie = (f"; depths {', '.join(map(str, tied))} are not detectably worse" if tied else
           "; every other depth is detectably worse")
    return (f"{name}: depth {v.best} has the highest mean ({pts(best.mean)}%, n={best.n}){tie}; "
            f"{four_phrase(v, f.comparisons)}.")


def opening(recipe: dict[int, Family], matched: dict[int, Family], tuned: Family | None, fronts: str | None,
            claims: list | None = None) -> str:
    """The paragraph that answers the question, computed from the three experiments."""
    parts, support, total = [], 0, 0

    def tally(v: Verdict) -> None:
        nonlocal support, total
        if v.refused or not v.four:
            return
        total += 1
        support += all(o == "better" for o in v.four.values())

    if recipe:
        ten = recipe[max(recipe)]
        tally(ten.verdict)
        parts.append(summary_sentence(f"With the text's own recipe (plain SGD, lr 0.03, batch 64, {max(recipe)} "
                                      "epochs)", ten))
        if claims and (sentence := claims_sentence(recipe, claims)):
            parts.append(sentence)
    for budget, f in matched.items():
        tally(f.verdict)
        parts.append(summary_sentence(f"At a matched budget of {budget:,} parameters (learning rate tuned per depth)", f))
    if tuned is not None:
        tally(tuned.verdict)
        parts.append(summary_sentence("Each depth tuned to its best", tuned))
    if fronts:
        parts.append(fronts)
    if total:
        parts.append(f"Four layers beats both three and five in {support} of the {total} settings above (the recipe, "
                     "each matched budget, the tuned depths)"
                     + (": the measurements do not single out four layers." if support < total else "."))
    return " ".join(parts)


# --- sanity checks -------------------------------------------------------------------------------


def edge_warnings(trials: pd.DataFrame, config: dict) -> tuple[list[str], list[str]]:
    """(warnings, declared caps): best tuned values within EDGE_FRACTION of a range's edge (log where
    tuned so). An upper limit the design declares a cap is reported as such, not as an edge."""
    warnings, caps = [], []
    exps = config.get("experiments", {})
    best = trials[trials["retrained"].astype(bool)] if len(trials) else trials
    for _, row in best.iterrows():
        exp = exps.get(row["experiment"], {})
        where = f"{row['experiment']}" + (f" {int(row['budget']):,} params" if pd.notna(row.get("budget")) else "")
        if row["experiment"] == "matched":
            ranges = {"lr": (exp.get("lr"), True)}
            declared = {}
        else:
            space = exp.get("space", {})
            ranges = {"lr": (space.get("lr"), True), "width": (space.get("width"), True),
                      "taper": (space.get("taper"), False), "epochs": ([1, space.get("max_epochs")], False)}
            from study.config import SearchSpace
            declared = SearchSpace.CAPS
        for name, (rng, log) in ranges.items():
            col = f"param_{name}"
            if rng is None or None in rng or col not in row or pd.isna(row[col]) or rng[0] == rng[1]:
                continue
            lo, hi = (math.log(v) for v in rng) if log else rng
            frac = ((math.log(row[col]) if log else row[col]) - lo) / (hi - lo)
            if frac >= 1 - EDGE_FRACTION and name in declared:
                caps.append(f"{where}, depth {row['depth']}: best {name} = {row[col]:.4g} is at its {declared[name]}.")
            elif frac <= EDGE_FRACTION or frac >= 1 - EDGE_FRACTION:
                side = "lower" if frac <= EDGE_FRACTION else "upper"
                warnings.append(f"{where}, depth {row['depth']}: best {name} = {row[col]:.4g} sits on the {side} "
                                f"edge of its range [{rng[0]}, {rng[1]}]; widen the range and rerun.")
    return warnings, caps


def state_counts(trials: pd.DataFrame) -> pd.DataFrame:
    keys = ["experiment", "budget", "depth"]
    counts = trials.assign(budget=trials["budget"].astype("string").fillna("")).pivot_table(
        index=keys, columns="state", values="trial", aggfunc="count", fill_value=0)
    for s in ("complete", "pruned", "diverged", "failed"):
        if s not in counts:
            counts[s] = 0
    return counts[["complete", "pruned", "diverged", "failed"]].reset_index()


def pareto(df: pd.DataFrame, cost: str, value: str) -> pd.DataFrame:
    """Rows not beaten by any cheaper-or-equal row (lower cost, higher value), sorted by cost."""
    rows, best = [], -math.inf
    for _, r in df.sort_values([cost, value], ascending=[True, False]).iterrows():
        if r[value] > best:
            rows.append(r)
            best = r[value]
    return pd.DataFrame(rows)


def front_summary(trials: pd.DataFrame) -> tuple[str | None, pd.DataFrame]:
    """Per tuned depth, its accuracy-vs-training-FLOPs Pareto front over all its completed trials, and
    the fewest FLOPs it needed to reach fixed validation accuracies; one sentence that compares them."""
    done = trials[(trials["experiment"] == "tuned") & (trials["state"] == "complete")].dropna(subset=["train_flops"])
    if done.empty:
        return None, pd.DataFrame()
    best_overall = done["val_accuracy"].max()
    targets = [t for t in (0.97, 0.975, 0.98) if t <= best_overall] or [round(best_overall - 0.005, 3)]
    rows = []
    for d, g in done.groupby("depth"):
        row = {"depth": int(d), "trials": len(g), "best val acc": pts(g["val_accuracy"].max())}
        for t in targets:
            reach = g[g["val_accuracy"] >= t]
            row[f"GFLOP to {pts(t)}%"] = f"{reach['train_flops'].min() / 1e9:,.0f}" if len(reach) else "not reached"
        rows.append(row)
    table = pd.DataFrame(rows)
    t = targets[0]
    reach = {int(d): g[g["val_accuracy"] >= t]["train_flops"].min() for d, g in done.groupby("depth")}
    reach = {d: v for d, v in reach.items() if pd.notna(v)}
    if not reach:
        return None, table
    cheapest = min(reach, key=reach.get)
    others = ", ".join(f"depth {d} {reach[d] / reach[cheapest]:.1f}x" for d in sorted(reach) if d != cheapest)
    sentence = (f"On cost, over all tuning trials (accuracy-vs-training-FLOPs Pareto fronts), depth {cheapest} reached "
                f"{pts(t)}% validation accuracy with the fewest training FLOPs ({reach[cheapest] / 1e9:,.0f} GFLOP"
                + (f"; {others}" if others else "") + "); this compares search results, one search per depth, "
                "not seeds, so it is descriptive.")
    return sentence, table


# --- plots ---------------------------------------------------------------------------------------


def plots(out: Path, trials: pd.DataFrame, epochs: pd.DataFrame, final: pd.DataFrame, config: dict,
          recipe: dict[int, Family], matched: dict[int, Family], throughput: pd.DataFrame | None) -> dict[str, str]:
    """Write the PNGs from the tables; returns {file name: caption}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    np.random.seed(0)  # seaborn's jitter draws from numpy's global generator: same tables, same PNGs
    written: dict[str, str] = {}

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written[name] = caption

    if recipe:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for i, (epoch, f) in enumerate(sorted(recipe.items())):
            xs = [d for d, g in f.groups.items() if g.n]
            means = [100 * f.groups[d].mean for d in xs]
            lo = [100 * (f.groups[d].mean - f.groups[d].ci[0]) if f.groups[d].n > 1 else 0 for d in xs]
            hi = [100 * (f.groups[d].ci[1] - f.groups[d].mean) if f.groups[d].n > 1 else 0 for d in xs]
            ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=4, color=f"C{i}",
                        label=f"after {epoch} epochs (mean, 95% CI)")
            for d in xs:
                acc = 100 * f.groups[d].accuracies
                ax.scatter(np.full(len(acc), d) + 0.08 * (i - 0.5), acc, s=8, color=f"C{i}", alpha=0.35)
        claims = config.get("experiments", {}).get("recipe", {}).get("claims", [])
        epoch_colour = {ep: f"C{i}" for i, ep in enumerate(sorted(recipe))}
        for depth, ep, claim in claims if config.get("dataset", "mnist") == "mnist" else []:
            ax.scatter([depth], [100 * claim], marker="*", s=220, color=epoch_colour.get(ep, "C3"),
                       edgecolor="k", zorder=6, label=f"text's claim, depth {depth}, {ep} epochs ({100 * claim:.2f}%)")
        ax.set(xlabel="depth (Linear layers)", ylabel="test accuracy (%)",
               title="The text's recipe across depths (each dot a seed)")
        allv = [100 * g.mean for f in recipe.values() for g in f.groups.values() if g.n]
        ax.set_ylim(max(min(allv) - 3, 0), 100)
        ax.legend(fontsize=7, loc="lower left")
        save(fig, "recipe.png", "The text's recipe (plain SGD, lr 0.03, batch 64, every training image) across "
             "depths: test accuracy after 2 and 10 epochs, the same runs"
             + ("; stars are the text's claims." if config.get("dataset", "mnist") == "mnist" else "."))

    if matched:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        low = 100.0  # lowest mean shown: the axis starts just below it
        for i, (budget, f) in enumerate(sorted(matched.items())):
            xs = [d for d, g in f.groups.items() if g.n and d > 1]
            if not xs:
                continue
            m = np.array([100 * f.groups[d].mean for d in xs])
            lo = np.array([100 * f.groups[d].ci[0] if f.groups[d].n > 1 else 100 * f.groups[d].mean for d in xs])
            hi = np.array([100 * f.groups[d].ci[1] if f.groups[d].n > 1 else 100 * f.groups[d].mean for d in xs])
            ax.plot(xs, m, marker="o", color=f"C{i}", label=f"{budget:,} parameters")
            ax.fill_between(xs, np.clip(lo, 0, 100), np.clip(hi, 0, 100), color=f"C{i}", alpha=0.2)  # accuracy <= 100%
            low = min(low, m.min())
        soft = final[(final["experiment"] == "matched") & (final["depth"] == 1)]["test_accuracy"].dropna()
        if len(soft):
            ax.axhline(100 * soft.mean(), ls="--", color="0.4",
                       label=f"softmax regression, tuned lr ({100 * soft.mean():.2f}%, 7,850 parameters)")
        ax.set(xlabel="depth (Linear layers)", ylabel="test accuracy (%)",
               title="Depth at a matched parameter budget (mean, 95% band)",
               ylim=(min(low, 100 * soft.mean() if len(soft) else low) - 1, 100))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=8, loc="lower left")
        save(fig, "matched.png", "Test accuracy against depth at three parameter budgets (halving funnel scaled to "
             "the budget, learning rate tuned per cell); bands are 95% t-intervals over seeds.")

    done = trials[(trials["experiment"] == "tuned") & (trials["state"] == "complete")].dropna(subset=["train_flops"])
    if not done.empty:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for i, (d, g) in enumerate(done.groupby("depth")):
            ax.scatter(g["train_flops"], 100 * g["val_accuracy"], s=14, alpha=0.4, color=f"C{i}")
            front = pareto(g, "train_flops", "val_accuracy")
            ax.step(front["train_flops"], 100 * front["val_accuracy"], where="post", color=f"C{i}",
                    label=f"depth {d}: Pareto front")
        ax.set(xscale="log", xlabel="training FLOPs of the trial", ylabel="validation accuracy (%)",
               title="Each depth tuned: accuracy against training cost, every trial",
               ylim=(max(100 * done["val_accuracy"].quantile(0.2) - 1, 80), None))
        ax.legend(fontsize=8, loc="lower right")
        save(fig, "tuned.png", "Every completed tuning trial of the tuned experiment: validation accuracy against "
             "exact training FLOPs, with each depth's Pareto front.")

    best = trials[trials["retrained"].astype(bool) & (trials["experiment"] == "tuned")]
    curves = epochs[(epochs["run"] == "tuning") & (epochs["experiment"] == "tuned")].merge(
        best[["depth", "trial"]], on=["depth", "trial"])
    if not curves.empty:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        sns.lineplot(data=curves, x="epoch", y="val_accuracy", hue="depth", marker="o", ax=axes[0], palette="tab10")
        axes[0].set(ylabel="validation accuracy", title="Tuned: best trial per depth")
        long = curves.melt(id_vars=["depth", "epoch"], value_vars=["train_loss", "val_loss"],
                           var_name="split", value_name="loss")
        sns.lineplot(data=long, x="epoch", y="loss", hue="depth", style="split", marker="o", ax=axes[1],
                     palette="tab10")
        axes[1].set(yscale="log", title="Train vs validation loss (gap = overfitting)")
        save(fig, "curves.png", "Learning curves of the retrained tuning trial of each depth (tuned experiment).")

    if throughput is not None and not throughput.empty:
        t = throughput.assign(setting=throughput["pipeline"] + ", " + throughput["device"] + ", "
                              + throughput["threads"].astype(str) + " thr")
        g = sns.relplot(data=t, x="batch_size", y="samples_per_s", hue="setting", col="model", kind="line",
                        marker="o", height=3.4, aspect=1.0, col_wrap=4)
        for ax in g.axes.flat:
            ax.set(xscale="log", yscale="log")
        g.set_axis_labels("batch size", "samples / s")
        g.figure.suptitle("Training-step throughput", y=1.02)
        g.figure.savefig(out / "throughput.png", dpi=110, bbox_inches="tight")
        plt.close(g.figure)
        written["throughput.png"] = ("Training-step samples/s per model and batch size: harness vs source pipeline, "
                                     "per device and thread count.")
    return written


# --- the document --------------------------------------------------------------------------------


def cell(v) -> str:
    """A table cell: a missing number shows as n/a, never as nan."""
    return "n/a" if isinstance(v, float) and not math.isfinite(v) else str(v)


def md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def group_table(f: Family) -> str:
    rows = []
    for d, g in f.groups.items():
        lo, hi = g.ci
        rows.append({"depth": d, "widths": g.widths or "-", "parameters": f"{g.n_params:,}", "n": g.n,
                     "test acc mean": pts(g.mean), "std": pts(g.std), "95% CI": f"{pts(lo)}-{pts(hi)}",
                     "GFLOP per run": f"{g.train_flops / 1e9:,.1f}" if math.isfinite(g.train_flops) else "n/a",
                     "seconds per run": f"{g.train_seconds:.1f}" if math.isfinite(g.train_seconds) else "n/a"})
    return md_table(pd.DataFrame(rows))


def section(f: Family) -> list[str]:
    doc = [f"### {f.title}", "", group_table(f), ""]
    if f.verdict.refused:
        doc += [f"**No verdict:** {f.verdict.refused}.", ""]
    doc += [f"- {describe(c)}" for c in f.comparisons] + [""]
    return doc


REQUIRED = {  # the columns the report reads
    "trials": ("experiment", "budget", "depth", "trial", "state", "retrained", "val_accuracy", "n_params"),
    "epochs": ("experiment", "budget", "depth", "run", "trial", "seed", "epoch", "train_loss", "val_loss",
               "val_accuracy", "test_accuracy"),
    "final": ("experiment", "budget", "depth", "seed", "test_accuracy", "widths", "n_params", "train_flops",
              "train_seconds"),
}
DTYPES = {"widths": "string", "command": "string", "budget": "Int64"}


def read_table(path: Path, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV written by study.tables, or one line saying what is wrong with it."""
    try:
        head = pd.read_csv(path, nrows=0).columns
        df = pd.read_csv(path, dtype={k: v for k, v in DTYPES.items() if k in head})
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty (0 bytes): regenerate it with python -m study.depth, or "
                        "python -m study.report --storage URL") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a readable table ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path} has no column {missing[0]!r}: not a table written by study.depth (or written by "
                        "an older version; regenerate with python -m study.report --storage URL --out DIR)")
    return df


def read_optional(path: Path) -> pd.DataFrame | None:
    return read_table(path) if path.is_file() else None


def families(trials: pd.DataFrame, epochs: pd.DataFrame, final: pd.DataFrame, config: dict
             ) -> tuple[dict[int, Family], dict[int, Family], Family | None]:
    """(recipe by epoch, matched by budget, tuned) comparison families, each over the depths the study
    asked for (a depth with no runs yet is named, not skipped)."""
    exps = config.get("experiments", {})
    recipe: dict[int, Family] = {}
    if "recipe" in exps or (final["experiment"] == "recipe").any():
        depths = exps.get("recipe", {}).get("depths", [])
        claims_epochs = {ep for _, ep, _ in exps.get("recipe", {}).get("claims", [])} or {2}
        last = exps.get("recipe", {}).get("epochs", 10)
        for ep in sorted(claims_epochs | {last}):
            rows = final[final["experiment"] == "recipe"] if ep == last else recipe_at_epoch(epochs, final, ep)
            recipe[ep] = family(f"After {ep} epochs", rows, depths)
    matched: dict[int, Family] = {}
    m = final[final["experiment"] == "matched"]
    for budget in exps.get("matched", {}).get("budgets", []) or sorted(m["budget"].dropna().unique()):
        depths = [d for d in exps.get("matched", {}).get("depths", []) if d > 1]
        matched[int(budget)] = family(f"{int(budget):,} parameters", m[m["budget"] == budget], depths)
    tuned = None
    if "tuned" in exps or (final["experiment"] == "tuned").any():
        tuned = family("Each depth tuned", final[final["experiment"] == "tuned"],
                       exps.get("tuned", {}).get("depths", []))
    return recipe, matched, tuned


def load_results(results: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """(trials, epochs, final, config) of a results folder, or one line saying what is wrong."""
    missing = [f for f in ("trials.csv", "epochs.csv", "final.csv") if not (results / f).is_file()]
    if missing:
        raise UsageError(f"{results} has no {missing[0]}: run python -m study.depth first, or pass --storage")
    trials, epochs, final = (read_table(results / f"{k}.csv", REQUIRED[k]) for k in ("trials", "epochs", "final"))
    if final.empty:
        raise UserError(f"{results / 'final.csv'} has no rows: the study has no retrained runs yet (still tuning?)")
    config_path = results / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e})") from None
    return trials, epochs, final, config


def settings(trials, epochs, final, config) -> dict[str, Family]:
    """Every family by a name shared across datasets: recipe, matched <budget>, tuned."""
    recipe, matched, tuned = families(trials, epochs, final, config)
    out = {}
    if recipe:
        out[f"recipe, {max(recipe)} epochs"] = recipe[max(recipe)]
    out |= {f"matched, {b:,} parameters": f for b, f in matched.items()}
    if tuned is not None:
        out["tuned"] = tuned
    return out


def cross_dataset(out: Path, mine: tuple, theirs: tuple) -> list[str]:
    """The depth effect on both datasets, on one scale (points relative to each dataset's depth 4),
    per setting, with one sentence each on whether the answer carries over."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [DATASET_NAMES.get(x[3].get("dataset", "mnist"), "?") for x in (mine, theirs)]
    a, b = settings(*mine), settings(*theirs)
    shared = [k for k in a if k in b]
    if not shared:
        return []
    doc = [f"## Does the answer hold beyond {names[0]}?", "",
           f"The same experiments on {names[1]} (same shapes, a harder task). Each table gives, per depth, the mean "
           "retrained test accuracy and its difference from depth 4 of the same dataset, so the depth effect is on "
           "one scale (points) for both.", ""]
    fig, axes = plt.subplots(1, len(shared), figsize=(3.2 * len(shared), 3.4), sharey=False, squeeze=False)
    for ax, key in zip(axes[0], shared):
        fa, fb = a[key], b[key]
        rows = []
        for d in sorted(set(fa.groups) | set(fb.groups)):
            row = {"depth": d}
            for name, f in zip(names, (fa, fb)):
                g, ref = f.groups.get(d), f.groups.get(SOURCE_DEPTH)
                row[f"{name} acc"] = pts(g.mean) if g is not None and g.n else "n/a"
                row[f"{name} minus depth 4"] = (f"{100 * (g.mean - ref.mean):+.2f}" if g is not None and ref is not None
                                                and g.n and ref.n else "n/a")
            rows.append(row)
        for i, (name, f) in enumerate(zip(names, (fa, fb))):
            ref = f.groups.get(SOURCE_DEPTH)
            xs = [d for d, g in f.groups.items() if g.n and ref is not None and ref.n]
            ax.plot(xs, [100 * (f.groups[d].mean - ref.mean) for d in xs], marker="o", color=f"C{i}", label=name)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set(title=key, xlabel="depth", ylabel="points vs depth 4" if ax is axes[0][0] else None)
        ax.legend(fontsize=7)
        doc += [f"### {key}", "", md_table(pd.DataFrame(rows)), "", carry_over(names, fa, fb), ""]
    fig.tight_layout()
    fig.savefig(out / "cross-dataset.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    doc[4:4] = ["![cross-dataset](cross-dataset.png)", "", "Mean test accuracy relative to depth 4 of the same "
                "dataset, per setting (points).", ""]
    return doc


def carry_over(names: list[str], fa: Family, fb: Family) -> str:
    va, vb = fa.verdict, fb.verdict
    if va.refused or vb.refused:
        return f"Cannot say whether the answer carries over: {va.refused or vb.refused}."
    same_four = va.four == vb.four
    if same_four and va.best == vb.best:
        return (f"The answer carries over: on both, depth {va.best} has the highest mean and depth 4 "
                + " and ".join(f"{OUTCOME_WORDS[o]} depth {n}" for n, o in va.four.items()) + ".")
    if same_four:
        return (f"Four layers compares the same way with 3 and 5 on both datasets, but the best depth moves from "
                f"{va.best} on {names[0]} to {vb.best} on {names[1]}.")
    diffs = "; ".join(f"against depth {n}: {va.four.get(n)} on {names[0]}, {vb.four.get(n)} on {names[1]}"
                      for n in NEIGHBOURS if va.four.get(n) != vb.four.get(n))
    return f"The answer does not carry over: depth 4 {diffs}."


def render(results: Path, out: Path | None = None, compare_with: Path | None = None) -> Path:
    """Render report.md and the plots from the tables in `results` into `out` (default: the same
    folder); with `compare_with`, a second dataset's results folder, add the cross-dataset section."""
    out = out or results
    trials, epochs, final, config = load_results(results)
    other = load_results(compare_with) if compare_with is not None else None
    throughput = read_optional(results / "throughput.csv")
    out.mkdir(parents=True, exist_ok=True)

    recipe, matched, tuned = families(trials, epochs, final, config)
    fronts, front_table = front_summary(trials)
    figures = plots(out, trials, epochs, final, config, recipe, matched, throughput)
    exps = config.get("experiments", {})

    dataset = config.get("dataset", "mnist")
    title = "# Why four layers? A measured answer" + ("" if dataset == "mnist" else f" ({DATASET_NAMES[dataset]})")
    claims = config.get("experiments", {}).get("recipe", {}).get("claims", []) if dataset == "mnist" else []
    doc = [title, "", opening(recipe, matched, tuned, fronts, claims), ""]
    doc += [f"Every comparison below: Welch's test on retrained test accuracies (each seed one observation), "
            f"intervals at the Holm-corrected level of each comparison within its family (experiment, or budget), "
            f"\"beats\" only when the Holm-adjusted p-value is at most {ALPHA}; the detectable difference is the "
            f"smallest the design could have found with {POWER:.0%} power, from the observed spread and n.", ""]
    if recipe:
        r = exps.get("recipe", {})
        doc += ["## 1. The text's own recipe across depths", "",
                f"Plain SGD, lr {r.get('lr', 0.03)}, batch 64, every training image, inputs in [0, 1], the text's funnel "
                f"{'-'.join(map(str, r.get('funnel', [])))} cut to each depth, {r.get('epochs', 10)} epochs; test "
                "accuracy after every epoch of the same runs (nothing is tuned, so reading the test set per epoch "
                "selects nothing).", ""]
        if "recipe.png" in figures:
            doc += ["![recipe](recipe.png)", "", figures["recipe.png"], ""]
        claims = []
        for depth, ep, claim in (r.get("claims", []) if dataset == "mnist" else []):  # the text's claims are MNIST's
            g = recipe.get(ep, Family("", {}, [], Verdict(None, (), {}, "x"))).groups.get(depth)
            if g is not None and g.n:
                lo, hi = g.ci
                claims.append({"claim": f"depth {depth}, {ep} epochs", "claimed": pts(claim), "measured mean": pts(g.mean),
                               "95% CI": f"{pts(lo)}-{pts(hi)}", "n": g.n,
                               "reached": "yes" if g.mean >= claim else ("within CI" if hi >= claim else "no")})
        if claims:
            doc += ["The text's claims against the same runs:", "", md_table(pd.DataFrame(claims)), ""]
        for ep, f in sorted(recipe.items(), reverse=True):
            doc += section(f)
    if matched:
        m = exps.get("matched", {})
        doc += ["## 2. Depth at a matched parameter budget", "",
                "Hidden widths halve layer to layer (the text's 256-128-64 shape), floored at "
                f"{m.get('min_width', 8)} units, scaled so every model is within {100 * m.get('tolerance', 0.02):.0f}% "
                f"of its budget; SGD with momentum {config.get('momentum')}, {m.get('epochs')} epochs; the learning rate is tuned per cell on "
                f"the validation hold-out over the same {m.get('lr_points')}-point log grid "
                f"{m.get('lr')}, then the best is retrained with {m.get('seeds')} seeds.", ""]
        if "matched.png" in figures:
            doc += ["![matched](matched.png)", "", figures["matched.png"], ""]
        soft = groups_of(final[(final["experiment"] == "matched") & (final["depth"] == 1)]).get(1)
        if soft is not None and soft.n:
            doc += [f"Reference: softmax regression (7,850 parameters), learning rate tuned the same way: "
                    f"{pts(soft.mean)}% (n={soft.n}, 95% CI {pts(soft.ci[0])}-{pts(soft.ci[1])}).", ""]
        for budget, f in matched.items():
            doc += section(f)
    if tuned is not None:
        s = exps.get("tuned", {}).get("space", {})
        doc += ["## 3. Each depth at its best", "",
                f"One search per depth over learning rate {s.get('lr')}, first width {s.get('width')}, taper "
                f"{s.get('taper')} and epochs 1-{s.get('max_epochs')} ({exps.get('tuned', {}).get('n_trials')} trials, "
                "seeded TPE, median pruner, validation hold-out); the best of each depth retrained with "
                f"{exps.get('tuned', {}).get('seeds')} seeds.", ""]
        if "tuned.png" in figures:
            doc += ["![tuned](tuned.png)", "", figures["tuned.png"], ""]
        if not front_table.empty:
            doc += ["Fewest training FLOPs of any trial of each depth to reach a validation accuracy:", "",
                    md_table(front_table), ""]
        doc += section(tuned)
    if other is not None:
        doc += cross_dataset(out, (trials, epochs, final, config), other)
    doc += ["## Sanity checks", ""]
    warnings, caps = edge_warnings(trials, config)
    doc += [f"- WARNING: {w}" for w in warnings] or ["- No best value sits on the edge of its search range."]
    doc += [f"- Declared cap: {c}" for c in caps]
    doc += ["", "Tuning trials per cell by state (diverged: NaN/inf loss; pruned: stopped by the median pruner; "
            "failed: interrupted or killed, redone):", "", md_table(state_counts(trials)), ""]
    superseded = config.get("superseded_final_runs", 0)
    doc += [f"Final runs of superseded configurations left out of the tables: {superseded}.", ""]
    for name in ("curves.png", "throughput.png"):
        if name in figures:
            doc += [f"![{name}]({name})", "", figures[name], ""]
    doc += ["## Caveats: what was held fixed", ""]
    fixed = {k: config.get(k) for k in ("batch_size", "optimizer", "momentum", "weight_decay", "val_size",
                                         "train_subset", "split_seed", "tuning_seed", "sampler_seed")}
    doc += [f"- {k}: {v}" + (" (matched and tuned; the recipe uses plain SGD)" if k == "momentum" else "")
            for k, v in fixed.items() if k in config]
    doc += ["- activation: ReLU; loss: cross-entropy; init: PyTorch default; constant learning rate; "
            "inputs scaled to [0, 1], no augmentation",
            "- tuning used the validation hold-out only; the test set was read only by retrained runs (and, in the "
            "recipe, where nothing is tuned, after every epoch)",
            "- cost is exact training FLOPs (forward and backward of the Linear layers, per sample, times samples "
            "seen); seconds depend on the machine and its load and are shown only beside them", ""]
    env_cols = [c for c in ("device", "device_name", "cpu", "gpu", "threads", "torch_version", "python_version")
                if c in final]
    env = final[env_cols].astype(object)
    commands = sorted(set(final["command"].dropna())) if "command" in final else []
    doc += ["## Environment", "", md_table(env.where(env.notna(), "").drop_duplicates()), "",
            "Generated by `python -m study.report` from the tables in this folder; study command: "
            + ", ".join(f"`{c}`" for c in commands) + ".", ""]
    path = out / "report.md"
    partial = out / ".report.md.partial"
    partial.write_text("\n".join(doc))
    partial.replace(path)  # a reader never sees half a report
    return path


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("python -m study.report", __doc__)
    p.add_argument("--results", type=Path, default=None, help="folder with trials/epochs/final.csv (default: results/)")
    p.add_argument("--storage", default=None, help="Optuna storage URL to read the study from instead of CSVs")
    p.add_argument("--name", default=None, help="study name prefix in the storage (default: the only one)")
    p.add_argument("--out", type=Path, default=None, help="where to write report.md and plots (default: --results)")
    p.add_argument("--compare", type=Path, default=None,
                   help="results folder of the same study on another dataset: adds the cross-dataset section")
    args = p.parse_args(argv)
    try:
        if args.compare is not None and not args.compare.is_dir():
            raise UsageError(f"--compare {args.compare} is not a folder")
        if args.storage:
            path = from_storage(args.storage, args.name, args.out or args.results or cli.RESULTS_DIR, args.compare)
        else:
            results = args.results or cli.RESULTS_DIR
            if not results.is_dir():
                raise UsageError(f"--results {results} is not a folder")
            cli.prepare_out(args.out or results)
            path = render(results, args.out, args.compare)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: report.md was not rewritten (tables written so far are kept)") from None
    print(f"wrote {path}")
    return 0


def from_storage(url: str, name: str | None, out: Path, compare_with: Path | None = None) -> Path:
    """Write the tables of study `name` (the only one when None) from the storage into `out`, then render."""
    from study import coord, tables

    cli.prepare_out(out)
    storage = coord.open_storage(url, must_exist=True)

    def write() -> None:
        names = tables.study_names(storage)
        if name is None and len(names) != 1:
            raise UsageError(f"storage holds studies {sorted(names) or 'none'}; pick one with --name")
        chosen = name or next(iter(names))
        if chosen not in names:
            raise UsageError(f"no study named {chosen!r} in the storage (found {sorted(names)})")
        tables.write_tables(storage, chosen, names[chosen], out)

    coord.guarded(write, url)
    return render(out, compare_with=compare_with)


if __name__ == "__main__":
    cli.run(main)
