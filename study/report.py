"""The report: a measured answer to "why four layers?", rendered from saved tables only.

    python -m study.report --results results                # from trials/epochs/final.csv
    python -m study.report --storage URL --out DIR          # from an Optuna storage (any worker)

The verdict is computed: per pair of depths, the difference of mean retrained test accuracy with a
Welch 95% interval and p-value, beside each depth's cost. "No detectable difference" when the
interval covers zero; among the depths not detectably worse than the best, the cheapest is the answer.
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

TARGET_ACCURACY = 0.97  # AlgoPerf's MNIST target, for "time to target"
EDGE_FRACTION = 0.05  # a best value within 5% of its (log) range of an edge is "on the edge"
SOURCE_DEPTH = 4


# --- statistics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DepthStats:
    depth: int
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    widths: str
    n_params: int
    train_flops: int
    train_seconds: float  # mean per retraining run
    samples_per_s: float
    seconds_to_target: float | None  # mean training seconds to TARGET_ACCURACY validation accuracy


@dataclass(frozen=True)
class Comparison:
    a: int  # shallower
    b: int  # deeper
    diff: float  # mean(b) - mean(a), accuracy fraction
    ci_low: float
    ci_high: float
    p_value: float
    reason: str | None = None  # why no interval could be computed; then nothing is concluded

    @property
    def detectable(self) -> bool:
        return self.reason is None and (self.ci_low > 0 or self.ci_high < 0)


def t_interval(x: np.ndarray) -> tuple[float, float]:
    if len(x) < 2:
        return (math.nan, math.nan)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return (x.mean() - half, x.mean() + half)


def welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float]:
    """(mean(b) - mean(a), 95% CI low, high, two-sided p) by Welch's t-test."""
    diff = b.mean() - a.mean()
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        raise ValueError("Welch's test needs spread in at least one group")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * se
    p = 2 * stats.t.sf(abs(diff) / se, df)
    return diff, diff - half, diff + half, p


def seconds_to_target(curve_json: str, target: float) -> float | None:
    for row in json.loads(curve_json):
        if row["val_accuracy"] is not None and row["val_accuracy"] >= target:
            return row["train_seconds"]
    return None


def depth_stats(final: pd.DataFrame, target: float = TARGET_ACCURACY) -> list[DepthStats]:
    """Per depth, over its retrained seeds that did not diverge (`problems` says when some did)."""
    out = []
    for depth, g in final.groupby("depth"):
        acc = g["test_accuracy"].dropna().to_numpy(float)
        if len(acc) == 0:
            continue
        lo, hi = t_interval(acc)
        times = [seconds_to_target(c, target) for c in g["curve"]] if "curve" in g else []
        reached = [t for t in times if t is not None]
        out.append(DepthStats(
            depth=int(depth), n=len(acc), mean=acc.mean(), std=acc.std(ddof=1) if len(acc) > 1 else math.nan,
            ci_low=lo, ci_high=hi, widths=str(g["widths"].fillna("").iloc[0]), n_params=int(g["n_params"].iloc[0]),
            train_flops=int(g["train_flops"].iloc[0]), train_seconds=g["train_seconds"].mean(),
            samples_per_s=g["samples_per_s"].mean(),
            seconds_to_target=float(np.mean(reached)) if reached and len(reached) == len(times) else None,
        ))
    return out


def problems(final: pd.DataFrame, depths: list[int] | None = None) -> dict[int, str]:
    """Why a depth cannot enter a comparison: no retrained runs, fewer than two seeds, or a diverged
    seed (dropping it would bias the mean; keeping it makes the mean meaningless)."""
    out: dict[int, str] = {}
    for d in sorted(set(depths or []) | {int(d) for d in final["depth"].unique()}):
        g = final[final["depth"] == d]
        diverged = g["test_accuracy"].isna()
        if "diverged" in g:
            diverged |= g["diverged"].fillna(False).astype(bool)
        if len(g) == 0:
            out[d] = "no retrained runs yet"
        elif diverged.any():
            out[d] = f"{int(diverged.sum())} of {len(g)} retrained seeds diverged"
        elif len(g) < 2:
            out[d] = f"only {len(g)} retrained seed (an interval needs 2 or more)"
    return out


