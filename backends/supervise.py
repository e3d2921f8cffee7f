"""Supervising a launched VM: one poll loop, an explicit state machine, no VMM specifics.

    created ──started──▶ running ──stop/signal──▶ stopping ──▶ stopped
       │  (held: `ready`, waiting for start)                      ▲
       └──────────── boot failed, timeout, crash, signal ─────────┘

Everything that can happen arrives in the loop as an event: a report of init on the status port, a
process (QEMU, a virtiofsd) ending, output to relay, a signal microvmc got, a request from the CLI
(start, signal, stop, resize: called by whoever owns the control socket, see backends/monitor.py).
What the loop saw is recorded in a `Seen`; compiler/verdict.py judges it once the loop is over.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import signal
import stat
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from microvmc.backends._signals import STOP_SIGNALS, Signals, signals_caught
from microvmc.backends.qemu import Vm
from microvmc.compiler.launch import Fd, LaunchPlan
from microvmc.compiler.status import parse_report
from microvmc.compiler.verdict import Seen

__all__ = ["State", "Supervisor", "Sink", "LogSink", "Signals", "signals_caught", "STOP_SIGNALS"]

VIRTIOFSD_GRACE_WITH_QEMU = 3.0  # a virtiofsd that ends cleanly: QEMU's shutdown, QEMU gets this long
# QEMU ending makes virtiofsd end too; a virtiofsd that ends on its own leaves QEMU running.
# This long, QEMU gets to show which of the two happened.
VIRTIOFSD_EXIT_GRACE = 0.5
SHUTDOWN_GRACE = 10.0  # seconds QEMU gets to end after init's final report (and our `drained`)
# Output init reported `sent` but that does not arrive for this long, while nothing holds our reading
# back, is given up on: init is told it was drained, so that a miscount cannot keep a VM up forever.
DRAIN_STALL = 10.0
EOF_GRACE = 5.0  # seconds after QEMU ended until its pipes must be at EOF
SINK_LIMIT = 1 << 20  # bytes kept for a slow reader before we stop reading from QEMU
READ_CHUNK = 1 << 16
WRITE_CHUNK = select.PIPE_BUF  # what a pipe that polls writable takes without blocking
# The console line init writes first thing (init/init.c): the host's mark `init` is when it arrives.
INIT_MARK = b"microvmc-init: started"


class State(StrEnum):
    CREATED = "created"  # booting, or booted and held until `start`
    RUNNING = "running"  # the program runs
    STOPPING = "stopping"  # the program was asked to end (stop_timeout runs), or the VM is shutting down
    STOPPED = "stopped"


# --- where the program's output goes ----------------------------------------------------------


class Sink:
    """A descriptor of the caller's, fed without ever blocking the loop (no O_NONBLOCK is set on it:
    it may be a terminal others share; a pollable one gets at most PIPE_BUF bytes per writable event)."""

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


class LogSink(Sink):
    """A log file of a detached run: binary-exact, at most `max_size` bytes per file; when full it
    becomes NAME.1 (NAME.1 becomes NAME.2, ...) and at most `max_files` files are kept in all."""

    def __init__(self, path: Path, *, max_size: int, max_files: int):
        self.path = Path(path)
        self.max_size = max_size
        self.max_files = max(1, max_files)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        super().__init__(fd)
        self.size = os.fstat(fd).st_size

    def push(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.broken:
            room = self.max_size - self.size if self.max_size > 0 else len(view)
            if room <= 0:
                self._rotate()
                continue
            self.pending += view[:room]
            view = view[room:]
            taken = len(self.pending)
            while self.pending and self.write():
                pass
            self.size += taken - len(self.pending)

    def _rotate(self) -> None:
        os.close(self.fd)
        if self.max_files == 1:
            os.truncate(self.path, 0)
        else:
            for n in range(self.max_files - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                newer = self.path if n == 1 else self.path.with_name(f"{self.path.name}.{n - 1}")
                if newer.exists():
                    os.replace(newer, older)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.size = 0

    def close(self) -> None:
        os.close(self.fd)


# --- the loop ----------------------------------------------------------------------------------


Callback = Callable[[int], None]  # called with the selector's event mask


class Supervisor:
    """The one loop of a run: a poll over QEMU's pipes, the outputs, the pidfds of every process,
    the signal pipe and whatever an owner added with `watch`, bounded by the deadline that applies
    at the moment."""

    def __init__(
        self,
        *,
        plan: LaunchPlan,
        vm: Vm,
        sinks: dict[Fd, Sink],
        status_file,
        signals: Signals,
        began: float,
        hold: bool = False,
        stdin_relay: tuple[int, int] | None = None,
        terminal: int | None = None,
        forward_signals: bool = True,
    ):
        self.began = began
        self.plan = plan
        self.vm = vm
        self.hold = hold
        self.readers = dict(vm.readers)  # pipe read ends not at EOF yet: STDOUT, STDERR, STATUS, CONSOLE
        self.seen_signals = 0  # how many of signals.caught have been acted on
        self.sinks = sinks
        self.status_file = status_file
        self.signals = signals
        self.forward_signals = forward_signals
        self.terminal = terminal  # its size goes to the guest now and on every SIGWINCH
        self.relay = list(stdin_relay) if stdin_relay else None  # [source, pipe write end]: stdin copied
        self.seen = Seen()
        self.seen.host["qemu"] = time.monotonic() - began
        self.state = State.CREATED
        self.listeners: list[Callable[[State], None]] = []  # told of every state change
        self.status_buffer = b""
        self.console_tail = b""  # the console's last bytes, while init's mark is awaited
        self.selector = selectors.PollSelector()
        self.watched: dict[int, int] = {}  # fds _watch registered, and for what
        self.extra: dict[int, tuple[int, Callback]] = {}  # fds an owner registered with watch()
        # Called before every poll: more fds to wait on, as their owner wants them now (the channel's).
        self.providers: list[Callable[[], dict[int, tuple[int, Callback]]]] = []
        self.closed: set[Fd] = set()  # outputs whose reader went away, as init has been told
        self.pending_stop: float | None = None  # a stop requested while booting or held
        self.received = {Fd.STDOUT: 0, Fd.STDERR: 0}  # bytes read from QEMU's pipes
        self.undrained: dict[Fd, int] = {}  # init's `sent` counts not yet acknowledged with `drained`
        self.reported = False  # init's final report is in
        start = time.monotonic()
        # A held VM waits for `start` as long as the caller likes: the boot deadline is for `ready`.
        self.boot_deadline = start + plan.boot_timeout if plan.boot_timeout > 0 else None
        self.run_deadline = start + plan.timeout if plan.timeout > 0 and not hold else None
        self.shutdown_deadline: float | None = None  # set by the final report
        self.stop_deadline: float | None = None  # set when a signal was sent to the program
        self.eof_deadline: float | None = None  # set when QEMU has ended
        self.drain_deadline: float | None = None  # while init waits for `drained`: pushed on by progress

    # --- what owners call ---

    def watch(self, fd: int, events: int, callback: Callback) -> None:
        self.extra[fd] = (events, callback)

    def unwatch(self, fd: int) -> None:
        self.extra.pop(fd, None)

    def control(self, line: str) -> bool:
        """A request to init (init/PROTOCOL.md, control port); False if the port is gone or full."""
        try:
            os.write(self.vm.control, line.encode("ascii") + b"\n")
            return True
        except OSError:
            return False

    def start(self) -> bool:
        """Run a held program. False once it is past that."""
        if self.state is not State.CREATED or not self.hold:
            return False
        if self.control("start"):
            self.hold = False
            if self.plan.timeout > 0:
                self.run_deadline = time.monotonic() + self.plan.timeout
            return True
        return False

    def send_signal(self, number: int) -> bool:
        """A signal for the program, through init; False when the program does not run."""
        if self.state not in (State.RUNNING, State.STOPPING) or self.seen.qemu_status is not None:
            return False
        return self.control(f"signal {number}")

    def request_stop(self, timeout: float) -> None:
        """SIGTERM to the program; after `timeout` seconds (or at once, if it does not run), the VM is
        stopped."""
        seen = self.seen
        if self.state is State.STOPPED or seen.signal:
            return
        seen.stop_requested = True
        if self.state is State.RUNNING and timeout > 0 and self.send_signal(signal.SIGTERM):
            seen.forwarded = signal.SIGTERM
            seen.host["signal-sent"] = time.monotonic() - self.began
            self.stop_deadline = time.monotonic() + timeout
            self._enter(State.STOPPING)
        elif self.state is not State.STOPPING:
            seen.signal = signal.SIGTERM

    def resize(self, rows: int, cols: int) -> None:
        self.control(f"resize {rows} {cols}")

    # --- the loop ---

    def run(self) -> Seen:
        try:
            for fd in self.readers.values():
                os.set_blocking(fd, False)
            self.selector.register(self.vm.qemu.pidfd, selectors.EVENT_READ, lambda _: self._qemu_ended())
            for vp, child in self.vm.daemons:
                self.selector.register(child.pidfd, selectors.EVENT_READ,
                                       lambda _, vp=vp, child=child: self._daemon_ended(vp.tag, child))
            if self.signals.fd is not None:
                self.selector.register(self.signals.fd, selectors.EVENT_READ, lambda _: self._drain_signal_pipe())
            if self.terminal is not None:
                self._send_size()
            self._loop()
            return self.seen
        finally:
            self.selector.close()
            if self.relay is not None and self.relay[1] >= 0:
                os.close(self.relay[1])
                self.relay[1] = -1
            self._enter(State.STOPPED)

    def _enter(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            for listener in list(self.listeners):
                listener(state)

    def _loop(self) -> None:
        while not self._over(time.monotonic()):
            self._watch()
            deadlines = [d for d in (self.boot_deadline, self.run_deadline, self.shutdown_deadline,
                                     self.stop_deadline, self.eof_deadline, self.drain_deadline) if d is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, events in self.selector.select(timeout):
                key.data(events)

    def _over(self, now: float) -> bool:
        """Whether the loop is done; records why in self.seen."""
        seen = self.seen
        for number in self.signals.caught[self.seen_signals:]:
            self.seen_signals += 1
            if number == signal.SIGWINCH:
                self._send_size()
            elif not seen.signal and not self._forward(number):
                seen.signal = number
        if seen.signal:
            pass
        elif self.stop_deadline is not None and now >= self.stop_deadline:
            seen.signal = seen.forwarded  # the program did not end in time: the VM is stopped
            seen.stop_timed_out = True
        elif self.boot_deadline is not None and now >= self.boot_deadline:
            seen.boot_timeout = True
        elif self.run_deadline is not None and now >= self.run_deadline:
            seen.run_timeout = True
        elif seen.dead_daemon is not None:
            pass
        elif self.drain_deadline is not None and now >= self.drain_deadline:
            self._acknowledge(force=True)  # (the loop goes on: QEMU now ends)
            return False
        elif self.shutdown_deadline is not None and now >= self.shutdown_deadline:
            pass  # the report is in but QEMU does not end: it gets stopped, the report stands
        elif seen.qemu_status is not None:
            if self.eof_deadline is not None and now >= self.eof_deadline:
                self._forget_readers()  # something QEMU started holds the pipes open
            return not self.readers and all(not s.pending or s.broken for s in self.sinks.values())
        else:
            return False
        self._enter(State.STOPPING)
        return True

    def _forward(self, number: int) -> bool:
        """Send the program the first stop signal once it runs, so that it can end in its own way;
        a second signal, or one during boot, stops the VM."""
        seen = self.seen
        if (not self.forward_signals or self.state is not State.RUNNING or seen.forwarded
                or self.reported or self.plan.stop_timeout <= 0):
            return False
        if not self.send_signal(number):
            return False
        seen.forwarded = number
        seen.host["signal-sent"] = time.monotonic() - self.began
        self.stop_deadline = time.monotonic() + self.plan.stop_timeout
        self._enter(State.STOPPING)
        return True

    def _send_size(self) -> None:
        from microvmc.backends.terminal import size

        rows, cols = size(self.terminal) if self.terminal is not None else (0, 0)
        if rows and cols:
            self.resize(rows, cols)

    def _watch(self) -> None:
        """(Un)register pipes and sinks for what each waits for now: a reader pauses while its sink
        is full, a sink is watched only while it holds data."""
        wanted: dict[int, tuple[int, Callback]] = dict(self.extra)
        for provide in self.providers:
            wanted.update(provide())
        self._acknowledge()
        for kind, sink in self.sinks.items():
            if sink.broken and kind not in self.closed:
                # The reader went away: init closes the program's end too, so it gets EPIPE (SIGPIPE).
                self.closed.add(kind)
                self.control(f"close {kind.name.lower()}")
        for sink in self.sinks.values():
            if sink.pending and sink.pollable and not sink.broken:
                wanted[sink.fd] = (selectors.EVENT_WRITE, lambda _, sink=sink: sink.write())
        for kind, fd in self.readers.items():
            sink = self.sinks.get(kind)
            if sink is None or not sink.full:
                wanted[fd] = (selectors.EVENT_READ, lambda _, kind=kind: self._read(kind))
        if self.relay is not None and self.relay[1] >= 0:
            wanted[self.relay[0]] = (selectors.EVENT_READ, lambda _: self._relay_stdin())
        for fd in [fd for fd in self.watched if fd not in wanted]:
            self.selector.unregister(fd)
            del self.watched[fd]
        for fd, (events, callback) in wanted.items():
            if fd not in self.watched:
                self.selector.register(fd, events, callback)
            else:
                self.selector.modify(fd, events, callback)
            self.watched[fd] = events

    def _relay_stdin(self) -> None:
        """A terminal's input, copied into QEMU's stdin pipe: its end of input (Ctrl-D in cooked mode)
        is the program's; with -t (raw mode), every byte, Ctrl-C included, is the guest terminal's."""
        assert self.relay is not None
        source, pipe = self.relay
        try:
            data = os.read(source, WRITE_CHUNK)
        except OSError:
            data = b""
        if data:
            try:
                os.write(pipe, data)  # blocking: the guest reads its stdin port as fast as the user types
                return
            except OSError:
                pass
        os.close(pipe)
        self.relay[1] = -1

    def _acknowledge(self, force: bool = False) -> None:
        """`drained` for each stream of which every byte init `sent` has been read: only then may init
        end the VM (QEMU drops what it still holds). The shutdown grace starts once both are told."""
        now = time.monotonic()
        if self.drain_deadline is not None and any(s.full for s in self.sinks.values()):
            self.drain_deadline = now + DRAIN_STALL  # our caller's reader holds us back: not a stall
        for kind, count in list(self.undrained.items()):
            if (force or self.received[kind] >= count) and self.control(f"drained {kind.name.lower()}"):
                del self.undrained[kind]
        if self.reported and not self.undrained and self.shutdown_deadline is None and self.seen.qemu_status is None:
            self.drain_deadline = None
            self.shutdown_deadline = now + SHUTDOWN_GRACE

    def _forget_readers(self) -> None:
        self.readers.clear()  # closed by launch(); _watch unregisters them

    def _read(self, kind: Fd) -> None:
        fd = self.readers.get(kind)
        if fd is None:
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        if not data:
            del self.readers[kind]
            return
        if kind == Fd.STATUS:
            self._status(data)
        elif kind == Fd.CONSOLE:
            self._console(data)
        else:
            self.received[kind] += len(data)
            if self.drain_deadline is not None:
                self.drain_deadline = time.monotonic() + DRAIN_STALL
            self.sinks[kind].push(data)

    def _status(self, data: bytes) -> None:
        self.status_file.write(data)
        self.status_file.flush()
        self.seen.report += data.decode("ascii", "replace")
        *lines, self.status_buffer = (self.status_buffer + data).split(b"\n")
        now = time.monotonic()
        for line in lines:
            report = parse_report(line.decode("ascii", "replace"))
            if report.kind == "time":
                self.seen.guest[report.stage] = report.number
            elif report.kind == "ready":
                self.seen.ready = True
                self.seen.host["ready"] = now - self.began
                self.boot_deadline = None
                for listener in list(self.listeners):
                    listener(self.state)
            elif report.kind == "started":
                self.seen.started = True
                self.seen.host["started"] = now - self.began
                self.boot_deadline = None
                self._enter(State.RUNNING)
            elif report.kind == "sent" and report.stage in ("stdout", "stderr"):
                self.undrained[Fd[report.stage.upper()]] = report.number
            elif report.final and not self.reported:
                self.seen.host["reported"] = now - self.began
                self.reported = True
                self.boot_deadline = self.stop_deadline = None
                if self.undrained:  # init waits for `drained` first (_acknowledge)
                    self.drain_deadline = now + DRAIN_STALL
                else:
                    self.shutdown_deadline = now + SHUTDOWN_GRACE
                self._enter(State.STOPPING)

    def _console(self, data: bytes) -> None:
        """The guest console, into the run's console log. Its lines are the host's marks of the boot
        that the guest's clock cannot see: the kernel's first message (`kernel`), and init's first
        line (`init`)."""
        now = time.monotonic() - self.began
        view = memoryview(data)
        while view:
            view = view[os.write(self.vm.console_log, view):]
        host = self.seen.host
        if "kernel" not in host and not (self.console_tail + data).startswith(INIT_MARK):
            host["kernel"] = now
        if "init" not in host:
            seen = self.console_tail + data
            if INIT_MARK in seen:
                host["init"] = now
            self.console_tail = seen[-len(INIT_MARK):]

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
        self.seen.qemu_status = self.vm.qemu.exited()
        if self.seen.qemu_status is None:
            return
        self.seen.host["qemu-exited"] = time.monotonic() - self.began
        self.selector.unregister(self.vm.qemu.pidfd)
        self.boot_deadline = self.shutdown_deadline = self.stop_deadline = self.run_deadline = None
        self.drain_deadline = None
        self.eof_deadline = time.monotonic() + EOF_GRACE
        self._drain_status()
        failed = []
        for vp, child in self.vm.daemons:  # from now on they end with QEMU's connection
            if child.pidfd in self.selector.get_map():
                self.selector.unregister(child.pidfd)
            if child.exited():
                failed.append((vp.tag, child.exited()))
        self.seen.failed_daemons = tuple(failed)
        self._enter(State.STOPPING)

    def _daemon_ended(self, tag: str, child) -> None:
        status = child.exited()
        if status is None or child.pidfd not in self.selector.get_map():
            return  # (QEMU's end, seen in the same poll, has already accounted for the daemon)
        self.selector.unregister(child.pidfd)
        self._drain_status()
        if self.reported:
            return  # the final report is in: the guest is shutting down
        # A clean exit is what QEMU's shutdown causes (it closes the connection first): give QEMU longer.
        if self.vm.qemu.wait(VIRTIOFSD_EXIT_GRACE if status else VIRTIOFSD_GRACE_WITH_QEMU) is not None:
            return  # QEMU ended too (its pidfd event is next): the daemon followed it
        self.seen.dead_daemon = (tag, status)

    def _drain_signal_pipe(self) -> None:
        assert self.signals.fd is not None
        try:  # only drained: the handler recorded the signals in signals.caught, and _over acts on them
            os.read(self.signals.fd, 64)
        except BlockingIOError:
            pass
