"""Shares: virtio-fs against 9p, for the boot of a VM with a share and for reading a large file from
it in the guest, the two transports alternating in one run of this script. Ratios are 9p / virtio-fs.

The share is a temporary directory holding one file of random bytes (--size MiB, default 256); the
program is `true` (the boot) or `cat /data/big > /dev/null` (boot + read), on the default kernel, the
root and everything else as microvmc sets them up; the manifests differ only in shares.data.transport.

    python3 bench/shares.py [-n 3] [--size 256] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402

MANIFEST = """version = 1

[resources]
timeout = 900

[process]
argv = {argv}

[shares.data]
host = "data"
guest = "/data"
read_only = true
transport = "{transport}"
"""
PROGRAMS = (("boot", '["/bin/true"]'), ("read", '["/bin/sh", "-c", "cat /data/big > /dev/null"]'))
TRANSPORTS = ("virtiofs", "9p")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=3)
    parser.add_argument("--size", type=int, default=256, metavar="MIB", help="the file read in the guest (default 256)")
    args = parser.parse_args(argv)
    m.become_subreaper()
    microvmc = m.microvmc_command(args.microvmc)
    result: dict = {"benchmark": "shares", "machine": m.machine(), "size_mib": args.size, "commands": {}, "ratios": {}}
    with tempfile.TemporaryDirectory(prefix="microvmc-bench-shares-") as work:
        os.mkdir(os.path.join(work, "data"))
        with open(os.path.join(work, "data", "big"), "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1 << 20))
        commands = []
        for program, program_argv in PROGRAMS:
            for transport in TRANSPORTS:
                path = os.path.join(work, f"{program}-{transport}.toml")
                with open(path, "w") as f:
                    f.write(MANIFEST.format(argv=program_argv, transport=transport))
                label = f"{'boot' if program == 'boot' else f'boot + read {args.size} MiB'} over {transport}"
                commands.append(m.Command(key=f"{program}-{transport}", label=label, argv=(*microvmc, "run", path),
                                          cwd=work, env={"XDG_STATE_HOME": os.path.join(work, "state"), "TMPDIR": work},
                                          timeout=1200))
        samples = m.interleave(commands, args.reps, warmup=args.warmup, progress=not args.quiet)
    left = m.sweep_leftovers()
    for c in commands:
        result["commands"][c.key] = {"label": c.label, **m.summarize(samples[c.key])}
    for program, _ in PROGRAMS:
        result["ratios"][program] = m.ratio_block(samples, f"{program}-9p", f"{program}-virtiofs")
    result["left_running"] = list(left)
    rows = [[c.label, m.secs(result["commands"][c.key]["wall_median_s"]),
             f"{result['commands'][c.key]['maxrss_median_mib']:.0f} MiB"] for c in commands]
    read = {t: result["commands"][f"read-{t}"]["wall_median_s"] - result["commands"][f"boot-{t}"]["wall_median_s"]
            for t in TRANSPORTS}
    result["read_seconds"] = read
    text = [m.table(rows, ["command", "median", "peak RSS"]),
            *(f"9p / virtio-fs, {program}: {r['of_medians']:.3f} (ratio of medians), {r['median_of_paired']:.3f} (paired)"
              for program, r in result["ratios"].items()),
            "the read alone (boot + read − boot): " + ", ".join(
                f"{t} {s:.2f} s ({args.size / s:.0f} MiB/s)" if s > 0 else f"{t} {s:.2f} s" for t, s in read.items())]
    m.emit_report(result, "\n".join(text), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
