"""Optuna's gRPC storage proxy (study.serve): the claim protocol through it, scripted step by step, a
worker on the proxy beside one on the database, and the commands end to end."""

import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import Clock, free_port
from optuna.trial import TrialState

from study.coord import BEAT, Ledger, final_key
from study.serve import server
from study.storage import open_storage

GRACE = 30


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture
def proxy(db: str):
    port = free_port()
    srv = server(db, "127.0.0.1", port, threads=8)
    yield f"grpc://127.0.0.1:{port}"
    srv.stop(grace=None).wait()


def ledger(url: str, clock: Clock, name: str = "f", heartbeat: int | None = None) -> Ledger:
    storage = open_storage(url, heartbeat_interval=heartbeat, grace_period=GRACE)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    return Ledger(storage, study, GRACE, clock=clock)


def seed_claim(ledger: Ledger, seed: int):
    return ledger.claim(final_key(0, seed), {"source_trial": 0, "seed": seed})


def test_claims_through_the_proxy_settle_races_and_redo_a_dead_workers_seed(proxy):
    clock = Clock()
    a, b = ledger(proxy, clock), ledger(proxy, clock)
    demand = {final_key(0, s): 1 for s in (1, 2)}
    ta = a.create(final_key(0, 1), {"source_trial": 0, "seed": 1})
    tb = b.create(final_key(0, 1), {"source_trial": 0, "seed": 1})
    assert not b.settle(tb).won and a.settle(ta).won  # the later claim loses, whatever order they settle in
    assert b.open_key(demand) == final_key(0, 2)
    b2 = seed_claim(b, 2)
    a.beat(ta, 1)
    a.finish(ta, TrialState.COMPLETE, 0.97)
    # B dies holding seed 2 (it never beat). A watches, and after the grace period on its clock gives it back.
    assert a.recover_stale() == []
    clock.advance(GRACE + 1)
    assert a.recover_stale() == [b2.number]
    redo = seed_claim(a, 2)
    assert redo.won
    assert b.finish(b2.trial_id, TrialState.COMPLETE, 0.5) is False  # B was only paused: its late result is refused
    a.finish(redo.trial_id, TrialState.COMPLETE, 0.96)
    assert a.finished(demand) and b.finished(demand)
    done = [t for t in a.trials() if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["seed"] for t in done) == [1, 2]


def test_a_beating_claim_through_the_proxy_is_never_failed(proxy):
    clock = Clock()
    a, b = ledger(proxy, clock), ledger(proxy, clock)
    claim = seed_claim(a, 1)
    with a.heartbeat(claim.trial_id, interval=60):
        pass  # the first beat
    assert b.recover_stale() == []
    for count in (2, 3, 4):
        clock.advance(GRACE - 1)
        a.beat(claim.trial_id, count)
        assert b.recover_stale() == []  # seen to move: alive
    clock.advance(GRACE + 1)
    assert b.recover_stale() == [claim.number]


def test_workers_on_the_proxy_and_on_the_database_judge_each_others_claims(db, proxy):
    """A worker on the database records Optuna's heartbeats as well; one on the proxy cannot. Neither kind
    of observer may fail a live claim of the other kind, and each fails a dead one."""
    clock = Clock()
    direct, remote = ledger(db, clock, heartbeat=10), ledger(proxy, clock)
    db_watch, proxy_watch = ledger(db, clock, heartbeat=10), ledger(proxy, clock)
    on_db, on_proxy = seed_claim(direct, 1), seed_claim(remote, 2)
    for count in (1, 2, 3):  # both alive: nobody fails anything
        direct.beat(on_db.trial_id, count)
        remote.beat(on_proxy.trial_id, count)
        assert db_watch.recover_stale() == [] and proxy_watch.recover_stale() == []
        clock.advance(GRACE - 1)
    assert db_watch.storage.get_trial(on_proxy.trial_id).system_attrs[BEAT] == 3
    # The database's worker dies; the proxy's lives on (it has no Optuna heartbeat, only its counter).
    remote.beat(on_proxy.trial_id, 4)
    clock.advance(2)
    assert db_watch.recover_stale() == [on_db.number]
    assert proxy_watch.recover_stale() == []
    # Now the other way round: a redo of seed 1 on the database lives, the proxy's worker dies.
    redo = seed_claim(direct, 1)
    assert redo.won
    for count in (1, 2):
        direct.beat(redo.trial_id, count)
        assert proxy_watch.recover_stale() == [] and db_watch.recover_stale() == []
        clock.advance(GRACE - 1 if count == 1 else 2)
    assert proxy_watch.recover_stale() == [on_proxy.number]
    assert db_watch.storage.get_trial(on_proxy.trial_id).state == TrialState.FAIL
    assert db_watch.storage.get_trial(redo.trial_id).state == TrialState.RUNNING


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


TINY = ["--preset", "smoke", "--experiments", "tuned", "--depths", "2", "--train-subset", "600", "--no-report"]


def test_a_study_through_the_proxy_finishes_exactly_and_a_rerun_redoes_nothing(proxy, db, tmp_path: Path):
    out = tmp_path / "out"
    args = ["study.depth", *TINY, "--n-trials", "3", "--seeds", "2", "--workers", "2", "--storage", proxy]
    first = run(*args, "--out", str(out))
    assert first.returncode == 0, first.stderr
    trials, final = pd.read_csv(out / "trials.csv"), pd.read_csv(out / "final.csv")
    assert len(trials[trials.state == "complete"]) == 3 and sorted(final.seed) == [1, 2]
    storage = open_storage(db)

    def stored() -> list[tuple[int, str]]:
        return [
            (t._trial_id, t.state.name) for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)
        ]

    before = stored()
    assert sum(state == "COMPLETE" for _, state in before) == 5  # three trials and two seeds, each run once
    again = run(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert stored() == before  # the rerun redid nothing
    report = run("study.report", "--storage", proxy, "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr


def test_a_proxy_that_does_not_answer_is_one_line(tmp_path: Path):
    port = free_port()
    done = run("study.depth", *TINY, "--storage", f"grpc://127.0.0.1:{port}", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: no gRPC storage proxy answers at 127.0.0.1:{port} (waited 10 s); start one with "
        f"`python -m study.serve --storage URL --port {port}` on that machine"
    ]
    bad = run("study.depth", *TINY, "--storage", "grpc://no-port", "--out", str(tmp_path), timeout=120)
    assert bad.returncode == 2 and "expected grpc://HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_refuses_a_taken_port_and_a_proxy_url_in_one_line(proxy, db):
    port = proxy.rsplit(":", 1)[1]
    other = Path(db.removeprefix("sqlite:///")).with_name("other.db")
    taken = run("study.serve", "--storage", f"sqlite:///{other}", "--port", port, timeout=60)
    assert taken.returncode == 1 and "Traceback" not in taken.stderr
    assert taken.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert not other.exists()  # refused before any database was made
    chained = run("study.serve", "--storage", proxy, timeout=60)
    assert chained.returncode == 2 and "a proxy does not serve another proxy" in chained.stderr
    assert run("study.serve", "--storage", db, "--port", "70000", timeout=60).returncode == 2
