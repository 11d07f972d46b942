"""The depth study end to end on a tiny budget: tables, resumption, interruption, a killed worker."""

import dataclasses
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from mnist_bench.data import MNIST
from mnist_bench.errors import UsageError
from study import depth as study_depth
from study.config import (
    EXPERIMENTS,
    PRESETS,
    Cell,
    Matched,
    Recipe,
    RunConfig,
    SearchSpace,
    StudyConfig,
    Tuned,
    cell_widths,
    chooser,
    failed_run,
    full_design,
    hidden_widths,
    parse_study_name,
    preset,
    study_name,
)
from study.engine import Worker
from study.storage import StudyError, open_storage

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--preset",
    "smoke",
    "--experiments",
    "tuned",
    "--depths",
    "2",
    "3",
    "--seeds",
    "2",
    "--train-subset",
    "600",
    "--no-report",
]

TRIALS_COLUMNS = {
    "depth",
    "trial",
    "state",
    "retrained",
    "param_lr",
    "param_width",
    "param_epochs",
    "val_accuracy",
    "epochs_run",
    "n_params",
    "train_seconds",
    "samples_per_s",
    "device",
    "threads",
    "torch_version",
    "device_name",
    "study",
}
EPOCHS_COLUMNS = {
    "run",
    "seed",
    "test_accuracy",
    "depth",
    "trial",
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "study",
    "train_seconds",
}
FINAL_COLUMNS = {
    "depth",
    "seed",
    "source_trial",
    "widths",
    "param_lr",
    "param_epochs",
    "test_accuracy",
    "test_loss",
    "train_seconds",
    "samples_per_s",
    "device",
    "threads",
    "torch_version",
    "study",
}


# A trial that used its budget slot: "failed" ran to the end at or below twice chance ("interrupted" did not).
FINISHED_STATES = ["complete", "pruned", "diverged", "failed"]


def run_study(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "study.depth", *args], capture_output=True, text=True, timeout=timeout)


def trial_states(db: Path, suffix: str = "") -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select s.study_name, t.state from trials t join studies s using (study_id) order by t.trial_id"
        ).fetchall()
    return [r for r in rows if r[0].endswith(suffix)] if suffix else rows


def budget_rows(out: Path, depth: int, experiment: str = "tuned") -> pd.DataFrame:
    t = pd.read_csv(out / "trials.csv")
    return t[(t.experiment == experiment) & (t.depth == depth) & t.state.isin(FINISHED_STATES)]


def meets_budget(rows: pd.DataFrame, n_trials: int) -> bool:
    """A search's budget: n trials trained, each failed one replaced, up to twice the budget in all."""
    trained = rows[rows.state.isin(["complete", "pruned"])]
    failed = len(rows) - len(trained)
    return rows.trial.is_unique and len(rows) == n_trials + min(failed, n_trials)


def assert_exact(out: Path, n_trials: int, seeds: int, depths=(2, 3)):
    final = pd.read_csv(out / "final.csv")
    for d in depths:
        rows = budget_rows(out, d)
        assert meets_budget(rows, n_trials)
        assert sorted(final[final.depth == d].seed) == list(range(1, seeds + 1))
        assert final[final.depth == d].source_trial.nunique() == 1


def test_tiny_study_end_to_end_writes_documented_tables(tmp_path: Path):
    with_report = [a for a in TINY if a != "--no-report"]
    study_depth.main([*with_report, "--n-trials", "3", "--out", str(tmp_path)])
    assert (tmp_path / "report.md").read_text().startswith("# Why four layers?")
    trials, epochs, final = (pd.read_csv(tmp_path / f"{k}.csv") for k in ("trials", "epochs", "final"))
    assert TRIALS_COLUMNS <= set(trials.columns)
    assert EPOCHS_COLUMNS <= set(epochs.columns)
    assert FINAL_COLUMNS <= set(final.columns)
    assert_exact(tmp_path, 3, 2)
    assert trials.state.isin([*FINISHED_STATES, "interrupted"]).all()
    assert final.test_accuracy.between(0, 1).all()
    assert trials.groupby("depth").retrained.sum().tolist() == [1, 1]
    # epochs.csv agrees with trials.csv
    runs = epochs[epochs.run == "tuning"].groupby(["depth", "trial"]).size()
    for row in trials.itertuples():
        assert runs.get((row.depth, row.trial), 0) == row.epochs_run


def test_growing_the_budget_on_a_resumed_worker_never_repeats_a_configuration(tmp_path: Path):
    args = [*TINY, "--out", str(tmp_path)]
    study_depth.main([*args, "--n-trials", "2"])
    first = pd.read_csv(tmp_path / "trials.csv")
    final_first = pd.read_csv(tmp_path / "final.csv")
    study_depth.main([*args, "--n-trials", "2"])  # nothing to do
    again = pd.read_csv(tmp_path / "trials.csv")
    pd.testing.assert_frame_equal(first.drop(columns=["command"]), again.drop(columns=["command"]))
    pd.testing.assert_frame_equal(final_first, pd.read_csv(tmp_path / "final.csv"))
    for n in (4, 6):  # grows the budget twice
        study_depth.main([*args, "--n-trials", str(n)])
    grown = pd.read_csv(tmp_path / "trials.csv")
    for d in (2, 3):
        rows = budget_rows(tmp_path, d)
        assert meets_budget(rows, 6) and sorted(rows.trial) == list(range(len(rows)))
        params = rows[[c for c in rows.columns if c.startswith("param_")]]
        assert not params.duplicated().any(), params  # each resume continued the sampler, never replayed it
    assert set(first.trial) <= set(grown.trial)


