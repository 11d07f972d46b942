"""Storage and coordination: how any number of workers share one Optuna storage without losing,
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

import contextlib
import datetime
import hashlib
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from mnist_bench.errors import UsageError, UserError
from mnist_bench.train import EpochMetrics

from .config import failed_run, grid_scores

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.RUNNING, *FINISHED)  # WAITING is not live: see the module docstring
TUNE = "tune"  # the key every tuning trial claims
SURPLUS = "surplus"  # user attr of a claim that lost its race
BEAT = "beat"  # system attr: the claiming worker's heartbeat counter (see the module docstring)


class StudyError(UserError):
    """Storage unusable or a study made with other settings; one line for the user."""


# --- storage -------------------------------------------------------------------------------------


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path)


def open_storage(
    url: str, heartbeat_interval: int | None = None, grace_period: int | None = None, must_exist: bool = False
) -> optuna.storages.BaseStorage:
    """Optuna's RDBStorage for `url`, or a client of Optuna's gRPC storage proxy for grpc://HOST:PORT
    (see study.serve). `must_exist` (readers) refuses a storage without Optuna's schema instead of
    creating it: a reader never writes into the database it reads."""
    if grpc_address(url) is not None:
        return open_proxy(url)
    path = sqlite_path(url)
    if must_exist and path is not None and not path.is_file():
        raise StudyError(f"no storage file {path}; check the --storage URL")
    if path is not None and not path.parent.is_dir():
        raise StudyError(f"no folder {path.parent} for the storage file; check the --storage URL")
    if path is not None and path.is_file() and not must_exist and not os.access(path, os.W_OK):
        raise StudyError(f"storage file {path} is read-only; make it writable to add to the study")
    if must_exist and (missing := not_optuna(url)):
        raise StudyError(f"{url!r} is not an Optuna storage ({missing}); check the --storage URL")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else server_engine_kwargs(url)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats: documented fault tolerance, still tagged experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return immediate_transactions(
                    utc_sessions(
                        optuna.storages.RDBStorage(
                            url,
                            engine_kwargs=engine_kwargs,
                            heartbeat_interval=heartbeat_interval,
                            grace_period=grace_period,
                        )
                    )
                )
        except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors of every kind become one line
            # Workers or commands started at once on an empty database race to create Optuna's tables;
            # the loser sees "already exists" (PostgreSQL: an integrity or programming error; SQLite: an
            # operational error) and simply opens what the winner made.
            racing = isinstance(e, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)) or (
                isinstance(e, sqlalchemy.exc.OperationalError) and "already exists" in str(e)
            )
            if racing and attempt < 4:
                time.sleep(0.5 + random.random())
                continue
            if path is not None and (damage := sqlite_damage(path)):
                raise StudyError(
                    f"storage file {path} is damaged ({damage}); move it aside to start afresh, or restore a copy"
                ) from None
            scheme = url.split("://", 1)[0].split("+")[0] if "://" in url else ""
            hint = "" if scheme in ("sqlite", "postgresql", "mysql", "mariadb") else f"; expected {STORAGE_FORMS}"
            raise StudyError(f"cannot open storage {url!r}: {first_line(e)}{hint}") from None
    raise AssertionError("unreachable")


GRPC = "grpc://"
STORAGE_FORMS = "sqlite:///FILE, postgresql://USER@HOST/DB or grpc://HOST:PORT (study.serve)"


def grpc_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a grpc://HOST:PORT storage URL; None for other URLs."""
    if not url.startswith(GRPC):
        return None
    host, colon, port = url.removeprefix(GRPC).rstrip("/").rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad gRPC storage address {url!r}; expected grpc://HOST:PORT")
    return host.strip("[]"), int(port)


def quiet_grpc() -> None:
    """gRPC's C core logs its own errors to stderr (a second, cryptic line beside ours); off unless the
    user asks for them with GRPC_VERBOSITY. Read when grpc is first imported, so call this before."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def open_proxy(url: str, timeout: float = 10.0) -> optuna.storages.BaseStorage:
    """A client of Optuna's gRPC storage proxy at `url`, once the proxy answers. The proxy relays every
    storage call the claim protocol makes except Optuna's heartbeats, which the protocol does not need
    (see the module docstring); the atomic "still running?" check happens in the proxy's database."""
    host, port = grpc_address(url)
    with warnings.catch_warnings():  # documented for scale-out, still tagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            quiet_grpc()
            from optuna.storages import GrpcStorageProxy

            proxy = GrpcStorageProxy(host=host, port=port)
        except ImportError as e:
            raise StudyError(f"the gRPC storage needs grpcio and protobuf ({e}); install the project again") from None
    try:
        proxy.wait_server_ready(timeout=timeout)
    except ConnectionError:
        proxy.close()
        raise StudyError(
            f"no gRPC storage proxy answers at {host}:{port} (waited {timeout:g} s); start one with "
            f"`python -m study.serve --storage URL --port {port}` on that machine"
        ) from None
    return proxy


