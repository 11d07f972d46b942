"""Where the project's files live. Imports nothing heavy, so command lines can start (and handle
Ctrl-C) before PyTorch is loaded."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = Path(os.environ.get("MNIST_BENCH_DATA", ROOT / "data" / "mnist"))
RESULTS_DIR = Path("results")
