"""The depth study's experiment loop: tune every depth, then retrain each depth's best with K seeds.

Depth (number of Linear layers) is the scientific hyperparameter. For every depth, one Optuna study
tunes the nuisance hyperparameters (learning rate, first hidden width, taper, epochs) with the same
search space, budget, seeded TPE sampler and median pruner, on a seeded validation hold-out. The
best configuration per depth is retrained from scratch with seeds 1..K and scored on the test set,
which nothing else touches. Who runs which trial or seed is settled by `study.coord`; this module
turns a trial into a training config (the trainer never sees Optuna) and records what came back.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from mnist_bench import interrupt
from mnist_bench.data import MNIST, load_mnist
from mnist_bench.env import environment
from mnist_bench.errors import UserError
from mnist_bench.models import mlp
from mnist_bench.train import EpochMetrics, TrainConfig, train

from .config import RunConfig, SearchSpace, StudyConfig, study_name, widths_of
from .coord import (TUNE, Ledger, StudyError, TrialSeededSampler, best_trial, encode_curve, final_key,
                    guarded, open_storage)

POLL_SECONDS = 2.0
INTERRUPTED = ("interrupted: the run in flight is recorded as failed and its slot given back; "
               "run the same command again to continue")


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
    return TrainConfig(lr=params["lr"], epochs=int(params["epochs"]), batch_size=cfg.batch_size,
                       optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                       seed=seed, threads=threads)


def load_data(cfg: StudyConfig, run: RunConfig) -> MNIST:
    return load_mnist(run.data_dir, val_size=cfg.val_size, split_seed=cfg.split_seed, device=run.device,
                      train_subset=cfg.train_subset)


# --- studies -------------------------------------------------------------------------------------


def open_studies(storage, cfg: StudyConfig, depth: int) -> tuple[optuna.Study, optuna.Study]:
    """(tuning study, final-runs study) for `depth`, created if new, checked if resumed. A study
    remembers the largest budget it was given; asking for less is refused (its tables hold more)."""
    sampler = TrialSeededSampler(cfg.sampler_seed, lambda seed: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=cfg.sampler_startup_trials))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                         n_warmup_steps=cfg.pruner_warmup_epochs)
    tune = optuna.create_study(storage=storage, study_name=study_name(cfg.name, depth), direction="maximize",
                               sampler=sampler, pruner=pruner, load_if_exists=True)
    final = optuna.create_study(storage=storage, study_name=study_name(cfg.name, depth, final=True),
                                direction="maximize", load_if_exists=True)
    identity = {**cfg.identity(), "depth": depth}
    for study, budget_key, budget in ((tune, "n_trials", cfg.n_trials), (final, "seeds", cfg.seeds)):
        attrs = study.user_attrs
        stored = attrs.get("config")
        if stored is None:
            study.set_user_attr("config", identity)
        elif stored != identity:
            changed = sorted(k for k in identity if stored.get(k) != identity[k])
            raise StudyError(f"study {study.study_name!r} in this storage was made with other settings "
                             f"({', '.join(changed)}); use another --storage or --out")
        if budget < attrs.get(budget_key, 0):
            flag = "--n-trials" if budget_key == "n_trials" else "--seeds"
            raise StudyError(f"study {study.study_name!r} already has a budget of {attrs[budget_key]} "
                             f"({flag}); a budget cannot shrink: pass {flag} {attrs[budget_key]} or more")
        if budget > attrs.get(budget_key, 0):
            study.set_user_attr(budget_key, budget)
    return tune, final


# --- one worker ----------------------------------------------------------------------------------


class Worker:
    """Claims and runs tuning trials and final runs until every depth's budget is finished."""

    def __init__(self, cfg: StudyConfig, run: RunConfig, data: MNIST, storage, env: dict,
                 progress: Callable[[], None] = lambda: None):
        self.cfg, self.run, self.data, self.env, self.progress = cfg, run, data, env, progress
        self.studies = {d: open_studies(storage, cfg, d) for d in cfg.depths}
        self.ledgers = {d: (Ledger(storage, t, run.grace_period), Ledger(storage, f, run.grace_period))
                        for d, (t, f) in self.studies.items()}
        self.tune_demand = {TUNE: cfg.n_trials}

    def final_demand(self, depth: int) -> tuple[dict[str, int], dict[str, int], int] | None:
        """(demand, seed of each key, source trial) of a depth whose tuning is finished."""
        best = best_trial(self.ledgers[depth][0].trials())
        if best is None:
            raise StudyError(f"depth {depth}: no completed, non-diverged tuning trial to retrain; "
                             "widen the search space or grow --n-trials")
        seeds = {final_key(best.number, s): s for s in range(1, self.cfg.seeds + 1)}
        return {k: 1 for k in seeds}, seeds, best.number

    def step(self) -> str:
        """Do one unit of work: 'ran' (a trial or seed, won or lost), 'wait' (others hold what is
        left) or 'done' (every budget finished)."""
        waiting = False
        for d in self.cfg.depths:
            tune, final = self.ledgers[d]
            tune.recover_stale()
            if tune.open_key(self.tune_demand):
                self.tune_one(d)
                return "ran"
            if not tune.finished(self.tune_demand):
                waiting = True
                continue
            demand, seeds, source = self.final_demand(d)
            final.recover_stale()
            key = final.open_key(demand)
            if key is not None:
                self.final_one(d, source, seeds[key], key)
                return "ran"
            waiting |= not final.finished(demand)
        return "wait" if waiting else "done"

    def work(self) -> None:
        while True:
            interrupt.check(INTERRUPTED)
            state = self.step()
            self.progress()
            if state == "done":
                return
            if state == "wait":
                interrupt.STOP.wait(POLL_SECONDS)

    def tune_one(self, depth: int) -> None:
        study, ledger = self.studies[depth][0], self.ledgers[depth][0]
        with warnings.catch_warnings():  # ask() warns when heartbeats are on; Ledger.heartbeat records them
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            trial = study.ask()
        claim = ledger.settle(trial._trial_id, capacity=self.cfg.n_trials)
        if not claim.won:
            return
        with ledger.heartbeat(claim.trial_id, self.run.heartbeat_interval), holding(ledger, claim.trial_id):
            ledger.storage.set_trial_user_attr(claim.trial_id, "worker", self.env.get("worker"))
            params = suggest(trial, depth, self.cfg.space)
            config = train_config(self.cfg, params, self.cfg.tuning_seed, self.run.threads)
            lost = False

            def on_epoch(m: EpochMetrics) -> bool:
                nonlocal lost
                try:
                    trial.report(m.val_accuracy, m.epoch)
                    # Never prune at the last epoch: the trial is finished anyway.
                    return m.epoch < config.epochs and trial.should_prune()
                except UpdateFinishedTrialError:  # failed as stale while this worker was paused
                    lost = True
                    return True

            result = train(mlp(widths_of(depth, params, self.cfg.space)), self.data, config,
                           on_epoch=on_epoch, evaluate_test=False, should_stop=interrupt.STOP.is_set)
            if result.interrupted:
                raise interrupt.Interrupted(INTERRUPTED)
            if lost:
                return
            attrs = {"curve": encode_curve(result.epochs), "train_seconds": result.train_seconds,
                     "samples_per_s": result.samples_per_s, "diverged": result.diverged, "env": self.env}
            if result.diverged:  # worse than chance: the sampler learns to avoid it; tables say "diverged"
                ledger.finish(claim.trial_id, TrialState.COMPLETE, 0.0, attrs)
            elif result.stopped:
                ledger.finish(claim.trial_id, TrialState.PRUNED, None, attrs)
            else:
                ledger.finish(claim.trial_id, TrialState.COMPLETE, result.epochs[-1].val_accuracy, attrs)

    def final_one(self, depth: int, source: int, seed: int, key: str) -> None:
        ledger = self.ledgers[depth][1]
        best = next(t for t in self.ledgers[depth][0].trials() if t.number == source)
        claim = ledger.claim(key, {"source_trial": source, "seed": seed, "worker": self.env.get("worker")})
        if not claim.won:
            return
        with ledger.heartbeat(claim.trial_id, self.run.heartbeat_interval), holding(ledger, claim.trial_id):
            widths = widths_of(depth, best.params, self.cfg.space)
            result = train(mlp(widths), self.data, train_config(self.cfg, best.params, seed, self.run.threads),
                           should_stop=interrupt.STOP.is_set)
            if result.interrupted:
                raise interrupt.Interrupted(INTERRUPTED)
            attrs = {**{f"param_{k}": v for k, v in best.params.items()}, "widths": list(widths),
                     "curve": encode_curve(result.epochs), "test_accuracy": result.test_accuracy,
                     "test_loss": result.test_loss, "train_seconds": result.train_seconds,
                     "samples_per_s": result.samples_per_s, "diverged": result.diverged, "env": self.env}
            value = result.test_accuracy if result.test_accuracy is not None else 0.0
            ledger.finish(claim.trial_id, TrialState.COMPLETE, value, attrs)


