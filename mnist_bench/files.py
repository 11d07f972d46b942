"""Files written whole or not at all, as UTF-8 whatever the locale: a table, a report or a figure is
written to a temporary file beside its place and renamed over the old one only when every file of the set
is whole, so a full disk, a read-only file or a crash leaves the old files as they were."""

from __future__ import annotations

import os
import typing
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

PARTIAL = ".partial"  # the suffix of a file being written; never left behind


def os_error(e: OSError) -> str:
    """An OSError in words: "[Errno 28] No space left on device"."""
    return f"[Errno {e.errno}] {e.strerror}" if e.errno and e.strerror else str(e) or type(e).__name__


def encoded(text: str) -> bytes:
    """UTF-8 whatever the locale. A command line holding bytes the locale could not decode (an --out path with
    "é" under LC_ALL=C) reaches us as surrogate escapes: they are written back as the bytes they stand for."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


Data = str | bytes | Callable[[typing.BinaryIO], None]  # text (written as UTF-8), bytes, or a writer of a file


def _stage(path: Path, data: Data) -> Path:
    """`data` in a temporary file beside `path` (same folder, so the rename is atomic), flushed to disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(encoded(data) if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _sync_folder(folder: Path) -> None:
    """The renames themselves on disk (best effort: not every file system lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_files(folder: Path, files: dict[str, Data]) -> None:
    """Write every file of `files` ({name: data}) into `folder` whole or not at all: each into a temporary file
    beside it, flushed to disk, and only when all of them are written is each renamed over its old version
    (os.replace, atomic within a folder). A full disk, a read-only file or a crash leaves the old files as they
    were, never a truncated table; an OSError ends in one line naming the file and the error."""
    staged: dict[Path, Path] = {}
    replaced: list[str] = []
    path = folder
    try:
        for name, data in files.items():
            path = folder / name
            staged[path] = _stage(path, data)
        for path, tmp in staged.items():
            os.replace(tmp, path)
            replaced.append(path.name)
    except OSError as e:
        if replaced:  # a rename failed after others succeeded (not a full disk: renames need no space)
            kept = f"{', '.join(replaced)} already rewritten, the others as they were"
        else:
            kept = "the files there are as they were" if len(files) > 1 else "the file there is as it was"
        raise UserError(f"cannot write {path} ({os_error(e)}); {kept}") from None
    finally:
        for tmp in staged.values():  # an interrupt between the writes: no temporary file left behind
            tmp.unlink(missing_ok=True)
    _sync_folder(folder)


def write_file(path: Path, data: Data) -> None:
    """One file, whole or not at all (write_files)."""
    write_files(path.parent, {path.name: data})
