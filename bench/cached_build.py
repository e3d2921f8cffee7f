"""A cached build: `microvmc build examples/hello.toml` when every store path already exists,
against the interpreter importing tomllib (the least a TOML-reading Python tool can do).

The warm-up round builds whatever is missing, so the timed rounds find everything in the store.
Then, where the time goes:
  - each stage of the build in a fresh interpreter (medians of --stage-reps runs), first pass
    (what the command pays, lazy imports included) and a second pass in the same process (the
    same work with every module imported: first minus second ≈ import cost);
  - cProfile: the 10 functions with the largest cumulative time in one in-process build;
  - python -X importtime: the heavy packages the build imports, and what they cost.

    python3 bench/cached_build.py [-n 10] [--manifest examples/hello.toml] [--store DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402
from startup import HEAVY, heavy_imports, imported_modules  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MANIFEST = os.path.join(os.path.dirname(HERE), "examples", "hello.toml")


def stage_breakdown(python: str, manifest: str, out_dir: str, store: str | None, reps: int) -> dict:
    extra = ["--store", store] if store else []
    runs = []
    for _ in range(reps):
        proc = subprocess.run([python, os.path.join(HERE, "_stages.py"), manifest, out_dir, *extra],
                              capture_output=True, text=True, timeout=300, cwd=out_dir)
        data = _json_or_error(proc)
        if "error" in data:
            return data
        runs.append(data)
        m.sweep_leftovers()
    names = list(runs[0]["first"])
    return {
        "reps": reps,
        "first_median_s": {n: m.median([r["first"][n] for r in runs]) for n in names},
        "second_median_s": {n: m.median([r["second"][n] for r in runs]) for n in names},
    }


def profile_top(python: str, manifest: str, out_dir: str, store: str | None) -> dict:
    extra = ["--store", store] if store else []
    proc = subprocess.run([python, os.path.join(HERE, "_stages.py"), manifest, out_dir, *extra, "--profile"],
                          capture_output=True, text=True, timeout=300, cwd=out_dir)
    m.sweep_leftovers()
    return _json_or_error(proc)


def _json_or_error(proc: subprocess.CompletedProcess) -> dict:
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": f"_stages.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=10)
    parser.add_argument("--manifest", default=DEFAULT_MANIFEST, help="the manifest to build (default examples/hello.toml)")
    parser.add_argument("--store", metavar="DIR", help="the store (default: microvmc's default store)")
    parser.add_argument("--stage-reps", type=int, default=5, help="fresh interpreters for the stage breakdown (default 5)")
    args = parser.parse_args(argv)
    m.become_subreaper()

    microvmc = m.microvmc_command(args.microvmc)
    python = m.python_for(microvmc)
    manifest = os.path.abspath(args.manifest)
    store_args = ("--store", os.path.abspath(args.store)) if args.store else ()
    work = tempfile.mkdtemp(prefix="microvmc-bench-build-")
    try:
        commands = [
            m.Command(key="python", label="python -c 'import tomllib' (baseline)", argv=(python, "-c", "import tomllib")),
            m.Command(key="build", label=f"microvmc build {os.path.basename(manifest)} (cached)",
                      argv=(*microvmc, "build", manifest, *store_args), cwd=work),
        ]
        result: dict = {"benchmark": "cached_build", "machine": m.machine(), "manifest": manifest,
                        "microvmc": list(microvmc)}
        samples = m.interleave(commands, args.reps, warmup=max(args.warmup, 1), progress=not args.quiet)
        result["commands"] = {c.key: dict(m.summarize(samples[c.key]), label=c.label, argv=list(c.argv)) for c in commands}
        result["ratios"] = {"build": m.ratio_block(samples, "build", "python")}

        store = os.path.abspath(args.store) if args.store else None
        result["stages"] = stage_breakdown(python, manifest, work, store, args.stage_reps) if args.stage_reps else {}
        result["profile"] = profile_top(python, manifest, work, store)
        is_interpreter = os.path.basename(microvmc[0]).startswith("python")
        modules = imported_modules(python, [*(microvmc[1:] if is_interpreter else microvmc), "build", manifest,
                                            "-o", os.path.join(work, "result"), *store_args])
        result["imports"] = {"modules": len(modules), "heavy": heavy_imports(modules)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    b, r = result["commands"], result["ratios"]["build"]
    rows = [[c.label, m.ms(b[c.key]["wall_median_s"]), m.ms(b[c.key]["wall_min_s"]), m.ms(b[c.key]["cpu_median_s"]),
             f"{b[c.key]['maxrss_median_mib']:.1f} MiB"] for c in commands]
    rows[0] += ["1.00x", ""]
    rows[1] += [f"{r['of_medians']:.2f}x", f"+{m.ms(r['delta_median_s'])}"]
    lines = [
        f"cached build: {args.reps} runs each, interleaved; ratio = median / median of the baseline",
        m.table(rows, ["command", "median", "min", "cpu", "peak rss", "ratio", "delta"]),
    ]
    st = result["stages"]
    if "error" in st:
        lines += ["", f"stage breakdown unavailable: {st['error']}"]
    elif st:
        first, second = st["first_median_s"], st["second_median_s"]
        total1, total2 = sum(first.values()), sum(second.values())
        srows = [[n, m.ms(first[n]), f"{100 * first[n] / total1:.0f}%", m.ms(second[n])] for n in first]
        srows.append(["sum", m.ms(total1), "100%", m.ms(total2)])
        lines += ["", f"stages of one compiling build (an evaluation-cache miss: what a changed manifest costs), fresh interpreter, medians of {st['reps']}; "
                      "'again' = same process, modules already imported",
                  m.table(srows, ["stage", "first", "share", "again"])]
    prof = result["profile"]
    if "error" in prof:
        lines += ["", f"profile unavailable: {prof['error']}"]
    else:
        prows = [[p["function"], str(p["calls"]), m.ms(p["cumulative_s"])] for p in prof["profile"]]
        lines += ["", "cProfile, one in-process build, top 10 by cumulative time (wrappers left out; profiler overhead included)",
                  m.table(prows, ["function", "calls", "cumulative"])]
    heavy = result["imports"]["heavy"]
    lines += ["", f"microvmc build imports {result['imports']['modules']} modules; heavy ones: "
              + (", ".join(f"{k} {v / 1000:.0f} ms" for k, v in heavy.items()) if heavy else "none")
              + f" (of {', '.join(HEAVY)}; cumulative, python -X importtime)"]
    m.emit_report(result, "\n".join(lines), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
