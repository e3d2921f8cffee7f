"""The host end of init's channel (init/PROTOCOL.md, "The channel"): any number of exec sessions
multiplexed over one byte stream, with a window per stream so that a reader that does not read
stalls only its own stream. The stream is a socket: QEMU's virtio-serial `channel` port today, a
vsock connection for VMMs without virtio-serial (the frames are the same).

It lives in the supervision loop: `Channel.wanted()` says which descriptors it waits on, and the
owner (backends/monitor.py) registers them with the Supervisor.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from microvmc.backends.supervise import Sink
from microvmc.compiler.launch import ProcessSpec
from microvmc.compiler.status import parse_report

__all__ = ["Channel", "Session"]

EXEC, REPORT, DATA, EOF, WINDOW, SIGNAL, RESIZE, CLOSE = range(1, 9)
HEADER = struct.Struct(">BBHII")
MAX_PAYLOAD = 65536
WINDOW_SIZE = 65536
STDIN, STDOUT, STDERR = 0, 1, 2


def frame(kind: int, stream: int, session: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, 0, session, len(payload)) + payload


@dataclass(eq=False)
class Session:
    id: int
    stdin: int  # the exec client's descriptors (the monitor's copies, closed when done)
    outs: dict[int, Sink]
    on_end: Callable[[int, str], None]  # (exit status, message)
    window: int = WINDOW_SIZE  # stdin bytes init will take
    stdin_open: bool = True
    eof: set[int] = field(default_factory=set)  # output streams init has ended
    closed: set[int] = field(default_factory=set)  # output streams whose reader went away (init told)
    final: tuple[int, str] | None = None  # how it ended, once reported
    started: bool = False


class Channel:
    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self.sessions: dict[int, Session] = {}
        self.next_id = 1
        self.out = bytearray()
        self.inbuf = bytearray()
        self.broken = False

    def open(self, spec: ProcessSpec, stdin: int, stdout: int, stderr: int,
             on_end: Callable[[int, str], None]) -> Session:
        sid = self.next_id
        self.next_id += 1
        session = Session(id=sid, stdin=stdin, outs={STDOUT: Sink(stdout), STDERR: Sink(stderr)}, on_end=on_end)
        self.sessions[sid] = session
        self.out += frame(EXEC, 0, sid, spec.payload())
        return session

    def signal(self, session: Session, number: int) -> None:
        self.out += frame(SIGNAL, 0, session.id, struct.pack(">I", number))

    def resize(self, session: Session, rows: int, cols: int) -> None:
        self.out += frame(RESIZE, 0, session.id, struct.pack(">HH", rows, cols))

    # --- the loop's side ---

    def wanted(self) -> dict[int, tuple[int, Callable[[int], None]]]:
        want: dict[int, tuple[int, Callable[[int], None]]] = {}
        if not self.broken:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
            want[self.sock.fileno()] = (events, self._socket_event)
        for s in self.sessions.values():
            if s.stdin_open and s.window > 0 and not self.broken:
                want[s.stdin] = (selectors.EVENT_READ, lambda _, s=s: self._stdin(s))
            for stream, sink in s.outs.items():
                if sink.pending and sink.pollable and not sink.broken:
                    want[sink.fd] = (selectors.EVENT_WRITE, lambda _, s=s, stream=stream: self._flush(s, stream))
        return want

    def fail_all(self, status: int, message: str) -> None:
        """The VM (or the channel) is gone: every open session ends with `status`."""
        for s in list(self.sessions.values()):
            if s.final is None:
                s.final = (status, message)
            self._finish(s, force=True)
        self.broken = True

    def close(self) -> None:
        self.fail_all(137, "the VM stopped during the exec")
        self.sock.close()

    def _socket_event(self, events: int) -> None:
        if events & selectors.EVENT_WRITE and self.out:
            try:
                sent = self.sock.send(self.out)
                del self.out[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self.fail_all(137, "the channel to the guest broke")
                return
        if events & selectors.EVENT_READ:
            try:
                data = self.sock.recv(1 << 17)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.fail_all(137, "the channel to the guest closed")
                return
            self.inbuf += data
            self._frames()

    def _frames(self) -> None:
        while len(self.inbuf) >= HEADER.size:
            kind, stream, _, sid, length = HEADER.unpack_from(self.inbuf)
            if len(self.inbuf) < HEADER.size + length:
                return
            payload = bytes(self.inbuf[HEADER.size:HEADER.size + length])
            del self.inbuf[:HEADER.size + length]
            s = self.sessions.get(sid)
            if s is None:
                continue
            if kind == DATA and stream in s.outs:
                self._deliver(s, stream, payload)
            elif kind == EOF and stream in s.outs:
                s.eof.add(stream)
            elif kind == WINDOW and stream == STDIN and length == 4:
                s.window += struct.unpack(">I", payload)[0]
            elif kind == REPORT:
                report = parse_report(payload.decode("ascii", "replace"))
                if report.kind == "started":
                    s.started = True
                elif report.final:
                    message = ""
                    if report.kind == "error":
                        message = (f"cannot run the program in the guest: {report.message}" if report.stage == "exec"
                                   else f"exec failed at {report.stage}: {report.message}")
                    s.final = (report.status(), message)
            self._finish(s)

    def _deliver(self, s: Session, stream: int, data: bytes) -> None:
        sink = s.outs[stream]
        before = len(sink.pending)
        sink.push(data)
        if sink.broken:
            self._reader_gone(s, stream)
            self._grant(s, stream, len(data))  # discarded is delivered, as far as init is concerned
            return
        written = before + len(data) - len(sink.pending)
        if written:
            self._grant(s, stream, written)

    def _flush(self, s: Session, stream: int) -> None:
        sink = s.outs[stream]
        before = len(sink.pending)
        sink.write()
        if sink.broken:
            self._reader_gone(s, stream)
            self._grant(s, stream, before)
        elif before - len(sink.pending):
            self._grant(s, stream, before - len(sink.pending))
        self._finish(s)

    def _grant(self, s: Session, stream: int, n: int) -> None:
        if n > 0:
            self.out += frame(WINDOW, stream, s.id, struct.pack(">I", n))

    def _reader_gone(self, s: Session, stream: int) -> None:
        if stream not in s.closed:
            s.closed.add(stream)
            self.out += frame(CLOSE, stream, s.id)

    def _stdin(self, s: Session) -> None:
        try:
            data = os.read(s.stdin, min(s.window, MAX_PAYLOAD))
        except OSError as e:
            data = b"" if e.errno != errno.EAGAIN else None
        if data is None:
            return
        if data:
            s.window -= len(data)
            self.out += frame(DATA, STDIN, s.id, data)
        else:
            s.stdin_open = False
            self.out += frame(EOF, STDIN, s.id)

    def _finish(self, s: Session, *, force: bool = False) -> None:
        """A reported session ends once its output is written (or cannot be)."""
        if s.final is None:
            return
        if not force and any(sink.pending and not sink.broken for sink in s.outs.values()):
            return
        self.sessions.pop(s.id, None)
        fds = {s.stdin, *(sink.fd for sink in s.outs.values())}
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        lost = [f"{('stdout', 'stderr')[k - 1]}: {sink.error.strerror}" for k, sink in s.outs.items() if sink.error]
        status, message = s.final
        if lost and status == 0:
            status, message = 119, f"the exec's output could not be written ({', '.join(lost)})"
        s.on_end(status, message)
