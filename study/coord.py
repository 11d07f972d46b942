"""Coordination: how any number of workers share one Optuna storage without losing,
repeating or double-counting work. One protocol for tuning trials and final seed runs alike:

- A *claim* is a trial. Everything that says what it claims is written when the trial is created
  (a final run's source trial and seed travel in the creating transaction), so a claim is visible
  to every worker the moment it exists. Tuning trials all claim the same key, ``tune``.
- Optuna creates trials under a lock on the study row, so trial numbers are the order in which
  claims became visible. A claim wins when fewer than `capacity` live claims of its key have lower
  numbers; the loser is marked ``surplus`` and failed at once (it ran nothing, tables skip it).
- A claim is live while its trial is running or finished (complete or pruned); a failed trial
  holds nothing, so its slot or seed is claimed again. A waiting trial holds nothing either: this
  protocol never creates one, and one re-enqueued by another tool (Optuna's RetryFailedTrialCallback
  copies a failed claim, key included, as WAITING) would otherwise hold a slot nobody runs. A tuning
  worker's ``ask`` may pick such a copy up and run it; then it claims like any other trial.
- A worker with nothing left to claim waits until every slot is *finished*, not merely claimed,
  failing stale claims while it waits. Liveness is a counter (system attr ``beat``) that the
  claiming worker raises every heartbeat interval while its work makes progress; an observer fails a
  running trial whose counter it has seen unchanged for longer than the grace period *on its own
  monotonic clock*. No two machines' clocks or time zones are ever compared, a claim that never beat
  (its worker died right after creating it) is covered by the same rule, and it works through any
  storage, Optuna's gRPC proxy included. Where the storage is a database with Optuna's heartbeats
  on, workers also record those (Optuna's own tools read them) and observers also apply Optuna's
  rule, judged in the database's clock, which needs no watching period.
- A worker whose own trial was failed as stale (it was paused, or cut off) drops its result when
  it notices and carries on; the slot has been, or will be, redone by someone.

Every step is a method of `Ledger`, so tests script interleavings of in-process workers step by step.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from .config import FINAL_SUFFIX, failed_run, rank_band
from .storage import StudyError

if TYPE_CHECKING:  # the tables and the report read stored curves without loading PyTorch
    from mnist_bench.train import EpochMetrics

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.RUNNING, *FINISHED)  # WAITING is not live: see the module docstring
TUNE = "tune"  # the key every tuning trial claims
SURPLUS = "surplus"  # user attr of a claim that lost its race
SLOT = "slot"  # system attr: a tuning trial's sampler stream (see TrialSeededSampler)
BEAT = "beat"  # system attr: the claiming worker's heartbeat counter (see the module docstring)


# --- the sampler ---------------------------------------------------------------------------------


def derived_seed(seed: int, number: int | str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "big")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler whose random stream is a function of (seed, slot): the slot of a trial is the smallest
    number no live trial before it holds (system attr ``slot``), so an uninterrupted search's trial n
    draws stream n, and a trial that was given back (Ctrl-C, a stale claim: failed, ran nothing) frees
    its slot: the next proposal re-asks it. A lone worker resumed after an interruption therefore
    proposes what the uninterrupted run would have (the sampler's history, complete and pruned trials,
    is the same), and never replays a configuration of a finished trial (a sampler seeded once per
    process would). Workers sharing a storage propose from different slots; two asks that race within
    the moment between a trial's creation and its slot's write, just after a third trial was given
    back, can share a stream (one extra trial of a configuration, never a wrong result)."""

    def __init__(self, seed: int, make: Callable[[int], optuna.samplers.BaseSampler]):
        self._seed, self._make = seed, make
        self._current = make(seed)

    def before_trial(self, study, trial):
        slot = free_slot(study.get_trials(deepcopy=False), trial.number)
        study._storage.set_trial_system_attr(trial._trial_id, SLOT, slot)
        self._current = self._make(derived_seed(self._seed, slot))
        self._current.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._current.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._current.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._current.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._current.after_trial(study, trial, state, values)


def free_slot(trials: list[FrozenTrial], number: int) -> int:
    """The smallest slot that no live trial numbered below `number` holds (a trial stored without one,
    by an older version, holds its own number, the stream it drew)."""
    held = {t.system_attrs.get(SLOT, t.number) for t in trials if t.number < number and t.state != TrialState.FAIL}
    return next(s for s in range(number + 1) if s not in held)


# --- stored values -------------------------------------------------------------------------------

