"""The design's own checks: is the experiment sound enough to read its contrasts?

Computed from the tables and written as report sections: the text's claims against the recipe with one
change at a time, the learning-rate choices and their margins over the runner-up, the last epochs'
gains and the horizon check (twice the epochs), the runner-up-rate check, the seeds each setting has
against the seeds its contrasts need, the search caps that bind, and where the training time went.
study.report places these sections in the document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import figures, stats
from .analysis import (
    CHECK_WORDS,
    EDGE_FRACTION,
    Analysis,
    Contrast,
    Interaction,
    contrast_family,
    declared,
    difference_family,
    grid_cells,
    grid_order,
    groups_of,
    matched_key,
    of_shape,
    seed_differences,
)
from .config import CHECKS, LR_RULES, VARIANTS, grid_scores
from .markdown import interval, md_table, outcome_words, pts, signed
from .stats import ALPHA, POWER

WALL_BUDGET = 90  # minutes per dataset on 2 CPU cores for the full preset


@dataclass(frozen=True)
class Check:
    """A primary contrast at the text's budget beside the same contrast retrained with one change,
    judged by the per-seed change of the contrast (the check's per-seed difference minus the primary
    one, over the seeds both ran), never by comparing two significance results."""

    check: str  # a key of config.CHECKS
    base: Contrast  # the primary contrast
    changed: Contrast  # the same depths under the check (its own Holm family with the check's other contrast)
    change: Interaction  # check minus primary, per seed: one Holm family over every check contrast

    @property
    def verdict(self) -> str:
        if self.base.outcome in ("inconclusive", "not computed") or self.change.outcome == "not computed":
            return "uninformative (the primary contrast is undecided)"
        flipped = {self.base.outcome, self.changed.outcome} == {"better", "worse"}
        if self.change.outcome == "differs" or flipped:
            return "horizon-dependent" if self.check == "horizon" else "rate-sensitive"
        if self.change.outcome == "carries over":
            return "holds"
        return "unresolved"


def checks(an: Analysis, final: pd.DataFrame, budget: int, margin: float) -> list[Check]:
    """The horizon and runner-up-rate checks: depth 4 minus 3 and minus 5 at `budget` (funnel). Each
    check's two contrasts are one Holm family (shown); whether a primary contrast changes under a check
    is the paired difference-in-differences over the seeds both ran, one Holm family over all checks."""
    setting = an.setting(matched_key(budget))
    base = {(c.a, c.b): c for c in an.primary if c.setting == matched_key(budget)}
    if setting is None or not base:
        return []
    found, items = [], []
    for check in CHECKS:
        rows = final[(final["experiment"] == "matched") & (final["budget"] == budget)]
        rows = rows[rows["variant"].fillna("") == check] if "variant" in rows else rows.iloc[:0]
        if rows.empty:
            continue
        groups = groups_of(rows)
        keys = [(a, b) for a, b in base if a in groups and b in groups]
        pairs = [(matched_key(budget, check=check), groups[a], groups[b]) for a, b in keys]
        for (a, b), changed in zip(keys, contrast_family(pairs, margin)):
            moved = groups[a].trained - groups[b].trained
            items.append(((check, a, b), moved.dropna(), seed_differences(setting, a, b)))
            found.append((check, base[(a, b)], changed))
    changes = difference_family(items, margin)
    return [Check(check, b, c, ch) for (check, b, c), ch in zip(found, changes)]


def claim_tolerance(claim: float) -> float:
    """A claim stated as a whole percent ("about 96%", "98%") is a rounded number: read it as reached from
    half a point below. One stated to the hundredth (92.11%) is read exactly."""
    return 0.005 if abs(100 * claim - round(100 * claim)) < 1e-9 else 0.0


def claim_verdict(lo: float, hi: float, line: float, n: int) -> str:
    """Reached when the seeds' 95% interval lies at or above `line`, not reached when below, else undecided."""
    if n < 2:
        return "undecided"
    return "reached" if lo >= line else "not reached" if hi < line else "undecided"


