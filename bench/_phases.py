"""Where a VM command's time goes, on the host's clock: `perf record` of the scheduler's exec, fork
and exit tracepoints, system-wide, while the benchmark runs (no instrumentation in what is timed).

For each timed command (its pid and time.monotonic() at its spawn, from _measure.Sample) and the
processes it forked: the command's start → QEMU's exec (`to_qemu`), QEMU's exec → its exit (`qemu`:
the VM), QEMU's exit → the command's exit (`after`). `perf record -k mono` stamps the events with
CLOCK_MONOTONIC, the clock of Sample.started. Needs perf and the right to trace (root, or
kernel.perf_event_paranoid <= -1); otherwise `Tracer.start` says why not.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence

import _measure

__all__ = ["Tracer", "phases"]

EVENTS = "sched:sched_process_exec,sched:sched_process_exit,sched:sched_process_fork"
QEMU = "qemu-system-"
# perf script -F comm,pid,tid,time,event,trace: "comm  pid/tid  time: sched:event: fields"
LINE = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+sched:(\w+):\s+(.*)")


class Tracer:
    """perf record, from start() to stop(); events() then gives what it saw."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="microvmc-bench-perf-")
        self.data = os.path.join(self.dir, "perf.data")
        self.why_not = ""
        self.fifos: list[int] = []
        self.log = open(os.path.join(self.dir, "perf.log"), "w+b")  # (a pipe nobody reads could stall it)

    def start(self) -> bool:
        perf = shutil.which("perf")
        if perf is None:
            self.why_not = "perf is not installed"
            return False
        control, ack = os.path.join(self.dir, "control"), os.path.join(self.dir, "ack")
        os.mkfifo(control)
        os.mkfifo(ack)
        # Started disabled, then enabled through its control FIFO: its acknowledgement says it records.
        self.proc = subprocess.Popen([perf, "record", "-q", "-k", "mono", "-e", EVENTS, "-a", "-o", self.data,
                                      "-D", "-1", f"--control=fifo:{control},{ack}"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        _measure.OURS.add(self.proc.pid)  # not a command's leftover (_measure.sweep_leftovers)
        # (read-write: neither side waits for the other to open; held open until perf ends, which
        # stops recording when its control FIFO is closed)
        self.fifos = [os.open(control, os.O_RDWR), os.open(ack, os.O_RDWR | os.O_NONBLOCK)]
        os.write(self.fifos[0], b"enable\n")
        ready, _, _ = select.select([self.fifos[1]], [], [], 10)
        acked = bool(ready) and os.read(self.fifos[1], 64).startswith(b"ack")
        if not acked or self.proc.poll() is not None:
            self.proc.kill()
            self.proc.wait()
            self.log.seek(0)
            self.why_not = "perf record failed: " + self.log.read().decode(errors="replace").strip()[-200:]
            self.proc = None
            return False
        return True

    def stop(self) -> list[tuple[float, int, int, str, str]]:
        """(time, pid, tid, event, fields) of everything seen; the tracer's files are removed."""
        try:
            if self.proc is None:
                return []
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
            _measure.OURS.discard(self.proc.pid)
            out = subprocess.run(["perf", "script", "-i", self.data, "-F", "comm,pid,tid,time,event,trace"],
                                 capture_output=True, text=True, timeout=120).stdout
            found = []
            for line in out.splitlines():
                m = LINE.match(line)
                if m:
                    _, pid, tid, at, event, fields = m.groups()
                    found.append((float(at), int(pid), int(tid), event, fields))
            return found
        finally:
            for fd in self.fifos:
                os.close(fd)
            self.fifos = []
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def phases(events: Sequence[tuple[float, int, int, str, str]],
           runs: Mapping[int, float]) -> dict[int, dict[str, float]]:
    """{pid: {"to_qemu", "qemu", "after"}} (seconds) for each command `runs` names (pid → its
    time.monotonic() at spawn) that started a QEMU that ended."""
    parent: dict[int, int] = {}
    for _, _, _, event, fields in events:
        if event == "sched_process_fork":
            m = re.search(r"pid=(\d+) .*child_pid=(\d+)", fields)
            if m:
                parent[int(m.group(2))] = int(m.group(1))

    def root(pid: int) -> int | None:
        for _ in range(64):
            if pid in runs:
                return pid
            if pid not in parent:
                return None
            pid = parent[pid]
        return None

    seen: dict[int, dict[str, float]] = {pid: {} for pid in runs}
    qemu_of: dict[int, int] = {}
    for at, pid, tid, event, fields in events:
        top = root(pid)
        if top is None:
            continue
        marks = seen[top]
        if event == "sched_process_exec" and QEMU in fields and "qemu_exec" not in marks:
            marks["qemu_exec"] = at
            qemu_of[top] = pid
        elif event == "sched_process_exit" and "group_dead=true" in fields:
            if pid == qemu_of.get(top):
                marks["qemu_exit"] = at
            elif pid == top:
                marks["end"] = at
    out = {}
    for pid, marks in seen.items():
        if {"qemu_exec", "qemu_exit", "end"} <= set(marks):
            out[pid] = {"to_qemu": marks["qemu_exec"] - runs[pid], "qemu": marks["qemu_exit"] - marks["qemu_exec"],
                        "after": marks["end"] - marks["qemu_exit"]}
    return out