class holding:
    """While a claim's work runs: any exit but a normal one (Ctrl-C, an error) gives the claim back.
    If the storage refuses an update because the claim was already failed as stale (this worker was
    paused past the grace period), the work is dropped and the worker goes on: the slot is redone."""

    def __init__(self, ledger: Ledger, trial_id: int):
        self.ledger, self.trial_id = ledger, trial_id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, UpdateFinishedTrialError):
            return True
        if exc_type is not None:
            try:
                self.ledger.give_back(self.trial_id)
            except Exception:  # noqa: BLE001 - storage gone: the heartbeat rule fails it later
                pass
        return False


def work(cfg: StudyConfig, run: RunConfig, index: int = 0, data: MNIST | None = None) -> None:
    """One worker, in this process: load the data unless given, then work until every budget is
    finished. Signals: see mnist_bench.interrupt (the caller installs the handlers)."""
    data = data if data is not None else load_data(cfg, run)
    env = environment(data.device, run.threads) | {"worker": f"{os.uname().nodename}:{os.getpid()}"}
    storage = open_storage(run.storage, run.heartbeat_interval, run.grace_period)
    from tqdm import tqdm

    total = len(cfg.depths) * (cfg.n_trials + cfg.seeds)
    with tqdm(total=total, desc=f"worker {index}", position=index, leave=True, unit="run",
              mininterval=1.0, disable=None) as bar:
        def progress() -> None:
            done = sum(min(tune.counts(worker.tune_demand)[0], cfg.n_trials) + min(final.counts_completed(), cfg.seeds)
                       for tune, final in worker.ledgers.values())
            bar.update(done - bar.n)

        worker = Worker(cfg, run, data, storage, env, progress)
        worker.work()


