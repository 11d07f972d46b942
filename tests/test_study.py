"""The depth study end to end on a tiny budget: tables, resumption, interruption, bad input."""
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from study import depth as study_depth
from study.depth import PRESETS, StudyConfig, hidden_widths, SearchSpace

TINY = ["--preset", "quick", "--depths", "2", "3", "--seeds", "2", "--train-subset", "600", "--no-report"]

TRIALS_COLUMNS = {"depth", "trial", "state", "param_lr", "param_width", "param_epochs", "val_accuracy",
                  "epochs_run", "n_params", "train_seconds", "samples_per_s", "device", "threads",
                  "torch_version", "device_name", "study"}
EPOCHS_COLUMNS = {"depth", "trial", "epoch", "train_loss", "val_loss", "val_accuracy", "study",
                  "train_seconds"}
FINAL_COLUMNS = {"depth", "seed", "widths", "param_lr", "param_epochs", "test_accuracy", "test_loss",
                 "train_seconds", "samples_per_s", "device", "threads", "torch_version", "study"}


def run_study(*args):
    return subprocess.run([sys.executable, "-m", "study.depth", *args], capture_output=True, text=True,
                          timeout=600)


def trial_states(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        return con.execute("select s.study_name, t.state from trials t join studies s using (study_id) "
                           "order by t.trial_id").fetchall()


def budget_rows(out: Path, depth: int) -> pd.DataFrame:
    t = pd.read_csv(out / "trials.csv")
    return t[(t.depth == depth) & t.state.isin(["complete", "pruned", "diverged"])]


def test_tiny_study_end_to_end_writes_documented_tables(tmp_path: Path):
    with_report = [a for a in TINY if a != "--no-report"]
    study_depth.main([*with_report, "--n-trials", "3", "--out", str(tmp_path)])
    assert (tmp_path / "report.md").read_text().startswith("# Why four layers?")
    trials, epochs, final = (pd.read_csv(tmp_path / f"{k}.csv") for k in ("trials", "epochs", "final"))
    assert TRIALS_COLUMNS <= set(trials.columns)
    assert EPOCHS_COLUMNS <= set(epochs.columns)
    assert FINAL_COLUMNS <= set(final.columns)
    for d in (2, 3):
        assert len(budget_rows(tmp_path, d)) == 3
        assert sorted(final[final.depth == d].seed) == [1, 2]
    assert trials.state.isin(["complete", "pruned", "diverged", "failed"]).all()
    assert final.test_accuracy.between(0, 1).all()
    # epochs.csv agrees with trials.csv
    runs = epochs.groupby(["depth", "trial"]).size()
    for row in trials.itertuples():
        assert runs.get((row.depth, row.trial), 0) == row.epochs_run


def test_second_run_adds_only_missing_trials_and_reuses_final_runs(tmp_path: Path):
    args = [*TINY, "--out", str(tmp_path)]
    study_depth.main([*args, "--n-trials", "2"])
    first = pd.read_csv(tmp_path / "trials.csv")
    final_first = pd.read_csv(tmp_path / "final.csv")
    study_depth.main([*args, "--n-trials", "2"])  # nothing to do
    again = pd.read_csv(tmp_path / "trials.csv")
    pd.testing.assert_frame_equal(first.drop(columns=["command"]), again.drop(columns=["command"]))
    pd.testing.assert_frame_equal(final_first, pd.read_csv(tmp_path / "final.csv"))
    study_depth.main([*args, "--n-trials", "4"])  # grows the budget: two more per depth
    grown = pd.read_csv(tmp_path / "trials.csv")
    for d in (2, 3):
        assert sorted(budget_rows(tmp_path, d).trial) == [0, 1, 2, 3]
    assert set(first.trial) <= set(grown.trial)


def _interrupt_and_resume(tmp_path: Path, sig: int, extra: list[str]):
    out = tmp_path / "out"
    args = [*TINY, "--n-trials", "5", "--out", str(out), *extra]
    # A larger subset (a trial takes seconds) so a trial is in flight when the signal lands.
    args[args.index("--train-subset") + 1] = "20000"
    proc = subprocess.Popen([sys.executable, "-m", "study.depth", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    db = out / "study.db"
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        if db.exists():
            try:
                states = trial_states(db)
            except sqlite3.OperationalError:
                continue
            if sum(s in ("COMPLETE", "PRUNED") for _, s in states) >= 1 and any(s == "RUNNING" for _, s in states):
                break
    else:
        pytest.fail("never saw a finished trial and one in flight")
    assert proc.poll() is None, "the study finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert any(s == "RUNNING" for _, s in trial_states(db)) == (sig == signal.SIGKILL)
    done = run_study(*args)
    assert done.returncode == 0, done.stderr
    for d in (2, 3):
        rows = budget_rows(out, d)
        assert len(rows) == 5 and rows.trial.is_unique
    assert not any(s == "RUNNING" for _, s in trial_states(db))
    return err


def test_ctrl_c_then_rerun_completes_the_same_budget(tmp_path: Path):
    err = _interrupt_and_resume(tmp_path, signal.SIGINT, [])
    assert "Traceback" not in err and "interrupted" in err


def test_sigkill_then_rerun_completes_the_same_budget(tmp_path: Path):
    # The killed trial stays RUNNING until its heartbeat is 3 s stale; the rerun waits, then re-tunes.
    _interrupt_and_resume(tmp_path, signal.SIGKILL, ["--heartbeat", "1"])


@pytest.mark.parametrize("bad", [
    ["--depths", "0"], ["--n-trials", "-1"], ["--preset", "huge"], ["--seeds", "0"],
    ["--storage", "nosuchdb://x"], ["--storage", "postgresql://nobody@127.0.0.1:1/none"],
    ["--workers", "0"],
])
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


def test_help():
    p = run_study("--help")
    assert p.returncode == 0 and "--storage" in p.stdout and "--preset" in p.stdout


def test_widths_taper_and_floor():
    space = SearchSpace()
    assert hidden_widths(4, 256, 0.5, space) == (256, 128, 64)
    assert hidden_widths(5, 32, 0.25, space) == (32, 8, 8, 8)
    assert hidden_widths(1, 256, 0.5, space) == ()


def test_presets_share_the_documented_defaults():
    assert PRESETS["full"].depths == (3, 4, 5) and PRESETS["full"].seeds == 5
    assert isinstance(PRESETS["quick"], StudyConfig)


def test_workers_sharing_a_storage_do_not_propose_the_same_trials(tmp_path: Path):
    # Trials of a second or more each, so both spawned workers find work left when they are up.
    study_depth.main([*TINY, "--depths", "2", "--n-trials", "6", "--seeds", "1", "--workers", "2",
                      "--train-subset", "8000", "--out", str(tmp_path)])
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert len(budget_rows(tmp_path, 2)) == 6 and trials["worker"].nunique() == 2
    assert trials["param_lr"].is_unique  # same seed in both workers would repeat every proposal
