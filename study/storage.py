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
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
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
    """The file of a sqlite:/// URL as SQLAlchemy reads it: without its ?query, percent-escapes decoded
    (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    try:
        path = sqlalchemy.engine.make_url(url).database or ""
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot read: the opener says so
        path = url.removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path)


def check_file(url: str, must_exist: bool = False) -> None:
    """What an SQLite URL's file says before anything opens it (nothing is created): a folder, a missing
    folder, a file that is not SQLite's, a read-only file; one line each. Commands call it before loading
    PyTorch and the data, so a wrong --storage is a one-second answer."""
    path = sqlite_path(url)
    if path is None:
        return
    if path.is_dir():
        raise StudyError(not_a_file(path))
    if must_exist and not path.is_file():
        raise StudyError(f"no storage file {path}; check the --storage URL")
    if not path.parent.is_dir():
        raise StudyError(f"no folder {path.parent} for the storage file; check the --storage URL")
    if path.is_file() and path.stat().st_size and not is_sqlite(path):
        raise StudyError(f"{path} is not an SQLite database file; check the --storage URL")
    if path.is_file() and not must_exist and not os.access(path, os.W_OK):
        raise StudyError(f"storage file {path} is read-only; make it writable to add to the study")


def open_storage(
    url: str, heartbeat_interval: int | None = None, grace_period: int | None = None, must_exist: bool = False
) -> optuna.storages.BaseStorage:
    """Optuna's RDBStorage for `url`, or a client of Optuna's gRPC storage proxy for grpc://HOST:PORT
    (see study.serve). `must_exist` (readers) refuses a storage without Optuna's schema instead of
    creating it: a reader never writes into the database it reads."""
    if grpc_address(url) is not None:
        return open_proxy(url)
    check_file(url, must_exist)
    path = sqlite_path(url)
    if must_exist and (missing := not_optuna(url)):
        raise StudyError(f"{redact(url)!r} is not an Optuna storage ({missing}); check the --storage URL")
    engine_kwargs = sqlite_engine_kwargs(url) if url.startswith("sqlite") else server_engine_kwargs(url)
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
            # the loser sees "already exists" or a unique violation (PostgreSQL: in its catalog, or a duplicate
            # table; SQLite: an operational error, or Optuna's version row twice) and simply opens what the
            # winner made. Any other refusal (a permission, a full disk) is no race: it is said at once.
            racing = (
                isinstance(database_error(e), sqlalchemy.exc.IntegrityError)
                or sqlstate(driver_error(e)) in ("23505", "42P07")
                or "already exists" in str(driver_error(e))
            )
            if racing and races < 4:
                pause(0.5 + random.random())
                continue
            if path is not None and (damage := sqlite_damage(path)):
                raise StudyError(
                    f"storage file {path} is damaged ({damage}); move it aside to start afresh, or restore a copy"
                ) from None
            if (why := explain(e, url)) is not None:
                raise StudyError(f"cannot open storage {redact(url)!r}: {why}") from None
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
    for cause in causes(e):
        orig = getattr(cause, "orig", None) or cause
        text = str(orig).lower()
        if sqlstate(orig) == "53300" or any(
            m in text for m in ("too many clients", "connection slots are reserved", "too many connections")
        ):
            return cause
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
    """The engine's arguments for a database server. SQLAlchemy lets connect_args replace what the URL's
    query says, so a setting the URL gives wins here instead of being dropped: its libpq `options` (a
    search_path, a longer statement_timeout) come after ours, which PostgreSQL applies last; its
    connect_timeout and keepalives replace ours."""
    kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        query = url_query(url)
        connect = {k: v for k, v in PG_CONNECT.items() if k not in query}
        if "options" in query:
            connect["options"] = " ".join([PG_CONNECT["options"], *query["options"]])
        kwargs["connect_args"] = connect
    return kwargs


SQLITE_TIMEOUT = 60  # seconds a SQLite connection waits for another process's lock (?timeout=S in the URL)


def sqlite_engine_kwargs(url: str) -> dict:
    """A SQLite connection waits SQLITE_TIMEOUT s for a lock, or what the URL's ?timeout= says."""
    return {} if "timeout" in url_query(url) else {"connect_args": {"timeout": SQLITE_TIMEOUT}}


def url_query(url: str) -> dict[str, tuple[str, ...]]:
    """The query parameters of a database URL, each as a tuple of its values ({} for a URL SQLAlchemy
    cannot read: the opener says so in one line)."""
    try:
        query = sqlalchemy.engine.make_url(url).query
    except Exception:  # noqa: BLE001 - a malformed URL
        return {}
    return {k: (v,) if isinstance(v, str) else tuple(v) for k, v in query.items()}


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
        if path.is_dir():
            return "a folder"
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


