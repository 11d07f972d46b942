"""The report: "why four layers?" answered from the study's tables, rendered from saved tables only.

    python -m study.report --results results                # from trials/epochs/final.csv
    python -m study.report --storage URL --out DIR          # from an Optuna storage (any worker)
    python -m study.report --results results --compare results/fashion-mnist   # plus the other dataset

The question is declared before looking: per setting (the recipe after its last epoch, each matched
budget, the tuned depths), depth 4 minus depth 3 and depth 4 minus depth 5, paired by seed, one Holm
family per dataset. Each ends better, worse, equivalent within +-margin (two one-sided tests) or
inconclusive (with the seeds that would resolve it). Every other pair is exploratory. Failed runs
(at or below twice chance, or diverged) are counted and compared, never averaged in. The statistics
live in study.stats and study.analysis, the design's own checks (claims, learning-rate choices, horizon,
seeds, caps, time) in study.design, the figures in study.figures; this module writes the document.
"""

from __future__ import annotations

from mnist_bench import cli

cli.starting(__name__)

import json
import math
import os
from pathlib import Path

import pandas as pd

from mnist_bench.errors import UsageError, UserError
from mnist_bench.files import write_file
from mnist_bench.interrupt import Interrupted
from mnist_bench.redact import redact

from . import factorial, figures
from .analysis import (
    DATASET_NAMES,
    SOURCE_DEPTH,
    UNRELIABLE_SHARE,
    Analysis,
    Setting,
    analyse,
    cost_thresholds,
    edge_warnings,
    flops_to_reach,
    groups_of,
    interactions,
    opening_sentence,
    state_counts,
)
from .config import (
    DECLARED_MARGINS,
    DEFAULT_MARGIN,
    FAILED_AT,
    PREDICTIONS_FILE,
    SOURCE_PARAMS,
    VARIANTS,
    SearchSpace,
    declared_margin,
    refuse_other_study,
)
from .design import checks, trial_counts
from .markdown import answer_sentence, contrast_table, interval, md_table, p_value, pts, setting_table, signed
from .results import load_results, read_throughput, refuse_grid_results
from .sections import (
    band_section,
    caps_lines,
    checks_section,
    claims_section,
    late_section,
    search_section,
    seed_section,
    time_section,
    tuned_origin,
)
from .stats import ALPHA, POWER, fisher

FIGURES = (
    "answer.png",
    "recipe.png",
    "claims.png",
    "matched.png",
    "lr.png",
    "tuned.png",
    "curves.png",
    "cross-dataset.png",
    "throughput.png",
    "packs.png",
)
OUTPUT_FILES = (
    "report.md",
    "report-options.json",
    *FIGURES,
)  # what render may write; proven replaceable before any work


def group_table(s: Setting) -> str:
    rows = []
    for d, g in s.groups.items():
        rows.append(
            {
                "depth": d,
                "widths": g.widths or "-",
                "parameters": f"{g.n_params:,}",
                "runs": g.runs,
                "failed": len(g.failed),
                "trained n": g.n,
                "test acc mean": pts(g.mean),
                "std": pts(g.std),
                "95% CI": interval(*g.ci, signed_values=False),
                "GFLOP per run": f"{g.train_flops / 1e9:,.1f}" if math.isfinite(g.train_flops) else "n/a",
                "seconds per run": f"{g.train_seconds:.1f}" if math.isfinite(g.train_seconds) else "n/a",
            }
        )
    return md_table(pd.DataFrame(rows))


def failure_notes(s: Setting) -> list[str]:
    """Failed runs: which, whether the depth is unreliable to train here, and its failure rate against
    every other depth's by Fisher's exact test (exploratory, uncorrected)."""
    out = []
    for d, g in s.groups.items():
        if not g.failed:
            continue
        seeds = ", ".join(f"seed {k} ({pts(v)}%)" for k, v in sorted(g.failed.items()))
        verdict = (
            f"depth {d} is unreliable to train here (at least {UNRELIABLE_SHARE:.0%} of its runs failed)"
            if g.unreliable
            else f"its statistics use the {g.n} trained runs"
        )
        by_p: dict[str, list[str]] = {}
        for e, h in s.groups.items():
            if e != d and h.runs and len(h.failed) != len(g.failed):
                by_p.setdefault(p_value(fisher(len(g.failed), g.runs, len(h.failed), h.runs)), []).append(
                    f"{e} ({len(h.failed)} of {h.runs})"
                )
        rates = "; ".join(f"p = {p} against depth {', '.join(ds)}" for p, ds in by_p.items())
        out.append(
            f"- Depth {d}: {len(g.failed)} of {g.runs} runs failed ({seeds}); {verdict}."
            + (f" Failure rate, Fisher's exact test (uncorrected): {rates}." if rates else "")
        )
    return out + [""] if out else []


