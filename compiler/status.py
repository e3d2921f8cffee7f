"""What the guest init reported on its status port, and the exit status it becomes.

The table here is the single source for both the QEMU backend and the `case` in `launch.sh`.
See init/PROTOCOL.md for the report lines.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from microvmc.errors import ExitStatus

__all__ = ["Outcome", "interpret_status", "EXEC_ERRNO_STATUS", "Report", "parse_report"]

# errno of a failed execve → exit status, as a shell does it.
EXEC_ERRNO_STATUS: dict[int, ExitStatus] = {
    errno.ENOENT: ExitStatus.NOT_FOUND,
    errno.ENOTDIR: ExitStatus.NOT_FOUND,
    errno.EACCES: ExitStatus.NOT_EXECUTABLE,
    errno.ENOEXEC: ExitStatus.NOT_EXECUTABLE,
    errno.EPERM: ExitStatus.NOT_EXECUTABLE,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    status: int  # what microvmc exits with
    started: bool  # the program was started
    message: str = ""  # set when microvmc itself has something to say (an error)


def interpret_status(report: str) -> Outcome:
    """The outcome of a run from everything the status port delivered (possibly nothing)."""
    started = False
    for line in report.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "started":
            started = True
        elif kind == "exit" and rest.isdigit():
            return Outcome(status=int(rest) & 0xFF, started=True)
        elif kind == "signal" and rest.isdigit():
            return Outcome(status=128 + int(rest), started=True)
        elif kind == "error":
            stage, _, rest = rest.partition(" ")
            code, _, message = rest.partition(" ")
            number = int(code) if code.isdigit() else 0
            if stage == "exec":
                status = EXEC_ERRNO_STATUS.get(number, ExitStatus.NOT_EXECUTABLE)
                text = f"cannot run the program in the guest: {message or 'no message'}"
            else:
                status = ExitStatus.INIT_FAILED
                text = f"guest init failed at {stage}: {message or 'no message'}"
            return Outcome(status=int(status), started=started, message=text)
    return Outcome(
        status=int(ExitStatus.GUEST_CRASHED),
        started=started,
        message="the VM stopped without reporting the program's status",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """One report line of init (init/PROTOCOL.md), parsed: the one parser every reader uses."""

    kind: str  # time, ready, started, sent, exit, signal, error; "" for a line no host knows
    stage: str = ""  # time: the stage; sent: the stream; error: where init failed
    number: int = 0  # time: ms; sent: bytes; exit: the code; signal: the signal; error: errno
    message: str = ""  # error: the rest of the line

    @property
    def final(self) -> bool:
        """After exit, signal and error, init ends the program's session (and, on the status port, reboots)."""
        return self.kind in ("exit", "signal", "error")

    def status(self) -> int:
        """The exit status a final report means (interpret_status for a single line)."""
        return interpret_status(self.line()).status

    def line(self) -> str:
        if self.kind in ("time", "sent"):
            return f"{self.kind} {self.stage} {self.number}"
        if self.kind in ("exit", "signal"):
            return f"{self.kind} {self.number}"
        if self.kind == "error":
            return f"error {self.stage} {self.number} {self.message}"
        return self.kind


def parse_report(line: str) -> Report:
    kind, _, rest = line.rstrip("\n").partition(" ")
    if kind in ("time", "sent"):
        stage, _, number = rest.partition(" ")
        return Report(kind=kind, stage=stage, number=int(number)) if number.isdigit() else Report(kind="")
    if kind in ("exit", "signal"):
        return Report(kind=kind, number=int(rest)) if rest.isdigit() else Report(kind="")
    if kind == "error":
        stage, _, rest = rest.partition(" ")
        code, _, message = rest.partition(" ")
        return Report(kind="error", stage=stage, number=int(code) if code.isdigit() else 0, message=message)
    if kind in ("ready", "started") and not rest:
        return Report(kind=kind)
    return Report(kind="")
