"""The report's statistics against published and hand-computed values, each outcome rule on synthetic
paired data, and the document rendered from synthetic tables for every subset of experiments."""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sp

from mnist_bench.errors import UsageError
from study import stats
from study.analysis import (
    Contrast,
    Group,
    analyse,
    contrast_family,
    cost_thresholds,
    edge_warnings,
    flops_to_reach,
    groups_of,
    interactions,
    opening_sentence,
)
from study.config import FAILED_AT, SearchSpace
from study.design import Check, caps_binding, checks, claims, late_gains, seed_plan, time_by_part
from study.report import render

WIDTHS = {1: "", 2: "256", 3: "256-128", 4: "256-128-64", 5: "256-128-64-32", 6: "256-128-64-32-16"}
PARAMS = {1: 7_850, 2: 203_530, 3: 235_146, 4: 242_762, 5: 244_522, 6: 244_890}

# Student's sleep data (Cushny and Peebles 1905), R's `sleep`: extra hours of sleep, two drugs, 10 patients.
SLEEP_1 = np.array([0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0])
SLEEP_2 = np.array([1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4])


# --- the statistics against reference values ----------------------------------------------------------


def test_paired_t_matches_r_on_the_sleep_data():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE): t = -4.0621, df = 9, p-value = 0.002833,
    # 95 percent confidence interval: -2.4598858 -0.7001142, mean difference -1.58.
    r = stats.paired(SLEEP_1, SLEEP_2, margin=2.0)
    assert r.n == 10 and r.mean == pytest.approx(-1.58) and r.p == pytest.approx(0.002833, abs=1e-6)
    assert stats.paired_interval(SLEEP_1, SLEEP_2, 0.05) == pytest.approx((-2.4598858, -0.7001142), abs=1e-6)


def test_tost_is_the_larger_one_sided_p_computed_by_hand():
    # TOST within +-2 on the sleep differences: the lower test is the binding one.
    d = SLEEP_1 - SLEEP_2
    se = d.std(ddof=1) / math.sqrt(len(d))
    lower = sp.t.sf((d.mean() + 2.0) / se, len(d) - 1)
    upper = sp.t.cdf((d.mean() - 2.0) / se, len(d) - 1)
    assert stats.paired(SLEEP_1, SLEEP_2, margin=2.0).p_equivalence == pytest.approx(max(lower, upper))
    assert max(lower, upper) == pytest.approx(0.1542, abs=5e-4)


def test_wilcoxon_all_differences_of_one_sign():
    # Eight distinct positive differences: the exact two-sided p is 2 / 2**8.
    x = np.arange(8) * 0.001 + 0.98
    y = x - np.arange(1, 9) * 0.0007
    assert stats.paired(x, y, 0.002).p_wilcoxon == pytest.approx(2 / 2**8)


def test_wilcoxon_counts_whole_test_images_so_float_noise_never_breaks_a_tie():
    """The committed MNIST study's 242,762-parameter depth 4 minus 3, seed by seed, in test images: as float
    fractions its tie (+6 and -6 images) was broken by rounding error (p 0.695); counted in images the p is
    scipy's on the integers (0.641)."""
    from scipy.stats import wilcoxon

    counts = np.array([4, -10, 16, -7, -9, 22, -3, 12, 6, -6])
    base = 0.98 + np.arange(10) * 0.0003
    x, y = base + counts / 10_000, base  # fractions, as the tables hold them: not exact in binary
    expected = wilcoxon(counts, zero_method="pratt", method="auto").pvalue
    assert stats.paired(x, y, 0.002).p_wilcoxon == pytest.approx(expected) == pytest.approx(0.641, abs=5e-4)
    tied = np.array([5, 5, 5, -5, 3, 3, 0, 8, -2, 5])  # ties and a zero: the sign-flip permutation, Pratt's zeros
    x = 0.97 + np.linspace(0, 0.01, 10) + tied / 10_000
    p = stats.paired(x, x - tied / 10_000, 0.002).p_wilcoxon
    assert p == pytest.approx(wilcoxon(tied, zero_method="pratt", method="auto").pvalue)
    assert stats.wilcoxon_p(np.zeros(4)) == 1.0


