"""Scale-out on PostgreSQL, two measurements (each setting gets its own fresh database):

    python -m study.scaleout               # throughput: one vs two workers, 240 trials each; results/scaleout.csv
    python -m study.scaleout --kill-test   # 32 workers on PostgreSQL, then 64 through Optuna's gRPC proxy,
                                           # random SIGKILLs and restarts; results/scaletest.csv

Both need a PostgreSQL server where a database can be created: MNIST_BENCH_PG_URL (default
postgresql://postgres@127.0.0.1:5432/postgres) names the admin connection. Workers are separate
`python -m study.depth` commands, started as they would be on separate machines.
Throughput counts trials per minute from the storage (first trial start to last trial end), so
process start-up is excluded. The kill test runs tiny tuned studies (300 training images, at most 3
epochs), kills a random worker every few seconds and starts the same command again at once, then
checks what the claim protocol promises: every tuning budget exact, every seed exactly once, nothing
left running, no hang. It records claims per second, the time from each kill to the moment the
killed run was failed as stale (the redo can start then), and the database's peak connection count.
"""

from __future__ import annotations

from mnist_bench import cli

cli.starting(__name__)

import contextlib
import datetime
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import sqlalchemy
from optuna.trial import TrialState

from mnist_bench.env import environment
from mnist_bench.errors import UsageError, UserError
from mnist_bench.interrupt import Interrupted
from mnist_bench.redact import redact

from .config import MAX_DEPTH, Cell, study_name
from .coord import SURPLUS, failed_trial
from .storage import first_line, open_proxy