def section(an: Analysis, s: Setting, title: str) -> list[str]:
    primary = [c for c in an.primary if c.setting == s.key]
    doc = [f"### {title}", "", group_table(s), ""]
    doc += failure_notes(s)
    if primary:
        doc += [
            "Primary contrasts of this setting (from the family above):",
            "",
            contrast_table(primary, with_setting=False),
            "",
        ]
    if s.secondary:
        doc += [
            "Secondary contrasts (exploratory: every other pair, deeper minus shallower, their own Holm family "
            "in this setting):",
            "",
            contrast_table(s.secondary, with_setting=False),
            "",
        ]
    return doc


# --- parts of the document -------------------------------------------------------------------------


def training_images(config: dict) -> str:
    subset = config.get("train_subset")
    return f"a {int(subset):,}-image training subset" if subset else "every training image"


def quick_banner(config: dict, out: Path) -> list[str]:
    """A study on a training subset is a check that every stage runs, not an answer; the quick study answers a
    small question of its own. Either says so first, in one line."""
    subset = config.get("train_subset")
    quick = str(config.get("name", "")).startswith("quick")
    if not subset and not quick:
        return []
    committed = Path(os.path.relpath(cli.RESULTS_DIR.resolve() / "report.md", out.resolve())).as_posix()
    ran = " and ".join(config.get("experiments", {})) or "no experiment"
    if subset:
        return [
            f"> **This is a quick check, not the answer.** The `{config.get('name')}` study ran {ran} on "
            f"{training_images(config)} with small budgets and few seeds, to show that every stage runs end to end; "
            "its numbers are "
            f"not findings. The committed answer of the full study is [`results/report.md`]({committed}).",
            "",
        ]
    r = config.get("experiments", {}).get("recipe", {})
    claimed = sorted({d for d, _, _ in r.get("claims", [])} & set(r.get("depths", [])))
    changes = " and ".join(VARIANTS.get(v, v) for v in r.get("variants", []))
    with_changes = (
        f", and with {changes} at depths {words(claimed)} ({r.get('variant_seeds')} seeds)"
        if changes and claimed
        else ""
    )
    return [
        f"> **A quick study.** It trains the text's recipe at depths {words(r.get('depths', []))} "
        f"({r.get('seeds')} seeds){with_changes}, for {r.get('epochs')} epochs on {training_images(config)}: it "
        "shows what the recipe and that change do after "
        f'{r.get("epochs")} epochs; it tunes nothing, so it does not answer "why four layers?" (the full study '
        f"does: [`results/report.md`]({committed})).",
        "",
    ]


def words(items) -> str:
    """1, 3, 4 and 5."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def progress_banner(config: dict) -> list[str]:
    """Cells below the budget the storage holds (another command is still running them, or was stopped):
    said before any number, so an incomplete table is never read as the study's answer."""
    pending = config.get("in_progress") or []
    if not pending:
        return []
    listed = "; ".join(f"{p['cell']}: {p['what']} {p['done']} of {p['budget']}" for p in pending[:12])
    more = f"; and {len(pending) - 12} more" if len(pending) > 12 else ""
    return [
        f"> **In progress.** {len(pending)} part(s) of this study are below the budget its storage holds "
        f"(another command is running them, or was stopped): {listed}{more}. The numbers below describe the runs "
        "that exist now; rerun the study command (or `python -m study.report --storage ...`) when they are done.",
        "",
    ]