def test_wilcoxon_p_is_scipys_in_every_branch():
    """Ties or zeros at up to 13 seeds take scipy's exact permutation branch, computed here vectorised: the
    p-values must be scipy.stats.wilcoxon's own, to the last bit, there and in the other branches (exact
    distribution without ties; the normal approximation from 14 seeds with ties)."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(3)
    cases = [rng.integers(-4, 5, n) for n in (3, 6, 10, 13, 14, 16)]  # ties and zeros
    cases += [np.array([1, -2, 3, 4, -5, 6, 7, 8, -9, 10]), np.array([0, 0, 0, 2])]
    for counts in cases:
        expected = wilcoxon(counts.astype(float), zero_method="pratt", method="auto").pvalue
        assert stats.wilcoxon_p(counts / 10_000) == expected, counts


def test_fisher_exact_lady_tasting_tea():
    # Fisher (1935): 3 of 4 cups right either way, two-sided p = 0.4857 (R: fisher.test).
    assert stats.fisher(3, 4, 1, 4) == pytest.approx(0.4857, abs=1e-4)


def test_holm_against_a_hand_computed_example():
    # p sorted: 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, but never below the step before: 0.06)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([]) == []


def test_holm_levels_agree_with_holm_decisions():
    # 0.001 <= 0.05/4 rejected; 0.02 > 0.05/3 kept, so every later one stays at 0.05/3.
    p = [0.02, 0.001, 0.03, 0.9]
    assert stats.holm_levels(p) == pytest.approx([0.05 / 3, 0.05 / 4, 0.05 / 3, 0.05 / 3])
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = list(rng.uniform(0, 0.06, 5))
        rejected = [a <= 0.05 for a in stats.holm(p)]
        assert rejected == [pi <= lv for pi, lv in zip(p, stats.holm_levels(p))]


def test_seeds_to_resolve_matches_the_paired_power_reference():
    # pwr.t.test(d = 0.5, sig.level = 0.05, power = 0.8, type = "paired"): n = 33.367
    assert stats.TTestPower().solve_power(effect_size=0.5, alpha=0.05, power=0.8) == pytest.approx(33.367, abs=1e-3)
    n = stats.seeds_to_resolve(sd=0.004, margin=0.002, level=0.05)
    assert n >= 34 and stats.seeds_to_resolve(sd=0.001, margin=0.002, level=0.05) < n


# --- outcome rules on synthetic paired data -------------------------------------------------------------


def group(depth: int, acc, seeds=None, failed=None) -> Group:
    seeds = list(seeds or range(1, len(acc) + 1))
    return Group(depth, pd.Series(np.asarray(acc, float), index=seeds), failed or {})


def outcome(a, b, margin=0.002, **kw):
    return contrast_family([("s", a, b)], margin)[0]


SEED = np.random.default_rng(7).normal(0, 0.004, 10)  # the seed's shared effect: common random numbers


def test_better_and_worse_when_the_interval_excludes_zero():
    noise = np.random.default_rng(2).normal(0, 0.0005, 10)
    a, b = group(4, 0.98 + SEED + noise), group(3, 0.975 + SEED)
    c = outcome(a, b)
    assert c.outcome == "better" and c.ci[0] > 0 and c.corr > 0.9 and c.n == 10
    assert outcome(b, a).outcome == "worse"


def test_pairing_finds_what_an_unpaired_test_cannot():
    noise = np.random.default_rng(3).normal(0, 0.0003, 10)
    a, b = group(4, 0.9805 + SEED + noise), group(3, 0.98 + SEED)
    assert outcome(a, b).outcome == "better"
    assert sp.ttest_ind(a.accuracies, b.accuracies, equal_var=False).pvalue > 0.05


def test_equivalent_within_the_margin():
    noise = np.random.default_rng(4).normal(0, 0.0003, 10)
    c = outcome(group(4, 0.98 + SEED + noise), group(5, 0.98 + SEED))
    assert c.outcome == "equivalent" and -0.002 < c.ci_equivalence[0] < c.ci_equivalence[1] < 0.002


def test_inconclusive_says_how_many_seeds_would_resolve_it():
    noise = np.random.default_rng(5).normal(0, 0.004, 4)
    c = outcome(group(4, 0.98 + SEED[:4] + noise), group(3, 0.98 + SEED[:4]))
    assert c.outcome == "inconclusive" and c.seeds_needed > 4 and c.ci[0] < 0 < c.ci[1]


def test_a_failed_run_is_counted_not_averaged():
    final = pd.DataFrame(
        {
            "depth": [6] * 4 + [4] * 4,
            "seed": [1, 2, 3, 4] * 2,
            "test_accuracy": [0.96, 0.1135, 0.961, 0.962, 0.97, 0.971, 0.969, 0.972],
            "test_loss": [0.1, math.log(10), 0.1, 0.1] + [0.1] * 4,
            "diverged": [False] * 8,
            "n_params": 1,
            "train_flops": 1.0,
            "train_seconds": 1.0,
            "widths": "",
        }
    )
    g = groups_of(final)
    assert g[6].n == 3 and g[6].runs == 4 and g[6].failed == {2: 0.1135} and g[6].unreliable
    assert g[6].mean == pytest.approx(0.961) and 0 <= g[6].ci[0] <= g[6].ci[1] <= 1
    c = outcome(g[4], g[6])
    assert c.n == 3 and c.outcome != "not computed"


def test_a_missing_seed_pairs_only_the_seeds_both_have():
    a = group(4, [0.980, 0.981, 0.982, 0.983], seeds=[1, 2, 3, 4])
    b = group(5, [0.975, 0.977, 0.976], seeds=[1, 2, 4])
    c = outcome(a, b)
    assert c.n == 3 and c.diff == pytest.approx(np.mean([0.005, 0.004, 0.007]))


def test_a_family_never_shrinks_when_a_contrast_cannot_be_computed():
    noise = np.random.default_rng(6).normal(0, 0.0005, 10)
    a, b = group(4, 0.98 + SEED + noise), group(3, 0.9785 + SEED)
    alone = contrast_family([("s", a, b)], 0.002)[0]
    empty = Group(5, pd.Series(dtype=float), {})
    with_dead = contrast_family([("s", a, b), ("s", a, empty)], 0.002)
    assert with_dead[1].outcome == "not computed" and "no retrained runs" in with_dead[1].reason
    assert with_dead[0].p_holm == pytest.approx(min(1.0, 2 * alone.p))


def test_identical_differences_are_refused_not_given_p_zero():
    c = outcome(group(4, [0.98, 0.97, 0.96]), group(3, [0.97, 0.96, 0.95]))
    assert c.outcome == "not computed" and "no spread" in c.reason


# --- the document --------------------------------------------------------------------------------------

SPACE = {"lr": [0.001, 1.0], "width": [32, 1024], "taper": [0.25, 1.0], "max_epochs": 10, "min_width": 8}
CONFIG = {
    "name": "full",
    "batch_size": 64,
    "optimizer": "sgd",
    "momentum": 0.9,
    "split_seed": 0,
    "sampler_seed": 0,
    "experiments": {
        "recipe": {
            "depths": [1, 2, 3, 4, 5, 6],
            "funnel": [256, 128, 64, 32, 16],
            "lr": 0.03,
            "epochs": 10,
            "seeds": 8,
            "claims": [[1, 2, 0.9211], [4, 2, 0.96], [4, 10, 0.98]],
        },
        "matched": {
            "depths": [1, 2, 3, 4, 5, 6],
            "budgets": [242762],
            "band": [0.03, 0.1],
            "epochs": 10,
            "seeds": 8,
            "min_width": 8,
            "tolerance": 0.02,
        },
        "tuned": {"depths": [3, 4, 5], "n_trials": 4, "seeds": 8, "space": SPACE},
    },
}


def runs(experiment: str, means: dict[int, float], noise: float = 0.0005, n: int = 8, budget=None, seed: int = 0):
    """Final-run rows: per seed a shared offset (common random numbers) plus the depth's own noise."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 2 * noise, n)
    rows = []
    for d, m in means.items():
        for s in range(1, n + 1):
            rows.append(
                {
                    "experiment": experiment,
                    "budget": budget,
                    "depth": d,
                    "seed": s,
                    "source_trial": -1 if experiment == "recipe" else 0,
                    "test_accuracy": m + shared[s - 1] + noise * rng.standard_normal(),
                    "test_loss": 0.1,
                    "diverged": False,
                    "widths": WIDTHS[d],
                    "n_params": PARAMS[d],
                    "train_flops": 3 * PARAMS[d] * 600_000,
                    "train_seconds": 10.0 + d,
                    "samples_per_s": 1e5,
                    "param_lr": 0.03,
                    "param_epochs": 10,
                    "curve": "[]",
                    "device": "cpu",
                    "device_name": "test cpu",
                    "threads": 1,
                    "torch_version": "x",
                    "command": "synthetic",
                }
            )
    return pd.DataFrame(rows)


