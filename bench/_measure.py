"""What every benchmark shares: timing a command in a child process, interleaving the commands
compared, medians and ratios, process hygiene, and the text and JSON reports.

Results are ratios against a baseline measured in the same run, in alternation with it, so that a
busy or slow machine moves both sides. Nothing here is a pass/fail threshold on absolute time.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "Command",
    "Sample",
    "add_common_args",
    "become_subreaper",
    "emit_report",
    "interleave",
    "machine",
    "median",
    "median_interval",
    "microvmc_command",
    "python_for",
    "sweep_leftovers",
    "time_once",
]

PR_SET_CHILD_SUBREAPER = 36
STOP_GRACE = 3.0  # seconds a leftover process gets after SIGTERM
OURS: set[int] = set()  # children the harness itself runs beside the commands (a tracer): not leftovers


@dataclass(frozen=True, kw_only=True, slots=True)
class Command:
    """One column of a comparison: what runs, where, with what environment."""

    key: str  # short id used in JSON
    label: str  # what the table shows
    argv: tuple[str, ...]
    cwd: str | None = None
    env: Mapping[str, str] | None = None  # added to os.environ
    expect_status: int | None = 0  # None: any status is fine
    timeout: float = 300.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Sample:
    wall: float  # seconds, spawn to reaped
    cpu: float  # user + system seconds of the child and the descendants it reaped
    maxrss_kib: int  # the largest resident set of the child or a descendant it reaped
    status: int
    leftovers: tuple[str, ...] = ()
    pid: int = 0  # of the command (for a tracer's events: _phases.py)
    started: float = 0.0  # time.monotonic() just before it was spawned


# --- process hygiene ---------------------------------------------------------------------------


def become_subreaper() -> bool:
    """Orphans of our children reparent to us, so `sweep_leftovers` finds every process a
    benchmarked command left behind, whatever it double-forked or daemonized."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _children_of(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # comm may contain spaces and parentheses: the fields after the last ')' are fixed.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[1]) == pid and int(entry) not in OURS:
            found.append((int(entry), comm))
    return found


def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def sweep_leftovers() -> tuple[str, ...]:
    """Stop and reap whatever is still our child; call only when no measured child is running.
    Returns "comm[pid]" of each process that had been left running."""
    _reap_zombies()
    left = _children_of(os.getpid())
    for pid, _ in left:
        with _suppress_lookup():
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline and _children_of(os.getpid()):
        _reap_zombies()
        time.sleep(0.05)
    for pid, _ in _children_of(os.getpid()):
        with _suppress_lookup():
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)
    _reap_zombies()
    return tuple(f"{comm}[{pid}]" for pid, comm in left)


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is ProcessLookupError


# --- timing ------------------------------------------------------------------------------------


def time_once(cmd: Command) -> Sample:
    """Run `cmd` once, in its own session, with stdin and stdout on /dev/null."""
    env = dict(os.environ, **(cmd.env or {}))
    # As users run Python: with compiled bytecode cached. Some sandboxes set this, and then every
    # run recompiles every module it imports (~20 ms of microvmc's start-up here).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    stderr_path = Path(os.environ.get("TMPDIR", "/tmp"), f"microvmc-bench-stderr-{os.getpid()}")
    with open(stderr_path, "w+b") as stderr:
        started = time.monotonic()
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd.argv, cwd=cmd.cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr, start_new_session=True,
        )
        timer = threading.Timer(cmd.timeout, _kill_session, (proc.pid,))
        timer.start()
        try:
            _, wstatus, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(wstatus)
        stderr.seek(0)
        errors = stderr.read()[-2000:].decode("utf-8", "replace")
    stderr_path.unlink()
    leftovers = sweep_leftovers()
    if cmd.expect_status is not None and proc.returncode != cmd.expect_status:
        raise RuntimeError(
            f"{cmd.label}: exited {proc.returncode}, expected {cmd.expect_status}: {' '.join(cmd.argv)}\n{errors}"
        )
    return Sample(wall=wall, cpu=usage.ru_utime + usage.ru_stime, maxrss_kib=usage.ru_maxrss,
                  status=proc.returncode, leftovers=leftovers, pid=proc.pid, started=started)


def _kill_session(pid: int) -> None:
    with _suppress_lookup():
        os.killpg(pid, signal.SIGKILL)


