"""Unix sockets at paths longer than sun_path's 108 bytes: reached through the directory's descriptor."""

from __future__ import annotations

import os
from pathlib import Path

TYPE_CHECKING = False  # (not typing's: `microvmc run` binds virtiofsd's socket before it imports socket)
if TYPE_CHECKING:
    import socket

__all__ = ["bind", "connect"]

_SHORT = 100


def _via_dir(sock: socket.socket, path: Path, op) -> None:
    if len(os.fsencode(path)) < _SHORT:
        op(str(path))
        return
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        op(f"/proc/self/fd/{dirfd}/{path.name}")
    finally:
        os.close(dirfd)


def bind(sock: socket.socket, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _via_dir(sock, path, sock.bind)


def connect(sock: socket.socket, path: Path) -> None:
    _via_dir(sock, Path(path), sock.connect)
