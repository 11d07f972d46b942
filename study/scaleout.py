"""Measure what a second worker buys: one vs two `study.depth` workers on one PostgreSQL storage.

Each setting gets its own fresh database, the same budget and the same quick configuration; the
workers are separate processes started as they would be on separate machines. Trials per minute is
counted from the storage (first trial start to last trial end), so process start-up is excluded.

    python -m study.scaleout         # 48 trials per setting, about 2 minutes; writes results/scaleout.csv
"""
from __future__ import annotations

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

from mnist_bench import cli
from mnist_bench.env import environment
from mnist_bench.errors import UsageError

ADMIN_URL = os.environ.get("MNIST_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def run_setting(admin: sqlalchemy.Engine, workers: int, n_trials: int, depth: int, extra: list[str]) -> dict:
    name = f"mnist_bench_scaleout_{uuid.uuid4().hex[:10]}"
    with admin.connect() as con:
        con.execute(sqlalchemy.text(f'create database "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "study.depth", "--preset", "quick", "--depths", str(depth),
                   "--n-trials", str(n_trials), "--seeds", "1", "--threads", "1", "--no-report",
                   "--storage", url, *extra]
            start = time.perf_counter()
            procs = [subprocess.Popen([*cmd, "--out", f"{tmp}/w{i}"], stdout=subprocess.DEVNULL)
                     for i in range(workers)]
            codes = [p.wait() for p in procs]
            wall = time.perf_counter() - start
            if any(codes):
                raise UsageError(f"a worker exited with {codes}; see its error above")
        study = optuna.load_study(study_name=f"quick-depth{depth}", storage=url)
        trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                  if not t.user_attrs.get("surplus")]
        first = min(t.datetime_start for t in trials)
        last = max(t.datetime_complete for t in trials)
        span = (last - first).total_seconds()
        return {"workers": workers, "depth": depth, "n_trials": n_trials, "finished_trials": len(trials),
                "pruned": sum(t.state == TrialState.PRUNED for t in trials), "tuning_seconds": span,
                "trials_per_minute": 60 * len(trials) / span,
                "trial_train_seconds": sum(t.user_attrs.get("train_seconds", 0.0) for t in trials),
                "epochs_trained": sum(len(t.user_attrs.get("curve", [])) for t in trials),
                "epochs_per_minute": 60 * sum(len(t.user_attrs.get("curve", [])) for t in trials) / span,
                "command_seconds": wall}
    finally:
        with admin.connect() as con:
            con.execute(sqlalchemy.text(f'drop database if exists "{name}" with (force)'))


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("python -m study.scaleout", __doc__)
    p.add_argument("--n-trials", type=cli.positive_int, default=48, help="tuning budget per setting (default: 48)")
    p.add_argument("--depth", type=cli.positive_int, default=4, help="the depth tuned (default: 4)")
    p.add_argument("--out", type=Path, default=cli.RESULTS_DIR, help="folder for scaleout.csv (default: results/)")
    args = p.parse_args(argv)
    admin = sqlalchemy.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as con:
            con.execute(sqlalchemy.text("select 1"))
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"PostgreSQL not reachable at {ADMIN_URL} ({str(e).splitlines()[0]}); "
                         "set MNIST_BENCH_PG_URL") from None
    rows = [run_setting(admin, w, args.n_trials, args.depth, []) for w in (1, 2)]
    df = pd.DataFrame(rows).assign(**environment("cpu", 1), storage="postgresql")
    ratio = df.trials_per_minute.iloc[1] / df.trials_per_minute.iloc[0]
    work = df.epochs_per_minute.iloc[1] / df.epochs_per_minute.iloc[0]
    df["trials_per_minute_ratio_vs_1"] = df.trials_per_minute / df.trials_per_minute.iloc[0]
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "scaleout.csv", index=False)
    print(df[["workers", "finished_trials", "pruned", "tuning_seconds", "trials_per_minute", "epochs_per_minute"]]
          .to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"two workers / one worker: {ratio:.2f}x trials per minute, {work:.2f}x epochs per minute")
    print(f"wrote {args.out / 'scaleout.csv'}")
    return 0


if __name__ == "__main__":
    cli.run(main)