def test_shrinking_a_budget_is_refused(tmp_path: Path):
    study_depth.main([*TINY, "--depths", "2", "--n-trials", "2", "--seeds", "2", "--out", str(tmp_path)])
    for flag in (["--n-trials", "1"], ["--seeds", "1", "--n-trials", "2"]):
        p = run_study(*TINY, "--depths", "2", "--out", str(tmp_path), *flag)
        assert p.returncode == 1 and "cannot shrink" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_a_new_best_trial_gets_its_own_seeds_and_old_runs_are_reported_superseded(tmp_path: Path):
    args = [*TINY, "--depths", "2", "--out", str(tmp_path)]
    study_depth.main([*args, "--n-trials", "2"])
    old = pd.read_csv(tmp_path / "final.csv")
    # A better configuration appears in the storage (another worker's budget, an imported trial).
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    tune = optuna.load_study(study_name="smoke-tuned-depth2", storage=storage)
    tune.add_trial(
        create_trial(
            params={"lr": 0.05, "epochs": 2, "width": 32},
            distributions={
                "lr": FloatDistribution(1e-3, 1.0, log=True),
                "epochs": IntDistribution(1, 4),
                "width": IntDistribution(16, 256, log=True),
            },
            value=0.999,
            user_attrs={"diverged": False, "curve": []},
        )
    )
    study_depth.main([*args, "--n-trials", "3"])  # the budget now holds the imported trial
    final = pd.read_csv(tmp_path / "final.csv")
    superseded = pd.read_csv(tmp_path / "superseded.csv")
    assert sorted(final.seed) == [1, 2] and set(final.source_trial) == {2}  # no mixing of configurations
    assert sorted(superseded.seed) == [1, 2] and set(superseded.source_trial) == set(old.source_trial)
    assert superseded.reason.str.contains("no longer the best").all()


def test_nothing_is_pruned_and_failed_trials_are_replaced_up_to_twice_the_budget(small: MNIST, tmp_path: Path):
    # Peak learning rates from 3 to 30 with momentum 0.9: most trials diverge or stay at chance.
    cfg = StudyConfig(
        name="p",
        experiments=("tuned",),
        tuned=Tuned(depths=(2,), n_trials=3, seeds=1, space=SearchSpace(lr=(3.0, 30.0), width=(16, 32), max_epochs=2)),
        sampler_startup_trials=3,
    )
    run = RunConfig(storage=f"sqlite:///{tmp_path / 's.db'}", out=tmp_path)
    worker = Worker(cfg, run, {"split": small}, open_storage(run.storage, 10, 30), env={})
    try:
        worker.work()
    except StudyError:
        pass  # every trial failed: nothing to retrain, said in one line
    study = optuna.load_study(study_name="p-tuned-depth2", storage=run.storage)
    done = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    assert all(t.state == TrialState.COMPLETE for t in done)  # never pruned
    assert all(len(t.user_attrs["curve"]) == t.params["epochs"] for t in done if not t.user_attrs["diverged"])
    failed = [t for t in done if failed_run(t.value, diverged=t.user_attrs["diverged"])]
    assert failed, "the search space was meant to fail some trials"
    assert len(done) == min(3 + len(failed), 6)  # each failure replaced, at most twice the budget
    assert len(done) - len(failed) == 3 or len(done) == 6


def _frozen(number: int, value: float, diverged: bool = False):
    trial = create_trial(value=value, user_attrs={"diverged": diverged}, state=TrialState.COMPLETE)
    trial.number = number
    return trial


def test_a_search_retrains_its_best_trial_and_ranks_its_runners_up_next():
    from study.coord import best_trial, ranking

    # The best value, ties to the earliest, diverged never retrained.
    search = [_frozen(0, 0.95), _frozen(1, 0.97), _frozen(2, 0.97), _frozen(3, 0.99, diverged=True)]
    assert [t.number for t in ranking(search)] == [1, 2, 0]
    assert best_trial(search).number == 1 and best_trial(search, 2).number == 0 and best_trial(search, 3) is None


def _wait_for(db: Path, condition, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.05)
        if db.exists():
            try:
                if condition(trial_states(db)):
                    return
            except sqlite3.OperationalError:
                continue
    pytest.fail("the study never reached the state to interrupt")


def _running(suffix: str):
    return lambda states: any(n.endswith(suffix) and s == "RUNNING" for n, s in states)


