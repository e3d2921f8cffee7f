"""Launching a LaunchPlan under QEMU: the virtiofsd daemons, then QEMU with the descriptor layout
of `Fd`, in a private runtime directory. What happens while they run is supervision's business
(backends/supervise.py); what the run amounts to is judged in compiler/verdict.py.

Each process is a context manager in one ExitStack; leaving it, however, stops QEMU, then the
virtiofsd daemons.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from microvmc.backends._procs import Child, running
from microvmc.backends._unix import bind
from microvmc.backends.oci import stage_files, unstage
from microvmc.backends.netns import tap_joined
from microvmc.backends.ports import check_forwards
from microvmc.compiler.oci import StagedFile
from microvmc.compiler.launch import C_VIRTIOFSD_PID_DIR, Fd, LaunchPlan, VirtiofsdPlan, c_virtiofsd_pid_file
from microvmc.compiler.machine import NicKind
from microvmc.compiler.verdict import Logs
from microvmc.errors import HostError

__all__ = ["launch", "Vm", "RunLogs", "runtime_dir", "sweep_runtime_dirs", "read_logs"]

QEMU_GRACE = 3.0  # seconds QEMU gets after SIGTERM
VIRTIOFSD_GRACE = 2.0
RUNTIME_PREFIX = "microvmc-"  # runtime directories of launch.sh and of runs without a run directory
RUNTIME_LOCK = ".lock"
QEMU_LOG_HEAD = 1 << 16  # bytes of a log searched for the reason something failed


@dataclass(frozen=True, slots=True)
class RunLogs:
    """Where a run leaves its logs (the directory outlives the run)."""

    dir: Path

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def qemu(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def status(self) -> Path:
        return self.dir / "status"

    @property
    def timeline(self) -> Path:
        return self.dir / "timeline.json"

    def virtiofsd(self, tag: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
        return self.dir / f"virtiofsd-{safe}.log"


@dataclass(frozen=True, slots=True)
class Vm:
    """A launched VM: what supervision watches and talks to."""

    qemu: Child
    daemons: tuple[tuple[VirtiofsdPlan, Child], ...]
    readers: dict[Fd, int]  # read ends of the program's stdout, stderr, init's status port and the console
    control: int  # write end of the control port (non-blocking): requests to init
    console_log: int  # the run's console log: what the console pipe brings is written here
    rundir: Path  # sockets: the channel's host end among them


@contextmanager
def launch(plan: LaunchPlan, *, logs: RunLogs, stdin: int, rundir: Path) -> Iterator[Vm]:
    """The virtiofsds, then QEMU reading the program's stdin from `stdin`; all stopped on exit."""
    executable = plan.qemu_argv[0] if plan.qemu_argv else ""
    if not shutil.which(executable):
        raise HostError(f"QEMU not found: {executable!r}", hint="install qemu-system-x86")
    check_forwards(plan.machine.nic)  # a port in use is one line now, not QEMU's after the daemons started
    with ExitStack() as stack:
        for fs in plan.machine.filesystems:
            if fs.staged_from:  # run -v of a file: alone in its own directory, for this run
                stack.callback(unstage, rundir / fs.host_dir)
                try:
                    stage_files([StagedFile(source=fs.staged_from, name=os.path.basename(fs.staged_from),
                                            destination="run -v", read_only=fs.read_only)], rundir / fs.host_dir)
                except HostError as err:  # (its hint is the OCI runtime's)
                    raise HostError(err.message, hint="share it read-only (:ro), or run microvmc as root") from None
        nic = plan.machine.nic
        # network.mode = "netns": the tap made in the namespace and joined to its interface, until QEMU is gone
        tap = stack.enter_context(tap_joined(nic.namespace, nic.interface, nic.mtu)) if nic and nic.kind is NicKind.TAP else None
        daemons = tuple(
            (vp, stack.enter_context(_virtiofsd(vp, rundir=rundir, log=logs.virtiofsd(vp.tag))))
            for vp in plan.virtiofsd
        )
        qemu, readers, control, console_log = stack.enter_context(
            _qemu(plan, rundir=rundir, stdin=stdin, logs=logs, tap=tap))
        yield Vm(qemu=qemu, daemons=daemons, readers=readers, control=control, console_log=console_log, rundir=rundir)


def read_logs(plan: LaunchPlan, logs: RunLogs) -> Logs:
    """The log paths and their first meaningful lines, for the verdict."""
    return Logs(
        console=str(logs.console),
        qemu=str(logs.qemu),
        qemu_line=_first_meaningful_line(logs.qemu),
        virtiofsd=tuple((vp.tag, str(logs.virtiofsd(vp.tag)), _first_meaningful_line(logs.virtiofsd(vp.tag)))
                        for vp in plan.virtiofsd),
    )


def _first_meaningful_line(path: Path) -> str:
    """The first line of a log that says what went wrong (warnings only if nothing else)."""
    try:
        with open(path, "rb") as f:
            text = f.read(QEMU_LOG_HEAD).decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "warning:" not in line.lower():
            return line
    return lines[0] if lines else ""