def how_to_read(an: Analysis) -> list[str]:
    m = 100 * an.margin
    ns = sorted({c.n for c in an.primary if c.n})
    strictest = ALPHA / max(len(an.primary), 1)
    weak = [k for k in ns if 2 / 2**k > strictest]  # seed counts whose exact floor is above the strictest level
    floor = (
        " (its smallest possible p is "
        + " and ".join(f"{2 / 2**k:.2g} with {k} seeds" for k in ns)
        + (f"; with {' or '.join(map(str, weak))} it cannot confirm at the Holm levels" if weak else "")
        + ")"
        if ns
        else ""
    )
    return [
        "**How to read it.**",
        "",
        f"- *Margin* ±{m:.2f} points of test accuracy (`--margin`): {margin_reason(an)}.",
        "- *Paired by seed*: seed k fixes initialisation and batch order for every depth (common random numbers)"
        + (", and in the factorial design the validation hold-out too" if factorial_design(an) else "")
        + ", so each contrast takes the per-seed differences of the seeds both depths trained: n, and the "
        "correlation r of the two depths over seeds; a secondary contrast's interval is the paired t interval, a "
        "primary one's is read as below.",
        "- *Primary contrasts*: depth 4 minus 3 and depth 4 minus 5 in each setting, one Holm family. Every other "
        "pair is exploratory, in its own Holm family per setting.",
        "- *Better* or *worse*: the interval, drawn at the contrast's Holm-consistent level (the level shown), "
        "excludes 0; *better/worse by less than the margin* when it is also inside the margin.",
        f"- *Equivalent*: two one-sided tests (TOST), Holm-corrected as their own family, put the difference "
        f"inside ±{m:.2f}. Each family holds its error rate at {ALPHA}, so all claims of both kinds together at "
        f"most {2 * ALPHA:.2f}; the intervals are not simultaneous.",
        f"- *Inconclusive*: neither, with a planning number: the paired seeds that would give {POWER:.0%} power "
        f"at the family's strictest level if the true difference were ±{m:.2f} (to find it) or 0 (to show "
        "equivalence), from the spread of the seeds at hand; a true difference in between needs more.",
        "- The *Wilcoxon* signed-rank p is unadjusted, a check on direction and outliers, computed on the per-seed "
        "differences counted in whole test images (so equal differences tie exactly) by scipy with Pratt's treatment "
        f"of zero differences, exact where there are no ties or zeros, else the normal approximation{floor}.",
        f"- *Failed run*: at or below {pts(FAILED_AT)}% (twice chance) or a loss that is not finite; counted, "
        "compared with Fisher's exact test, and kept out of every mean and interval.",
        *carried(an),
        "",
    ]


def factorial_design(an: Analysis) -> bool:
    return any(c.estimate == "chosen" for c in an.primary)


def margin_reason(an: Analysis) -> str:
    declared = DECLARED_MARGINS.get(an.dataset)
    if declared is not None and math.isclose(an.margin, declared):
        return (
            "declared before the study's test results were read, a tenth of the error rate of the text's network at "
            "its own budget in the previous run: a change of depth that removes or adds fewer than one error in ten "
            "does not matter (docs/method.md)"
        )
    if math.isclose(an.margin, DEFAULT_MARGIN):
        return "the margin of the designs before the declared ones (docs/method.md)"
    return "as given with --margin, not the study's declared one"


def carried(an: Analysis) -> list[str]:
    """What the intervals carry: the primary ones from the runs' per-image predictions where the tables have them."""
    kinds = {c.estimate for c in an.primary if c.outcome != "not computed"}
    if kinds <= {"seeds"}:
        return [
            "- Intervals cover seed-to-seed variation on one fixed test set of 10,000 images (0.01 points is one "
            "image); sampling of the test set itself is not in them (these tables have no per-image predictions)."
        ]
    return [
        "- *What a primary interval carries*: the seeds and the test images, both as samples (the test set is a "
        "sample of the images the answer is about): the seeds x test-images table of per-image differences, its "
        "variance by the two-way random-effects decomposition (seeds, images, their interaction), Satterthwaite's "
        "degrees of freedom. In a factorial setting also the rate choice: each depth at its own best rate, chosen "
        "on validation again inside every bootstrap resample of the seeds; in the tuned setting the search's pick "
        "(each depth's best trial and runners-up as a random factor). Everything is recomputed from "
        f"`{PREDICTIONS_FILE}`, every final run's predicted class of each test image.",
        "- *Equivalence bound*: the smallest margin at which the two one-sided tests pass at the contrast's Holm "
        "level: the answer as a number, whatever margin a reader holds. The columns *at ±0.10* ... *at ±0.25* give "
        "each contrast's outcome had the family been decided at that margin.",
        "- Secondary contrasts and each depth's own interval cover the seeds on this one test set (0.01 points is "
        "one image).",
    ]