def study_tables(recipe_means, matched_means, tuned_means, noise=0.0005, n=8, seed=0):
    final = pd.concat(
        [
            runs("recipe", recipe_means, noise, n, seed=seed),
            runs("matched", matched_means, noise, n, 242762, seed=seed),
            runs("tuned", tuned_means, noise, n, seed=seed),
        ],
        ignore_index=True,
    )
    rec = final[final.experiment == "recipe"]
    epochs = [
        {
            "experiment": "recipe",
            "budget": None,
            "depth": r.depth,
            "run": "final",
            "trial": 0,
            "seed": r.seed,
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": None,
            "val_accuracy": None,
            "train_seconds": e,
            "test_accuracy": r.test_accuracy - (0.02 if e == 2 else 0),
        }
        for r in rec.itertuples()
        for e in range(1, 11)
    ]
    trials = []  # the tuned searches' (a matched cell tunes nothing: every rate of its band is a final run)
    for d in (3, 4, 5):
        for t, (lr, acc, state) in enumerate(
            [(0.03, 0.98, "complete"), (0.01, 0.96, "complete"), (0.002, 0.90, "pruned"), (0.9, 0.10, "diverged")]
        ):
            trials.append(
                {
                    "experiment": "tuned",
                    "budget": None,
                    "depth": d,
                    "trial": t,
                    "state": state,
                    "retrained": t == 0,
                    "param_lr": lr,
                    "param_width": 256,
                    "param_taper": 0.5,
                    "param_epochs": 3,
                    "val_accuracy": acc,
                    "best_epoch_val_accuracy": acc,
                    "n_params": PARAMS[d],
                    "train_flops": (t + 1) * d * 1e11,
                    "epochs_run": 3,
                }
            )
            epochs += [
                {
                    "experiment": "tuned",
                    "budget": trials[-1]["budget"],
                    "depth": d,
                    "run": "tuning",
                    "trial": t,
                    "seed": None,
                    "epoch": e,
                    "train_loss": 1 / e,
                    "val_loss": 1 / e,
                    "val_accuracy": acc - 0.01 * (3 - e),
                    "train_seconds": e,
                    "test_accuracy": None,
                }
                for e in (1, 2, 3)
            ]
    return pd.DataFrame(trials), pd.DataFrame(epochs), final


