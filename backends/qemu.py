"""Launching a LaunchPlan under QEMU: the virtiofsd daemons, then QEMU with the descriptor layout
of `Fd`, in a private runtime directory. What happens while they run is supervision's business
(backends/supervise.py); what the run amounts to is judged in compiler/verdict.py.

Each process is a context manager in one ExitStack; leaving it, however, stops QEMU, then the
virtiofsd daemons.
"""

from __future__ import annotations

import _socket  # (socket's Python layer is ~2.5 ms of a `run` before QEMU starts; a listening socket needs none of it)
import fcntl
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from microvmc._value import Value
from microvmc.backends._procs import Child, running, which
from microvmc.backends._unix import bind
from microvmc.errors import HostError

TYPE_CHECKING = False  # (not typing's: importing typing is ~3 ms of a `run` before QEMU starts)
if TYPE_CHECKING:
    from typing import Any

    from microvmc.compiler.launch import Fd, LaunchPlan, VirtiofsdPlan
    from microvmc.compiler.verdict import Logs

# The compiler's modules (the plan's types, the staging, the tap, the forwards' check) are imported
# where they are used: `start` launches a cached plan from its JSON form without any of them, so
# that QEMU boots while `microvmc run` imports the rest (bench/run_true.py).

__all__ = ["launch", "start", "Started", "Vm", "RunLogs", "program_stdin", "runtime_dir", "sweep_runtime_dirs",
           "read_logs", "startable"]

QEMU_GRACE = 3.0  # seconds QEMU gets after SIGTERM
VIRTIOFSD_GRACE = 2.0
RUNTIME_PREFIX = "microvmc-"  # runtime directories of launch.sh and of runs without a run directory
RUNTIME_LOCK = ".lock"
QEMU_LOG_HEAD = 1 << 16  # bytes of a log searched for the reason something failed


class RunLogs(Value):
    """Where a run leaves its logs (the directory outlives the run). (Not a dataclass: `microvmc run`
    imports this before it starts QEMU, microvmc/_value.py.)"""

    __slots__ = ("dir",)
    dir: Path

    def __init__(self, dir: Path) -> None:
        self._init(locals())

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


class Vm(Value):
    """A launched VM: what supervision watches and talks to."""

    __slots__ = ("qemu", "daemons", "readers", "control", "console_log", "rundir")
    qemu: Child
    daemons: tuple[tuple[VirtiofsdPlan, Child], ...]
    readers: dict[Fd, int]
    control: int
    console_log: int
    rundir: Path

    def __init__(self, qemu: Child, daemons: tuple[tuple[VirtiofsdPlan, Child], ...],
                 readers: dict[Fd, int],  # read ends of the program's stdout, stderr, init's status port, the console
                 control: int,  # write end of the control port (non-blocking): requests to init
                 console_log: int,  # the run's console log: what the console pipe brings is written here
                 rundir: Path) -> None:  # sockets: the channel's host end among them
        self._init(locals())


@contextmanager
def launch(plan: LaunchPlan, *, logs: RunLogs, stdin: int, rundir: Path,
           started: Started | None = None) -> Iterator[Vm]:
    """The virtiofsds, then QEMU reading the program's stdin from `stdin`; all stopped on exit.
    `started`: they were started already (`start`, from this plan's JSON form): only adopted."""
    if started is not None:
        with started.stack:
            yield started.vm(plan)
        return
    from microvmc.compiler.machine import Fd, NicKind

    _check_executable(plan.qemu_argv[0] if plan.qemu_argv else "")
    nic = plan.machine.nic
    if nic is not None:
        from microvmc.backends.ports import check_forwards

        check_forwards(nic)  # a port in use is one line now, not QEMU's after the daemons started
    with ExitStack() as stack:
        for fs in plan.machine.filesystems:
            if fs.staged_from:  # run -v of a file: alone in its own directory, for this run
                from microvmc.backends.oci import stage_files, unstage
                from microvmc.compiler.oci import StagedFile

                stack.callback(unstage, rundir / fs.host_dir)
                try:
                    stage_files([StagedFile(source=fs.staged_from, name=os.path.basename(fs.staged_from),
                                            destination="run -v", read_only=fs.read_only)], rundir / fs.host_dir)
                except HostError as err:  # (its hint is the OCI runtime's)
                    raise HostError(err.message, hint="share it read-only (:ro), or run microvmc as root") from None
        tap = None
        if nic is not None and nic.kind is NicKind.TAP:
            from microvmc.backends.netns import tap_joined

            # network.mode = "netns": the tap made in the namespace and joined to its interface, until QEMU is gone
            tap = stack.enter_context(tap_joined(nic.namespace, nic.interface, nic.mtu))
        shares = [(vp.argv, vp.socket, vp.tag) for vp in plan.virtiofsd]
        spawned = _spawn(stack, qemu_argv=plan.qemu_argv, shares=shares, fds={fd.name.lower(): int(fd) for fd in Fd},
                         logs=logs, stdin=stdin, rundir=rundir, tap=tap)
        yield spawned.vm(plan)


