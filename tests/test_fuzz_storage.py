"""What a fuzz of the storage side of the CLI found: each trouble is one true line, classified from the
database driver's own error under Optuna's wrapper (a refused statement is not a lost connection, a
timeout is named with its setting), studies other programs wrote are never adopted, tabled or listed as
this project's, and a URL's own settings (a search_path, a timeout) are honoured. PostgreSQL tests need
the server on 127.0.0.1:5432 (see conftest.pg_url)."""

import contextlib
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

import study.storage as storage_module
from study.config import PRESETS, Cell
from study.storage import StudyError, guarded, open_storage

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "smoke", "--experiments", "tuned", "--depths", "2", "--n-trials", "1", "--seeds", "1"]
TINY += ["--train-subset", "300", "--no-report"]
CELL = Cell("tuned", 2)


def run(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def one_line(p: subprocess.CompletedProcess, code: int, *words: str) -> str:
    err = p.stderr.strip()
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    return err


def refused(fn, url: str) -> str:
    """The one line `guarded` turns `fn`'s storage error into."""
    with pytest.raises(StudyError) as e:
        guarded(fn, url)
    return str(e.value)


# --- A: the true cause, classified ----------------------------------------------------------------------


def capped(url: str) -> optuna.storages.RDBStorage:
    """`url`'s storage whose SQLite file can no longer grow: SQLite's own SQLITE_FULL, as on a full disk."""
    storage = open_storage(url)

    @sqlalchemy.event.listens_for(storage.engine, "connect")
    def cap(dbapi_connection, record):
        pages = dbapi_connection.execute("pragma page_count").fetchone()[0]
        dbapi_connection.execute(f"pragma max_page_count = {pages}")

    storage.engine.dispose()
    return storage


def test_a_full_sqlite_disk_is_named_not_a_lost_connection(tmp_path: Path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=open_storage(url), study_name="s", direction="maximize")
    study = optuna.load_study(storage=capped(url), study_name="s")

    def fill():
        for i in range(100):
            study.set_user_attr(f"k{i}", "x" * 4000)

    monkeypatch.setattr(storage_module, "free_bytes", lambda folder: 0, raising=False)  # as if the disk were full
    line = refused(fill, url)
    assert "disk holding" in line and "is full (database or disk is full)" in line and "free space" in line, line
    assert "lost the connection" not in line and "An exception is raised" not in line
    monkeypatch.undo()  # the disk itself has room: SQLite's size limit is what is reached, and said so
    line = refused(fill, url)
    assert "refused to grow" in line and "size limit" in line and "lost the connection" not in line, line


@contextlib.contextmanager
def refusing_new_files(folder: Path):
    """`folder` refusing new files (root: immutable; others: no write permission); skip where neither works."""
    as_root = os.geteuid() == 0
    if as_root:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("chattr +i is not available here")
    else:
        folder.chmod(0o555)
    try:
        try:
            (folder / "probe").touch()
        except OSError:
            pass
        else:
            pytest.skip("this file system lets the folder take new files anyway")
        yield
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


def test_a_folder_that_refuses_new_files_is_named_with_sqlites_journal(tmp_path: Path):
    folder = tmp_path / "out"
    folder.mkdir()
    url = f"sqlite:///{folder / 'study.db'}"
    optuna.create_study(storage=open_storage(url), study_name="s", direction="maximize")
    storage = open_storage(url)
    study = optuna.load_study(storage=storage, study_name="s")
    with refusing_new_files(folder):
        line = refused(lambda: study.set_user_attr("k", 1), url)
    assert f"cannot create its journal beside {folder / 'study.db'}" in line and "refuses new files" in line, line
    assert "writable" in line and "lost the connection" not in line


def test_an_overlong_study_name_is_a_usage_error_on_every_storage(tmp_path: Path):
    """Optuna's column holds 512 characters on PostgreSQL; SQLite would take it, so it is refused up front."""
    from study.config import MAX_STUDY_NAME

    p = run("study.depth", *TINY, "--study-name", "x" * 600, "--out", str(tmp_path / "o"))
    one_line(p, 2, "--study-name", f"at most {MAX_STUDY_NAME} characters", "got 600")
    assert not (tmp_path / "o").exists()
    longest = "x" * MAX_STUDY_NAME + "-" + Cell("matched", 8, 10_000_000, "constant", "standardised").key + "-final"
    assert len(longest) <= 512


def test_a_sqlite_folder_is_named_a_folder_not_a_damaged_file(tmp_path: Path):
    line = refused(lambda: open_storage(f"sqlite:///{tmp_path}"), f"sqlite:///{tmp_path}")
    assert f"{tmp_path} is a folder, not a database file" in line and "damaged" not in line
    out = tmp_path / "out"
    (out / "study.db").mkdir(parents=True)  # the default storage of --out is a folder
    one_line(run("study.depth", *TINY, "--out", str(out)), 1, f"{out / 'study.db'} is a folder, not a database file")
    with pytest.raises(StudyError, match="is a folder, not a database file"):  # a reader's (study.report)
        open_storage(f"sqlite:///{tmp_path}", must_exist=True)


def test_a_locked_sqlite_file_is_named_with_its_busy_timeout(tmp_path: Path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=open_storage(url), study_name="s", direction="maximize")
    monkeypatch.setattr(storage_module, "SQLITE_TIMEOUT", 0.1)
    study = optuna.load_study(storage=open_storage(url), study_name="s")
    holder = sqlite3.connect(tmp_path / "study.db", isolation_level=None)
    try:
        holder.execute("begin immediate")
        line = refused(lambda: study.set_user_attr("k", 1), url)
    finally:
        holder.close()
    assert "held the SQLite file" in line and "busy timeout (0.1 s; database is locked)" in line, line
    assert "?timeout=" in line and "lost the connection" not in line


def test_a_urls_own_timeouts_and_options_are_kept_beside_ours():
    kwargs = storage_module.server_engine_kwargs(
        "postgresql://u@h/db?options=-csearch_path%3Dmine&connect_timeout=3&keepalives_idle=5"
    )["connect_args"]
    assert kwargs["options"].startswith(storage_module.PG_CONNECT["options"])  # ours first: the URL's win
    assert kwargs["options"].endswith("-csearch_path=mine")
    assert "connect_timeout" not in kwargs and "keepalives_idle" not in kwargs and kwargs["keepalives"] == 1
    assert storage_module.sqlite_engine_kwargs("sqlite:////x/s.db?timeout=5") == {}
    assert storage_module.sqlite_engine_kwargs("sqlite:////x/s.db") == {"connect_args": {"timeout": 60}}
    assert storage_module.sqlite_path("sqlite:////x/s.db?timeout=5") == Path("/x/s.db")


# --- A on PostgreSQL: rejected statements, timeouts, a real lost connection ---------------------------


@pytest.fixture
def pg_role(pg_url):
    """make(privileges): a new login role on pg_url's database with `privileges` on Optuna's tables (made
    first); its URL. Roles are the server's, not the database's: each is dropped after the test."""
    made = []
    admin = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    open_storage(pg_url).engine.dispose()  # Optuna's tables

    def make(privileges: str | None) -> str:
        role = f"mnist_bench_fuzz_{uuid.uuid4().hex[:8]}"
        with admin.connect() as con:
            con.execute(sqlalchemy.text(f'create role "{role}" login'))
            if privileges:
                con.execute(sqlalchemy.text(f'grant {privileges} on all tables in schema public to "{role}"'))
        made.append(role)
        return sqlalchemy.make_url(pg_url).set(username=role).render_as_string(hide_password=False)

    yield make
    with admin.connect() as con:
        for role in made:
            kill = "select pg_terminate_backend(pid) from pg_stat_activity where usename = :role"
            con.execute(sqlalchemy.text(kill), {"role": role})
            con.execute(sqlalchemy.text(f'drop owned by "{role}"'))
            con.execute(sqlalchemy.text(f'drop role if exists "{role}"'))
    admin.dispose()


@pytest.mark.postgres
def test_a_role_without_select_or_with_select_only_is_told_the_grant_it_needs(pg_role, tmp_path: Path):
    url = pg_role(None)
    line = refused(lambda: open_storage(url), url)
    assert "permission denied for table version_info" in line and "grant it SELECT" in line, line
    assert "An exception is raised" not in line and "lost the connection" not in line
    url = pg_role("select")
    storage = open_storage(url)  # a reader needs no more
    try:
        line = refused(lambda: optuna.create_study(storage=storage, study_name="s", direction="maximize"), url)
    finally:
        storage.engine.dispose()
    assert "refused role" in line and "an INSERT into studies (permission denied for table studies)" in line, line
    assert "INSERT, UPDATE and DELETE" in line and "cannot help" in line and "lost the connection" not in line
    one_line(run("study.depth", *TINY, "--storage", url, "--out", str(tmp_path / "o")), 1, "permission denied")


@pytest.mark.postgres
def test_a_too_long_value_on_postgresql_is_a_rejected_statement_not_a_lost_connection(pg_url: str):
    storage = open_storage(pg_url)
    try:
        line = refused(lambda: optuna.create_study(storage=storage, study_name="x" * 600), pg_url)
    finally:
        storage.engine.dispose()
    assert "rejected an INSERT into studies (value too long for type character varying(512))" in line, line
    assert "--study-name" in line and "cannot help" in line and "lost the connection" not in line


@pytest.mark.postgres
def test_lock_and_statement_timeouts_are_named_with_their_setting_and_a_cut_connection_is_lost(
    pg_url: str, monkeypatch
):
    optuna.create_study(storage=open_storage(pg_url), study_name="s", direction="maximize")
    locker = sqlalchemy.create_engine(pg_url)
    options = "-c timezone=UTC -c statement_timeout={} -c lock_timeout={}"
    try:
        for statement, lock, setting in ((60000, 200, "lock_timeout"), (200, 60000, "statement_timeout")):
            monkeypatch.setitem(storage_module.PG_CONNECT, "options", options.format(statement, lock))
            storage = open_storage(pg_url)
            with locker.connect() as con:
                con.execute(sqlalchemy.text("lock table studies in access exclusive mode"))
                line = refused(lambda s=storage: optuna.load_study(storage=s, study_name="s"), pg_url)
                con.rollback()
            storage.engine.dispose()
            assert f"past the server's {setting}" in line and f"?options=-c%20{setting}" in line, line
            assert "lost the connection" not in line and "same command again" in line
        storage = open_storage(pg_url)
        study = optuna.load_study(storage=storage, study_name="s")
        with locker.connect() as con:
            kill = "select pg_terminate_backend(pid) from pg_stat_activity where datname = current_database()"
            con.execute(sqlalchemy.text(kill + " and pid <> pg_backend_pid()"))
        storage.engine.pool._pre_ping = False  # the next statement meets the cut connection
        line = refused(lambda: study.set_user_attr("k", 1), pg_url)
        assert line.startswith("lost the connection to the storage (terminating connection") and "again" in line
        storage.engine.dispose()
    finally:
        locker.dispose()


@pytest.mark.postgres
def test_a_search_path_in_the_url_puts_optunas_tables_in_that_schema(pg_url: str):
    admin = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as con:
            con.execute(sqlalchemy.text("create schema mine"))
        url = pg_url + "?options=-csearch_path%3Dmine"
        storage = open_storage(url)
        optuna.create_study(storage=storage, study_name="s", direction="maximize")
        with storage.engine.connect() as con:  # our session settings are kept beside the URL's
            assert con.execute(sqlalchemy.text("show statement_timeout")).scalar() == "2min"
        storage.engine.dispose()
        with admin.connect() as con:
            query = "select table_schema from information_schema.tables where table_name in ('studies', 'trials')"
            assert set(con.execute(sqlalchemy.text(query)).scalars()) == {"mine"}
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["s"]
        line = refused(lambda: open_storage(pg_url + "?options=-csearch_path%3Dnone"), pg_url)
        assert "no schema on the session's search_path" in line and "cannot help" in line, line
    finally:
        admin.dispose()


@pytest.mark.postgres
def test_a_refusal_at_the_proxys_database_reaches_the_worker_in_its_words(pg_role):
    from conftest import free_port

    from study.serve import server
    from study.storage import open_proxy

    url = pg_role("select")
    port = free_port()
    srv = server(url, "127.0.0.1", port, 4)
    proxy = open_proxy(f"grpc://127.0.0.1:{port}")
    try:
        line = refused(lambda: optuna.create_study(storage=proxy, study_name="s"), f"grpc://127.0.0.1:{port}")
    finally:
        proxy.close()
        srv.stop(grace=None).wait()
    assert line.startswith("at the storage proxy: the database refused role") and "permission denied" in line, line
    assert "lost the connection" not in line


# --- B and C: studies another program wrote ----------------------------------------------------------


def trial(**attrs):
    return create_trial(params={"x": 1.0}, distributions={"x": FloatDistribution(0, 2)}, value=0.5, user_attrs=attrs)


def other_programs(url: str, kind: str) -> None:
    """A study named as study.depth names cell CELL of the smoke preset, written by another program."""
    name = "smoke-tuned-depth2"
    if kind == "multi-objective":
        study = optuna.create_study(storage=url, study_name=name, directions=["maximize", "minimize"])
        study.add_trial(create_trial(values=[0.5, 1.0]))
        return
    study = optuna.create_study(
        storage=url, study_name=name, direction="minimize" if kind == "minimize" else "maximize"
    )
    if kind != "minimize":
        study.add_trial(trial())
    if kind == "adopted":  # an older version set its config and went on
        study.set_user_attr("config", PRESETS["smoke"].identity(CELL))
    if kind == "odd config":
        study.set_user_attr("config", "theirs")


WHY = {
    "no config": "it holds 1 trial(s) and no 'config' attribute",
    "minimize": "it minimizes its objective",
    "multi-objective": "it has 2 objectives",
    "adopted": "its trial 0 has no 'curve' attribute",
    "odd config": "its 'config' attribute is not study.depth's",
}


@pytest.mark.parametrize("kind", WHY)
def test_another_programs_study_is_refused_by_name_never_adopted(kind: str, tmp_path: Path):
    from study.engine import open_studies, refuse_mixed_settings
    from study.tables import study_names

    url = f"sqlite:///{tmp_path / 's.db'}"
    other_programs(url, kind)
    storage = open_storage(url)
    cfg = PRESETS["smoke"]
    before = optuna.load_study(storage=storage, study_name="smoke-tuned-depth2").user_attrs
    refuse_mixed_settings(storage, cfg)  # studies it cannot read are left to open_studies (was: a TypeError)
    with pytest.raises(StudyError) as e:
        open_studies(storage, cfg, CELL, 10)
    assert str(e.value).startswith("study 'smoke-tuned-depth2' in this storage was not written by study.depth")
    assert WHY[kind] in str(e.value)
    assert optuna.load_study(storage=storage, study_name="smoke-tuned-depth2").user_attrs == before  # not adopted
    assert [s.study_name for s in storage.get_all_studies()] == ["smoke-tuned-depth2"]  # nothing made beside it
    assert study_names(storage) == ({"smoke": [CELL]} if kind == "adopted" else {})  # listed only if it looks ours


def test_tables_of_a_study_whose_runs_another_program_wrote_are_one_line(tmp_path: Path):
    from study.tables import study_tables

    url = f"sqlite:///{tmp_path / 's.db'}"
    tune = optuna.create_study(storage=url, study_name="smoke-tuned-depth2", direction="maximize")
    tune.set_user_attr("config", PRESETS["smoke"].identity(CELL))
    final = optuna.create_study(storage=url, study_name="smoke-tuned-depth2-final", direction="maximize")
    final.set_user_attr("config", PRESETS["smoke"].identity(CELL))
    final.add_trial(trial(seed=1))  # a run without what study.depth records (was: KeyError 'source_trial')
    with pytest.raises(StudyError, match="'smoke-tuned-depth2-final' .*its trial 0 has no 'source_trial'"):
        study_tables(open_storage(url), "smoke", CELL)
    bare = optuna.create_study(storage=url, study_name="bare-tuned-depth2", direction="maximize")  # no config
    optuna.create_study(storage=url, study_name="bare-tuned-depth2-final", direction="maximize")
    with pytest.raises(StudyError, match=f"{bare.study_name!r} .* no 'config' attribute"):  # was: KeyError 'config'
        study_tables(open_storage(url), "bare", CELL)


def test_a_storage_holding_only_another_programs_study_is_refused_not_adopted(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    other_programs(url, "no config")
    one_line(run("study.depth", *TINY, "--storage", url, "--out", str(tmp_path / "o")), 1, WHY["no config"])
    study = optuna.load_study(storage=url, study_name="smoke-tuned-depth2")
    assert "config" not in study.user_attrs and len(study.trials) == 1  # its trial was not retrained as a winner


def test_the_report_says_what_a_storage_without_a_depth_study_holds(tmp_path: Path):
    foo = f"sqlite:///{tmp_path / 'foo.db'}"
    optuna.create_study(storage=foo, study_name="foo").add_trial(trial())
    p = run("study.report", "--storage", foo, "--out", str(tmp_path / "r"))
    one_line(p, 2, "storage holds 1 study not written by study.depth: 'foo'")
