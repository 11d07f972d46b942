"""The factorial design end to end on a small study: every depth trains every rate of the band with every seed,
seed k draws its own hold-out, the horizon check retrains the rate its base cell chose, the tables export every
run's per-image predictions, and the report's primary contrasts carry the rate choice and the test images."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mnist_bench.errors import UserError
from study import analysis, engine, factorial, stats, tables
from study.config import PREDICTIONS_FILE, PRESETS, Matched, RunConfig, declared_margin, rank_band
from study.results import load_results
from study.storage import open_storage

BAND = (0.05, 0.1, 0.2)
SEEDS = 4


def small(name: str = "fact") -> object:
    return dataclasses.replace(
        PRESETS["smoke"],
        name=name,
        experiments=("matched",),
        matched=Matched(
            depths=(1, 3, 4, 5),
            budgets=(60_000,),
            constant_budgets=(),
            band=BAND,
            seeds=SEEDS,
            epochs=2,
            check_budget=60_000,
            checks=("horizon",),
            check_seeds=2,
            reference_seeds=2,
        ),
        split_per_seed=True,
        train_subset=2_000,
        val_size=2_000,
    )


def run_study(out: Path, pack: int) -> dict[str, pd.DataFrame]:
    cfg = small()
    run = RunConfig(storage=f"sqlite:///{out / 'study.db'}", out=out, workers=1, pack=pack, heartbeat_interval=5)
    engine.run_workers(cfg, run)
    return tables.write_tables(open_storage(run.storage), cfg.name, cfg.cells(), out)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, dict[str, pd.DataFrame]]:
    out = tmp_path_factory.mktemp("factorial")
    return out, run_study(out, pack=12)


def test_every_depth_trains_every_rate_with_every_seed_on_its_own_hold_out(study):
    out, written = study
    final = written["final"]
    base = final[(final["variant"] == "") & (final["depth"] > 1)]
    assert len(base) == 3 * len(BAND) * SEEDS
    assert sorted(set(zip(base["band_point"], base["seed"]))) == [(p, s) for p in range(3) for s in range(1, 5)]
    assert np.allclose(sorted(set(base["param_lr"])), BAND)
    # seed k's hold-out is split_seed + k, the same for every depth and rate (common random numbers)
    assert (base["split_seed"] == base["seed"]).all()
    assert base["val_accuracy"].notna().all() and written["trials"].empty  # no grid: nothing tuned apart
    ref = final[final["depth"] == 1]
    assert len(ref) == len(BAND) * 2  # a reference depth: reference_seeds
    # the hold-outs differ between seeds, so the training subsets do too
    from mnist_bench.data import split_indices

    a, b = split_indices(60_000, 2_000, 1)[1], split_indices(60_000, 2_000, 2)[1]
    assert not set(a.tolist()) == set(b.tolist())


def test_the_horizon_check_retrains_the_rate_its_base_cell_chose(study):
    _, written = study
    final = written["final"]
    chosen = factorial.choices(final[final["variant"] == ""])
    horizon = final[final["variant"] == "horizon"]
    assert len(horizon) == 3 * 2 and (horizon["param_epochs"] == 4).all()
    for depth, g in horizon.groupby("depth"):
        key = next(k for k in chosen if k[4] == depth and k[1] == 60_000)
        assert set(g["band_point"]) == {chosen[key]}


def test_a_result_does_not_depend_on_its_pack(study, tmp_path):
    """A seed's rates train as one pack (a shared batch order); one network at a time gives the same numbers."""
    _, packed = study
    alone = run_study(tmp_path, pack=1)
    key = ["variant", "depth", "band_point", "seed"]
    a, b = (t["final"].sort_values(key).reset_index(drop=True) for t in (packed, alone))
    base = (a["variant"] == "") & (a["depth"] > 1)
    assert (a["pack"][base] == len(BAND)).all() and (b["pack"] == 1).all()
    pd.testing.assert_series_equal(a["test_correct"], b["test_correct"])
    pd.testing.assert_series_equal(a["val_correct"], b["val_correct"])


def test_the_predictions_file_holds_every_final_run(study):
    out, written = study
    preds = factorial.read_predictions(out / PREDICTIONS_FILE)
    final = written["final"]
    assert preds is not None and preds.images == 10_000 and len(preds.correct) == len(final)
    for _, row in final.iterrows():  # the exported predictions give each run's own count of correct images
        assert int(preds.of(row).sum()) == int(row["test_correct"])