def start(plan: Mapping[str, Any], *, logs: RunLogs, stdin: int, rundir: Path) -> Started | None:
    """The virtiofsds and QEMU of a plan in its JSON form (`LaunchPlan.to_dict()`), started before
    its LaunchPlan (and the compiler's modules) exist: `launch(..., started=)` adopts them. None
    when the plan needs more than starting processes (a file staged for `run -v`, a tap, forwards
    to check): then `launch` does all of it. The caller closes the result if it is never adopted."""
    if not startable(plan):
        return None
    argv = plan["qemu_argv"]
    _check_executable(argv[0] if argv else "")
    stack = ExitStack()
    try:
        return _spawn(stack, qemu_argv=argv, shares=[(v["argv"], v["socket"], v["tag"]) for v in plan["virtiofsd"]],
                      fds=plan["fds"], logs=logs, stdin=stdin, rundir=rundir)
    except BaseException:
        stack.close()
        raise


def startable(plan: Mapping[str, Any]) -> bool:
    """Whether `start` can start this plan (in JSON form)."""
    machine = plan.get("machine") or {}
    return machine.get("nic") is None and not any(fs.get("staged_from") for fs in machine.get("filesystems", ()))


def _check_executable(executable: str) -> None:
    if not which(executable):
        raise HostError(f"QEMU not found: {executable!r}", hint="install qemu-system-x86")


class Started:
    """The processes of a VM and QEMU's descriptors, before they are a `Vm` (which needs the plan's
    types): `stack` stops and closes them all."""

    def __init__(self, stack: ExitStack, *, qemu_argv: Sequence[str], qemu: Child, daemons: tuple[Child, ...],
                 readers: dict[int, int], control: int, console_log: int, rundir: Path):
        self.stack = stack
        self.qemu_argv = tuple(qemu_argv)
        self.qemu = qemu
        self.daemons = daemons
        self.readers = readers  # by the descriptor's number in QEMU
        self.control = control
        self.console_log = console_log
        self.rundir = rundir
        self.at = time.monotonic()  # when QEMU was started

    def vm(self, plan: LaunchPlan) -> Vm:
        from microvmc.compiler.launch import Fd

        if tuple(plan.qemu_argv) != self.qemu_argv or len(plan.virtiofsd) != len(self.daemons):
            raise HostError("the VM that was started is not this plan's")  # a caller's mistake, never the user's
        return Vm(qemu=self.qemu, daemons=tuple(zip(plan.virtiofsd, self.daemons)),
                  readers={Fd(n): fd for n, fd in self.readers.items()}, control=self.control,
                  console_log=self.console_log, rundir=self.rundir)

    def close(self) -> None:
        """Stop what was started (once; again is nothing)."""
        self.stack.close()


def _spawn(stack: ExitStack, *, qemu_argv: Sequence[str], shares: Sequence[tuple[Sequence[str], str, str]],
           fds: Mapping[str, int], logs: RunLogs, stdin: int, rundir: Path, tap: int | None = None) -> Started:
    """The virtiofsds of `shares` ((argv, socket, tag) each), then QEMU, entered into `stack`.
    `fds`: the plan's descriptor numbers by name (Fd's names, lower case)."""
    daemons = tuple(
        stack.enter_context(_virtiofsd(argv, socket_name, tag, rundir=rundir, log=logs.virtiofsd(tag)))
        for argv, socket_name, tag in shares
    )
    qemu, readers, control, console_log = stack.enter_context(
        _qemu(qemu_argv, fds, rundir=rundir, stdin=stdin, logs=logs, tap=tap))
    return Started(stack, qemu_argv=qemu_argv, qemu=qemu, daemons=daemons, readers=readers, control=control,
                   console_log=console_log, rundir=rundir)


@contextmanager
def program_stdin(stdin: int, terminal: bool) -> Iterator[tuple[int, tuple[int, int] | None]]:
    """What QEMU reads as the program's stdin, and the relay (source, pipe) the loop runs for it.

    A terminal is not handed to QEMU: its stdio chardev would put it in raw mode, where Enter is `\\r`
    and Ctrl-C never reaches microvmc. The loop copies it into a pipe instead: in the terminal's
    normal mode the user edits lines as usual, Ctrl-D ends the program's input and Ctrl-C stops
    the run; with -t (`terminal`, the caller put it in raw mode) every byte goes to the guest's pty.
    Anything else (pipe, file, socket, /dev/null) is passed as it is; its O_NONBLOCK, which QEMU sets
    on the shared open file, is put back afterwards."""
    with ExitStack() as stack:
        try:
            os.fstat(stdin)
        except OSError:  # closed: the program gets an empty stdin
            stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            stack.callback(os.close, stdin)
        if os.isatty(stdin) or terminal:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            stack.callback(os.close, read_end)
            yield read_end, (stdin, write_end)  # the loop closes write_end
            return
        flags = fcntl.fcntl(stdin, fcntl.F_GETFL)
        try:
            yield stdin, None
        finally:
            try:
                if fcntl.fcntl(stdin, fcntl.F_GETFL) != flags:
                    fcntl.fcntl(stdin, fcntl.F_SETFL, flags)
            except OSError:
                pass