def claims(epochs: pd.DataFrame, config: dict) -> pd.DataFrame:
    """The text's claims against the recipe and the recipe with one change at a time: test accuracy of
    every seed at the claimed epoch (twice it for "twice the epochs"), mean and 95% t interval (each
    uncorrected), the share of seeds at or above the claim, and whether the claim is reached (interval
    above it), not reached (interval below) or undecided; a whole-percent claim from half a point below."""
    r = config.get("experiments", {}).get("recipe", {})
    runs = epochs[(epochs["experiment"] == "recipe") & (epochs["run"] == "final")]
    if "variant" not in runs:
        runs = runs.assign(variant="")
    rows = []
    for depth, ep, claim in r.get("claims", []):
        for variant in ["", *r.get("variants", [])]:
            at = 2 * ep if variant == "twice" else ep
            acc = runs[(runs["variant"].fillna("") == variant) & (runs["depth"] == depth) & (runs["epoch"] == at)]
            acc = pd.to_numeric(acc["test_accuracy"], errors="coerce").dropna().to_numpy(float)
            if not len(acc):
                continue
            lo, hi = stats.t_interval(acc) if len(acc) > 1 else (math.nan, math.nan)
            bar = claim - claim_tolerance(claim)
            rows.append(
                {
                    "depth": int(depth),
                    "claimed_epoch": int(ep),
                    "claim": float(claim),
                    "change": VARIANTS.get(variant, "none (the recipe)"),
                    "variant": variant,
                    "epoch": at,
                    "n": len(acc),
                    "mean": float(acc.mean()),
                    "lo": lo,
                    "hi": hi,
                    "verdict": claim_verdict(lo, hi, bar, len(acc)),
                    "bar": bar,
                    "share_at": float((acc >= bar).mean()),
                    "verdict_exact": claim_verdict(lo, hi, claim, len(acc)),
                    "share_exact": float((acc >= claim).mean()),
                }
            )
    return pd.DataFrame(rows)


LATE_EPOCHS = 3


def late_gains(epochs: pd.DataFrame) -> pd.DataFrame:
    """Per matched cell as declared: the retrained runs' mean gain in validation accuracy over their last
    LATE_EPOCHS epochs (a cell still gaining as much as the margin there has not converged)."""
    runs = declared(epochs)
    runs = runs[(runs["experiment"] == "matched") & (runs["run"] == "final")]
    if runs.empty:
        return pd.DataFrame(columns=["budget", "shape", "depth", "gain", "n"])
    runs = runs.assign(shape=runs["shape"] if "shape" in runs else "funnel")
    rows = []
    for (budget, shape, depth), g in runs.groupby(["budget", "shape", "depth"], dropna=False):
        gains = []
        for _, seed in g.groupby("trial"):
            curve = seed.sort_values("epoch")["val_accuracy"].to_numpy(float)
            if len(curve) > LATE_EPOCHS:
                gains.append(curve[-1] - curve[-1 - LATE_EPOCHS])
        if gains:
            rows.append(
                {"budget": budget, "shape": shape, "depth": int(depth), "gain": float(np.mean(gains)), "n": len(gains)}
            )
    return pd.DataFrame(rows)