def causes(e: BaseException) -> Iterator[BaseException]:
    """`e` and the exceptions it was raised from or while handling (Optuna raises its StorageInternalError
    from SQLAlchemy's error, which wraps the driver's), each once."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)


def database_error(e: BaseException) -> sqlalchemy.exc.DBAPIError | None:
    """SQLAlchemy's wrapper of the driver's error in `e`'s chain, if any (it holds the statement)."""
    return next((c for c in causes(e) if isinstance(c, sqlalchemy.exc.DBAPIError)), None)


def driver_error(e: BaseException) -> BaseException:
    """The database driver's own error in `e`'s chain (`e` itself when there is none)."""
    db = database_error(e)
    return db.orig if db is not None and db.orig is not None else getattr(e, "orig", None) or e


def first_line(e: BaseException) -> str:
    if (rpc := rpc_error(e)) is not None:  # a gRPC error's str() is a multi-line dump; its details are the words
        lines = redact(rpc[0]).strip().splitlines()
        return lines[0].strip() if lines else f"gRPC status {rpc[1]}"
    lines = redact(str(driver_error(e))).strip().splitlines()  # a driver may quote its connection string
    return lines[0].strip() if lines else type(driver_error(e)).__name__


PROXY_SAYS = "at the storage proxy: "  # how study.serve starts what it answers about its database's trouble


def rpc_error(e: BaseException) -> tuple[str, str] | None:
    """(details, status code's name) of a gRPC error in `e`'s chain; None when there is none."""
    for cause in causes(e):
        details, code = getattr(cause, "details", None), getattr(cause, "code", None)
        if callable(details) and callable(code):
            try:
                said, status = details(), code()
            except Exception:  # noqa: BLE001 - not a gRPC error after all
                continue
            if isinstance(said, str):
                return said, getattr(status, "name", str(status))
    return None


def proxy_answer(e: BaseException) -> tuple[str, bool] | None:
    """What the gRPC storage proxy (study.serve) answered about its database's trouble, from a worker's
    gRPC error in `e`'s chain, and whether its database refused a statement (gRPC's INTERNAL; UNAVAILABLE:
    it lost its connection); None for other errors."""
    rpc = rpc_error(e)
    if rpc is None or not rpc[0].startswith(PROXY_SAYS):
        return None
    return redact(rpc[0].strip().splitlines()[0]), rpc[1] == "INTERNAL"


def sqlstate(orig: BaseException) -> str | None:
    """A PostgreSQL error's SQLSTATE (psycopg 3, psycopg2)."""
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def not_a_file(path: Path) -> str:
    return f"{path} is a folder, not a database file: give a database file in the --storage URL, or move it aside"


# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF)
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 5, 6, 8, 10, 13, 14
SQLITE_TOOBIG, SQLITE_CONSTRAINT, SQLITE_MISMATCH = 18, 19, 20
NOT_AGAIN = "running the same command again cannot help"
AGAIN = "then run the same command again to continue"
PRIVILEGES = "SELECT, INSERT, UPDATE and DELETE on Optuna's tables and USAGE on their sequences"


def statement_of(db: sqlalchemy.exc.DBAPIError | None) -> str:
    """What a failed statement did, in a few words: "an INSERT into studies", "a SELECT from trials"."""
    sql = " ".join((getattr(db, "statement", None) or "").split())
    if not sql:
        return "a statement"
    verb = sql.split(" ", 1)[0].upper()
    article = "an" if verb[:1] in "AEIOU" else "a"
    table = re.search(r"\b(INTO|FROM|UPDATE|TABLE(?: IF NOT EXISTS)?)\s+\"?([A-Za-z_][\w.]*)", sql, re.IGNORECASE)
    if table is None:
        return f"{article} {verb}"
    word = {"INTO": "into", "FROM": "from"}.get(table[1].upper(), "of")
    return f"{article} {verb} {word} {table[2]}"


def role_of(url: str) -> str:
    try:
        user = sqlalchemy.engine.make_url(url).username
    except Exception:  # noqa: BLE001
        user = None
    return f"role {user!r}" if user else "this command's role"


def folder_refuses(folder: Path) -> str | None:
    """Why a new file cannot be created in `folder` (None when one can): SQLite creates its journal
    beside the database for every write."""
    probe = folder / f".mnist-bench-write-test-{os.getpid()}"
    try:
        probe.touch(exist_ok=False)
    except FileExistsError:
        return None
    except OSError as e:
        return e.strerror or str(e)
    probe.unlink(missing_ok=True)
    return None


