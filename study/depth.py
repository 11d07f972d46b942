"""The depth study: is four layers right? Measured per METHOD.md, not asserted.

Depth (number of Linear layers) is the scientific hyperparameter. For every depth, one Optuna
study tunes the nuisance hyperparameters (learning rate, first hidden width, taper, epochs) with the
same search space, budget, seeded TPE sampler and median pruner, on a seeded validation hold-out.
The best configuration per depth is then retrained from scratch with K seeds and scored on the
test set, which nothing else touches. Everything lives in the Optuna storage (SQLite by default,
PostgreSQL for many machines), so an interrupted run resumes, and several workers share the work.

    python -m study.depth --preset quick   # about a minute on 2 CPU cores
    python -m study.depth --preset full    # the committed study: two workers, under 30 minutes
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

# fail_stale_trials and heartbeats are the documented fault-tolerance API but still tagged experimental.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Our own progress bar and tables report trials; Optuna's per-trial log (with tracebacks of
# interrupted trials) would bury them.
optuna.logging.set_verbosity(optuna.logging.ERROR)

from mnist_bench import cli
from mnist_bench.data import MNIST, load_mnist, resolve_device
from mnist_bench.env import environment
from mnist_bench.errors import UserError
from mnist_bench.models import mlp
from mnist_bench.train import EpochMetrics, TrainConfig, train

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ACTIVE = (TrialState.RUNNING, TrialState.WAITING)
MAX_DEPTH = 8
POLL_SECONDS = 2.0


# --- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """Nuisance hyperparameters, re-tuned for every depth. Widths taper: w[i] = w0 * taper**i."""

    lr: tuple[float, float] = (1e-3, 1.0)  # SGD step size, log scale
    width: tuple[int, int] = (32, 2048)  # first hidden width, log scale (1024 was too narrow: best sat on the edge)
    taper: tuple[float, float] = (0.25, 1.0)  # ratio of consecutive hidden widths
    max_epochs: int = 10  # epochs tuned in 1..max_epochs
    min_width: int = 8  # no hidden layer narrower than this


@dataclass(frozen=True)
class StudyConfig:
    """What defines the experiment. Stored in every study; resuming with other values is refused
    (except `n_trials` and `seeds`, which may grow)."""

    name: str = "full"  # study names are f"{name}-depth{d}" and f"{name}-depth{d}-final"
    depths: tuple[int, ...] = (3, 4, 5)
    n_trials: int = 25  # per depth, in total over all workers and runs
    seeds: int = 5  # final retraining runs per depth
    space: SearchSpace = field(default_factory=SearchSpace)
    # Fixed hyperparameters (caveats on the conclusion):
    batch_size: int = 64  # the source text's
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    train_subset: int | None = None  # None: all 50k training images left after the hold-out
    val_size: int = 10_000
    split_seed: int = 0
    tuning_seed: int = 0  # init/batch-order seed of every tuning trial (common random numbers)
    sampler_seed: int = 0  # TPE seed, the same for every depth
    sampler_startup_trials: int = 10  # TPE: random trials before it models the space
    pruner_startup_trials: int = 5  # MedianPruner: trials before any pruning
    pruner_warmup_epochs: int = 2  # MedianPruner: epochs before a trial can be pruned

    def identity(self) -> dict:
        """The settings that must match to resume a study."""
        d = dataclasses.asdict(self)
        for k in ("n_trials", "seeds", "depths"):
            d.pop(k)
        d["space"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["space"].items()}
        return d


@dataclass(frozen=True)
class RunConfig:
    """How this process runs the study: not part of the experiment's identity."""

    storage: str
    out: Path
    data_dir: Path | None = None
    device: str = "cpu"
    threads: int = 1  # per worker
    workers: int = 1
    heartbeat_interval: int = 10  # seconds; a killed worker's trial is failed after the grace period
    grace_period: int = 30
    render_report: bool = True


PRESETS = {
    # Small budget on a 10k training subset: the tests' and the README's first command.
    "quick": StudyConfig(name="quick", n_trials=12, seeds=3, train_subset=10_000, val_size=5_000,
                         space=SearchSpace(width=(16, 256), max_epochs=4), sampler_startup_trials=5,
                         pruner_startup_trials=3, pruner_warmup_epochs=1),
    # The committed study, sized for < 30 minutes on 2 CPU cores with --workers 2.
    "full": StudyConfig(),
}