def cost_section(trials: pd.DataFrame, epochs: pd.DataFrame) -> list[str]:
    """FLOPs each tuned depth needed to reach a range of validation accuracies, from the first epoch at
    which any of its trials reached each one; ratios to depth 4 as a range over the thresholds."""
    thresholds = cost_thresholds(trials)
    if not thresholds:
        return []
    reach = flops_to_reach(trials, epochs, thresholds)
    if reach.empty:
        return []
    table = reach.pivot(index="depth", columns="threshold", values="flops")
    shown = pd.DataFrame({"depth": table.index})
    for th in table.columns:
        shown[f"GFLOP to {pts(th)}%"] = [f"{v / 1e9:,.0f}" if math.isfinite(v) else "not reached" for v in table[th]]
    doc = [
        "#### Cost",
        "",
        f"Fewest training FLOPs any tuning trial of each depth spent until the first epoch at which its validation "
        f"accuracy reached each threshold ({pts(thresholds[0])}% to {pts(thresholds[-1])}%, a quarter point apart, "
        "the highest half a point below the best every depth reached). A range of thresholds and each trial's "
        "whole curve, so no ratio hinges on one trial's last epoch a few images from one threshold (each cell is "
        "still one trial's curve); one search per depth, so this is descriptive.",
        "",
        md_table(shown),
        "",
    ]
    if SOURCE_DEPTH in table.index:
        parts = []
        for d in table.index:
            if d == SOURCE_DEPTH:
                continue
            ratio = (table.loc[d] / table.loc[SOURCE_DEPTH]).dropna()
            if len(ratio):
                parts.append(
                    f"depth {d} needed {ratio.min():.2f}-{ratio.max():.2f}x depth 4's FLOPs "
                    f"({len(ratio)} of {len(thresholds)} thresholds reached by both)"
                )
        if parts:
            doc += ["Against depth 4: " + "; ".join(parts) + ".", ""]
    return doc


def cross_dataset_section(out: Path, first: Analysis, second: Analysis) -> list[str]:
    """Each primary contrast's difference between two datasets' studies (the interaction), paired by seed."""
    inter = interactions(first, second)
    if not inter:
        return []
    names = [first.name, second.name]
    caption = figures.cross_dataset_figure(out / "cross-dataset.png", inter, names, first.margin)
    rows = [
        {
            "setting": x.setting,
            "contrast": f"depth {x.a} minus {x.b}",
            "n": x.n or "n/a",
            "r": f"{x.corr:.2f}" if math.isfinite(x.corr) else "n/a",
            names[0]: signed(x.diff_first),
            names[1]: signed(x.diff_second),
            "interaction": signed(x.diff),
            "interval (Holm level)": (
                f"{interval(*x.ci)} at {100 * (1 - x.level):.2f}%" if math.isfinite(x.level) else "n/a"
            ),
            "Holm p": p_value(x.p_holm),
            "TOST Holm p": p_value(x.p_equivalence_holm),
            "outcome": x.outcome if x.reason is None else f"not computed ({x.reason})",
        }
        for x in inter
    ]
    counts = {
        o: sum(x.outcome == o for x in inter) for o in ("differs", "carries over", "inconclusive", "not computed")
    }
    return [
        f"## Does the answer carry over from {names[0]} to {names[1]}?",
        "",
        f"For each primary contrast, the difference between datasets of (depth 4 minus its neighbour). Seed k "
        f"starts from the same weights and sees the same batch order on both datasets, so the two datasets' "
        f"per-seed differences are paired by seed (r below): paired t and TOST on the difference-in-differences, "
        f"one Holm family. *Differs* only when its interval excludes 0; *carries over* only when two one-sided "
        f"tests put it inside ±{100 * first.margin:.2f} points; otherwise *inconclusive*. A contrast significant "
        f"on one dataset and not on the other is not, by itself, a difference between datasets.",
        "",
        "![cross-dataset](cross-dataset.png)",
        "",
        caption,
        "",
        md_table(pd.DataFrame(rows)),
        "",
        "Of " + str(len(inter)) + " contrasts: " + ", ".join(f"{o} {k}" for o, k in counts.items() if k) + ".",
        "",
    ]


def sanity_checks(trials: pd.DataFrame, config: dict) -> list[str]:
    doc = ["## Sanity checks", ""]
    warnings, caps = edge_warnings(trials, config, SearchSpace.CAPS)
    doc += [f"- WARNING: {w}" for w in warnings] or ["- No best value sits on the edge of its search range."]
    doc += [f"- Declared cap: {c}" for c in caps]
    if not trials.empty:
        doc += [
            "",
            "Tuning trials per cell by state (failed: ran to the end at or below twice chance; diverged: "
            "NaN/inf loss; pruned: stopped by a pruner, in studies made before nothing was pruned; interrupted: "
            "killed or stopped, then redone):",
            "",
            md_table(state_counts(trials)),
        ]
    superseded = config.get("superseded_final_runs", 0)
    return doc + ["", f"Final runs of superseded configurations left out of the tables: {superseded}.", ""]


