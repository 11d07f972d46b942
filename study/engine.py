"""The depth study's experiment loop: tune the tuned cells, then train every cell's final runs with K seeds.

A cell is a depth within an experiment (and a parameter budget and shape, for matched; see
study.config). A tuned cell runs a TPE search of its own on a seeded validation hold-out, nothing pruned
(with a learning rate that decays over the run, an early epoch does not predict the last); its best trial
(and runners-up) are then retrained from scratch with seeds 1..K and scored on the test set. A matched
cell tunes nothing apart: it trains every rate of its band with every seed (the factorial), recording
validation (which chooses the rate) and test; its horizon check retrains the rate its base cell chose for
twice the epochs. The recipe cells and their variants tune nothing. Who runs which trial or seed is settled
by `study.coord`; this module turns a trial into a training config (the trainer never sees Optuna) and
records what came back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from mnist_bench import interrupt
from mnist_bench.data import MNIST, Source, load_source
from mnist_bench.env import environment
from mnist_bench.errors import UserError
from mnist_bench.models import mlp
from mnist_bench.train import EpochMetrics, TrainConfig, TrainResult, train_pack

from .config import (
    EXPERIMENTS,
    Cell,
    RunConfig,
    StudyConfig,
    cell_widths,
    chooser,
    comparable,
    parse_study_name,
    refuse_grid_design,
    study_name,
)
from .coord import (
    FIXED,
    SURPLUS,
    TUNE,
    Ledger,
    Progress,
    TrialSeededSampler,
    band_choice,
    best_trial,
    derived_seed,
    encode_curve,
    encode_predictions,
    failed_trial,
    final_key,
    refuse_foreign,
)
from .storage import StudyError, guarded, open_storage

POLL_SECONDS = 2.0
INTERRUPTED = (
    "interrupted: the run in flight is recorded as failed and its slot given back; "
    "run the same command again to continue"
)


# --- a cell's hyperparameters ----------------------------------------------------------------------


def suggest(trial: optuna.Trial, cfg: StudyConfig, cell: Cell) -> dict:
    """The only place a tuned search's trial becomes hyperparameters."""
    space = cfg.tuned.space
    params = {
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "epochs": trial.suggest_int("epochs", 1, space.max_epochs),
    }
    if cell.depth >= 2:
        params["width"] = trial.suggest_int("width", *space.width, log=True)
    if cell.depth >= 3:
        params["taper"] = trial.suggest_float("taper", *space.taper)
    return params


def train_config(cfg: StudyConfig, cell: Cell, params: dict, seed: int, threads: int) -> TrainConfig:
    if cell.experiment == "recipe":
        v = cfg.recipe.variant(cell.variant)
        return TrainConfig(
            lr=v["lr"], epochs=v["epochs"], batch_size=64, momentum=v["momentum"], seed=seed, threads=threads
        )
    if cell.experiment == "matched":
        epochs = cfg.matched.epochs * (2 if cell.variant == "horizon" else 1)
    else:
        epochs = int(params["epochs"])
    return TrainConfig(
        lr=params["lr"],
        epochs=epochs,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        seed=seed,
        threads=threads,
    )


def load_data(cfg: StudyConfig, run: RunConfig) -> dict[str, MNIST | Source]:
    """The data each experiment trains on: "split" (training images minus the validation hold-out of
    split_seed) for tuning, "full" (every training image, no hold-out) for the recipe, and "source" (the
    verified files, unsplit) from which a study with split_per_seed gives each final seed its own hold-out."""
    source = load_source(run.data_dir, device=run.device, dataset=cfg.dataset)
    data: dict[str, MNIST | Source] = {"source": source}
    if {"matched", "tuned"} & set(cfg.experiments):
        data["split"] = source.split(cfg.val_size, cfg.split_seed, cfg.train_subset)
    if "recipe" in cfg.experiments:
        data["full"] = source.split(0, train_subset=cfg.train_subset)
        if any(c.variant == "standardised" for c in cfg.cells()):
            data["standardised"] = data["full"].standardised()
    return data


def data_of(data: dict[str, MNIST | Source], cell: Cell) -> MNIST:
    if cell.experiment != "recipe":
        return data["split"]
    return data["standardised" if cell.variant == "standardised" else "full"]


