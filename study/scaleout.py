"""Measure what a second worker buys: one vs two `study.depth` workers on one PostgreSQL storage.

Each setting gets its own fresh database, the same budget and the same quick configuration; the
workers are separate processes started as they would be on separate machines. Trials per minute is
counted from the storage (first trial start to last trial end), so process start-up is excluded.

    python -m study.scaleout         # 48 trials per setting, about 2 minutes; writes results/scaleout.csv
"""

from __future__ import annotations

from mnist_bench import cli

cli.starting(__name__)

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import sqlalchemy
from optuna.trial import TrialState

from mnist_bench.env import environment
from mnist_bench.errors import UsageError, UserError
from mnist_bench.interrupt import Interrupted

from .config import MAX_DEPTH, Cell, study_name
from .coord import first_line

ADMIN_URL = os.environ.get("MNIST_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def run_setting(admin: sqlalchemy.Engine, workers: int, n_trials: int, depth: int, extra: list[str]) -> dict:
    name = f"mnist_bench_scaleout_{uuid.uuid4().hex[:10]}"
    with admin.connect() as con:
        con.execute(sqlalchemy.text(f'create database "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "study.depth",
                "--preset",
                "quick",
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
                    with open(f"{tmp}/w{i}.err", "w") as err:
                        procs.append(
                            subprocess.Popen([*cmd, "--out", f"{tmp}/w{i}"], stdout=subprocess.DEVNULL, stderr=err)
                        )
                codes = [p.wait() for p in procs]
            finally:
                stop(procs)
            wall = time.perf_counter() - start
            for i, code in enumerate(codes):
                if code:
                    lines = Path(f"{tmp}/w{i}.err").read_text().strip().splitlines()
                    raise UserError(f"worker {i} exited with {code}: {lines[-1] if lines else 'no message'}")
        study = optuna.load_study(study_name=study_name("quick", Cell("tuned", depth)), storage=url)
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
    finally:
        with admin.connect() as con:
            con.execute(sqlalchemy.text(f'drop database if exists "{name}" with (force)'))


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


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("python -m study.scaleout", __doc__)
    p.add_argument(
        "--n-trials",
        type=cli.bounded_int(1, 10_000, "tuning trials per setting"),
        default=48,
        help="tuning budget per setting (default: 48)",
    )
    p.add_argument(
        "--depth", type=cli.bounded_int(1, MAX_DEPTH, "Linear layers"), default=4, help="the depth tuned (default: 4)"
    )
    p.add_argument(
        "--out", type=cli.path_arg, default=cli.RESULTS_DIR, help="folder for scaleout.csv (default: results/)"
    )
    args = p.parse_args(argv)
    if not ADMIN_URL.startswith("postgresql"):
        raise UsageError(
            f"MNIST_BENCH_PG_URL must be a postgresql:// URL (it creates a database per run), got {ADMIN_URL!r}"
        )
    path = cli.prepare_out(args.out, "scaleout.csv")
    try:
        admin = sqlalchemy.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as con:
            con.execute(sqlalchemy.text("select 1"))
    except Exception as e:  # noqa: BLE001 - a bad URL or an unreachable server: one line
        raise UserError(
            f"PostgreSQL not reachable at {ADMIN_URL!r} ({first_line(e)}); set MNIST_BENCH_PG_URL"
        ) from None
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


if __name__ == "__main__":
    cli.run(main)