def caveats(config: dict) -> list[str]:
    doc = ["## Caveats: what was held fixed", ""]
    fixed = {
        k: config.get(k)
        for k in (
            "batch_size",
            "optimizer",
            "momentum",
            "weight_decay",
            "val_size",
            "train_subset",
            "split_seed",
            "split_per_seed",
            "tuning_seed",
            "sampler_seed",
        )
    }
    doc += [
        f"- {k}: {v}" + (" (matched and tuned; the recipe uses plain SGD)" if k == "momentum" else "")
        for k, v in fixed.items()
        if k in config
    ]
    return doc + [
        f"- schedule: {config.get('schedule', 'constant')} decay of the learning rate to zero over each run (matched "
        "and tuned; the recipe keeps the text's constant rate)",
        "- activation: ReLU; loss: cross-entropy; init: PyTorch default; inputs scaled to [0, 1] (except the "
        "recipe's standardised-inputs change), no augmentation; the shapes are the halving funnel and constant width "
        "(matched) and a tapered funnel (tuned); an answer holds for these, not for other shapes",
        "- tuning used the validation hold-out only; the test set was read only by retrained runs (and, in the "
        "recipe, where nothing is tuned, after every epoch)",
        "- cost is exact training FLOPs (forward and backward of the Linear layers, per sample, times samples seen); "
        "seconds depend on the machine and its load and are shown only beside them",
        "- the primary intervals carry the test set's sampling where the tables hold per-image predictions; every "
        "other interval is over seeds on this one test set (10,000 images)",
        "- the training images are one pool: a seed's hold-out varies which of them train, not the pool, so the "
        "answer is conditional on this dataset's 60,000 training images; and the margin, band, seeds and epochs "
        "were declared from earlier runs on the same test set (docs/method.md, what the answer is about)",
        "",
    ]


def environment(final: pd.DataFrame) -> list[str]:
    env_cols = [
        c for c in ("device", "device_name", "cpu", "gpu", "threads", "torch_version", "python_version") if c in final
    ]
    env = final[env_cols].astype(object)
    commands = sorted({redact(str(c)) for c in final["command"].dropna()}) if "command" in final else []
    return [
        "## Environment",
        "",
        md_table(env.where(env.notna(), "").drop_duplicates()),
        "",
        "Generated by `python -m study.report` from the tables in this folder; study command: "
        + ", ".join(f"`{c}`" for c in commands)
        + ".",
        "",
    ]


# --- the document ----------------------------------------------------------------------------------


OPTIONS = "report-options.json"  # beside report.md: the options it was rendered with, reused by a later render


def render(
    results: Path,
    out: Path | None = None,
    compare_with: Path | None = None,
    margin: float | None = None,
) -> Path:
    """Render report.md and the figures from the tables in `results` into `out` (default: the same
    folder); with `compare_with`, another dataset's results folder, add the cross-dataset section.
    `margin` is the equivalence margin as an accuracy fraction (0.002 = 0.2 points). A report is rendered
    again as it was: an option left out (None) is the one recorded in `out`'s report-options.json, if any,
    so a plain rerender never drops the section a --compare added. A figure or the report that cannot be
    written ends in one line; the tables are never touched."""
    out = out or results
    refuse_grid_results(results)  # before its options: the one line that matters for such a folder
    compare_with, margin = recorded_options(out, compare_with, margin)
    try:
        path, margin = _render(results, out, compare_with, margin)
        compare = None if compare_with is None else os.path.relpath(compare_with, out)
        options = {"compare": compare, "margin_points": round(100 * margin, 6)}
        write_file(out / OPTIONS, json.dumps(options, indent=1) + "\n")
        return path
    except OSError as e:
        where = e.filename or out or results
        raise UserError(f"cannot write {where} ({e.strerror or e}); the tables it comes from are kept") from None