def write(tmp_path: Path, trials, epochs, final, config=CONFIG) -> Path:
    for name, df in (("final", final), ("trials", trials), ("epochs", epochs)):
        df.to_csv(tmp_path / f"{name}.csv", index=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


FOUR_WINS = {1: 0.92, 2: 0.96, 3: 0.97, 4: 0.98, 5: 0.975, 6: 0.96}
TUNED = {3: 0.97, 4: 0.98, 5: 0.975}


def test_opening_sentence_is_computed_and_short():
    trials, epochs, final = study_tables(FOUR_WINS, FOUR_WINS, TUNED)
    an = analyse(epochs, final, CONFIG)
    text = opening_sentence(an)
    assert len(text.split()) <= 40
    assert "6 better" in text and "beats both three and five in every one of 3 settings" in text
    tie = {d: 0.98 for d in range(1, 7)}
    an = analyse(*study_tables(tie, tie, {3: 0.98, 4: 0.98, 5: 0.98}, noise=0.0002)[1:], CONFIG)
    assert "equivalent" in opening_sentence(an) and "in none of 3 settings" in opening_sentence(an)
    assert all(c.p_equivalence_holm <= 0.05 for c in an.primary)  # within the margin, whatever else holds


def test_primary_family_holds_exactly_the_declared_contrasts():
    an = analyse(*study_tables(FOUR_WINS, FOUR_WINS, TUNED)[1:], CONFIG)
    assert [(c.setting, c.a, c.b) for c in an.primary] == [
        (s, 4, n) for s in ("recipe, 10 epochs", "matched, 242,762 parameters", "tuned") for n in (3, 5)
    ]
    two = an.setting("recipe, 2 epochs")
    assert two is not None and not two.primary and len(two.secondary) == 15  # a check, not a primary setting
    assert len(an.setting("tuned").secondary) == 1  # 5 minus 3


def test_renders_every_experiment_with_the_answer_first(tmp_path: Path):
    path = render(write(tmp_path, *study_tables(FOUR_WINS, FOUR_WINS, TUNED)))
    text = path.read_text()
    lines = [x for x in text.splitlines() if x]
    assert lines[0].startswith("# Why four layers?") and lines[1].startswith("On MNIST, four layers beats three in")
    assert lines[2] == "![answer](answer.png)"
    assert lines[4].startswith("| setting | depth 4 minus 3 | depth 4 minus 5 |")  # the first screen's table
    assert lines.index("**How to read it.**") > lines.index("![answer](answer.png)")
    for png in ("answer.png", "recipe.png", "matched.png", "tuned.png", "curves.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and f"({png})" in text
    assert (
        "| depth 4, 10 epochs: 98.00% | 97.50% | none (the recipe) | 10 | 8 | 98.05 |" in text and "| reached |" in text
    )
    assert "*Margin* ±0.17 points" in text and (tmp_path / "claims.png").stat().st_size > 10_000
    assert "verdict, read as printed" in text  # a rounded reading never decides a claim unseen
    assert "indistinguishable" not in text and "| nan" not in text and "nan%" not in text
    assert "momentum: 0.9" in text and "Against depth 4: depth 3 needed" in text


@pytest.mark.parametrize("experiments", [["recipe"], ["matched"], ["tuned"], ["recipe", "tuned"]])
def test_every_subset_of_experiments_renders(tmp_path: Path, experiments):
    trials, epochs, final = study_tables(FOUR_WINS, FOUR_WINS, TUNED)
    config = {**CONFIG, "experiments": {k: v for k, v in CONFIG["experiments"].items() if k in experiments}}
    keep = lambda df: df[df["experiment"].isin(experiments)]  # noqa: E731
    text = render(write(tmp_path, keep(trials), keep(epochs), keep(final), config)).read_text()
    assert text.startswith("# Why four layers?") and "Traceback" not in text
    assert ("## 3. Each depth at its best" in text) == ("tuned" in experiments)


def test_a_failed_run_is_shown_and_no_interval_leaves_0_100(tmp_path: Path):
    trials, epochs, final = study_tables(FOUR_WINS, FOUR_WINS, TUNED)
    dead = (final.experiment == "matched") & (final.depth == 6) & (final.seed == 3)
    final.loc[dead, ["test_accuracy", "test_loss"]] = [0.1135, math.log(10)]
    text = render(write(tmp_path, trials, epochs, final)).read_text()
    assert "| 6 | 256-128-64-32-16 | 244,890 | 8 | 1 | 7 |" in text
    assert "Depth 6: 1 of 8 runs failed (seed 3 (11.35%)); its statistics use the 7 trained runs" in text
    assert not re.search(r"\b1\d\d\.\d\d\b", text)  # no percentage above 100 anywhere
    cis = re.findall(r"\| \[(\d+\.\d+), (\d+\.\d+)\] \|", text)
    assert cis and all(0 <= float(lo) <= float(hi) <= 100 for lo, hi in cis)


def test_a_tuning_trial_at_chance_is_failed_not_complete():
    from optuna.trial import TrialState, create_trial

    from study.tables import trial_state

    at_chance = create_trial(state=TrialState.COMPLETE, value=0.1135, user_attrs={})
    fine = create_trial(state=TrialState.COMPLETE, value=0.97, user_attrs={})
    killed = create_trial(state=TrialState.FAIL, user_attrs={})
    assert [trial_state(t) for t in (at_chance, fine, killed)] == ["failed", "complete", "interrupted"]
    assert FAILED_AT == pytest.approx(0.2)


def test_the_quick_check_says_so_first(tmp_path: Path):
    config = {**CONFIG, "name": "quick", "train_subset": 5000}
    text = render(write(tmp_path, *study_tables(FOUR_WINS, FOUR_WINS, TUNED), config)).read_text()
    second = [x for x in text.splitlines() if x][1]
    assert second.startswith("> **This is a quick check, not the answer.**") and "results/report.md" in second


def test_cross_dataset_is_judged_by_the_interaction_paired_by_seed():
    _, epochs, final = study_tables(FOUR_WINS, FOUR_WINS, TUNED)
    same = analyse(epochs, final, {**CONFIG, "dataset": "mnist"})
    # The same runs 10 points lower, each seed moved by its own 0.01 points: the same depth effects.
    jitter = np.random.default_rng(1).normal(0, 1e-4, len(final))
    lower = final.assign(test_accuracy=final.test_accuracy - 0.1 + jitter)
    result = interactions(same, analyse(epochs, lower, {**CONFIG, "dataset": "fashion-mnist"}))
    assert len(result) == 6 and all(x.n == 8 for x in result)
    assert {x.outcome for x in result} == {"carries over"}
    # The same numbers on both sides (two runs of one computation): named as such, not "no spread".
    twins = interactions(same, same)
    assert {x.outcome for x in twins} == {"not computed"} and all("identical seed for seed" in x.reason for x in twins)
    flipped = {1: 0.82, 2: 0.86, 3: 0.89, 4: 0.88, 5: 0.895, 6: 0.86}  # depth 4 now worse than both
    result = interactions(
        same,
        analyse(
            *study_tables(flipped, flipped, {3: 0.89, 4: 0.88, 5: 0.895}, seed=1)[1:],
            {**CONFIG, "dataset": "fashion-mnist"},
        ),
    )
    assert all(x.outcome == "differs" for x in result)
    x = result[0]  # recipe, depth 4 minus 3: +1 point on one, -1 on the other
    assert x.diff == pytest.approx(x.diff_first - x.diff_second) and x.ci[0] > 0


def test_cost_ranges_over_thresholds_from_each_trials_curve():
    trials, epochs, _ = study_tables(FOUR_WINS, FOUR_WINS, TUNED)
    ths = cost_thresholds(trials)
    assert len(ths) == 5 and ths[-1] <= 0.98 - 0.005
    reach = flops_to_reach(trials, epochs, [0.97])
    # trial 0 of depth d reaches 0.97 at epoch 2 of 3: two thirds of its FLOPs (d * 1e11)
    assert reach.set_index("depth")["flops"].to_dict() == pytest.approx({d: d * 1e11 * 2 / 3 for d in (3, 4, 5)})


def test_edge_warnings_and_declared_caps():
    trials = study_tables({4: 0.98}, {4: 0.98}, {4: 0.98})[0]
    assert edge_warnings(trials, CONFIG, SearchSpace.CAPS) == ([], [])
    low = trials.assign(param_lr=np.where(trials.retrained, 0.0011, trials.param_lr))
    warnings, caps = edge_warnings(low, CONFIG, SearchSpace.CAPS)
    assert len(warnings) == 3 and all("lower edge" in w and "lr" in w for w in warnings)
    capped = trials.assign(param_epochs=10, param_width=1024)
    warnings, caps = edge_warnings(capped[capped.experiment == "tuned"], CONFIG, SearchSpace.CAPS)
    assert warnings == [] and len(caps) == 6 and any("cost cap" in c for c in caps)


def test_missing_tables_is_a_usage_error(tmp_path: Path):
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "study.report", "--results", str(tmp_path)], capture_output=True, text=True
    )
    assert p.returncode == 2 and "trials.csv" in p.stderr and "Traceback" not in p.stderr