def read_logs(plan: LaunchPlan, logs: RunLogs) -> Logs:
    """The log paths and their first meaningful lines, for the verdict."""
    from microvmc.compiler.verdict import Logs

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
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir=_runtime_base()))
    try:
        lock = os.open(path / RUNTIME_LOCK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(lock)
    finally:
        import shutil

        shutil.rmtree(path)


def _runtime_base() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return base
    # tempfile.gettempdir()'s choice, told by access(2) rather than by writing a file: importing
    # tempfile (and random) is ~2 ms of a `run`'s CPU while the guest boots (sweep_runtime_dirs)
    for candidate in (*(os.environ.get(name) for name in ("TMPDIR", "TEMP", "TMP")), "/tmp", "/var/tmp", "/usr/tmp"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return os.path.abspath(candidate)
    return os.getcwd()


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
        import shutil

        shutil.rmtree(entry.path, ignore_errors=True)
        _remove_pid_files(entry.path)
        removed.append(entry.path)
    return removed


def _remove_pid_files(rundir: str) -> None:
    """The pid files a C virtiofsd of a killed launch.sh left for its sockets in `rundir`."""
    from microvmc.compiler.launch import C_VIRTIOFSD_PID_DIR, c_virtiofsd_pid_file

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
def _virtiofsd(argv: Sequence[str], socket_name: str, tag: str, *, rundir: Path, log: Path) -> Iterator[Child]:
    """A virtiofsd (`argv`, but for its socket) serving share `tag` on a socket bound here (at
    `socket_name` in `rundir`), so QEMU can connect at once."""
    with ExitStack() as stack:
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        stack.callback(os.close, log_fd)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        stack.callback(os.close, null)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        stack.callback(sock.close)
        bind(sock, rundir / socket_name)
        sock.listen(1)
        listen_fd = 3
        try:
            child = stack.enter_context(
                running(
                    (*argv, f"--fd={listen_fd}"),  # as VirtiofsdPlan.argv_with_fd
                    fds={0: null, 1: log_fd, 2: log_fd, listen_fd: sock.fileno()},
                    name=f"virtiofsd for share '{tag}'",
                    grace=VIRTIOFSD_GRACE,
                )
            )
        except OSError as e:
            raise HostError(f"cannot run virtiofsd {argv[0]!r}: {e.strerror}") from e
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
    qemu_argv: Sequence[str], fds: Mapping[str, int], *, rundir: Path, stdin: int, logs: RunLogs, tap: int | None = None
) -> Iterator[tuple[Child, dict[int, int], int, int]]:
    """QEMU with exactly the descriptors of `Fd` (`fds`: their numbers by name); yields it, the read
    ends of its outputs (by their number in QEMU), the control port's write end and the console log.
    The console is a pipe too, so that whoever reads it can stamp its lines with the host's clock
    (the kernel's phases in the run's timeline)."""
    with ExitStack() as stack:
        opened = []
        for path in (logs.qemu, logs.console):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            stack.callback(os.close, fd)
            opened.append(fd)
        qemu_log, console = opened
        outputs = ("stdout", "stderr", "status", "console")
        pipes = {fds[name]: os.pipe() for name in outputs}
        control_read, control_write = os.pipe()
        stack.callback(os.close, control_write)
        stack.callback(os.close, control_read)
        os.set_blocking(control_write, False)  # a request that does not fit is not sent
        readers = _Closer(r for r, _ in pipes.values())
        writers = _Closer(w for _, w in pipes.values())
        stack.callback(readers.close)
        stack.callback(writers.close)
        layout = {
            fds["stdin"]: stdin,
            fds["qemu_log"]: qemu_log,
            fds["control"]: control_read,
            **{number: write_end for number, (_, write_end) in pipes.items()},
            **({fds["tap"]: tap} if tap is not None else {}),
        }
        try:
            child = stack.enter_context(
                running(
                    qemu_argv,
                    fds=layout,
                    cwd=rundir,  # the plan's sockets are relative to it (as in launch.sh)
                    name="qemu",
                    grace=QEMU_GRACE,
                    # QEMU puts a terminal stdin in raw mode: that needs the foreground group.
                    own_group=True,  # it never touches the terminal (see _stdin_for_qemu)
                )
            )
        except OSError as e:
            raise HostError(f"cannot run QEMU {qemu_argv[0]!r}: {e.strerror}") from e
        writers.close()  # QEMU holds the only write ends now: its exit is our EOF
        # Closed before QEMU is stopped: a QEMU blocked writing to a pipe gets EPIPE, not stuck.
        stack.callback(readers.close)
        yield child, {number: r for number, (r, _) in pipes.items()}, control_write, console