def recorded_options(out: Path, compare_with: Path | None, margin: float | None) -> tuple[Path | None, float | None]:
    """(compare, margin): each as given, or else as recorded beside the report in `out`. An options file that
    records a --replicate folder (the run-again comparison, no longer rendered) is refused in one line."""
    path = out / OPTIONS
    recorded: dict = {}
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            recorded = None
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror or e})") from None
        if not isinstance(recorded, dict):
            raise UsageError(f"{path} is not the options file this command writes; move it aside")
    if recorded.get("replicate") is not None:
        raise UsageError(
            f"{path} records --replicate {recorded['replicate']}, a comparison this version no longer renders: remove "
            f"{path.name} (and pass --compare or --margin again if the report had them)"
        )
    reused = []
    compare = recorded.get("compare")
    if compare_with is None and compare:
        compare_with = out / str(compare)
        if not compare_with.is_dir():
            raise UsageError(
                f"{path} records --compare {compare} (relative to {out}), which is not a folder: pass --compare, "
                f"or remove {path.name} to render without it"
            )
        reused.append(f"--compare {compare_with}")
    if margin is None:  # else the one the study declares (config.json), read with the tables
        points = recorded.get("margin_points")
        valid = isinstance(points, (int, float)) and 0 < points < 100
        margin = points / 100 if valid else None
        if valid and margin != DEFAULT_MARGIN:
            reused.append(f"--margin {points:g}")
    if reused:
        print(f"as {path} records: {' '.join(reused)}")
    return compare_with, margin