def compare(final: pd.DataFrame) -> list[Comparison]:
    """Every pair of depths that can be compared (see `problems`); a pair whose seeds all agree
    exactly has no spread to test against and gets a reason instead of an interval."""
    bad = problems(final)
    groups = {int(d): g["test_accuracy"].to_numpy(float) for d, g in final.groupby("depth") if int(d) not in bad}
    out = []
    for a, b in itertools.combinations(sorted(groups), 2):
        x, y = groups[a], groups[b]
        if np.ptp(x) == 0 and np.ptp(y) == 0:  # exact: var() of equal floats can be 1e-35, not 0
            out.append(Comparison(a, b, y.mean() - x.mean(), math.nan, math.nan, math.nan,
                                  reason="every seed of both depths scored the same: no spread to test against"))
            continue
        out.append(Comparison(a, b, *welch(x, y)))
    return out


def pts(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def describe(c: Comparison, by_depth: dict[int, DepthStats]) -> str:
    """One plain sentence per pair of depths."""
    a, b = by_depth[c.a], by_depth[c.b]
    if c.reason is not None:
        return f"Depth {c.a} and depth {c.b} cannot be compared: {c.reason}."
    if not c.detectable:
        ci = f"95% CI [{pts(c.ci_low)}, {pts(c.ci_high)}] points, p = {c.p_value:.3g}"
        cheap, dear = (a, b) if a.train_seconds <= b.train_seconds else (b, a)
        return (f"No detectable difference between depth {c.a} and depth {c.b} "
                f"(depth {c.b} minus depth {c.a}: {pts(c.diff)} points, {ci}); depth {cheap.depth} is cheaper "
                f"({dear.train_seconds / cheap.train_seconds:.2f}x less training time, "
                f"{cheap.n_params:,} vs {dear.n_params:,} parameters).")
    win, lose = (b, a) if c.diff > 0 else (a, b)
    lo, hi = (c.ci_low, c.ci_high) if c.diff > 0 else (-c.ci_high, -c.ci_low)  # winner minus loser
    ci = f"95% CI [{pts(lo)}, {pts(hi)}] points, p = {c.p_value:.3g}"
    return (f"Depth {win.depth} is better than depth {lose.depth} by {pts(abs(c.diff))} points ({ci}) "
            f"at {win.train_seconds / lose.train_seconds:.2f}x the training time and "
            f"{win.n_params / lose.n_params:.2f}x the parameters.")


@dataclass(frozen=True)
class Verdict:
    best: int | None  # highest mean test accuracy; None when no verdict could be computed
    answer: int | None  # cheapest depth not detectably worse than the best
    tied: tuple[int, ...]
    text: str


def no_verdict(depths: list[DepthStats], comparisons: list[Comparison], bad: dict[int, str]) -> Verdict | None:
    """A Verdict that refuses to conclude, or None when every depth and pair could be compared."""
    reasons = [f"depth {d}: {why}" for d, why in sorted(bad.items())]
    reasons += [f"depths {c.a} and {c.b}: {c.reason}" for c in comparisons if c.reason]
    if reasons:
        return Verdict(None, None, (), "**No verdict yet.** These depths cannot be compared, so nothing is "
                       "concluded about any of them: " + "; ".join(reasons) + ".")
    if len(depths) < 2:
        only = f"depth {depths[0].depth}" if depths else "no depth"
        return Verdict(None, None, (), f"**No verdict.** Only {only} was studied: there is nothing to compare it "
                       "with; rerun with two or more --depths.")
    return None


def verdict(depths: list[DepthStats], comparisons: list[Comparison], bad: dict[int, str] | None = None) -> Verdict:
    """The answer from every pairwise comparison; refuses (see `no_verdict`) rather than guess."""
    refused = no_verdict(depths, comparisons, bad or {})
    if refused is not None:
        return refused
    by_depth = {s.depth: s for s in depths}
    best = max(depths, key=lambda s: s.mean).depth
    pair = {(c.a, c.b): c for c in comparisons}

    def tied_with_best(d: int) -> bool:
        return d == best or not pair[(min(d, best), max(d, best))].detectable

    tied = tuple(d for d in sorted(by_depth) if tied_with_best(d))
    answer = min(tied, key=lambda d: (by_depth[d].train_seconds, by_depth[d].n_params))
    s = by_depth[answer]
    lines = [f"**Answer: depth {answer}** ({s.widths or 'no hidden layer'}, {s.n_params:,} parameters): "
             f"test accuracy {pts(s.mean)}% +- {pts(s.std)} (n={s.n}, 95% CI {pts(s.ci_low)}-{pts(s.ci_high)})."]
    if len(tied) == 1:
        lines.append("It is detectably better than every other depth tested.")
    elif answer == best:
        others = ", ".join(str(d) for d in tied if d != answer)
        lines.append(f"It has the best mean and is the cheapest of the depths within noise of it ({others}).")
    else:
        lines.append(f"Depth {best} has the highest mean, but depth {answer} is not detectably worse and is "
                     f"cheaper; tied within noise: {', '.join(map(str, tied))}.")
    if best == max(by_depth) and len(tied) == 1:
        lines.append(f"The deepest depth tested is best: the range of depths should be extended beyond {best}.")
    if SOURCE_DEPTH in by_depth:
        if SOURCE_DEPTH == answer and len(tied) == 1:
            lines.append("So four layers is justified by the measurements: it is detectably more accurate than "
                         "every other depth tested.")
        elif SOURCE_DEPTH == answer:
            lines.append("Four layers is as accurate as any depth tested, within noise, and its tuned configuration "
                         "was the cheapest: the measurements support the choice, but not because a fourth layer "
                         "adds accuracy.")
        elif SOURCE_DEPTH in tied:
            lines.append(f"Four layers is as accurate as the best within noise, but depth {answer} gets there cheaper.")
        else:
            c = pair[(min(SOURCE_DEPTH, best), max(SOURCE_DEPTH, best))]
            lines.append(f"Four layers is detectably worse than depth {best} by {pts(abs(c.diff))} points: "
                         "the hunch does not hold here.")
    return Verdict(best, answer, tied, " ".join(lines))


# --- sanity checks -------------------------------------------------------------------------------


def edge_warnings(trials: pd.DataFrame, config: dict) -> list[str]:
    """Best value of a tuned parameter within EDGE_FRACTION of its range's edge (log scale where tuned so)."""
    space = config.get("space", {})
    ranges = {"lr": (space.get("lr"), True), "width": (space.get("width"), True),
              "taper": (space.get("taper"), False), "epochs": ([1, space.get("max_epochs")], False)}
    warnings = []
    for _, best in best_trials(trials).iterrows():
        depth = best["depth"]
        for name, (rng, log) in ranges.items():
            col = f"param_{name}"
            if rng is None or None in rng or col not in best or pd.isna(best[col]):
                continue
            lo, hi = (math.log(v) for v in rng) if log else rng
            v = math.log(best[col]) if log else best[col]
            if hi == lo:
                continue
            frac = (v - lo) / (hi - lo)
            if frac <= EDGE_FRACTION or frac >= 1 - EDGE_FRACTION:
                side = "lower" if frac <= EDGE_FRACTION else "upper"
                warnings.append(f"depth {depth}: best {name} = {best[col]:.4g} sits on the {side} edge of "
                                f"its range [{rng[0]}, {rng[1]}]; widen the range and rerun.")
    return warnings


def best_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The tuning trial of each depth that was retrained (marked by study.coord.best_trial's rule)."""
    if "retrained" not in trials:
        raise UserError("trials.csv has no 'retrained' column (written by an older mnist-bench); regenerate "
                        "the tables with python -m study.report --storage URL --out DIR")
    return trials[trials["retrained"].astype(bool)]


def state_counts(trials: pd.DataFrame) -> pd.DataFrame:
    counts = trials.pivot_table(index="depth", columns="state", values="trial", aggfunc="count", fill_value=0)
    for s in ("complete", "pruned", "diverged", "failed"):
        if s not in counts:
            counts[s] = 0
    return counts[["complete", "pruned", "diverged", "failed"]]


# --- plots ---------------------------------------------------------------------------------------


def plots(out: Path, trials: pd.DataFrame, epochs: pd.DataFrame, final: pd.DataFrame,
          depths: list[DepthStats], config: dict, reproduction: pd.DataFrame | None,
          throughput: pd.DataFrame | None) -> dict[str, str]:
    """Write the PNGs; returns {file name: caption}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    np.random.seed(0)  # seaborn's strip-plot jitter draws from numpy's global generator: same tables, same PNGs
    written: dict[str, str] = {}

    def save(fig, name: str, caption: str, title: str | None = None) -> None:
        if title:  # a seaborn figure-level grid: title above all panels
            fig.suptitle(title, y=1.02)
        else:
            fig.tight_layout()
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written[name] = caption

    # 1. Isolation plot: retrained test accuracy per depth.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    f = final.assign(acc=100 * final["test_accuracy"], depth=final["depth"].astype(str))
    order = [str(s.depth) for s in depths]
    sns.stripplot(data=f, x="depth", y="acc", order=order, ax=ax, color="0.35", size=6, jitter=0.1, alpha=0.8)
    for i, s in enumerate(depths):
        if s.n > 1:
            ax.errorbar(i, 100 * s.mean, yerr=[[100 * (s.mean - s.ci_low)], [100 * (s.ci_high - s.mean)]],
                        fmt="D", color="C3", capsize=8, markersize=8, zorder=5,
                        label="mean, 95% CI" if i == 0 else None)
    if reproduction is not None:
        ref = reproduction.groupby("experiment")["test_accuracy"].mean()
        claims = reproduction.groupby("experiment")["claimed_accuracy"].first()
        if "mlp4-10ep" in ref:
            ax.axhline(100 * claims["mlp4-10ep"], ls="--", color="C0",
                       label=f"source claim, depth 4, 10 epochs ({pts(claims['mlp4-10ep'])}%)")
            ax.axhline(100 * ref["mlp4-10ep"], ls=":", color="C0",
                       label=f"source recipe reproduced ({pts(ref['mlp4-10ep'])}%)")
    lo = min(100 * final["test_accuracy"].min(), 100 * (reproduction["test_accuracy"].max() if reproduction is not None else 100))
    ax.set_ylim(max(lo - 0.5, 80), min(100 * final["test_accuracy"].max() + 0.4, 100))
    if reproduction is not None and "softmax-2ep" in ref:
        softmax = 100 * ref["softmax-2ep"]
        below = " - below this axis" if softmax < ax.get_ylim()[0] else ""
        ax.axhline(softmax, ls=":", color="C2", label=f"softmax regression, source recipe ({softmax:.2f}%{below})")
    ax.set(xlabel="depth (Linear layers)", ylabel="test accuracy (%)",
           title="Retrained best configuration per depth (each point a seed)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    save(fig, "isolation.png", "Retrained test accuracy per depth: each seed a point, mean with 95% t-interval.")

    # 2. Learning curves of the best trial per depth.
    best = best_trials(trials)
    curves = epochs.merge(best[["depth", "trial"]], on=["depth", "trial"])
    if not curves.empty:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        sns.lineplot(data=curves, x="epoch", y="val_accuracy", hue="depth", marker="o", ax=axes[0], palette="tab10")
        axes[0].set(ylabel="validation accuracy", title="Best trial per depth: validation accuracy")
        long = curves.melt(id_vars=["depth", "epoch"], value_vars=["train_loss", "val_loss"],
                           var_name="split", value_name="loss")
        sns.lineplot(data=long, x="epoch", y="loss", hue="depth", style="split", marker="o", ax=axes[1], palette="tab10")
        axes[1].set(yscale="log", title="Train vs validation loss (gap = overfitting)")
        save(fig, "curves.png", "Learning curves of the best tuning trial per depth.")

    # 3. Accuracy against cost, Pareto front marked.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    done = trials[trials["state"] == "complete"]
    sns.scatterplot(data=done, x="n_params", y="val_accuracy", hue="depth", palette="tab10", ax=axes[0], alpha=0.7)
    front = pareto(done, "n_params", "val_accuracy")
    axes[0].step(front["n_params"], front["val_accuracy"], where="post", color="k", lw=1, label="Pareto front")
    axes[0].set(xscale="log", xlabel="parameters", ylabel="validation accuracy",
                title="Every completed trial", ylim=(max(done["val_accuracy"].quantile(0.1) - 0.01, 0.8), None))
    axes[0].legend(fontsize=8)
    summary = pd.DataFrame([s.__dict__ for s in depths])
    front_d = pareto(summary, "train_seconds", "mean")
    for s in depths:
        on = s.depth in set(front_d["depth"])
        axes[1].errorbar(s.train_seconds, 100 * s.mean, yerr=100 * (s.ci_high - s.mean) if s.n > 1 else None,
                         fmt="o" if on else "x", ms=9, capsize=5, label=f"depth {s.depth}" + (" (Pareto)" if on else ""))
    axes[1].set(xlabel="training seconds per run (mean)", ylabel="test accuracy (%)",
                title="Retrained: accuracy against training time")
    axes[1].legend(fontsize=8)
    save(fig, "cost.png", "Accuracy against cost: every trial by parameters (left), retrained depths by "
                          "training time (right); the Pareto front is marked.")

    # 4. Learning-rate axis per depth, with the search range's edges.
    tried = trials[trials["state"].isin(["complete", "pruned", "diverged"]) & trials["param_lr"].notna()]
    g = sns.relplot(data=tried, x="param_lr", y="val_accuracy", col="depth", hue="state", kind="scatter",
                    height=3.6, aspect=1.0, palette={"complete": "C0", "pruned": "C1", "diverged": "C3"})
    lr_range = config.get("space", {}).get("lr")
    for depth, ax in g.axes_dict.items():
        ax.set_xscale("log")
        if lr_range:
            for edge in lr_range:
                ax.axvline(edge, color="0.5", ls="--", lw=1)
        b = best[best["depth"] == depth]
        ax.scatter(b["param_lr"], b["val_accuracy"], s=160, facecolors="none", edgecolors="k", label="best")
    g.set_axis_labels("learning rate (log)", "validation accuracy")
    save(g.figure, "lr.png", "Every trial's validation accuracy against its learning rate, per depth; the best circled.",
         title="Learning-rate axis per depth (dashed: search range)")

    # 5. Throughput.
    if throughput is not None and not throughput.empty:
        t = throughput.assign(setting=throughput["pipeline"] + ", " + throughput["device"] + ", "
                              + throughput["threads"].astype(str) + " thr")
        g = sns.relplot(data=t, x="batch_size", y="samples_per_s", hue="setting", col="model", kind="line",
                        marker="o", height=3.4, aspect=1.0, col_wrap=4)
        for ax in g.axes.flat:
            ax.set(xscale="log", yscale="log")
        g.set_axis_labels("batch size", "samples / s")
        save(g.figure, "throughput.png", "Training-step samples/s per model and batch size: harness vs source "
             "pipeline, per device and thread count.", title="Training-step throughput")

    # 6. Reproduction of the source text.
    if reproduction is not None and not reproduction.empty:
        fig, ax = plt.subplots(figsize=(7, 4))
        r = reproduction.assign(acc=100 * reproduction["test_accuracy"])
        sns.stripplot(data=r, x="experiment", y="acc", ax=ax, color="0.3", size=6, label=None)
        claims = reproduction.groupby("experiment", sort=False)["claimed_accuracy"].first()
        ax.scatter(range(len(claims)), 100 * claims.to_numpy(), marker="_", s=900, color="C3", label="claimed", zorder=5)
        ax.set(xlabel="", ylabel="test accuracy (%)", title="Source text's claims (red) vs measured seeds (dots)")
        ax.legend(fontsize=8)
        save(fig, "reproduction.png", "The source text's recipes rerun over seeds, against its claims.")
    return written


def pareto(df: pd.DataFrame, cost: str, value: str) -> pd.DataFrame:
    """Rows not beaten by any cheaper-or-equal row (lower cost, higher value), sorted by cost."""
    rows, best = [], -math.inf
    for _, r in df.sort_values([cost, value], ascending=[True, False]).iterrows():
        if r[value] > best:
            rows.append(r)
            best = r[value]
    return pd.DataFrame(rows)


# --- the document --------------------------------------------------------------------------------


def cell(v) -> str:
    """A table cell: a missing number shows as n/a, never as nan."""
    return "n/a" if isinstance(v, float) and not math.isfinite(v) else str(v)


def md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


REQUIRED = {  # the columns the report reads
    "trials": ("depth", "trial", "state", "retrained", "val_accuracy", "n_params", "param_lr"),
    "epochs": ("depth", "trial", "epoch", "train_loss", "val_loss", "val_accuracy"),
    "final": ("depth", "seed", "test_accuracy", "widths", "n_params", "train_flops", "train_seconds",
              "samples_per_s"),
}
DTYPES = {"widths": "string", "command": "string"}  # "84" stays "84", not 84.0; empty (softmax) stays empty


def read_table(path: Path, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV written by study.tables, or one line saying what is wrong with it."""
    try:
        df = pd.read_csv(path, dtype={k: v for k, v in DTYPES.items()})
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty (0 bytes): regenerate it with python -m study.depth, or "
                        "python -m study.report --storage URL") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not a readable table ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path} has no column {missing[0]!r}: not a table written by study.depth (or written by "
                        "an older version; regenerate with python -m study.report --storage URL --out DIR)")
    return df


