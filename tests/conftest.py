import os
import shutil
from pathlib import Path

import pytest
import torch

from mnist_bench.data import DEFAULT_DATA_DIR, MNIST, load_mnist

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist() -> MNIST:
    """All of MNIST on the CPU with the default 10k validation hold-out (loads in under a second)."""
    return load_mnist()


@pytest.fixture(scope="session")
def small(mnist: MNIST) -> MNIST:
    """2,000 training, 1,000 validation and 1,000 test images: enough to learn, fast to train."""
    return MNIST(mnist.train_x[:2000], mnist.train_y[:2000], mnist.val_x[:1000], mnist.val_y[:1000],
                 mnist.test_x[:1000], mnist.test_y[:1000])


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
