"""The same study run again (another machine, say): does the answer reproduce?

Each primary contrast's outcome in both runs, and the difference between runs of its per-seed
differences, tested as the cross-dataset interaction is (study.analysis.interactions); which matched
cells' learning-rate choice moved. Only contrasts both runs decided alike are an answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mnist_bench.errors import UsageError

from .analysis import (
    Analysis,
    Contrast,
    Interaction,
    declared,
    grid_choices,
    interactions,
    matched_key,
    opening_sentence,
)
from .config import NEIGHBOURHOOD
from .markdown import interval, md_table, p_value, signed
from .stats import ALPHA, mcnemar_exact

VOLATILE = ("in_progress", "superseded_final_runs")  # config.json keys that describe a run, not the design
DECIDED = ("better", "worse", "equivalent")
AGREEMENT = ("decided alike", "conflicting", "decided in one run only", "undecided in both")


DRAWS = ("name", "tuning_seed")  # another draw of the tuning noise (and the study name that follows it)


def lr_rule(config: dict) -> str:
    """The matched grid's learning-rate rule (config.LR_RULES); studies stored before it was declared: the mean."""
    return config.get("experiments", {}).get("matched", {}).get("lr_rule", "mean")


def refuse_other_design(config: dict, other: dict, where: Path) -> dict[str, str]:
    """A replicate is the same study run again: same dataset, same settings, same budgets. Two differences
    are allowed and returned as {setting: phrase for the report}: "tuning_seed" (another draw of the tuning
    noise) and "lr_rule" (the replicate is the design before or after the rule changed; the report then
    asks what this run's rule chooses from the replicate's own grid)."""

    def design(c: dict) -> dict:
        d = {k: v for k, v in c.items() if k not in VOLATILE + DRAWS}
        exps = dict(d.get("experiments", {}))
        if "matched" in exps:
            exps["matched"] = {k: v for k, v in exps["matched"].items() if k != "lr_rule"}
        return {**d, "experiments": exps}

    a, b = design(config), design(other)
    differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differing:
        hint = "; compare another dataset with --compare" if "dataset" in differing else ""
        raise UsageError(
            f"--replicate {where} is not the same study run again: setting {differing[0]!r} differs "
            f"({len(differing)} of its settings differ){hint}"
        )
    allowed = {}
    if config.get("tuning_seed", 0) != other.get("tuning_seed", 0):
        allowed["tuning_seed"] = (
            f"tuning seeds from {other.get('tuning_seed', 0)} there, from {config.get('tuning_seed', 0)} here"
        )
    if lr_rule(config) != lr_rule(other) and "matched" in config.get("experiments", {}):
        allowed["lr_rule"] = (
            f"learning rates chosen by the {lr_rule(other)} rule there, the {lr_rule(config)} rule here"
        )
    return allowed


def chosen_rates(final: pd.DataFrame) -> pd.Series:
    """The peak learning rate each matched cell (not a check) retrained, indexed by (budget, shape, depth)."""
    m = declared(final[final["experiment"] == "matched"])
    keys = [m["budget"].fillna(0).astype(int).rename("budget"), m["shape"].fillna("funnel").rename("shape"), "depth"]
    return m.groupby(keys)["param_lr"].first()


def machine(final: pd.DataFrame) -> str:
    cpus = sorted(set(final["cpu"].dropna().astype(str))) if "cpu" in final else []
    return ", ".join(cpus) or "an unnamed machine"


def agreement(a: Contrast | None, b: Contrast | None, between: str) -> str:
    """How one primary contrast's two runs agree: decided alike, conflicting, decided in one run only,
    or undecided in both. Two inconclusive outcomes are not an agreement."""
    x, y = (c.outcome in DECIDED if c else False for c in (a, b))
    if between == "differs" or (x and y and a.outcome != b.outcome):
        return "conflicting"
    if x and y:
        return "decided alike"
    return "decided in one run only" if x or y else "undecided in both"