@contextmanager
def runtime_dir() -> Iterator[Path]:
    """A private directory for the run's sockets, locked (flock) for as long as the run lives, so
    that a later run can tell it was left behind by a microvmc that was killed (sweep_runtime_dirs)."""
    path = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir=_runtime_base()))
    try:
        lock = os.open(path / RUNTIME_LOCK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(lock)
    finally:
        shutil.rmtree(path)


def _runtime_base() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return base if base and os.path.isdir(base) else tempfile.gettempdir()


def sweep_runtime_dirs(min_age: float = 10.0) -> list[str]:
    """Remove the runtime directories of runs that are gone (their lock is free: a microvmc killed
    with SIGKILL could not remove its own; its QEMU and virtiofsd died with it). A directory is
    left alone while its lock is younger than `min_age` seconds (its run may be starting)."""
    removed = []
    base = _runtime_base()
    try:
        entries = [e for e in os.scandir(base) if e.name.startswith(RUNTIME_PREFIX) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return removed
    for entry in entries:
        lock_path = os.path.join(entry.path, RUNTIME_LOCK)
        try:
            if time.time() - os.stat(lock_path).st_mtime < min_age:
                continue
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # no lock: not a run directory (or not yet one)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its run is alive
        finally:
            os.close(fd)
        shutil.rmtree(entry.path, ignore_errors=True)
        _remove_pid_files(entry.path)
        removed.append(entry.path)
    return removed


def _remove_pid_files(rundir: str) -> None:
    """The pid files a C virtiofsd of a killed launch.sh left for its sockets in `rundir`."""
    prefix = os.path.basename(c_virtiofsd_pid_file(rundir))[: -len(".pid")] + "."  # and then the socket's name
    try:
        names = [n for n in os.listdir(C_VIRTIOFSD_PID_DIR) if n.startswith(prefix) and n.endswith(".pid")]
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join(C_VIRTIOFSD_PID_DIR, name))
        except OSError:
            pass


@contextmanager
def _virtiofsd(vp: VirtiofsdPlan, *, rundir: Path, log: Path) -> Iterator[Child]:
    """A virtiofsd serving on a socket bound here, so QEMU can connect at once."""
    with ExitStack() as stack:
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        stack.callback(os.close, log_fd)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        stack.callback(os.close, null)
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        bind(sock, rundir / vp.socket)
        sock.listen(1)
        listen_fd = 3
        try:
            child = stack.enter_context(
                running(
                    vp.argv_with_fd(listen_fd),
                    fds={0: null, 1: log_fd, 2: log_fd, listen_fd: sock.fileno()},
                    name=f"virtiofsd for share '{vp.tag}'",
                    grace=VIRTIOFSD_GRACE,
                )
            )
        except OSError as e:
            raise HostError(f"cannot run virtiofsd {vp.argv[0]!r}: {e.strerror}") from e
        # Only virtiofsd holds the socket now: if it dies, QEMU's connect fails instead of hanging.
        sock.close()
        yield child


class _Closer:
    """Descriptors closed once, by whichever of several exits comes first."""

    def __init__(self, fds):
        self.fds = list(fds)

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


@contextmanager
def _qemu(
    plan: LaunchPlan, *, rundir: Path, stdin: int, logs: RunLogs, tap: int | None = None
) -> Iterator[tuple[Child, dict[Fd, int], int, int]]:
    """QEMU with exactly the descriptors of `Fd`; yields it, the read ends of its outputs, the control
    port's write end and the console log. The console is a pipe too, so that whoever reads it can
    stamp its lines with the host's clock (the kernel's phases in the run's timeline)."""
    with ExitStack() as stack:
        opened = []
        for path in (logs.qemu, logs.console):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            stack.callback(os.close, fd)
            opened.append(fd)
        qemu_log, console = opened
        pipes = {kind: os.pipe() for kind in (Fd.STDOUT, Fd.STDERR, Fd.STATUS, Fd.CONSOLE)}
        control_read, control_write = os.pipe()
        stack.callback(os.close, control_write)
        stack.callback(os.close, control_read)
        os.set_blocking(control_write, False)  # a request that does not fit is not sent
        readers = _Closer(r for r, _ in pipes.values())
        writers = _Closer(w for _, w in pipes.values())
        stack.callback(readers.close)
        stack.callback(writers.close)
        layout = {
            Fd.STDIN: stdin,
            Fd.STDOUT: pipes[Fd.STDOUT][1],
            Fd.QEMU_LOG: qemu_log,
            Fd.STDERR: pipes[Fd.STDERR][1],
            Fd.STATUS: pipes[Fd.STATUS][1],
            Fd.CONSOLE: pipes[Fd.CONSOLE][1],
            Fd.CONTROL: control_read,
            **({Fd.TAP: tap} if tap is not None else {}),
        }
        # os.posix_spawn has no chdir action; env(1) changes directory and execs QEMU in place.
        argv = ("env", "-C", str(rundir), "--", *plan.qemu_argv)
        try:
            child = stack.enter_context(
                running(
                    argv,
                    fds={int(k): v for k, v in layout.items()},
                    name="qemu",
                    grace=QEMU_GRACE,
                    # QEMU puts a terminal stdin in raw mode: that needs the foreground group.
                    own_group=True,  # it never touches the terminal (see _stdin_for_qemu)
                )
            )
        except OSError as e:
            raise HostError(f"cannot run QEMU {plan.qemu_argv[0]!r}: {e.strerror}") from e
        writers.close()  # QEMU holds the only write ends now: its exit is our EOF
        # Closed before QEMU is stopped: a QEMU blocked writing to a pipe gets EPIPE, not stuck.
        stack.callback(readers.close)
        yield child, {kind: r for kind, (r, _) in pipes.items()}, control_write, console