def _render(
    results: Path,
    out: Path,
    compare_with: Path | None = None,
    margin: float | None = None,
) -> tuple[Path, float]:
    """Render report.md and the figures from the tables in `results` into `out` (default: the same
    folder); with `compare_with`, another dataset's results folder, add the cross-dataset section.
    `margin` is the equivalence margin as an accuracy fraction (0.002 = 0.2 points); None: the one the study
    declares in config.json (DEFAULT_MARGIN for studies that declare none). Returns (report, margin)."""
    trials, epochs, every, config = load_results(results)
    predictions = factorial.read_predictions(results / PREDICTIONS_FILE)
    final = factorial.retrained(every)  # one run per cell and seed: each factorial cell at its chosen rate
    margin = margin if margin is not None else declared_margin(config)
    other = load_results(compare_with) if compare_with is not None else None
    if out.resolve() != results.resolve():
        refuse_other_study(out, config.get("name"))
    throughput = read_throughput(results / "throughput.csv")
    out.mkdir(parents=True, exist_ok=True)

    an = analyse(epochs, every, config, margin, predictions)
    second = analyse(other[1], other[2], other[3], margin) if other is not None else None
    dataset = config.get("dataset", "mnist")
    exps = config.get("experiments", {})
    text_claims = exps.get("recipe", {}).get("claims", []) if dataset == "mnist" else []  # the text's are MNIST's

    title = "# Why four layers? A measured answer" + ("" if dataset == "mnist" else f" ({DATASET_NAMES[dataset]})")
    budget = exps.get("matched", {}).get("check_budget", SOURCE_PARAMS)
    fragile = {
        (c.base.setting, c.base.a, c.base.b): f"{c.verdict} (see the checks at {budget:,} parameters)"
        for c in checks(an, final, budget, an.margin)
        if c.verdict == "horizon-dependent"
    }
    doc = [title, ""] + quick_banner(config, out) + progress_banner(config)
    doc += [answer_sentence(an.name, an.primary, an.margin), ""]
    if an.primary:  # the first screen: the sentence, the picture, the table of settings
        pictured = [an] + ([second] if second and second.primary else [])
        doc += ["![answer](answer.png)", "", figures.answer_figure(out / "answer.png", pictured), ""]
        doc += [setting_table(an.primary), "", opening_sentence(an), ""]
    if fragile:
        doc += [
            f"{len(fragile)} of these contrasts {'changes' if len(fragile) == 1 else 'change'} under a design check, "
            + (
                "so its outcome stands only for the choice it was made with: "
                if len(fragile) == 1
                else "so their outcomes stand only for the choices they were made with: "
            )
            + "; ".join(
                f"{key[0]}, depth {key[1]} minus {key[2]}: {words.split(' (')[0]}" for key, words in fragile.items()
            )
            + ".",
            "",
        ]
    doc += how_to_read(an)
    if an.primary:
        doc += ["## The primary contrasts", "", contrast_table(an.primary, with_setting=True, notes=fragile), ""]
        wins, both = an.four_beats_both()
        doc += [
            f"Four layers is better than both three and five in {wins} of the {both} settings that have both "
            "contrasts. No depth is called best where the contrasts above do not separate it.",
            "",
        ]

    recipe = [s for s in an.settings if s.experiment == "recipe"]
    if recipe:
        r = exps.get("recipe", {})
        doc += [
            "## 1. The text's own recipe across depths",
            "",
            f"Plain SGD, lr {r.get('lr', 0.03)}, batch 64, {training_images(config)}, inputs in [0, 1], the text's "
            f"funnel {'-'.join(map(str, r.get('funnel', [])))} cut to each depth, {r.get('epochs', 10)} epochs; "
            "test accuracy after every epoch of the same runs (nothing is tuned, so reading the test set per epoch "
            "selects nothing). The earlier epoch is a check of the text's claims, not a primary setting.",
            "",
        ]
        caption = figures.recipe_figure(out / "recipe.png", recipe, text_claims)
        doc += ["![recipe](recipe.png)", "", caption, ""]
        doc += claims_section(epochs, config, out) if text_claims else []
        for s in recipe:
            doc += section(an, s, f"After {s.key.split(', ')[1]}")
    matched = [s for s in an.settings if s.experiment == "matched"]
    if matched:
        m = exps.get("matched", {})
        constant = ", ".join(f"{b:,}" for b in m.get("constant_budgets", []))
        band = m.get("band", [])
        how = (
            f" The factorial design: every cell trains every peak learning rate of one band "
            f"({', '.join(f'{x:.3g}' for x in sorted(band))}, the same for every depth) with each seed, "
            f"{m.get('seeds')} "
            f"seeds at depths 3-5 and {m.get('reference_seeds')} at the other depths (references); seed k fixes "
            "the initialisation, the batch order and the validation hold-out of every depth and rate (common "
            "random numbers, so contrasts stay paired, and the training images vary with the seed). A depth's "
            "rate is the one with the highest mean validation accuracy over its seeds; its test accuracy is read "
            "at that rate, and the primary contrasts choose again inside every resample (below)."
        )
        doc += [
            "## 2. Depth at a matched parameter budget",
            "",
            "Hidden widths that halve layer to layer (the text's 256-128-64 funnel)"
            + (
                f" and, at {constant} parameters, every hidden layer equally wide (depth 2, one hidden layer, is the "
                "same network in both)"
                if constant
                else ""
            )
            + f". No hidden layer is narrower than {m.get('min_width')} units; every model is within "
            f"{100 * m.get('tolerance', 0.02):.0f}% of its budget. SGD with momentum {config.get('momentum')}, batch "
            f"{config.get('batch_size')}, {m.get('epochs')} epochs, the learning rate decaying "
            f"{config.get('schedule', 'constant')}ly to zero over the run." + how,
            "",
        ]
        soft = analyse_softmax(final)
        caption = figures.matched_figure(out / "matched.png", matched, soft.mean if soft is not None else None)
        doc += ["![matched](matched.png)", "", caption, ""]
        if soft is not None:
            doc += [
                f"Reference: softmax regression (7,850 parameters), learning rate tuned the same way: "
                f"{pts(soft.mean)}% (trained n={soft.n}, failed {len(soft.failed)}, 95% CI "
                f"{interval(*soft.ci, signed_values=False)}).",
                "",
            ]
        doc += band_section(every, out, band, an)
        for s in matched:
            doc += section(an, s, s.key.split(", ", 1)[1])
        kept = factorial.retrained_epochs(epochs, final)  # a factorial cell's curves at its chosen rate
        doc += late_section(kept, final, an.margin, m.get("check_budget", SOURCE_PARAMS))
        doc += checks_section(an, final, m.get("check_budget", SOURCE_PARAMS))
        doc += seed_section(an, m.get("check_budget", SOURCE_PARAMS))
    tuned = an.setting("tuned")
    if tuned is not None:
        t = exps.get("tuned", {})
        space = t.get("space", {})
        doc += [
            "## 3. Each depth at its best",
            "",
            f"One search per depth over peak learning rate {space.get('lr')}, first width {space.get('width')}, "
            f"taper {space.get('taper')} and epochs 1-{space.get('max_epochs')} (the learning rate decaying to zero "
            f"over the run), each depth's TPE sampler seeded independently, nothing pruned, on the validation "
            f"hold-out, until {t.get('n_trials')} trials trained (a failed trial is replaced); the best of each depth "
            f"retrained with {t.get('seeds')} seeds.",
            "",
        ]
        counts = trial_counts(trials)
        if not counts.empty:
            short = counts[counts["trained"] < int(t.get("n_trials") or 0)]
            doc += [
                "Trials per depth: "
                + "; ".join(
                    f"depth {r.depth}: {r.trained} trained of {r.proposals} proposals ({r.failed} failed or diverged)"
                    for r in counts.itertuples()
                )
                + (
                    f". Short of {t.get('n_trials')} trained for depth {', '.join(map(str, short['depth']))}: a caveat "
                    "on its contrasts."
                    if not short.empty
                    else "."
                )
                + " A depth with more failed trials got more proposals from its search.",
                "",
            ]
        doc += caps_lines(trials, config)
        caption = figures.tuned_figure(out / "tuned.png", tuned, trials)
        doc += ["![tuned](tuned.png)", "", caption, ""] + tuned_origin(trials, config)
        doc += section(an, tuned, "Each depth tuned")
        doc += search_section(every, trials, an)
        doc += cost_section(trials, epochs)
        curves = figures.curves_figure(out / "curves.png", trials, epochs)
        if curves:
            doc += ["![curves](curves.png)", "", curves, ""]
    if second is not None:
        doc += cross_dataset_section(out, an, second)
    doc += time_section(trials, every)
    doc += sanity_checks(trials, config)
    if throughput is not None and not throughput.empty:
        doc += ["![throughput](throughput.png)", "", figures.throughput_figure(out / "throughput.png", throughput), ""]
        if (caption := figures.packs_figure(out / "packs.png", throughput)) is not None:
            doc += ["![packs](packs.png)", "", caption, ""]
    doc += caveats(config) + environment(final)
    path = out / "report.md"
    write_file(path, "\n".join(doc))  # UTF-8, whole or not at all: a reader never sees half a report
    return path, margin


