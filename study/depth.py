"""The depth study: is four layers right? Measured, not asserted (see docs/method.md).

Three experiments, each a set of cells with their own Optuna studies: `recipe` (the source text's
recipe across depths 1-6), `matched` (depths 3-5 and softmax at matched parameter budgets, every depth
at every learning rate of one band) and `tuned` (each depth at its best). Choices read only a validation
hold-out; final runs are scored on the test set. Everything lives in the Optuna storage (SQLite by default,
PostgreSQL for many machines): running the same command again continues where any run stopped,
and several workers share the work.

    python -m study.depth                  # the quick study: the recipe with and without momentum, 2 minutes
    python -m study.depth --preset smoke   # every experiment and check on 2,000 images: that every stage runs
    python -m study.depth --preset full    # the committed study: two workers (time in README)
"""

from __future__ import annotations

from mnist_bench import cli
from mnist_bench.redact import redact

cli.starting(__name__)

import argparse
import dataclasses
import json
import os
import re

from .config import (
    DECLARED_MARGINS,
    DEFAULT_MARGIN,
    EXPERIMENTS,
    MAX_DEPTH,
    MAX_STUDY_NAME,
    PRESETS,
    RunConfig,
    StudyConfig,
    in_memory,
    preset,
    refuse_other_study,
)

MAX_HEARTBEAT = 3600  # seconds; beyond an hour a dead worker's slot would sit idle for hours
MAX_TRIALS = 10_000  # per depth
MAX_SEEDS = 1_000  # per depth
MAX_WORKERS = 256  # processes on one machine


depth_arg = cli.bounded_int(1, MAX_DEPTH, "Linear layers")


def name_arg(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*", text) or "-depth" in text:
        raise argparse.ArgumentTypeError(
            f"must be letters, digits, '_', '.' and single '-' (not '-depth'), got {text!r}"
        )
    if len(text) > MAX_STUDY_NAME:  # the same name must work on every storage, whose column holds 512
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_STUDY_NAME} characters (Optuna's storage holds study names of 512, with each "
            f"cell's suffix), got {len(text)}"
        )
    return text