CURVE_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "train_seconds",
    "test_accuracy",
    "val_correct",
    "test_correct",
)


def encode_curve(epochs: list[EpochMetrics]) -> list[list]:
    """A trial's per-epoch metrics as stored in its `curve` user attr."""
    return [[getattr(e, c) for c in CURVE_COLUMNS] for e in epochs]


def decode_curve(rows) -> list[dict]:
    """Stored rows back to named fields (rows stored before a field existed read it as None)."""
    return [dict(zip(CURVE_COLUMNS, [*row, *[None] * (len(CURVE_COLUMNS) - len(row))])) for row in rows or []]


def encode_predictions(predictions) -> str:
    """A final run's predicted class of each test image (uint8, one byte an image) as its `test_predictions`
    user attr: base64, 13,336 characters for 10,000 images, a plain string every storage holds."""
    return base64.b64encode(predictions.numpy().astype(np.uint8).tobytes()).decode("ascii")


def decode_predictions(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8)


def is_live(t: FrozenTrial) -> bool:
    return t.state in LIVE and not t.user_attrs.get(SURPLUS)


def key_of(t: FrozenTrial) -> str:
    return t.user_attrs.get("claim", TUNE)


def final_key(source_trial: int, seed: int) -> str:
    return f"trial{source_trial}-seed{seed}"


FIXED = -1  # source_trial of final runs of a cell with nothing to tune (the recipe, a matched cell)


