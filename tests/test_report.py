"""The report renders from small synthetic tables, and says exactly what they support: a clear
winner, a tie, an underpowered design, and refusals where nothing can be compared."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study.report import (ALPHA, compare, edge_warnings, groups_of, holm, holm_levels, opening, render, verdict,
                          welch, families)

WIDTHS = {1: "", 2: "256", 3: "256-128", 4: "256-128-64", 5: "256-128-64-32", 6: "256-128-64-32-16"}
PARAMS = {1: 7_850, 2: 203_530, 3: 235_146, 4: 242_762, 5: 244_522, 6: 244_890}


def runs(experiment: str, means: dict[int, float], noise: float = 0.0005, n: int = 8, budget=None, seed: int = 0):
    """Final-run rows with exactly the given means and standard deviation `noise`."""
    rng = np.random.default_rng(seed)
    rows = []
    for d, m in means.items():
        offsets = rng.standard_normal(n)
        offsets = (offsets - offsets.mean()) / offsets.std(ddof=1) if n > 1 else np.zeros(1)
        for s, o in enumerate(offsets, 1):
            rows.append({"experiment": experiment, "budget": budget, "depth": d, "seed": s,
                         "source_trial": -1 if experiment == "recipe" else 0, "test_accuracy": m + noise * o,
                         "test_loss": 0.1, "diverged": False, "widths": WIDTHS[d], "n_params": PARAMS[d],
                         "train_flops": 3 * PARAMS[d] * 600_000, "train_seconds": 10.0 + d, "samples_per_s": 1e5,
                         "param_lr": 0.03, "param_epochs": 10, "curve": "[]", "device": "cpu",
                         "device_name": "test cpu", "threads": 1, "torch_version": "x", "command": "synthetic"})
    return pd.DataFrame(rows)


def family_of(means, depths=None, **kw):
    final = runs("tuned", means, **kw)
    groups = groups_of(final, depths)
    comparisons = compare(groups)
    return groups, comparisons, verdict(groups, comparisons)


# --- statistics ------------------------------------------------------------------------------------


def test_welch_matches_scipy():
    from scipy import stats
    a, b = np.array([0.97, 0.971, 0.969, 0.972]), np.array([0.975, 0.978, 0.974, 0.977, 0.976])
    diff, lo, hi, p, se, df = welch(a, b)
    assert diff == pytest.approx(b.mean() - a.mean())
    assert p == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue)
    assert lo < diff < hi and lo > 0
    with pytest.raises(ValueError):
        welch(np.array([0.5, 0.5]), np.array([0.6, 0.6]))


def test_holm_against_a_hand_computed_example():
    # p sorted: 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, but never below the step before: 0.06)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_levels([0.01, 0.04, 0.03]) == pytest.approx([0.05 / 3, 0.05 / 1, 0.05 / 2])
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_clear_winner():
    groups, comparisons, v = family_of({3: 0.970, 4: 0.980, 5: 0.975})
    assert v.best == 4 and v.not_worse == (4,) and v.four == {3: "better", 5: "better"}
    assert all(c.detectable for c in comparisons)


def test_tie_is_not_broken_and_says_what_it_could_detect():
    groups, comparisons, v = family_of({3: 0.9800, 4: 0.9798, 5: 0.9796}, noise=0.002)
    assert v.not_worse == (3, 4, 5) and v.four == {3: "indistinguishable", 5: "indistinguishable"}
    assert all(not c.detectable and 0 < c.detectable_size < 0.01 for c in comparisons)


def test_underpowered_design_reports_a_large_detectable_difference():
    groups, comparisons, v = family_of({3: 0.970, 4: 0.980}, noise=0.01, n=2)
    assert not comparisons[0].detectable and comparisons[0].detectable_size > 0.05
    assert v.four == {3: "indistinguishable"}


def test_holm_makes_a_marginal_difference_undetectable():
    # Two marginal pairs (3-4, 4-5) would each pass at 0.05 alone; Holm multiplies the smaller by 2.
    g, comparisons, v = family_of({3: 0.9700, 4: 0.9717, 5: 0.9734}, noise=0.0015)
    c = next(c for c in comparisons if (c.a, c.b) == (3, 4))
    assert c.p_value < ALPHA < c.p_holm and not c.detectable


# --- refusals -------------------------------------------------------------------------------------


def test_one_seed_per_depth_is_not_a_tie():
    _, comparisons, v = family_of({3: 0.970, 4: 0.980, 5: 0.975}, n=1)
    assert v.best is None and "depth 3: only 1 retrained seed" in v.refused
    assert all(c.reason and not c.detectable for c in comparisons)


def test_a_single_depth_is_not_better_than_anything():
    _, _, v = family_of({4: 0.98})
    assert v.best is None and "only depth 4" in v.refused


def test_a_diverged_seed_refuses_instead_of_nan():
    final = runs("tuned", {3: 0.970, 4: 0.980})
    final.loc[(final.depth == 3) & (final.seed == 2), ["test_accuracy", "diverged"]] = [np.nan, True]
    groups = groups_of(final)
    v = verdict(groups, compare(groups))
    assert v.best is None and "depth 3: 1 of 8 retrained seeds diverged" in v.refused


def test_identical_accuracies_give_no_p_value_of_zero():
    _, comparisons, v = family_of({3: 0.970, 4: 0.980}, noise=0.0)
    assert comparisons[0].reason and "no spread" in v.refused


def test_a_depth_missing_from_the_final_runs_is_named():
    _, _, v = family_of({3: 0.970, 4: 0.980}, depths=[3, 4, 5])
    assert v.best is None and "depth 5: no retrained runs yet" in v.refused


# --- the document ----------------------------------------------------------------------------------

SPACE = {"lr": [0.001, 1.0], "width": [32, 1024], "taper": [0.25, 1.0], "max_epochs": 10, "min_width": 8}
CONFIG = {"batch_size": 64, "optimizer": "sgd", "momentum": 0.9, "split_seed": 0, "sampler_seed": 0,
          "experiments": {
              "recipe": {"depths": [1, 2, 3, 4, 5, 6], "funnel": [256, 128, 64, 32, 16], "lr": 0.03, "epochs": 10,
                         "seeds": 8, "claims": [[1, 2, 0.9211], [4, 2, 0.96], [4, 10, 0.98]]},
              "matched": {"depths": [1, 2, 3, 4, 5, 6], "budgets": [242762], "lr": [0.001, 1.0], "lr_points": 7,
                          "epochs": 10, "seeds": 8, "min_width": 8, "tolerance": 0.02},
              "tuned": {"depths": [3, 4, 5], "n_trials": 4, "seeds": 8, "space": SPACE}}}


def study_tables(recipe_means, matched_means, tuned_means, noise=0.0005, n=8):
    final = pd.concat([runs("recipe", recipe_means, noise, n), runs("matched", matched_means, noise, n, 242762),
                       runs("tuned", tuned_means, noise, n)], ignore_index=True)
    rec = final[final.experiment == "recipe"]
    epochs = pd.DataFrame([{"experiment": "recipe", "budget": None, "depth": r.depth, "run": "final", "trial": 0,
                            "seed": r.seed, "epoch": e, "train_loss": 1 / e, "val_loss": None, "val_accuracy": None,
                            "train_seconds": e, "test_accuracy": r.test_accuracy - (0.02 if e == 2 else 0)}
                           for r in rec.itertuples() for e in range(1, 11)])
    trials = []
    for exp, depths in (("matched", [1, 2, 3, 4, 5, 6]), ("tuned", [3, 4, 5])):
        for d in depths:
            for t, (lr, acc, state) in enumerate([(0.03, 0.98, "complete"), (0.01, 0.96, "complete"),
                                                  (0.002, 0.90, "pruned"), (0.9, 0.10, "diverged")]):
                trials.append({"experiment": exp, "budget": 242762 if exp == "matched" and d > 1 else None,
                               "depth": d, "trial": t, "state": state, "retrained": t == 0, "param_lr": lr,
                               "param_width": 256, "param_taper": 0.5, "param_epochs": 3, "val_accuracy": acc,
                               "n_params": PARAMS[d], "train_flops": (t + 1) * d * 1e11, "epochs_run": 3})
    return pd.DataFrame(trials), epochs, final


def write(tmp_path: Path, trials, epochs, final, config=CONFIG) -> Path:
    for name, df in (("final", final), ("trials", trials), ("epochs", epochs)):
        df.to_csv(tmp_path / f"{name}.csv", index=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def opening_of(trials, epochs, final, config=CONFIG) -> str:
    recipe, matched, tuned = families(trials, epochs, final, config)
    return opening(recipe, matched, tuned, None)


def test_opening_paragraph_clear_winner():
    four_wins = {1: 0.92, 2: 0.96, 3: 0.97, 4: 0.98, 5: 0.975, 6: 0.96}
    text = opening_of(*study_tables(four_wins, four_wins, {3: 0.97, 4: 0.98, 5: 0.975}))
    assert "depth 4 has the highest mean (98.00%, n=8); every other depth is detectably worse" in text
    assert "depth 4 beats depth 3 (+1.00 points) and beats depth 5 (+0.50 points)" in text
    assert "in 3 of the 3 settings" in text and "do not single out" not in text


def test_opening_paragraph_tie():
    tie = {1: 0.92, 2: 0.9800, 3: 0.9801, 4: 0.9799, 5: 0.9800, 6: 0.9802}
    text = opening_of(*study_tables(tie, tie, {3: 0.9801, 4: 0.9800, 5: 0.9799}, noise=0.002))
    assert "is indistinguishable from depth 3" in text and "would have been detected" in text
    assert "in 0 of the 3 settings" in text and "do not single out four layers" in text


def test_opening_paragraph_underpowered_refuses_nothing_but_claims_nothing():
    means = {1: 0.90, 2: 0.95, 3: 0.96, 4: 0.98, 5: 0.97, 6: 0.95}
    text = opening_of(*study_tables(means, means, {3: 0.96, 4: 0.98, 5: 0.97}, noise=0.03, n=2))
    assert "beats depth" not in text and "is indistinguishable from depth 3" in text
    assert "in 0 of the 3 settings" in text


def test_renders_every_experiment_from_synthetic_tables(tmp_path: Path):
    means = {1: 0.92, 2: 0.96, 3: 0.97, 4: 0.98, 5: 0.975, 6: 0.96}
    path = render(write(tmp_path, *study_tables(means, means, {3: 0.97, 4: 0.98, 5: 0.975})))
    text = path.read_text()
    assert text.startswith("# Why four layers?")
    for png in ("recipe.png", "matched.png", "tuned.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and f"({png})" in text
    assert "| depth 4, 10 epochs | 98.00 |" in text and "Holm" in text and "| nan" not in text and "nan%" not in text
    assert "momentum: 0.9" in text


def test_refused_verdict_renders_and_says_why(tmp_path: Path):
    means = {1: 0.92, 2: 0.96, 3: 0.97, 4: 0.98, 5: 0.975, 6: 0.96}
    text = render(write(tmp_path, *study_tables(means, means, {3: 0.97, 4: 0.98, 5: 0.975}, n=1))).read_text()
    assert "no verdict" in text and "| nan" not in text and "nan%" not in text


def test_edge_warnings_and_declared_caps():
    trials = study_tables({4: 0.98}, {4: 0.98}, {4: 0.98})[0]
    assert edge_warnings(trials, CONFIG) == ([], [])
    low = trials.assign(param_lr=np.where(trials.retrained, 0.0011, trials.param_lr))
    warnings, caps = edge_warnings(low, CONFIG)
    assert len(warnings) == 9 and all("lower edge" in w and "lr" in w for w in warnings)
    capped = trials.assign(param_epochs=10, param_width=1024)
    warnings, caps = edge_warnings(capped[capped.experiment == "tuned"], CONFIG)
    assert warnings == [] and len(caps) == 6 and any("cost cap" in c for c in caps)


def test_missing_tables_is_a_usage_error(tmp_path: Path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "study.report", "--results", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "trials.csv" in p.stderr and "Traceback" not in p.stderr