# --- the design's checks ------------------------------------------------------------------------------


def curve_rows(experiment, variant, depth, seed, accs, test=None, budget=None, shape="funnel"):
    return [
        {
            "experiment": experiment,
            "budget": budget,
            "shape": shape,
            "variant": variant,
            "depth": depth,
            "run": "final",
            "trial": 100 * depth + seed,
            "seed": seed,
            "epoch": e,
            "val_accuracy": a,
            "test_accuracy": a if test is None else test,
        }
        for e, a in enumerate(accs, 1)
    ]


def test_claims_are_read_at_the_claimed_epoch_twice_it_for_twice_the_epochs_with_a_t_interval():
    config = {"experiments": {"recipe": {"claims": [[4, 2, 0.96]], "variants": ["momentum", "twice"]}}}
    rows = []
    for seed, jitter in enumerate([0.0, 0.002, -0.002, 0.001, -0.001], 1):
        rows += curve_rows("recipe", "", 4, seed, [0.90 + jitter, 0.95 + jitter])
        rows += curve_rows("recipe", "momentum", 4, seed, [0.96 + jitter, 0.97 + jitter])
        rows += curve_rows("recipe", "twice", 4, seed, [0.90, 0.95, 0.955, 0.958 + jitter])
    table = claims(pd.DataFrame(rows), config).set_index("variant")
    assert list(table["epoch"]) == [2, 2, 4]
    base = table.loc[""]
    lo, hi = sp.t.interval(0.95, 4, loc=0.95, scale=sp.sem([0.95, 0.952, 0.948, 0.951, 0.949]))
    assert base["mean"] == pytest.approx(0.95) and (base["lo"], base["hi"]) == pytest.approx((lo, hi))
    # 96% is a rounded claim: reached from 95.5% on
    assert base["verdict"] == "not reached" and table.loc["momentum", "verdict"] == "reached"
    assert table.loc["twice", "verdict"] == "reached" and table.loc["twice", "change"] == "twice the epochs"
    assert base["share_at"] == 0 and table.loc["twice", "share_at"] == 1
    exact = claims(pd.DataFrame(rows), {"experiments": {"recipe": {"claims": [[4, 2, 0.9591]], "variants": []}}})
    assert exact["bar"].iloc[0] == 0.9591  # stated to the hundredth: read exactly