def ranking(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """A tuned search's trials in order of preference: the first is retrained, the next are its runners-up.
    The one rule, used by the workers and by the tables: completed, non-diverged trials by validation
    accuracy; ties go to the earliest."""
    done = [
        t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and not t.user_attrs.get(SURPLUS)
    ]
    live = [t for t in done if not t.user_attrs.get("diverged")]
    return sorted(live, key=lambda t: (-t.value, t.number))


def failed_trial(t: FrozenTrial) -> bool:
    """A trial that ran to its end and learned nothing: diverged, or completed at or below twice chance."""
    value = t.value if t.value is not None else float("nan")
    return bool(t.user_attrs.get("diverged")) or (t.state == TrialState.COMPLETE and failed_run(value))


def best_trial(trials: list[FrozenTrial], place: int = 0) -> FrozenTrial | None:
    """The tuning trial that is retrained (see ranking); place 1, 2, ...: its runners-up."""
    ranked = ranking(trials)
    return ranked[place] if len(ranked) > place else None


def band_choice(runs: list) -> int | None:
    """The band point a matched cell chooses from its completed final runs (FrozenTrials with "band_point"
    and "val_accuracy" attributes), by config.rank_band; a diverged run counts at 0."""
    scores: dict[int, list[float]] = {}
    for t in runs:
        point = t.user_attrs.get("band_point")
        if point is None or t.state != TrialState.COMPLETE or t.user_attrs.get(SURPLUS):
            continue
        val = t.user_attrs.get("val_accuracy")
        scores.setdefault(int(point), []).append(0.0 if val is None or t.user_attrs.get("diverged") else float(val))
    ranked = rank_band(scores)
    return ranked[0] if ranked else None


def optuna_heartbeats(storage) -> bool:
    """Whether `storage` keeps Optuna's heartbeats (a database opened with an interval; the gRPC proxy
    does not relay them)."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


class Progress:
    """When the work last moved: touched by the training loop at every step, read by the watchdog."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def idle(self) -> float:
        return time.monotonic() - self.last


# --- the protocol --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    trial_id: int
    number: int
    key: str
    won: bool


class Ledger:
    """One study's claims as every worker sees them in the storage (never a cached view)."""

    def __init__(
        self,
        storage: optuna.storages.RDBStorage,
        study: optuna.Study,
        grace_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.storage, self.study, self.grace, self.clock = storage, study, grace_seconds, clock
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.seen: dict[int, tuple[object, float]] = {}  # running trial -> (its beat, when first seen so)

    def trials(self) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False)

    # Reading the board.
    def open_key(self, demand: Mapping[str, int]) -> str | None:
        """The first key with fewer live claims than its capacity: what to claim next."""
        return next(iter(self.open_keys(demand, 1)), None)

    def open_keys(self, demand: Mapping[str, int], limit: int) -> list[str]:
        """Up to `limit` distinct keys with fewer live claims than their capacity, in `demand`'s order: what a
        worker claims next as one pack (each key is still claimed, and settled, on its own)."""
        live = [key_of(t) for t in self.trials() if is_live(t)]
        return [k for k, cap in demand.items() if live.count(k) < cap][:limit]

    def finished(self, demand: Mapping[str, int]) -> bool:
        done = [key_of(t) for t in self.trials() if t.state in FINISHED and not t.user_attrs.get(SURPLUS)]
        return all(done.count(k) >= cap for k, cap in demand.items())

    def counts(self, demand: Mapping[str, int]) -> tuple[int, int]:
        """(finished, in flight) claims that count towards `demand`."""
        trials = [t for t in self.trials() if is_live(t) and key_of(t) in demand]
        finished = sum(t.state in FINISHED for t in trials)
        return finished, len(trials) - finished

    def counts_completed(self) -> int:
        return sum(1 for t in self.trials() if t.state == TrialState.COMPLETE and not t.user_attrs.get(SURPLUS))

    # Claiming.
    def claim(
        self,
        key: str,
        attrs: Mapping | None = None,
        params: Mapping | None = None,
        distributions: Mapping | None = None,
    ) -> Claim:
        """Create a trial claiming `key`, then settle the race."""
        return self.settle(self.create(key, attrs, params, distributions))

    def create(
        self,
        key: str,
        attrs: Mapping | None = None,
        params: Mapping | None = None,
        distributions: Mapping | None = None,
    ) -> int:
        """Create a trial claiming `key`; the claim, `attrs` and fixed `params` (with their
        `distributions`) are written in the same transaction."""
        template = FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.datetime.now(),
            datetime_complete=None,
            params=dict(params or {}),
            distributions=dict(distributions or {}),
            user_attrs={"claim": key, **(attrs or {})},
            system_attrs={},
            intermediate_values={},
            trial_id=-1,
        )
        return self.storage.create_new_trial(self.study_id, template_trial=template)

    def settle(self, trial_id: int, capacity: int = 1) -> Claim:
        """Decide a created claim: it wins if fewer than `capacity` live claims of its key precede it.
        A loser is marked surplus and failed before this returns."""
        trials = self.trials()
        me = next(t for t in trials if t._trial_id == trial_id)
        key = key_of(me)
        ahead = sum(1 for t in trials if is_live(t) and key_of(t) == key and t.number < me.number)
        won = me.state == TrialState.RUNNING and ahead < capacity
        if not won:
            self.surrender(trial_id)
        return Claim(trial_id, me.number, key, won)

    def surrender(self, trial_id: int) -> None:
        with contextlib.suppress(UpdateFinishedTrialError):
            self.storage.set_trial_user_attr(trial_id, SURPLUS, True)
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)

    # Finishing.
    def finish(
        self, trial_id: int, state: TrialState, value: float | None = None, attrs: Mapping | None = None
    ) -> bool:
        """Record a result. False when the trial was failed meanwhile as stale: the result is dropped."""
        try:
            for k, v in (attrs or {}).items():
                self.storage.set_trial_user_attr(trial_id, k, v)
            if state == TrialState.PRUNED and value is None:
                steps = self.storage.get_trial(trial_id).intermediate_values
                value = steps[max(steps)] if steps else None
            self.storage.set_trial_state_values(trial_id, state, None if value is None else [value])
            return True
        except UpdateFinishedTrialError:
            return False

    def give_back(self, trial_id: int) -> None:
        """Fail a claim this worker holds (interrupted): its slot or seed is free again."""
        with contextlib.suppress(UpdateFinishedTrialError):
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)

    # Recovering.
    def recover_stale(self) -> list[int]:
        """Fail running claims whose worker is gone; returns their trial numbers. A claim is gone when
        its beat counter has not moved for the grace period on this observer's clock (a claim seen for
        the first time, or with a new beat, starts a new watch); on a database with Optuna's heartbeats
        also when Optuna's rule finds its last heartbeat older than that in the database's clock."""
        failed = []
        if optuna_heartbeats(self.storage):
            for trial_id in self.storage._get_stale_trial_ids(self.study_id):
                with contextlib.suppress(UpdateFinishedTrialError):
                    if self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                        failed.append(self.storage.get_trial(trial_id).number)
        now = self.clock()
        watched: dict[int, tuple[object, float]] = {}
        for t in self.trials():
            if t.state != TrialState.RUNNING or t.number in failed:
                continue
            beat = t.system_attrs.get(BEAT)
            last = self.seen.get(t._trial_id)
            if last is None or last[0] != beat:
                watched[t._trial_id] = (beat, now)
            elif now - last[1] > self.grace:
                with contextlib.suppress(UpdateFinishedTrialError):
                    if self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                        failed.append(t.number)
            else:
                watched[t._trial_id] = last
        self.seen = watched
        return failed

    def beat(self, trial_id: int, count: int) -> None:
        """One heartbeat of a claim this worker holds: Optuna's where the storage keeps them, then the
        counter every observer watches."""
        if optuna_heartbeats(self.storage):
            self.storage.record_heartbeat(trial_id)
        self.storage.set_trial_system_attr(trial_id, BEAT, count)

    @contextlib.contextmanager
    def heartbeat(
        self,
        trial_id: int,
        interval: float,
        idle: Callable[[], float] | None = None,
        stall: float | None = None,
    ) -> Iterator[None]:
        """Record the trial's heartbeat every `interval` seconds while the block runs. With `idle` (seconds
        since the work last made progress) the heartbeat is a watchdog too: it stops beating once the work
        has made no progress for `stall` seconds, so a hung main thread loses its claim like a dead worker
        (the claim is failed after the grace period and redone; the hung worker drops its late result)."""
        stop = threading.Event()

        def beat() -> None:
            count = 0
            while True:
                try:
                    if idle is None or stall is None or idle() <= stall:
                        count += 1
                        self.beat(trial_id, count)
                except Exception:  # noqa: BLE001 - a lost beat shows as a stale trial; finish() notices
                    pass
                if stop.wait(interval):
                    return

        thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


