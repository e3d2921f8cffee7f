"""The guest kernel: `microvmc run` of /bin/true on microvmc's own kernel (`microvmc kernel build`,
everything built in, PVH vmlinux) against the same run on the Debian kernel (bzImage unpacked to its
PVH vmlinux, modules loaded from the initramfs), alternating, in one run of this script.
Target (issue 10): own / Debian <= 0.25 (ratio of medians, and the median of paired ratios).

The manifests (written to a temporary directory) differ only in kernel.source ("microvmc" / "debian").

    python3 bench/kernel.py [-n 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402

TARGET = 0.25
MANIFEST = 'version = 1\n\n[kernel]\nsource = "{source}"\n\n[process]\nargv = ["/bin/true"]\n'


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    m.add_common_args(parser, reps=5)
    args = parser.parse_args(argv)
    microvmc = m.microvmc_command(args.microvmc)
    m.become_subreaper()
    with tempfile.TemporaryDirectory(prefix="microvmc-bench-kernel-") as tmp:
        commands = []
        for key, source, label in (("own", "microvmc", "microvmc run, own kernel"),
                                   ("debian", "debian", "microvmc run, Debian kernel")):
            path = os.path.join(tmp, f"{key}.toml")
            with open(path, "w") as f:
                f.write(MANIFEST.format(source=source))
            commands.append(m.Command(key=key, label=label, argv=(*microvmc, "run", path), cwd=tmp))
        samples = m.interleave(commands, args.reps, warmup=args.warmup, progress=not args.quiet)
    result = {
        "machine": m.machine(),
        "commands": {c.key: {"label": c.label, **m.summarize(samples[c.key])} for c in commands},
        "own_vs_debian": m.ratio_block(samples, "own", "debian"),
        "target": TARGET,
    }
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return 0
    rows = [[c.label, f"{result['commands'][c.key]['wall_median_s']:.3f}",
             f"{result['commands'][c.key]['wall_min_s']:.3f}"] for c in commands]
    print(m.table(rows, ["command", "median s", "min s"]))
    r = result["own_vs_debian"]
    print(f"own / Debian: {r['of_medians']:.3f} (ratio of medians), {r['median_of_paired']:.3f} (median of paired); "
          f"target <= {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
