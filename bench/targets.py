"""Issue 10's benchmarks in one table: each figure beside its target, from the benchmarks that measure
it, run one after another in their own interpreters (`--json`). A ratio meets its target when both
the ratio of medians and the median of the paired ratios do; when they disagree the row says so
(the machine was too noisy to tell).

    python3 bench/targets.py [-n N] [--json] [--skip virtme]

Rows: `microvmc run` of `true` on the own kernel / on the Debian kernel (kernel.py, ≤ 0.25); `microvmc
run` / the same VM from a hand-written script (run_true.py, ≤ 1.03); against virtme-ng, own kernel and
both on Debian (virtme.py, ≤ 0.1); QEMU start → program exec and → QEMU exit on the own kernel
(boot_phases.py, uninstrumented, ≤ 0.4 s and ≤ 0.6 s); virtio-fs against 9p, the boot and reading a
file (shares.py); 8 concurrent runs on this machine (concurrency.py: all exit 0, the total time, peak
RSS per VM). `-n` goes to every benchmark (default: each one's own).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("kernel", "run_true", "virtme", "boot_phases", "shares", "concurrency")


def verdict(of_medians: float, paired: float, target: float) -> str:
    met = (of_medians <= target, paired <= target)
    return "met" if all(met) else "NOT met" if not any(met) else "too noisy to tell"


def ratio_row(label: str, block: dict[str, float], target: float | None, where: str) -> list[str]:
    figure = f"{block['of_medians']:.3f} (paired {block['median_of_paired']:.3f})"
    return [label, figure, f"≤ {target}" if target is not None else "",
            verdict(block["of_medians"], block["median_of_paired"], target) if target is not None else "", where]


def rows_of(results: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    if "kernel" in results:
        r = results["kernel"]
        rows.append(ratio_row("run of true: own kernel / Debian kernel", r["own_vs_debian"], r["target"], "kernel.py"))
    if "run_true" in results:
        r = results["run_true"]
        rows.append(ratio_row("run of true / the same VM by a hand-written script", r["ratios"]["microvmc/baseline"],
                              r["target"], "run_true.py"))
        if r.get("differences"):  # (run_true.py names them)
            rows.append(["  the baseline is NOT the plan's VM: the figure above is void", "", "", "", ""])
    if "virtme" in results:
        r = results["virtme"]
        rows.append(ratio_row("microvmc (own kernel) / virtme-ng (Debian kernel)", r["own_vs_vng"], r["target"], "virtme.py"))
        rows.append(ratio_row("microvmc / virtme-ng, both on the Debian kernel", r["debian_vs_vng"], r["target"], "virtme.py"))
    if "boot_phases" in results:
        own = results["boot_phases"]["uninstrumented"]["own"]
        for key, target in (("QEMU start → program exec (host)", 0.4), ("QEMU start → QEMU exit (host)", 0.6)):
            rows.append([f"{key}, own kernel, TCG", f"{own[key]:.3f} s", f"≤ {target} s",
                         "met" if own[key] <= target else "NOT met", "boot_phases.py"])
    if "shares" in results:
        r = results["shares"]
        rows.append(ratio_row("9p / virtio-fs: the boot with a share", r["ratios"]["boot"], None, "shares.py"))
        read = r["read_seconds"]
        speeds = ", ".join(f"{t} {r['size_mib'] / s:.0f} MiB/s" for t, s in read.items() if s > 0)
        rows.append(ratio_row(f"9p / virtio-fs: the boot + reading {r['size_mib']} MiB", r["ratios"]["read"], None,
                              "shares.py")[:1] + [f"{r['ratios']['read']['of_medians']:.3f} ({speeds})", "", "", "shares.py"])
    if "concurrency" in results:
        r = results["concurrency"]
        many = r["commands"]["many"]
        rows.append([f"{r['runs']} runs at once on {os.cpu_count()} cores: all exit 0",
                     f"{many['wall_median_s']:.2f} s in all, {many['maxrss_median_mib']:.0f} MiB peak RSS per VM",
                     "all succeed", "met", "concurrency.py"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--reps", type=int, help="timed runs of each command, for every benchmark")
    parser.add_argument("--json", action="store_true", help="print every benchmark's JSON and the table's rows")
    parser.add_argument("--skip", action="append", default=[], choices=BENCHMARKS, help="leave a benchmark out")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-run progress on stderr")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    failed: list[str] = []
    for name in (b for b in BENCHMARKS if b not in args.skip):
        options = ["--json", *(["-n", str(args.reps)] if args.reps else []), *(["-q"] if args.quiet else [])]
        if not args.quiet:
            print(f"targets: {name}.py", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, os.path.join(HERE, f"{name}.py"), *options],
                              stdout=subprocess.PIPE, text=True)
        try:
            results[name] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            failed.append(f"{name}.py exited {proc.returncode} without a result")
            continue
        if proc.returncode != 0:
            failed.append(f"{name}.py exited {proc.returncode}")
    rows = rows_of(results)
    header = ["measure", "figure", "target", "verdict", "benchmark"]
    if args.json:
        sys.stdout.write(json.dumps({"benchmarks": results, "rows": [dict(zip(header, r)) for r in rows],
                                     "failed": failed, "machine": m.machine()}, indent=2, sort_keys=True) + "\n")
    else:
        print(m.table(rows, header))
        for line in failed:
            print(f"FAILED: {line}")
        machine = m.machine()
        print(f"machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory']}, Linux {machine['kernel']}; "
              f"load at the end {os.getloadavg()[0]:.2f}; other VMs running {m.other_vms()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
