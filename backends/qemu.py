"""Run a LaunchPlan: the virtiofsd daemons, QEMU with the descriptor layout of `Fd`, the
program's I/O relayed, init's reports read, timeouts and signals enforced.

Each process is a context manager in one ExitStack; leaving it, however, stops QEMU, then the
virtiofsd daemons, then removes the runtime directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import selectors
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from microvmc.backends._procs import Child, running
from microvmc.compiler.launch import C_VIRTIOFSD_PID_DIR, Fd, LaunchPlan, VirtiofsdPlan, c_virtiofsd_pid_file
from microvmc.compiler.status import interpret_status
from microvmc.errors import ExitStatus, HostError

__all__ = ["run_plan", "RunLogs", "sweep_runtime_dirs"]

QEMU_GRACE = 3.0  # seconds QEMU gets after SIGTERM
VIRTIOFSD_GRACE = 2.0
# QEMU ending makes virtiofsd end too; a virtiofsd that ends on its own leaves QEMU running.
# This long, QEMU gets to show which of the two happened.
VIRTIOFSD_EXIT_GRACE = 0.5
SHUTDOWN_GRACE = 10.0  # seconds QEMU gets to end after init's final report
EOF_GRACE = 5.0  # seconds after QEMU ended until its pipes must be at EOF
SINK_LIMIT = 1 << 20  # bytes kept for a slow reader before we stop reading from QEMU
READ_CHUNK = 1 << 16
RUNTIME_PREFIX = "microvmc-"  # runtime directories: sockets and the lock of a live run
RUNTIME_LOCK = ".lock"
WRITE_CHUNK = select.PIPE_BUF  # what a pipe that polls writable takes without blocking
RELAY_POLL = 0.1  # seconds the terminal relay waits before checking whether the run ended
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FINAL_REPORTS = frozenset({"exit", "signal", "error"})  # init reboots after these
QEMU_LOG_HEAD = 1 << 16  # bytes of qemu.log searched for the reason QEMU failed


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


def run_plan(
    plan: LaunchPlan,
    *,
    log_dir: Path,
    stdin: int = 0,
    stdout: int = 1,
    stderr: int = 2,
    verbose: bool = False,
    booting: Callable[[], None] | None = None,
) -> int:
    """Run the VM; return the status microvmc exits with (the program's own when it ran).
    `booting` is called once QEMU runs: work that need not delay the boot.

    Raises HostError if QEMU or a virtiofsd cannot be executed at all.
    """
    began = time.monotonic()
    logs = RunLogs(Path(log_dir))
    if verbose:
        shared = ", ".join(f"{tag} over {transport}" for tag, transport in plan.transports)
        _say(stderr, f"accel {plan.accel} ({plan.accel_reason}); {shared or 'no shares'}; logs in {logs.dir}")
    executable = plan.qemu_argv[0] if plan.qemu_argv else ""
    if not shutil.which(executable):
        raise HostError(f"QEMU not found: {executable!r}", hint="install qemu-system-x86")
    with _stop_signals_caught() as signals:
        with ExitStack() as stack:
            rundir = stack.enter_context(_runtime_dir())
            daemons = tuple(
                (vp, stack.enter_context(_virtiofsd(vp, rundir=rundir, log=logs.virtiofsd(vp.tag))))
                for vp in plan.virtiofsd
            )
            qemu_stdin = stack.enter_context(_stdin_for_qemu(stdin))
            status_file = stack.enter_context(open(logs.status, "wb"))
            sinks = _sinks(stdout, stderr)
            qemu, readers, control = stack.enter_context(
                _qemu(plan, rundir=rundir, stdin=qemu_stdin, logs=logs)
            )
            sweep_runtime_dirs()  # while the VM boots: what runs killed earlier left behind
            if booting is not None:
                booting()
            supervisor = _Supervisor(
                plan=plan,
                qemu=qemu,
                daemons=daemons,
                readers=readers,
                control=control,
                sinks=sinks,
                status_file=status_file,
                signals=signals,
                began=began,
            )
            end = supervisor.run()
            failed = [f"{kind.name.lower()}: {sink.error.strerror}" for kind, sink in sinks.items() if sink.error]
            end.lost_output = ", ".join(dict.fromkeys(failed))
    if len(signals.caught) > supervisor.seen and not end.signal:  # it came while everything was being stopped
        end.signal = signals.caught[supervisor.seen]
    end.host["ended"] = time.monotonic() - began
    status, message = _verdict(end, plan=plan, logs=logs)
    _write_timeline(logs.timeline, end)
    if verbose:
        _say(stderr, _timeline_summary(end))
    if message:
        _say(stderr, message)
    return status


def _write_timeline(path: Path, end: _End) -> None:
    import json

    # In the order they happened: the status pipe and QEMU's exit are watched by different threads, so the
    # order marks were recorded in is not always the order of the clock.
    marks = sorted(end.host.items(), key=lambda item: item[1])
    record = {"host_seconds": {k: round(v, 3) for k, v in marks}, "guest_ms": end.guest}
    path.write_text(json.dumps(record, indent=2) + "\n")


def _timeline_summary(end: _End) -> str:
    """One line: how long each boot step took, from init's timeline and the host's clock."""
    guest = end.guest
    parts = []
    previous = 0
    for stage, label in (("init", "kernel"), ("modules", "modules"), ("ports", "ports"), ("mounts", "mounts"),
                         ("exec", "exec"), ("exit", "program")):
        if stage in guest:
            parts.append(f"{label} {(guest[stage] - previous) / 1000:.2f} s")
            previous = guest[stage]
    host = ", ".join(f"{name} at {seconds:.2f} s" for name, seconds in end.host.items())
    return f"timeline: {', '.join(parts) or 'no report from init'}; host: {host}"


# --- the loop ------------------------------------------------------------------------------


@dataclass(slots=True)
class _End:
    """How the supervision loop ended."""

    signal: int = 0  # microvmc got this signal and stopped the VM
    forwarded: int = 0  # microvmc got this signal and sent it to the program
    boot_timeout: bool = False
    run_timeout: bool = False
    qemu_status: int | None = None  # QEMU's exit status, when it ended by itself
    # A virtiofsd that ended while QEMU ran on, and its status.
    dead_daemon: tuple[VirtiofsdPlan, int] | None = None
    # Daemons that had failed by the time QEMU ended (QEMU cannot connect to a dead one).
    failed_daemons: tuple[tuple[VirtiofsdPlan, int], ...] = ()
    report: str = ""  # everything the status port delivered
    lost_output: str = ""  # "stdout: <why>" when the caller's stdout or stderr failed (not EPIPE)
    started: bool = False
    # The boot timeline: seconds since run_plan began, on the host; ms since the guest kernel
    # started, as init reported them (init/PROTOCOL.md, `time` lines).
    host: dict[str, float] = field(default_factory=dict)
    guest: dict[str, int] = field(default_factory=dict)


class _Sink:
    """One of the caller's output descriptors, fed without ever blocking the loop."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pending = bytearray()
        self.broken = False  # EPIPE & co.: what still comes is discarded
        self.error: OSError | None = None  # why, unless the reader just went away (EPIPE)
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            self.broken = True
            mode = 0
        # poll(2) says nothing useful about regular files: they are always "ready".
        self.pollable = not (stat.S_ISREG(mode) or stat.S_ISBLK(mode))

    def push(self, data: bytes) -> None:
        if not self.broken:
            self.pending += data
            if not self.pollable:
                while self.pending and self.write():
                    pass

    def write(self) -> bool:
        """Write what one writable event allows; False if nothing could be written."""
        size = WRITE_CHUNK if self.pollable else len(self.pending)
        try:
            written = os.write(self.fd, self.pending[:size])
        except BlockingIOError:  # someone else's O_NONBLOCK on a shared terminal
            return False
        except OSError as e:
            self.broken = True
            self.pending.clear()
            if e.errno != errno.EPIPE and self.error is None:
                self.error = e
            return False
        del self.pending[:written]
        return written > 0

    @property
    def full(self) -> bool:
        return len(self.pending) >= SINK_LIMIT


def _sinks(stdout: int, stderr: int) -> dict[Fd, _Sink]:
    out = _Sink(stdout)
    return {Fd.STDOUT: out, Fd.STDERR: out if stderr == stdout else _Sink(stderr)}


class _Supervisor:
    """The one loop of a run: a poll over QEMU's pipes, the caller's outputs, the pidfds of
    every process and the signal pipe, bounded by the deadline that applies at the moment."""

    def __init__(
        self,
        *,
        plan: LaunchPlan,
        qemu: Child,
        daemons: tuple[tuple[VirtiofsdPlan, Child], ...],
        readers: dict[Fd, int],
        control: int,
        sinks: dict[Fd, _Sink],
        status_file,
        signals: _Signals,
        began: float,
    ):
        self.began = began
        self.plan = plan
        self.qemu = qemu
        self.daemons = daemons
        self.readers = dict(readers)  # pipe read ends not at EOF yet: STDOUT, STDERR, STATUS
        self.control = control  # write end of the control port: requests to init
        self.seen = 0  # how many of signals.caught have been acted on
        self.sinks = sinks
        self.status_file = status_file
        self.signals = signals
        self.end = _End()
        self.end.host["qemu"] = time.monotonic() - began
        self.status_buffer = b""
        self.selector = selectors.PollSelector()
        self.watched: set[int] = set()  # pipes and sinks registered by _watch
        self.closed: set[Fd] = set()  # outputs whose reader went away, as init has been told
        start = time.monotonic()
        self.boot_deadline = start + plan.boot_timeout if plan.boot_timeout > 0 else None
        self.run_deadline = start + plan.timeout if plan.timeout > 0 else None
        self.shutdown_deadline: float | None = None  # set by the final report
        self.stop_deadline: float | None = None  # set when a signal was sent to the program
        self.eof_deadline: float | None = None  # set when QEMU has ended

    def run(self) -> _End:
        try:
            for fd in self.readers.values():
                os.set_blocking(fd, False)
            self.selector.register(self.qemu.pidfd, selectors.EVENT_READ, self._qemu_ended)
            for vp, child in self.daemons:
                self.selector.register(child.pidfd, selectors.EVENT_READ, (vp, child))
            if self.signals.fd is not None:
                self.selector.register(self.signals.fd, selectors.EVENT_READ, self._signalled)
            self._loop()
            return self.end
        finally:
            self.selector.close()

    def _loop(self) -> None:
        while not self._over(time.monotonic()):
            self._watch()
            deadlines = [
                d
                for d in (
                    self.boot_deadline,
                    self.run_deadline,
                    self.shutdown_deadline,
                    self.stop_deadline,
                    self.eof_deadline,
                )
                if d is not None
            ]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, _ in self.selector.select(timeout):
                if isinstance(key.data, _Sink):
                    key.data.write()
                elif isinstance(key.data, Fd):
                    self._read(key.data)
                elif isinstance(key.data, tuple):
                    self._daemon_ended(*key.data)
                else:
                    key.data()

    def _over(self, now: float) -> bool:
        """Whether the loop is done; records why in self.end."""
        end = self.end
        for number in self.signals.caught[self.seen:]:
            self.seen += 1
            if not end.signal and not self._forward(number):
                end.signal = number
        if end.signal:
            pass
        elif self.stop_deadline is not None and now >= self.stop_deadline:
            end.signal = end.forwarded  # the program did not end in time: the VM is stopped
        elif self.boot_deadline is not None and now >= self.boot_deadline:
            end.boot_timeout = True
        elif self.run_deadline is not None and now >= self.run_deadline:
            end.run_timeout = True
        elif end.dead_daemon is not None:
            pass
        elif self.shutdown_deadline is not None and now >= self.shutdown_deadline:
            pass  # the report is in but QEMU does not end: it gets stopped, the report stands
        elif end.qemu_status is not None:
            if self.eof_deadline is not None and now >= self.eof_deadline:
                self._forget_readers()  # something QEMU started holds the pipes open
            return not self.readers and all(not s.pending or s.broken for s in self.sinks.values())
        else:
            return False
        return True

    def _forward(self, number: int) -> bool:
        """Send the program the first stop signal once it runs (init/PROTOCOL.md, control port),
        so that it can end in its own way; a second signal, or one during boot, stops the VM."""
        end = self.end
        if (not end.started or end.forwarded or self.shutdown_deadline is not None or end.qemu_status is not None
                or self.plan.stop_timeout <= 0):
            return False
        try:
            os.write(self.control, f"signal {number}\n".encode("ascii"))
        except OSError:
            return False
        end.forwarded = number
        end.host["signal-sent"] = time.monotonic() - self.began
        self.stop_deadline = time.monotonic() + self.plan.stop_timeout
        return True

    def _watch(self) -> None:
        """(Un)register pipes and sinks for what each waits for now: a reader pauses while
        its sink is full, a sink is watched only while it holds data."""
        wanted: dict[int, tuple[int, object]] = {}
        for kind, sink in self.sinks.items():
            if sink.broken and kind not in self.closed:
                # The reader went away: init closes the program's end too, so it gets EPIPE (SIGPIPE).
                self.closed.add(kind)
                try:
                    os.write(self.control, f"close {kind.name.lower()}\n".encode("ascii"))
                except OSError:
                    pass
        for sink in self.sinks.values():
            if sink.pending and sink.pollable and not sink.broken:
                wanted[sink.fd] = (selectors.EVENT_WRITE, sink)
        for kind, fd in self.readers.items():
            sink = self.sinks.get(kind)
            if sink is None or not sink.full:
                wanted[fd] = (selectors.EVENT_READ, kind)
        for fd in self.watched - wanted.keys():
            self.selector.unregister(fd)
        for fd in wanted.keys() - self.watched:
            self.selector.register(fd, *wanted[fd])
        self.watched = set(wanted)

    def _forget_readers(self) -> None:
        for fd in self.readers.values():
            if fd in self.watched:
                self.selector.unregister(fd)
                self.watched.discard(fd)
        self.readers.clear()  # closed by _qemu

    def _read(self, kind: Fd) -> None:
        fd = self.readers[kind]
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        if not data:
            self.selector.unregister(fd)
            self.watched.discard(fd)
            del self.readers[kind]  # closed by _qemu
            return
        if kind == Fd.STATUS:
            self._status(data)
        else:
            self.sinks[kind].push(data)

    def _status(self, data: bytes) -> None:
        self.status_file.write(data)
        self.status_file.flush()
        self.end.report += data.decode("ascii", "replace")
        *lines, self.status_buffer = (self.status_buffer + data).split(b"\n")
        now = time.monotonic()
        for line in lines:
            kind, *fields = line.decode("ascii", "replace").split(" ")
            if kind == "time" and len(fields) == 2 and fields[1].isdigit():
                self.end.guest[fields[0]] = int(fields[1])
            elif kind == "started":
                self.end.started = True
                self.end.host["started"] = now - self.began
                self.boot_deadline = None
            elif kind in FINAL_REPORTS and self.shutdown_deadline is None:
                self.end.host["reported"] = now - self.began
                self.boot_deadline = self.stop_deadline = None
                self.shutdown_deadline = now + SHUTDOWN_GRACE

    def _drain_status(self) -> None:
        """Take in every report already written (they precede the exits they explain)."""
        while Fd.STATUS in self.readers:
            try:
                data = os.read(self.readers[Fd.STATUS], READ_CHUNK)
            except BlockingIOError:
                return
            if not data:
                return
            self._status(data)

    def _qemu_ended(self) -> None:
        self.end.qemu_status = self.qemu.exited()
        if self.end.qemu_status is None:
            return
        self.end.host["qemu-exited"] = time.monotonic() - self.began
        self.selector.unregister(self.qemu.pidfd)
        self.boot_deadline = self.shutdown_deadline = self.stop_deadline = None
        self.eof_deadline = time.monotonic() + EOF_GRACE
        failed = []
        for vp, child in self.daemons:  # from now on they end with QEMU's connection
            if child.pidfd in self.selector.get_map():
                self.selector.unregister(child.pidfd)
            if child.exited():
                failed.append((vp, child.exited()))
        self.end.failed_daemons = tuple(failed)

    def _daemon_ended(self, vp: VirtiofsdPlan, child: Child) -> None:
        status = child.exited()
        if status is None or child.pidfd not in self.selector.get_map():
            return  # (QEMU's end, seen in the same poll, has already accounted for the daemon)
        self.selector.unregister(child.pidfd)
        self._drain_status()
        if self.shutdown_deadline is not None:
            return  # the final report is in: the guest is shutting down
        # A clean exit is what QEMU's shutdown causes (it closes the connection first): give QEMU longer.
        if self.qemu.wait(VIRTIOFSD_EXIT_GRACE if status else QEMU_GRACE) is not None:
            return  # QEMU ended too (its pidfd event is next): the daemon followed it
        self.end.dead_daemon = (vp, status)

    def _signalled(self) -> None:
        assert self.signals.fd is not None
        try:  # only drained: the handler recorded the signals in signals.caught, and _over acts on them
            os.read(self.signals.fd, 64)
        except BlockingIOError:
            pass


# --- what the run amounts to ---------------------------------------------------------------


def _verdict(end: _End, *, plan: LaunchPlan, logs: RunLogs) -> tuple[int, str]:
    """The exit status and the message (may be empty) for how the run ended."""
    status, message = _outcome(end, plan=plan, logs=logs)
    if end.lost_output:
        lost = f"the program's output could not be written ({end.lost_output})"
        if status == 0:
            return int(ExitStatus.OUTPUT_LOST), lost
        message = f"{message}; {lost}" if message else lost
    return status, message


def _outcome(end: _End, *, plan: LaunchPlan, logs: RunLogs) -> tuple[int, str]:
    console = f"console log: {logs.console}"
    if end.signal and end.signal == end.forwarded:
        return 128 + end.signal, (f"the program did not end within {plan.stop_timeout:g} s of signal "
                                  f"{end.signal} (resources.stop_timeout); the VM was stopped")
    if end.signal:
        return 128 + end.signal, ""
    if end.boot_timeout:
        return (
            int(ExitStatus.TIMEOUT),
            f"the guest did not start the program within {plan.boot_timeout:g} s; {console}",
        )
    if end.run_timeout:
        return (
            int(ExitStatus.TIMEOUT),
            f"the program did not finish within {plan.timeout:g} s; {console}",
        )
    if end.dead_daemon is not None:
        return _daemon_verdict(*end.dead_daemon, started=end.started, logs=logs)
    if end.qemu_status and not end.started:
        for vp, status in end.failed_daemons:  # QEMU cannot connect to a failed virtiofsd
            return _daemon_verdict(vp, status, started=False, logs=logs)
        line = _first_meaningful_line(logs.qemu)
        if line:
            return int(ExitStatus.HOST), f"QEMU failed: {line}; QEMU log: {logs.qemu}"
    outcome = interpret_status(end.report)
    return outcome.status, f"{outcome.message}; {console}" if outcome.message else ""


def _daemon_verdict(
    vp: VirtiofsdPlan, code: int, *, started: bool, logs: RunLogs
) -> tuple[int, str]:
    log = logs.virtiofsd(vp.tag)
    if code > 0 and not started:
        line = _first_meaningful_line(log) or f"exit status {code}"
        # The C virtiofsd needs root (it chroots into the share); 9p needs no daemon at all.
        hint = " (as an ordinary user, share over 9p: transport = \"9p\")" if os.geteuid() != 0 else ""
        return (
            int(ExitStatus.HOST),
            f"virtiofsd for share '{vp.tag}' could not start: {line}; log: {log}{hint}",
        )
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return (
        int(ExitStatus.VIRTIOFSD_DIED),
        f"virtiofsd for share '{vp.tag}' died while the VM ran ({how}); log: {log}",
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


def _say(fd: int, message: str) -> None:
    try:
        os.write(fd, f"microvmc: {message}\n".encode("utf-8", "surrogateescape"))
    except OSError:
        pass


# --- the processes and what they hold --------------------------------------------------------


@contextmanager
def _runtime_dir() -> Iterator[Path]:
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


def _bind(sock: socket.socket, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(os.fsencode(path)) < 100:
        sock.bind(str(path))
        return
    # sun_path holds 108 bytes; a long runtime directory is reached through its descriptor.
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.bind(f"/proc/self/fd/{dirfd}/{path.name}")
    finally:
        os.close(dirfd)


@contextmanager
def _virtiofsd(vp: VirtiofsdPlan, *, rundir: Path, log: Path) -> Iterator[Child]:
    """A virtiofsd serving on a socket bound here, so QEMU can connect at once."""
    with ExitStack() as stack:
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        stack.callback(os.close, log_fd)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        stack.callback(os.close, null)
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        _bind(sock, rundir / vp.socket)
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


@contextmanager
def _stdin_for_qemu(stdin: int) -> Iterator[int]:
    """What QEMU reads as the program's stdin.

    A terminal is not handed to QEMU: its stdio chardev would put it in raw mode, where Enter is
    `\r`, Ctrl-D is a byte rather than the end of input and Ctrl-C never reaches microvmc. Instead
    a thread copies the terminal, left in its normal mode, into a pipe: the user edits lines as
    usual, Ctrl-D ends the program's input and Ctrl-C stops the run. Anything else (pipe, file,
    socket, /dev/null) is passed as it is; its O_NONBLOCK, which QEMU sets on the shared open file,
    is put back afterwards."""
    with ExitStack() as stack:
        try:
            os.fstat(stdin)
        except OSError:  # closed: the program gets an empty stdin
            stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            stack.callback(os.close, stdin)
        if os.isatty(stdin):
            yield stack.enter_context(_terminal_relay(stdin))
            return
        flags = fcntl.fcntl(stdin, fcntl.F_GETFL)
        try:
            yield stdin
        finally:
            try:
                if fcntl.fcntl(stdin, fcntl.F_GETFL) != flags:
                    fcntl.fcntl(stdin, fcntl.F_SETFL, flags)
            except OSError:
                pass


@contextmanager
def _terminal_relay(tty: int) -> Iterator[int]:
    """The read end of a pipe fed from `tty` by a thread until end of input or the run's end."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    stop = threading.Event()

    def copy() -> None:
        try:
            while not stop.is_set():
                ready, _, _ = select.select([tty], [], [], RELAY_POLL)
                if not ready:
                    continue
                data = os.read(tty, 65536)
                if not data:  # Ctrl-D at the start of a line
                    break
                os.write(write_end, data)
        except OSError:  # the terminal hung up, or QEMU is gone
            pass
        finally:
            os.close(write_end)

    thread = threading.Thread(target=copy, name="microvmc-stdin", daemon=True)
    thread.start()
    try:
        yield read_end
    finally:
        stop.set()
        os.close(read_end)  # unblocks a write to a full pipe with EPIPE
        thread.join()


class _Closer:
    """Descriptors closed once, by whichever of several exits comes first."""

    def __init__(self, fds):
        self.fds = list(fds)

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


@contextmanager
def _qemu(
    plan: LaunchPlan, *, rundir: Path, stdin: int, logs: RunLogs
) -> Iterator[tuple[Child, dict[Fd, int], int]]:
    """QEMU with exactly the descriptors of `Fd`; yields it and the read ends of its outputs."""
    with ExitStack() as stack:
        opened = []
        for path in (logs.qemu, logs.console):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            stack.callback(os.close, fd)
            opened.append(fd)
        qemu_log, console = opened
        pipes = {kind: os.pipe() for kind in (Fd.STDOUT, Fd.STDERR, Fd.STATUS)}
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
            Fd.CONSOLE: console,
            Fd.CONTROL: control_read,
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
        yield child, {kind: r for kind, (r, _) in pipes.items()}, control_write


# --- signals -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Signals:
    caught: list[int] = field(default_factory=list)
    fd: int | None = None  # readable when a signal arrived (signal.set_wakeup_fd)


@contextmanager
def _stop_signals_caught() -> Iterator[_Signals]:
    """SIGINT, SIGTERM and SIGHUP are recorded instead of acted on, for the duration of the
    block, so the loop can stop the VM and clean up. Only the main thread can catch signals."""
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    previous: dict[int, object] = {}
    old_wakeup = -1
    try:
        old_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for number in STOP_SIGNALS:
            previous[number] = signal.signal(number, lambda n, _frame: signals.caught.append(n))
        signals.fd = read_end
        yield signals
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(old_wakeup)
        os.close(read_end)
        os.close(write_end)
