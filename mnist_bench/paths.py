"""Where the project's files live. Imports nothing heavy, so command lines can start (and handle
Ctrl-C) before PyTorch is loaded."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("mnist", "fashion-mnist")  # same shapes and file names; pinned copies in data/<name>/
DEFAULT_DATA_DIR = Path(os.environ.get("MNIST_BENCH_DATA", ROOT / "data" / "mnist"))
RESULTS_DIR = Path("results")


def default_data_dir(dataset: str = "mnist") -> Path:
    """The project's pinned copy of `dataset` (MNIST_BENCH_DATA overrides MNIST's)."""
    return DEFAULT_DATA_DIR if dataset == "mnist" else ROOT / "data" / dataset
