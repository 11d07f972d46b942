"""Opening a study's storage: Optuna's RDBStorage for SQLite and PostgreSQL (UTC sessions, connection
timeouts and keepalives, SQLite's write lock taken when a transaction begins) or a client of Optuna's gRPC
storage proxy; refusing what is not an Optuna storage; and turning a storage's troubles into one line
for the user. The claim protocol that runs on top of it is study.coord.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy
import sqlalchemy.event
import sqlalchemy.exc

from mnist_bench.errors import UsageError, UserError
from mnist_bench.redact import redact


class StudyError(UserError):
    """Storage unusable or a study made with other settings; one line for the user."""


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
    if path is not None and path.is_file() and path.stat().st_size and not is_sqlite(path):
        raise StudyError(f"{path} is not an SQLite database file; check the --storage URL")
    if path is not None and path.is_file() and not must_exist and not os.access(path, os.W_OK):
        raise StudyError(f"storage file {path} is read-only; make it writable to add to the study")
    if must_exist and (missing := not_optuna(url)):
        raise StudyError(f"{redact(url)!r} is not an Optuna storage ({missing}); check the --storage URL")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else server_engine_kwargs(url)
    for races in itertools.count():
        try:
            with warnings.catch_warnings():  # heartbeats: documented fault tolerance, still tagged experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = waiting_for_a_slot(
                    lambda: optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                    )
                )
            return immediate_transactions(utc_sessions(slot_waits(storage)))
        except StudyError:
            raise
        except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors of every kind become one line
            # Workers or commands started at once on an empty database race to create Optuna's tables;
            # the loser sees "already exists" (PostgreSQL: an integrity or programming error; SQLite: an
            # operational error) and simply opens what the winner made.
            racing = isinstance(e, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)) or (
                isinstance(e, sqlalchemy.exc.OperationalError) and "already exists" in str(e)
            )
            if racing and races < 4:
                pause(0.5 + random.random())
                continue
            if path is not None and (damage := sqlite_damage(path)):
                raise StudyError(
                    f"storage file {path} is damaged ({damage}); move it aside to start afresh, or restore a copy"
                ) from None
            scheme = url.split("://", 1)[0].split("+")[0] if "://" in url else ""
            hint = "" if scheme in ("sqlite", "postgresql", "mysql", "mariadb") else f"; expected {STORAGE_FORMS}"
            raise StudyError(f"cannot open storage {redact(url)!r}: {first_line(e)}{hint}") from None


SERVER_FULL_WAIT = 120  # seconds a new connection waits for a free slot on the server before it gives up
pause, clock = time.sleep, time.monotonic  # the waits' clock (tests script them)


def server_full(e: BaseException) -> BaseException | None:
    """The error in `e`'s chain of causes (Optuna wraps some in its own StorageInternalError) by which a
    database server refused a connection because a connection limit is reached: PostgreSQL's SQLSTATE
    53300 (max_connections, or a role's or database's CONNECTION LIMIT) or MySQL's 1040. None for other
    errors. It passes as other clients disconnect."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        orig = driver_error(cause)
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)  # psycopg 3, psycopg2
        text = str(orig).lower()
        if code == "53300" or any(
            m in text for m in ("too many clients", "connection slots are reserved", "too many connections")
        ):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def full_advice(refusal: BaseException) -> str:
    """What to raise for the limit that `refusal` reports."""
    text = str(driver_error(refusal)).lower()
    if "for role" in text:
        return "raise the role's CONNECTION LIMIT or run fewer workers"
    if "for database" in text:
        return "raise the database's CONNECTION LIMIT or run fewer workers"
    return "raise the server's max_connections or run fewer workers (README: Scaling out)"


def waiting_for_a_slot(connect: Callable):
    """`connect()`, waiting while the server refuses because every connection slot is taken (many workers
    starting at once, or other clients), backing off with jitter, rather than lose the worker. Bounded:
    a server that stays full is a sizing problem the user must see, in one line."""
    since = None
    for waits in itertools.count():
        try:
            return connect()
        except Exception as e:
            if (refusal := server_full(e)) is None:
                raise
            since = clock() if since is None else since
            if clock() - since >= SERVER_FULL_WAIT:
                raise StudyError(
                    f"the database server refused every new connection for {SERVER_FULL_WAIT} s "
                    f"({first_line(refusal)}); {full_advice(refusal)}, then run the same command again to continue"
                ) from None
            pause(min(0.25 * 2 ** min(waits, 5), 8.0) * (0.5 + random.random()))


def slot_waits(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """Every new connection of a database server's `storage` (its pool reconnecting, the heartbeat's
    thread, a worker's own) waits for a free slot as the opening did."""
    if storage.engine.dialect.name == "sqlite":
        return storage

    def connect(dialect, connection_record, cargs, cparams):
        return waiting_for_a_slot(lambda: dialect.connect(*cargs, **cparams))

    sqlalchemy.event.listen(storage.engine, "do_connect", connect)
    return storage


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
    (see study.coord's docstring); the atomic "still running?" check happens in the proxy's database."""
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


def is_sqlite(path: Path) -> bool:
    """Whether the file at `path` starts as every SQLite database does (damage further in is not checked)."""
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def sqlite_damage(path: Path) -> str | None:
    """What SQLite says is wrong with the file at `path`, or None when its own check passes."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            result = con.execute("pragma quick_check").fetchone()[0]
        return None if result == "ok" else str(result).splitlines()[0]
    except sqlite3.Error as e:
        return str(e)


def driver_error(e: BaseException) -> BaseException:
    """The database driver's own error under SQLAlchemy's wrapper (`e` itself when there is none)."""
    return getattr(e, "orig", None) or e


def first_line(e: BaseException) -> str:
    lines = redact(str(driver_error(e))).strip().splitlines()  # a driver may quote its connection string
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
        if refusal := server_full(e):
            raise StudyError(
                f"the database server has no free connection slot ({first_line(refusal)}); {full_advice(refusal)}, "
                "then run the same command again to continue"
            ) from None
        problem = storage_problem(url)
        if problem is None and not isinstance(e, storage_errors()):
            raise  # a genuine bug: keep the traceback
        raise StudyError(
            f"lost the connection to the storage ({problem or first_line(e)}); run the same command again to continue"
        ) from None
