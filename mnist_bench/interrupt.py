"""Ctrl-C and SIGTERM, handled alike by every command.

By default (`cli.run`) both raise KeyboardInterrupt at once: the command cleans up in its
`finally` blocks, says one line and exits 130. Long-running work that has safe points (the trainer
checks `STOP` after every step) uses `graceful()` instead: the first signal only sets `STOP`, the
work stops at its next safe point, and a second signal interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from .errors import UserError

STOP = threading.Event()  # set by the first signal inside graceful(); checked at safe points
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(UserError):
    """Stopped by Ctrl-C or SIGTERM at a safe point; the message says what was kept."""

    exit_code = 130


def check(message: str) -> None:
    """Raise Interrupted(message) if a stop was requested."""
    if STOP.is_set():
        raise Interrupted(message)


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def install_default() -> None:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so every command cleans up and says one line."""
    for s in SIGNALS:
        signal.signal(s, raise_keyboard_interrupt)


@contextlib.contextmanager
def graceful(signals: tuple[int, ...] = SIGNALS, on_signal: Callable[[int, int], None] | None = None) -> Iterator[None]:
    """First signal: set STOP; a second one: KeyboardInterrupt at once. `on_signal(signum, count)`
    runs on every signal first (a parent forwards it to its workers); it may return True to keep
    waiting instead of raising on the second signal."""
    previous = {s: signal.getsignal(s) for s in signals}
    count = 0

    def handler(signum, frame):
        nonlocal count
        count += 1
        keep_waiting = on_signal(signum, count) if on_signal is not None else False
        if count > 1 and not keep_waiting:
            raise KeyboardInterrupt
        STOP.set()

    STOP.clear()
    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
