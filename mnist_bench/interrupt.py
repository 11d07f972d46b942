"""Ctrl-C and SIGTERM, handled alike by every command.

By default (`cli.run`) both raise KeyboardInterrupt at once: the command cleans up in its
`finally` blocks, says one line and exits 130. Long-running work that has safe points (the trainer
checks `STOP` after every step) uses `graceful()` instead: the first signal only sets `STOP`, the
work stops at its next safe point, and a second signal interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator

from .errors import UserError


class Flag:
    """threading.Event's set/clear/is_set/wait without a lock, so a signal handler may set it. A Python
    signal handler runs between two bytecodes of the main thread, also inside Event.set() or
    Condition.wait(), which hold the Event's non-reentrant lock: Event.set() from the handler then waits
    on itself for ever. A worker idling in STOP.wait() is exposed to one signal; and Linux sends a worker
    its parent-death signal once per exiting thread of the parent. A soak saw one orphaned worker that
    never stopped; this is the likely cause, not a proven one. `wait` polls."""

    POLL = 0.05  # seconds between looks while waiting: the latency of a stop

    def __init__(self) -> None:
        self._flag = False  # one attribute store: atomic under the GIL, and no lock to hold

    def set(self) -> None:
        self._flag = True

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._flag:
            left = self.POLL if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(self.POLL, left))
        return self._flag


STOP = Flag()  # set by the first signal inside graceful(); checked at safe points
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