def explain(e: BaseException, url: str) -> str | None:
    """One line for a storage error that a lost connection does not explain: the database's own words
    (under Optuna's and SQLAlchemy's wrappers), what it refused, and what to change; None for a lost
    connection and for errors it does not know. A rejected statement (a permission, invalid data) is
    repeated by running again; a full disk, a read-only file and a timeout pass once their cause does.
    Through the gRPC proxy: what the proxy said of its database's refusal (study.serve explains it there)."""
    if (answer := proxy_answer(e)) is not None:
        return answer[0] if answer[1] else None
    db = database_error(e)
    if db is None:
        return None  # not the database's own error (the caller's, or the driver's before it reached one)
    orig = driver_error(e)
    code = sqlstate(orig) or ""
    lite = getattr(orig, "sqlite_errorcode", None)
    lite = lite & 0xFF if isinstance(lite, int) else None
    low = str(orig).lower()
    said = first_line(e)
    what = statement_of(db)
    path = sqlite_path(url)
    if lite == SQLITE_FULL or "database or disk is full" in low or code == "53100" or "no space left" in low:
        if path is None:
            return f"the database server's disk is full ({said}): free space on the server, {AGAIN}"
        free = free_bytes(path.parent)
        if free is not None and free > 16 * 2**20:  # SQLite's size limit (max_page_count) or a quota
            return (
                f"SQLite refused to grow {path} ({said}) although its disk has {free / 2**20:,.0f} MB free: a size "
                f"limit or a disk quota is reached; lift it or move the storage, {AGAIN}"
            )
        return f"the disk holding {path} is full ({said}); free space there or move the storage, {AGAIN}"
    if path is not None and (lite == SQLITE_READONLY or lite == SQLITE_CANTOPEN or "readonly database" in low):
        if path.is_dir():
            return not_a_file(path)
        if path.is_file() and (why := folder_refuses(path.parent)) is not None:
            return (
                f"SQLite cannot create its journal beside {path}: the folder {path.parent} refuses new files "
                f"({why}; {said}); make the folder writable, {AGAIN}"
            )
        if (path.is_file() and not os.access(path, os.W_OK)) or lite == SQLITE_READONLY:
            return f"storage file {path} is read-only ({said}); make it and its folder writable, {AGAIN}"
        return None
    if path is not None and lite == SQLITE_IOERR:
        return (
            f"SQLite could not read or write {path} ({said}): the disk or its file system failed, or the file was "
            f"replaced while open; check the disk, {AGAIN}"
        )
    if code == "25006":
        return (
            f"the database accepts only reads ({said}): a standby server, or default_transaction_read_only "
            f"is on; point --storage at a writable primary, {AGAIN}"
        )
    if code == "42501" or "permission denied" in low or "command denied" in low:
        verb = what.split(" ")[1:2]
        if verb == ["CREATE"]:
            grant = "CREATE on the schema, or let a role that has it create Optuna's tables once"
        elif verb == ["SELECT"]:
            grant = "SELECT on Optuna's tables (a command that runs the study needs " + PRIVILEGES + ")"
        elif verb in (["INSERT"], ["UPDATE"], ["DELETE"]):
            grant = PRIVILEGES
        else:
            grant = "the privilege that statement needs"
        return (
            f"the database refused {role_of(url)} {what} ({said}): grant it {grant}, or name a role that has "
            f"them in --storage; {NOT_AGAIN}"
        )
    if code == "22001" or "data too long" in low or lite == SQLITE_TOOBIG:
        return (
            f"the database rejected {what} ({said}): a name or value is longer than Optuna's column holds "
            f"(512 characters for a study name); shorten it (--study-name); {NOT_AGAIN}"
        )
    if code[:2] in ("22", "23") or lite in (SQLITE_CONSTRAINT, SQLITE_MISMATCH):
        return f"the database rejected the data of {what} ({said}); {NOT_AGAIN}"
    if code == "57014" and "statement timeout" in low:
        return (
            f"{what} ran past the server's statement_timeout ({said}; {pg_setting('statement_timeout', url)}): "
            "the server is overloaded, or another client holds Optuna's tables; raise it with "
            f"?options=-c%20statement_timeout%3D<ms> in the --storage URL, or wait, {AGAIN}"
        )
    if code == "55P03" or "lock wait timeout" in low:
        return (
            f"{what} waited past the server's lock_timeout for a lock on Optuna's tables ({said}; "
            f"{pg_setting('lock_timeout', url)}): another client holds it (an idle transaction?); end that, or "
            f"raise it with ?options=-c%20lock_timeout%3D<ms> in the --storage URL, {AGAIN}"
        )
    if code == "40P01" or "deadlock" in low:
        return f"the database broke a deadlock by cancelling {what} ({said}); {AGAIN}"
    if code == "57014":
        return f"someone cancelled {what} on the database server ({said}); {AGAIN}"
    if lite in (SQLITE_BUSY, SQLITE_LOCKED) or "database is locked" in low:
        wait = url_query(url).get("timeout", (str(SQLITE_TIMEOUT),))[0]
        return (
            f"another process held the SQLite file {path}'s lock for longer than its busy timeout ({wait} s; {said}): "
            "a SQLite file serves a few workers, PostgreSQL many (README: Scaling out); raise it with ?timeout=S in "
            f"the --storage URL, or end the process that holds it, {AGAIN}"
        )
    if code == "3F000" or "no schema has been selected" in low:
        return (
            f"no schema on the session's search_path exists to hold Optuna's tables ({said}): create the schema, "
            f"or name one that exists with ?options=-csearch_path%3DSCHEMA in the --storage URL; {NOT_AGAIN}"
        )
    if path is not None and "no such table" in low:
        return f"Optuna's tables are not in {path} ({said}): the file was replaced or emptied meanwhile; {NOT_AGAIN}"
    if code == "42P01":
        return (
            f"Optuna's tables are not where the session looks for them ({said}): dropped meanwhile, or the "
            f"--storage URL's search_path names another schema; {NOT_AGAIN}"
        )
    return None


