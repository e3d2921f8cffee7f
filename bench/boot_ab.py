"""Paired A/B of boot cuts: variants of one VM (kernel command line, kernel image, -cpu, machine
options) booted in alternation, each boot timed from the host: the kernel's first console message,
init's first line, the whole of launch.sh, and the CPU time it took. The first variant is the baseline.

Method:
- The VM is the plan of `--manifest` (default: `version = 1 / [process] argv = ["/bin/true"]`, the
  default kernel), built by `microvmc build`; its generated launch.sh is the baseline, with its
  console chardev pointed at a FIFO this script reads, stamping each line with the host's monotonic
  clock as it arrives (time 0: `sh launch.sh` spawned; it starts virtiofsd, then QEMU).
- A variant is that launch.sh with edits, `;`-separated: `append:ARGS` (kernel parameters, before
  microvmc's MVMC_ ones), `drop:ARG` (a kernel parameter removed), `kernel:PATH`, `initrd:PATH`,
  `cpu:MODEL` (QEMU's -cpu), `machine:OPTS` (appended to -M microvm,...), `accel:OPTS` (appended to
  -accel tcg), `device:NAME,OPTS` (appended to the options of the first `-device NAME`).
- Rounds rotate the order of the variants (ABC, BCA, CAB, ...); after the warm-up rounds, each boot
  gives: the host time of the first console line (`first`), of init's `microvmc-init: started` line
  (`init`), of launch.sh's exit (`total`), and the user + system CPU time of everything launch.sh ran
  (`cpu`: QEMU's emulation mostly, which a busy host stretches less than wall time). Reported: the
  medians, and the median over rounds of each variant's difference from the baseline in the same
  round (`paired`), for wall and CPU time.

    python3 bench/boot_ab.py [-n 8] base= cut="append:noapictimer" cpu="cpu:max,-erms"
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402

CONSOLE_OPTION = "path=/dev/fd/5,append=on"  # the console chardev in launch.sh (compiler/qemu.py)
INIT_MARK = "microvmc-init: started"
TRUE = 'version = 1\n\n[process]\nargv = ["/bin/true"]\n'


def variant(script: str, spec: str, fifo: Path) -> str:
    """launch.sh with a variant's edits; each edit must apply."""
    s = script.replace(CONSOLE_OPTION, f"path={fifo}")
    for edit in filter(None, spec.split(";")):
        kind, _, value = edit.partition(":")
        before = s
        if kind == "append":
            s = s.replace(" MVMC_", f" {value} MVMC_", 1)
        elif kind == "drop":
            s = re.sub(rf"(-append '[^']*?) {re.escape(value)}(?= )", r"\1", s, count=1)
        elif kind == "kernel":
            s = re.sub(r"-kernel \S+", f"-kernel {value}", s, count=1)
        elif kind == "initrd":
            s = re.sub(r"-initrd \S+", f"-initrd {value}", s, count=1)
        elif kind == "cpu":
            s = re.sub(r"-cpu \S+", f"-cpu {value}", s, count=1)
        elif kind == "machine":
            s = re.sub(r"(-M microvm\S*)", rf"\1,{value}", s, count=1)
        elif kind == "accel":
            s = re.sub(r"(-accel \S+)", rf"\1,{value}", s, count=1)
        elif kind == "device":
            name, _, opts = value.partition(",")
            s = re.sub(rf"(-device {re.escape(name)}(?=[,\s])\S*)", rf"\1,{opts}", s, count=1)
        else:
            raise SystemExit(f"bench: {edit!r}: not an edit (append, drop, kernel, initrd, cpu, machine, accel, device)")
        if s == before:
            raise SystemExit(f"bench: {edit!r} changes nothing in launch.sh")
    return s


def boot(script: Path, fifo: Path) -> dict[str, float | None]:
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        with open(fifo, "rb") as f:  # opens when QEMU opens its end
            for raw in f:
                lines.append((time.monotonic() - t0, raw.decode("utf-8", "replace")))

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    r = subprocess.run(["sh", str(script)], capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    total = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    reader.join(10)
    if r.returncode != 0:
        console = "".join(line for _, line in lines[-8:])
        raise SystemExit(f"bench: {script.name}: exited {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}"
                         f"\nthe console's last lines:\n{console}")
    return {"first": lines[0][0] if lines else None,
            "init": next((t for t, line in lines if INIT_MARK in line), None),
            "total": total,
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=8)
    parser.add_argument("--manifest", help="the VM to boot (default: /bin/true on the default kernel)")
    parser.add_argument("variants", nargs="+", metavar="NAME=EDITS", help="the first is the baseline")
    args = parser.parse_args(argv)
    m.become_subreaper()
    microvmc = m.microvmc_command(args.microvmc)
    names = [v.partition("=")[0] for v in args.variants]
    if len(set(names)) != len(names) or not all(names):
        raise SystemExit("bench: each variant needs a name of its own (NAME=EDITS)")
    samples: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="microvmc-bench-ab-") as tmp:
        work = Path(tmp)
        manifest = Path(args.manifest) if args.manifest else work / "true.toml"
        if not args.manifest:
            manifest.write_text(TRUE)
        subprocess.run([*microvmc, "build", "-o", str(work / "out"), str(manifest)], check=True, capture_output=True,
                       timeout=1200)
        script = (work / "out" / "launch.sh").read_text()
        if script.count(CONSOLE_OPTION) != 1:
            raise SystemExit(f"bench: launch.sh no longer has one console option {CONSOLE_OPTION!r}")
        scripts = {}
        for name, spec in (v.partition("=")[::2] for v in args.variants):
            scripts[name] = work / f"{name}.sh"
            scripts[name].write_text(variant(script, spec, work / f"{name}.fifo"))
        for round_ in range(args.warmup + args.reps):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                once = boot(scripts[name], work / f"{name}.fifo")
                if round_ >= args.warmup:
                    samples[name].append(once)
                if not args.quiet:
                    print(f"bench: round {round_ + 1}: {name}: {once['total']:.3f} s, cpu {once['cpu']:.3f} s",
                          file=sys.stderr)
    left = m.sweep_leftovers()
    base = names[0]

    def med(name: str, key: str) -> float | None:
        values = [s[key] for s in samples[name] if s[key] is not None]
        return m.median(values) if values else None

    def paired(name: str, key: str) -> float:
        return m.median([s[key] - b[key] for s, b in zip(samples[name], samples[base])])

    result = {"benchmark": "boot_ab", "machine": m.machine(), "reps": args.reps, "variants": dict(
        (v.partition("=")[0], v.partition("=")[2]) for v in args.variants), "samples": samples,
        "medians": {n: {k: med(n, k) for k in ("first", "init", "total", "cpu")} for n in names},
        "paired": {n: {"total": paired(n, "total"), "cpu": paired(n, "cpu")} for n in names[1:]},
        "left_running": list(left)}
    rows = []
    for name in names:
        cells = [f"{v:.3f}" if v is not None else "-" for v in (med(name, k) for k in ("first", "init", "total", "cpu"))]
        diff = ["", ""] if name == base else [f"{paired(name, 'total'):+.3f}", f"{paired(name, 'cpu'):+.3f}"]
        rows.append([name + (" (baseline)" if name == base else ""), *cells, *diff])
    text = (f"boots of one VM with edits, alternated: medians of {args.reps} (host clock, from launch.sh's start)\n"
            + m.table(rows, ["variant", "first msg s", "init s", "total s", "cpu s", "paired total", "paired cpu"]))
    m.emit_report(result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