BAND_KEY = "rate"  # + band point + "-seed" + seed: a factorial cell's final run


def factorial_pack(keys: list[str], runs: dict[str, Run]) -> list[str]:
    """A factorial cell's next pack from the claim window `keys`: in a band cell (several rates per seed), the
    first seed's rates, which share its batch order and hold-out; in a check cell (one chosen rate at every
    seed), the whole window, each seed with its own order. `runs` is every run of the cell."""
    if len({r.point for r in runs.values()}) > 1:
        first = runs[keys[0]].seed
        return [k for k in keys if runs[k].seed == first]
    return keys


def band_key(point: int, seed: int) -> str:
    return f"{BAND_KEY}{point}-seed{seed}"


# --- studies -------------------------------------------------------------------------------------


def refuse_mixed_settings(storage, cfg: StudyConfig) -> None:
    """The cells of one study share its study-level settings (dataset, training subset, hold-out,
    seeds, batch size, ...), which its config.json and report state once. A command whose shared
    settings differ from cells already stored under the same name is refused with one line, even when
    it selects other experiments or depths (each cell's own settings are checked in open_studies)."""
    cells = cfg.cells()
    if not cells:
        return
    mine = {k: v for k, v in cfg.identity(cells[0]).items() if k not in ("experiment", "cell")}
    ours = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        parsed = parse_study_name(summary.study_name)
        stored = summary.user_attrs.get("config")
        if not parsed or parsed[0] != cfg.name or not isinstance(stored, dict):
            continue  # none yet, or not study.depth's: open_studies says so for the cells it opens
        refuse_grid_design(parsed[1].experiment, stored.get("experiment"), f"study {cfg.name!r} in this storage")
        ours.append((summary, stored))
    for summary, stored in ours:  # a study of the grid design is refused as such first, whatever else differs
        theirs = {"dataset": "mnist", **stored}  # made before datasets were a setting: MNIST was the only one
        changed = sorted(k for k in mine if theirs.get(k) != mine[k])
        if changed:
            raise StudyError(
                f"study {cfg.name!r} in this storage has cells made with other settings ({', '.join(changed)}; "
                f"e.g. {summary.study_name!r}); use another --storage, --out or --study-name"
            )


def band_grew(stored: dict, identity: dict) -> bool:
    """Whether `identity` is `stored` with rates appended to the factorial's band and nothing else changed: a band
    may grow, as budgets may (a depth whose best rate sat on the band's edge: docs/method.md), and every run already
    trained keeps its band point, since a point is its rate's position in the band as declared."""
    old, new = stored.get("experiment", {}), identity.get("experiment", {})
    band, grown = old.get("band") or [], new.get("band") or []
    same = {**stored, "experiment": {**old, "band": grown}} == identity
    return same and len(grown) > len(band) > 0 and grown[: len(band)] == band