# --- studies this project did not write ----------------------------------------------------------------

# What every completed final run of study.depth carries (study.tables reads each), and every finished tuning trial.
RUN_ATTRS = (
    "seed",
    "source_trial",
    "widths",
    "test_accuracy",
    "test_loss",
    "diverged",
    "train_seconds",
    "samples_per_s",
    "param_lr",
    "param_epochs",
)
RUN_VALUES = ("seed", "source_trial", "widths", "param_lr", "param_epochs")  # never empty on a run of ours
TRIAL_ATTRS = ("curve",)


def foreign(study, made: bool = False) -> str | None:
    """Why a study in the storage (an optuna.Study, or a StudySummary, whose trials are then not read) was not
    written by study.depth, or None: study.depth's studies maximize one objective and carry the 'config'
    attribute once they hold trials (a study another command is creating has neither yet; `made`: it must
    have it now), and their finished trials and runs carry what study.depth records (RUN_ATTRS, TRIAL_ATTRS):
    another program's study of the same name, or one an older version adopted, is never trained or tabled."""
    directions = study.directions
    if len(directions) != 1:
        return f"it has {len(directions)} objectives; study.depth's have one"
    if directions[0] != optuna.study.StudyDirection.MAXIMIZE:
        return "it minimizes its objective; study.depth's maximize accuracy"
    config = study.user_attrs.get("config")
    summary = isinstance(study, optuna.study.StudySummary)
    trials = [] if summary else study.get_trials(deepcopy=False)
    if config is None:
        n = study.n_trials if summary else len(trials)
        return f"it holds {n} trial(s) and no 'config' attribute" if n or made else None
    if not isinstance(config, dict) or not isinstance(config.get("experiment"), dict):
        return "its 'config' attribute is not study.depth's"
    final = study.study_name.endswith(FINAL_SUFFIX)
    states = (TrialState.COMPLETE,) if final else (TrialState.COMPLETE, TrialState.PRUNED)
    needs = RUN_ATTRS if final else TRIAL_ATTRS
    for t in trials:
        if t.state in states and not t.user_attrs.get(SURPLUS):
            if missing := [k for k in needs if k not in t.user_attrs]:
                return f"its trial {t.number} has no {missing[0]!r} attribute"
            if final and (empty := [k for k in RUN_VALUES if t.user_attrs[k] is None]):
                return f"its trial {t.number} has an empty {empty[0]!r} attribute"
    return None


def refuse_foreign(study, made: bool = False) -> None:
    """One line when `study` was not written by study.depth (see foreign)."""
    if (why := foreign(study, made)) is not None:
        raise StudyError(
            f"study {study.study_name!r} in this storage was not written by study.depth ({why}); "
            "use another --storage or --study-name"
        )


def holdings(storage) -> str:
    """What a storage without a study of study.depth holds, in words: "holds 1 study not written by
    study.depth: 'foo'"."""
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if not names:
        return "holds no study yet"
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"holds {len(names)} {'study' if len(names) == 1 else 'studies'} not written by study.depth: {shown}"
