"""Execs from the root: a guest program that runs `true` from the root file system N times, with the
root's virtiofsd as microvmc starts it for a store image (`cache=always`: the guest keeps what it read
across opens) and the same VM with `cache=auto` (every open drops the file's cached pages, so every exec
reads the program again), and the same VM running nothing (the boot, taken off both). Ratio:
auto / always, per exec.

The VM is the plan of a manifest on the built-in image (`/bin/true` is busybox, ~2 MB), built once by
`microvmc build`; the columns are its launch.sh and that script with `cache=always` made `cache=auto`,
so nothing else differs. The loop is `sh -c 'i=0; while [ $i -lt N ]; do /bin/true; i=$((i+1)); done'`.

    python3 bench/execs.py [-n 5] [--execs 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402

LOOP = "i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done"
MANIFEST = 'version = 1\n\n[process]\nargv = ["/bin/sh", "-c", {loop}]\n'


def launch_script(microvmc: tuple[str, ...], work: str, name: str, loop: str) -> str:
    """launch.sh of the manifest running `loop`, built in `work/name`."""
    directory = os.path.join(work, name)
    os.mkdir(directory)
    with open(os.path.join(directory, "m.toml"), "w") as f:
        f.write(MANIFEST.format(loop=json.dumps(loop)))
    subprocess.run([*microvmc, "build", "m.toml"], cwd=directory, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(directory, "result", "launch.sh")) as f:
        return f.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=5)
    parser.add_argument("--execs", type=int, default=20, metavar="N", help="execs of /bin/true per boot (default 20)")
    args = parser.parse_args(argv)
    m.become_subreaper()
    microvmc = m.microvmc_command(args.microvmc)
    result: dict = {"benchmark": "execs", "machine": m.machine(), "execs": args.execs, "commands": {}}
    with tempfile.TemporaryDirectory(prefix="microvmc-bench-execs-") as work:
        env = {"TMPDIR": work}
        loop = launch_script(microvmc, work, "loop", LOOP.format(n=args.execs))
        boot = launch_script(microvmc, work, "boot", LOOP.format(n=0))
        if "cache=always" not in loop:
            raise SystemExit("bench: the root's virtiofsd does not run with cache=always: nothing to compare")
        scripts = {"always": loop, "auto": loop.replace("cache=always", "cache=auto"), "boot": boot}
        labels = {"always": f"{args.execs} execs, cache=always (microvmc)", "auto": f"{args.execs} execs, cache=auto",
                  "boot": "no exec (the boot), cache=always"}
        commands = []
        for key, text in scripts.items():
            path = os.path.join(work, f"{key}.sh")
            with open(path, "w") as f:
                f.write(text)
            commands.append(m.Command(key=key, label=labels[key], argv=("sh", path), cwd=work, env=env, timeout=600))
        samples = m.interleave(commands, args.reps, warmup=args.warmup, progress=not args.quiet)
    left = m.sweep_leftovers()
    for c in commands:
        result["commands"][c.key] = {"label": c.label, **m.summarize(samples[c.key])}
    # Per round: (loop - boot) / N for each cache mode, then the medians.
    per_exec = {key: m.median([(a.wall - b.wall) / args.execs for a, b in zip(samples[key], samples["boot"])])
                for key in ("always", "auto")}
    result["per_exec_s"] = per_exec
    result["ratio_auto_to_always"] = per_exec["auto"] / per_exec["always"] if per_exec["always"] > 0 else None
    result["left_running"] = list(left)
    rows = [[c.label, m.secs(result["commands"][c.key]["wall_median_s"])] for c in commands]
    ratio = result["ratio_auto_to_always"]
    text = [m.table(rows, ["command", "median"]),
            f"per exec (paired with the boot): cache=always {m.ms(per_exec['always'])}, cache=auto "
            f"{m.ms(per_exec['auto'])}" + (f"; auto / always {ratio:.1f}" if ratio else "")]
    m.emit_report(result, "\n".join(text), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