heartbeat_arg = cli.bounded_int(1, MAX_HEARTBEAT, "seconds; a dead worker's run is redone after 3x this")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser("python -m study.depth", __doc__)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="quick",
        help="study size (default: quick, the text's recipe with and without momentum at 2 epochs; smoke, every "
        "experiment on 2,000 images; full, the committed study)",
    )
    p.add_argument(
        "--experiments",
        choices=EXPERIMENTS,
        nargs="+",
        default=None,
        help="which experiments to run (default: all three: recipe matched tuned)",
    )
    p.add_argument(
        "--depths",
        type=depth_arg,
        nargs="+",
        default=None,
        help="distinct depths (Linear layers) for every selected experiment (default: the preset's; full: recipe "
        "1-6, matched 1 and 3-5, tuned 3-5)",
    )
    p.add_argument(
        "--budgets",
        type=cli.bounded_int(8_000, 10_000_000, "parameters"),
        nargs="+",
        default=None,
        help="parameter budgets of the matched experiment (default: the preset's; full on MNIST: 60000 242762)",
    )
    p.add_argument(
        "--n-trials",
        type=cli.bounded_int(1, MAX_TRIALS, "tuning trials per cell"),
        default=None,
        help="tuning trials per depth of the tuned experiment, in total over all runs and workers; may "
        "grow on a rerun (preset default; the matched experiment tunes nothing apart: it trains every rate)",
    )
    p.add_argument(
        "--seeds",
        type=cli.bounded_int(1, MAX_SEEDS, "retraining runs per cell"),
        default=None,
        help="final runs per cell, every experiment; may grow on a rerun (preset default)",
    )
    p.add_argument(
        "--split-seed",
        type=cli.bounded_int(0, 2**31 - 1, "a seed"),
        default=None,
        help="seed of the validation hold-out (default: 0); part of the study's identity",
    )
    p.add_argument(
        "--sampler-seed",
        type=cli.bounded_int(0, 2**31 - 1, "a seed"),
        default=None,
        help="seed of the TPE search path (default: 0); part of the study's identity",
    )
    p.add_argument(
        "--tuning-seed",
        type=cli.bounded_int(-(2**31), 0, "0 or below: final runs use seeds 1, 2, ..."),
        default=None,
        help="seed of the tuned searches' trials (default: 0): another draw of the tuning noise, e.g. -2; part of "
        "the study's identity and of the default study name",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL, e.g. postgresql://host/db (default: sqlite:///OUT/study.db)",
    )
    p.add_argument(
        "--workers",
        type=cli.bounded_int(1, MAX_WORKERS, "processes on this machine"),
        default=None,
        help="worker processes on this machine, each with --threads threads (default: 1 for smoke, else the CPU count)",
    )
    p.add_argument(
        "--pack",
        type=cli.bounded_int(1, 256, "networks per pack"),
        default=RunConfig.pack,
        help="most same-shape runs a worker trains in one pass (a band's rates at one seed, a cell's seeds); a run's "
        f"result does not depend on it on the CPU; 1 trains one network at a time (default: {RunConfig.pack})",
    )
    p.add_argument(
        "--study-name",
        type=name_arg,
        default=None,
        help="prefix of the study names in the storage (default: the preset's name, plus -fashion-mnist, "
        "-split<N>, -sampler<N>, -tuning<N> where those differ from the defaults)",
    )
    p.add_argument("--train-subset", type=cli.positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--heartbeat",
        type=heartbeat_arg,
        default=10,
        help="seconds between worker heartbeats; a silent trial is failed after 3x (default: 10)",
    )
    p.add_argument("--no-report", action="store_true", help="write the tables but do not render the report")
    p.add_argument(
        "--margin",
        type=cli.margin_points,
        default=None,
        help="the report's equivalence margin in points of test accuracy (default: the one the study declares: "
        f"{', '.join(f'{k} {100 * v:g}' for k, v in DECLARED_MARGINS.items())} for full, "
        f"else {100 * DEFAULT_MARGIN:g})",
    )
    cli.add_common(
        p,
        "folder for the tables, plots and report",
        out_default="results/ for full, results/PRESET for the others; plus /fashion-mnist for that dataset",
    )
    args = p.parse_args(argv)
    if args.out is None:  # the committed results/ belong to the full study; a quick one never lands there
        args.out = cli.RESULTS_DIR / ("" if args.preset == "full" else args.preset)
        args.out = args.out / "fashion-mnist" if args.dataset == "fashion-mnist" else args.out
    for flag in ("experiments", "depths", "budgets"):
        values = getattr(args, flag)
        if values and len(set(values)) != len(values):
            p.error(f"--{flag} must be distinct, got {values}")
    deepest = len(PRESETS[args.preset].recipe.funnel) + 1
    if args.depths and max(args.depths) > deepest and (not args.experiments or "recipe" in args.experiments):
        p.error(
            f"--depths {max(args.depths)} is beyond the recipe's funnel (depths 1-{deepest}: the text's widths cut or "
            "extended); run deeper networks with --experiments matched tuned"
        )
    if args.storage is not None and in_memory(args.storage):
        p.error(f"--storage {args.storage!r} is an in-memory database: nothing would be kept; give a file or a server")
    if args.storage is None and set("?#%") & set(str(args.out.resolve())):
        p.error(
            f"--out {args.out} contains '?', '#' or '%', which the default storage URL (sqlite:///OUT/study.db) would "
            "misread; pick another folder, or pass --storage with the path percent-encoded"
        )
    return args