def interleave(commands: Sequence[Command], reps: int, *, warmup: int = 1,
               progress: bool = True) -> dict[str, list[Sample]]:
    """`reps` rounds; each round runs every command once, the order rotated by one each round
    (ABC, BCA, CAB, ...), so drift in the machine's load and order effects hit all alike.
    `warmup` untimed rounds come first (page cache, store, host-facts cache)."""
    samples: dict[str, list[Sample]] = {c.key: [] for c in commands}
    n = len(commands)
    for r in range(warmup + reps):
        order = [commands[(r + i) % n] for i in range(n)]
        for cmd in order:
            s = time_once(cmd)
            if r >= warmup:
                samples[cmd.key].append(s)
            if progress:
                tag = "warm-up" if r < warmup else f"{r - warmup + 1}/{reps}"
                print(f"  [{tag}] {cmd.label}: {s.wall:.3f} s", file=sys.stderr, flush=True)
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    walls = [s.wall for s in samples]
    return {
        "n": len(samples),
        "wall_median_s": median(walls),
        "wall_min_s": min(walls),
        "wall_max_s": max(walls),
        "cpu_median_s": median([s.cpu for s in samples]),
        "maxrss_median_mib": median([s.maxrss_kib for s in samples]) / 1024,
        "walls_s": walls,
        "leftovers": sorted({x for s in samples for x in s.leftovers}),
    }


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median (order statistics; the binomial's
    tails): with `confidence`, the true median of what `values` sample lies in it. Too few values
    for that confidence: their whole range."""
    xs = sorted(values)
    n = len(xs)
    tail = (1 - confidence) / 2
    # the largest k with P(Binomial(n, 1/2) < k) <= tail: [x_(k), x_(n-k+1)] (1-based)
    k, below = 0, 0.0
    while k < n and below + math.comb(n, k) / 2 ** n <= tail:
        below += math.comb(n, k) / 2 ** n
        k += 1
    return (xs[k - 1], xs[n - k]) if k >= 1 else (xs[0], xs[-1])


def spread(values: Sequence[float]) -> dict[str, float]:
    """The median of `values`, its 95 % interval and the interquartile range."""
    low, high = median_interval(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": median(values), "ci95_low": low, "ci95_high": high, "q1": q1, "q3": q3}


def ratio_block(samples: Mapping[str, Sequence[Sample]], key: str, baseline: str) -> dict[str, Any]:
    a, b = samples[key], samples[baseline]
    # Round i of `a` and of `b` ran back to back: their ratio and difference see the same load.
    ratios = [x.wall / y.wall for x, y in zip(a, b)]
    deltas = [x.wall - y.wall for x, y in zip(a, b)]
    cpu_deltas = [x.cpu - y.cpu for x, y in zip(a, b)]
    return {
        "of_medians": median([s.wall for s in a]) / median([s.wall for s in b]),
        "median_of_paired": median(ratios),
        "delta_median_s": median([s.wall for s in a]) - median([s.wall for s in b]),
        "delta_paired_median_s": median(deltas),
        "cpu_delta_paired_median_s": median(cpu_deltas),
        # how far each paired median can be trusted (the spread between runs is the noise to beat)
        "paired_spread": spread(ratios),
        "delta_paired_spread_s": spread(deltas),
        "cpu_delta_paired_spread_s": spread(cpu_deltas),
    }


# --- locating what to run ----------------------------------------------------------------------


def microvmc_command(override: str | None = None) -> tuple[str, ...]:
    """The `microvmc` console script a user of this interpreter runs. A version manager's shim
    (pyenv's is a bash script that execs `pyenv exec`) is skipped: it would time the shim."""
    if override:
        return tuple(override.split())
    beside = Path(sys.executable).parent / "microvmc"
    if beside.is_file() and os.access(beside, os.X_OK):
        return (str(beside),)
    found = shutil.which("microvmc")
    if found:
        return (found,)
    return (sys.executable, "-m", "microvmc")


def path_microvmc() -> str | None:
    """`microvmc` as found on PATH (may be a shim)."""
    return shutil.which("microvmc")


def python_for(microvmc: Sequence[str]) -> str:
    """The interpreter `microvmc` runs under (its shebang), so a baseline uses the same one."""
    first = Path(microvmc[0])
    try:
        head = first.read_bytes()[:256].split(b"\n", 1)[0]
    except OSError:
        return sys.executable
    if head.startswith(b"#!") and b"python" in head:
        interp = head[2:].decode().split()[0]
        if os.access(interp, os.X_OK):
            return interp
    return sys.executable


# --- reporting ---------------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def other_vms() -> int:
    """QEMU processes on this machine that are not ours: other work competing for the CPUs."""
    mine = os.getpid()
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path("/proc", entry, "comm").read_text().strip()
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if comm.startswith("qemu-system") and ppid != mine:
            count += 1
    return count


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "loadavg_start": os.getloadavg()[0],
        "other_vms_start": other_vms(),
    }


def add_common_args(parser: argparse.ArgumentParser, *, reps: int) -> None:
    parser.add_argument("-n", "--reps", type=int, default=reps, help=f"timed runs of each command (default {reps})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--microvmc", metavar="CMD", help="the microvmc command (default: the console script beside this Python)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-run progress on stderr")


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def secs(seconds: float) -> str:
    return f"{seconds:.3f} s"


def emit_report(result: dict[str, Any], text: str, as_json: bool) -> None:
    result.setdefault("machine", {})
    result["machine"]["loadavg_end"] = os.getloadavg()[0]
    result["machine"]["other_vms_end"] = other_vms()
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return
    m = result["machine"]
    print(text)
    if "left_running" in result:  # what the harness had to stop: a benchmarked command's leak
        print("left running (stopped by the benchmark): " + (", ".join(result["left_running"]) or "nothing"))
    print(
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory']}, Linux {m['kernel']}, Python {m['python']}; "
        f"load {m['loadavg_start']:.2f} → {m['loadavg_end']:.2f}; "
        f"other VMs running {m['other_vms_start']} → {m['other_vms_end']}; {result['date']}"
    )