def hidden_widths(depth: int, width: int, taper: float, space: SearchSpace) -> tuple[int, ...]:
    return tuple(max(space.min_width, round(width * taper**i)) for i in range(depth - 1))


def suggest(trial: optuna.Trial, depth: int, space: SearchSpace) -> dict:
    """The only place a trial becomes hyperparameters."""
    params = {
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "epochs": trial.suggest_int("epochs", 1, space.max_epochs),
    }
    if depth >= 2:
        params["width"] = trial.suggest_int("width", *space.width, log=True)
    if depth >= 3:
        params["taper"] = trial.suggest_float("taper", *space.taper)
    return params


def train_config(cfg: StudyConfig, params: dict, seed: int, threads: int) -> TrainConfig:
    return TrainConfig(lr=params["lr"], epochs=params["epochs"], batch_size=cfg.batch_size,
                       optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                       seed=seed, threads=threads)


def widths_of(depth: int, params: dict, space: SearchSpace) -> tuple[int, ...]:
    return hidden_widths(depth, params.get("width", 0), params.get("taper", 1.0), space)


def study_name(cfg: StudyConfig, depth: int, final: bool = False) -> str:
    return f"{cfg.name}-depth{depth}" + ("-final" if final else "")


# --- storage -------------------------------------------------------------------------------------


class StudyError(UserError):
    """Storage unusable or a study made with other settings; one line for the user."""


def open_storage(url: str, run: RunConfig | None = None) -> optuna.storages.RDBStorage:
    heartbeat = {} if run is None else dict(heartbeat_interval=run.heartbeat_interval,
                                            grace_period=run.grace_period)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers started at once on an empty database race to create Optuna's tables; the
            # loser sees "already exists" and simply opens what the winner made.
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
        except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors of every kind become one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StudyError(f"cannot open storage {url!r}: {reason}") from None


def sampler_seed(cfg: StudyConfig, run: RunConfig) -> int:
    """The TPE seed of this worker. A lone worker on SQLite uses `cfg.sampler_seed` (reproducible);
    workers sharing a storage each draw their own stream, or they would propose identical trials."""
    shared = run.workers > 1 or not run.storage.startswith("sqlite")
    if not shared:
        return cfg.sampler_seed
    salt = int.from_bytes(hashlib.sha256(f"{os.uname().nodename}:{os.getpid()}".encode()).digest()[:4], "big")
    return (cfg.sampler_seed * 1_000_003 + salt) % 2**31


def open_studies(storage, cfg: StudyConfig, depth: int, seed: int | None = None) -> tuple[optuna.Study, optuna.Study]:
    """(tuning study, final-runs study) for `depth`, created if new, checked if resumed."""
    seed = cfg.sampler_seed if seed is None else seed
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.sampler_startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                         n_warmup_steps=cfg.pruner_warmup_epochs)
    tune = optuna.create_study(storage=storage, study_name=study_name(cfg, depth), direction="maximize",
                               sampler=sampler, pruner=pruner, load_if_exists=True)
    final = optuna.create_study(storage=storage, study_name=study_name(cfg, depth, final=True),
                                direction="maximize", load_if_exists=True)
    identity = {**cfg.identity(), "depth": depth}
    for study in (tune, final):
        stored = study.user_attrs.get("config")
        if stored is None:
            study.set_user_attr("config", identity)
        elif stored != identity:
            changed = sorted(k for k in identity if stored.get(k) != identity[k])
            raise StudyError(f"study {study.study_name!r} in this storage was made with other settings "
                             f"({', '.join(changed)}); use another --storage or --out")
    return tune, final