def test_a_damaged_predictions_file_is_one_line(tmp_path):
    (tmp_path / PREDICTIONS_FILE).write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not the predictions file"):
        factorial.read_predictions(tmp_path / PREDICTIONS_FILE)
    assert factorial.read_predictions(tmp_path / "absent.npz") is None


def test_retrained_keeps_each_cell_at_its_chosen_rate(study):
    _, written = study
    final = written["final"]
    view = factorial.retrained(final)
    chosen = factorial.choices(final)
    for key, g in view[view["band_point"].notna()].groupby(factorial.CELL, dropna=False):
        assert set(g["band_point"]) == {chosen[factorial.cell_key(key)]}
        assert g["seed"].is_unique
    kept = factorial.retrained_epochs(written["epochs"], view)
    finals = kept[kept["run"] == "final"]
    assert set(zip(finals["study"], finals["trial"])) == set(zip(view["study"], view["run_trial"]))
    # the rule: the highest mean validation accuracy over the seeds, ties to the lower rate
    assert rank_band({0: [0.5, 0.7], 1: [0.6, 0.6], 2: [0.1]}) == [0, 1, 2]


def test_the_primary_contrasts_carry_the_rate_choice_and_the_test_images(study):
    out, _ = study
    trials, epochs, final, config = load_results(out)
    preds = factorial.read_predictions(out / PREDICTIONS_FILE)
    margin = declared_margin(config)
    an = analysis.analyse(epochs, final, config, margin, preds)
    assert [c.estimate for c in an.primary] == ["chosen", "chosen"]
    seeds_only = analysis.analyse(epochs, final, config, margin)
    for c, s in zip(an.primary, seeds_only.primary):
        assert c.estimate == "chosen" and s.estimate == "seeds"
        assert [m for m, _ in c.margins] == list(analysis.REPORT_MARGINS)
        assert math.isfinite(c.bound) and c.bound >= abs(c.diff)
        assert c.var >= c.var_seeds > 0  # the seeds' part (with the choice) and the test images' part
        # the same contrast recomputed by hand from the exported predictions
        a = factorial.band_rows(final, ("matched", 60_000, "funnel", "", c.a))
        b = factorial.band_rows(final, ("matched", 60_000, "funnel", "", c.b))
        e = factorial.chosen_estimate(a, b, preds)
        assert c.diff == pytest.approx(e.mean) and c.ci == pytest.approx(
            tuple(max(-1.0, min(1.0, v)) for v in e.interval(c.level))
        )
    # an outcome at a margin agrees with the bound: equivalent at margin m only where the bound is within it
    for c in an.primary:
        if dict(c.margins).get(margin) == "equivalent":
            assert c.bound <= margin


def test_the_report_renders_the_factorial(study, tmp_path):
    out, _ = study
    from study import report

    path = report.render(out, tmp_path / "report")
    text = path.read_text(encoding="utf-8")
    assert "equivalence bound" in text and "at ±0.10" in text
    assert "a margin of ±0.17 points" in text  # MNIST's declared margin, not the old default


def test_an_estimate_gives_scipys_t_test_when_it_carries_the_seeds_alone():
    """stats.Estimate's p-values are the t distribution's: with the seeds' variance only, the paired t test."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.98, 0.001, 12)
    y = x - rng.normal(0.0005, 0.001, 12)
    d = x - y
    e = stats.Estimate(float(d.mean()), float(d.var(ddof=1) / len(d)), len(d) - 1)
    from scipy import stats as sps
    from statsmodels.stats.weightstats import ttost_paired

    assert e.p == pytest.approx(sps.ttest_rel(x, y).pvalue, rel=1e-9)
    assert e.p_equivalence(0.001) == pytest.approx(ttost_paired(x, y, -0.001, 0.001)[0], rel=1e-9)


def test_a_band_grows_by_appending_rates_and_keeps_every_run(study, tmp_path):
    """A depth whose best rate sits on the band's edge: the band grows (a rate appended), the same command trains
    only the new rate's runs; any other change of the band is another design, refused."""
    import shutil

    from study.storage import StudyError

    out, written = study
    shutil.copy(out / "study.db", tmp_path / "study.db")
    grown = dataclasses.replace(small(), matched=dataclasses.replace(small().matched, band=(*BAND, 0.025)))
    run = RunConfig(storage=f"sqlite:///{tmp_path / 'study.db'}", out=tmp_path, workers=1, heartbeat_interval=5)
    engine.run_workers(grown, run)
    after = tables.write_tables(open_storage(run.storage), grown.name, grown.cells(), tmp_path)["final"]
    before = written["final"]
    seen = set(zip(before["study"], before["run_trial"]))
    new = after[[k not in seen for k in zip(after["study"], after["run_trial"])]]
    base = new[new["variant"] == ""]
    assert set(base["band_point"]) == {3} and np.allclose(base["param_lr"], 0.025)
    assert len(base) == 3 * SEEDS + 2  # depths 3-5 with their seeds, softmax with its references'
    kept = after.merge(before, on=["study", "run_trial"], suffixes=("", "_before"))
    assert (kept["test_correct"] == kept["test_correct_before"]).all()
    reordered = dataclasses.replace(small(), matched=dataclasses.replace(small().matched, band=BAND[::-1]))
    with pytest.raises(StudyError, match="other settings"):
        engine.run_workers(reordered, run)