@dataclass(frozen=True)
class Paired:
    """One primary contrast in both runs: the between-run test, each run's contrast, how they agree."""

    between: Interaction
    this: Contrast | None
    other: Contrast | None
    agreement: str


def pair_runs(first: Analysis, second: Analysis) -> list[Paired]:
    outcomes = [{(c.setting, c.a, c.b): c for c in an.primary} for an in (first, second)]
    out = []
    for x in interactions(first, second):
        a, b = (o.get((x.setting, x.a, x.b)) for o in outcomes)
        out.append(Paired(x, a, b, agreement(a, b, x.outcome)))
    return out


def groups(pairs: list[Paired]) -> dict[str, list[str]]:
    """{how the two runs agree: the primary contrasts that do}, in the order the report lists them."""
    found: dict[str, list[str]] = {g: [] for g in AGREEMENT}
    for p in pairs:
        found[p.agreement].append(f"{p.between.setting}, depth {p.between.a} minus {p.between.b}")
    return {g: v for g, v in found.items() if v}


def differences(differs: dict[str, str]) -> str:
    """How the replicate was run, in words: the same design and seeds, or what differs."""
    if not differs:
        return "the same design and seeds"
    return "the same final seeds and the same design except: " + "; ".join(differs.values())


def cell_label(budget: int, shape: str, depth: int) -> str:
    """A matched cell in the section's lists (budget 0: softmax)."""
    return f"{'constant width' if shape == 'constant' else 'funnel'} {budget:,} depth {depth}" if budget else "softmax"


def where(this_final: pd.DataFrame | None, other_final: pd.DataFrame) -> str:
    """Where the other run ran, said as the same kind of machine when both name the same processors."""
    same = this_final is not None and machine(this_final) == machine(other_final)
    return f"{'the same kind of machine' if same else 'another machine'} ({machine(other_final)})"


def summary(
    pairs: list[Paired],
    other_final: pd.DataFrame,
    differs: dict[str, str] | None = None,
    this_final: pd.DataFrame | None = None,
) -> list[str]:
    """The line under the answer."""
    if not pairs:
        return []
    return [
        f"Run again on {where(this_final, other_final)} with {differences(differs or {})}: of the "
        f"{len(pairs)} contrasts, "
        + ", ".join(f"{len(v)} {g}" for g, v in groups(pairs).items())
        + ' (see "Run again"). Only what both runs decided alike is an answer.',
        "",
    ]


@dataclass(frozen=True)
class Replicate:
    """The second run as the report reads it: its analysis, tables, folder and how it was run differently
    (refuse_other_design's {setting: phrase})."""

    analysis: Analysis
    trials: pd.DataFrame
    final: pd.DataFrame
    where: Path
    differs: dict[str, str] = field(default_factory=dict)


def own_choices(rates: pd.Series, thin=()) -> pd.Series:
    """The cells that choose their own rate (a thinned budget borrows its depth's choice)."""
    return rates[~rates.index.get_level_values("budget").isin(thin)]


def rate_moves(moved: pd.DataFrame, other: Replicate, rule: str, thin=(), check_budget: int = 0) -> dict:
    """{(budget, shape, depth): why} for the matched cells whose retrained rate differs between the runs
    (`moved`: this run's and the other's rate by cell): "" where both runs used the same rule; otherwise
    "by the rule" where this run's rule applied to the other run's grid picks this run's rate (the other
    run's rule made the difference), else "by the draw"."""
    if "lr_rule" not in other.differs:
        return dict.fromkeys(moved.index, "")
    there = grid_choices(other.trials, rule)
    out = {}
    for budget, shape, depth in moved.index:
        key = (check_budget, shape, depth) if budget in thin else (budget, shape, depth)
        mine = there.get(key)
        same = mine is not None and bool(np.isclose(mine, moved.loc[(budget, shape, depth), "this"]))
        out[(budget, shape, depth)] = "by the rule" if same else "by the draw"
    return out