def horizon_gains(final: pd.DataFrame, budget: int) -> pd.DataFrame:
    """Per depth of the horizon check: test accuracy at twice the epochs minus at the declared epochs,
    per seed (same seed, same peak rate), mean and 95% t interval: did the runs converge?"""
    if "variant" not in final:
        return pd.DataFrame(columns=["depth", "n", "mean", "lo", "hi"])
    m = of_shape(final[(final["experiment"] == "matched") & (final["budget"] == budget)], "funnel")
    long, short = groups_of(m[m["variant"] == "horizon"]), groups_of(declared(m))
    rows = []
    for d, g in long.items():
        if d not in short or not g.n:
            continue
        diff = (g.trained - short[d].trained).dropna().to_numpy(float)
        lo, hi = stats.t_interval(diff) if len(diff) > 1 else (math.nan, math.nan)
        rows.append(
            {"depth": d, "n": len(diff), "mean": float(diff.mean()) if len(diff) else math.nan, "lo": lo, "hi": hi}
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class SeedPlan:
    """How many seeds the primary contrasts at the text's budget need, from their measured spread."""

    sd: float  # the largest spread of per-seed differences among those contrasts
    level: float  # the Holm family's strictest level (alpha / family size)
    needed: int
    used: int


def seed_plan(an: Analysis, budget: int) -> SeedPlan | None:
    """Seeds the primary contrasts at `budget` (both shapes) need, from their largest measured spread."""
    keys = (matched_key(budget), matched_key(budget, "constant"))
    at = [c for c in an.primary if c.setting in keys and math.isfinite(c.sd) and c.sd > 0]
    if not at:
        return None
    sd = max(c.sd for c in at)
    level = ALPHA / len(an.primary)
    return SeedPlan(sd, level, stats.seeds_to_resolve(sd, an.margin, level), min(c.n for c in at))


def achieved_power(an: Analysis) -> pd.DataFrame:
    """Per primary setting: its seeds, the largest spread of its contrasts' per-seed differences, and the
    power those seeds give at the family's strictest level to find a true difference of the margin and
    to show a true difference of 0 equivalent (if the spread is as measured)."""
    level = ALPHA / max(len(an.primary), 1)
    rows = []
    for s in an.settings:
        cs = [c for c in an.primary if c.setting == s.key and math.isfinite(c.sd) and c.sd > 0]
        if not cs:
            continue
        sd, n = max(c.sd for c in cs), min(c.n for c in cs)
        differ, equal = stats.resolving_power(sd, n, an.margin, level)
        rows.append({"setting": s.key, "n": n, "sd": sd, "differ": differ, "equivalent": equal})
    return pd.DataFrame(rows)


def column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series(math.nan, index=df.index)


def time_by_part(trials: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """Training seconds (summed over workers) by part of the study: where the time goes."""

    def name(experiment: str, variant: str, tuning: bool) -> str:
        if experiment == "recipe":
            return "recipe, one change at a time" if variant else "recipe"
        if variant:
            return f"matched, check: {CHECK_WORDS.get(variant, variant)}"
        if experiment == "matched":
            return "matched, learning-rate grid" if tuning else "matched, retraining"
        return "tuned, search" if tuning else "tuned, retraining"

    frames = []
    for df, tuning in ((trials, True), (final, False)):
        if df.empty:
            continue
        variant = df["variant"].fillna("") if "variant" in df else pd.Series("", index=df.index)
        epochs_col = "epochs_run" if tuning else "param_epochs"
        frames.append(
            pd.DataFrame(
                {
                    "part": [name(e, v, tuning) for e, v in zip(df["experiment"], variant)],
                    "runs": 1,
                    "epochs": pd.to_numeric(column(df, epochs_col), errors="coerce"),
                    "seconds": pd.to_numeric(column(df, "train_seconds"), errors="coerce"),
                },
                index=df.index,
            ).fillna(0)
        )
    if not frames:
        return pd.DataFrame(columns=["part", "runs", "epochs", "seconds", "share"])
    t = pd.concat(frames).groupby("part", sort=False).sum().reset_index()
    order = {p: i for i, p in enumerate(TIME_PARTS)}
    t = t.sort_values("part", key=lambda p: p.map(lambda x: order.get(x, len(order)))).reset_index(drop=True)
    return t.assign(share=t["seconds"] / t["seconds"].sum())


TIME_PARTS = (
    "recipe",
    "recipe, one change at a time",
    "matched, learning-rate grid",
    "matched, retraining",
    *(f"matched, check: {w}" for w in CHECK_WORDS.values()),
    "tuned, search",
    "tuned, retraining",
)


def run_spans(trials: pd.DataFrame, final: pd.DataFrame) -> list[tuple]:
    """(start, finish) of every run with both times recorded."""
    spans = []
    for df in (trials, final):
        if {"started", "finished"} <= set(df.columns):
            start = pd.to_datetime(df["started"], utc=True, errors="coerce")
            end = pd.to_datetime(df["finished"], utc=True, errors="coerce")
            spans += [(a, b) for a, b in zip(start, end) if pd.notna(a) and pd.notna(b) and b >= a]
    return spans


def most_at_once(trials: pd.DataFrame, final: pd.DataFrame) -> int:
    """The most runs that were training at the same moment: the workers the study ran with."""
    events = sorted((t, step) for a, b in run_spans(trials, final) for t, step in ((a, 1), (b, -1)))
    most = now = 0
    for _, step in events:  # a finish sorts before a start at the same instant (-1 < 1)
        now += step
        most = max(most, now)
    return most


def busy_minutes(trials: pd.DataFrame, final: pd.DataFrame) -> float:
    """Wall-clock minutes during which at least one run of the study was training (the union of every
    run's start-to-finish interval): the study's own wall time, gaps between commands left out."""
    spans = run_spans(trials, final)
    total, current = 0.0, None
    for a, b in sorted(spans):
        if current is None or a > current[1]:
            if current is not None:
                total += (current[1] - current[0]).total_seconds()
            current = [a, b]
        else:
            current[1] = max(current[1], b)
    if current is not None:
        total += (current[1] - current[0]).total_seconds()
    return total / 60 if spans else math.nan


def trial_counts(trials: pd.DataFrame) -> pd.DataFrame:
    """Per tuned depth: trials trained (completed, not failed), proposals (every trial that ran to its
    end), and failed ones (diverged or at or below twice chance)."""
    t = trials[trials["experiment"] == "tuned"]
    rows = []
    for depth, g in t.groupby("depth"):
        ran = g[g["state"].isin(["complete", "failed", "diverged", "pruned"])]
        rows.append(
            {
                "depth": int(depth),
                "trained": int((ran["state"] == "complete").sum()),
                "proposals": len(ran),
                "failed": int(ran["state"].isin(["failed", "diverged"]).sum()),
            }
        )
    return pd.DataFrame(rows, columns=["depth", "trained", "proposals", "failed"])


def grid_margins(trials: pd.DataFrame, rule: str = "mean") -> pd.DataFrame:
    """Per matched cell with a grid: the chosen and runner-up learning rates and the chosen point's lead
    in the score the study's rule ranks by (analysis.grid_order: the mean validation accuracy, or its
    smoothed value), with the lead per replicate (replicate r trains every grid point from the same seed,
    so the leads are paired): is the choice above the seed noise?"""
    rows = []
    for budget, shape, depth, g in grid_cells(trials):
        order = grid_order(g, rule)
        chosen = g[g["retrained"].astype(bool)]["grid_point"]
        if len(order) < 2 or chosen.empty or int(chosen.iloc[0]) not in order.index:
            continue
        best = int(chosen.iloc[0])
        runner = int(next(i for i in order.index if i != best))
        lr = g.groupby("grid_point")["param_lr"].first()
        per = g.pivot_table(index="replicate", columns="grid_point", values="val_accuracy")
        leads = []
        for _, row in per.iterrows():
            score = grid_scores(row.dropna().to_dict(), rule)
            if best in score and runner in score:
                leads.append(float(score[best] - score[runner]))
        rows.append(
            {
                "budget": budget,
                "shape": shape,
                "depth": depth,
                "chosen": float(lr[best]),
                "runner_up": float(lr[runner]),
                "lead": float(order[best] - order[runner]),
                "leads": leads,
            }
        )
    return pd.DataFrame(rows, columns=["budget", "shape", "depth", "chosen", "runner_up", "lead", "leads"])


def caps_binding(trials: pd.DataFrame, config: dict) -> dict[str, list[int]]:
    """Per declared cap of the tuned search, the depths whose retrained trial sits at it (within
    EDGE_FRACTION of its range)."""
    space = config.get("experiments", {}).get("tuned", {}).get("space", {})
    best = trials[(trials["experiment"] == "tuned") & trials["retrained"].astype(bool)]
    ranges = {"width": (space.get("width"), True), "epochs": ([1, space.get("max_epochs")], False)}
    out: dict[str, list[int]] = {}
    for name, (rng, log) in ranges.items():
        col = f"param_{name}"
        if not rng or None in rng or col not in best or rng[0] == rng[1]:
            continue
        lo, hi = (math.log(v) for v in rng) if log else rng
        at = []
        for _, row in best.iterrows():
            v = row[col]
            if pd.notna(v) and ((math.log(v) if log else v) - lo) / (hi - lo) >= 1 - EDGE_FRACTION:
                at.append(int(row["depth"]))
        out[name] = sorted(at)
    return out


def retrained_origin(trials: pd.DataFrame, config: dict) -> dict[int, tuple[int, bool]]:
    """Per tuned depth, (the retrained trial's number, whether it was one of the sampler's random
    start-up trials rather than a TPE proposal)."""
    startup = int(config.get("sampler_startup_trials", 0))
    best = trials[(trials["experiment"] == "tuned") & trials["retrained"].astype(bool)]
    return {int(r.depth): (int(r.trial), int(r.trial) < startup) for r in best.itertuples()}


# --- the sections ------------------------------------------------------------------------------


def claims_section(epochs: pd.DataFrame, config: dict, out: Path) -> list[str]:
    """The text's claims against its recipe and the recipe with one change at a time."""
    table = claims(epochs, config)
    if table.empty:
        return []
    rows = [
        {
            "claim": f"depth {r.depth}, {r.claimed_epoch} epochs: {pts(r.claim)}%",
            "read from": f"{pts(r.bar)}%",
            "change": r.change,
            "epoch read": r.epoch,
            "n": r.n,
            "test acc mean": pts(r.mean),
            "95% CI": interval(r.lo, r.hi, signed_values=False),
            "seeds at or above, read from": f"{r.share_at:.0%}",
            "verdict": r.verdict,
            "seeds at or above the claim as printed": f"{r.share_exact:.0%}",
            "verdict, read as printed": r.verdict_exact,
        }
        for r in table.itertuples()
    ]
    shown = pd.DataFrame(rows)
    lines = []
    for (depth, ep, claim), g in table.groupby(["depth", "claimed_epoch", "claim"], sort=False):
        base = g[g["variant"] == ""]
        changed = g[g["variant"] != ""]
        reach = changed[changed["verdict"] == "reached"]["change"].tolist()
        exact = changed[changed["verdict_exact"] == "reached"]["change"].tolist()
        recipe = base["verdict"].iloc[0] if len(base) else "not run"
        rounded = bool((g["bar"] != g["claim"]).any())
        lines.append(
            f"- Depth {depth} after {ep} epochs ({pts(claim)}%): the recipe as printed: {recipe}; "
            + (
                f"reached with one change{' (read as a rounded number)' if rounded else ''}: {', '.join(reach)}"
                if reach
                else "no single change reaches it with its interval above the claim"
            )
            + (f"; read as printed ({pts(claim)}%): {', '.join(exact) if exact else 'none'}." if rounded else ".")
        )
    caption = figures.claims_figure(out / "claims.png", table)
    return [
        "### The text's claims: which single change suffices?",
        "",
        "The recipe as printed, then with one change at a time (momentum 0.9; learning rate 0.1; inputs "
        "standardised by the training pixels' mean and standard deviation; twice the epochs, read at twice the "
        "claimed epoch), each at the claimed depth and epoch. *Reached*: the 95% interval of the seeds' mean lies "
        "above the claim; *not reached*: below it; *undecided*: it contains the claim. A claim the text states as a "
        "whole percent (about 96%, 98%) may be a rounded number, so it is read from half a point below (*read from*); "
        "92.11% is read exactly. Because that reading decides several verdicts, the last two columns read every "
        "claim exactly as printed. The intervals are not corrected for being many, and the text reports single "
        "runs, so the share of seeds at or above each reading is shown too.",
        "",
        md_table(shown),
        "",
        *lines,
        "",
    ] + (["![claims](claims.png)", "", caption, ""] if caption else [])


def tuned_origin(trials: pd.DataFrame, config: dict) -> list[str]:
    """Where each tuned depth's retrained configuration came from: "at its best" means the best of one
    search per depth, each search drawn independently."""
    origin = retrained_origin(trials, config)
    if not origin:
        return []
    startup = int(config.get("sampler_startup_trials", 0))
    parts = [
        f"depth {d} trial {n}" + (" (a random start-up trial)" if s else " (proposed by TPE)")
        for d, (n, s) in sorted(origin.items())
    ]
    return [
        f'"At its best" means the best of one search per depth, each drawn independently (its first {startup} '
        f"trials at random, then TPE); retrained: {', '.join(parts)}. The seed intervals below do not include the "
        "variation from the search; the retrained models differ in width and parameters (see the table), so this "
        "setting compares searches, not depth alone.",
        "",
    ]


def caps_lines(trials: pd.DataFrame, config: dict) -> list[str]:
    """Which declared caps of the tuned search bind, and whether they bind for some depths only."""
    bound = caps_binding(trials, config)
    if not bound:
        return []
    depths = sorted(int(d) for d in trials[trials["experiment"] == "tuned"]["depth"].unique())
    lines = []
    for cap, at in bound.items():
        if not at:
            lines.append(f"- The {cap} cap binds for no depth.")
        elif len(at) == len(depths):
            lines.append(f"- The {cap} cap binds for every depth ({', '.join(map(str, at))}): all are held back alike.")
        else:
            lines.append(
                f"- The {cap} cap binds for depth {', '.join(map(str, at))} only: a caveat on the tuned contrasts "
                "involving it (that depth might gain more from a looser cap than the others)."
            )
    return [
        "Caps of the search (the retrained trial at or within 5% of the upper limit, measured on the search's own "
        "scale: logarithmic for width, linear for epochs):",
        "",
        *lines,
        "",
    ]


def lr_section(trials: pd.DataFrame, out: Path, rule: str = "mean") -> list[str]:
    m = trials[(trials["experiment"] == "matched") & (trials["depth"] > 1)]
    if m.empty:
        return []
    shape = m["shape"] if "shape" in m else pd.Series("funnel", index=m.index)
    panels = [
        (matched_key(int(b), sh).removeprefix("matched, "), g)
        for (b, sh), g in m.assign(shape=shape).groupby(["budget", "shape"], sort=True)
    ]
    caption = figures.lr_figure(out / "lr.png", m, panels)
    doc = ["![learning rates](lr.png)", "", caption, ""] if caption else []
    margins = grid_margins(m, rule)
    if not margins.empty:
        unstable = margins[margins["leads"].map(lambda x: bool(x) and min(x) <= 0)]
        rows = [
            {
                "cell": matched_key(int(r.budget), r.shape).removeprefix("matched, "),
                "depth": r.depth,
                "chosen rate": f"{r.chosen:.3g}",
                "runner-up": f"{r.runner_up:.3g}",
                "lead (points)": signed(r.lead),
                "lead per tuning seed": ", ".join(signed(x) for x in r.leads) or "n/a",
            }
            for r in margins.itertuples()
        ]
        score = "mean validation accuracy" if rule == "mean" else "smoothed mean validation accuracy"
        doc += [
            f"Each cell's rate is {LR_RULES[rule]}. How far each choice leads its runner-up in {score}, and per "
            "tuning seed (the same seed at every grid point, so the leads are paired): "
            + (
                "the chosen rate leads for every tuning seed of every cell."
                if unstable.empty
                else f"in {len(unstable)} of {len(margins)} cells a tuning seed prefers the runner-up, so that choice "
                "is within the seed noise (the runner-up check below retrains it)."
            ),
            "",
            md_table(pd.DataFrame(rows)),
            "",
        ]
    return doc


def late_section(epochs: pd.DataFrame, final: pd.DataFrame, margin: float, budget: int) -> list[str]:
    gains = late_gains(epochs)
    if gains.empty:
        return []
    flagged = gains[gains["gain"] >= margin]
    rows = [
        {
            "cell": matched_key(int(r.budget), r.shape).removeprefix("matched, ") if pd.notna(r.budget) else "softmax",
            "depth": r.depth,
            f"validation gain over the last {LATE_EPOCHS} epochs (points)": signed(r.gain),
            "seeds": r.n,
            "flag": "gained at least the margin" if r.gain >= margin else "",
        }
        for r in gains.itertuples()
    ]
    verdict = (
        f"Every matched cell gained less than the margin (±{pts(margin)} points) in validation accuracy over its "
        f"last {LATE_EPOCHS} epochs."
        if flagged.empty
        else f"{len(flagged)} of {len(gains)} matched cells gained at least the margin over their last {LATE_EPOCHS} "
        "epochs (flagged)."
    )
    doc = [
        "### Late gain (not a convergence test under the decay)",
        "",
        verdict + " With a learning rate decaying to zero, accuracy rises in the last epochs by design (the decay "
        "settles the weights), so a late gain does not by itself mean the run stopped short. Training twice as "
        f"long tests that, but only for depths 3-5 of the funnel at {budget:,} parameters (below): the flagged "
        "cells outside it are not tested.",
        "",
        md_table(pd.DataFrame(rows)),
        "",
    ]
    horizon = horizon_gains(final, budget)
    if not horizon.empty:
        rows = [
            {
                "depth": r.depth,
                "seeds": r.n,
                "test accuracy, twice the epochs minus the declared (points)": signed(r.mean),
                "95% CI": interval(r.lo, r.hi),
                "flag": (
                    "still improving by more than the margin"
                    if r.lo > margin
                    else "still improving"
                    if r.lo > 0
                    else ""
                ),
            }
            for r in horizon.itertuples()
        ]
        doc += [
            f"Converged? The same depths at {budget:,} parameters trained for twice the epochs (same peak rate, same "
            "seeds), per-seed difference in test accuracy; flagged *still improving* when the whole interval lies "
            "above 0 (and by more than the margin when above that). A depth still improving at the declared epochs is "
            "disadvantaged in its contrasts; a check on the contrasts themselves is the horizon check below:",
            "",
            md_table(pd.DataFrame(rows)),
            "",
        ]
    return doc


def checks_section(an: Analysis, final: pd.DataFrame, budget: int) -> list[str]:
    found = checks(an, final, budget, an.margin)
    if not found:
        return []

    def verdict(c) -> str:
        if c.verdict != "unresolved":
            return c.verdict
        d = c.change.detectable
        return f"unresolved (would find a change of ±{pts(d)} points)" if math.isfinite(d) else "unresolved"

    rows = [
        {
            "check": CHECK_WORDS[c.check],
            "contrast": f"depth {c.base.a} minus {c.base.b}",
            "primary outcome": outcome_words(c.base),
            "under the check": outcome_words(c.changed),
            "n": c.change.n or "n/a",
            "change (check minus primary)": signed(c.change.diff),
            "interval (Holm level)": (
                f"{interval(*c.change.ci)} at {100 * (1 - c.change.level):.2f}%"
                if math.isfinite(c.change.level)
                else "n/a"
            ),
            "verdict": verdict(c),
        }
        for c in found
    ]
    changed = [c for c in found if c.verdict in ("horizon-dependent", "rate-sensitive")]
    blind = [
        c.change.detectable
        for c in found
        if c.verdict == "unresolved" and math.isfinite(c.change.detectable) and c.change.detectable > an.margin
    ]
    weak = (
        f" {len(blind)} unresolved {'verdict' if len(blind) == 1 else 'verdicts'} could find only a change of "
        f"±{pts(min(blind))} points or more, larger than the margin: there the check cannot tell a change that "
        "matters from none, and *unresolved* does not mean the outcome holds."
        if blind
        else ""
    )
    return [
        f"### Checks at {budget:,} parameters: twice the epochs, and the runner-up learning rate",
        "",
        "Depths 3, 4 and 5 of the funnel retrained at twice the epochs with the chosen learning rate (were 10 "
        "epochs enough?) and at the runner-up rate of their grid (does the conclusion hang on the choice?), with "
        "the seeds the primary contrasts also ran. Whether a primary contrast changes is tested on its per-seed "
        "change (the check's difference minus the primary one, paired by seed), one Holm family over every check "
        "contrast: *horizon-dependent* or *rate-sensitive* when the change's interval excludes 0 or the direction "
        "flips; *holds* when two one-sided tests put the change inside the margin; *uninformative* when the "
        "primary contrast is itself undecided; otherwise *unresolved*, with the change the check could have "
        "found (80% power). The other settings' contrasts are not checked this way.",
        "",
        md_table(pd.DataFrame(rows)),
        "",
        (
            "No primary contrast at this budget changes detectably under either check."
            if not changed
            else "Changes under a check: "
            + "; ".join(f"{c.base.setting}, depth {c.base.label} ({c.verdict})" for c in changed)
            + ". The primary outcome of those contrasts depends on that choice."
        )
        + weak,
        "",
    ]


def seed_section(an: Analysis, budget: int) -> list[str]:
    plan = seed_plan(an, budget)
    if plan is None:
        return []
    enough = plan.used >= plan.needed
    needed = plan.needed if plan.needed <= 1000 else "more than 1,000"
    power = achieved_power(an)
    rows = [
        {
            "setting": r.setting,
            "seeds": r.n,
            "largest spread (points)": pts(r.sd),
            f"power to find ±{pts(an.margin)}": f"{r.differ:.0%}",
            "power to show equivalence at 0": f"{r.equivalent:.0%}",
        }
        for r in power.itertuples()
    ]
    return [
        "### Enough seeds?",
        "",
        f"At {budget:,} parameters (both shapes) the primary contrasts' per-seed differences spread by up to "
        f"{pts(plan.sd)} points (standard deviation). To find a true difference of the margin (±{pts(an.margin)} "
        f"points), or show a true difference of 0 equivalent, with {POWER:.0%} power at the Holm family's strictest "
        f"level ({ALPHA} / {len(an.primary)} = {plan.level:.4f}), a paired t-test needs {needed} seeds "
        f"(statsmodels' t-test power); this study ran {plan.used}"
        + (
            ": enough, if the spread is as measured."
            if enough
            else ": fewer, so an inconclusive outcome here may be a matter of seeds."
        )
        + " The number was chosen before the study from a pilot on the same network family (docs/method.md); "
        "a spread estimated from few seeds is itself uncertain. The power every primary setting's seeds give, at "
        "its measured spread:",
        "",
        md_table(pd.DataFrame(rows)),
        "",
    ]


def time_section(trials: pd.DataFrame, final: pd.DataFrame) -> list[str]:
    t = time_by_part(trials, final)
    if t.empty:
        return []
    rows = [
        {
            "part": r.part,
            "runs": int(r.runs),
            "epochs": int(r.epochs),
            "training minutes": f"{r.seconds / 60:,.1f}",
            "share": f"{r.share:.0%}",
        }
        for r in t.itertuples()
    ]
    total = t["seconds"].sum() / 60
    wall = busy_minutes(trials, final)
    lines = [
        "## Where the time goes",
        "",
        f"Training time by part of the study, summed over workers ({total:,.0f} minutes in all; evaluation and "
        "storage are not in it, and seconds depend on the machine and its load):",
        "",
        md_table(pd.DataFrame(rows)),
        "",
    ]
    if math.isfinite(wall):
        lines += [
            f"Wall time: runs were training during {wall:,.0f} minutes (the union of every run's start-to-finish "
            f"interval, so pauses between commands are left out); the full preset's budget is {WALL_BUDGET} minutes "
            "per dataset on 2 CPU cores: "
            + ("within it." if wall <= WALL_BUDGET else f"over it by {wall - WALL_BUDGET:,.0f} minutes.")
            + " A worker's evaluation and storage time between its runs counts too; seconds depend on the machine's "
            "load. "
            + (
                f"Even packed perfectly onto {workers} workers, the training minutes above need at least "
                f"{total / workers:,.0f} minutes of wall time at these speeds, so "
                + (
                    "this design fits the budget only on a faster or quieter machine."
                    if total / workers > WALL_BUDGET
                    else "the budget is within reach."
                )
                if (workers := most_at_once(trials, final)) > 0
                else ""
            ),
            "",
        ]
    return lines
