"""The depth study: is four layers right? Measured, not asserted (see docs/method.md).

One Optuna study per depth re-tunes learning rate, widths and epochs on a validation hold-out; the
best configuration of each depth is retrained from scratch with K seeds and scored on the test set.
Everything lives in the Optuna storage (SQLite by default, PostgreSQL for many machines): running
the same command again continues where any run stopped, and several workers share the work.

    python -m study.depth --preset quick   # about 30 seconds on 2 CPU cores
    python -m study.depth --preset full    # the committed study: two workers, about 35 minutes
"""
from __future__ import annotations

from mnist_bench import cli

cli.starting(__name__)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from .config import MAX_DEPTH, PRESETS, RunConfig, StudyConfig  # noqa: E402

MAX_HEARTBEAT = 3600  # seconds; beyond an hour a dead worker's slot would sit idle for hours
MAX_TRIALS = 10_000  # per depth
MAX_SEEDS = 1_000  # per depth
MAX_WORKERS = 256  # processes on one machine


depth_arg = cli.bounded_int(1, MAX_DEPTH, "Linear layers")
def name_arg(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*", text) or "-depth" in text:
        raise argparse.ArgumentTypeError(f"must be letters, digits, '_', '.' and single '-' (not '-depth'), got {text!r}")
    return text


heartbeat_arg = cli.bounded_int(1, MAX_HEARTBEAT, "seconds; a dead worker's run is redone after 3x this")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser("python -m study.depth", __doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="study size (default: quick; full is the committed study)")
    p.add_argument("--depths", type=depth_arg, nargs="+", default=None,
                   help="distinct depths (Linear layers) to compare (default: 3 4 5)")
    p.add_argument("--n-trials", type=cli.bounded_int(1, MAX_TRIALS, "tuning trials per depth"), default=None,
                   help="tuning trials per depth, in total over all runs and workers; may grow on a rerun "
                        "(preset default)")
    p.add_argument("--seeds", type=cli.bounded_int(1, MAX_SEEDS, "retraining runs per depth"), default=None,
                   help="final retraining seeds per depth; may grow on a rerun (preset default)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL, e.g. postgresql://host/db (default: sqlite:///OUT/study.db)")
    p.add_argument("--workers", type=cli.bounded_int(1, MAX_WORKERS, "processes on this machine"), default=None,
                   help="worker processes on this machine, each with --threads threads "
                        "(default: 1 for quick, CPU count for full)")
    p.add_argument("--study-name", type=name_arg, default=None,
                   help="prefix of the study names in the storage (default: the preset's name)")
    p.add_argument("--train-subset", type=cli.positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--heartbeat", type=heartbeat_arg, default=10,
                   help="seconds between worker heartbeats; a silent trial is failed after 3x (default: 10)")
    p.add_argument("--no-report", action="store_true", help="write the tables but do not render the report")
    cli.add_common(p, "folder for the tables, plots and report")
    args = p.parse_args(argv)
    if args.depths and len(set(args.depths)) != len(args.depths):
        p.error(f"--depths must be distinct, got {args.depths}")
    return args


def configs_from_args(args: argparse.Namespace) -> tuple[StudyConfig, RunConfig]:
    preset = PRESETS[args.preset]
    overrides = {k: v for k, v in {"depths": tuple(args.depths) if args.depths else None,
                                    "n_trials": args.n_trials, "seeds": args.seeds,
                                    "train_subset": args.train_subset, "name": args.study_name}.items()
                 if v is not None}
    cfg = dataclasses.replace(preset, **overrides)
    workers = args.workers or (1 if args.preset == "quick" else max(1, (os.cpu_count() or 1) // args.threads))
    storage = args.storage or f"sqlite:///{(args.out / 'study.db').resolve()}"
    run = RunConfig(storage=storage, out=args.out, data_dir=args.data_dir, device=args.device,
                    threads=args.threads, workers=workers, heartbeat_interval=args.heartbeat,
                    grace_period=3 * args.heartbeat, render_report=not args.no_report)
    return cfg, run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, run = configs_from_args(args)

    import optuna

    from mnist_bench.data import resolve_device

    from . import engine, tables
    from .coord import guarded, open_storage
    from mnist_bench.interrupt import Interrupted

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our progress bars and tables report trials
    resolve_device(run.device)  # usage errors before anything is written
    data = engine.load_data(cfg, run)  # verified before anything is written; reused by a lone worker
    cli.prepare_out(run.out)  # before any training: results must have somewhere to go
    storage = open_storage(run.storage)

    def study() -> dict:
        for d in cfg.depths:
            engine.open_studies(storage, cfg, d)  # refuse mismatched settings before any worker starts
        print(f"study {cfg.name!r}: depths {list(cfg.depths)}, {cfg.n_trials} trials and {cfg.seeds} seeds "
              f"per depth, {run.workers} worker(s) x {run.threads} thread(s), storage {run.storage}", flush=True)
        engine.run_workers(cfg, run, data if run.workers == 1 else None)
        return tables.write_tables(storage, cfg.name, cfg.depths, run.out)

    try:
        written = guarded(study, run.storage)
    except KeyboardInterrupt:  # outside the workers' safe points: nothing was in flight
        raise Interrupted(f"interrupted: runs in flight are recorded as failed, everything finished is in "
                          f"{run.storage}; run the same command again to continue") from None
    print(tables.summary(written["final"]))
    if run.render_report:
        from . import report

        print(f"wrote {report.render(run.out)}")
    else:
        print(f"wrote tables to {run.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
