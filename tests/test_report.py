"""The report renders from small synthetic tables, and its verdict says the right thing."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study.coord import decode_curve
from study.report import compare, depth_stats, edge_warnings, problems, render, verdict, welch

WIDTHS = {3: "256-128", 4: "256-128-64", 5: "256-128-64-32"}
PARAMS = {3: 235_146, 4: 242_762, 5: 244_522}
SECONDS = {3: 10.0, 4: 12.0, 5: 14.0}
SPACE = {"lr": [0.001, 1.0], "width": [32, 1024], "taper": [0.25, 1.0], "max_epochs": 10, "min_width": 8}


def final_table(means: dict[int, float], noise: float = 0.0005, n: int = 5, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for d, m in means.items():
        offsets = rng.standard_normal(n)
        offsets = (offsets - offsets.mean()) / offsets.std(ddof=1) if n > 1 else np.zeros(1)  # exact mean, std
        for s, o in enumerate(offsets, 1):
            curve = [[e, 0.5 / e, 0.4 / e, min(m, 0.9 + 0.03 * e), SECONDS[d] * e / 3] for e in (1, 2, 3)]
            rows.append({"depth": d, "seed": s, "test_accuracy": m + noise * o, "test_loss": 0.1,
                         "widths": WIDTHS[d], "n_params": PARAMS[d], "train_flops": 3 * PARAMS[d],
                         "train_seconds": SECONDS[d], "samples_per_s": 1e5, "curve": json.dumps(decode_curve(curve)),
                         "device": "cpu", "device_name": "test cpu", "threads": 1, "torch_version": "x",
                         "command": "synthetic"})
    return pd.DataFrame(rows)


def trials_table(best_lr: float = 0.05) -> pd.DataFrame:
    rows = []
    for d in (3, 4, 5):
        for t, (lr, acc, state) in enumerate([(best_lr, 0.98, "complete"), (0.01, 0.96, "complete"),
                                              (0.002, 0.90, "pruned"), (0.9, 0.10, "diverged")]):
            rows.append({"depth": d, "trial": t, "state": state, "retrained": t == 0, "param_lr": lr, "param_width": 256,
                         "param_taper": 0.5, "param_epochs": 3, "val_accuracy": acc, "n_params": PARAMS[d],
                         "epochs_run": 3})
    return pd.DataFrame(rows)


def epochs_table() -> pd.DataFrame:
    return pd.DataFrame([{"depth": d, "trial": 0, "epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e,
                          "val_accuracy": 0.9 + 0.02 * e} for d in (3, 4, 5) for e in (1, 2, 3)])


def verdict_of(means, depths=None, **kw):
    final = final_table(means, **kw)
    return verdict_from(final, depths)


def verdict_from(final, depths=None):
    return verdict(depth_stats(final), compare(final), problems(final, depths))


def test_welch_matches_scipy():
    from scipy import stats
    a, b = np.array([0.97, 0.971, 0.969, 0.972]), np.array([0.975, 0.978, 0.974, 0.977, 0.976])
    diff, lo, hi, p = welch(a, b)
    assert diff == pytest.approx(b.mean() - a.mean())
    assert p == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue)
    assert lo < diff < hi and lo > 0


def test_clear_winner():
    v = verdict_of({3: 0.970, 4: 0.980, 5: 0.975})
    assert v.best == 4 and v.answer == 4 and v.tied == (4,)
    assert "detectably better than every other depth" in v.text and "four layers is justified" in v.text


def test_tie_won_by_depth_four_on_cost_is_not_called_a_depth_effect():
    v = verdict_of({3: 0.9800, 4: 0.9795, 5: 0.9790}, noise=0.003)
    assert v.best == 3 and v.tied == (3, 4, 5)
    SECONDS[3], SECONDS[4] = 12.0, 10.0
    try:
        v = verdict_of({3: 0.9800, 4: 0.9795, 5: 0.9790}, noise=0.003)
    finally:
        SECONDS[3], SECONDS[4] = 10.0, 12.0
    assert v.answer == 4 and "not because a fourth layer adds accuracy" in v.text


def test_tie_within_noise_picks_the_cheaper_depth():
    v = verdict_of({3: 0.9790, 4: 0.9800, 5: 0.9795}, noise=0.003)
    assert v.tied == (3, 4, 5) and v.answer == 3  # cheapest of the tied depths
    assert "not detectably worse" in v.text and "Four layers is as accurate as the best within noise" in v.text
    final = final_table({3: 0.9790, 4: 0.9800, 5: 0.9795}, noise=0.003)
    assert all(not c.detectable for c in compare(final))


def test_deepest_best_says_extend_the_range():
    v = verdict_of({3: 0.970, 4: 0.975, 5: 0.985})
    assert v.answer == 5 and "extended beyond 5" in v.text and "detectably worse than depth 5" in v.text


def test_edge_of_range_warning():
    config = {"space": SPACE}
    assert edge_warnings(trials_table(best_lr=0.05), config) == []
    warnings = edge_warnings(trials_table(best_lr=0.0011), config)
    assert len(warnings) == 3 and all("lower edge" in w and "lr" in w for w in warnings)
    upper = trials_table()
    upper["param_epochs"] = 10
    assert any("epochs" in w and "upper edge" in w for w in edge_warnings(upper, config))


def test_renders_from_synthetic_tables(tmp_path: Path):
    final = final_table({3: 0.970, 4: 0.980, 5: 0.975})
    trials = trials_table()
    epochs = epochs_table()
    for name, df in (("final", final), ("trials", trials), ("epochs", epochs)):
        df.to_csv(tmp_path / f"{name}.csv", index=False)
    (tmp_path / "config.json").write_text(json.dumps({"space": SPACE, "batch_size": 64, "optimizer": "sgd"}))
    path = render(tmp_path)
    text = path.read_text()
    assert text.startswith("# Why four layers?") and "**Answer: depth 4**" in text
    for png in ("isolation.png", "curves.png", "cost.png", "lr.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and f"({png})" in text
    assert "batch_size: 64" in text and "| 3 | 2 | 1 | 1 | 0 |" in text


def test_missing_tables_is_a_usage_error(tmp_path: Path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "study.report", "--results", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "trials.csv" in p.stderr and "Traceback" not in p.stderr


# --- the verdict refuses what it cannot compute --------------------------------------------------


def assert_refused(v, *words):
    assert v.answer is None and v.best is None and v.text.startswith("**No verdict")
    assert "nan" not in v.text.lower() and "detectably" not in v.text
    for w in words:
        assert w in v.text, v.text


def test_one_seed_per_depth_is_not_a_tie():
    v = verdict_of({3: 0.970, 4: 0.980, 5: 0.975}, n=1)
    assert_refused(v, "depth 3: only 1 retrained seed", "depth 5: only 1 retrained seed")


def test_a_single_depth_is_not_detectably_better_than_anything():
    assert_refused(verdict_of({4: 0.98}), "Only depth 4 was studied")


def test_a_diverged_seed_refuses_instead_of_nan():
    final = final_table({3: 0.970, 4: 0.980, 5: 0.975})
    final.loc[(final.depth == 3) & (final.seed == 2), "test_accuracy"] = np.nan
    final["diverged"] = final["test_accuracy"].isna()
    assert_refused(verdict_from(final), "depth 3: 1 of 5 retrained seeds diverged")


def test_identical_accuracies_give_no_p_value_of_zero():
    final = final_table({3: 0.970, 4: 0.980}, noise=0.0)
    comparisons = compare(final)
    assert len(comparisons) == 1 and comparisons[0].reason and not comparisons[0].detectable
    assert_refused(verdict_from(final), "no spread")
    with pytest.raises(ValueError):
        welch(np.array([0.5, 0.5]), np.array([0.6, 0.6]))


def test_a_depth_missing_from_the_final_runs_is_named():
    assert_refused(verdict_of({3: 0.970, 4: 0.980}, depths=[3, 4, 5]), "depth 5: no retrained runs yet")


def test_refused_verdict_renders_and_says_why(tmp_path: Path):
    final = final_table({3: 0.970, 4: 0.980, 5: 0.975}, n=1)
    final.to_csv(tmp_path / "final.csv", index=False)
    trials_table().to_csv(tmp_path / "trials.csv", index=False)
    epochs_table().to_csv(tmp_path / "epochs.csv", index=False)
    text = render(tmp_path).read_text()
    assert "**No verdict yet.**" in text and "| nan" not in text and "nan%" not in text
