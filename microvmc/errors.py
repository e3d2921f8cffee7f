"""Errors and the exit statuses they map to.

Library code raises these; only the CLI turns them into exit statuses and messages.
A message is one sentence naming the file, the key path and the offending value.
"""

from __future__ import annotations

from enum import IntEnum

from microvmc._value import Value

__all__ = [
    "ExitStatus",
    "EXIT_MEANINGS",
    "Problem",
    "MicrovmcError",
    "ManifestError",
    "BuildError",
    "KernelError",
    "HostError",
    "RunError",
]


class ExitStatus(IntEnum):
    """microvmc's own exit statuses. `run` otherwise exits with the program's status
    (128+N when the program died of signal N), like a shell; the band 120-127 follows
    Docker's and the shell's conventions so the two rarely collide."""

    OK = 0
    NO_SUCH_RUN = 1  # ps/logs/stop/rm/exec...: no such run, or its state does not allow the request
    USAGE = 2  # bad command line (argparse)
    OUTPUT_LOST = 119  # the program succeeded, but its output could not be written (disk full, ...)
    INIT_FAILED = 120  # guest init failed before the program started (mount, modules, ports)
    HOST = 121  # QEMU or virtiofsd could not start, or the accelerator is unusable
    VIRTIOFSD_DIED = 122  # a virtiofsd died while the VM ran
    GUEST_CRASHED = 123  # the VM stopped without reporting a status (kernel panic, ...)
    TIMEOUT = 124  # boot or run timeout, like timeout(1)
    INVALID = 125  # invalid manifest, failed build: nothing was started
    NOT_EXECUTABLE = 126  # the program exists but could not be executed
    NOT_FOUND = 127  # the program was not found in the guest
    INTERRUPTED = 130  # microvmc got SIGINT (SIGTERM gives 143)


# What each exit status means, as `microvmc --help` lists it (the README's table says the same).
EXIT_MEANINGS: tuple[tuple[str, str], ...] = (
    ("0", "success (run: the program's own status, 128+N if it died of signal N)"),
    ("1", "no such run, an ambiguous prefix, or a request its state does not allow (rm of a running run, ...)"),
    ("2", "bad command line"),
    ("119", "the program succeeded but its stdout or stderr could not be written (e.g. disk full)"),
    ("120", "the guest init failed before the program started (mount, modules, ports)"),
    ("121", "QEMU or virtiofsd could not start, or the accelerator is unusable"),
    ("122", "a virtiofsd died while the VM ran"),
    ("123", "the VM stopped without reporting a status (e.g. a kernel panic)"),
    ("124", "boot or run timeout"),
    ("125", "invalid manifest or failed build: nothing was started"),
    ("126, 127", "the program could not be executed / was not found in the guest"),
    ("129, 130, 143", "a signal (SIGHUP, SIGINT, SIGTERM) stopped the VM: before the program ran, a second one, "
                      "or past resources.stop_timeout"),
)


class Problem(Value):
    """One user mistake: where it is and what is wrong with it. (Not a dataclass: `microvmc run`
    imports this before it starts QEMU, microvmc/_value.py.)"""

    __slots__ = ("file", "key", "message", "hint")
    file: str
    key: str  # dotted key path, "" for the whole file
    message: str  # e.g. "16 is below the minimum of 64 MiB"
    hint: str

    def __init__(self, file: str, key: str, message: str, hint: str = "") -> None:
        self._init(locals())

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}: " if self.key else f"{self.file}: "
        text = where + self.message
        return f"{text} ({self.hint})" if self.hint else text


class MicrovmcError(Exception):
    """Base class: a failure that is explained to the user in one line, no traceback."""

    status: ExitStatus = ExitStatus.INVALID

    def __init__(self, message: str, *, status: ExitStatus | None = None, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if status is not None:
            self.status = status

    def lines(self) -> list[str]:
        return [f"{self.message} ({self.hint})" if self.hint else self.message]


class ManifestError(MicrovmcError):
    """One or more problems in a manifest; all of them are reported together."""

    status = ExitStatus.INVALID

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]):
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class BuildError(MicrovmcError):
    status = ExitStatus.INVALID


class KernelError(MicrovmcError):
    """A kernel image or module cannot be used for the plan."""

    status = ExitStatus.INVALID


class HostError(MicrovmcError):
    """The host cannot do what the plan needs (no QEMU, no usable KVM, ...)."""

    status = ExitStatus.HOST


class RunError(MicrovmcError):
    """A run failed after the VM was started; status says how."""

    status = ExitStatus.GUEST_CRASHED
