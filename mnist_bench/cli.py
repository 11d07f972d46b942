"""What every command shares: the common flags and the error boundary.

Bad input ends with one line on stderr and a non-zero exit, never a traceback: 2 for usage errors
(argparse's convention), 1 for data, storage and environment problems, 130 when interrupted.
This module imports nothing heavy: a command parses its arguments (and answers Ctrl-C) before
PyTorch is loaded.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from . import interrupt
from .errors import UsageError, UserError
from .paths import DATASETS, RESULTS_DIR

__all__ = [
    "Parser",
    "positive_int",
    "bounded_int",
    "margin_points",
    "device_name",
    "file_name",
    "path_arg",
    "add_dataset",
    "add_common",
    "prepare_out",
    "starting",
    "run",
    "RESULTS_DIR",
]

MAX_THREADS = 1024
DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda(:\d+)?)")
_signalled_while_starting: list[int] = []


def starting(name: str) -> None:
    """Called first by every command module: while PyTorch and friends load, a Ctrl-C or SIGTERM is
    remembered instead of raising inside an import (a traceback); `run` then exits 130 with one line."""
    if name == "__main__":
        for s in interrupt.SIGNALS:
            signal.signal(s, lambda signum, frame: _signalled_while_starting.append(signum))


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are the project's: one line, "error: ..." like every other error of the
    command, exit code 2 (the full usage is one --help away)."""

    def __init__(self, prog: str, doc: str | None):
        super().__init__(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def bounded_int(low: int, high: int, why: str) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]; `why` says what the upper bound protects."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high} ({why}), got {text}")
        return value

    return parse


def margin_points(text: str) -> float:
    """An argparse type: the equivalence margin in points of accuracy, in (0, 10]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of accuracy points, got {text!r}") from None
    if not 0 < value <= 10:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"must be in (0, 10] points of accuracy (a wider margin would call any two depths equivalent), got {text}"
        )
    return value


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N; whether CUDA exists is checked once PyTorch is loaded."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_dataset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", choices=DATASETS, default="mnist", help="mnist or fashion-mnist (same shapes; default: mnist)"
    )
    parser.add_argument(
        "--data-dir",
        type=path_arg,
        default=None,
        help="folder with the dataset's four files, gzip or raw, flat or torchvision's "
        "MNIST/raw or FashionMNIST/raw (default: the pinned copy in data/<dataset>)",
    )


def add_common(parser: argparse.ArgumentParser, out_help: str, out_default: str = "results/") -> None:
    """--dataset, --data-dir, --device, --threads and --out. `out_default` only words the help: a command
    whose default folder depends on other flags passes its rule here and resolves a missing --out itself."""
    add_dataset(parser)
    parser.add_argument("--device", type=device_name, default="cpu", help="auto, cpu or cuda (default: cpu)")
    parser.add_argument(
        "--threads",
        type=bounded_int(1, MAX_THREADS, "threads per process"),
        default=1,
        help="CPU threads for PyTorch (default: 1; see README on OpenMP contention)",
    )
    default = RESULTS_DIR if out_default == "results/" else None
    parser.add_argument("--out", type=path_arg, default=default, help=f"{out_help} (default: {out_default})")


def file_name(text: str) -> str:
    """An argparse type: a plain file name (no folder part) the file system can hold."""
    if not text or text in (".", "..") or "/" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a plain file name, got {text!r}")
    if len(text.encode()) > 255:
        raise argparse.ArgumentTypeError(f"must be at most 255 bytes (a file system limit), got {len(text.encode())}")
    return text


def path_arg(text: str) -> Path:
    """An argparse type: a path, never empty (an empty one would silently mean the current folder)."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a path, got {text!r}")
    return Path(text)


def prepare_out(folder: Path, name: str | None = None, files: tuple[str, ...] = ()) -> Path:
    """Create `folder` and prove a file can be written there (and `name` is a plain file name), and
    that each of `files` (the outputs the command will write there) can be replaced, before any work
    whose results would have nowhere to go. Returns the folder (or the file path)."""
    if name is not None:
        try:
            file_name(name)
        except argparse.ArgumentTypeError as e:
            raise UsageError(str(e)) from None
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file, not a folder")
    absent = [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _created.extend(absent)  # run() removes them again if the command fails and they are still empty
        probe = folder / f".mnist-bench-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out {folder}: {e.strerror or e}") from None
    for f in (*files, *([name] if name is not None else [])):
        path = folder / f
        if path.is_dir():
            raise UsageError(
                f"{path} is a folder; the command writes a file there: move it aside or pick another --out"
            )
        if path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"cannot replace {path}: it is read-only; make it writable or pick another --out")
    return folder / name if name is not None else folder


_created: list[Path] = []  # folders prepare_out made, deepest first


def remove_empty_created() -> None:
    """A command that fails leaves no empty --out folder behind (a folder holding anything is kept)."""
    for folder in _created:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass
    _created.clear()


def _escape(e: UnicodeError):
    """An encoding error handler for stdout and stderr: a surrogate escape (bytes of a command line the locale
    could not decode) as the bytes it stands for, any other character the stream's encoding lacks as a
    backslash escape."""
    if isinstance(e, UnicodeEncodeError):
        try:
            return codecs.lookup_error("surrogateescape")(e)
        except UnicodeError:
            pass
    return codecs.lookup_error("backslashreplace")(e)


ESCAPE = "mnist-bench-escape"
codecs.register_error(ESCAPE, _escape)


def printable_streams() -> None:
    """Printing never fails on a character stdout or stderr cannot encode (a path with "é" under LC_ALL=C, or
    an undecodable byte in an argument under UTF-8): one line of output is worth more than a traceback."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors=ESCAPE)
            except (ValueError, OSError, AttributeError):  # a closed or replaced stream: nothing to protect
                pass


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Call `main`, turning the project's user-facing errors into one line and an exit code; a failed
    command removes the --out folders it created that are still empty."""
    printable_streams()
    if _signalled_while_starting:
        print("interrupted while starting; nothing was done", file=sys.stderr)
        sys.exit(130)
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
    if code:
        remove_empty_created()
    if code == 130:  # a further signal while the interpreter shuts down must not print a traceback
        for s in interrupt.SIGNALS:
            signal.signal(s, signal.SIG_IGN)
    sys.exit(code or 0)