def open_studies(
    storage, cfg: StudyConfig, cell: Cell, heartbeat: int | None = None
) -> tuple[optuna.Study, optuna.Study]:
    """(tuning study, final-runs study) of `cell`, created if new, checked if resumed. A study
    remembers the largest budget it was given; asking for less is refused (its tables hold more). It
    also remembers the heartbeat interval it was started with: every command on it must judge a
    worker dead after the same grace period (a command with a shorter one failed another command's
    live runs as stale), so another `heartbeat` is refused."""
    sampler = TrialSeededSampler(
        derived_seed(cfg.sampler_seed, cell.key),  # each cell's search independent of the others'
        lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.sampler_startup_trials),
    )
    pruner = optuna.pruners.NopPruner()  # every trial runs to its end: see the module docstring
    tune = optuna.create_study(
        storage=storage,
        study_name=study_name(cfg.name, cell),
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    refuse_foreign(tune)  # another program's study of that name is never adopted (nor a final study made beside it)
    final = optuna.create_study(
        storage=storage, study_name=study_name(cfg.name, cell, final=True), direction="maximize", load_if_exists=True
    )
    refuse_foreign(final)
    identity = cfg.identity(cell)
    for study, budget_key, budget in ((tune, "n_trials", cfg.n_trials(cell)), (final, "seeds", cfg.seeds(cell))):
        attrs = study.user_attrs
        stored = attrs.get("config")
        if isinstance(stored, dict):
            refuse_grid_design(cell.experiment, stored.get("experiment"), f"study {study.study_name!r} in this storage")
        if stored is not None and "dataset" not in stored:
            stored = {**stored, "dataset": "mnist"}  # made before datasets were a setting: MNIST was the only one
        stored = comparable(stored) if stored is not None else None
        if stored is None or (stored != identity and band_grew(stored, identity)):
            study.set_user_attr("config", identity)  # new, or a factorial whose band grew (its runs stay valid)
        elif stored != identity:
            changed = sorted(k for k in identity if stored.get(k) != identity[k])
            ours, theirs = identity.get("experiment", {}), stored.get("experiment", {})
            changed += sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise StudyError(
                f"study {study.study_name!r} in this storage was made with other settings "
                f"({', '.join(changed)}); use another --storage, --out or --study-name"
            )
        if budget < attrs.get(budget_key, 0):
            flag = "--n-trials" if budget_key == "n_trials" else "--seeds"
            raise StudyError(
                f"study {study.study_name!r} already has a budget of {attrs[budget_key]} "
                f"({flag}); a budget cannot shrink: pass {flag} {attrs[budget_key]} or more"
            )
        if budget > attrs.get(budget_key, 0):
            study.set_user_attr(budget_key, budget)
        if heartbeat is not None and attrs.get("heartbeat") is None:
            study.set_user_attr("heartbeat", heartbeat)
        elif heartbeat is not None and attrs["heartbeat"] != heartbeat:
            raise StudyError(
                f"study {study.study_name!r} runs with --heartbeat {attrs['heartbeat']} (a silent worker's run is "
                f"redone after {3 * attrs['heartbeat']} s); pass --heartbeat {attrs['heartbeat']}: every command on "
                "one study must judge liveness alike"
            )
    return tune, final


# --- one worker ----------------------------------------------------------------------------------


class Worker:
    """Claims and runs tuning trials and final runs until every cell's budget is finished."""

    def __init__(
        self,
        cfg: StudyConfig,
        run: RunConfig,
        data: dict[str, MNIST],
        storage,
        env: dict,
        progress: Callable[[], None] = lambda: None,
    ):
        self.cfg, self.run, self.data, self.env, self.progress = cfg, run, data, env, progress
        self.cells = cfg.cells()
        self.done: set[Cell] = set()
        self.splits: dict[int, MNIST] = {}  # final seeds' own hold-outs (split_per_seed)
        self.labelled: set[Cell] = set()  # cells whose final study holds the test labels
        self.base = {c: chooser(c) for c in self.cells}
        self.settings = {e: dataclasses.asdict(getattr(cfg, e)) for e in EXPERIMENTS}  # for cell_widths
        self.studies = {c: open_studies(storage, cfg, c, run.heartbeat_interval) for c in self.cells}
        self.ledgers = {
            c: (Ledger(storage, t, run.grace_period), Ledger(storage, f, run.grace_period))
            for c, (t, f) in self.studies.items()
        }

    def tune_demand(self, cell: Cell) -> dict[str, int]:
        """Tuned cells: `n_trials` anonymous slots plus one for each failed trial (diverged or at chance), so
        `n_trials` trials train, up to twice the budget in all; other cells tune nothing. The demand only grows,
        as the claim protocol needs."""
        n = self.cfg.n_trials(cell)
        if not n:
            return {}
        trials = self.ledgers[cell][0].trials()
        failed = sum(not t.user_attrs.get(SURPLUS) and failed_trial(t) for t in trials)
        return {TUNE: n + min(failed, n)}

    def final_demand(self, cell: Cell) -> tuple[dict[str, int], dict[str, Run]]:
        """(demand, what each key runs) of a cell whose tuning (or whose base cell's runs) is finished. A matched
        cell: every band point with every seed, seed-major (a seed's rates share its batch order: one pack); its
        check: the band point its base cell chose, with the check's seeds. A tuned cell: its best trial with the
        seeds, and its runners-up (Tuned.runners_up) with runner_up_seeds each: how much the answer hangs on the
        search's pick. A recipe cell: its seeds."""
        base = self.base[cell]
        seeds = range(1, self.cfg.seeds(cell) + 1)
        if cell.experiment == "matched":
            if base == cell:
                runs = {band_key(i, s): Run(s, FIXED, i) for s in seeds for i in range(len(self.cfg.matched.band))}
                return {k: 1 for k in runs}, runs
            point = band_choice(self.ledgers[base][1].trials())
            if point is None:
                raise StudyError(f"{cell.key}: no completed final run of {base.key} to choose a rate from")
            runs = {band_key(point, s): Run(s, FIXED, point) for s in seeds}
            return {k: 1 for k in runs}, runs
        if self.cfg.n_trials(base) == 0:
            runs = {final_key(FIXED, s): Run(s, FIXED) for s in seeds}
            return {k: 1 for k in runs}, runs
        trials = self.ledgers[base][0].trials()
        chosen = best_trial(trials)
        if chosen is None:
            raise StudyError(
                f"{cell.key}: no completed, non-diverged tuning trial to retrain; widen the search space or grow "
                "--n-trials"
            )
        runs = {final_key(chosen.number, s): Run(s, chosen.number) for s in seeds}
        if cell.experiment == "tuned":
            for place in range(1, self.cfg.tuned.runners_up + 1):
                if (other := best_trial(trials, place)) is not None:
                    more = range(1, self.cfg.tuned.runner_up_seeds + 1)
                    runs |= {final_key(other.number, s): Run(s, other.number, place=place) for s in more}
        return {k: 1 for k in runs}, runs

    def step(self) -> str:
        """Do one unit of work: 'ran' (a pack of trials or seeds, won or lost), 'wait' (others hold what is
        left) or 'done' (every budget finished)."""
        waiting = False
        for cell in self.cells:
            if cell in self.done:
                continue
            tune, final = self.ledgers[cell]
            base = self.base[cell]
            if base != cell:  # a matched check
                base_final = self.ledgers[base][1]
                if not base_final.finished(self.final_demand(base)[0]):
                    waiting = True  # a check retrains the rate its base cell chooses from all its seeds
                    continue
            demand = self.tune_demand(cell)
            if demand:
                tune.recover_stale()
                if keys := self.tune_keys(cell, demand):
                    self.tune_pack(cell, keys)
                    return "ran"
                if not tune.finished(demand):
                    waiting = True
                    continue
            demand, runs = self.final_demand(cell)
            final.recover_stale()
            if keys := final.open_keys(demand, self.pack_size(len(demand))):
                first = runs[keys[0]]
                if first.point is not None:  # a factorial: one seed's rates, one batch order and hold-out
                    keys = factorial_pack(keys, runs)
                keys = [k for k in keys if runs[k].source == first.source]  # one configuration: one shape
                self.final_pack(cell, {k: runs[k] for k in keys})
                return "ran"
            if final.finished(demand):
                self.done.add(cell)  # finished work stays finished: never read this cell again
            else:
                waiting = True
        return "wait" if waiting else "done"

    def pack_size(self, budget: int) -> int:
        """How many of a budget's runs to claim as one pack: at most --pack, and no more than this command's
        share of the budget, so its workers finish a cell together instead of one training while one waits."""
        return max(1, min(self.run.pack, -(-budget // self.run.workers)))

    def tune_keys(self, cell: Cell, demand: dict[str, int]) -> list[str]:
        """What to claim next in a cell's tuning: one slot of its search (each proposal waits for the results
        before it)."""
        ledger = self.ledgers[cell][0]
        return [k] if (k := ledger.open_key(demand)) is not None else []

    def work(self) -> None:
        while True:
            interrupt.check(INTERRUPTED)
            state = self.step()
            self.progress()
            if state == "done":
                return
            if state == "wait":
                interrupt.STOP.wait(POLL_SECONDS)

    def tune_pack(self, cell: Cell, keys: list[str]) -> None:
        study, ledger = self.studies[cell][0], self.ledgers[cell][0]
        jobs = []
        with warnings.catch_warnings():  # ask() warns when heartbeats are on; Ledger.heartbeat records them
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            for _ in keys:  # the sampler proposes; the slot is settled after creation
                trial = study.ask()
                claim = ledger.settle(trial._trial_id, capacity=self.tune_demand(cell)[TUNE])
                if claim.won:
                    jobs.append(Job(claim.trial_id, trial, self.cfg.tuning_seed))  # never a final seed
        if jobs:
            self.train_jobs(cell, ledger, jobs, tuning=True)

    def final_pack(self, cell: Cell, runs: dict[str, Run]) -> None:
        """Claim and train final runs of one configuration (one source trial: one shape)."""
        ledger = self.ledgers[cell][1]
        tuning = self.ledgers[self.base[cell]][0]
        source = next(iter(runs.values())).source
        params = {} if source == FIXED else next(t for t in tuning.trials() if t.number == source).params
        jobs = []
        for key, run in runs.items():
            attrs = {"source_trial": source, "seed": run.seed, "worker": self.env.get("worker")}
            if run.point is not None:
                attrs["band_point"] = run.point
            if run.place:
                attrs["place"] = run.place
            claim = ledger.claim(key, attrs)
            if claim.won:
                lr = {} if run.point is None else {"lr": self.cfg.matched.band[run.point]}
                jobs.append(Job(claim.trial_id, None, run.seed, params | lr))
        if jobs:
            self.train_jobs(cell, ledger, jobs, tuning=False)

    def train_jobs(self, cell: Cell, ledger: Ledger, jobs: list[Job], tuning: bool) -> None:
        """Train the claimed `jobs` of one cell as one pack and record each result on its own claim. Every
        claim beats while the pack trains; any exit but a normal one gives every unfinished claim back."""
        progress = Progress()
        with contextlib.ExitStack() as stack:
            for job in jobs:
                stack.enter_context(
                    ledger.heartbeat(job.trial_id, self.run.heartbeat_interval, progress.idle, self.run.grace_period)
                )
                stack.enter_context(holding(ledger, job.trial_id))
            if tuning:
                for job in jobs:
                    ledger.storage.set_trial_user_attr(job.trial_id, "worker", self.env.get("worker"))
                    job.params = suggest(job.trial, self.cfg, cell)
            configs = [train_config(self.cfg, cell, job.params, job.seed, self.run.threads) for job in jobs]
            widths = [cell_widths(cell, job.params, self.settings[cell.experiment]) for job in jobs]
            results = train_pack(  # one shape: a cell's seeds or a seed's rates; a search asks one at a time
                [mlp(w) for w in widths],
                [self.data_for(cell, job.seed, tuning) for job in jobs],
                configs,
                on_epoch=[self.reporter(job, config) for job, config in zip(jobs, configs)] if tuning else None,
                evaluate_test=not tuning,
                should_stop=[lambda: progress.touch() or interrupt.STOP.is_set()] * len(jobs),
                test_each_epoch=cell.experiment == "recipe",
            )
            for job, config, w, result in zip(jobs, configs, widths, results):
                if not result.interrupted and not job.lost:
                    self.record(cell, ledger, job, config, w, result, tuning)
            if any(r.interrupted for r in results):
                raise interrupt.Interrupted(INTERRUPTED)

    def data_for(self, cell: Cell, seed: int, tuning: bool) -> MNIST:
        """A run's data: the recipe's, a tuning run's (the study's one hold-out), or, with split_per_seed, final
        seed k's own hold-out (made once per seed and kept while this worker's packs use it)."""
        if tuning or cell.experiment == "recipe" or not self.cfg.split_per_seed:
            return data_of(self.data, cell)
        split = self.cfg.final_split(seed)
        if split not in self.splits:
            if len(self.splits) >= 2:
                self.splits.pop(next(iter(self.splits)))
            self.splits[split] = self.data["source"].split(self.cfg.val_size, split, self.cfg.train_subset)
        return self.splits[split]

    @staticmethod
    def reporter(job: Job, config: TrainConfig) -> Callable[[EpochMetrics], bool]:
        """A tuning trial's on_epoch: report the validation accuracy; stop (and drop) if its claim was failed
        as stale while this worker was paused."""

        def on_epoch(m: EpochMetrics) -> bool:
            try:
                job.trial.report(m.val_accuracy, m.epoch)
                # Never prune at the last epoch: the trial is finished anyway.
                return m.epoch < config.epochs and job.trial.should_prune()
            except UpdateFinishedTrialError:
                job.lost = True
                return True

        return on_epoch

    def record(
        self, cell: Cell, ledger: Ledger, job: Job, config: TrainConfig, widths, result: TrainResult, tuning: bool
    ) -> None:
        attrs = {
            "curve": encode_curve(result.epochs),
            "train_seconds": result.train_seconds,
            "samples_seen": result.samples_seen,
            "samples_per_s": result.samples_per_s,
            "diverged": result.diverged,
            "pack": result.pack,
            "env": self.env,
        }
        if tuning:
            attrs["tuning_seed"] = job.seed
            if result.diverged:  # worse than chance: the sampler learns to avoid it; tables say "diverged"
                ledger.finish(job.trial_id, TrialState.COMPLETE, 0.0, attrs)
            elif result.stopped:
                ledger.finish(job.trial_id, TrialState.PRUNED, None, attrs)
            else:
                ledger.finish(job.trial_id, TrialState.COMPLETE, result.epochs[-1].val_accuracy, attrs)
            return
        attrs = {
            **{f"param_{k}": v for k, v in job.params.items()},
            "param_lr": config.lr,
            "param_epochs": config.epochs,
            "param_momentum": config.momentum,
            "schedule": config.schedule,
            "widths": list(widths),
            "test_predictions": None if (pred := result.test_predictions) is None else encode_predictions(pred),
            "test_accuracy": result.test_accuracy,
            "test_correct": result.test_correct,  # the exact figure: test_accuracy is test_correct / test_images
            "test_images": result.test_images,
            "test_loss": result.test_loss,
            # the last epoch's validation (a factorial cell chooses its rate by it; its test predictions decide)
            "val_accuracy": result.epochs[-1].val_accuracy if result.epochs else None,
            "val_correct": result.epochs[-1].val_correct if result.epochs else None,
            "split_seed": self.cfg.final_split(job.seed) if cell.experiment != "recipe" else None,
            **attrs,
        }
        value = result.test_accuracy if result.test_accuracy is not None else 0.0
        if cell not in self.labelled and result.test_predictions is not None:
            final = self.studies[cell][1]  # the test labels once per final study: predictions are read against them
            if "test_labels" not in final.user_attrs:
                final.set_user_attr("test_labels", encode_predictions(data_of(self.data, cell).test_y.cpu()))
            self.labelled.add(cell)
        ledger.finish(job.trial_id, TrialState.COMPLETE, value, attrs)


@dataclasses.dataclass(frozen=True)
class Run:
    """What a final run's key stands for: its seed, the tuning trial it retrains (FIXED: none), the band point of
    a factorial cell, and the place of that trial in its search (0 the best; 1, 2 runners-up)."""

    seed: int
    source: int
    point: int | None = None
    place: int = 0


@dataclasses.dataclass
class Job:
    """A claimed trial or seed on its way through a pack."""

    trial_id: int
    trial: optuna.Trial | None  # a tuning trial (suggests and reports); None for a final run
    seed: int
    params: dict = dataclasses.field(default_factory=dict)
    lost: bool = False  # its claim was failed as stale meanwhile: the result is dropped


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
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            return (
                False  # a second signal stops at once: no write that could wait on a lock; the heartbeat rule fails it
            )
        if exc_type is not None:
            try:
                self.ledger.give_back(self.trial_id)
            except Exception:  # noqa: BLE001 - storage gone: the heartbeat rule fails it later
                pass
        return False


def work(cfg: StudyConfig, run: RunConfig, index: int = 0, data: dict[str, MNIST] | None = None, storage=None) -> None:
    """One worker, in this process: load the data and open the storage unless given, then work until every
    budget is finished. Signals: see mnist_bench.interrupt (the caller installs the handlers)."""
    data = data if data is not None else load_data(cfg, run)
    device = next(iter(data.values())).device
    env = environment(device, run.threads) | {"worker": f"{os.uname().nodename}:{os.getpid()}"}
    if storage is None:
        storage = open_storage(run.storage, run.heartbeat_interval, run.grace_period)
    from tqdm import tqdm

    # A thread lock, not tqdm's default multiprocessing one: a worker killed with -9 then leaks no semaphore
    # (the resource tracker would print a warning about it when the command ends).
    tqdm.set_lock(threading.RLock())
    total = sum(cfg.n_trials(c) + cfg.final_runs(c) for c in cfg.cells())
    with tqdm(
        total=total, desc=f"worker {index}", position=index, leave=True, unit="run", mininterval=1.0, disable=None
    ) as bar:

        def progress() -> None:
            if bar.disable:  # no terminal: do not query every cell's trials after every run for nothing
                return
            done = sum(
                min(tune.counts(worker.tune_demand(c))[0], cfg.n_trials(c))
                + min(final.counts_completed(), cfg.final_runs(c))
                for c, (tune, final) in worker.ledgers.items()
            )
            bar.update(done - bar.n)

        worker = Worker(cfg, run, data, storage, env, progress)
        worker.work()


# --- several worker processes --------------------------------------------------------------------


def die_with_parent(parent: int) -> None:
    """Stop this worker at its next safe point, like a first signal, when its parent dies (even by
    kill -9), instead of running on as an orphan. Linux: prctl(PR_SET_PDEATHSIG) with a signal of its
    own, because the kernel sends it again each time a thread of a multi-threaded parent exits (a
    second SIGTERM would mean "stop at once"); elsewhere a thread watches the parent's pid."""
    signal.signal(signal.SIGUSR1, lambda signum, frame: interrupt.STOP.set())
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGUSR1), 0, 0, 0) == 0:  # PR_SET_PDEATHSIG = 1
            if os.getppid() != parent:  # the parent died before the request took effect
                interrupt.STOP.set()
            return
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        interrupt.STOP.set()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def stop_at_once_on_the_second(signum: int, count: int) -> bool:
    """A worker's second signal: exit now, writing nothing (a write could wait on a database lock, and an
    exception raised at an arbitrary point can surface as "Exception ignored" noise). Its run in flight
    stays RUNNING until the heartbeat rule fails it; the parent says the one line."""
    if count > 1:
        os._exit(130)
    return False


def stop_at_the_next_safe_point(signum: int, count: int) -> bool:
    """The lone worker's second signal takes the first one's path (the stop flag: the pack stops at its next
    step, its runs are given back, one line): raised at an arbitrary point, KeyboardInterrupt could land in
    the heartbeat thread's join or SQLAlchemy's pool. A third exits at once, writing nothing (a write can
    wait on a database lock): its runs in flight stay running until the heartbeat rule fails them. Silent: the
    command's one line comes when it stops."""
    if count > 2:
        os._exit(130)
    return True


def _worker_process(cfg: StudyConfig, run: RunConfig, index: int, parent: int) -> None:
    """A spawned worker. SIGINT is ignored (inherited): the parent is the one controller and
    forwards SIGTERM, whose first arrival stops at a safe point and second at once."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as in the command: our bars and tables report trials
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 PID`: a stuck worker's stacks on stderr
    with interrupt.graceful(signals=(signal.SIGTERM,), on_signal=stop_at_once_on_the_second):
        die_with_parent(parent)
        try:
            guarded(lambda: work(cfg, run, index), run.storage)
        except (KeyboardInterrupt, interrupt.Interrupted):
            sys.exit(130)  # the parent says it once
        except UserError as e:
            print(f"error: worker {index}: {e}", file=sys.stderr)
            sys.exit(e.exit_code)


def run_workers(cfg: StudyConfig, run: RunConfig, data: dict[str, MNIST] | None = None, storage=None) -> None:
    """Run the study with `run.workers` workers: in this process for one, else spawned processes.
    Returns when every budget is finished; raises Interrupted (exit 130) after every worker stopped."""
    if run.workers == 1:
        with interrupt.graceful(on_signal=stop_at_the_next_safe_point):
            work(cfg, run, data=data, storage=storage)  # the command's own storage: half the connections
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_process, args=(cfg, run, i, os.getpid()), name=f"worker-{i}")
        for i in range(run.workers)
    ]
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
                if interrupt.STOP.is_set():  # a signal during start() was forwarded before p was in `started`
                    os.kill(p.pid, signal.SIGTERM)
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
            "signal, failed by their heartbeat); run the same command again to continue"
        )
    failed = [exit_words(p.name, p.exitcode) for p in started if p.exitcode != 0]
    if failed:
        raise StudyError(f"{'; '.join(failed)}; everything finished is in the storage: run the same command to resume")


def exit_words(name: str, code: int | None) -> str:
    """'worker-1 was killed by SIGKILL' or 'worker-1 exited with code 1 (its error is above)'."""
    if code is not None and code < 0:
        try:
            return f"{name} was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"{name} was killed by signal {-code}"
    return f"{name} exited with code {code} (its one-line error is above)"
