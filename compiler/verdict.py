"""Judging a run: what supervision saw → the status microvmc exits with, and what it says.

Pure: the backend hands in what it saw (`Seen`) and the first meaningful line of each log it may
quote (`Logs`); nothing here reads a file or a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from microvmc.compiler.status import interpret_status
from microvmc.errors import ExitStatus

__all__ = ["Seen", "Logs", "Verdict", "judge", "timeline_record", "timeline_summary", "boot_phases", "PHASE_MARKS"]

# The host's marks that divide a run into phases, in the order they happen: QEMU spawned, the
# kernel's first console message, init's first console line, (held: booted,) the program's exec
# reported, its end reported, QEMU's exit. Phases between the marks present sum to the whole.
PHASE_MARKS = ("qemu", "kernel", "init", "ready", "started", "reported", "qemu-exited")


@dataclass(slots=True)
class Seen:
    """What the supervision of one run saw; filled in while it runs, judged once it is over."""

    signal: int = 0  # microvmc got this signal (or a stop request) and stopped the VM
    forwarded: int = 0  # this signal went to the program, which then had stop_timeout to end
    stop_requested: bool = False  # `microvmc stop` (not a signal microvmc itself got)
    stop_timed_out: bool = False  # the program did not end within stop_timeout of `forwarded`
    boot_timeout: bool = False
    run_timeout: bool = False
    qemu_status: int | None = None  # QEMU's exit status, when it ended by itself
    dead_daemon: tuple[str, int] | None = None  # (tag, status): a virtiofsd that ended while QEMU ran on
    failed_daemons: tuple[tuple[str, int], ...] = ()  # virtiofsds that had failed by the time QEMU ended
    report: str = ""  # everything the status port delivered
    lost_output: str = ""  # "stdout: <why>" when the program's output could not be written (not EPIPE)
    started: bool = False
    ready: bool = False  # held (MVMC_HOLD): booted, waiting for `start`
    # Seconds since the run began, on the host; ms since the guest kernel started, as init reported.
    host: dict[str, float] = field(default_factory=dict)
    guest: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Logs:
    """Where the logs are, and the first line of each that says what went wrong ("" if none)."""

    console: str
    qemu: str
    qemu_line: str = ""
    virtiofsd: tuple[tuple[str, str, str], ...] = ()  # (tag, path, first line)

    def daemon(self, tag: str) -> tuple[str, str]:
        for t, path, line in self.virtiofsd:
            if t == tag:
                return path, line
        return "", ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    status: int  # what microvmc exits with: the program's own status when it ran
    message: str  # "" when there is nothing to say


def judge(seen: Seen, *, logs: Logs, boot_timeout: float, timeout: float, stop_timeout: float,
          unprivileged: bool = False) -> Verdict:
    status, message = _outcome(seen, logs=logs, boot_timeout=boot_timeout, timeout=timeout,
                               stop_timeout=stop_timeout, unprivileged=unprivileged)
    if seen.lost_output:
        lost = f"the program's output could not be written ({seen.lost_output})"
        if status == 0:
            return Verdict(status=int(ExitStatus.OUTPUT_LOST), message=lost)
        message = f"{message}; {lost}" if message else lost
    return Verdict(status=status, message=message)


def _outcome(seen: Seen, *, logs: Logs, boot_timeout: float, timeout: float, stop_timeout: float,
             unprivileged: bool) -> tuple[int, str]:
    console = f"console log: {logs.console}"
    if seen.signal and seen.stop_timed_out:
        who = "a stop request" if seen.stop_requested else f"signal {seen.signal}"
        return 128 + seen.signal, (f"the program did not end within {stop_timeout:g} s of {who} "
                                   f"(resources.stop_timeout); the VM was stopped")
    if seen.signal:
        return 128 + seen.signal, ""
    if seen.boot_timeout:
        return int(ExitStatus.TIMEOUT), f"the guest did not start the program within {boot_timeout:g} s; {console}"
    if seen.run_timeout:
        return int(ExitStatus.TIMEOUT), f"the program did not finish within {timeout:g} s; {console}"
    if seen.dead_daemon is not None:
        return _daemon(*seen.dead_daemon, started=seen.started, logs=logs, unprivileged=unprivileged)
    if seen.qemu_status and not seen.started:
        for tag, status in seen.failed_daemons:  # QEMU cannot connect to a failed virtiofsd
            return _daemon(tag, status, started=False, logs=logs, unprivileged=unprivileged)
        if logs.qemu_line:
            return int(ExitStatus.HOST), f"QEMU failed: {logs.qemu_line}; QEMU log: {logs.qemu}"
    outcome = interpret_status(seen.report)
    return outcome.status, f"{outcome.message}; {console}" if outcome.message else ""


def _daemon(tag: str, code: int, *, started: bool, logs: Logs, unprivileged: bool) -> tuple[int, str]:
    log, line = logs.daemon(tag)
    if code > 0 and not started:
        # The C virtiofsd needs root (it chroots into the share); 9p needs no daemon at all.
        hint = " (as an ordinary user, share over 9p: transport = \"9p\")" if unprivileged else ""
        return (int(ExitStatus.HOST),
                f"virtiofsd for share '{tag}' could not start: {line or f'exit status {code}'}; log: {log}{hint}")
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return int(ExitStatus.VIRTIOFSD_DIED), f"virtiofsd for share '{tag}' died while the VM ran ({how}); log: {log}"


def boot_phases(host: dict[str, float]) -> dict[str, float]:
    """Seconds from each phase mark present to the next ("qemu → kernel", "kernel → init", ...), by
    the host's clock: from QEMU's start to its exit, which they sum to."""
    present = [(name, host[name]) for name in PHASE_MARKS if name in host]
    return {f"{a} → {b}": round(tb - ta, 3) for (a, ta), (b, tb) in zip(present, present[1:])}


def timeline_record(seen: Seen) -> dict:
    # In the order they happened: marks recorded by different event sources are not always in clock order.
    marks = sorted(seen.host.items(), key=lambda item: item[1])
    host = {k: round(v, 3) for k, v in marks}
    return {"host_seconds": host, "guest_ms": dict(seen.guest), "phases_seconds": boot_phases(host)}


def timeline_summary(seen: Seen) -> str:
    """One line: how long each boot step took, from init's timeline and the host's clock."""
    parts = []
    previous = 0
    for stage, label in (("init", "kernel"), ("modules", "modules"), ("ports", "ports"), ("mounts", "mounts"),
                         ("exec", "exec"), ("exit", "program")):
        if stage in seen.guest:
            parts.append(f"{label} {(seen.guest[stage] - previous) / 1000:.2f} s")
            previous = seen.guest[stage]
    host = ", ".join(f"{name} at {seconds:.2f} s" for name, seconds in sorted(seen.host.items(), key=lambda i: i[1]))
    phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in boot_phases(seen.host).items())
    return f"timeline: {', '.join(parts) or 'no report from init'}; host: {host}" + (f"; phases: {phases}" if phases else "")
