"""The kill test's audit: what it accepts as exact and what it reports as broken (the scale run itself
needs PostgreSQL and dozens of processes: `python -m study.scaleout --kill-test`)."""

import datetime
import json
from pathlib import Path

import optuna
from optuna.trial import TrialState, create_trial

from study.config import Cell, study_name
from study.scaleout import KILL_DEPTHS, audit

KILLED_AT = datetime.datetime(2026, 1, 1, 12, 0, 0)


def storage_with(tmp_path: Path, seeds: list[int], running: bool = False) -> str:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    for depth in KILL_DEPTHS:
        tune = optuna.create_study(storage=url, study_name=study_name("smoke", Cell("tuned", depth)))
        for _ in range(2):
            tune.add_trial(create_trial(value=0.9, user_attrs={"claim": "tune"}))
        final = optuna.create_study(storage=url, study_name=study_name("smoke", Cell("tuned", depth), final=True))
        for s in seeds:
            final.add_trial(create_trial(value=0.9, user_attrs={"seed": s, "worker": "h:1"}))
        # The killed worker's claim, failed as stale 7 s after the kill.
        final.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"seed": 1, "worker": "h:2"}))
    if running:
        tune.ask()
    storage = optuna.storages.RDBStorage(url)
    with storage.engine.begin() as con:  # when the stale claims were failed
        con.exec_driver_sql(
            "update trials set datetime_start = ?, datetime_complete = ? where state = 'FAIL'",
            (KILLED_AT, KILLED_AT + datetime.timedelta(seconds=7)),
        )
    storage.engine.dispose()
    return url


def run_audit(url: str) -> dict:
    killed = [(json.dumps("h:2"), KILLED_AT)]
    return audit(url, "postgresql", 2, n_trials=2, seeds=2, killed=killed, peak=3, hang=False, wall=1.0, errors=[])


def test_an_exact_study_passes_and_the_kill_to_failed_time_is_read_from_the_storage(tmp_path):
    row = run_audit(storage_with(tmp_path, [1, 2]))
    assert row["exact"] and row["problems"] == ""
    assert row["kills_holding_a_claim"] == len(KILL_DEPTHS) and row["kill_to_failed_median_s"] == 7.0


def test_a_seed_run_twice_a_missing_seed_and_a_run_left_running_are_each_reported(tmp_path):
    row = run_audit(storage_with(tmp_path, [1, 1], running=True))
    assert not row["exact"]
    assert "final seeds [1, 1], expected each of 1..2 once" in row["problems"]
    assert "1 trial(s) left running or waiting" in row["problems"]


def test_memory_for_the_kill_test_counts_free_swap_and_is_none_without_meminfo(tmp_path):
    from study.scaleout import available_memory_mb

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 24000000 kB\nMemAvailable: 2048000 kB\nSwapTotal: 4096000 kB\nSwapFree: 1024000 kB\n")
    assert available_memory_mb(meminfo) == (2048000 + 1024000) // 1024
    meminfo.write_text("MemTotal: 24000000 kB\nMemAvailable: 2048000 kB\n")  # no swap lines
    assert available_memory_mb(meminfo) == 2000
    assert available_memory_mb(tmp_path / "absent") is None