def analyse_softmax(final: pd.DataFrame):
    """The matched experiment's softmax-regression reference (depth 1), or None."""
    g = groups_of(final[(final["experiment"] == "matched") & (final["depth"] == 1)]).get(1)
    return g if g is not None and g.n else None


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("python -m study.report", __doc__)
    p.add_argument(
        "--results", type=cli.path_arg, default=None, help="folder with trials/epochs/final.csv (default: results/)"
    )
    p.add_argument("--storage", default=None, help="Optuna storage URL to read the study from instead of CSVs")
    p.add_argument(
        "--study-name",
        "--name",
        dest="name",
        default=None,
        help="prefix of the study names in the storage, as study.depth's --study-name (default: the only one)",
    )
    p.add_argument(
        "--out", type=cli.path_arg, default=None, help="where to write report.md and plots (default: --results)"
    )
    p.add_argument(
        "--compare",
        type=cli.path_arg,
        default=None,
        help="results folder of the same study on another dataset: adds the cross-dataset section",
    )
    p.add_argument(
        "--margin",
        type=cli.margin_points,
        default=None,
        help="equivalence margin in points of test accuracy (default: as recorded beside the report in "
        "report-options.json, else the one the study declares: a tenth of the error rate for the factorial design, "
        f"{100 * DEFAULT_MARGIN:g} before it)",
    )
    args = p.parse_args(argv)
    if args.storage and args.results:
        p.error("give --results (saved tables) or --storage (an Optuna storage), not both")
    margin = None if args.margin is None else args.margin / 100
    try:
        if args.compare is not None and not args.compare.is_dir():
            raise UsageError(f"--compare {args.compare} is not a folder")
        if args.storage:
            path = from_storage(
                args.storage,
                args.name,
                args.out or args.results or cli.RESULTS_DIR,
                args.compare,
                margin,
            )
        else:
            results = args.results or cli.RESULTS_DIR
            if not results.is_dir():
                raise UsageError(f"--results {results} is not a folder")
            cli.prepare_out(args.out or results, files=OUTPUT_FILES)
            path = render(results, args.out, args.compare, margin)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: report.md was not rewritten (tables written so far are kept)") from None
    print(f"wrote {path}")
    return 0


def from_storage(
    url: str,
    name: str | None,
    out: Path,
    compare_with: Path | None = None,
    margin: float | None = None,
) -> Path:
    """Write the tables of study `name` (the only one when None) from the storage into `out`, then render."""
    from study import tables
    from study.coord import holdings
    from study.storage import guarded, open_storage

    cli.prepare_out(out, files=(*tables.OUTPUT_FILES, *OUTPUT_FILES))
    storage = open_storage(url, must_exist=True)

    def write() -> None:
        names = tables.study_names(storage)
        if not names:
            raise UsageError(f"storage {holdings(storage)}; nothing to report: check the --storage URL")
        if name is None and len(names) != 1:
            raise UsageError(f"storage holds studies {sorted(names) or 'none'}; pick one with --study-name")
        chosen = name or next(iter(names))
        if chosen not in names:
            raise UsageError(f"no study named {chosen!r} in the storage (found {sorted(names)})")
        refuse_other_study(out, chosen)
        tables.write_tables(storage, chosen, names[chosen], out)

    guarded(write, url)
    return render(out, compare_with=compare_with, margin=margin)


if __name__ == "__main__":
    cli.run(main)
