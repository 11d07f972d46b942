"""Several workers on one PostgreSQL-backed study, end to end: a worker killed while holding a final
run, a lost connection, and the report read back from the storage (the protocol itself is tested step
by step in test_coord.py). Needs the server on 127.0.0.1:5432 (see conftest.pg_url)."""

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import PG_ADMIN_URL
from optuna.trial import TrialState

from study.config import failed_run

pytestmark = pytest.mark.postgres

BASE = [
    "--preset",
    "smoke",
    "--experiments",
    "tuned",
    "--depths",
    "2",
    "3",
    "--seeds",
    "3",
    "--train-subset",
    "1500",
    "--threads",
    "1",
    "--no-report",
]


def start_worker(url: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "study.depth", *BASE, "--storage", url, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def budget_states(url: str, name: str) -> list[TrialState]:
    study = optuna.load_study(study_name=name, storage=url)
    return [t.state for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]


def assert_exact(url: str, n_trials: int, seeds: int, depths=(2, 3)):
    for d in depths:
        study = optuna.load_study(study_name=f"smoke-tuned-depth{d}", storage=url)
        done = [
            t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not t.user_attrs.get("surplus")
        ]
        done = [t for t in done if t.state != TrialState.FAIL]
        failed = sum(failed_run(t.value, diverged=t.user_attrs.get("diverged")) for t in done)
        assert len(done) == n_trials + min(failed, n_trials)  # failed trials replaced, up to twice the budget
        states = budget_states(url, f"smoke-tuned-depth{d}")
        assert TrialState.RUNNING not in states
        final = optuna.load_study(study_name=f"smoke-tuned-depth{d}-final", storage=url)
        done = [
            t
            for t in final.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not t.user_attrs.get("surplus")
        ]
        assert sorted(t.user_attrs["seed"] for t in done) == list(range(1, seeds + 1))
        assert len({t.user_attrs["source_trial"] for t in done}) == 1
        assert not final.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def holder_of_running_final(storage: optuna.storages.BaseStorage, name: str) -> str | None:
    """The worker (host:pid) that holds a RUNNING final-run trial, if any. Polled many times a second, so
    on one storage opened once: each optuna.load_study(storage=URL) opens an engine whose connection stays
    open until the garbage collector finds it (up to 37 at once here, enough that a second copy of the
    suite on the same server hit PostgreSQL's max_connections)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not t.user_attrs.get("surplus"):
            return t.user_attrs.get("worker")
    return None


def test_worker_killed_holding_a_final_run_the_others_finish_exactly(pg_url: str, tmp_path: Path):
    # Two workers, each its own command; one is SIGKILLed while it holds a RUNNING final-run trial.
    # The survivor and a restarted worker finish with exactly K distinct seeds and the exact budget.
    args = ["--depths", "2", "--n-trials", "4", "--seeds", "4", "--heartbeat", "1", "--train-subset", "20000"]
    watcher = optuna.storages.RDBStorage(pg_url)  # before the workers: it creates Optuna's tables
    workers = {}
    for i in range(2):
        w = start_worker(pg_url, tmp_path / f"w{i}", *args)
        workers[w.pid] = w
    deadline = time.time() + 180
    victim = None
    try:
        while time.time() < deadline and victim is None:
            time.sleep(0.05)
            holder = holder_of_running_final(watcher, "smoke-tuned-depth2-final")
            if holder is not None:
                victim = workers.get(int(holder.rsplit(":", 1)[1]))
    finally:
        watcher.engine.dispose()
    assert victim is not None, "never saw a worker holding a final run"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    restarted = start_worker(pg_url, tmp_path / "restarted", *args)
    for w in [*(w for w in workers.values() if w is not victim), restarted]:
        code, err = finish(w)
        assert code == 0, err
    assert_exact(pg_url, n_trials=4, seeds=4, depths=(2,))
    final = optuna.load_study(study_name="smoke-tuned-depth2-final", storage=pg_url)
    assert any(
        t.state == TrialState.FAIL and not t.user_attrs.get("surplus") for t in final.get_trials(deepcopy=False)
    )  # the dead run, failed by its heartbeat
    table = pd.read_csv(tmp_path / "restarted" / "final.csv")
    assert sorted(table.seed) == [1, 2, 3, 4] and table.source_trial.nunique() == 1
    survivor = next(w for w in workers.values() if w is not victim)
    out = tmp_path / f"w{list(workers.values()).index(survivor)}"
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "final.csv").drop(columns="command"), table.drop(columns="command")
    )  # every worker writes the same tables


class Proxy:
    """A TCP relay to PostgreSQL that the test can cut, like a network partition."""

    def __init__(self, target=("127.0.0.1", 5432)):
        self.target = target
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.alive = True
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while self.alive:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.alive:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        self.alive = False
        self.server.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


def test_lost_connection_is_one_line_and_a_restart_continues(pg_url: str, tmp_path: Path):
    proxy = Proxy()
    via_proxy = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    # --heartbeat 1 on both commands: a study keeps the heartbeat it started with, and the restart then
    # redoes the run the cut left RUNNING after 3 s instead of 30.
    w = start_worker(via_proxy, tmp_path / "w", "--n-trials", "6", "--train-subset", "6000", "--heartbeat", "1")
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            if len(budget_states(pg_url, "smoke-tuned-depth2")) >= 2:
                break
        except KeyError:
            continue
    proxy.cut()
    code, err = finish(w, timeout=120)
    assert code == 1, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "lost the connection to the storage" in lines[0], err
    assert "Traceback" not in err
    code, err = finish(
        start_worker(pg_url, tmp_path / "w", "--n-trials", "6", "--heartbeat", "1", "--train-subset", "6000")
    )
    assert code == 0, err
    assert_exact(pg_url, n_trials=6, seeds=3)
    # The report renders from the storage alone, as on any machine that can reach it.
    out = tmp_path / "report"
    p = subprocess.run(
        [sys.executable, "-m", "study.report", "--storage", pg_url, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert (out / "report.md").read_text().startswith("# Why four layers?")
    assert len(pd.read_csv(out / "final.csv")) == 2 * 3


ZONE_SCRIPT = """
import sys, datetime, optuna
from study.storage import open_storage
storage = open_storage(sys.argv[1], heartbeat_interval=10, grace_period=30)
study = optuna.load_study(study_name="tz", storage=storage)
if sys.argv[2] == "beat":
    storage.record_heartbeat(int(sys.argv[3]))
print(storage._get_stale_trial_ids(study._study_id))
"""


def _stale_from(pg_url: str, zone: str, *args: str) -> str:
    env = {**__import__("os").environ, "PGTZ": zone, "TZ": zone}
    p = subprocess.run([sys.executable, "-c", ZONE_SCRIPT, pg_url, *args], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_sessions_in_other_time_zones_agree_on_every_heartbeat(pg_url: str):
    """A worker with PGTZ=Asia/Tokyo once wrote heartbeats 9 hours ahead (never stale to a UTC reader),
    and a Tokyo reader failed a live UTC worker's runs as stale. Every session now runs in UTC."""
    import datetime

    import sqlalchemy

    from study.storage import open_storage

    storage = open_storage(pg_url, heartbeat_interval=10, grace_period=30)
    study = optuna.create_study(study_name="tz", storage=storage)
    live_utc = study.ask()._trial_id
    live_tokyo = study.ask()._trial_id
    storage.record_heartbeat(live_utc)  # a live worker in UTC
    assert _stale_from(pg_url, "Asia/Tokyo", "beat", str(live_tokyo)) == "[]"  # Tokyo judges the UTC beat fresh
    assert _stale_from(pg_url, "America/Los_Angeles", "look") == "[]"
    assert storage._get_stale_trial_ids(study._study_id) == []  # UTC judges the Tokyo beat fresh
    engine = sqlalchemy.create_engine(pg_url)
    with engine.connect() as con:
        beats = con.execute(sqlalchemy.text("select heartbeat from trial_heartbeats")).scalars().all()
        server_utc = con.execute(sqlalchemy.text("select now() at time zone 'UTC'")).scalar()
    engine.dispose()
    assert len(beats) == 2 and all(abs(server_utc - b) < datetime.timedelta(minutes=10) for b in beats)
    with storage.engine.connect() as con:
        assert con.execute(sqlalchemy.text("show timezone")).scalar() == "UTC"
        assert con.execute(sqlalchemy.text("show statement_timeout")).scalar() == "2min"


def test_a_full_server_is_waited_for_when_opening_and_mid_run_and_then_named_in_one_line(pg_url: str, monkeypatch):
    # Scripted, on the real server: a role allowed three connections (what Optuna takes while it creates
    # its schema) has them all held, so the worker is refused with PostgreSQL's own "too many connections"
    # (SQLSTATE 53300, as for max_connections). The worker's first wait frees the slots and it goes on:
    # when it opens the storage, and when it needs a new connection mid-run. With the slots held for good
    # it gives up after its bounded wait, with one line that names the limit to raise.
    import uuid

    import sqlalchemy

    import study.storage as storage_module
    from study.storage import StudyError, open_storage

    role = f"mnist_bench_limited_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    url = sqlalchemy.make_url(pg_url).set(username=role).render_as_string(hide_password=False)

    def connections() -> int:
        with admin.connect() as con:
            query = "select count(*) from pg_stat_activity where usename = :role"
            return con.execute(sqlalchemy.text(query), {"role": role}).scalar()

    def hold_every_slot() -> list:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        return [engine.connect() for _ in range(3)]

    def free(held: list) -> None:
        for con in held:
            con.close()
        deadline = time.monotonic() + 60  # a server process ends a moment after its client closes
        while connections() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connections() == 0

    waits = []

    def first_wait_frees_the_slots(seconds: float) -> None:
        waits.append(seconds)
        free(held)

    try:
        with sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT").connect() as con:
            con.execute(sqlalchemy.text(f'create role "{role}" login connection limit 3'))
            con.execute(sqlalchemy.text(f'grant all on schema public to "{role}"'))
        monkeypatch.setattr(storage_module, "pause", first_wait_frees_the_slots)

        held = hold_every_slot()
        storage = open_storage(url)  # opening
        assert storage.get_all_studies() == [] and len(waits) == 1

        storage.engine.dispose()
        held = hold_every_slot()
        assert storage.get_all_studies() == [] and len(waits) == 2  # a new connection mid-run

        storage.engine.dispose()
        held = hold_every_slot()
        ticks = iter(range(0, 10_000, 30))  # each look at the clock: 30 s later
        monkeypatch.setattr(storage_module, "clock", lambda: next(ticks))
        monkeypatch.setattr(storage_module, "pause", lambda s: None)
        with pytest.raises(StudyError, match="refused every new connection for 120 s .*role's CONNECTION LIMIT"):
            open_storage(url)
        with pytest.raises(StudyError, match="refused every new connection for 120 s .*same command again"):
            storage.get_all_studies()
        free(held)
    finally:
        with sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT").connect() as con:
            kill = "select pg_terminate_backend(pid) from pg_stat_activity where usename = :role"
            con.execute(sqlalchemy.text(kill), {"role": role})
            con.execute(sqlalchemy.text(f'drop owned by "{role}"'))
            con.execute(sqlalchemy.text(f'drop role if exists "{role}"'))
        admin.dispose()


def test_a_storage_password_never_leaves_the_process(pg_url, tmp_path: Path):
    """The password of a --storage URL is masked (***) on stdout, in the tables' command column and in every
    attribute stored in the database; the server trusts local connections, so it is not even needed."""
    import sqlalchemy

    secret = "S3cretPassw0rd"
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@")
    assert secret in url
    out = tmp_path / "out"
    args = ["--preset", "smoke", "--experiments", "tuned", "--depths", "3", "--n-trials", "1", "--seeds", "1"]
    p = subprocess.run(
        [sys.executable, "-m", "study.depth", *args, "--train-subset", "300", "--no-report", "--storage", url,
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert secret not in p.stdout + p.stderr and "postgres:***@" in p.stdout
    for f in out.iterdir():
        assert secret not in f.read_text(errors="replace"), f.name
    assert (pd.read_csv(out / "final.csv")["command"].str.contains("postgres:\\*\\*\\*@")).all()
    engine = sqlalchemy.create_engine(pg_url)
    try:
        with engine.connect() as con:
            for table in ("trial_user_attributes", "trial_system_attributes", "study_user_attributes"):
                values = con.execute(sqlalchemy.text(f"select value_json from {table}")).scalars().all()
                assert values and not any(secret in v for v in values), table
    finally:
        engine.dispose()