def pg_setting(name: str, url: str) -> str:
    """Who sets a PostgreSQL timeout for this command's sessions, and to what: "this command sets 120 s", or
    "the --storage URL sets 5000" (the URL's options come after ours, so they win)."""
    for options, who in (
        (" ".join(url_query(url).get("options", ())), "the --storage URL"),
        (PG_CONNECT["options"], ""),
    ):
        if found := re.findall(rf"{name}\s*=\s*(\S+)", options):
            value = found[-1]
            return f"{who} sets {value}" if who else f"this command sets {int(value) / 1000:g} s"
    return "the server's default"


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def lost_connection(e: BaseException) -> bool:
    """Whether `e` says the connection to a database server broke (not a statement it refused)."""
    db = database_error(e)
    if db is None:
        return isinstance(e, sqlalchemy.exc.DisconnectionError)
    code = sqlstate(db.orig) or ""
    return (
        db.connection_invalidated
        or code[:2] == "08"
        or code in ("57P01", "57P02", "57P03")
        # a server's driver failing outside any statement (SQLite has no connection to lose)
        or (isinstance(db, sqlalchemy.exc.OperationalError) and not code and not from_sqlite(db))
    )


def from_sqlite(db: sqlalchemy.exc.DBAPIError) -> bool:
    return type(db.orig).__module__.startswith("sqlite3")


def storage_problem(url: str) -> str | None:
    """None when the storage answers a query now; otherwise why not, in one line."""
    if (address := grpc_address(url)) is not None:
        try:
            open_proxy(url, timeout=5.0).close()
            return None
        except StudyError:
            return f"no answer from the gRPC storage proxy at {address[0]}:{address[1]}"
    path = sqlite_path(url)
    if path is not None and path.is_dir():
        return f"{path} is a folder"
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
    """Run `fn`; a storage's trouble becomes one true line: the database's own words under Optuna's
    wrapper, classified (explain: a refused statement, a full disk, a timeout), and "lost the
    connection" only when the connection broke or the storage does not answer now. Optuna does not
    always surface a lost connection as a database error, so ask the storage."""
    try:
        return fn()
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        path = sqlite_path(url)
        if path is not None and path.is_dir():
            raise StudyError(not_a_file(path)) from None
        if path is not None and path.is_file() and (damage := sqlite_damage(path)):
            raise StudyError(
                f"storage file {path} is damaged ({damage}); move it aside to start afresh, or restore a copy"
            ) from None
        if refusal := server_full(e):
            raise StudyError(
                f"the database server has no free connection slot ({first_line(refusal)}); {full_advice(refusal)}, "
                "then run the same command again to continue"
            ) from None
        if (why := explain(e, url)) is not None:
            raise StudyError(why) from None
        if path is not None and not path.exists() and isinstance(e, storage_errors()):
            raise StudyError(
                f"storage file {path} is gone (moved or deleted while the command ran); put it back, {AGAIN}"
            ) from None
        problem = None if lost_connection(e) else storage_problem(url)
        if problem is None and not isinstance(e, storage_errors()):
            raise  # a genuine bug: keep the traceback
        if problem is None and not lost_connection(e) and database_error(e) is not None:
            raise StudyError(
                f"the database refused {statement_of(database_error(e))} ({first_line(e)}); this is not a lost "
                f"connection: {NOT_AGAIN}"
            ) from None
        raise StudyError(
            f"lost the connection to the storage ({problem or first_line(e)}); run the same command again to continue"
        ) from None
