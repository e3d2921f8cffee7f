"""Child processes started with an exact file descriptor layout, and stopped for sure.

A `Child` is watched through its pidfd (it can sit in a selector next to pipes) and is not reaped
until it is stopped, so its process group stays valid for the final kill of stragglers.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import select
import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

__all__ = ["Child", "spawn", "running", "which", "KILL_WAIT"]

KILL_WAIT = 5.0  # seconds a SIGKILLed process gets to disappear before we give up on it
_FIRST_FREE_FD = 10  # sources are moved above the target numbers so dup2 actions never collide
# Python ignores these; a child must not inherit that (subprocess resets them too).
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class Child:
    """(Not a dataclass: `microvmc run` imports this before it starts QEMU, microvmc/_value.py.)"""

    __slots__ = ("name", "pid", "pidfd", "own_group", "returncode")

    def __init__(self, name: str, pid: int, pidfd: int, own_group: bool, returncode: int | None = None) -> None:
        self.name = name  # for messages: "qemu", "virtiofsd for share 'root'"
        self.pid = pid
        self.pidfd = pidfd
        self.own_group = own_group  # the child leads its own process group
        self.returncode = returncode  # like subprocess: -N for signal N

    def __repr__(self) -> str:
        return (f"Child(name={self.name!r}, pid={self.pid!r}, pidfd={self.pidfd!r}, own_group={self.own_group!r}, "
                f"returncode={self.returncode!r})")

    def exited(self) -> int | None:
        """The exit status if the child has ended, without reaping it."""
        if self.returncode is None:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None and info.si_pid == self.pid:
                if info.si_code == os.CLD_EXITED:
                    self.returncode = info.si_status
                else:
                    self.returncode = -info.si_status
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        """The exit status, waiting at most `timeout` seconds for it."""
        if self.exited() is None and self.pidfd >= 0:
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            poller.poll(max(0, int(timeout * 1000)))
        return self.exited()

    def signal(self, signum: int) -> None:
        try:
            if self.own_group:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, grace: float) -> int:
        """SIGTERM, up to `grace` seconds, then SIGKILL; kill what is left of its group; reap."""
        try:
            if self.exited() is None:
                self.signal(signal.SIGTERM)
                if self.wait(grace) is None:
                    self.signal(signal.SIGKILL)
                    if self.wait(KILL_WAIT) is None:
                        raise OSError(f"{self.name} (pid {self.pid}) survived SIGKILL")
            if self.own_group:
                # The leader is a zombie, not reaped, so the group id is still ours.
                self.signal(signal.SIGKILL)
            os.waitpid(self.pid, 0)
            assert self.returncode is not None
            return self.returncode
        finally:
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1


def _stray_inheritable_fds(keep: set[int]) -> list[int]:
    """Inheritable descriptors this process got from its own parent, which a child must not get."""
    stray = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            if os.get_inheritable(fd):
                stray.append(fd)
        except OSError:  # the directory listing's own descriptor, now closed
            pass
    return stray


def which(name: str, *, mode: int = os.F_OK | os.X_OK, path: str | None = None) -> str | None:
    """shutil.which, without importing shutil (with zlib, bz2 and lzma: ~2.5 ms of a `run` before
    QEMU starts): `name` itself if it has a directory part, else the first in `path` (default:
    $PATH) that exists with `mode` and is no directory."""
    def usable(candidate: str) -> bool:
        return os.path.exists(candidate) and os.access(candidate, mode) and not os.path.isdir(candidate)

    if os.path.dirname(name):
        return name if usable(name) else None
    if path is None:
        path = os.environ.get("PATH")
        if path is None:
            try:
                path = os.confstr("CS_PATH")
            except (AttributeError, ValueError):
                path = os.defpath
    for directory in dict.fromkeys(path.split(os.pathsep)) if path else ():
        candidate = os.path.join(directory, name)
        if usable(candidate):
            return candidate
    return None


@functools.cache
def _die_with_us() -> tuple[str, ...]:
    """An argv prefix that makes the child get SIGKILL when this process dies, however it dies
    (util-linux setpriv sets PR_SET_PDEATHSIG, which survives exec); empty where setpriv is missing."""
    setpriv = which("setpriv")
    return (setpriv, "--pdeathsig", "KILL", "--") if setpriv else ()


def _executable(name: str, env: Mapping[str, str]) -> str:
    """`name` found as posix_spawnp would find it, or the OSError posix_spawnp would raise."""
    found = which(name, mode=os.F_OK, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), found)
    return found


def spawn(
    argv: Sequence[str],
    *,
    fds: Mapping[int, int],
    name: str,
    own_group: bool = True,
    env: Mapping[str, str] | None = None,
    die_with_us: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> Child:
    """Start argv (searched in PATH) with exactly `fds` (child fd → parent fd) open. With
    `die_with_us`, it is killed if this process dies first, even by SIGKILL. `cwd`: the child's
    working directory (argv[0] and relative paths are then relative to it).

    Raises OSError if it cannot be executed (glibc's posix_spawn reports exec failures).
    """
    if cwd is None:
        return _spawn(argv, fds=fds, name=name, own_group=own_group, env=env, die_with_us=die_with_us)
    # posix_spawn has no chdir action (Python 3.11): this process changes directory around it, which
    # is cheaper than an exec of env(1) -C. (Only in a process whose other threads use no relative path.)
    here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(cwd)
        return _spawn(argv, fds=fds, name=name, own_group=own_group, env=env, die_with_us=die_with_us)
    finally:
        os.fchdir(here)
        os.close(here)


def _spawn(argv: Sequence[str], *, fds: Mapping[int, int], name: str, own_group: bool,
           env: Mapping[str, str] | None, die_with_us: bool) -> Child:
    environ = os.environ if env is None else env
    if die_with_us and _die_with_us():
        # The executable is checked here: past setpriv, a failed exec is only an exit status.
        argv = (*_die_with_us(), _executable(argv[0], environ), *argv[1:])
    high: dict[int, int] = {}
    try:
        for target, source in fds.items():
            high[target] = fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, _FIRST_FREE_FD)
        actions: list[tuple] = [(os.POSIX_SPAWN_DUP2, src, dst) for dst, src in high.items()]
        keep = set(fds) | set(high.values())
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _stray_inheritable_fds(keep)]
        group = {"setpgroup": 0} if own_group else {}
        pid = os.posix_spawnp(
            argv[0],
            list(argv),
            dict(environ),
            file_actions=actions,
            setsigdef=_RESET_SIGNALS,
            **group,
        )
    finally:
        for fd in high.values():
            os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return Child(name=name, pid=pid, pidfd=pidfd, own_group=own_group)


@contextmanager
def running(
    argv: Sequence[str],
    *,
    fds: Mapping[int, int],
    name: str,
    grace: float,
    own_group: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> Iterator[Child]:
    """A child process for the duration of the block; stopped (see `Child.stop`) on the way out."""
    child = spawn(argv, fds=fds, name=name, own_group=own_group, cwd=cwd)
    try:
        yield child
    finally:
        child.stop(grace)