def test_late_gain_is_the_mean_last_three_epoch_gain_of_each_matched_cell():
    rows = curve_rows("matched", "", 4, 1, [0.9, 0.95, 0.96, 0.97, 0.975], budget=242762)
    rows += curve_rows("matched", "", 4, 2, [0.9, 0.95, 0.96, 0.965, 0.968], budget=242762)
    rows += curve_rows("matched", "horizon", 4, 1, [0.5] * 5, budget=242762)  # a check: not a declared cell
    gains = late_gains(pd.DataFrame(rows))
    assert len(gains) == 1 and gains["gain"].iloc[0] == pytest.approx(((0.975 - 0.95) + (0.968 - 0.95)) / 2)


def _contrast(outcome, n=8, sd=0.001):
    return Contrast("s", 4, 3, outcome, n=n, sd=sd)


def _change(outcome):
    from study.analysis import Interaction

    return Interaction("horizon", 4, 3, outcome, n=6, sd=0.001, strictest=0.0125)


@pytest.mark.parametrize(
    "check, base, changed, change, verdict",
    [
        ("horizon", "better", "better", "carries over", "holds"),
        ("horizon", "better", "worse", "inconclusive", "horizon-dependent"),  # the direction flips
        ("horizon", "equivalent", "better", "differs", "horizon-dependent"),
        ("horizon", "worse", "inconclusive", "inconclusive", "unresolved"),
        ("horizon", "inconclusive", "better", "differs", "uninformative (the primary contrast is undecided)"),
    ],
)
def test_a_check_verdict_rests_on_the_tested_change_not_on_two_significance_results(
    check, base, changed, change, verdict
):
    assert Check(check, _contrast(base), _contrast(changed, n=6), _change(change)).verdict == verdict


def test_checks_test_the_per_seed_change_of_each_primary_contrast():
    trials, epochs, final = study_tables(FOUR_WINS, FOUR_WINS, TUNED)
    base = final[(final.experiment == "matched")].set_index(["depth", "seed"])["test_accuracy"]
    rows = runs("matched", {3: 0.985, 4: 0.98, 5: 0.975}, n=6, budget=242762, seed=3).assign(variant="horizon")
    noise = np.random.default_rng(7).normal(0, 0.0002, len(rows))
    # 4 minus 5 keeps its per-seed differences (plus a little noise); 4 minus 3 drops by 1.5 points
    rows["test_accuracy"] = [base[(d, s)] + (0.015 if d == 3 else 0) for d, s in zip(rows.depth, rows.seed)] + noise
    final = pd.concat([final.assign(variant=""), rows], ignore_index=True)
    an = analyse(epochs, final, CONFIG)
    found = checks(an, final, 242762, an.margin)
    assert [(c.check, c.base.b, c.change.n) for c in found] == [("horizon", 3, 6), ("horizon", 5, 6)]
    minus3, minus5 = found
    assert minus3.base.outcome == "better" and minus3.change.diff == pytest.approx(-0.015, abs=0.0005)
    assert minus3.verdict == "horizon-dependent" and minus3.change.outcome == "differs"
    assert abs(minus5.change.diff) < 0.0005 and minus5.verdict == "holds"  # inside the margin by TOST


def test_detectable_difference_matches_statsmodels():
    from statsmodels.stats.power import TTestPower

    d = stats.detectable(0.0015, 6, 0.0125)
    power = TTestPower().power(effect_size=d / 0.0015, nobs=6, alpha=0.0125, alternative="two-sided")
    assert power == pytest.approx(0.8, abs=1e-6)


