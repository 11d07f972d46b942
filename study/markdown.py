"""Numbers and tables as the report prints them: two decimals in points, signed differences, "n/a"
for a missing number (never "nan"), Markdown tables, and a contrast's row and outcome in words."""

from __future__ import annotations

import math

import pandas as pd

from .analysis import Contrast
from .stats import ALPHA


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
        rows.append(row)
    return md_table(pd.DataFrame(rows))
