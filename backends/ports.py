"""Host ports a run forwards, checked before QEMU starts.

QEMU's user-mode network binds each forward's host port itself once it runs, and says only "could
not set up host forwarding rule" when it cannot. So each port is bound here first, by the same kind
of socket, and a port in use, a privileged port without the right, or an address the host does not
have is one line naming the forward as the user wrote it (`network.forwards[0]`, `-p 8080:80`).
The socket is closed again at once: what is left is the short race with another program binding it
in between, which QEMU then reports.
"""

from __future__ import annotations

import errno
import os
import socket

from microvmc.compiler.machine import Nic
from microvmc.errors import HostError

__all__ = ["check_forwards", "PortError"]

UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"


class PortError(HostError):
    """Forwards whose host ports cannot be listened on: one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)

    def lines(self) -> list[str]:
        return list(self.problems)


def _unprivileged_start() -> int:
    try:
        with open(UNPRIVILEGED_PORT_START) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def _probe(protocol: str, address: str, port: int) -> None:
    """Bind the port as QEMU's slirp will: TCP with SO_REUSEADDR (so a port in TIME_WAIT is free, as
    for slirp), UDP without (so any other socket on it shows)."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind | socket.SOCK_CLOEXEC) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        if kind == socket.SOCK_STREAM:
            s.listen(1)


def check_forwards(nic: Nic | None) -> None:
    """Raise PortError, one line per forward that cannot listen, before anything starts."""
    if nic is None:
        return
    problems = []
    for index, (protocol, address, port, _guest) in enumerate(nic.forwards):
        where = f"{nic.source(index)}: {address}:{port}/{protocol}"
        try:
            _probe(protocol, address, port)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                problems.append(f"{where} is already in use on the host")
            elif err.errno == errno.EACCES:
                start = _unprivileged_start()
                problems.append(f"{where}: ports below {start} (net.ipv4.ip_unprivileged_port_start) need root, "
                                f"and microvmc runs as uid {os.geteuid()}")
            elif err.errno == errno.EADDRNOTAVAIL:
                problems.append(f"{where}: {address} is not an address of this host")
            else:
                problems.append(f"{where} cannot be listened on: {err.strerror}")
    if problems:
        raise PortError(problems)
