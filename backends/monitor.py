"""The monitor of a run: the one process that owns a VM (QEMU, its virtiofsds), the program's
streams and its final status, and answers requests on the run's control socket.

    CLI ──control.sock (JSON lines, fds by SCM_RIGHTS)──▶ monitor ──launch──▶ virtiofsd, QEMU
                                                             │ supervise (backends/supervise.py)
                                                             └ judge (compiler/verdict.py)

A detached run (`run -d`, the OCI runtime) gets a monitor of its own: a double-forked daemon in its
own session that writes the program's output to log files and exits with the program's status. A
foreground `run` *is* its monitor: the caller's descriptors go to QEMU as they are (three
binary-clean streams, no copy through another process), its signals are the run's signals, and no
second process can die on its own; it serves the same socket, so `ps`, `exec`, `stop` and `kill`
work on it as on a detached run.

Requests (one JSON object a line; the answer is one JSON object a line):

    {"op": "state"}                         → {"state": ..., "pid": ..., "status": ...}
    {"op": "start"}                         → {"ok": true|false}            (a held run)
    {"op": "signal", "signal": N}           → {"ok": ...}                   (to the program)
    {"op": "stop", "timeout": S}            → {"ok": true}                  (SIGTERM, then the VM stops)
    {"op": "resize", "rows": R, "cols": C}  → {"ok": true}
    {"op": "wait"}                          → {"status": N, "message": ...} once the run has ended
    {"op": "exec", "process": {...}} + 3 fds → {"session": N}, later {"status": N, "message": ...};
        the connection then takes {"op": "signal"|"resize", ...} for that process; closing it early
        kills the process.
    {"op": "attach", "stdin": B} + 2 or 3 fds (stdout, stderr[, stdin])
                                            → {"ok": true, "tty": T}; the program's output from now on
        goes to these too, later {"status": N, "message": ...} when the run ends, or {"detached": true}
        (Ctrl-P Ctrl-Q on a terminal); `stdin` is taken only from one client at a time and only when
        the run keeps its stdin open (`run -d -i` or `-t`); its end closes the program's stdin (not
        with a terminal). Closing the connection detaches; the run goes on.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

TYPE_CHECKING = False  # (not typing's: `microvmc run` imports this while the guest boots; typing is ~2 ms of CPU)
if TYPE_CHECKING:
    from typing import Any

from microvmc.backends._unix import bind, connect
from microvmc.backends.qemu import RunLogs, Started, launch, program_stdin, read_logs, runtime_dir, sweep_runtime_dirs
from microvmc.backends.runstore import Run, RunStateError, RunStore, utc_now as _now
from microvmc.backends.supervise import STOP_SIGNALS, LogSink, Signals, Sink, State, Supervisor, signals_caught
from microvmc.compiler.launch import Fd, LaunchPlan, ProcessSpec
from microvmc.compiler.verdict import Verdict, judge, timeline_record, timeline_summary
from microvmc.errors import ExitStatus, MicrovmcError

__all__ = ["LogLimits", "serve", "run_plan", "start_detached", "controlling_terminal", "Client"]

REQUEST_LIMIT = 1 << 16  # bytes of one request line
MAX_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class LogLimits:
    """A detached run's stdout.log and stderr.log: each at most `max_size` bytes (0: no limit), then
    rotated, `max_files` files kept in all. The defaults are the plan's (the schema's logs.*)."""

    max_size: int
    max_files: int


def _say(fd: int, message: str) -> None:
    try:
        os.write(fd, f"microvmc: {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass


# --- the control socket ------------------------------------------------------------------------


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbuf = b""
        self.fds: list[int] = []
        self.session = None  # an exec session this connection owns
        self.closed = False

    def send(self, answer: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(2.0)  # a client that does not read does not stall the VM
            self.sock.sendall(json.dumps(answer).encode() + b"\n")
            self.sock.setblocking(False)
        except OSError:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
            for fd in self.fds:
                os.close(fd)
            self.fds.clear()


class _Server:
    """The run's control socket, served from the supervision loop."""

    def __init__(self, path: Path, monitor: "_Monitor"):
        self.path = path
        self.monitor = monitor
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        bind(self.sock, path)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.conns: list[_Conn] = []

    def wanted(self) -> dict[int, tuple[int, Callable[[int], None]]]:
        want: dict[int, tuple[int, Callable[[int], None]]] = {}
        if len(self.conns) < MAX_CONNECTIONS:
            want[self.sock.fileno()] = (selectors.EVENT_READ, lambda _: self._accept())
        for conn in self.conns:
            if not conn.closed:
                want[conn.sock.fileno()] = (selectors.EVENT_READ, lambda _, c=conn: self._readable(c))
        self.conns = [c for c in self.conns if not c.closed]
        return want

    def _accept(self) -> None:
        try:
            sock, _ = self.sock.accept()
        except OSError:
            return
        uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid not in (0, os.getuid()):  # the socket is 0600 in a 0700 directory; this is belt and braces
            sock.close()
            return
        sock.setblocking(False)
        self.conns.append(_Conn(sock))

    def _readable(self, conn: _Conn) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(conn.sock, 1 << 16, 3)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        conn.fds += fds
        if not data:
            self.monitor.disconnected(conn)
            conn.close()
            return
        conn.inbuf += data
        while b"\n" in conn.inbuf and not conn.closed:
            line, conn.inbuf = conn.inbuf.split(b"\n", 1)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                conn.send({"error": f"bad request: {e}"})
                conn.close()
                return
            self.monitor.handle(conn, request)
        if len(conn.inbuf) > REQUEST_LIMIT:
            conn.send({"error": "request too long"})
            conn.close()

    def close(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass
        self.sock.close()
        for conn in self.conns:
            conn.close()


# --- attached clients --------------------------------------------------------------------------


DETACH_KEYS = b"\x10\x11"  # Ctrl-P Ctrl-Q, as docker attach
FLUSH_AT_END = 5.0  # seconds attached clients get to take the last output before the status


class _Fanout:
    """A program stream's sink (log file or caller's descriptor) and the clients attached to it. The
    supervisor sees only the sink; an attached client is fed from the same data and sets the pace
    too (the guest's port is read only while everyone has room), so none of them loses output."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self.attached: list[Sink] = []

    @property
    def fd(self) -> int:
        return self.sink.fd

    @property
    def pending(self) -> bytearray:
        return self.sink.pending

    @property
    def pollable(self) -> bool:
        return self.sink.pollable

    @property
    def broken(self) -> bool:
        return self.sink.broken

    @property
    def error(self) -> OSError | None:
        return self.sink.error

    @property
    def full(self) -> bool:
        return self.sink.full or any(s.full for s in self.attached if not s.broken)

    def push(self, data: bytes) -> None:
        self.sink.push(data)
        for sink in self.attached:
            sink.push(data)

    def write(self) -> bool:
        return self.sink.write()


class _Attachment:
    """One `attach` connection: its output descriptors, fed by the fan-outs, and maybe its stdin."""

    def __init__(self, conn: _Conn, outputs: dict[Fd, Sink], stdin: int | None):
        self.conn = conn
        self.outputs = outputs
        self.stdin = stdin


class _Input:
    """The program's stdin of a detached run that keeps it open (`run -d -i`, `-t`): a pipe whose write
    end the monitor holds; an attached client's stdin is copied into it, without ever blocking the loop."""

    def __init__(self, fd: int, *, tty: bool):
        os.set_blocking(fd, False)
        self.fd = fd
        self.tty = tty
        self.pending = b""
        self.held = b""  # a Ctrl-P that may start the detach keys
        self.source: _Attachment | None = None

    def wanted(self, detach: Callable[[_Attachment], None]) -> dict[int, tuple[int, Callable[[int], None]]]:
        if self.fd < 0:
            return {}
        if self.pending:
            return {self.fd: (selectors.EVENT_WRITE, lambda _: self._write())}
        if self.source is not None and self.source.stdin is not None:
            return {self.source.stdin: (selectors.EVENT_READ, lambda _, a=self.source: self._read(a, detach))}
        return {}

    def _read(self, attachment: _Attachment, detach: Callable[[_Attachment], None]) -> None:
        try:
            data = os.read(attachment.stdin, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.source = None
            if not self.tty:  # the client's end of input is the program's
                self.close()
            return
        if self.tty:
            data, self.held = self.held + data, b""
            if DETACH_KEYS in data:
                self.pending += data[:data.index(DETACH_KEYS)]
                self.source = None
                detach(attachment)
                return
            if data.endswith(DETACH_KEYS[:1]):
                data, self.held = data[:-1], data[-1:]
        self.pending += data

    def _write(self) -> None:
        try:
            written = os.write(self.fd, self.pending)
        except BlockingIOError:
            return
        except OSError:  # the guest's side is gone: what was typed goes nowhere
            self.pending = b""
            return
        self.pending = self.pending[written:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.pending = b""


def _flush(sinks: list[Sink], deadline: float) -> None:
    """Write what attached clients still have pending, until `deadline`."""
    while True:
        waiting = [s for s in sinks if s.pending and not s.broken]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            return
        _, writable, _ = select.select([], [s.fd for s in waiting], [], left)
        for sink in waiting:
            if sink.fd in writable:
                sink.write()


# --- the monitor -------------------------------------------------------------------------------


class _Monitor:
    """Requests → the supervisor and the exec channel."""

    def __init__(self, supervisor: Supervisor, *, stop_timeout: float, outputs: dict[Fd, _Fanout],
                 stdin: _Input | None = None, tty: bool = False):
        self.sup = supervisor
        self.stop_timeout = stop_timeout
        self.channel = None
        self.waiters: list[_Conn] = []
        self.verdict: Verdict | None = None
        self.outputs = outputs
        self.input = stdin
        self.tty = tty
        self.attached: list[_Attachment] = []

    def state(self) -> str:
        state = self.sup.state
        return "stopped" if state is State.STOPPED else "running" if state in (State.RUNNING, State.STOPPING) \
            else "created"

    def handle(self, conn: _Conn, request: dict[str, Any]) -> None:
        op = request.get("op")
        sup = self.sup
        try:
            if op == "state":
                conn.send({"state": self.state(), "pid": os.getpid(), "qemu_pid": sup.vm.qemu.pid,
                           "ready": sup.seen.ready, "started": sup.seen.started, "status": None})
            elif op == "start":
                conn.send({"ok": sup.start()})
            elif op == "signal":
                number = _signal_number(request.get("signal"))
                if conn.session is not None:
                    self.channel.signal(conn.session, number)
                    conn.send({"ok": True})
                else:
                    conn.send({"ok": sup.send_signal(number)})
            elif op == "stop":
                timeout = request.get("timeout", self.stop_timeout)
                if not isinstance(timeout, (int, float)) or timeout < 0:
                    raise ValueError(f"bad timeout {timeout!r}")
                sup.request_stop(float(timeout))
                conn.send({"ok": True})
            elif op == "resize":
                rows, cols = int(request["rows"]), int(request["cols"])
                if not (0 < rows < 65536 and 0 < cols < 65536):
                    raise ValueError(f"bad size {rows}x{cols}")
                if conn.session is not None:
                    self.channel.resize(conn.session, rows, cols)
                else:
                    sup.resize(rows, cols)
                conn.send({"ok": True})
            elif op == "wait":
                self.waiters.append(conn)
            elif op == "exec":
                self._exec(conn, request)
            elif op == "attach":
                self._attach(conn, bool(request.get("stdin")))
            else:
                conn.send({"error": f"unknown request {op!r}"})
        except (KeyError, TypeError, ValueError) as e:
            conn.send({"error": f"bad {op} request: {e}"})

    def _exec(self, conn: _Conn, request: dict[str, Any]) -> None:
        if conn.session is not None or len(conn.fds) != 3:
            conn.send({"error": "exec needs three descriptors: stdin, stdout, stderr"})
            conn.close()
            return
        if self.sup.state is State.STOPPED or self.sup.seen.qemu_status is not None or (
                not self.sup.seen.started and not self.sup.seen.ready):
            conn.send({"error": "the run is not running" if self.sup.seen.started or self.sup.seen.ready
                       else "the run has not booted yet"})
            conn.close()
            return
        spec = ProcessSpec.from_dict(request["process"])
        if not spec.argv:
            raise ValueError("no command")
        channel = self._channel()
        if channel is None:
            conn.send({"error": "the VM's exec channel is not available"})
            conn.close()
            return
        stdin, stdout, stderr = conn.fds
        conn.fds = []

        def ended(status: int, message: str) -> None:
            conn.session = None
            conn.send({"status": status, "message": message})
            conn.close()

        conn.session = channel.open(spec, stdin, stdout, stderr, ended)
        conn.send({"session": conn.session.id})

    def _attach(self, conn: _Conn, stdin: bool) -> None:
        if conn.session is not None or any(a.conn is conn for a in self.attached) \
                or len(conn.fds) != (3 if stdin else 2):
            conn.send({"error": "attach needs two descriptors (stdout, stderr), and stdin third if asked for"})
            conn.close()
            return
        if stdin and self.input is None:
            conn.send({"error": "the run's stdin is closed: start it with -i or -t to attach to its input"})
            conn.close()
            return
        if stdin and self.input.source is not None:
            conn.send({"error": "another client is attached to the run's input"})
            conn.close()
            return
        fds, conn.fds = conn.fds, []
        sinks = {Fd.STDOUT: Sink(fds[0]), Fd.STDERR: Sink(fds[1])}
        attachment = _Attachment(conn, sinks, fds[2] if stdin else None)
        if attachment.stdin is not None:
            os.set_blocking(attachment.stdin, False)
            self.input.source = attachment
        self.attached.append(attachment)
        for kind, sink in sinks.items():
            self.outputs[kind].attached.append(sink)
        conn.send({"ok": True, "tty": self.tty})

    def _detach(self, attachment: _Attachment, *, say: dict[str, Any] | None = None) -> None:
        if attachment not in self.attached:
            return
        self.attached.remove(attachment)
        if self.input is not None and self.input.source is attachment:
            self.input.source = None
        for kind, sink in attachment.outputs.items():
            self.outputs[kind].attached.remove(sink)
        if say is not None:
            attachment.conn.send(say)
        attachment.conn.close()
        for fd in {*(s.fd for s in attachment.outputs.values()), attachment.stdin} - {None}:
            os.close(fd)

    def _channel(self):
        from microvmc.backends.channel import Channel

        if self.channel is None or self.channel.broken:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                connect(sock, self.sup.vm.rundir / "channel.sock")
            except OSError:
                sock.close()
                return None
            if not self.sup.control("channel"):
                sock.close()
                return None
            self.channel = Channel(sock)
        return self.channel

    def disconnected(self, conn: _Conn) -> None:
        """The client went away: an exec it ran is killed (as a closed terminal would); an attached
        client is detached."""
        if conn in self.waiters:
            self.waiters.remove(conn)
        if conn.session is not None and self.channel is not None:
            self.channel.signal(conn.session, signal.SIGKILL)
        for attachment in [a for a in self.attached if a.conn is conn]:
            self._detach(attachment)

    def wanted(self) -> dict[int, tuple[int, Callable[[int], None]]]:
        want = self.channel.wanted() if self.channel is not None else {}
        for attachment in list(self.attached):
            if any(s.broken for s in attachment.outputs.values()):  # its reader went away
                self._detach(attachment)
                continue
            for sink in attachment.outputs.values():
                if sink.pending and sink.pollable:
                    want[sink.fd] = (selectors.EVENT_WRITE, lambda _, sink=sink: sink.write())
        if self.input is not None:
            want.update(self.input.wanted(lambda a: self._detach(a, say={"detached": True})))
        return want

    def ended(self, verdict: Verdict) -> None:
        self.verdict = verdict
        if self.channel is not None:
            self.channel.close()
        if self.input is not None:
            self.input.close()
        _flush([s for a in self.attached for s in a.outputs.values()], time.monotonic() + FLUSH_AT_END)
        for attachment in list(self.attached):
            self._detach(attachment, say={"status": verdict.status, "message": verdict.message})
        for conn in self.waiters:
            conn.send({"status": verdict.status, "message": verdict.message})
            conn.close()
        self.waiters.clear()


def _signal_number(value: Any) -> int:
    number = int(value)
    if not 0 < number < 65:
        raise ValueError(f"bad signal {value!r}")
    return number


# --- a run -------------------------------------------------------------------------------------


def serve(
    plan: LaunchPlan,
    *,
    logs: RunLogs,
    stdin: int = 0,
    stdout: int | None = 1,
    stderr: int | None = 2,
    run: Run | None = None,
    hold: bool = False,
    terminal: int | None = None,
    log_limits: LogLimits | None = None,
    say: int = 2,
    verbose: bool = False,
    booting: Callable[[], None] | None = None,
    on_state: Callable[[State, Supervisor], None] | None = None,
    signal_numbers: tuple[int, ...] = STOP_SIGNALS,
    input: int | None = None,
    tty: bool = False,
    started: Started | None = None,
    signals: Signals | None = None,
    began: float | None = None,
) -> Verdict:
    """Launch, supervise and judge one run; the verdict is also in `run`'s record.

    `started`: the VM was started already (qemu.start, reading `stdin`, which the caller prepared
    with qemu.program_stdin) with the `signals` caught since `began` (its time.monotonic()): it is
    adopted, supervised and stopped as one launched here would be.

    `input`: the write end of the pipe `stdin` reads (a detached run that keeps its stdin open), which
    attached clients' stdin is copied into; `tty`: the program has a pty (their input is a terminal's).

    `stdout`/`stderr` None: the program's output goes to stdout.log/stderr.log in `logs.dir`, within
    `log_limits`. `terminal`: the program has a pty (MVMC_TTY); this descriptor's size is its size,
    and SIGWINCH passes a new one on. `on_state` is told of every state change (and of `ready`).
    Raises HostError if QEMU or a virtiofsd cannot be executed at all."""
    began = time.monotonic() if began is None else began
    if verbose:
        shared = ", ".join(f"{tag} over {transport}" for tag, transport in plan.transports)
        _say(say, f"accel {plan.accel} ({plan.accel_reason}); {shared or 'no shares'}; logs in {logs.dir}")
    numbers = signal_numbers + ((signal.SIGWINCH,) if terminal is not None else ())
    limits = log_limits or LogLimits(max_size=plan.log_max_size, max_files=plan.log_max_files)
    caught = nullcontext(signals) if signals is not None else signals_caught(numbers)
    with caught as signals, ExitStack() as stack:
        sinks: dict[Fd, _Fanout] = {}
        for kind, fd, name in ((Fd.STDOUT, stdout, "stdout.log"), (Fd.STDERR, stderr, "stderr.log")):
            if fd is None:
                sink = LogSink(logs.dir / name, max_size=limits.max_size, max_files=limits.max_files)
                stack.callback(sink.close)
            else:
                sink = Sink(fd)
            sinks[kind] = _Fanout(sink)
        program_input = None if input is None else _Input(input, tty=tty)
        if program_input is not None:
            stack.callback(program_input.close)
        if started is None:
            qemu_stdin, relay = stack.enter_context(program_stdin(stdin, terminal is not None))
        else:
            qemu_stdin, relay = stdin, None
        status_file = stack.enter_context(open(logs.status, "wb"))
        monitor = None
        with ExitStack() as vm_stack:
            if run is not None:
                rundir = run.dir / "vm"
                rundir.mkdir(mode=0o700, exist_ok=True)
                vm_stack.callback(_rmtree, rundir)
            elif started is not None:
                rundir = started.rundir  # the caller's, who removes it
            else:
                rundir = vm_stack.enter_context(runtime_dir())
            try:
                vm = vm_stack.enter_context(launch(plan, logs=logs, stdin=qemu_stdin, rundir=rundir, started=started))
            except BaseException:
                if relay is not None:
                    os.close(relay[1])
                raise
            sweep_runtime_dirs()  # while the VM boots: what runs killed earlier left behind
            if booting is not None:
                booting()
            supervisor = Supervisor(plan=plan, vm=vm, sinks=sinks, status_file=status_file, signals=signals,
                                    began=began, hold=hold, stdin_relay=relay, terminal=terminal)
            if started is not None:
                supervisor.seen.host["qemu"] = started.at - began
            monitor = _Monitor(supervisor, stop_timeout=plan.stop_timeout, outputs=sinks,
                               stdin=program_input, tty=tty)
            if run is not None:
                server = _Server(run.socket, monitor)
                stack.callback(server.close)  # answers until the verdict is in the record
                supervisor.providers.append(server.wanted)
            supervisor.providers.append(monitor.wanted)
            if on_state is not None:
                supervisor.listeners.append(lambda state: on_state(state, supervisor))
            seen = supervisor.run()
            seen.lost_output = ", ".join(dict.fromkeys(
                f"{kind.name.lower()}: {sink.error.strerror}" for kind, sink in sinks.items() if sink.error))
            if len(signals.caught) > supervisor.seen_signals and not seen.signal:
                # it came while everything was being stopped
                seen.signal = next((n for n in signals.caught[supervisor.seen_signals:] if n != signal.SIGWINCH), 0)
        # QEMU and the virtiofsds are stopped (launch() is left) before the logs are read.
        seen.host["ended"] = time.monotonic() - began
        verdict = judge(seen, logs=read_logs(plan, logs), boot_timeout=plan.boot_timeout, timeout=plan.timeout,
                        stop_timeout=plan.stop_timeout, unprivileged=os.geteuid() != 0)
        logs.timeline.write_text(json.dumps(timeline_record(seen), indent=2) + "\n")
        if run is not None:
            run.update(state="exited", status=verdict.status, message=verdict.message, ended=_now(),
                       ended_unix=time.time(), timeline=timeline_record(seen))
        monitor.ended(verdict)
    if verbose:
        _say(say, timeline_summary(seen))
    return verdict


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _record_state(run: Run) -> Callable[[State, Supervisor], None]:
    """Keep the run's record true as the run goes."""

    def changed(state: State, sup: Supervisor) -> None:
        pids = {"monitor": os.getpid(), "qemu": sup.vm.qemu.pid,
                "virtiofsd": {vp.tag: child.pid for vp, child in sup.vm.daemons}}
        if state is State.RUNNING and sup.seen.started and run.record().get("state") != "running":
            run.update(state="running", started=_now(), started_unix=time.time(), pids=pids)
        elif state is State.CREATED and sup.seen.ready and "pids" not in run.record():
            run.update(pids=pids)

    return changed


def run_plan(plan: LaunchPlan, *, log_dir: Path, stdin: int = 0, stdout: int = 1, stderr: int = 2,
             verbose: bool = False, booting: Callable[[], None] | None = None, run: Run | None = None,
             terminal: int | None = None, started: Started | None = None, signals: Signals | None = None,
             began: float | None = None) -> int:
    """A foreground run: this process is the monitor; returns the status microvmc exits with (the
    program's own when it ran) after saying why on `stderr` when it is not the program's.
    `started`, `signals`, `began`: a VM started already (see `serve`)."""
    logs = RunLogs(Path(log_dir))
    on_state = _record_state(run) if run is not None else None
    verdict = serve(plan, logs=logs, stdin=stdin, stdout=stdout, stderr=stderr, run=run, terminal=terminal,
                    say=stderr, verbose=verbose, booting=booting, on_state=on_state, started=started,
                    signals=signals, began=began)
    if verdict.message:
        _say(stderr, verdict.message)
    return verdict.status


# --- detached --------------------------------------------------------------------------------


def start_detached(plan: LaunchPlan, run: Run, *, hold: bool = False,
                   stdio: tuple[int, int, int] | None = None, terminal: int | None = None,
                   log_limits: LogLimits | None = None, keep_stdin: bool = False, tty: bool = False,
                   netns: str | None = None) -> int:
    """Start a monitor of its own for `run` (a daemon in its own session), and return its pid once
    the program has started (`hold`: once the guest is ready). Raises MicrovmcError (one line) if
    the run ended before that, with the run's status; the record keeps what happened.

    Without `stdio`, the program's output goes to log files and its stdin is empty, or, with
    `keep_stdin`, a pipe the monitor holds open for clients that attach (`tty`: a terminal's input).
    With `netns`, the monitor lives in that network namespace (the OCI runtime's container's)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    first = os.fork()
    if first == 0:  # pragma: no cover - the child's side is seen through the tests' boots
        try:
            os.close(read_end)
            if netns:
                from microvmc.backends.netns import join

                join(netns)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            status = _daemon(plan, run, hold=hold, stdio=stdio, terminal=terminal, log_limits=log_limits,
                             keep_stdin=keep_stdin, tty=tty, ready=write_end)
        except BaseException:  # noqa: BLE001 - a daemon's last word goes to its log
            import traceback

            try:
                with open(run.dir / "monitor.log", "a") as log:
                    traceback.print_exc(file=log)
            except OSError:
                pass
            status = int(ExitStatus.HOST)
        os._exit(status)
    os.close(write_end)
    os.waitpid(first, 0)
    run.release()  # the monitor holds the lock now
    answer = b""
    with os.fdopen(read_end, "rb") as pipe:
        while not answer.endswith(b"\n"):
            chunk = pipe.read(4096)
            if not chunk:
                break
            answer += chunk
    words = answer.decode("utf-8", "replace").rstrip("\n").split(" ", 2)
    if words[0] == "ok" and len(words) >= 2:
        return int(words[1])
    if words[0] == "error" and len(words) == 3:
        raise MicrovmcError(words[2], status=int(words[1]))
    raise MicrovmcError(f"the run's monitor failed; see {run.dir / 'monitor.log'}", status=ExitStatus.HOST)


def controlling_terminal(fd: int) -> None:
    """Make the terminal on `fd` this process's controlling terminal, in a session of its own: a
    resize of the terminal's other side (an engine's TIOCSWINSZ on the pty master it was given)
    then arrives as SIGWINCH, which passes the new size on, and its hangup as SIGHUP. The caller
    is the second child of a double fork, so it is no group leader and may start a session."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)


def _daemon(plan: LaunchPlan, run: Run, *, hold: bool, stdio: tuple[int, int, int] | None,
            terminal: int | None, log_limits: LogLimits | None, keep_stdin: bool, tty: bool, ready: int) -> int:
    """The monitor's body: returns the status it exits with (the program's)."""
    log = os.open(run.dir / "monitor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    null = os.open(os.devnull, os.O_RDWR)
    if terminal is not None:
        controlling_terminal(terminal)
    program_input = None
    if stdio is None:
        stdin, stdout, stderr = null, None, None
        if keep_stdin:
            stdin, program_input = os.pipe2(os.O_CLOEXEC)
    else:
        stdin, stdout, stderr = (os.dup(fd) for fd in stdio)
    for fd in (0, 1, 2):  # the caller's terminal or pipes are not held open by the daemon
        os.dup2(null if fd == 0 else log, fd)
    told = False

    def tell(line: str) -> None:
        nonlocal told
        if not told:
            told = True
            try:
                os.write(ready, line.encode("utf-8", "replace") + b"\n")
            except OSError:
                pass
            os.close(ready)

    record = _record_state(run)

    def on_state(state: State, sup: Supervisor) -> None:
        record(state, sup)
        if sup.seen.started or (hold and sup.seen.ready):
            tell(f"ok {os.getpid()}")

    try:
        verdict = serve(plan, logs=RunLogs(run.dir), stdin=stdin, stdout=stdout, stderr=stderr, run=run,
                        hold=hold, terminal=terminal, log_limits=log_limits, say=log, on_state=on_state,
                        signal_numbers=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP), input=program_input,
                        tty=tty)
    except MicrovmcError as e:
        run.update(state="exited", status=int(e.status), message=e.message, ended=_now(), ended_unix=time.time())
        tell(f"error {int(e.status)} {e.message}")
        return int(e.status)
    if verdict.message:
        _say(log, verdict.message)
    tell(f"error {verdict.status} {verdict.message or f'the program ended with status {verdict.status}'}")
    if run.record().get("remove"):
        run.release()
        RunStore(run.dir.parent).remove(run)
    return verdict.status


# --- the client --------------------------------------------------------------------------------


class Client:
    """Requests to a run's monitor. When the monitor is gone, the record answers what it can."""

    def __init__(self, run: Run):
        self.run = run

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            connect(sock, self.run.socket)
        except OSError:
            sock.close()
            return None
        return sock

    def request(self, request: dict[str, Any], *, fds: tuple[int, ...] = ()) -> dict[str, Any] | None:
        """The monitor's answer; None if there is no monitor (any more) to answer."""
        sock = self._connect()
        if sock is None:
            return None
        with sock:
            try:
                return _exchange(sock, request, fds)
            except OSError:
                return None

    def state(self) -> dict[str, Any]:
        answer = self.request({"op": "state"})
        if answer is not None and "state" in answer:
            return answer
        record = self.run.record(fresh=True)
        state = self.run.state()
        return {"state": "stopped" if state in ("exited", "dead") else state, "pid": record.get("pids", {}).get(
            "monitor"), "status": record.get("status"), "dead": state == "dead"}

    def _require(self, request: dict[str, Any]) -> dict[str, Any]:
        answer = self.request(request)
        if answer is None:
            raise RunStateError(f"run {self.run.name!r} is not running ({self.run.state()})")
        if "error" in answer:
            raise MicrovmcError(f"run {self.run.name!r}: {answer['error']}", status=ExitStatus.NO_SUCH_RUN)
        return answer

    def start(self) -> bool:
        return bool(self._require({"op": "start"}).get("ok"))

    def signal(self, number: int) -> bool:
        return bool(self._require({"op": "signal", "signal": number}).get("ok"))

    def stop(self, timeout: float) -> None:
        self._require({"op": "stop", "timeout": timeout})

    def resize(self, rows: int, cols: int) -> None:
        self._require({"op": "resize", "rows": rows, "cols": cols})

    def wait(self) -> tuple[int, str]:
        """Blocks until the run has ended: (its status, what was said about it)."""
        answer = self.request({"op": "wait"})
        if answer is None or "status" not in answer:
            deadline = time.monotonic() + 5
            while self.run.alive() and time.monotonic() < deadline:  # ending: the record comes next
                time.sleep(0.05)
            record = self.run.record(fresh=True)
            if self.run.state() == "dead":
                raise RunStateError(f"run {self.run.name!r} lost its monitor (it was killed); its VM is gone")
            if record.get("status") is None:
                raise RunStateError(f"run {self.run.name!r} has no status")
            return int(record["status"]), record.get("message", "")
        return int(answer["status"]), answer.get("message", "")

    def exec(self, process: ProcessSpec, stdin: int, stdout: int, stderr: int, *,
             signals: Signals | None = None, terminal: int | None = None,
             started: Callable[[], None] | None = None) -> tuple[int, str]:
        """Run `process` in the VM with these descriptors as its stdio; blocks until it ended.
        `signals` caught here are passed on to it; with `terminal`, SIGWINCH passes its size on;
        `started` is called once the monitor has the descriptors and the process is starting."""
        sock = self._connect()
        if sock is None:
            raise RunStateError(f"run {self.run.name!r} is not running ({self.run.state()})")
        with sock:
            lines = _Lines(sock)
            answer = _exchange(sock, {"op": "exec", "process": process.to_dict()}, (stdin, stdout, stderr), lines)
            if answer is None or "error" in answer:
                why = answer["error"] if answer else "the run ended"
                raise RunStateError(f"cannot exec in run {self.run.name!r}: {why}")
            if started is not None:
                started()
            answer = self._follow(lines, signals, terminal, "the exec")
            return int(answer["status"]), answer.get("message", "")

    def attach(self, stdout: int, stderr: int, *, stdin: int | None = None, signals: Signals | None = None,
               terminal: int | None = None, on_attached: Callable[[bool], None] | None = None
               ) -> tuple[int, str] | None:
        """The program's output from now on to `stdout`/`stderr` (and `stdin` to its input) until the
        run ends: its (status, message); None if the client detached (Ctrl-P Ctrl-Q). `signals`
        caught here go to the program; `on_attached` is told whether the program has a terminal."""
        sock = self._connect()
        if sock is None:
            raise RunStateError(f"run {self.run.name!r} is not running ({self.run.state()})")
        with sock:
            fds = (stdout, stderr) + (() if stdin is None else (stdin,))
            lines = _Lines(sock)
            answer = _exchange(sock, {"op": "attach", "stdin": stdin is not None}, fds, lines)
            if answer is None or "error" in answer:
                why = answer["error"] if answer else "the run ended"
                raise RunStateError(f"cannot attach to run {self.run.name!r}: {why}")
            if on_attached is not None:
                on_attached(bool(answer.get("tty")))
            answer = self._follow(lines, signals, terminal, "the attach")
            if answer.get("detached"):
                return None
            return int(answer["status"]), answer.get("message", "")

    def _follow(self, lines: "_Lines", signals: Signals | None, terminal: int | None,
                what: str) -> dict[str, Any]:
        """Pass the signals caught here on (SIGWINCH as `terminal`'s size) until the monitor's last
        answer: the one with a status, or that says the client detached."""
        from microvmc.backends.terminal import size

        sock = lines.sock
        seen = 0
        if terminal is not None:
            rows, cols = size(terminal)
            if rows and cols:
                _send(sock, {"op": "resize", "rows": rows, "cols": cols})
        while True:
            while lines.ready():
                answer = lines.next()
                if answer is not None and ("status" in answer or answer.get("detached")):
                    return answer
            fds = [sock] + ([signals.fd] if signals is not None and signals.fd is not None else [])
            ready, _, _ = select.select(fds, [], [])
            if signals is not None and signals.fd in ready:
                try:
                    os.read(signals.fd, 64)
                except BlockingIOError:
                    pass
                for number in signals.caught[seen:]:
                    seen += 1
                    if number == signal.SIGWINCH and terminal is not None:
                        rows, cols = size(terminal)
                        if rows and cols:
                            _send(sock, {"op": "resize", "rows": rows, "cols": cols})
                    elif number != signal.SIGWINCH:
                        _send(sock, {"op": "signal", "signal": number})
            if sock in ready and not lines.fill():
                raise RunStateError(f"run {self.run.name!r}: the monitor went away during {what}")


class _Lines:
    """The monitor's answers on one connection, one JSON object a line; none lost between reads
    (an exec's first answer and its status can come in one read)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def ready(self) -> bool:
        return b"\n" in self.buf

    def fill(self) -> bool:
        """One read; False at the end of the connection."""
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        self.buf += data
        return bool(data)

    def next(self) -> dict[str, Any] | None:
        """The next answer (blocking); None if the connection ends first."""
        while not self.ready():
            if not self.fill():
                return None
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def _send(sock: socket.socket, request: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(request).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        try:
            sock.sendall(data)
        except OSError:
            pass


def _exchange(sock: socket.socket, request: dict[str, Any], fds: tuple[int, ...],
              lines: _Lines | None = None) -> dict[str, Any] | None:
    _send(sock, request, fds)
    return (lines or _Lines(sock)).next()