def test_a_factorial_contrast_with_a_rate_missing_is_not_computed_never_narrower(study):
    """A seed without every rate of both depths cannot carry the choice: the contrast says so (not computed), it
    never falls back to a seeds-only interval in a study that has predictions."""
    out, _ = study
    trials, epochs, final, config = load_results(out)
    preds = factorial.read_predictions(out / PREDICTIONS_FILE)
    chosen = factorial.choices(final)
    point = chosen[("matched", 60_000, "funnel", "", 4)]
    other = next(p for p in range(len(BAND)) if p != point)  # a rate depth 4 did not choose, for seed 2
    gone = (final["depth"] == 4) & (final["band_point"] == other) & (final["seed"] == 2) & (final["variant"] == "")
    an = analysis.analyse(epochs, final[~gone], config, 0.0017, preds)
    assert all(
        c.outcome == "not computed" and "band or the predictions are incomplete" in c.reason for c in an.primary[:1]
    )


def test_the_pick_variance_is_the_random_effects_anova_estimate():
    """stats.pick_variance: (MS_picks - MS_residual) / seeds of a two-way table (picks x seeds), checked against
    statsmodels' anova_lm; stats.searched adds both depths' parts to the crossed estimate."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    rng = np.random.default_rng(3)
    x = 0.98 + rng.normal(0, 0.001, (3, 1)) + rng.normal(0, 0.0005, (1, 4)) + rng.normal(0, 0.0007, (3, 4))
    frame = pd.DataFrame([(i, j, x[i, j]) for i in range(3) for j in range(4)], columns=["pick", "seed", "acc"])
    table = anova_lm(smf.ols("acc ~ C(pick) + C(seed)", frame).fit())
    ms_picks, ms_resid = table.loc["C(pick)", "mean_sq"], table.loc["Residual", "mean_sq"]
    var, df = stats.pick_variance(x)
    assert var == pytest.approx((ms_picks - ms_resid) / 4, rel=1e-9) and 0 < df < math.inf
    assert stats.pick_variance(np.tile([0.97, 0.98, 0.975, 0.981], (3, 1)))[0] == pytest.approx(0, abs=1e-20)
    base = stats.crossed(rng.integers(-1, 2, (4, 500)).astype(float) * (rng.random((4, 500)) < 0.05))
    both = stats.searched(base, x, x[::-1])
    assert both.var == pytest.approx(base.var + 2 * var) and both.mean == base.mean
    satterthwaite = both.var**2 / (base.var_seeds**2 / (base.n - 1) + 2 * var**2 / df)  # the images' part is 0 here
    assert both.df == pytest.approx(satterthwaite)


def test_seeds_are_planned_with_the_test_sets_part_fixed():
    """More seeds shrink the seeds' part only: with a fixed part the plan asks more, and none when the fixed part
    alone is too wide for the margin."""
    sd, margin, level = 0.0014, 0.0017, 0.005
    plain = stats.seeds_to_resolve(sd, margin, level)
    assert stats.seeds_with_floor(sd, 0.0, margin, level) == plain
    assert stats.seeds_with_floor(sd, (0.0002) ** 2, margin, level) > plain
    assert stats.seeds_with_floor(sd, (0.0008) ** 2, margin, level) == stats.UNREACHABLE
