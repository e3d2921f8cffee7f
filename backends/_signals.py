"""Signals recorded instead of acted on, for a loop to act on: the run's supervision
(backends/supervise.py), and the start of a foreground `run`, which catches them before it
starts QEMU (microvmc/cli.py) and before the supervision's modules are imported."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["Signals", "signals_caught", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(slots=True)
class Signals:
    caught: list[int] = field(default_factory=list)
    fd: int | None = None  # readable when a signal arrived (signal.set_wakeup_fd)


@contextmanager
def signals_caught(numbers: tuple[int, ...] = STOP_SIGNALS) -> Iterator[Signals]:
    """The signals are recorded instead of acted on, for the duration of the block, so the loop can
    act on them (pass a stop signal on, stop the VM, resize). Only the main thread can catch signals."""
    signals = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    previous: dict[int, object] = {}
    old_wakeup = -1
    try:
        old_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
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