def read_optional(path: Path) -> pd.DataFrame | None:
    return read_table(path) if path.is_file() else None


def render(results: Path, out: Path | None = None) -> Path:
    """Render report.md and the plots from the tables in `results` into `out` (default: the same folder)."""
    out = out or results
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
    reproduction = read_optional(results / "reproduction.csv")
    throughput = read_optional(results / "throughput.csv")
    out.mkdir(parents=True, exist_ok=True)

    depths = depth_stats(final)
    comparisons = compare(final)
    by_depth = {s.depth: s for s in depths}
    bad = problems(final, config.get("depths"))
    v = verdict(depths, comparisons, bad)
    figures = plots(out, trials, epochs, final, depths, config, reproduction, throughput)

    doc = ["# Why four layers? A measured answer", "", v.text, ""]
    doc += ["## Every pair of depths", ""] + [f"- {describe(c, by_depth)}" for c in comparisons]
    doc += [f"- Depth {d} cannot be compared: {why}." for d, why in sorted(bad.items())]
    if not comparisons and not bad:
        doc.append("- Only one depth: nothing to compare.")
    doc += ["", "Welch's t-test on the retrained test accuracies (each seed one observation); intervals are "
            "95% intervals of the difference in the direction stated, p-values are not corrected for the "
            f"{len(comparisons)} comparisons.", ""]
    doc += ["![isolation](isolation.png)", "", "## Per depth", ""]
    best = best_trials(trials).set_index("depth")
    rows = []
    for s in depths:
        b = best.loc[s.depth] if s.depth in best.index else None
        rows.append({
            "depth": s.depth, "widths": s.widths or "-", "lr": f"{b['param_lr']:.3g}" if b is not None else "",
            "epochs": int(b["param_epochs"]) if b is not None else "", "val acc (tuning)": pts(b["val_accuracy"]) if b is not None else "",
            "n": s.n, "test acc mean": pts(s.mean), "std": pts(s.std), "95% CI": f"{pts(s.ci_low)}-{pts(s.ci_high)}",
            "parameters": f"{s.n_params:,}", "MFLOP/sample (train)": f"{s.train_flops / 1e6:.2f}",
            "train s/run": f"{s.train_seconds:.1f}", "samples/s": f"{s.samples_per_s:,.0f}",
            f"s to {pts(TARGET_ACCURACY)}% val": f"{s.seconds_to_target:.1f}" if s.seconds_to_target else "not reached",
        })
    doc += [md_table(pd.DataFrame(rows)), ""]
    doc += ["Accuracies in %. Cost columns are per retraining run on the device and thread count in the "
            "environment below; `s to target` is training time until the validation accuracy first reaches "
            f"{pts(TARGET_ACCURACY)}% (AlgoPerf's MNIST target).", ""]
    for name, caption in figures.items():
        if name != "isolation.png":
            doc += [f"![{name}]({name})", "", caption, ""]
    doc += ["## Sanity checks", ""]
    warnings = edge_warnings(trials, config)
    doc += [f"- WARNING: {w}" for w in warnings] or ["- No best value sits on the edge of its search range."]
    doc += ["", "Trials per depth by state (diverged: NaN/inf loss; pruned: stopped by the median pruner):", "",
            md_table(state_counts(trials).reset_index()), ""]
    doc += ["## Caveats: what was held fixed", ""]
    fixed = {k: config.get(k) for k in ("batch_size", "optimizer", "momentum", "weight_decay", "val_size",
                                         "train_subset", "split_seed", "tuning_seed", "sampler_seed")}
    doc += [f"- {k}: {v}" for k, v in fixed.items() if k in config]
    doc += ["- activation: ReLU; loss: cross-entropy; init: PyTorch default; constant learning rate; "
            "inputs scaled to [0, 1], no augmentation",
            f"- search space: {json.dumps(config.get('space', {}))}; TPE sampler, median pruner",
            "- tuning used the validation hold-out only; the test set was used only for the retrained runs",
            "- costs compare the tuned configurations: widths and epochs were tuned for validation accuracy alone, "
            "so a depth's cost reflects the widths its search preferred, not an intrinsic price of depth", ""]
    if reproduction is not None:
        from mnist_bench.reproduce import summarise

        doc += ["## The source text's claims, reproduced", "", md_table(
            summarise(reproduction).reset_index().round(4)), ""]
    env_cols = [c for c in ("device", "device_name", "cpu", "gpu", "threads", "torch_version", "python_version")
                if c in final]
    env = final[env_cols].astype(object)
    doc += ["## Environment", "", md_table(env.where(env.notna(), "").drop_duplicates()), "",
            f"Generated by `python -m study.report` from the tables in this folder; study command: "
            f"`{final['command'].iloc[0] if 'command' in final else ''}`.", ""]
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
    args = p.parse_args(argv)
    try:
        if args.storage:
            path = from_storage(args.storage, args.name, args.out or args.results or cli.RESULTS_DIR)
        else:
            results = args.results or cli.RESULTS_DIR
            if not results.is_dir():
                raise UsageError(f"--results {results} is not a folder")
            cli.prepare_out(args.out or results)
            path = render(results, args.out)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: report.md was not rewritten (tables written so far are kept)") from None
    print(f"wrote {path}")
    return 0


def from_storage(url: str, name: str | None, out: Path) -> Path:
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
    return render(out)


if __name__ == "__main__":
    cli.run(main)