def test_the_seed_plan_uses_the_largest_spread_at_the_budget_and_the_strictest_holm_level():
    trials, epochs, final = study_tables(FOUR_WINS, FOUR_WINS, TUNED)
    an = analyse(epochs, final, CONFIG)
    plan = seed_plan(an, 242762)
    at = [c for c in an.primary if c.setting == "matched, 242,762 parameters"]
    assert plan.sd == max(c.sd for c in at) and plan.level == pytest.approx(0.05 / len(an.primary))
    assert plan.needed == stats.seeds_to_resolve(plan.sd, an.margin, plan.level) and plan.used == 8


def test_time_by_part_sums_training_seconds_and_caps_binding_names_depths():
    trials, epochs, final = study_tables(FOUR_WINS, FOUR_WINS, TUNED)
    t = time_by_part(trials.assign(train_seconds=1.0), final).set_index("part")
    assert t.loc["tuned, retraining", "seconds"] == sum(10.0 + d for d in (3, 4, 5)) * 8
    assert t.loc["matched, retraining", "runs"] == 6 * 8 and t["share"].sum() == pytest.approx(1)
    space = {"width": [32, 1024], "max_epochs": 15}
    config = {"experiments": {"tuned": {"space": space}}}
    best = pd.DataFrame(
        {
            "experiment": "tuned",
            "depth": [3, 4, 5],
            "retrained": True,
            "param_width": [1000, 200, 1024],
            "param_epochs": [15, 15, 15],
        }
    )
    assert caps_binding(best, config) == {"width": [3, 5], "epochs": [3, 4, 5]}


def test_resolving_power_agrees_with_the_planning_number():
    sd, margin, level = 0.00125, 0.002, 0.05 / 12
    n = stats.seeds_to_resolve(sd, margin, level)
    differ, equal = stats.resolving_power(sd, n, margin, level)
    assert differ >= 0.8 and equal >= 0.8
    assert min(stats.resolving_power(sd, n - 1, margin, level)) < 0.8  # the smallest such n
    from statsmodels.stats.power import TTestPower

    assert differ == pytest.approx(TTestPower().power(effect_size=margin / sd, nobs=n, alpha=level))


def test_horizon_gain_pairs_each_seed_at_twice_the_epochs_with_itself():
    from study.design import horizon_gains

    short = runs("matched", {3: 0.980, 4: 0.981}, n=4, budget=242762).assign(variant="", shape="funnel")
    long = short.assign(variant="horizon", test_accuracy=short.test_accuracy + [0.001, 0.002, 0.003, 0.002] * 2)
    other = short.assign(shape="constant", test_accuracy=0.5)  # another shape: not part of the check
    gains = horizon_gains(pd.concat([short, long, other], ignore_index=True), 242762).set_index("depth")
    assert list(gains.index) == [3, 4] and gains.loc[3, "n"] == 4
    assert gains.loc[4, "mean"] == pytest.approx(0.002)
    lo, hi = sp.t.interval(0.95, 3, loc=0.002, scale=sp.sem([0.001, 0.002, 0.003, 0.002]))
    assert (gains.loc[4, "lo"], gains.loc[4, "hi"]) == pytest.approx((lo, hi))


def test_t_power_falls_back_to_scipy_where_statsmodels_gives_nan():
    from statsmodels.stats.power import TTestPower

    for effect in (2.0, 10.0):
        for alternative in ("two-sided", "larger"):
            power = stats.t_power(effect, 8, 0.05 / 6, alternative)
            reference = TTestPower().power(effect_size=effect, nobs=8, alpha=0.05 / 6, alternative=alternative)
            assert 0 < power <= 1 and (math.isnan(reference) or power == pytest.approx(reference))
    assert stats.t_power(10.0, 8, 0.05 / 6, "two-sided") == pytest.approx(1.0)


def test_trial_counts_separate_failures():
    from study.design import trial_counts

    tuned = pd.DataFrame(
        {"experiment": "tuned", "depth": [3, 3, 3, 3], "state": ["complete", "failed", "diverged", "interrupted"]}
    )
    assert trial_counts(tuned).to_dict("records") == [{"depth": 3, "trained": 1, "proposals": 3, "failed": 2}]


def test_the_workers_a_study_ran_with_are_the_most_runs_training_at_once():
    from study.design import most_at_once

    runs = pd.DataFrame(
        {
            "started": ["2026-01-01T10:00:00+00:00", "2026-01-01T10:00:30+00:00", "2026-01-01T10:01:00+00:00"],
            "finished": ["2026-01-01T10:01:00+00:00", "2026-01-01T10:02:00+00:00", "2026-01-01T10:03:00+00:00"],
        }
    )
    assert most_at_once(runs, runs.iloc[:0]) == 2  # one ends at 10:01 as the third starts: never three
    assert most_at_once(runs, runs) == 4