# A PostgreSQL connection: the session's clock in UTC whatever PGTZ or the server's default say (Optuna
# stores heartbeats as timestamps without time zone in the writing session's time zone, and judges them
# in the reading session's), TCP keepalives so a silently dropped connection is noticed, and timeouts so
# no statement or lock wait can hang a worker.
PG_CONNECT = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "options": "-c timezone=UTC -c statement_timeout=120000 -c lock_timeout=60000",
}


def server_engine_kwargs(url: str) -> dict:
    kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = dict(PG_CONNECT)
    return kwargs


def immediate_transactions(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """Every SQLite transaction of `storage` takes the write lock when it begins (BEGIN IMMEDIATE), so
    Optuna's "is this trial still running?" and the write that follows are one atomic step: without it
    pysqlite begins the transaction only at the first write, and another worker could fail the claim as
    stale in between (the first worker's result then landed over the failure, and the seed ran twice).
    PostgreSQL gets the same from the row lock Optuna takes."""
    if storage.engine.dialect.name != "sqlite":
        return storage

    def no_implicit_begin(dbapi_connection, record) -> None:
        dbapi_connection.isolation_level = None  # pysqlite's own deferred BEGIN off; ours below

    def begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(storage.engine, "connect", no_implicit_begin)
    sqlalchemy.event.listen(storage.engine, "begin", begin_immediate)
    storage.engine.dispose()
    return storage


def utc_sessions(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """Every PostgreSQL session of `storage` in UTC. The "-c timezone=UTC" option is not enough: libpq
    applies PGTZ after it, so SET it on each new connection (and drop those opened before)."""
    if storage.engine.dialect.name != "postgresql":
        return storage

    def set_utc(dbapi_connection, record) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()  # a SET inside a transaction that is rolled back would be undone

    sqlalchemy.event.listen(storage.engine, "connect", set_utc)
    storage.engine.dispose()
    return storage


def not_optuna(url: str) -> str | None:
    """Why the database at `url` holds no Optuna study schema (None when it does), read without writing."""
    path = sqlite_path(url)
    if path is not None:
        if path.stat().st_size == 0:
            return "an empty file"
        if sqlite_damage(path):
            return None  # damaged: the opener names the damage in SQLite's own words
        import sqlite3

        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
    else:
        engine = None
        try:
            engine = sqlalchemy.create_engine(url)
            tables = set(sqlalchemy.inspect(engine).get_table_names())
        except Exception:  # noqa: BLE001 - unreachable or a bad URL: the opener says so in one line
            return None
        finally:
            if engine is not None:
                engine.dispose()
    return None if {"studies", "trials"} <= tables else "no studies table"


def sqlite_damage(path: Path) -> str | None:
    """What SQLite says is wrong with the file at `path`, or None when its own check passes."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            result = con.execute("pragma quick_check").fetchone()[0]
        return None if result == "ok" else str(result).splitlines()[0]
    except sqlite3.Error as e:
        return str(e)


def first_line(e: BaseException) -> str:
    lines = str(getattr(e, "orig", None) or e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def storage_problem(url: str) -> str | None:
    """None when the storage answers a query now; otherwise why not, in one line."""
    if (address := grpc_address(url)) is not None:
        try:
            open_proxy(url, timeout=5.0).close()
            return None
        except StudyError:
            return f"no answer from the gRPC storage proxy at {address[0]}:{address[1]}"
    connect_args = {"timeout": 5} if url.startswith("sqlite") else {"connect_timeout": 5}
    engine = None
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
        with engine.connect() as con:
            con.execute(sqlalchemy.text("select count(*) from trials"))
        return None
    except Exception as e:  # noqa: BLE001
        return first_line(e)
    finally:
        if engine is not None:
            engine.dispose()


def storage_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a storage raises for its own troubles (not for a bug in the caller)."""
    errors: tuple[type[BaseException], ...] = (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)
    try:
        import grpc

        return (*errors, grpc.RpcError)
    except ImportError:
        return errors


def guarded(fn: Callable, url: str):
    """Run `fn`; an error while the storage is unreachable or unreadable becomes one line.
    Optuna does not always surface a lost connection as a database error, so ask the storage."""
    try:
        return fn()
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        path = sqlite_path(url)
        if path is not None and path.is_file() and (damage := sqlite_damage(path)):
            raise StudyError(
                f"storage file {path} is damaged ({damage}); move it aside to start afresh, or restore a copy"
            ) from None
        problem = storage_problem(url)
        if problem is None and not isinstance(e, storage_errors()):
            raise  # a genuine bug: keep the traceback
        raise StudyError(
            f"lost the connection to the storage ({problem or first_line(e)}); run the same command again to continue"
        ) from None


# --- the sampler ---------------------------------------------------------------------------------


def derived_seed(seed: int, number: int | str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "big")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler whose random stream is a function of (seed, trial number): trial n of a study
    draws the same numbers whoever runs it, and no two trials share a stream. A resumed worker
    therefore never replays the configurations of earlier trials (a sampler seeded once per process
    would), and workers sharing a storage never propose identical trials."""

    def __init__(self, seed: int, make: Callable[[int], optuna.samplers.BaseSampler]):
        self._seed, self._make = seed, make
        self._current = make(seed)

    def before_trial(self, study, trial):
        self._current = self._make(derived_seed(self._seed, trial.number))
        self._current.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._current.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._current.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._current.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._current.after_trial(study, trial, state, values)


# --- stored values -------------------------------------------------------------------------------

CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "train_seconds", "test_accuracy")


def encode_curve(epochs: list[EpochMetrics]) -> list[list]:
    """A trial's per-epoch metrics as stored in its `curve` user attr."""
    return [[getattr(e, c) for c in CURVE_COLUMNS] for e in epochs]


def decode_curve(rows) -> list[dict]:
    """Stored rows back to named fields (rows stored before a field existed read it as None)."""
    return [dict(zip(CURVE_COLUMNS, [*row, *[None] * (len(CURVE_COLUMNS) - len(row))])) for row in rows or []]


def is_live(t: FrozenTrial) -> bool:
    return t.state in LIVE and not t.user_attrs.get(SURPLUS)


def key_of(t: FrozenTrial) -> str:
    return t.user_attrs.get("claim", TUNE)


def final_key(source_trial: int, seed: int) -> str:
    return f"trial{source_trial}-seed{seed}"


FIXED = -1  # source_trial of final runs of a cell with nothing to tune (the recipe)


GRID = "grid"  # user attr of a grid run: its grid point's index (a matched cell's learning rate)


def ranking(trials: list[FrozenTrial], rule: str = "mean") -> list[FrozenTrial]:
    """Tuning trials in order of preference: the first is retrained, the second is the runner-up. The
    one rule, used by the workers and by the tables.

    A search (tuned): completed, non-diverged trials by validation accuracy; ties go to the earliest.
    A grid (matched; trials carry GRID): grid points by the mean validation accuracy of their completed
    runs (a diverged run counts at 0: a rate that diverges for some seeds is a bad rate), or, by the
    "smoothed" rule (config.LR_RULES), by that mean smoothed over neighbouring points; each point
    represented by its earliest run; ties go to the lower point; points whose every run diverged are out.
    `rule` is the study's Matched.lr_rule ("mean" for studies stored before the rule was declared)."""
    done = [
        t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and not t.user_attrs.get(SURPLUS)
    ]
    if not any(GRID in t.user_attrs for t in done):
        live = [t for t in done if not t.user_attrs.get("diverged")]
        return sorted(live, key=lambda t: (-t.value, t.number))
    points: dict[int, list[FrozenTrial]] = {}
    for t in done:
        points.setdefault(int(t.user_attrs[GRID]), []).append(t)
    means = {i: sum(t.value for t in ts) / len(ts) for i, ts in points.items()}
    score = grid_scores(means, rule)
    usable = [i for i, ts in points.items() if not all(t.user_attrs.get("diverged") for t in ts)]
    order = sorted(usable, key=lambda i: (-score[i], i))
    return [min(points[i], key=lambda t: t.number) for i in order]


def failed_trial(t: FrozenTrial) -> bool:
    """A trial that ran to its end and learned nothing: diverged, or completed at or below twice chance."""
    value = t.value if t.value is not None else float("nan")
    return bool(t.user_attrs.get("diverged")) or (t.state == TrialState.COMPLETE and failed_run(value))


def best_trial(trials: list[FrozenTrial], place: int = 0, rule: str = "mean") -> FrozenTrial | None:
    """The tuning trial that is retrained (see ranking); place 1: the runner-up."""
    ranked = ranking(trials, rule)
    return ranked[place] if len(ranked) > place else None


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
        live = [key_of(t) for t in self.trials() if is_live(t)]
        return next((k for k, cap in demand.items() if live.count(k) < cap), None)

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
