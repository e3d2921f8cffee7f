"""What the guest init reported on its status port, and the exit status it becomes.

The table here is the single source for both the QEMU backend and the `case` in `launch.sh`.
See init/PROTOCOL.md for the report lines.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from microvmc.errors import ExitStatus

__all__ = ["Outcome", "interpret_status", "EXEC_ERRNO_STATUS"]

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
