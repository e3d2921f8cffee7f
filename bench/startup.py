"""Start-up cost: `microvmc --help` against the interpreter starting and doing nothing.

Columns, interleaved round by round:
  python -c pass                    the baseline: the interpreter microvmc's script runs under
  python -c "import microvmc.cli"   what importing the command line costs
  microvmc --help                   the console script, as a user runs it
and, when `microvmc` on PATH is not that script (a pyenv shim), that too, for information.

Then which heavy modules `microvmc --help` imports (python -X importtime): there should be none.

    python3 bench/startup.py [-n 20] [--json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402

HEAVY = ("jsonschema", "networkx", "elftools", "zstandard")


def imported_modules(python: str, argv: list[str]) -> list[tuple[str, int, int, int]]:
    """(module, depth, self µs, cumulative µs) for each module that `python -X importtime argv`
    imports, in the order importtime prints them (an import after the ones it triggered)."""
    proc = subprocess.run([python, "-X", "importtime", *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    found = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, raw = line[len("import time:"):].split("|")
        depth = (len(raw) - len(raw.lstrip()) - 1) // 2  # two spaces per level of nesting
        found.append((raw.strip(), depth, int(self_us), int(cumulative_us)))
    return found


def heavy_imports(modules: list[tuple[str, int, int, int]]) -> dict[str, int]:
    """For each heavy package imported: µs spent importing it and everything it pulled in, i.e.
    the cumulative time of its outermost entries (a package may be first imported piecemeal,
    e.g. `elftools.elf.elffile` before `elftools`)."""
    def parent(i: int) -> int | None:
        # importtime prints a module after the imports it triggered, one level deeper.
        for j in range(i + 1, len(modules)):
            if modules[j][1] < modules[i][1]:
                return j
        return None

    costs: dict[str, int] = {}
    for i, (name, _depth, _self, cumulative) in enumerate(modules):
        package = name.split(".")[0]
        if package not in HEAVY:
            continue
        j = parent(i)
        while j is not None and modules[j][0].split(".")[0] != package:
            j = parent(j)
        if j is None:  # no ancestor in the same package: this entry is an outermost one
            costs[package] = costs.get(package, 0) + cumulative
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=20)
    args = parser.parse_args(argv)
    m.become_subreaper()

    microvmc = m.microvmc_command(args.microvmc)
    python = m.python_for(microvmc)
    commands = [
        m.Command(key="python", label="python -c pass (baseline)", argv=(python, "-c", "pass")),
        m.Command(key="import", label="python -c 'import microvmc.cli'", argv=(python, "-c", "import microvmc.cli")),
        m.Command(key="help", label="microvmc --help", argv=(*microvmc, "--help")),
    ]
    on_path = m.path_microvmc()
    if on_path and on_path != microvmc[0] and not args.microvmc:
        commands.append(m.Command(key="help_path", label=f"microvmc --help via PATH ({on_path})", argv=(on_path, "--help")))

    result = {"benchmark": "startup", "machine": m.machine(), "python": python, "microvmc": list(microvmc)}
    samples = m.interleave(commands, args.reps, warmup=args.warmup, progress=not args.quiet)
    result["commands"] = {c.key: dict(m.summarize(samples[c.key]), label=c.label, argv=list(c.argv)) for c in commands}
    result["ratios"] = {c.key: m.ratio_block(samples, c.key, "python") for c in commands if c.key != "python"}

    # What follows the interpreter: the console script itself, or "-m microvmc" for an override.
    is_interpreter = os.path.basename(microvmc[0]).startswith("python")
    script_argv = [*(microvmc[1:] if is_interpreter else microvmc), "--help"]
    modules = imported_modules(python, script_argv)
    result["imports"] = {
        "modules": len(modules),
        "heavy": heavy_imports(modules),
        "microvmc_modules": sorted(n for n, _, _, _ in modules if n.startswith("microvmc")),
        "top_cumulative_us": sorted(((n, c) for n, d, _, c in modules if d == 0), key=lambda x: -x[1])[:8],
    }

    rows = []
    for c in commands:
        s = result["commands"][c.key]
        r = result["ratios"].get(c.key)
        rows.append([
            c.label, m.ms(s["wall_median_s"]), m.ms(s["wall_min_s"]), m.ms(s["cpu_median_s"]),
            f"{s['maxrss_median_mib']:.1f} MiB",
            f"{r['of_medians']:.2f}x" if r else "1.00x",
            f"+{m.ms(r['delta_median_s'])}" if r else "",
        ])
    heavy = result["imports"]["heavy"]
    text = "\n".join([
        f"startup: {args.reps} runs each, interleaved; ratio = median / median of the baseline",
        m.table(rows, ["command", "median", "min", "cpu", "peak rss", "ratio", "delta"]),
        "",
        f"microvmc --help imports {result['imports']['modules']} modules; heavy ones ({', '.join(HEAVY)}): "
        + (", ".join(f"{k} ({v / 1000:.0f} ms)" for k, v in heavy.items()) if heavy else "none"),
        "largest top-level imports: "
        + ", ".join(f"{n} {c / 1000:.1f} ms" for n, c in result["imports"]["top_cumulative_us"]),
    ])
    m.emit_report(result, text, args.json)
    return 1 if heavy else 0


if __name__ == "__main__":
    sys.exit(main())
