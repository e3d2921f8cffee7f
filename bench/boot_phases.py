"""Where a boot's time goes, on microvmc's own kernel and on the Debian kernel: from the host's clock,
QEMU's start → the kernel's first message → its landmarks → /init → the end of the run, next to what
the guest's own clock says of the same stretches. Medians over alternating rounds.

Method (published beside the numbers in bench/README.md):
- The VM is the plan of `version = 1 / [kernel] source = ... / [process] argv = ["/bin/true"]`, built
  by `microvmc build` with `kernel.cmdline = ["loglevel=7", "printk.time=1"]` (microvmc's command line
  has `earlyprintk=serial,ttyS0` already): the kernel writes every message at once, from its first
  one, to the serial port, stamped with its own clock.
- The generated launch.sh runs it, with one change: the console chardev is a FIFO this script reads
  (instead of the run's console log), stamping each line with the host's monotonic clock as it
  arrives. Time 0 is when launch.sh is spawned (it starts virtiofsd, then QEMU).
- Each landmark line then has two times: when the host saw it, and the guest's own stamp. Where the
  two clocks disagree, the guest clock was not running (early boot, before the kernel's TSC clock
  takes over): that is time only the host can see.
- The same manifest without the two parameters, run by `microvmc run` (no change at all), gives the
  uninstrumented figures from the run's timeline: QEMU start → the program's exec and → QEMU's exit,
  and the run's own phases (its host marks: the kernel's first message, init's first line, ...).

    python3 bench/boot_phases.py [-n 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402

KERNELS = (("own", "microvmc", "own kernel"), ("debian", "debian", "Debian kernel"))
# (microvmc's own command line already has earlyprintk=serial,ttyS0 at loglevel=6: its notices from the first one)
INSTRUMENT = ["loglevel=7", "printk.time=1"]
CONSOLE_OPTION = "path=/dev/fd/5,append=on"  # the console chardev in launch.sh (compiler/qemu.py)

# Landmarks in the kernel's messages; a stretch is named by the message it ends at, and the stretches
# are in the order the host saw them (kernels differ: Debian's patches alternatives after SMP set-up).
FIRST = "QEMU start, firmware, kernel entry → the first message"
LANDMARKS = ("tsc: Detected", "printk: console [", "Freeing SMP alternatives memory", "smpboot: CPU0:",
             "Unpacking initramfs", "Freeing unused kernel image (initmem)", "Run /init as init process")
END = "init, the program, shutdown → launch.sh exits"
STAMP = re.compile(r"\[\s*(\d+\.\d+)\] (.*)$")


def _read_console(fifo: Path, t0: float, lines: list[tuple[float, str]]) -> None:
    with open(fifo, "rb") as f:  # opens when QEMU opens its end
        for raw in f:
            lines.append((time.monotonic() - t0, raw.decode("utf-8", "replace").rstrip("\r\n")))


def marks(lines: list[tuple[float, str]], ended: float) -> list[tuple[str, float, float | None]]:
    """(stretch, host time, guest stamp) of the first message, each landmark seen, and the end, in
    the order the host saw them."""
    found: dict[str, tuple[float, float | None]] = {}
    if lines:
        found[FIRST] = (lines[0][0], None)
    for host, line in lines:
        stamp = STAMP.search(line)  # (none on the lines printed before printk.time=1 is parsed)
        for text in LANDMARKS:
            if f"→ {text}" not in found and text in line:
                found[f"→ {text}"] = (host, float(stamp.group(1)) if stamp else None)
    found[END] = (ended, None)
    return sorted(((label, host, guest) for label, (host, guest) in found.items()), key=lambda item: item[1])


def stretches(found: list[tuple[str, float, float | None]]) -> dict[str, dict[str, float]]:
    """Host and guest durations of each stretch, in order."""
    out: dict[str, dict[str, float]] = {}
    host_before, guest_before = 0.0, 0.0
    for label, host, guest in found:
        row = {"host_s": host - host_before}
        if guest is not None:
            row["guest_s"] = guest - guest_before
            guest_before = guest
        out[label] = row
        host_before = host
    return out


def traced_boot(script: Path, work: Path) -> dict[str, dict[str, float]]:
    fifo = work / "console.fifo"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    reader = threading.Thread(target=_read_console, args=(fifo, t0, lines), daemon=True)
    reader.start()
    r = subprocess.run(["sh", str(script)], cwd=work, capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    ended = time.monotonic() - t0
    reader.join(10)
    if r.returncode != 0:
        raise SystemExit(f"bench: {script}: exited {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}")
    return stretches(marks(lines, ended))


def _timeline(microvmc, manifest: Path, state: Path) -> dict[str, float]:
    """An uninstrumented `microvmc run`'s host marks (QEMU start → exec, → exit) and guest kernel time."""
    r = subprocess.run([*microvmc, "--state", str(state), "run", "--name", "bench", str(manifest)],
                       capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"bench: {manifest}: microvmc run exited {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}")
    timeline = json.loads(next((state / "runs").glob("*/timeline.json")).read_text())
    subprocess.run([*microvmc, "--state", str(state), "rm", "bench"], capture_output=True, timeout=60)
    host, guest = timeline["host_seconds"], timeline["guest_ms"]
    out = {"QEMU start → program exec (host)": host["started"] - host["qemu"],
           "QEMU start → QEMU exit (host)": host["qemu-exited"] - host["qemu"],
           "kernel by the guest clock (its zero → /init)": guest["init"] / 1000}
    # The run's own phases, from the host's marks of console lines (no kernel messages beyond its notices).
    for phase, seconds in timeline.get("phases_seconds", {}).items():
        out[f"phase {phase}"] = seconds
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=5)
    args = parser.parse_args(argv)
    m.become_subreaper()
    microvmc = m.microvmc_command(args.microvmc)
    traced: dict[str, list[dict]] = {key: [] for key, _, _ in KERNELS}
    plain: dict[str, list[dict]] = {key: [] for key, _, _ in KERNELS}
    with tempfile.TemporaryDirectory(prefix="microvmc-bench-boot-") as tmp:
        work = Path(tmp)
        scripts, manifests = {}, {}
        for key, source, _ in KERNELS:
            for instrumented in (True, False):
                extra = f"cmdline = {json.dumps(INSTRUMENT)}\n" if instrumented else ""
                path = work / f"{key}{'-traced' if instrumented else ''}.toml"
                path.write_text(f'version = 1\n\n[kernel]\nsource = "{source}"\n{extra}\n[process]\nargv = ["/bin/true"]\n')
                manifests[(key, instrumented)] = path
            out = work / f"{key}-out"
            subprocess.run([*microvmc, "build", "-o", str(out), str(manifests[(key, True)])], check=True,
                           capture_output=True, timeout=1200)
            script = (out / "launch.sh").read_text()
            if script.count(CONSOLE_OPTION) != 1:
                raise SystemExit(f"bench: launch.sh no longer has one console option {CONSOLE_OPTION!r}")
            scripts[key] = work / f"{key}-traced.sh"
            scripts[key].write_text(script.replace(CONSOLE_OPTION, f"path={work / 'console.fifo'}"))
        for round_ in range(args.warmup + args.reps):
            keys = [key for key, _, _ in KERNELS]
            for key in keys[round_ % 2:] + keys[:round_ % 2]:
                once = traced_boot(scripts[key], work)
                again = _timeline(microvmc, manifests[(key, False)], work / "state")
                if round_ >= args.warmup:
                    traced[key].append(once)
                    plain[key].append(again)
                if not args.quiet:
                    print(f"bench: round {round_ + 1}: {key}: traced {sum(r['host_s'] for r in once.values()):.3f} s, "
                          f"run {again['QEMU start → QEMU exit (host)']:.3f} s", file=sys.stderr)
        shutil.rmtree(work / "state", ignore_errors=True)
    left = m.sweep_leftovers()
    result: dict = {"benchmark": "boot_phases", "machine": m.machine(), "reps": args.reps, "instrumented": INSTRUMENT,
                    "traced": {}, "uninstrumented": {}, "left_running": list(left)}
    text = []
    for key, _, label in KERNELS:
        rows, medians = [], {}
        order = list(dict.fromkeys(label for run in traced[key] for label in run))
        for stretch in order:
            hosts = [run[stretch]["host_s"] for run in traced[key] if stretch in run]
            guests = [run[stretch]["guest_s"] for run in traced[key] if stretch in run and "guest_s" in run[stretch]]
            if not hosts:
                continue
            medians[stretch] = {"host_s": m.median(hosts), **({"guest_s": m.median(guests)} if guests else {})}
            rows.append([stretch, f"{medians[stretch]['host_s']:.3f}",
                         f"{medians[stretch]['guest_s']:.3f}" if guests else "-"])
        total = m.median([sum(r["host_s"] for r in run.values()) for run in traced[key]])
        rows.append(["total (launch.sh spawned → exited)", f"{total:.3f}", ""])
        uninstrumented = {k: m.median([run[k] for run in plain[key] if k in run]) for k in plain[key][0]}
        for name, seconds in uninstrumented.items():
            rows.append([f"uninstrumented microvmc run: {name}", f"{seconds:.3f}", ""])
        result["traced"][key] = medians
        result["uninstrumented"][key] = uninstrumented
        text.append(f"{label}, medians of {args.reps} (host: as the host saw it; guest: the kernel's own stamps)\n"
                    + m.table(rows, ["stretch", "host s", "guest s"]))
    m.emit_report(result, "\n\n".join(text), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