def live_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that hold a budget slot: finished or in flight, surplus claims excluded."""
    return [t for t in study.get_trials(deepcopy=False, states=FINISHED + ACTIVE)
            if not t.user_attrs.get("surplus")]


def counts(study: optuna.Study) -> tuple[int, int]:
    """(finished, in flight) trials that count towards the budget."""
    trials = live_trials(study)
    finished = sum(t.state in FINISHED for t in trials)
    return finished, len(trials) - finished


class Interrupted(UserError):
    """Ctrl-C (or SIGTERM): the step in flight finished, its trial is recorded failed, nothing is lost."""

    exit_code = 130


STOP = threading.Event()  # set by the first Ctrl-C; checked after every training step and between trials


def check_stop() -> None:
    if STOP.is_set():
        raise Interrupted("interrupted: the trial in flight is recorded as failed; "
                          "run the same command again to continue")


@contextlib.contextmanager
def graceful_interrupts():
    """First SIGINT/SIGTERM: finish the current training step, then stop at a safe point (never in
    the middle of a storage write). A second Ctrl-C interrupts at once."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def request_stop(signum, frame):
        STOP.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    STOP.clear()
    for s in previous:
        signal.signal(s, request_stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Surplus(Exception):
    """This trial lost a race for the last budget slot; it ran nothing and is marked failed."""


def claim_slot(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> None:
    """Exact budgets under concurrency: a trial runs only if fewer than `n_trials` live trials were
    created before it. The loser of a race is marked `surplus` (failed, ran nothing)."""
    earlier = [t for t in live_trials(study) if t.number < trial.number]
    if len(earlier) >= n_trials:
        trial.set_user_attr("surplus", True)
        raise Surplus(f"trial {trial.number}: budget already claimed")


# --- tuning --------------------------------------------------------------------------------------


def record_curve(trial: optuna.Trial, epochs: list[EpochMetrics]) -> None:
    trial.set_user_attr("curve", [dataclasses.astuple(e) for e in epochs])


class Objective:
    """Loads nothing itself: data comes in once per process (optuna-examples' callable objective)."""

    def __init__(self, cfg: StudyConfig, depth: int, data: MNIST, run: RunConfig, env: dict):
        self.cfg, self.depth, self.data, self.run, self.env = cfg, depth, data, run, env

    def __call__(self, trial: optuna.Trial) -> float:
        claim_slot(trial.study, trial, self.cfg.n_trials)
        params = suggest(trial, self.depth, self.cfg.space)
        model = mlp(widths_of(self.depth, params, self.cfg.space))
        config = train_config(self.cfg, params, self.cfg.tuning_seed, self.run.threads)
        trial.set_user_attr("env", self.env)

        def on_epoch(m: EpochMetrics) -> bool:
            trial.report(m.val_accuracy, m.epoch)
            return trial.should_prune()

        result = train(model, self.data, config, on_epoch=on_epoch, evaluate_test=False,
                       should_stop=STOP.is_set)
        check_stop()  # Optuna records the trial as failed; the budget slot stays open
        record_curve(trial, result.epochs)
        trial.set_user_attr("train_seconds", result.train_seconds)
        trial.set_user_attr("samples_per_s", result.samples_per_s)
        trial.set_user_attr("diverged", result.diverged)
        if result.diverged:
            return 0.0  # worse than chance: the sampler learns to avoid it; tables say "diverged"
        if result.stopped:
            raise optuna.TrialPruned(f"epoch {result.epochs[-1].epoch}")
        return result.epochs[-1].val_accuracy


def tune(study: optuna.Study, objective: Objective, n_trials: int, progress) -> None:
    """Run trials until the budget is finished or claimed by live trials (maybe other workers')."""
    while True:
        check_stop()
        optuna.storages.fail_stale_trials(study)
        finished, active = counts(study)
        if finished + active >= n_trials:
            return
        study.optimize(objective, n_trials=1, catch=(Surplus,))
        progress()


def wait_finished(study: optuna.Study, n_trials: int) -> bool:
    """Wait for other workers' in-flight trials. True when the budget is finished; False when a slot
    was given back (a dead worker's trial, failed by its heartbeat) and must be tuned again."""
    while True:
        check_stop()
        optuna.storages.fail_stale_trials(study)
        finished, active = counts(study)
        if finished >= n_trials:
            return True
        if finished + active < n_trials:
            return False
        time.sleep(POLL_SECONDS)


# --- final runs ----------------------------------------------------------------------------------


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not t.user_attrs.get("diverged")]
    if not done:
        raise StudyError(f"study {study.study_name!r} has no completed, non-diverged trial to retrain")
    return max(done, key=lambda t: (t.value, -t.number))


def final_runs(final: optuna.Study, tuned: optuna.Study, cfg: StudyConfig, depth: int, data: MNIST,
               run: RunConfig, env: dict, progress) -> None:
    """Retrain the best configuration with seeds 1..K; every seed exactly once across workers."""
    best = best_trial(tuned)
    widths = widths_of(depth, best.params, cfg.space)

    def seeds_taken() -> dict[int, int]:
        taken: dict[int, int] = {}  # seed -> lowest live trial number holding it
        for t in live_trials(final):
            if t.user_attrs.get("source_trial") == best.number and "seed" in t.user_attrs:
                s = t.user_attrs["seed"]
                taken[s] = min(taken.get(s, t.number), t.number)
        return taken

    def objective(trial: optuna.Trial) -> float:
        taken = seeds_taken()
        free = [s for s in range(1, cfg.seeds + 1) if s not in taken]
        if not free:
            trial.set_user_attr("surplus", True)
            raise Surplus("all seeds claimed")
        seed = free[0]
        trial.set_user_attr("source_trial", best.number)
        trial.set_user_attr("seed", seed)
        if seeds_taken().get(seed) != trial.number:  # another worker took the same seed first
            trial.set_user_attr("surplus", True)
            raise Surplus(f"seed {seed} claimed by another worker")
        for k, v in best.params.items():
            trial.set_user_attr(f"param_{k}", v)
        trial.set_user_attr("widths", list(widths))
        trial.set_user_attr("env", env)
        result = train(mlp(widths), data, train_config(cfg, best.params, seed, run.threads),
                       should_stop=STOP.is_set)
        check_stop()
        record_curve(trial, result.epochs)
        for k in ("test_accuracy", "test_loss", "train_seconds", "samples_per_s", "diverged"):
            trial.set_user_attr(k, getattr(result, k))
        return result.test_accuracy if result.test_accuracy is not None else 0.0

    while True:
        check_stop()
        optuna.storages.fail_stale_trials(final)
        taken = seeds_taken()
        if all(s in taken for s in range(1, cfg.seeds + 1)):
            return
        final.optimize(objective, n_trials=1, catch=(Surplus,))
        progress()


# --- workers -------------------------------------------------------------------------------------


def load_data(cfg: StudyConfig, run: RunConfig) -> MNIST:
    return load_mnist(run.data_dir, val_size=cfg.val_size, split_seed=cfg.split_seed, device=run.device,
                      train_subset=cfg.train_subset)


def worker(cfg: StudyConfig, run: RunConfig, index: int = 0, data: MNIST | None = None) -> None:
    """One worker: tune every depth (never waiting on others while work is left), then retrain.
    `data` is loaded here unless the caller already holds it (a lone in-process worker)."""
    with graceful_interrupts():
        _work(cfg, run, index, data if data is not None else load_data(cfg, run))


def _work(cfg: StudyConfig, run: RunConfig, index: int, data: MNIST) -> None:
    env = environment(data.device, run.threads) | {"worker": f"{os.uname().nodename}:{os.getpid()}"}
    storage = open_storage(run.storage, run)
    seed = sampler_seed(cfg, run)
    studies = {d: open_studies(storage, cfg, d, seed) for d in cfg.depths}
    from tqdm import tqdm

    total = len(cfg.depths) * (cfg.n_trials + cfg.seeds)
    with tqdm(total=total, desc=f"worker {index}", position=index, leave=True, unit="run",
              mininterval=1.0, disable=None) as bar:
        def progress() -> None:
            done = sum(min(counts(t)[0], cfg.n_trials) + min(counts(f)[0], cfg.seeds)
                       for t, f in studies.values())
            bar.update(done - bar.n)

        progress()
        pending = list(cfg.depths)
        while pending:  # tune, then wait for stragglers; a slot given back (dead worker) is re-tuned
            for d in pending:
                tune(studies[d][0], Objective(cfg, d, data, run, env), cfg.n_trials, progress)
            pending = [d for d in pending if not wait_finished(studies[d][0], cfg.n_trials)]
        for d in cfg.depths:
            final_runs(studies[d][1], studies[d][0], cfg, d, data, run, env, progress)


def storage_problem(url: str) -> str | None:
    """None when the storage answers a query now; otherwise why not, in one line."""
    connect_args = {"timeout": 5} if url.startswith("sqlite") else {"connect_timeout": 5}
    engine = None
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
        with engine.connect() as con:
            con.execute(sqlalchemy.text("select 1"))
        return None
    except Exception as e:  # noqa: BLE001
        lines = str(getattr(e, "orig", None) or e).strip().splitlines()
        return lines[0] if lines else type(e).__name__
    finally:
        if engine is not None:
            engine.dispose()


def guarded(fn, url: str):
    """Run `fn`; an error while the storage is unreachable becomes one line (resume by rerunning).
    Optuna does not always surface a lost connection as a database error, so ask the storage."""
    try:
        return fn()
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        problem = storage_problem(url)
        if problem is None and not isinstance(e, sqlalchemy.exc.OperationalError):
            raise  # a genuine bug: keep the traceback
        raise StudyError(f"lost the connection to the storage ({problem or str(e).splitlines()[0]}); "
                         "run the same command again to continue") from None


def _worker_process(cfg: StudyConfig, run: RunConfig, index: int) -> None:
    """A spawned worker: the same one-line errors and exit codes as the command itself."""
    try:
        guarded(lambda: worker(cfg, run, index), run.storage)
    except (KeyboardInterrupt, Interrupted):
        sys.exit(130)  # the parent says it once
    except UserError as e:
        print(f"error: worker {index}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def run_workers(cfg: StudyConfig, run: RunConfig, data: MNIST | None = None) -> None:
    if run.workers == 1:
        worker(cfg, run, data=data)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_process, args=(cfg, run, i), name=f"worker-{i}")
             for i in range(run.workers)]
    with graceful_interrupts():  # Ctrl-C reaches every worker; the parent waits for them to stop cleanly
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    if STOP.is_set() or any(p.exitcode == 130 for p in procs):
        STOP.set()
        check_stop()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise StudyError(f"{', '.join(failed)} exited with an error (see above); run the same command to resume")


