import os
import shutil
from pathlib import Path

import pytest
import torch

from mnist_bench.data import MNIST, load_mnist
from mnist_bench.paths import DEFAULT_DATA_DIR

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist() -> MNIST:
    """All of MNIST on the CPU with the default 10k validation hold-out (loads in under a second)."""
    return load_mnist()


@pytest.fixture(scope="session")
def small(mnist: MNIST) -> MNIST:
    """2,000 training, 1,000 validation and 1,000 test images: enough to learn, fast to train."""
    return MNIST(
        mnist.train_x[:2000],
        mnist.train_y[:2000],
        mnist.val_x[:1000],
        mnist.val_y[:1000],
        mnist.test_x[:1000],
        mnist.test_y[:1000],
    )


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A writable copy of the pinned data folder."""
    dst = tmp_path / "mnist"
    shutil.copytree(DEFAULT_DATA_DIR, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def services_required() -> bool:
    return os.environ.get("MNIST_BENCH_REQUIRE_SERVICES") == "1"


PG_ADMIN_URL = os.environ.get("MNIST_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_url():
    """A fresh, uniquely named PostgreSQL database for one test, dropped after it.

    Skips where no server answers (a user's laptop); fails where MNIST_BENCH_REQUIRE_SERVICES=1 (CI)."""
    import uuid

    import sqlalchemy

    engine = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text("select 1"))
    except Exception as e:  # noqa: BLE001
        engine.dispose()
        reason = f"PostgreSQL not reachable at {PG_ADMIN_URL} ({str(e).splitlines()[0]})"
        if services_required():
            pytest.fail(reason + "; MNIST_BENCH_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(reason)
    name = f"mnist_bench_test_{uuid.uuid4().hex[:12]}"
    with engine.connect() as con:
        con.execute(sqlalchemy.text(f'create database "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with engine.connect() as con:
            con.execute(sqlalchemy.text(f'drop database if exists "{name}" with (force)'))
        engine.dispose()


class Clock:
    """An observer's monotonic clock that moves only when the test says: the claim protocol judges a
    claim's beat counter on it, so no test depends on how fast the machine runs it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float):
        self.now += seconds


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
