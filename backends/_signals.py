"""Signals recorded instead of acted on, for a loop to act on: the run's supervision
(backends/supervise.py), and the start of a foreground `run`, which catches them before it
starts QEMU (microvmc/cli.py) and before the supervision's modules are imported."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Signals", "signals_caught", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Signals:
    """(Not a dataclass: `microvmc run` imports this before it starts QEMU, microvmc/_value.py.)"""

    __slots__ = ("caught", "fd")

    def __init__(self, caught: list[int] | None = None, fd: int | None = None) -> None:
        self.caught = [] if caught is None else caught
        self.fd = fd  # readable when a signal arrived (signal.set_wakeup_fd)

    def __repr__(self) -> str:
        return f"Signals(caught={self.caught!r}, fd={self.fd!r})"


@contextmanager
def signals_caught(numbers: tuple[int, ...] = STOP_SIGNALS) -> Iterator[Signals]:
    """The signals are recorded instead of acted on, for the duration of the block, so the loop can
    act on them (pass a stop signal on, stop the VM, resize). Only the main thread can catch signals."""
    signals = Signals()
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        old_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except ValueError:  # not the main thread (asked so, not of threading: ~1 ms of a `run` before QEMU)
        os.close(read_end)
        os.close(write_end)
        yield signals
        return
    previous: dict[int, object] = {}
    try:
        for number in numbers:
            previous[number] = signal.signal(number, lambda n, _frame: signals.caught.append(n))
        signals.fd = read_end
        yield signals
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(old_wakeup)
        os.close(read_end)
        os.close(write_end)