# --- command line --------------------------------------------------------------------------------


def depth_arg(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_DEPTH:
        raise argparse.ArgumentTypeError(f"depth must be in 1..{MAX_DEPTH}, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser("python -m study.depth", __doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="study size (default: quick; full is the committed study)")
    p.add_argument("--depths", type=depth_arg, nargs="+", default=None,
                   help="depths (Linear layers) to compare (default: 3 4 5)")
    p.add_argument("--n-trials", type=cli.positive_int, default=None,
                   help="tuning trials per depth, in total over all runs and workers (preset default)")
    p.add_argument("--seeds", type=cli.positive_int, default=None,
                   help="final retraining seeds per depth (preset default)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL, e.g. postgresql://host/db (default: sqlite:///OUT/study.db)")
    p.add_argument("--workers", type=cli.positive_int, default=None,
                   help="worker processes on this machine, each with --threads threads "
                        "(default: 1 for quick, CPU count for full)")
    p.add_argument("--study-name", default=None,
                   help="prefix of the study names in the storage (default: the preset's name)")
    p.add_argument("--train-subset", type=cli.positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--heartbeat", type=cli.positive_int, default=10,
                   help="seconds between worker heartbeats; a silent trial is failed after 3x (default: 10)")
    p.add_argument("--no-report", action="store_true", help="write the tables but do not render the report")
    cli.add_common(p, "folder for the tables, plots and report")
    return p.parse_args(argv)


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
    from study import tables

    args = parse_args(argv)
    cfg, run = configs_from_args(args)
    resolve_device(run.device)  # usage errors before anything is written
    data = load_data(cfg, run)  # verified before anything is written; reused by a lone worker
    if args.storage is None:
        run.out.mkdir(parents=True, exist_ok=True)
    storage = open_storage(run.storage)

    def study() -> dict:
        for d in cfg.depths:
            open_studies(storage, cfg, d)  # refuse mismatched settings before any worker starts
        print(f"study {cfg.name!r}: depths {list(cfg.depths)}, {cfg.n_trials} trials and {cfg.seeds} seeds "
              f"per depth, {run.workers} worker(s) x {run.threads} thread(s), storage {run.storage}", flush=True)
        run_workers(cfg, run, data if run.workers == 1 else None)
        return tables.write_tables(storage, cfg.name, cfg.depths, run.out)

    written = guarded(study, run.storage)
    print(tables.summary(written["final"]))
    if run.render_report:
        from study import report

        print(f"wrote {report.render(run.out)}")
    else:
        print(f"wrote tables to {run.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
