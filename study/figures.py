"""The report's figures, drawn from the analysis and the saved tables only (never by hand).

One palette (seaborn's colorblind) for every figure: a depth has the same colour everywhere, outcomes
have fixed colours, every accuracy figure shows each seed as a dot, and failed runs (at or below
twice chance, or diverged) are drawn as their own marker at the panel's floor and counted in the
legend, so one dead run can neither hide nor stretch the axis.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from mnist_bench.files import write_file

from .analysis import Analysis, Contrast, Interaction, Setting, pareto

PALETTE = "colorblind"
OUTCOME_COLOURS = {
    "better": 2,
    "worse": 3,
    "equivalent": 0,
    "inconclusive": 7,
    "not computed": 7,
    "differs": 3,
    "carries over": 0,
}
DATASET_MARKERS = ("o", "s")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", palette=PALETTE)
    return plt, sns.color_palette(PALETTE, 10)


def depth_colour(colours, depth: int):
    return colours[(depth - 1) % len(colours)]


def _write(fig, path: Path) -> None:
    """The figure as a PNG at `path`, whole or not at all (files.write_file: a full disk keeps the old one)."""
    write_file(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    try:
        _write(fig, path)
    finally:
        plt.close(fig)


def _integer_depths(ax, depths) -> None:
    ax.set_xticks(sorted(depths))
    ax.set_xlabel("depth (Linear layers)")


def strip(ax, setting: Setting, colours, offset: float = 0.0, colour=None, label: str | None = None) -> int:
    """Each trained seed a dot, the mean with its 95% interval, failed runs as a triangle at the
    floor. Returns the number of failed runs drawn."""
    rng = np.random.default_rng(0)  # the same jitter for the same tables
    failed = 0
    floor = ax.get_ylim()[0]
    for d, g in setting.groups.items():
        c = colour or depth_colour(colours, d)
        if g.n:
            acc = 100 * g.accuracies
            ax.scatter(d + offset + rng.uniform(-0.07, 0.07, len(acc)), acc, s=12, color=c, alpha=0.45, lw=0)
            lo, hi = g.ci
            if g.n > 1:
                ax.errorbar(
                    [d + offset],
                    [100 * g.mean],
                    yerr=[[100 * (g.mean - lo)], [100 * (hi - g.mean)]],
                    fmt="_",
                    color=c,
                    capsize=5,
                    ms=14,
                    mew=2,
                    lw=1.5,
                )
        if g.failed:
            failed += len(g.failed)
            ax.scatter(
                np.full(len(g.failed), d + offset),
                np.full(len(g.failed), floor),
                marker="v",
                s=60,
                color=c,
                edgecolor="k",
                zorder=5,
                clip_on=False,
            )
            ax.annotate(
                f"{len(g.failed)} failed", (d + offset, floor), xytext=(4, 6), textcoords="offset points", fontsize=7
            )
    if label is not None:
        ax.scatter([], [], s=12, color=colour or "0.4", label=label)
    return failed


def accuracy_limits(settings: list[Setting]) -> tuple[float, float]:
    """y-limits (%) around every trained run, within [0, 100]."""
    values = [100 * a for s in settings for g in s.groups.values() for a in g.accuracies]
    if not values:
        return (0.0, 100.0)
    lo, hi = min(values), max(values)
    pad = max(0.1 * (hi - lo), 0.1)
    return (max(lo - pad, 0.0), min(hi + pad, 100.0))


def failed_legend(ax, failed: int) -> None:
    if failed:
        ax.scatter(
            [],
            [],
            marker="v",
            s=60,
            color="0.6",
            edgecolor="k",
            label=f"failed run (<= 20% or diverged), drawn at the floor: {failed}",
        )


def recipe_figure(path: Path, settings: list[Setting], claims: list) -> str:
    plt, colours = _plt()
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.2), squeeze=False)
    for ax, s in zip(axes[0], settings):
        epoch = s.key.split(", ")[1].split()[0]
        lo, hi = accuracy_limits([s])
        shown = [100 * claim for _, ep, claim in claims if str(ep) == epoch]
        ax.set_ylim(min([lo, *shown]), min(max([hi, *(c + 0.3 for c in shown)]), 100.0))
        failed = strip(ax, s, colours, label="one seed (dot); mean and 95% interval (bar)")
        for depth, ep, claim in claims:
            if str(ep) == epoch:
                ax.scatter(
                    [depth],
                    [100 * claim],
                    marker="*",
                    s=220,
                    color="gold",
                    edgecolor="k",
                    zorder=6,
                    label=f"text's claim, depth {depth} ({100 * claim:.2f}%)",
                    clip_on=False,
                )
        failed_legend(ax, failed)
        _integer_depths(ax, s.groups)
        ax.set(ylabel="test accuracy (%)", title=f"The text's recipe, after {epoch} epochs")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # off the dots
    _save(plt, fig, path)
    return (
        "The text's recipe (plain SGD, lr 0.03, batch 64, every training image) across depths, after "
        + " and ".join(s.key.split(", ")[1] for s in settings)
        + " of the same runs: every seed a dot, the mean "
        "of trained runs with its 95% interval" + ("; stars are the text's claims." if claims else ".")
    )


def matched_figure(path: Path, settings: list[Setting], softmax: float | None) -> str:
    plt, colours = _plt()
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 4.0), squeeze=False)
    for ax, s in zip(axes[0], settings):
        lo, hi = accuracy_limits([s])
        ax.set_ylim(lo, hi)
        failed = strip(ax, s, colours, label="one seed")
        failed_legend(ax, failed)
        if softmax is not None and lo <= 100 * softmax <= hi:
            ax.axhline(100 * softmax, ls="--", color="0.4", label=f"softmax regression ({100 * softmax:.2f}%)")
        _integer_depths(ax, s.groups)
        ax.set(ylabel="test accuracy (%)" if ax is axes[0][0] else None, title=s.key.split(", ", 1)[1])
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # off the dots
    _save(plt, fig, path)
    below = "" if softmax is None else f" Softmax regression ({100 * softmax:.2f}%) is drawn where it lies on the axis."
    return (
        "Test accuracy against depth at each parameter budget and shape (the halving funnel scaled to the budget, "
        "or constant width where the panel says so; learning rate chosen per cell): every seed a dot, the mean "
        "of trained runs with its 95% interval, failed runs "
        "as triangles at the floor." + below
    )


def tuned_figure(path: Path, setting: Setting, trials: pd.DataFrame) -> str:
    plt, colours = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.set_ylim(*accuracy_limits([setting]))
    failed = strip(left, setting, colours, label="one seed")
    failed_legend(left, failed)
    _integer_depths(left, setting.groups)
    left.set(ylabel="test accuracy (%)", title="Each depth tuned: retrained seeds")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # off the dots
    done = trials[(trials["experiment"] == "tuned") & (trials["state"] == "complete")]
    done = (
        done.dropna(subset=["train_flops"]) if "train_flops" in done else done.iloc[:0]
    )  # none yet: a study in progress
    for d, g in done.groupby("depth"):
        c = depth_colour(colours, int(d))
        right.scatter(g["train_flops"], 100 * g["val_accuracy"], s=14, alpha=0.4, color=c)
        front = pareto(g, "train_flops", "val_accuracy")
        right.step(
            front["train_flops"], 100 * front["val_accuracy"], where="post", color=c, label=f"depth {d}: Pareto front"
        )
    if not done.empty:
        right.set(
            ylim=(
                max(100 * done["val_accuracy"].quantile(0.2) - 1, 0),
                min(100 * done["val_accuracy"].max() + 0.3, 100),
            )
        )
    right.set(
        xscale="log",
        xlabel="training FLOPs of the trial",
        ylabel="validation accuracy (%)",
        title="Every completed tuning trial",
    )
    right.legend(fontsize=8, loc="lower right")
    _save(plt, fig, path)
    return (
        "Left: the retrained configuration of each tuned depth, every seed a dot, the mean with its 95% "
        "interval. Right: every completed tuning trial's validation accuracy against its exact training FLOPs, "
        "with each depth's Pareto front."
    )


def curves_figure(path: Path, trials: pd.DataFrame, epochs: pd.DataFrame) -> str | None:
    best = trials[trials["retrained"].astype(bool) & (trials["experiment"] == "tuned")]
    curves = epochs[(epochs["run"] == "tuning") & (epochs["experiment"] == "tuned")].merge(
        best[["depth", "trial"]], on=["depth", "trial"]
    )
    if curves.empty:
        return None
    plt, colours = _plt()
    import seaborn as sns

    palette = {int(d): depth_colour(colours, int(d)) for d in curves["depth"].unique()}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(data=curves, x="epoch", y="val_accuracy", hue="depth", marker="o", ax=axes[0], palette=palette)
    axes[0].set(ylabel="validation accuracy", title="Tuned: retrained trial per depth")
    long = curves.melt(
        id_vars=["depth", "epoch"], value_vars=["train_loss", "val_loss"], var_name="split", value_name="loss"
    )
    sns.lineplot(data=long, x="epoch", y="loss", hue="depth", style="split", marker="o", ax=axes[1], palette=palette)
    axes[1].set(yscale="log", title="Train vs validation loss (gap = overfitting)")
    for ax in axes:
        ax.set_xticks(sorted(curves["epoch"].unique()))
    _save(plt, fig, path)
    return "Learning curves of the retrained tuning trial of each depth (tuned experiment)."


def forest_row(
    ax, y: float, c: Contrast | Interaction, colour, text: str, marker: str = "o", limit: float | None = None
) -> None:
    """One row of a forest plot: the Holm-level interval (thin), the TOST interval (thick), the mean
    difference (marker) and the outcome in words, in points. With `limit` (points), whatever lies beyond
    ±limit is cut at the edge and marked there by an arrow with its value, so one far contrast cannot
    squeeze the axis the others are read on."""
    lo, hi = (-limit, limit) if limit is not None else (-math.inf, math.inf)

    def cut(a: float, b: float) -> tuple[float, float]:
        return max(100 * a, lo), min(100 * b, hi)

    ax.plot(cut(*c.ci), [y, y], color=colour, lw=1.2)
    ax.plot(cut(*c.ci_equivalence), [y, y], color=colour, lw=4, alpha=0.6)
    diff = 100 * c.diff
    if lo <= diff <= hi:
        ax.scatter([diff], [y], marker=marker, color=colour, edgecolor="k", zorder=5, s=40)
    for edge, beyond, arrow, align in (
        (lo, 100 * min(c.ci[0], c.diff), "<", "left"),
        (hi, 100 * c.ci[1], ">", "right"),
    ):
        if (beyond < edge) if arrow == "<" else (beyond > edge):
            ax.scatter([edge], [y], marker=arrow, color=colour, edgecolor="k", zorder=6, s=45, clip_on=False)
            words = f"{diff:+.2f}" if not lo <= diff <= hi else f"to {beyond:+.2f}"
            ax.annotate(words, (edge, y), xytext=(6 if arrow == "<" else -6, 7), textcoords="offset points",
                        fontsize=6.5, ha=align, va="center", color="0.25")  # fmt: skip
    right = min(100 * max(c.ci[1], c.ci_equivalence[1]), hi)
    ax.annotate(text, (right, y), xytext=(5, 0), textcoords="offset points", fontsize=7, va="center")


def forest_limit(contrasts: list[Contrast], margin: float, widest: float = 1.0) -> float:
    """Half-width (points) of the answer's axis: wide enough for every contrast that lies within ±`widest`
    points and at least twice the margin, at most `widest` (about 2 points in all); the rest get arrows."""
    ends = [
        abs(100 * v)
        for c in contrasts
        if c.outcome != "not computed"
        for v in (*c.ci, *c.ci_equivalence, c.diff)
        if math.isfinite(v)
    ]
    inside = [e for e in ends if e <= widest]
    return min(widest, max(2 * 100 * margin, *inside, 0.0)) * 1.08


def _forest_rows(analyses: list[Analysis]) -> list[tuple[str, int, int]]:
    rows = []
    for an in analyses:
        for c in an.primary:
            if (c.setting, c.a, c.b) not in rows:
                rows.append((c.setting, c.a, c.b))
    return rows


def answer_figure(path: Path, analyses: list[Analysis]) -> str:
    """A forest plot of every primary contrast (setting x dataset) with the +-margin band."""
    plt, colours = _plt()
    rows = _forest_rows(analyses)
    margin = 100 * analyses[0].margin
    limit = forest_limit([c for an in analyses for c in an.primary], analyses[0].margin)
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(rows) * len(analyses) + 1.6))
    ax.axvspan(-margin, margin, color=colours[0], alpha=0.12, lw=0, label=f"±{margin:.2f} points (margin)")
    ax.axvline(0, color="0.3", lw=0.8)
    step = 0.8 / len(analyses)
    for k, an in enumerate(analyses):
        by = {(c.setting, c.a, c.b): c for c in an.primary}
        for i, key in enumerate(rows):
            c: Contrast | None = by.get(key)
            y = i + (k - (len(analyses) - 1) / 2) * step
            if c is None or c.outcome == "not computed":
                ax.text(0, y, "not computed", fontsize=7, va="center", ha="center", color="0.4")
                continue
            colour = colours[OUTCOME_COLOURS[c.outcome]]
            forest_row(ax, y, c, colour, f"{c.outcome} (n={c.n})", DATASET_MARKERS[k % 2], limit)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{s}: depth {a} minus {b}" for s, a, b in rows], fontsize=8)
    ax.yaxis.grid(False)
    for i in range(len(rows) - 1):  # a band per contrast: both datasets' rows between two lines
        ax.axhline(i + 0.5, color="0.85", lw=0.8)
    for edge in (-limit, limit):  # differences are drawn within these; right of them, the outcome words
        ax.axvline(edge, color="0.5", lw=0.8, ls=":")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    for k, an in enumerate(analyses):
        ax.scatter([], [], marker=DATASET_MARKERS[k % 2], color="0.6", edgecolor="k", label=an.name)
    for outcome in ("better", "worse", "equivalent", "inconclusive"):
        ax.plot([], [], color=colours[OUTCOME_COLOURS[outcome]], lw=3, label=outcome)
    ax.set(
        xlabel="depth 4 minus its neighbour, test accuracy (points)",
        title="Why four layers? Depth 4 against 3 and 5, paired by seed",
    )
    ax.set_xlim(-limit * 1.02, limit + 0.75 * limit)  # room for the outcome words
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06 - 1.2 / fig.get_figheight() / 4), ncol=4)
    _save(plt, fig, path)
    return (
        "Every primary contrast"
        + (
            f" ({', '.join(f'{a.name} {shape}' for a, shape in zip(analyses, ('circles', 'squares')))})"
            if len(analyses) > 1
            else ""
        )
        + ": mean per-seed difference (marker), its interval at the Holm-consistent level "
        "(thin line: excludes 0 exactly when the outcome is better or worse) and the two-one-sided-tests "
        f"interval (thick line: inside the ±{margin:.2f}-point band exactly when the outcome is equivalent). "
        f"Differences are drawn between the dotted lines at ±{limit:.2f} points (right of them: the outcome); an "
        "interval reaching beyond a dotted line ends there in an arrow labelled with where it ends (or, if the mean "
        "difference lies beyond too, with the mean)."
    )


def cross_dataset_figure(path: Path, inter: list[Interaction], names: list[str], margin: float) -> str:
    plt, colours = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(inter) + 1.6))
    m = 100 * margin
    ax.axvspan(-m, m, color=colours[0], alpha=0.12, lw=0, label=f"±{m:.2f} points (margin)")
    ax.axvline(0, color="0.3", lw=0.8)
    for i, x in enumerate(inter):
        if x.outcome == "not computed":
            ax.text(0, i, "not computed", fontsize=7, va="center", ha="center", color="0.4")
            continue
        forest_row(ax, i, x, colours[OUTCOME_COLOURS[x.outcome]], x.outcome)
    ax.set_yticks(range(len(inter)))
    ax.set_yticklabels([f"{x.setting}: depth {x.a} minus {x.b}" for x in inter], fontsize=8)
    ax.invert_yaxis()
    for outcome in ("differs", "carries over", "inconclusive"):
        ax.plot([], [], color=colours[OUTCOME_COLOURS[outcome]], lw=3, label=outcome)
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.25 * (hi - lo))
    ax.set(
        xlabel=f"({names[0]} minus {names[1]}) of the depth contrast (points)",
        title="Does the depth effect carry over? The interaction, per primary contrast",
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the rows, never on one
    _save(plt, fig, path)
    return (
        f"The depth contrast on {names[0]} minus the same contrast on {names[1]} (paired by seed): thin line the "
        "Holm-consistent interval (excludes 0 exactly when it differs), thick line "
        "the two-one-sided-tests interval (inside the band exactly when it carries over)."
    )


def throughput_figure(path: Path, throughput: pd.DataFrame) -> str:
    plt, _ = _plt()
    import seaborn as sns

    throughput = throughput[throughput["pipeline"] != "pack"]
    t = throughput.assign(
        setting=throughput["pipeline"] + ", " + throughput["device"] + ", " + throughput["threads"].astype(str) + " thr"
    )
    g = sns.relplot(
        data=t,
        x="batch_size",
        y="samples_per_s",
        hue="setting",
        col="model",
        kind="line",
        marker="o",
        height=3.4,
        aspect=1.0,
        col_wrap=4,
    )
    for ax in g.axes.flat:
        ax.set(xscale="log", yscale="log")
    g.set_axis_labels("batch size", "samples / s")
    g.figure.suptitle("Training-step throughput", y=1.02)
    try:
        _write(g.figure, path)
    finally:
        plt.close(g.figure)
    return "Training-step samples/s per model and batch size: harness vs source pipeline, per device and thread count."


def packs_figure(path: Path, throughput: pd.DataFrame) -> str | None:
    """Packs of K networks against K separate runs: the speedup in model-samples per second, per batch order
    (one shared, or one per network), device and thread count, with the fraction of the matmul peak."""
    packs = throughput[throughput["pipeline"] == "pack"] if "speedup" in throughput else throughput.iloc[:0]
    if packs.empty:
        return None
    plt, colours = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, ((order, device, threads), g) in enumerate(packs.groupby(["batch_order", "device", "threads"])):
        g = g.sort_values("pack")
        label = f"{order}, {device}, {threads} thr"
        axes[0].plot(g["pack"], g["speedup"], marker="o", color=colours[i], label=label)
        axes[1].plot(g["pack"], 100 * g["fraction_of_peak"], marker="o", color=colours[i], label=label)
    axes[0].axhline(1, color="k", lw=0.8, ls="--")
    axes[0].set(xscale="log", xlabel="networks per pack (K)", ylabel="speedup over K separate runs")
    axes[1].set(xscale="log", xlabel="networks per pack (K)", ylabel="% of float32 matmul peak")
    axes[0].legend(fontsize=7)
    _save(plt, fig, path)
    return (
        "The text's network at batch 64 trained in packs of K: model-samples per second over those of K separate "
        "runs (timed alternately in one run; K = 1 is the trainer's single network), and the fraction of the "
        "matrix-product peak the pack reaches."
    )


def lr_figure(path: Path, trials: pd.DataFrame, panels: list[tuple[str, pd.DataFrame]]) -> str | None:
    """Per matched setting, validation accuracy against the learning rate: every run of the band a dot, each
    depth's mean per rate a line, the chosen rate a ring. (The caption still words it as the grid design did:
    the committed report prints it so.)"""
    panels = [(title, t) for title, t in panels if not t.empty]
    if not panels:
        return None
    plt, colours = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (title, t) in zip(axes[0], panels):
        done = t[t["state"].isin(["complete", "failed"])].dropna(subset=["val_accuracy"])
        good = done[done["state"] == "complete"]
        for d, g in done.groupby("depth"):
            c = depth_colour(colours, int(d))
            ax.scatter(g["param_lr"], 100 * g["val_accuracy"], s=12, alpha=0.5, color=c)
            mean = g.groupby("param_lr")["val_accuracy"].mean()
            ax.plot(mean.index, 100 * mean.to_numpy(), color=c, lw=1, label=f"depth {d}")
            chosen = g[g["retrained"].astype(bool)]
            ax.scatter(
                chosen["param_lr"], 100 * mean.loc[chosen["param_lr"]].to_numpy(), s=90, facecolors="none",
                edgecolors=c, linewidths=1.6,
            )  # fmt: skip
        if not good.empty:
            top = 100 * good["val_accuracy"].max()
            ax.set_ylim(max(top - 3, 100 * good["val_accuracy"].min() - 0.2), top + 0.3)
        ax.set(xscale="log", xlabel="peak learning rate", ylabel="validation accuracy (%)", title=title)
        rates = sorted(set(t["param_lr"].dropna()))
        ax.set_xticks(rates, [f"{x:.3g}" for x in rates], fontsize=7)  # the rates trained, not overlapping decades
        ax.minorticks_off()
        ax.legend(fontsize=7, loc="lower center")
    _save(plt, fig, path)
    return (
        "The learning-rate choice of every matched cell: validation accuracy of every run at every rate of the "
        "band (dots: one per seed), each depth's mean per rate (line), the rate each depth chooses from all its "
        "seeds ringed. Runs below the panel's floor are off the axis (see the state counts)."
    )


def claims_figure(path: Path, table: pd.DataFrame) -> str | None:
    """One panel per claim: the recipe and each single change, mean test accuracy with its 95% interval,
    every seed a dot, the claim a dashed line."""
    if table.empty:
        return None
    plt, colours = _plt()
    groups = list(table.groupby(["depth", "claimed_epoch", "claim"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, ((depth, ep, claim), g) in zip(axes[0], groups):
        y = np.arange(len(g))[::-1]
        for yi, row in zip(y, g.itertuples()):
            colour = (
                colours[2] if row.verdict == "reached" else colours[7] if row.verdict == "undecided" else colours[3]
            )
            ax.errorbar(
                100 * row.mean, yi, xerr=[[100 * (row.mean - row.lo)], [100 * (row.hi - row.mean)]], fmt="o",
                color=colour, capsize=3,
            )  # fmt: skip
        ax.axvline(100 * claim, ls="--", color="k", lw=1)
        if (bar := float(g["bar"].iloc[0])) != claim:  # a rounded claim is read from half a point below
            ax.axvline(100 * bar, ls=":", color="k", lw=1)
        ax.set_yticks(y, [f"{c} (epoch {e})" for c, e in zip(g["change"], g["epoch"])], fontsize=8)
        ax.set(xlabel="test accuracy (%)", title=f"claim: depth {depth}, {ep} epochs, {100 * claim:.2f}%")
    _save(plt, fig, path)
    return (
        "The text's claims (dashed; dotted: half a point below, where a whole-percent claim is read from) against "
        "its recipe and the recipe with one change at a time: mean test accuracy at the claimed epoch with its 95% "
        "interval; green: reached (interval above the dotted reading), red: not reached (below it), grey: undecided."
    )
