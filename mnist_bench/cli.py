"""What every command shares: the common flags and the error boundary.

Bad input ends with one line on stderr and a non-zero exit, never a traceback: 2 for usage errors
(argparse's convention), 1 for data, storage and environment problems, 130 when interrupted.
This module imports nothing heavy: a command parses its arguments (and answers Ctrl-C) before
PyTorch is loaded.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from . import interrupt
from .errors import UserError
from .paths import DEFAULT_DATA_DIR, RESULTS_DIR

__all__ = ["Parser", "positive_int", "add_common", "run", "RESULTS_DIR"]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (the full usage is one --help away)."""

    def __init__(self, prog: str, doc: str | None):
        super().__init__(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_common(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"folder with the four MNIST files, gzip or raw (default: {DEFAULT_DATA_DIR})")
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads for PyTorch (default: 1; see README on OpenMP contention)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"{out_help} (default: results/)")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Call `main`, turning the project's user-facing errors into one line and an exit code."""
    interrupt.install_default()
    try:
        try:
            code = main(argv)
        except interrupt.Interrupted as e:
            print(str(e), file=sys.stderr)
            code = e.exit_code
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            code = e.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            code = 130
    except KeyboardInterrupt:  # a second signal while the first one's message was printed
        code = 130
    sys.exit(code or 0)