ADMIN_URL = os.environ.get("MNIST_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def fresh_database(admin: sqlalchemy.Engine) -> Iterator[tuple[str, str]]:
    """(name, URL) of a new PostgreSQL database, dropped afterwards whatever happens. The name carries this
    command's process id, so a command (or a test) can tell its own databases from another's on one server."""
    name = f"mnist_bench_scaleout_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as con:
            con.execute(sqlalchemy.text(f'create database "{name}"'))
    except sqlalchemy.exc.SQLAlchemyError as e:  # a role without CREATEDB, a full server disk: one line
        raise UserError(
            f"cannot create a database at {redact(ADMIN_URL)!r} ({first_line(e)}); "
            "MNIST_BENCH_PG_URL must name a role that may CREATE DATABASE"
        ) from None
    try:
        yield name, ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as con:
            con.execute(sqlalchemy.text(f'drop database if exists "{name}" with (force)'))


def run_setting(admin: sqlalchemy.Engine, workers: int, n_trials: int, depth: int, extra: list[str]) -> dict:
    with fresh_database(admin) as (_, url):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "study.depth",
                "--preset",
                "smoke",
                "--experiments",
                "tuned",
                "--depths",
                str(depth),
                "--n-trials",
                str(n_trials),
                "--seeds",
                "1",
                "--threads",
                "1",
                "--no-report",
                "--storage",
                url,
                *extra,
            ]
            start = time.perf_counter()
            procs: list[subprocess.Popen] = []
            try:
                for i in range(workers):  # each worker's one-line error goes to a file: this command says one line
                    with open(f"{tmp}/w{i}.err", "w", encoding="utf-8") as err:
                        procs.append(
                            subprocess.Popen([*cmd, "--out", f"{tmp}/w{i}"], stdout=subprocess.DEVNULL, stderr=err)
                        )
                codes = [p.wait() for p in procs]
            finally:
                stop(procs)
            wall = time.perf_counter() - start
            for i, code in enumerate(codes):
                if code:
                    lines = Path(f"{tmp}/w{i}.err").read_text(encoding="utf-8").strip().splitlines()
                    raise UserError(f"worker {i} exited with {code}: {lines[-1] if lines else 'no message'}")
        study = optuna.load_study(study_name=study_name("smoke", Cell("tuned", depth)), storage=url)
        trials = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if not t.user_attrs.get("surplus")
        ]
        first = min(t.datetime_start for t in trials)
        last = max(t.datetime_complete for t in trials)
        span = (last - first).total_seconds()
        return {
            "workers": workers,
            "depth": depth,
            "n_trials": n_trials,
            "finished_trials": len(trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "tuning_seconds": span,
            "trials_per_minute": 60 * len(trials) / span,
            "trial_train_seconds": sum(t.user_attrs.get("train_seconds", 0.0) for t in trials),
            "epochs_trained": sum(len(t.user_attrs.get("curve", [])) for t in trials),
            "epochs_per_minute": 60 * sum(len(t.user_attrs.get("curve", [])) for t in trials) / span,
            "command_seconds": wall,
        }


def stop(procs: list[subprocess.Popen]) -> None:
    """Workers still running (the command was interrupted): stop them at a safe point, then for good."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


KILL_DEPTHS = (2, 3)


def kill_test(
    admin: sqlalchemy.Engine, kind: str, workers: int, n_trials: int, seeds: int, kills: int, seed: int = 0
) -> dict:
    """`workers` study commands on one fresh database, directly ("postgresql") or through a gRPC proxy
    ("grpc"), with `kills` random SIGKILLs, each followed at once by the same command again. Returns the
    row of the scale table; raises UserError if the protocol broke a promise."""
    rng = random.Random(seed)
    with fresh_database(admin) as (name, url), tempfile.TemporaryDirectory() as tmp:
        proxy = None
        if kind == "grpc":
            port = free_port()
            proxy = subprocess.Popen(
                [sys.executable, "-m", "study.serve", "--storage", url, "--port", str(port), "--threads", "64"],
                stdout=subprocess.DEVNULL,
                stderr=open(f"{tmp}/proxy.err", "w", encoding="utf-8"),  # noqa: SIM115 - the child keeps it
            )
            url_for_workers = f"grpc://127.0.0.1:{port}"
            open_proxy(url_for_workers, timeout=120).close()  # workers start once the proxy answers
        else:
            url_for_workers = url
        cmd = [
            sys.executable,
            "-m",
            "study.depth",
            *("--preset", "smoke", "--experiments", "tuned", "--depths", *map(str, KILL_DEPTHS)),
            *("--n-trials", str(n_trials), "--seeds", str(seeds), "--train-subset", "300"),
            *("--workers", "1", "--threads", "1", "--heartbeat", "2", "--no-report", "--storage", url_for_workers),
        ]
        procs: dict[int, subprocess.Popen] = {}

        def start(i: int) -> None:
            with open(f"{tmp}/w{i}.err", "a", encoding="utf-8") as err:
                procs[i] = subprocess.Popen([*cmd, "--out", f"{tmp}/w{i}"], stdout=subprocess.DEVNULL, stderr=err)

        watcher = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
        killed: list[tuple[str, datetime.datetime]] = []  # (worker id as stored on its claims, when)
        peak, hang = 0, False
        began = time.monotonic()
        try:
            for i in range(workers):
                start(i)
            next_kill = None
            while any(p.poll() is None for p in procs.values()):
                with watcher.connect() as con:
                    peak = max(peak, con.execute(CONNECTIONS, {"n": name}).scalar_one())
                    try:
                        holders = set(con.execute(HOLDERS).scalars())
                    except sqlalchemy.exc.ProgrammingError:  # Optuna's tables do not exist yet
                        holders = set()
                now = time.monotonic()
                if next_kill is None and holders:
                    next_kill = now + rng.uniform(2, 6)  # the first kill once claims are being held
                if next_kill is not None and now >= next_kill and len(killed) < kills:
                    # A worker holding a claim, so each kill leaves a run for the protocol to recover.
                    victims = [i for i, p in procs.items() if p.poll() is None and worker_id(p.pid) in holders]
                    if victims:
                        i = rng.choice(victims)
                        victim = procs[i]
                        victim.send_signal(signal.SIGKILL)
                        killed.append((worker_id(victim.pid), datetime.datetime.now()))
                        victim.wait()
                        start(i)  # the same command again, as a supervisor would
                        next_kill = now + rng.uniform(2, 6)
                if now - began > HANG_SECONDS:
                    hang = True
                    break
                time.sleep(0.5)
        finally:
            stop(list(procs.values()))
            if proxy is not None:
                stop([proxy])
            watcher.dispose()
        wall = time.monotonic() - began
        errors = [
            f"worker {i}: {lines[-1]}"
            for i, p in procs.items()
            if p.returncode not in (0, None)
            and (lines := Path(f"{tmp}/w{i}.err").read_text(encoding="utf-8").strip().splitlines())
        ]
        return audit(url, kind, workers, n_trials, seeds, killed, peak, hang, wall, errors)


HANG_SECONDS = 1800
CONNECTIONS = sqlalchemy.text("select count(*) from pg_stat_activity where datname = :n")
# Who holds a running claim: Optuna stores user attrs as JSON text, the worker's id as a JSON string.
HOLDERS = sqlalchemy.text(
    "select a.value_json from trial_user_attributes a join trials t on t.trial_id = a.trial_id "
    "where t.state = 'RUNNING' and a.key = 'worker'"
)


def worker_id(pid: int) -> str:
    """A worker's id as it stores it on its claims (study.engine.work): JSON text of host:pid."""
    return json.dumps(f"{os.uname().nodename}:{pid}")


def audit(url, kind, workers, n_trials, seeds, killed, peak, hang, wall, errors) -> dict:
    """What the storage holds after a kill test, checked against the protocol's promises."""
    storage = optuna.storages.RDBStorage(url)
    try:
        studies = {s.study_name: storage.get_all_trials(s._study_id, deepcopy=False) for s in storage.get_all_studies()}
    finally:
        storage.engine.dispose()
    every = [t for ts in studies.values() for t in ts]
    broken = []
    for depth in KILL_DEPTHS:
        tune = studies.get(study_name("smoke", Cell("tuned", depth)), [])
        final = studies.get(study_name("smoke", Cell("tuned", depth), final=True), [])
        counted = [t for t in tune if t.state == TrialState.COMPLETE and not t.user_attrs.get(SURPLUS)]
        failed = sum(failed_trial(t) for t in counted)
        if len(counted) != n_trials + min(failed, n_trials):
            broken.append(f"depth {depth}: {len(counted)} tuning trials counted, budget {n_trials} (+{failed} failed)")
        done = sorted(t.user_attrs["seed"] for t in final if t.state == TrialState.COMPLETE)
        if done != list(range(1, seeds + 1)):
            broken.append(f"depth {depth}: final seeds {done}, expected each of 1..{seeds} once")
    left = [t for t in every if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    if left:
        broken.append(f"{len(left)} trial(s) left running or waiting")
    by_worker: dict[str, list] = {}
    for t in every:
        by_worker.setdefault(t.user_attrs.get("worker"), []).append(t)
    latencies = []
    for worker, at in killed:
        worker = json.loads(worker)
        stale = [t for t in by_worker.get(worker, []) if t.state == TrialState.FAIL and t.datetime_complete is not None]
        latencies += [(t.datetime_complete - at).total_seconds() for t in stale if t.datetime_complete >= at]
    starts = [t.datetime_start for t in every if t.datetime_start is not None]
    ends = [t.datetime_complete for t in every if t.datetime_complete is not None]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
    return {
        "storage": kind,
        "workers": workers,
        "tuning_budget_per_depth": n_trials,
        "seeds_per_depth": seeds,
        "depths": len(KILL_DEPTHS),
        "kills": len(killed),
        "kills_holding_a_claim": len(latencies),
        "claims": len(every),
        "surplus_claims": sum(bool(t.user_attrs.get(SURPLUS)) for t in every),
        "claims_per_second": len(every) / span if span > 0 else float("nan"),
        "kill_to_failed_median_s": statistics.median(latencies) if latencies else float("nan"),
        "kill_to_failed_max_s": max(latencies) if latencies else float("nan"),
        "grace_s": 6,
        "peak_db_connections": peak,
        "wall_seconds": wall,
        "hang": hang,
        "worker_errors": len(errors),
        "exact": not broken and not hang and not errors,
        "problems": "; ".join([*broken, *errors[:3]]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("python -m study.scaleout", __doc__)
    p.add_argument(
        "--n-trials",
        type=cli.bounded_int(1, 10_000, "tuning trials per setting"),
        default=240,  # 48 ran for 10 s, too short for a steady ratio (1.40x there, 1.87-1.90x at 240)
        help="tuning budget per setting (default: 240)",
    )
    p.add_argument(
        "--depth", type=cli.bounded_int(1, MAX_DEPTH, "Linear layers"), default=4, help="the depth tuned (default: 4)"
    )
    p.add_argument(
        "--out", type=cli.path_arg, default=cli.RESULTS_DIR, help="folder for scaleout.csv (default: results/)"
    )
    p.add_argument(
        "--kill-test",
        action="store_true",
        help="instead: many workers with random SIGKILLs and restarts, on PostgreSQL and through the gRPC proxy",
    )
    p.add_argument(
        "--postgres-workers",
        type=cli.bounded_int(0, 1000, "worker commands"),
        default=32,
        help="kill test: workers on the database directly (default: 32; 0 skips)",
    )
    p.add_argument(
        "--grpc-workers",
        type=cli.bounded_int(0, 1000, "worker commands"),
        default=64,
        help="kill test: workers through one gRPC proxy (default: 64; 0 skips)",
    )
    p.add_argument(
        "--kills",
        type=cli.bounded_int(0, 1000, "SIGKILLs"),
        default=8,
        help="kill test: SIGKILLs per setting (default: 8)",
    )
    p.add_argument(
        "--seeds",
        type=cli.bounded_int(1, 1000, "final runs"),
        default=8,
        help="kill test: seeds per depth (default: 8)",
    )
    args = p.parse_args(argv)
    if not ADMIN_URL.startswith("postgresql"):
        raise UsageError(
            f"MNIST_BENCH_PG_URL must be a postgresql:// URL (it creates a database per run), got {ADMIN_URL!r}"
        )
    path = cli.prepare_out(args.out, "scaletest.csv" if args.kill_test else "scaleout.csv")
    try:
        admin = sqlalchemy.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as con:
            con.execute(sqlalchemy.text("select 1"))
    except Exception as e:  # noqa: BLE001 - a bad URL or an unreachable server: one line
        raise UserError(
            f"PostgreSQL not reachable at {ADMIN_URL!r} ({first_line(e)}); set MNIST_BENCH_PG_URL"
        ) from None
    if args.kill_test:
        return write_kill_test(admin, args, path)
    try:
        rows = [run_setting(admin, w, args.n_trials, args.depth, []) for w in (1, 2)]
    except KeyboardInterrupt:
        raise Interrupted("interrupted: workers stopped, their databases dropped; nothing written") from None
    df = pd.DataFrame(rows).assign(**environment("cpu", 1), storage="postgresql")
    ratio = df.trials_per_minute.iloc[1] / df.trials_per_minute.iloc[0]
    work = df.epochs_per_minute.iloc[1] / df.epochs_per_minute.iloc[0]
    df["trials_per_minute_ratio_vs_1"] = df.trials_per_minute / df.trials_per_minute.iloc[0]
    df.to_csv(path, index=False)
    print(
        df[
            ["workers", "finished_trials", "pruned", "tuning_seconds", "trials_per_minute", "epochs_per_minute"]
        ].to_string(index=False, float_format=lambda v: f"{v:.2f}")
    )
    print(f"two workers / one worker: {ratio:.2f}x trials per minute, {work:.2f}x epochs per minute")
    print(f"wrote {path}")
    return 0


WORKER_MEMORY_MB = 500  # private memory of one worker command: PyTorch and the data (measured: 485 MB)


def available_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable plus SwapFree from /proc/meminfo (None where there is no such file). Swap counts: most
    of a worker's private memory is what `import torch` touches once and never again (measured: 279 MB
    of native static initialisation), which a kernel swaps out without slowing the worker."""
    try:
        fields = {
            k: int(v.split()[0])
            for k, _, v in (line.partition(":") for line in meminfo.read_text(encoding="utf-8").splitlines())
            if v
        }
    except (OSError, ValueError, IndexError):
        return None
    if "MemAvailable" not in fields:
        return None
    return (fields["MemAvailable"] + fields.get("SwapFree", 0)) // 1024


def write_kill_test(admin: sqlalchemy.Engine, args, path: Path) -> int:
    settings = [("postgresql", args.postgres_workers), ("grpc", args.grpc_workers)]
    most = max(w for _, w in settings)
    free = available_memory_mb()
    if free is not None and most * WORKER_MEMORY_MB > free:
        raise UserError(
            f"{most} worker commands need about {most * WORKER_MEMORY_MB / 1024:.0f} GB of memory "
            f"({WORKER_MEMORY_MB} MB each); {free / 1024:.0f} GB is available, free swap included: pass fewer with "
            "--postgres-workers / --grpc-workers, or add swap"
        )
    rows = []
    try:
        for kind, workers in settings:
            if workers:
                rows.append(kill_test(admin, kind, workers, args.n_trials, args.seeds, args.kills))
                print(f"{kind}: {workers} workers done", flush=True)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: workers stopped, their databases dropped; nothing written") from None
    df = pd.DataFrame(rows).assign(**environment("cpu", 1))  # its command column names this command
    df.to_csv(path, index=False)
    shown = ["storage", "workers", "kills", "kills_holding_a_claim", "claims", "claims_per_second"]
    shown += ["kill_to_failed_median_s", "kill_to_failed_max_s", "peak_db_connections", "exact"]
    print(df[shown].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"wrote {path}")
    broken = df[~df.exact]
    if len(broken):
        raise UserError("; ".join(f"{redact(r.storage)}: {r.problems or 'hang'}" for r in broken.itertuples()))
    return 0


if __name__ == "__main__":
    cli.run(main)