def test_ctrl_c_stops_a_lone_worker_cleanly_and_a_rerun_completes(tmp_path: Path):
    out = tmp_path / "out"
    args = [*TINY, "--depths", "2", "--n-trials", "3", "--train-subset", "20000", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "study.depth", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(out / "study.db", lambda st: any(s in ("COMPLETE", "PRUNED") for _, s in st) and _running("")(st))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines() == [x for x in err.strip().splitlines() if x.startswith("interrupted")]
    assert not any(s == "RUNNING" for _, s in trial_states(out / "study.db"))  # given back at a safe point
    done = run_study(*args)
    assert done.returncode == 0, done.stderr
    assert_exact(out, 3, 2, depths=(2,))


def test_kill_9_during_the_last_final_run_then_the_same_command_finishes_exactly(tmp_path: Path):
    # README's recovery path: the killed run's trial is failed once its heartbeat (1 s) is 3 s stale,
    # its seed is given back, and the rerun runs it.
    out = tmp_path / "out"
    args = [
        *TINY,
        "--depths",
        "2",
        "--n-trials",
        "2",
        "--seeds",
        "3",
        "--train-subset",
        "20000",
        "--heartbeat",
        "1",
        "--pack",
        "1",  # one seed at a time, so "the last one running" is a state that lasts (packs: test_coord.py)
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "study.depth", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # Killed during the last seed: a claimed-but-dead seed must not count as done.
    _wait_for(
        out / "study.db",
        lambda st: [s for n, s in st if n.endswith("-final")].count("COMPLETE") == 2 and _running("-final")(st),
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "RUNNING" in [s for _, s in trial_states(out / "study.db", "-final")]
    done = run_study(*args)
    assert done.returncode == 0, done.stderr
    assert_exact(out, 2, 3, depths=(2,))
    assert "FAIL" in [s for _, s in trial_states(out / "study.db", "-final")]


def test_sigterm_reaches_every_worker_process(tmp_path: Path):
    out = tmp_path / "out"
    args = [*TINY, "--depths", "2", "--n-trials", "20", "--train-subset", "20000", "--workers", "2", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "study.depth", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(out / "study.db", lambda st: [s for _, s in st].count("RUNNING") == 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("interrupted"), err
    states = [s for _, s in trial_states(out / "study.db")]
    assert "RUNNING" not in states and states.count("FAIL") >= 2  # both workers gave their trial back
    time.sleep(1)
    assert [s for _, s in trial_states(out / "study.db")] == states  # and nothing ran on after the exit
    assert not (out / "trials.csv").exists()


@pytest.mark.parametrize(
    "bad",
    [
        ["--depths", "0"],
        ["--n-trials", "-1"],
        ["--preset", "huge"],
        ["--seeds", "0"],
        ["--depths", "2", "2"],
        ["--storage", "nosuchdb://x"],
        ["--storage", "postgresql://nobody@127.0.0.1:1/none"],
        ["--workers", "0"],
        ["--heartbeat", "10000000000"],
        ["--tuning-seed", "1"],  # a tuning run would share a final run's seed
    ],
)
def test_bad_input_exits_without_traceback_or_touching_results(tmp_path: Path, bad):
    sentinel = tmp_path / "trials.csv"
    sentinel.write_text("keep me\n")
    p = run_study(*TINY, "--out", str(tmp_path), *bad)
    assert p.returncode in (1, 2), p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert sentinel.read_text() == "keep me\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["trials.csv"]


def test_cuda_without_cuda_exits_2(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    p = run_study(*TINY, "--out", str(tmp_path), "--device", "cuda")
    assert p.returncode == 2 and "CUDA" in p.stderr and "Traceback" not in p.stderr


def test_resuming_with_other_settings_is_refused(tmp_path: Path):
    study_depth.main([*TINY, "--depths", "2", "--n-trials", "1", "--seeds", "1", "--out", str(tmp_path)])
    p = run_study(*TINY, "--depths", "2", "--n-trials", "1", "--out", str(tmp_path), "--train-subset", "700")
    assert p.returncode == 1 and "other settings" in p.stderr and "train_subset" in p.stderr


def test_a_command_with_another_heartbeat_is_refused_before_it_can_fail_live_runs(tmp_path: Path):
    """A --heartbeat 1 command beside a --heartbeat 10 one failed the other's live run after 4.9 s."""
    study_depth.main([*TINY, "--depths", "2", "--n-trials", "1", "--seeds", "1", "--out", str(tmp_path)])
    p = run_study(*TINY, "--depths", "2", "--n-trials", "1", "--out", str(tmp_path), "--heartbeat", "1")
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "runs with --heartbeat 10" in p.stderr and "pass --heartbeat 10" in p.stderr
    p = run_study(*TINY, "--depths", "2", "--n-trials", "1", "--out", str(tmp_path), "--heartbeat", "10")
    assert p.returncode == 0, p.stderr


def test_tables_and_report_say_what_is_still_below_the_stored_budget(tmp_path: Path, capsys):
    """A --seeds 2 command finishing beside a --seeds 3 one (or a command of another experiment beside a
    running one) wrote tables and a report as if they were complete."""
    from study.report import render

    study_depth.main([*TINY, "--depths", "2", "--n-trials", "1", "--seeds", "2", "--out", str(tmp_path)])
    url = f"sqlite:///{tmp_path / 'study.db'}"
    final = optuna.load_study(study_name="smoke-tuned-depth2-final", storage=url)
    final.set_user_attr("seeds", 3)  # what a larger command registered and is still running
    capsys.readouterr()
    study_depth.main([*BASE_RECIPE, "--out", str(tmp_path)])  # another experiment, run now
    out = capsys.readouterr().out
    assert "in progress: 1 part(s)" in out and "tuned-depth2 final runs 2 of 3" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["in_progress"] == [{"cell": "tuned-depth2", "what": "final runs", "done": 2, "budget": 3}]
    assert "**In progress.**" in render(tmp_path).read_text()


BASE_RECIPE = [
    "--preset",
    "smoke",
    "--experiments",
    "recipe",
    "--depths",
    "1",
    "--seeds",
    "1",
    "--train-subset",
    "600",
    "--no-report",
]


def test_help():
    p = run_study("--help")
    assert p.returncode == 0 and "--storage" in p.stdout and "--preset" in p.stdout


def test_a_factorial_stored_with_the_grid_designs_settings_resumes_without_them(tmp_path: Path):
    """The factorial studies stored before the grid design was removed (the committed MNIST study, Fashion-MNIST's
    rerun) hold its settings (lr, lr_points, replicates, lr_rule, an empty thin_budgets), which chose nothing there:
    they resume; a thinned budget, which changed the cells that ran, does not."""
    from study.config import comparable
    from study.engine import open_studies

    cfg, cell = PRESETS["full"], Cell("matched", 4, 242_762)
    now = cfg.identity(cell)
    grid = {"lr": [0.0178, 0.316], "lr_points": 6, "replicates": 1, "lr_rule": "mean", "thin_budgets": []}
    before = {**now, "experiment": {**now["experiment"], **grid}}
    assert comparable(before) == now
    url = f"sqlite:///{tmp_path / 's.db'}"
    for final in (False, True):
        study = optuna.create_study(storage=url, study_name=study_name(cfg.name, cell, final), direction="maximize")
        study.set_user_attr("config", before)
    open_studies(open_storage(url), cfg, cell)  # resumes, and leaves the stored settings as they were
    assert optuna.load_study(study_name=study_name(cfg.name, cell), storage=url).user_attrs["config"] == before
    thinned = {**before, "experiment": {**before["experiment"], "thin_budgets": [1_000_000]}}
    assert comparable(thinned) != now
    optuna.load_study(study_name=study_name(cfg.name, cell), storage=url).set_user_attr("config", thinned)
    with pytest.raises(StudyError, match="made with other settings \\(experiment, thin_budgets\\)"):
        open_studies(open_storage(url), cfg, cell)


def test_widths_taper_and_floor():
    space = SearchSpace()
    assert hidden_widths(4, 256, 0.5, space) == (256, 128, 64)
    assert hidden_widths(5, 32, 0.25, space) == (32, 16, 16, 16)  # no hidden layer under 16 units
    assert hidden_widths(1, 256, 0.5, space) == ()


def test_presets_share_the_documented_defaults():
    full = PRESETS["full"]
    assert full == full_design("mnist") and preset("full", "fashion-mnist") == full_design("fashion-mnist")
    assert full.experiments == ("recipe", "matched", "tuned") and full.schedule == "linear" and full.split_per_seed
    assert full.recipe.depths == (1, 2, 3, 4, 5, 6) and full.recipe.seeds >= 10 and full.recipe.variant_seeds >= 5
    # the factorial: depths 3-5 (and softmax, a reference) at every rate of one band, no grid, no thinned budget
    assert full.matched.budgets == (60_000, 242_762) and full.matched.depths == (1, 3, 4, 5)
    assert len(full.matched.band) >= 3 and full.matched.checks == ("horizon",) and Matched() == full.matched
    assert full.matched.seeds >= 14 and full.matched.min_width >= 16 and full.matched.check_seeds >= 4
    with pytest.raises(UsageError, match="needs a band"):
        Matched(band=())  # the factorial is the only matched design
    assert full.tuned.depths == (3, 4, 5) and full.tuned.n_trials >= 24 and full.tuned.space.max_epochs == 15
    assert full.tuned.space.width[1] == 1024 and full.tuned.space.min_width >= 16 and full.tuned.runners_up == 2
    smoke = PRESETS["smoke"]  # the same design, small: every experiment, a band of a few rates, the horizon check
    assert isinstance(smoke, StudyConfig) and smoke.train_subset == 2_000 and smoke.experiments == EXPERIMENTS
    assert 2 <= len(smoke.matched.band) <= 3 and smoke.matched.checks == ("horizon",) and smoke.matched.seeds <= 3
    assert {c.variant for c in smoke.cells() if c.experiment == "matched"} == {"", "horizon"}
    assert {c.shape for c in smoke.cells() if c.experiment == "matched"} == {"funnel", "constant"}
    quick = PRESETS["quick"]  # the first command: real data, the full study's recipe cells, read at 2 epochs
    assert quick.train_subset is None and quick.experiments == ("recipe",) and quick.recipe.epochs == 2
    assert quick.recipe.variants == ("momentum",) and quick.recipe.depths == (1, 3, 4, 5)
    assert {(c.depth, c.variant) for c in quick.cells()} == {
        (1, ""),
        (3, ""),
        (4, ""),
        (5, ""),
        (1, "momentum"),
        (4, "momentum"),
    }
    assert {k: v for k, v in quick.identity(Cell("recipe", 4)).items() if k != "experiment"} == {
        k: v for k, v in full.identity(Cell("recipe", 4)).items() if k != "experiment"
    }  # the same data, split and fixed settings as the full study: only the recipe's epochs and seeds differ
    cells = full.cells()
    assert len(cells) == len(set(cells)) == 14 + 10 + 3
    assert Cell("matched", 1) in cells and Cell("matched", 4, 242_762) in cells
    assert not [c for c in cells if c.shape == "constant"]  # cut to fit 90 minutes (a selection, like budgets)
    with_constant = dataclasses.replace(full, matched=dataclasses.replace(full.matched, constant_budgets=(242_762,)))
    assert {c.depth for c in with_constant.cells() if c.shape == "constant"} == {3, 4, 5}
    assert with_constant.identity(Cell("matched", 4, 242_762)) == full.identity(Cell("matched", 4, 242_762))
    assert {(c.variant, c.depth) for c in cells if c.experiment == "matched" and c.variant} == {
        ("horizon", d) for d in (3, 4, 5)
    }  # the runner-up check is gone: the factorial trains every rate
    assert {(c.variant, c.depth) for c in cells if c.experiment == "recipe" and c.variant} == {
        (v, d) for v in ("momentum", "fastlr", "standardised", "twice") for d in (1, 4)
    }
    fashion = preset("full", "fashion-mnist")
    assert not [c for c in fashion.cells() if c.experiment == "recipe" and c.variant]  # the text's claims are MNIST's
    assert fashion.matched.budgets == (242_762,) and fashion.matched.epochs == 20 and fashion.matched.seeds >= 10
    settings = {e: dataclasses.asdict(getattr(full, e)) for e in ("recipe", "matched")}
    for c in cells:
        assert parse_study_name(study_name("full", c)) == ("full", c)  # every cell's name reads back
        if c.experiment == "matched":
            assert min(cell_widths(c, {}, settings["matched"]), default=16) >= 16
    band = len(full.matched.band)
    assert [full.final_runs(c) for c in (Cell("matched", 4, 242_762), Cell("matched", 1))] == [
        full.matched.seeds * band,
        full.matched.reference_seeds * band,
    ]
    assert full.final_runs(Cell("matched", 4, 242_762, variant="horizon")) == full.matched.check_seeds
    assert full.final_runs(Cell("tuned", 4)) == full.tuned.seeds + 2 * full.tuned.runner_up_seeds
    assert full.n_trials(Cell("matched", 4, 242_762)) == 0  # every rate is a final run
    assert chooser(Cell("matched", 4, 242_762, variant="horizon")) == Cell("matched", 4, 242_762)
    assert full.final_split(3) == full.split_seed + 3 and PRESETS["smoke"].final_split(3) == PRESETS["smoke"].split_seed
    with pytest.raises(UsageError, match="tuning_seed"):
        dataclasses.replace(full, tuning_seed=1)  # a tuning run would be a final run's twin


EXPERIMENT_ARGS = {
    "recipe": ["--experiments", "recipe", "--depths", "1", "4"],
    "matched": ["--experiments", "matched", "--depths", "1", "3", "--budgets", "242762"],
    "tuned": ["--experiments", "tuned", "--depths", "3", "--n-trials", "3"],
}
CELL = ["experiment", "budget", "shape", "variant", "depth"]


@pytest.mark.parametrize("experiment", EXPERIMENT_ARGS)
def test_each_experiment_end_to_end_and_resumed(experiment: str, tmp_path: Path):
    args = [
        "--preset",
        "smoke",
        *EXPERIMENT_ARGS[experiment],
        "--seeds",
        "2",
        "--train-subset",
        "300",
        "--no-report",
        "--out",
        str(tmp_path),
    ]
    study_depth.main(args)
    trials, epochs, final = (
        pd.read_csv(tmp_path / f"{k}.csv", keep_default_na=False) for k in ("trials", "epochs", "final")
    )
    assert set(final.experiment) == {experiment}
    # Accuracy as counts: each run's correct test images over the 10,000, exactly its accuracy; validation too.
    assert (final.test_images == 10_000).all() and (final.test_correct / final.test_images == final.test_accuracy).all()
    if not trials.empty:
        done = trials[trials.state == "complete"]
        assert (done.val_correct / 2_000 == done.val_accuracy).all()  # smoke: a 2,000-image hold-out
    cells = final.groupby(CELL, dropna=False)
    runs = final.groupby([*CELL, "band_point"], dropna=False)  # a matched cell: each rate of its band
    assert all(sorted(g.seed) == [1, 2] and g.source_trial.nunique() == 1 for _, g in runs)  # smoke: 2 per check
    base = final[final.variant == ""]
    if experiment == "recipe":
        assert trials.empty and set(final.source_trial) == {-1} and set(base.param_lr) == {0.03}
        curves = epochs[(epochs.run == "final") & (epochs.variant == "")]
        assert set(curves.epoch) == {1, 2, 3} and curves.test_accuracy.between(0, 1).all()
        assert len(curves) == 2 * 2 * 3  # depths x seeds x epochs: the claims are read from the same runs
        change = final.set_index(["variant", "depth", "seed"])
        assert change.loc[("momentum", 4, 1), "momentum"] == 0.9 and change.loc[("fastlr", 4, 1), "param_lr"] == 0.1
        assert change.loc[("twice", 1, 1), "param_epochs"] == 6 and change.loc[("", 1, 1), "momentum"] == 0.0
        z = change.loc[("standardised", 4, 1)]
        assert z.param_lr == 0.03 and z.momentum == 0.0 and z.test_accuracy != change.loc[("", 4, 1), "test_accuracy"]
    if experiment == "matched":
        assert len(cells) == 4 and trials.empty  # softmax, funnel and constant depth 3, its horizon check: no tuning
        assert set(base[(base.depth == 3) & (base["shape"] == "funnel")].widths) == {"263-132"}
        assert set(base[(base.depth == 3) & (base["shape"] == "constant")].widths) == {"235-235"}
        band = PRESETS["smoke"].matched.band
        for _, g in base.groupby(CELL):  # every rate of the band with every seed
            assert sorted(zip(g.band_point, g.seed)) == [(p, s) for p in range(len(band)) for s in (1, 2)]
            assert sorted(set(g.param_lr)) == pytest.approx(sorted(band)) and set(g.param_epochs) == {3}
        # The workers' choice (coord.band_choice on the storage) and the tables' (factorial.choices) agree: the
        # horizon check retrains, for twice the epochs, the rate its base cell chose on validation.
        from study import factorial

        funnel = base[(base.depth == 3) & (base["shape"] == "funnel")]
        point = next(iter(factorial.choices(funnel).values()))
        horizon = final[final.variant == "horizon"]
        assert set(horizon.band_point) == {point} and set(horizon.param_epochs) == {6}
        assert set(horizon.param_lr) == set(funnel[funnel.band_point == point].param_lr)
    if experiment == "tuned":
        assert meets_budget(budget_rows(tmp_path, 3), 3)
    # Resume: the same command adds nothing; more seeds add exactly the missing runs, old ones kept.
    study_depth.main(args)
    pd.testing.assert_frame_equal(final, pd.read_csv(tmp_path / "final.csv", keep_default_na=False))
    study_depth.main([*args, "--seeds", "3"])
    grown = pd.read_csv(tmp_path / "final.csv", keep_default_na=False)
    grows = base[base.depth != 1] if experiment == "matched" else base  # the softmax reference: reference_seeds
    assert len(grown) == len(final) + len(grows) // 2  # declared cells grow; variants and checks keep their seeds
    # One experiment alone renders a report of what it ran (the recipe alone once died in the cost section).
    from study.report import render

    assert render(tmp_path).read_text().startswith("# Why four layers?")
    key = [*CELL, "band_point", "seed"]
    kept = grown.merge(final[[*key, "test_accuracy"]], on=key, suffixes=("", "_before"))
    assert len(kept) == len(final) and (kept.test_accuracy == kept.test_accuracy_before).all()


def test_running_one_experiment_keeps_the_other_experiments_rows(tmp_path: Path):
    base = ["--preset", "smoke", "--seeds", "1", "--train-subset", "300", "--no-report", "--out", str(tmp_path)]
    study_depth.main([*base, *EXPERIMENT_ARGS["recipe"]])
    study_depth.main([*base, *EXPERIMENT_ARGS["tuned"]])
    assert set(pd.read_csv(tmp_path / "final.csv").experiment) == {"recipe", "tuned"}


def test_another_split_or_sampler_seed_is_its_own_study(tmp_path: Path):
    base = ["--preset", "smoke", *EXPERIMENT_ARGS["tuned"], "--seeds", "1", "--train-subset", "300", "--no-report"]
    study_depth.main([*base, "--out", str(tmp_path / "a")])
    shared = ["--storage", f"sqlite:///{tmp_path / 'a' / 'study.db'}"]  # one storage on purpose, own tables
    p = run_study(*base, "--split-seed", "1", "--sampler-seed", "2", *shared, "--out", str(tmp_path / "b"))
    assert p.returncode == 0, p.stderr
    names = {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'a' / 'study.db'}")}
    assert {"smoke-tuned-depth3", "smoke-split1-sampler2-tuned-depth3"} <= names
    p = run_study(*base, "--split-seed", "1", "--study-name", "smoke", *shared, "--out", str(tmp_path / "a"))
    assert p.returncode == 1 and "split_seed" in p.stderr  # same names, other hold-out: refused
    args = study_depth.parse_args(["--preset", "full", "--tuning-seed", "-2", "--out", str(tmp_path)])
    cfg, _ = study_depth.configs_from_args(args)
    assert (cfg.name, cfg.tuning_seed) == ("full-tuning-2", -2)  # another draw of the tuning noise: its own study


def test_fashion_mnist_study_end_to_end_and_resume_across_datasets_refused(tmp_path: Path):
    args = [
        "--preset",
        "smoke",
        "--dataset",
        "fashion-mnist",
        *EXPERIMENT_ARGS["tuned"],
        "--seeds",
        "2",
        "--train-subset",
        "300",
        "--no-report",
        "--out",
        str(tmp_path),
    ]
    study_depth.main(args)
    final = pd.read_csv(tmp_path / "final.csv")
    assert sorted(final.seed) == [1, 2] and final.study.str.startswith("smoke-fashion-mnist-tuned").all()
    assert json.loads((tmp_path / "config.json").read_text())["dataset"] == "fashion-mnist"
    # Both datasets share one storage under their own names (tables in their own folders)...
    study_depth.main(
        [
            "--storage",
            f"sqlite:///{tmp_path / 'study.db'}",
            *args[:2],
            *EXPERIMENT_ARGS["tuned"],
            "--seeds",
            "1",
            "--train-subset",
            "300",
            "--no-report",
            "--out",
            str(tmp_path / "mnist"),
        ]
    )
    names = {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'study.db'}")}
    assert {"smoke-tuned-depth3", "smoke-fashion-mnist-tuned-depth3"} <= names
    # ... and resuming a study with the other dataset is refused.
    shared = ["--storage", f"sqlite:///{tmp_path / 'study.db'}"]
    p = run_study(*args[:2], "--dataset", "mnist", "--study-name", "smoke-fashion-mnist", *args[4:], *shared)
    assert p.returncode == 1 and "dataset" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie is gone too
    except FileNotFoundError:
        return True


def _post_mortem(proc: subprocess.Popen, workers: list[int]) -> str:
    """For a worker that failed to stop: its parent and signal masks (did the parent-death signal arrive,
    is it pending?), each thread's state and kernel wait channel, then every thread's Python stack (the
    worker prints it on SIGUSR2) read from the dead parent's stderr. A soak on 5393358 saw this test fail
    once in ten runs; this says where, next time. Never raises: a worker may exit while it is read."""
    lines = []
    for w in workers:
        try:
            status = Path(f"/proc/{w}/status").read_text().splitlines()
            keep = ("State", "PPid", "SigPnd", "ShdPnd", "SigBlk", "SigCgt")
            lines.append(f"worker {w}: " + ", ".join(x for x in status if x.startswith(keep)))
            for task in sorted(Path(f"/proc/{w}/task").iterdir()):
                stat, wchan = (task / "stat").read_text(), (task / "wchan").read_text()
                name = stat[stat.index("(") : stat.index(")") + 1]
                lines.append(f"  thread {task.name} {name} state {stat.split(') ')[1][0]} wchan {wchan or '-'}")
            os.kill(w, signal.SIGUSR2)
            time.sleep(1)  # one worker's stacks at a time on the shared stderr
            os.kill(w, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            lines.append(f"worker {w} exited while it was read")
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)  # what has been written; never wait on another holder of the pipe
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return "\n".join([*lines, b"".join(chunks).decode(errors="replace")[-20000:]])


def _workers_started(tmp_path: Path, subset: str = "20000", *extra: str):
    out = tmp_path / "out"
    args = [*TINY, "--depths", "2", "--n-trials", "20", "--train-subset", subset, "--workers", "2", "--out", str(out)]
    args += extra
    proc = subprocess.Popen(
        [sys.executable, "-m", "study.depth", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(out / "study.db", lambda st: [s for _, s in st].count("RUNNING") == 2)
    workers = [c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(workers) == 2
    return proc, workers, out


def test_workers_stop_when_their_parent_is_killed(tmp_path: Path):
    proc, workers, out = _workers_started(tmp_path)
    proc.send_signal(signal.SIGKILL)  # no chance to forward anything: the workers must notice by themselves
    proc.wait()
    for _ in range(1200):  # each finishes its current training step, gives its run back and exits
        if all(_gone(w) for w in workers):
            break
        time.sleep(0.1)
    assert all(_gone(w) for w in workers), f"orphaned workers kept running:\n{_post_mortem(proc, workers)}"
    assert "RUNNING" not in [s for _, s in trial_states(out / "study.db")]  # both runs given back


def test_a_sigterm_while_a_worker_is_being_started_reaches_that_worker_too(tmp_path: Path, monkeypatch):
    # Scripted: the parent is signalled while it starts the first of two workers (inside start()). The
    # forward at that moment knows no started worker; the worker just started must still be told, and the
    # second is never started. Fake processes: no training, only who was sent what.
    from mnist_bench import interrupt
    from study import engine

    sent, real_kill = [], os.kill

    class FakeProcess:
        def __init__(self, target, args, name):
            self.name, self.pid, self.exitcode = name, 10**6 + int(name.split("-")[1]), None

        def start(self):
            signal.raise_signal(signal.SIGTERM)  # the parent's SIGTERM, in the middle of start()

        def is_alive(self):
            return self.exitcode is None

        def join(self):
            self.exitcode = 130 if (self.pid, signal.SIGTERM) in sent else 0

    class FakeContext:
        Process = FakeProcess

    def kill(pid, sig):
        if pid >= 10**6:
            sent.append((pid, sig))
        else:
            real_kill(pid, sig)

    monkeypatch.setattr(engine.multiprocessing, "get_context", lambda method: FakeContext)
    monkeypatch.setattr(engine.os, "kill", kill)
    cfg = StudyConfig(name="p", experiments=("tuned",), tuned=Tuned(depths=(2,), n_trials=1, seeds=1))
    run = RunConfig(storage=f"sqlite:///{tmp_path / 's.db'}", out=tmp_path, workers=2)
    with pytest.raises(interrupt.Interrupted):
        engine.run_workers(cfg, run)
    assert sent == [(10**6, signal.SIGTERM)]  # worker-0 told once; worker-1 never started


def test_a_second_signal_in_the_lone_worker_takes_the_first_ones_path_even_inside_the_heartbeats_join(
    small: MNIST, tmp_path: Path, monkeypatch
):
    # Scripted: Ctrl-C twice while the first run's heartbeat thread is being joined. A KeyboardInterrupt raised
    # there (the old second signal) escaped from inside threading's join; now both only set the stop flag, the
    # finished run is kept, the command stops at its next safe point, and a rerun finishes the same study.
    import threading

    from mnist_bench import interrupt
    from study import engine

    real_join, delivered = threading.Thread.join, []

    def join(self, *args, **kwargs):
        if self.name.startswith("heartbeat-") and not delivered:
            delivered.append(self.name)
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # both handled here, inside the join
        return real_join(self, *args, **kwargs)

    monkeypatch.setattr(threading.Thread, "join", join)
    cfg = StudyConfig(name="p", experiments=("recipe",), recipe=Recipe(depths=(1,), epochs=1, seeds=2, variants=()))
    run = RunConfig(storage=f"sqlite:///{tmp_path / 's.db'}", out=tmp_path, pack=1)
    with pytest.raises(interrupt.Interrupted):
        engine.run_workers(cfg, run, data={"full": small})
    assert delivered
    final = optuna.load_study(study_name="p-recipe-depth1-final", storage=run.storage).get_trials()
    assert [t.state for t in final] == [TrialState.COMPLETE]  # seed 1 kept; seed 2 never started
    monkeypatch.setattr(threading.Thread, "join", real_join)
    engine.run_workers(cfg, run, data={"full": small})
    final = optuna.load_study(study_name="p-recipe-depth1-final", storage=run.storage).get_trials()
    assert sorted(t.user_attrs["seed"] for t in final if t.state == TrialState.COMPLETE) == [1, 2]


NESTED_SIGNALS = """
import signal, sys, threading
from mnist_bench import interrupt

stop = type(interrupt.STOP)() if sys.argv[1] == "stop" else threading.Event()
signal.signal(signal.SIGUSR1, lambda signum, frame: stop.set())  # as a worker's parent-death handler
watched, seen = {type(stop).set.__code__, type(stop).wait.__code__}, set()

def trace(frame, event, arg):
    if frame.f_code in watched and event == "line" and (frame.f_code, frame.f_lineno) not in seen:
        seen.add((frame.f_code, frame.f_lineno))
        signal.raise_signal(signal.SIGUSR1)  # once at each line of set() and wait(): the handler nests there
    return trace

if sys.argv[1] == "event":
    import faulthandler
    faulthandler.dump_traceback_later(5, exit=True)  # where it hangs, then exit 1
sys.settrace(trace)
stop.wait(0.01)
stop.set()
stop.clear()
stop.wait(0.01)
stop.set()
sys.settrace(None)
print("returned", stop.is_set())
"""


def test_a_stop_signal_arriving_while_the_stop_flag_is_being_set_or_waited_on_never_blocks():
    # Scripted interleaving: a signal at each line of the flag's set() and wait(), whose handler sets the
    # flag (as a worker's SIGTERM and parent-death handlers do). threading.Event deadlocks on its own lock
    # there: the control, whose stacks after 5 s show it stuck in threading.py's set. interrupt.STOP's
    # flag returns: the guard against going back to an Event.
    run = [sys.executable, "-c", NESTED_SIGNALS]
    done = subprocess.run([*run, "stop"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "returned True", done.stderr
    hung = subprocess.run([*run, "event"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert hung.returncode != 0 and "returned" not in hung.stdout, hung.stdout
    assert re.search(r'threading\.py", line \d+ in set', hung.stderr), hung.stderr


def test_a_killed_worker_is_one_line_naming_it(tmp_path: Path):
    # Shorter trials and heartbeat (the dead run is failed after 3 s, not 30): the survivor's share is the cost.
    proc, workers, out = _workers_started(tmp_path, "8000", "--heartbeat", "1")
    os.kill(workers[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)  # the other worker finishes the budget, redoing the dead run
    assert proc.returncode == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "worker-1 was killed by SIGKILL" in lines[0] and "see above" not in lines[0], err


def test_a_trial_killed_while_suggesting_never_blocks_tables_or_reruns(tmp_path: Path):
    """A worker stopped hard between suggesting lr and width leaves a failed trial with only lr."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study_depth.main(
        [*TINY, "--depths", "2", "--n-trials", "1", "--seeds", "1", "--storage", url, "--out", str(tmp_path)]
    )
    tune = optuna.load_study(study_name="smoke-tuned-depth2", storage=url)
    tune.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={"lr": 0.1},
            distributions={"lr": FloatDistribution(1e-3, 1.0, log=True)},
            user_attrs={"claim": "tune"},
        )
    )
    study_depth.main(
        [*TINY, "--depths", "2", "--n-trials", "2", "--seeds", "1", "--storage", url, "--out", str(tmp_path)]
    )
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert meets_budget(budget_rows(tmp_path, 2), 2) and "interrupted" in set(trials.state)
    from study.report import render

    assert render(tmp_path).read_text().startswith("# Why four layers?")


def test_a_quick_study_in_a_checkout_never_rewrites_the_committed_results(tmp_path: Path):
    """The default --out follows the preset (smoke: results/smoke), so a smoke or quick study never lands in the
    committed results/; pointed there explicitly it is refused before any work."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "config.json").write_text((ROOT / "results" / "config.json").read_text())
    committed = (results / "config.json").read_bytes()
    args = [sys.executable, "-m", "study.depth", *TINY, "--depths", "2", "--n-trials", "1", "--seeds", "1"]
    p = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (results / "smoke" / "final.csv").is_file()
    assert sorted(f.name for f in results.iterdir()) == ["config.json", "smoke"]
    assert (results / "config.json").read_bytes() == committed
    p = subprocess.run([*args, "--out", "results"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    name = json.loads(committed)["name"]  # full, or full-tuning-2, ...
    assert p.returncode == 2 and f"holds the tables of study {name!r}" in p.stderr and "Traceback" not in p.stderr
    assert sorted(f.name for f in results.iterdir()) == ["config.json", "smoke"]


def test_a_second_sigterm_stops_every_worker_at_once(tmp_path: Path):
    proc, workers, out = _workers_started(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # forwarded: each worker exits without writing anything more
    _, err = proc.communicate(timeout=120)  # liveness, not speed: before, a give-back could wait 60 s per lock
    assert proc.returncode == 130 and "Traceback" not in err and "Exception ignored" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("interrupted"), err
    assert all(_gone(w) for w in workers)


def test_one_study_never_mixes_cells_of_other_shared_settings(tmp_path: Path):
    """config.json and the report state the study-level settings once, so every cell must share them."""
    tuned = ["--preset", "smoke", *EXPERIMENT_ARGS["tuned"], "--seeds", "1", "--no-report", "--out", str(tmp_path)]
    study_depth.main([*tuned, "--train-subset", "300"])
    matched = ["--preset", "smoke", "--experiments", "matched", "--depths", "1", "--seeds", "1", "--no-report"]
    p = run_study(*matched, "--out", str(tmp_path))  # the preset's 5,000-image subset, not 300
    assert p.returncode == 1 and "train_subset" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert json.loads((tmp_path / "config.json").read_text())["train_subset"] == 300
    p = run_study(*matched, "--train-subset", "300", "--out", str(tmp_path))  # the same settings: joins the study
    assert p.returncode == 0, p.stderr
    assert set(pd.read_csv(tmp_path / "final.csv").experiment) == {"tuned", "matched"}
