"""Concurrent runs: 8 `microvmc run`s of /bin/true started at once on this machine, against one run
alone, alternating in one run of this script. Every run must exit 0; the figures are the wall time of
all 8 (spawned together → the last one reaped), its ratio to a single run, and the peak resident set
of the largest process of a run (its QEMU), from the kernel's accounting of reaped children.

Each run has its own runtime directory and the same store; the state directory is a temporary one.

    python3 bench/concurrency.py [-n 3] [--runs 8] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402

MANIFEST = 'version = 1\n\n[process]\nargv = ["/bin/true"]\n'
# Starts N runs at once, waits for each, and fails (naming the failed ones) unless every one exits 0.
PARALLEL = ('n=$1; shift; i=0; pids=""; while [ $i -lt $n ]; do "$@" & pids="$pids $!"; i=$((i+1)); done; '
            'failed=0; for p in $pids; do wait $p || { echo "run $p failed" >&2; failed=1; }; done; exit $failed')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=3)
    parser.add_argument("--runs", type=int, default=8, metavar="N", help="runs started at once (default 8)")
    args = parser.parse_args(argv)
    m.become_subreaper()
    microvmc = m.microvmc_command(args.microvmc)
    with tempfile.TemporaryDirectory(prefix="microvmc-bench-concurrency-") as work:
        manifest = os.path.join(work, "true.toml")
        with open(manifest, "w") as f:
            f.write(MANIFEST)
        env = {"XDG_STATE_HOME": os.path.join(work, "state"), "TMPDIR": work}
        run = (*microvmc, "run", manifest)
        commands = [
            m.Command(key="one", label="1 run (baseline)", argv=run, cwd=work, env=env),
            m.Command(key="many", label=f"{args.runs} runs at once", argv=("sh", "-c", PARALLEL, "parallel",
                                                                             str(args.runs), *run),
                      cwd=work, env=env, timeout=1200),
        ]
        samples = m.interleave(commands, args.reps, warmup=args.warmup, progress=not args.quiet)
    left = m.sweep_leftovers()
    result = {"benchmark": "concurrency", "machine": m.machine(), "runs": args.runs,
              "commands": {c.key: {"label": c.label, **m.summarize(samples[c.key])} for c in commands},
              "many_vs_one": m.ratio_block(samples, "many", "one"), "left_running": list(left)}
    rows = [[c.label, m.secs(result["commands"][c.key]["wall_median_s"]),
             f"{result['commands'][c.key]['maxrss_median_mib']:.0f} MiB"] for c in commands]
    r = result["many_vs_one"]
    text = [m.table(rows, ["command", "median", "peak RSS of one run's largest process"]),
            f"{args.runs} at once / 1: {r['of_medians']:.2f} (ratio of medians), {r['median_of_paired']:.2f} (paired); "
            f"{os.cpu_count()} CPUs, one vCPU per VM; all {args.runs} exited 0 in every round"]
    m.emit_report(result, "\n".join(text), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