def rule_lines(trials: pd.DataFrame, final: pd.DataFrame, other: Replicate, rule: str, thin=()) -> list[str]:
    """Where the runs chose by different rules or from different tuning seeds: what this run's rule
    chooses from the other run's own grid against what this run retrained (k of N cells; the depths of
    the question separately), the mean rule on the same two grids as the control, and an exact McNemar
    test on the cells where exactly one rule agrees."""
    if not other.differs:
        return []
    t = pd.concat(
        [
            own_choices(chosen_rates(final), thin),
            own_choices(grid_choices(other.trials, rule), thin),
            own_choices(grid_choices(trials, "mean"), thin),
            own_choices(grid_choices(other.trials, "mean"), thin),
        ],
        axis=1,
        keys=["here", "there", "mean_here", "mean_there"],
    ).dropna()
    if t.empty:
        return []
    agree = pd.Series(np.isclose(t["here"], t["there"]), index=t.index)
    control = pd.Series(np.isclose(t["mean_here"], t["mean_there"]), index=t.index)
    core = t.index.get_level_values("depth").isin(NEIGHBOURHOOD)
    only_rule, only_mean = int((agree & ~control).sum()), int((~agree & control).sum())
    p = mcnemar_exact(only_rule, only_mean)
    apart = "; ".join(
        f"{cell_label(*cell)}: {t.loc[cell, 'here']:.3g} retrained here, {t.loc[cell, 'there']:.3g} "
        "by the rule on the other grid"
        for cell in t.index[~agree.to_numpy()]
    )
    draw = "tuning_seed" in other.differs
    return [
        f"This run's rule ({rule}) applied to the other run's own grid chooses the rate this run retrained in "
        f"**{int(agree.sum())} of {len(t)}** cells that choose their own rate ({int(agree[core].sum())} of "
        f"{int(core.sum())} at depths 3-5)"
        + (f"; apart: {apart}" if apart else "")
        + ". "
        + (
            "The two grids were trained from other tuning seeds: an independent draw of the training noise "
            "(initialisation and batch order) on the same validation hold-out. "
            if draw
            else ""
        )
        + f"The mean rule on the same two grids agrees in {int(control.sum())} of {len(t)}. Where exactly one "
        f"rule agrees ({only_rule} cells for {rule}, {only_mean} for the mean), an exact McNemar test gives p = "
        f"{p:.2g}"
        + (
            f": {'the ' + rule + ' rule' if only_rule > only_mean else 'the mean rule'} is the more reproducible here."
            if p < ALPHA
            else f": {len(t)} cells cannot tell the two rules apart."
        )
        + " What each choice costs against its grid's best mean is in the learning-rate table of section 2; the "
        "thresholds a rerun was to meet are declared in docs/method.md.",
        "",
    ]