def configs_from_args(args: argparse.Namespace) -> tuple[StudyConfig, RunConfig]:
    """The preset, with what the flags override. Another dataset, split, sampler or tuning seed gets its own
    study names (by default), so each can share the storage with the original."""
    cfg = preset(args.preset, args.dataset)
    experiments = {}
    for exp in EXPERIMENTS:
        sub = getattr(cfg, exp)
        changes = {
            "depths": tuple(args.depths) if args.depths else None,
            "seeds": args.seeds,
            "n_trials": args.n_trials if exp == "tuned" else None,
            "budgets": tuple(args.budgets) if args.budgets and exp == "matched" else None,
        }
        experiments[exp] = dataclasses.replace(sub, **{k: v for k, v in changes.items() if v is not None})
    seeds = {
        k: v
        for k, v in {
            "split_seed": args.split_seed,
            "sampler_seed": args.sampler_seed,
            "tuning_seed": args.tuning_seed,
        }.items()
        if v is not None
    }
    name = args.study_name or (
        cfg.name
        + ("" if args.dataset == "mnist" else f"-{args.dataset}")
        + "".join(f"-{k.split('_')[0]}{v}" for k, v in seeds.items() if v)
    )
    overrides = {
        "experiments": tuple(args.experiments) if args.experiments else None,
        "dataset": args.dataset,
        "train_subset": args.train_subset,
        "name": name,
    }
    cfg = dataclasses.replace(cfg, **experiments, **seeds, **{k: v for k, v in overrides.items() if v is not None})
    workers = args.workers or (1 if args.preset == "smoke" else max(1, (os.cpu_count() or 1) // args.threads))
    storage = args.storage or f"sqlite:///{(args.out / 'study.db').resolve()}"
    run = RunConfig(
        storage=storage,
        out=args.out,
        data_dir=args.data_dir,
        device=args.device,
        threads=args.threads,
        workers=workers,
        heartbeat_interval=args.heartbeat,
        grace_period=3 * args.heartbeat,
        render_report=not args.no_report,
        pack=args.pack,
    )
    return cfg, run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, run = configs_from_args(args)

    from . import tables
    from .storage import check_file, guarded, open_storage

    if run.render_report:
        from . import report  # before any training: a broken install fails now, not after the study

    # Never over another study's tables (the committed results/ are rewritten only by the study that made them).
    default_storage = args.storage is None
    refuse_other_study(run.out, cfg.name, run.out / "study.db" if default_storage else None)
    outputs = (*tables.OUTPUT_FILES, *(report.OUTPUT_FILES if run.render_report else ()))
    # Results must have somewhere to go: checked before PyTorch loads (a wrong --out is a one-second answer); a
    # folder made here and left empty by a later refusal is removed again (cli.run).
    cli.prepare_out(run.out, files=outputs)
    check_file(run.storage)

    import optuna

    from mnist_bench.data import resolve_device
    from mnist_bench.interrupt import Interrupted

    from . import engine

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our progress bars and tables report trials
    resolve_device(run.device)  # usage errors before anything is written
    data = engine.load_data(cfg, run)  # verified before anything is written; reused by a lone worker
    storage = open_storage(run.storage, run.heartbeat_interval, run.grace_period)

    def study() -> dict:
        cells = cfg.cells()
        engine.refuse_mixed_settings(storage, cfg)
        for cell in cells:
            engine.open_studies(storage, cfg, cell, run.heartbeat_interval)  # refuse mismatches before any work
        print(
            f"study {cfg.name!r}: {', '.join(cfg.experiments)}: {len(cells)} cells, "
            f"{sum(cfg.n_trials(c) for c in cells)} tuning trials and {sum(cfg.final_runs(c) for c in cells)} final "
            f"runs, {run.workers} worker(s) x {run.threads} thread(s), storage {redact(run.storage)}",
            flush=True,
        )
        lone = run.workers == 1
        engine.run_workers(cfg, run, data if lone else None, storage if lone else None)
        # Every cell of this study in the storage, not only the ones selected now: a run of one
        # experiment never drops the others' rows from the tables.
        return tables.write_tables(storage, cfg.name, tables.study_names(storage).get(cfg.name, cells), run.out)

    try:
        written = guarded(study, run.storage)
    except KeyboardInterrupt:  # outside the workers' safe points: nothing was in flight
        raise Interrupted(
            f"interrupted: runs in flight are recorded as failed, everything finished is in "
            f"{redact(run.storage)}; run the same command again to continue"
        ) from None
    print(tables.summary(written["final"]))
    pending = json.loads((run.out / "config.json").read_text(encoding="utf-8")).get("in_progress", [])
    if pending:
        print(
            f"in progress: {len(pending)} part(s) below the budget the storage holds (another command is running "
            "them): "
            + "; ".join(f"{p['cell']} {p['what']} {p['done']} of {p['budget']}" for p in pending[:6])
            + (" ..." if len(pending) > 6 else "")
            + "; the tables describe the runs that exist now"
        )
    if run.render_report:
        from . import report

        margin = None if args.margin is None else args.margin / 100  # None: the study's declared margin
        print(f"wrote {report.render(run.out, margin=margin)}")
    else:
        print(f"wrote tables to {run.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