# --- several worker processes --------------------------------------------------------------------


def _worker_process(cfg: StudyConfig, run: RunConfig, index: int) -> None:
    """A spawned worker. SIGINT is ignored (inherited): the parent is the one controller and
    forwards SIGTERM, whose first arrival stops at a safe point and second at once."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as in the command: our bars and tables report trials
    with interrupt.graceful(signals=(signal.SIGTERM,)):
        try:
            guarded(lambda: work(cfg, run, index), run.storage)
        except (KeyboardInterrupt, interrupt.Interrupted):
            sys.exit(130)  # the parent says it once
        except UserError as e:
            print(f"error: worker {index}: {e}", file=sys.stderr)
            sys.exit(e.exit_code)


def run_workers(cfg: StudyConfig, run: RunConfig, data: MNIST | None = None) -> None:
    """Run the study with `run.workers` workers: in this process for one, else spawned processes.
    Returns when every budget is finished; raises Interrupted (exit 130) after every worker stopped."""
    if run.workers == 1:
        with interrupt.graceful():
            work(cfg, run, data=data)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_process, args=(cfg, run, i), name=f"worker-{i}")
             for i in range(run.workers)]
    started: list = []

    def forward(signum: int, count: int) -> bool:
        for p in started:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        return True  # the parent never abandons its workers: it waits for them to stop

    with interrupt.graceful(on_signal=forward):
        try:
            for p in procs:
                if interrupt.STOP.is_set():
                    break
                previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child inherits "ignored"
                try:
                    p.start()
                finally:
                    signal.signal(signal.SIGINT, previous)
                started.append(p)
            for p in started:
                p.join()
        finally:
            for p in started:  # only on an error in the parent itself
                if p.is_alive():
                    p.kill()
                    p.join()
    codes = [p.exitcode for p in started]
    if interrupt.STOP.is_set() or 130 in codes:
        raise interrupt.Interrupted(
            "interrupted: every worker stopped; runs in flight are recorded as failed (or, after a second "
            "signal, failed by their heartbeat); run the same command again to continue")
    failed = [p.name for p in started if p.exitcode != 0]
    if failed:
        raise StudyError(f"{', '.join(failed)} exited with an error (see above); run the same command to resume")