def section(
    pairs: list[Paired],
    trials: pd.DataFrame,
    final: pd.DataFrame,
    other: Replicate,
    rule: str,
    thin=(),
    check_budget: int = 0,
) -> list[str]:
    """The report's "Run again" section."""
    if not pairs:
        return []
    second, other_final = other.analysis, other.final
    rates = pd.concat([chosen_rates(final), chosen_rates(other_final)], axis=1, keys=["this", "other"]).dropna()
    moved_all = rates[~np.isclose(rates["this"], rates["other"])]
    why = rate_moves(moved_all, other, rule, thin, check_budget)
    moved_in = {}  # setting key -> {depth whose rate moved: why} (a thinned budget inherits its rate, moved or not)
    for (budget, shape, depth), reason in why.items():
        if budget:
            moved_in.setdefault(matched_key(budget, shape), {})[depth] = reason
    rows = []
    for p in pairs:
        x, a, b = p.between, p.this, p.other
        if x.setting.startswith("matched"):
            moved = {d: r for d, r in moved_in.get(x.setting, {}).items() if d in (x.a, x.b)}
            rate = (
                "depth " + " and ".join(f"{d}" + (f" ({r})" if r else "") for d, r in sorted(moved.items()))
                if moved
                else "no"
            )
        else:
            rate = "two searches" if x.setting == "tuned" else "none chosen"
        rows.append(
            {
                "setting": x.setting,
                "contrast": f"depth {x.a} minus {x.b}",
                "n": x.n or "n/a",
                "this run": f"{signed(a.diff)} {a.outcome}" if a else "n/a",
                "the other run": f"{signed(b.diff)} {b.outcome}" if b else "n/a",
                "rate moved": rate,
                "r": f"{x.corr:.2f}" if math.isfinite(x.corr) else "n/a",
                "between runs": signed(x.diff),
                "interval (Holm level)": (
                    f"{interval(*x.ci)} at {100 * (1 - x.level):.2f}%" if math.isfinite(x.level) else "n/a"
                ),
                "TOST interval": interval(*x.ci_equivalence) if math.isfinite(x.ci_equivalence[0]) else "n/a",
                "TOST Holm p": p_value(x.p_equivalence_holm),
                "between-run outcome": (
                    {"carries over": "reproduces within the margin"}.get(x.outcome, x.outcome)
                    if x.reason is None
                    else f"not computed ({x.reason})"
                ),
                "the two runs": p.agreement,
            }
        )
    chose, moved = own_choices(rates, thin), own_choices(moved_all, thin)
    moved_text = "; ".join(
        f"{cell_label(*cell)}: {r.other:.3g} there, {r.this:.3g} here" + (f" ({why[cell]})" if why.get(cell) else "")
        for cell, r in moved.iterrows()
    )
    margin = 100 * second.margin
    listed = [f"- *{g}* ({len(v)}): " + "; ".join(v) + "." for g, v in groups(pairs).items()]
    return [
        "## Run again: does the answer reproduce?",
        "",
        f"The study was run a second time (`{other.where}`, on {machine(other_final)}; this run: "
        f"{machine(final)}), with {differences(other.differs)}. "
        + (
            "Both ran on the same kind of processor, so a cell with the same seed, rate and configuration computes "
            "the same numbers in both: a contrast whose depths kept their rates is identical seed for seed (named "
            "*not computed (identical ...)* below), which is determinism, not replication. Where the runs "
            "differ, it is through the tuning seeds or the rule"
            if machine(final) == machine(other.final)
            else "Rounding differs between processors, and with momentum and a decaying rate that re-randomises "
            "training: r, the correlation between the runs of a contrast's per-seed differences, shows how much "
            "of the pairing survives (the recipe's plain SGD keeps most of it). The runs also differ downstream of "
            "the rounding (and of the tuning seeds, where they differ)"
        )
        + ": a learning rate chosen among near-equal grid points (*rate moved*: a depth of the contrast "
        "retrained at another rate), and the tuned rows compare two searches that found different "
        "configurations. For each primary contrast: its outcome in each run, and the difference between runs "
        "of its per-seed differences (paired by seed, one Holm family, as across datasets): "
        f"*differs* when that interval excludes 0, *reproduces within the margin* when two one-sided tests put "
        f"it inside ±{margin:.2f} points (two runs are two draws, not a guarantee), otherwise *inconclusive*.",
        "",
        f"The other run opened: {opening_sentence(second)}",
        "",
        md_table(pd.DataFrame(rows)),
        "",
        "The two runs, contrast by contrast:",
        "",
        *listed,
        "",
        f"The matched cells that choose their own learning rate chose a different one in {len(moved)} of "
        f"{len(chose)}" + (f" ({moved_text})" if moved_text else "") + ". A thinned budget retrains the rate its "
        "depth chose at the check budget, so it inherits a moved rate. Seed intervals hold each chosen rate "
        "fixed: they do not include the choice, and more final seeds would not shrink this part of the "
        "variation. What the answer can rest on is what both runs decided alike.",
        "",
        *(
            [
                "The other run's final models were retrained at its own rule's rates: a contrast that conflicts "
                "where a rate moved *by the rule* is not a failure to reproduce the rerun's choice.",
                "",
            ]
            if any(why.values())
            else []
        ),
        *rule_lines(trials, final, other, rule, thin),
    ]