def test_the_answer_sentence_names_its_settings_and_the_table_has_one_row_per_setting():
    from study.analysis import Contrast
    from study.markdown import answer_sentence, setting_table

    eq = dict(outcome="equivalent", n=10, diff=0.0002, ci=(-0.001, 0.0015), ci_equivalence=(-0.0007, 0.0011))
    bound = {"tuned": (0.0011, 0.0014), "constant width": (0.0009, math.nan)}  # the equivalence bound of 4-3, 4-5
    contrasts = [
        Contrast("recipe, 10 epochs", 4, 3, "better", 10, 0.0028, ci=(0.0002, 0.0053)),
        Contrast("recipe, 10 epochs", 4, 5, "inconclusive", 10, 0.0004, ci=(-0.004, 0.005), seeds_needed=59),
        Contrast("tuned", 4, 3, **eq, bound=bound["tuned"][0]),
        Contrast("tuned", 4, 5, **eq, bound=bound["tuned"][1]),
        Contrast("constant width", 4, 3, **eq, bound=bound["constant width"][0]),
        Contrast("constant width", 4, 5, "worse", 10, -0.003, ci=(-0.005, -0.001)),
    ]
    text = answer_sentence("MNIST", contrasts, 0.002)
    assert text == (
        "On MNIST, four layers is within ±0.11 points of three in tuned / constant width and within ±0.14 points "
        "of five in tuned; it beats three in recipe, 10 epochs (+0.28 points, interval +0.02 to +0.53); it trails "
        "five in constant width (-0.30 points, interval -0.50 to -0.10); against five in recipe, 10 epochs it is "
        "undecided (at a margin of ±0.20 points)."
    )  # the largest bound among the settings where four is equivalent to that neighbour: a number, not a label
    no_bound = [dataclasses.replace(c, bound=math.nan) for c in contrasts]
    assert "within the margin of three in tuned / constant width" in answer_sentence("MNIST", no_bound, 0.002)
    undecided = [Contrast("tuned", 4, b, "inconclusive", 6, 0.001, ci=(-0.002, 0.004), seeds_needed=30) for b in (3, 5)]
    assert "all 2 are undecided" in answer_sentence("Fashion-MNIST", undecided, 0.002)
    table = setting_table(contrasts).splitlines()
    assert table[0] == "| setting | depth 4 minus 3 | depth 4 minus 5 |" and len(table) == 2 + 3
    assert (
        "| constant width | +0.02 [-0.10, +0.15]: equivalent within the margin (TOST [-0.07, +0.11]); bound ±0.09 | "
        "-0.30 [-0.50, -0.10]: worse |" in table
    )


def test_a_plain_rerender_is_the_report_as_it_was_rendered(tmp_path: Path, capsys):
    """The options a report was rendered with (--compare, --margin) are recorded beside it and
    reused when they are left out, so `python -m study.report` on a committed folder never drops sections."""
    trials, epochs, final = study_tables(FOUR_WINS, FOUR_WINS, TUNED)
    for name in "af":
        (tmp_path / name).mkdir()
    first = write(tmp_path / "a", trials, epochs, final)
    fashion = write(tmp_path / "f", trials, epochs, final.assign(test_accuracy=final.test_accuracy - 0.01),
                    {**CONFIG, "dataset": "fashion-mnist"})  # fmt: skip
    full = render(first, compare_with=fashion, margin=0.003).read_text()
    assert "## Does the answer carry over" in full and "±0.30 points" in full
    assert json.loads((first / "report-options.json").read_text()) == {"compare": "../f", "margin_points": 0.3}
    capsys.readouterr()
    assert render(first).read_text() == full  # nothing given: as recorded
    said = capsys.readouterr().out
    assert "--compare" in said and "--margin 0.3" in said
    assert "±0.20 points" in render(first, margin=0.002).read_text()  # given: as given, and recorded
    shutil.rmtree(fashion)
    with pytest.raises(UsageError, match="records --compare ../f .* which is not a folder"):
        render(first)


def test_an_options_file_that_records_a_replicate_is_refused_unless_it_is_empty(tmp_path: Path):
    """The run-again comparison (--replicate) is gone: an options file recording none renders as before; one
    recording a folder is refused in one line that says to remove the file, never rendered without a section."""
    first = write(tmp_path, *study_tables(FOUR_WINS, FOUR_WINS, TUNED))
    options = tmp_path / "report-options.json"
    options.write_text(json.dumps({"compare": None, "replicate": None, "margin_points": 0.3}))
    assert "±0.30 points" in render(first).read_text()
    assert json.loads(options.read_text()) == {"compare": None, "margin_points": 0.3}  # the key is not written again
    options.write_text(json.dumps({"compare": None, "replicate": "replicate", "margin_points": 0.3}))
    with pytest.raises(UsageError, match="records --replicate replicate, .*no longer renders: remove report-options"):
        render(first)


def test_the_planning_number_survives_a_spread_too_small_for_the_solver():
    """statsmodels' root finder returns nan (with a warning) for a huge effect; the same power function,
    searched directly, gives the smallest n, and the report never crashes on it."""
    import warnings

    from statsmodels.stats.power import TTestPower

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning escapes
        n = stats.seeds_to_resolve(1e-9, 0.002, 0.0045)
    assert n == 2
    for effect, level in ((0.5, 0.0045), (2.0, 0.05), (0.1, 0.01)):  # where the solver converges, it decides
        solved = TTestPower().solve_power(effect_size=effect, alpha=level, power=0.8, alternative="two-sided")
        assert stats.seeds_for(effect, level, 0.8, "two-sided") == math.ceil(solved)
