"""The design's checks (study.design) as report sections; study.report places them in the document."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from . import factorial, figures
from .analysis import (
    CHECK_WORDS,
    Analysis,
    matched_key,
)
from .design import (
    LATE_EPOCHS,
    WALL_BUDGET,
    achieved_power,
    busy_minutes,
    caps_binding,
    checks,
    claims,
    horizon_gains,
    late_gains,
    most_at_once,
    retrained_origin,
    seed_plan,
    time_by_part,
)
from .markdown import interval, md_table, outcome_words, pts, signed
from .stats import ALPHA, POWER, UNREACHABLE


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


def search_section(every: pd.DataFrame, trials: pd.DataFrame, an: Analysis) -> list[str]:
    """The search's own variance: each tuned primary contrast at every pick of the two searches' top trials (their
    best and runners-up by validation, retrained too), against the primary interval at the best picks."""
    contrasts = [c for c in an.primary if c.setting == "tuned" and c.outcome != "not computed"]
    picks = [(c, factorial.search_picks(every, c.a, c.b)) for c in contrasts]
    if not any(len(p) > 1 for _, p in picks):
        return []
    tuned = trials[(trials["experiment"] == "tuned") & (trials["state"] == "complete")]
    gaps = []
    for d, g in tuned.groupby("depth"):
        top = g["val_accuracy"].sort_values(ascending=False).to_numpy(float)
        if len(top) >= 3:
            gaps.append(f"depth {d} {pts(top[0] - top[2])}")
    lines = []
    for c, p in picks:
        lo, hi = p["diff"].min(), p["diff"].max()
        inside = c.ci[0] <= lo and hi <= c.ci[1]
        lines.append(
            f"- depth {c.a} minus {c.b}: {signed(lo)} to {signed(hi)} points over {len(p)} picks "
            f"({', '.join(str(n) for n in sorted(set(p['n'])))} seeds each); the primary interval "
            f"{interval(*c.ci)} {'covers' if inside else 'does not cover'} that range"
        )
    return [
        "The search's own variance: each search's best trial is one pick among near-ties (its top three lie within "
        + (", ".join(gaps) if gaps else "n/a")
        + " points of validation accuracy), so its two runners-up were retrained too, with fewer seeds each, and the "
        "variance between each depth's picks is inside the tuned intervals above (where the primary table says the "
        "interval carries the search's pick). Each tuned primary contrast at every pick of both searches (each "
        "difference over the seeds both picks trained):",
        "",
        *lines,
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


def cell_name(r) -> str:
    """A matched cell's name in a table: its budget and shape, or softmax (depth 1, no budget)."""
    return "softmax" if r.depth == 1 else matched_key(int(r.budget), r.shape).removeprefix("matched, ")


def band_section(every: pd.DataFrame, out: Path, band: list[float], an: Analysis) -> list[str]:
    """The factorial's rates: the validation accuracy of every run against its rate (lr.png), and per cell the
    chosen rate, its lead over the runner-up, the seeds that prefer the runner-up, and the test accuracy at every
    rate; a choice on the band's edge is named (the band is then wrong: widen it and rerun that cell)."""
    runs = factorial.band_runs(every)
    m = runs[runs["depth"] > 1]
    if m.empty:
        return []
    panels = [
        (matched_key(int(b), sh).removeprefix("matched, "), g)
        for (b, sh), g in m.groupby(["budget", "shape"], sort=True)
    ]
    caption = figures.lr_figure(out / "lr.png", m, panels)
    doc = ["![learning rates](lr.png)", "", caption, ""] if caption else []
    summary = factorial.band_summary(every, band)
    rows = []
    for r in summary.sort_values(["budget", "shape", "depth"], na_position="first").itertuples():
        rows.append(
            {
                "cell": cell_name(r),
                "depth": r.depth,
                "chosen rate": f"{r.chosen:.3g}" + (" (edge)" if r.edge else ""),
                "runner-up": f"{r.runner_up:.3g}" if math.isfinite(r.runner_up) else "n/a",
                "lead (points)": signed(r.lead),
                "seeds preferring the runner-up": f"{r.seeds_preferring_runner_up} of {r.seeds}",
                **{
                    f"test at {rate:.3g}": pts(getattr(r, f"test_{i}"))
                    for i, rate in sorted(enumerate(band), key=lambda x: x[1])
                },
            }
        )
    moved = [c for c in an.primary if c.estimate == "chosen" and math.isfinite(c.moved)]
    edge = summary[summary["edge"] & summary["depth"].isin([3, 4, 5])]
    doc += [
        f"Every matched cell trains every rate of the band ({', '.join(f'{x:.3g}' for x in sorted(band))}) with each "
        "of its "
        "seeds; a depth's rate is the one with the highest mean validation accuracy over its seeds (ties to the "
        "earlier point of the band as declared). The test set plays no part in the choice. The primary contrasts "
        "make the choice again inside every resample of the seeds, so their intervals carry it"
        + (
            f": a contrast's depths chose another rate in {100 * min(c.moved for c in moved):.0f}% to "
            f"{100 * max(c.moved for c in moved):.0f}% of resamples"
            if moved
            else ""
        )
        + ".",
        "",
        md_table(pd.DataFrame(rows)),
        "",
    ]
    if not edge.empty:
        doc += [
            "WARNING: the band is too narrow for "
            + "; ".join(f"{cell_name(r)} depth {r.depth} (chosen {r.chosen:.3g})" for r in edge.itertuples())
            + ": a primary depth's best rate sits on the band's edge, so its best may lie outside. Widen the band "
            "and rerun that cell before reading its contrasts.",
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
            "cell": cell_name(r),
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
    changed = [c for c in found if c.verdict == "horizon-dependent"]
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
        f"### Checks at {budget:,} parameters: twice the epochs",
        "",
        "Depths 3, 4 and 5 of the funnel retrained at twice the epochs with the chosen learning rate (were the "
        "epochs enough?), with the seeds the primary contrasts also ran (the factorial trains every rate of its "
        "band, so no check retrains another rate). Whether a primary contrast changes is tested on its"
        " per-seed change (the check's difference minus the primary one, paired by seed), one Holm family "
        "over every check contrast: *horizon-dependent* when the change's interval "
        "excludes 0 or the direction flips; *holds* when two one-sided tests put the change inside the "
        "margin; *uninformative* when the primary contrast is itself undecided; otherwise *unresolved*, with "
        "the change the check could have found (80% power). The other settings' contrasts are not checked "
        "this way.",
        "",
        md_table(pd.DataFrame(rows)),
        "",
        (
            "No primary contrast at this budget changes detectably under the check."
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
    needed = "more than any number of" if plan.needed >= UNREACHABLE else needed
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
        f"At {budget:,} parameters the primary contrasts' per-seed differences spread by up to "
        f"{pts(plan.sd)} points (standard deviation; with the test images and the rate choice where the intervals "
        "carry them: the spread per seed that gives the interval's variance). To find a true difference of the "
        f"margin (±{pts(an.margin)} points), or show a true difference of 0 equivalent, with {POWER:.0%} power at "
        f"the Holm family's strictest level ({ALPHA} / {len(an.primary)} = {plan.level:.4f}), a paired t-test "
        f"needs {needed} seeds "
        f"(statsmodels' t-test power); this study ran {plan.used}"
        + (
            ": enough, if the spread is as measured."
            if enough
            else ": fewer, so an inconclusive outcome here may be a matter of seeds."
        )
        + " The number was declared before the study from the earlier runs' spread (docs/method.md); "
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
