"""Numbers and tables as the report prints them: two decimals in points, signed differences, "n/a"
for a missing number (never "nan"), Markdown tables, and a contrast's row and outcome in words."""

from __future__ import annotations

import math

import pandas as pd

from .analysis import Contrast
from .stats import ALPHA, UNREACHABLE


def pts(x: float) -> str:
    """An accuracy fraction as percent/points with two decimals; n/a where there is no number."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def signed(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    v = 100 * x
    if abs(v) < 0.0005:
        return "+0.00"  # never "-0.00"
    return f"{v:+.3f}" if abs(v) < 0.005 else f"{v:+.2f}"  # an edge near 0 is not printed as 0


def interval(lo: float, hi: float, signed_values: bool = True) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    f = signed if signed_values else pts
    return f"[{f(lo)}, {f(hi)}]"


def p_value(p: float) -> str:
    return "n/a" if p is None or not math.isfinite(p) else f"{p:.3g}"


def cell(v) -> str:
    """A table cell: a missing number shows as n/a, never as nan."""
    return "n/a" if isinstance(v, float) and not math.isfinite(v) else str(v)


def md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


# --- a contrast ----------------------------------------------------------------------------------


def outcome_words(c: Contrast) -> str:
    if c.outcome == "not computed":
        return f"not computed ({c.reason})"
    if c.outcome == "equivalent":
        return "equivalent within the margin"
    if c.outcome == "inconclusive":
        if c.seeds_needed >= UNREACHABLE:
            return "inconclusive (no number of seeds resolves it: the part more seeds do not shrink is too wide)"
        seeds = f"{c.seeds_needed}" if c.seeds_needed <= 1000 else "more than 1,000"
        return f"inconclusive (planning: {seeds} paired seeds)"
    if math.isfinite(c.p_equivalence_holm) and c.p_equivalence_holm <= ALPHA:
        return f"{c.outcome}, by less than the margin"
    return c.outcome


def contrast_table(contrasts: list[Contrast], with_setting: bool, notes: dict | None = None) -> str:
    """One row per contrast; `notes` ({(setting, a, b): words}) qualifies an outcome, e.g. a design check
    under which it changes."""
    rows = []
    for c in contrasts:
        row = {"setting": c.setting} if with_setting else {}
        row |= {
            "contrast": f"depth {c.a} minus {c.b}",
            "n": c.n or "n/a",
            "r": f"{c.corr:.2f}" if math.isfinite(c.corr) else "n/a",
            "difference": signed(c.diff),
            "interval (Holm level)": (
                f"{interval(*c.ci)} at {100 * (1 - c.level):.2f}%" if math.isfinite(c.level) else "n/a"
            ),
            "Holm p": p_value(c.p_holm),
            "TOST Holm p": p_value(c.p_equivalence_holm),
            "Wilcoxon p": p_value(c.p_wilcoxon),
            "outcome": outcome_words(c)
            + (f"; {notes[(c.setting, c.a, c.b)]}" if notes and (c.setting, c.a, c.b) in notes else ""),
        }
        if any(x.margins for x in contrasts):  # the primary family: what the interval carries, and the margin's role
            row |= {
                "interval carries": ESTIMATE_WORDS.get(c.estimate, c.estimate),
                "equivalence bound": f"±{pts(c.bound)}" if math.isfinite(c.bound) else "n/a",
                **{f"at ±{100 * m:.2f}": SHORT.get(o, o) for m, o in c.margins},
            }
        rows.append(row)
    return md_table(pd.DataFrame(rows))


ESTIMATE_WORDS = {  # what a primary interval carries (analysis.primary_estimate)
    "chosen": "seeds, rate choice, test images",
    "crossed": "seeds, test images",
    "searched": "seeds, test images, the search's pick",
    "seeds": "seeds only",
}
SHORT = {"equivalent": "equivalent", "inconclusive": "undecided", "not computed": "n/a"}


# --- the answer, first -----------------------------------------------------------------------------

NEIGHBOUR_WORDS = {3: "three", 5: "five"}


def answer_sentence(name: str, primary: list[Contrast], margin: float) -> str:
    """The answer in one sentence that states bounds, not labels: for each neighbour, the settings where four
    layers is equivalent to it at the declared margin and the largest equivalence bound among them ("within
    ±X points"); where it is better or worse (difference and interval); and what is undecided, with its bound."""
    if not primary:
        return (
            f"On {name}, this study has no setting with depth 4 and a neighbour, so it does not answer "
            '"why four layers?"; the sections below describe what it ran.'
        )
    within = []
    for b in sorted({c.b for c in primary}):
        eq = [c for c in primary if c.b == b and c.outcome == "equivalent"]
        if eq:
            bounds = [c.bound for c in eq]
            bound = f"±{pts(max(bounds))} points" if all(math.isfinite(x) for x in bounds) else "the margin"
            within.append(
                f"within {bound} of {NEIGHBOUR_WORDS.get(b, b)} in "
                + (
                    f"every setting ({len(eq)})"
                    if len(eq) == len(settings_of(primary))
                    else " / ".join(c.setting for c in eq)
                )
            )
    phrases = ["is " + " and ".join(within)] if within else []
    phrases += [
        f"{'beats' if c.outcome == 'better' else 'trails'} {NEIGHBOUR_WORDS.get(c.b, c.b)} in {c.setting} "
        f"({signed(c.diff)} points, interval {signed(c.ci[0])} to {signed(c.ci[1])})"
        for c in primary
        if c.outcome in ("better", "worse")
    ]
    open_ = [c for c in primary if c.outcome in ("inconclusive", "not computed")]
    declared = f"a margin of ±{100 * margin:.2f} points"
    if not phrases:
        return (
            f"On {name}, no contrast of four layers with three or five is decided at {declared}: all {len(primary)} "
            "are undecided (their equivalence bounds are in the table)."
        )
    listed = " / ".join(
        f"{NEIGHBOUR_WORDS.get(c.b, c.b)} in {c.setting}"
        + (f" (bound ±{pts(c.bound)})" if math.isfinite(c.bound) else "")
        for c in open_
    )
    rest = f"; against {listed} it is undecided" if open_ else ""
    return f"On {name}, four layers " + "; it ".join(phrases) + rest + f" (at {declared})."


def settings_of(primary: list[Contrast]) -> list[str]:
    return list(dict.fromkeys(c.setting for c in primary))


def setting_table(primary: list[Contrast]) -> str:
    """One row per setting: depth 4 minus 3 and minus 5, each as difference, Holm-level interval (which decides
    better or worse) and outcome, with the two-one-sided-tests interval where that decided equivalence."""
    rows: dict[str, dict] = {}
    for c in primary:
        row = rows.setdefault(c.setting, {"setting": c.setting})
        words = outcome_words(c).split(" (planning")[0]
        if c.outcome == "equivalent":  # decided by the two-one-sided-tests interval, not the Holm one
            words += f" (TOST {interval(*c.ci_equivalence)})"
        if math.isfinite(c.bound) and c.outcome != "not computed":
            words += f"; bound ±{pts(c.bound)}"
        text = f"{signed(c.diff)} {interval(*c.ci)}: {words}" if c.outcome != "not computed" else words
        row[f"depth 4 minus {c.b}"] = text
    columns = ["setting", *sorted({k for r in rows.values() for k in r} - {"setting"})]
    return md_table(pd.DataFrame(list(rows.values()), columns=columns).fillna("n/a"))
