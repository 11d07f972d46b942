"""The design's own checks, computed: is the experiment sound enough to read its contrasts?

From the tables: the text's claims against the recipe with one change at a time, the last epochs' gains
and the horizon check (twice the epochs), the seeds each setting has against the seeds its contrasts need,
the search caps that bind, and where the training time went. study.sections writes them as report sections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import stats
from .analysis import (
    CHECK_WORDS,
    EDGE_FRACTION,
    Analysis,
    Contrast,
    Interaction,
    contrast_family,
    declared,
    difference_family,
    groups_of,
    matched_key,
    of_shape,
    seed_differences,
)
from .config import CHECKS, VARIANTS
from .stats import ALPHA

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
            return "horizon-dependent"
        if self.change.outcome == "carries over":
            return "holds"
        return "unresolved"


def checks(an: Analysis, final: pd.DataFrame, budget: int, margin: float) -> list[Check]:
    """The horizon check: depth 4 minus 3 and minus 5 at `budget` (funnel) at twice the epochs. Its two
    contrasts are one Holm family (shown); whether a primary contrast changes under it is the paired
    difference-in-differences over the seeds both ran, one Holm family over every check contrast."""
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
    """How many seeds the primary contrasts at the text's budget need, from their measured spread (per seed, with
    every source their intervals carry: Contrast.sd_total)."""

    sd: float  # the largest spread of per-seed differences among those contrasts
    level: float  # the Holm family's strictest level (alpha / family size)
    needed: int
    used: int


def seed_plan(an: Analysis, budget: int) -> SeedPlan | None:
    """Seeds the primary contrasts at `budget` (both shapes) need, from their largest measured spread."""
    keys = (matched_key(budget), matched_key(budget, "constant"))
    at = [c for c in an.primary if c.setting in keys and math.isfinite(c.sd_total) and c.sd_total > 0]
    if not at:
        return None
    sd = max(c.sd_total for c in at)
    level = ALPHA / len(an.primary)

    def needed(c) -> int:  # the seeds' part shrinks with more seeds; the test images' (and a search's) does not
        seeds = c.var_seeds if math.isfinite(c.var_seeds) else c.var
        return stats.seeds_with_floor(math.sqrt(seeds * c.n), max(c.var - seeds, 0.0), an.margin, level)

    return SeedPlan(sd, level, max(needed(c) for c in at), min(c.n for c in at))


def achieved_power(an: Analysis) -> pd.DataFrame:
    """Per primary setting: its seeds, the largest spread of its contrasts' per-seed differences, and the
    power those seeds give at the family's strictest level to find a true difference of the margin and
    to show a true difference of 0 equivalent (if the spread is as measured)."""
    level = ALPHA / max(len(an.primary), 1)
    rows = []
    for s in an.settings:
        cs = [c for c in an.primary if c.setting == s.key and math.isfinite(c.sd_total) and c.sd_total > 0]
        if not cs:
            continue
        sd, n = max(c.sd_total for c in cs), min(c.n for c in cs)
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
            return "matched, retraining"  # every rate of the band is a final run
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
    """The most workers that were training at the same moment: the workers the study ran with. A pack's runs share
    one worker (tables with a `worker` column count each worker's overlapping runs once)."""
    if all("worker" in df for df in (trials, final) if len(df)):
        events = []
        for spans in _worker_spans(trials, final).values():
            events += [(t, step) for a, b in spans for t, step in ((a, 1), (b, -1))]
        events.sort()
    else:
        events = sorted((t, step) for a, b in run_spans(trials, final) for t, step in ((a, 1), (b, -1)))
    most = now = 0
    for _, step in events:  # a finish sorts before a start at the same instant (-1 < 1)
        now += step
        most = max(most, now)
    return most


def _worker_spans(trials: pd.DataFrame, final: pd.DataFrame) -> dict:
    """{worker: its runs' start-to-finish intervals, overlapping ones merged}."""
    out: dict = {}
    for df in (trials, final):
        if not len(df) or not {"started", "finished", "worker"} <= set(df.columns):
            continue
        start = pd.to_datetime(df["started"], utc=True, errors="coerce")
        end = pd.to_datetime(df["finished"], utc=True, errors="coerce")
        for w, a, b in zip(df["worker"], start, end):
            if pd.notna(a) and pd.notna(b) and b >= a:
                out.setdefault(w, []).append((a, b))
    merged = {}
    for w, spans in out.items():
        spans.sort()
        m = [list(spans[0])]
        for a, b in spans[1:]:
            if a <= m[-1][1]:
                m[-1][1] = max(m[-1][1], b)
            else:
                m.append([a, b])
        merged[w] = [tuple(x) for x in m]
    return merged


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
