"""The host terminal: its size, and raw mode restored on every way out."""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["size", "raw", "set_size"]


def size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on `fd`, (0, 0) if it is not one."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 0, 0
    return rows, cols


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@contextmanager
def raw(fd: int) -> Iterator[None]:
    """The terminal in raw mode for the block (every byte, Ctrl-C included, goes to the guest's own
    terminal), put back as it was however the block ends. Not a terminal: nothing happens."""
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error:
            pass


def is_terminal(fd: int) -> bool:
    return os.isatty(fd)
