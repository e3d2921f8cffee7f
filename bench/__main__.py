"""Run every benchmark, each in its own interpreter: `python3 -m bench [--json] [-q] [name ...]`.

Names: startup, cached_build, run_true, images, lifecycle, kernel, boot_phases, shares, execs, concurrency, network, virtme (default: all, in that order; virtme needs `scripts/setup --bench`). --json prints one JSON object
keyed by name; otherwise each benchmark's table in turn. Other options (e.g. -n) go to every benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("startup", "cached_build", "run_true", "images", "lifecycle", "kernel", "boot_phases", "shares", "execs", "concurrency", "network", "virtme")


def main(argv: list[str]) -> int:
    names = [a for a in argv if a in BENCHMARKS] or list(BENCHMARKS)
    options = [a for a in argv if a not in BENCHMARKS]
    as_json = "--json" in options
    if any(a in ("-h", "--help") for a in options):
        print(__doc__)
        return 0
    results, status = {}, 0
    for name in names:
        proc = subprocess.run([sys.executable, os.path.join(HERE, f"{name}.py"), *options],
                              stdout=subprocess.PIPE if as_json else None, text=True)
        status = max(status, proc.returncode)
        if as_json:
            try:
                results[name] = json.loads(proc.stdout)
            except json.JSONDecodeError:
                results[name] = {"error": f"exited {proc.returncode} without JSON"}
        else:
            print()
    if as_json:
        sys.stdout.write(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
