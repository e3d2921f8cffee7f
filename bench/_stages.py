"""Time the stages of one `microvmc build`, in this (fresh) interpreter; print JSON on stdout.

Run by cached_build.py as `python bench/_stages.py MANIFEST OUTDIR [--store DIR] [--profile]`.
It does what `microvmc build` does on an evaluation-cache miss (compile, then realize and
link_result), stage by stage,
twice: the first pass is what the command pays (its lazy imports included), the second the same
work with every module already imported, so first minus second is roughly the import cost.
With --profile, it instead runs the real `cli.main(["build", ...])` once under cProfile and reports
the functions with the largest cumulative time.

It calls microvmc's internal stage functions; if they change, it says so rather than guessing.
"""

from __future__ import annotations

import json
import os
import sys
import time

TOTAL_KEY = "total"
# Frames that only wrap others: they would top a cumulative listing and say nothing.
WRAPPERS = (
    "<frozen importlib",
    "method builtins.exec",
    "method builtins.__import__",
    "microvmc/cli.py",
    "compiler/pipeline.py:",
    "'disable' of '_lsprof.Profiler'",
    "_handle_fromlist",
)


def stages(manifest_path: str, out_dir: str, store: str | None) -> dict[str, float]:
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - t
        t = now

    from microvmc import cli  # noqa: F401  (what `microvmc` imports before any command runs)
    from microvmc.compiler.pipeline import Compiled, read_manifest
    from microvmc.compiler.store import default_store_root
    lap("import cli + compiler pipeline")
    manifest = read_manifest(manifest_path)
    lap("load + validate (read_manifest)")
    from microvmc.backends.host import probe_host
    facts = probe_host()
    lap("probe host (cached facts)")
    store = os.path.abspath(store) if store else str(default_store_root())
    from microvmc.compiler.graph import choose_transports, resolve
    manifest = choose_transports(manifest, facts)
    graph = resolve(manifest, facts, store)
    lap("resolve (graph, kernel, modules, digests)")
    from microvmc.compiler.plan import plan
    launch = plan(manifest, graph, facts)
    lap("plan")
    from microvmc.compiler.emit import emit
    output = emit(launch, graph, store)
    lap("emit (launch.sh, plan.json)")
    from microvmc.backends.build import realize
    from microvmc.backends.outputs import link_result
    out = realize(Compiled(manifest=manifest, graph=graph, plan=launch, output=output))
    lap("realize (all in the store already)")
    link_result(out, os.path.join(out_dir, "result"))
    lap("link ./result")
    return times


def profile(manifest_path: str, out_dir: str, store: str | None, top: int) -> list[dict[str, object]]:
    import cProfile
    import io
    import pstats
    import contextlib

    from microvmc.cli import main

    argv = ["build", manifest_path, "-o", os.path.join(out_dir, "result")]
    if store:
        argv += ["--store", store]
    profiler = cProfile.Profile()
    with contextlib.redirect_stdout(io.StringIO()):
        profiler.runcall(main, argv)
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_cc, ncalls, _tt, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{filename}:{line}({func})" if line else func
        if filename == "~":
            where = func
        if any(w in where for w in WRAPPERS):
            continue
        rows.append({"function": _shorten(where), "calls": ncalls, "cumulative_s": cumtime})
    rows.sort(key=lambda r: -float(r["cumulative_s"]))  # type: ignore[arg-type]
    return rows[:top]


def _shorten(where: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in where:
            return where.split(marker, 1)[1]
    return where


def main() -> int:
    args = sys.argv[1:]
    prof = "--profile" in args
    args = [a for a in args if a != "--profile"]
    store = None
    if "--store" in args:
        i = args.index("--store")
        store = args[i + 1]
        del args[i : i + 2]
    manifest_path, out_dir = args
    try:
        if prof:
            result: dict[str, object] = {"profile": profile(manifest_path, out_dir, store, top=10)}
        else:
            first = stages(manifest_path, out_dir, store)
            second = stages(manifest_path, out_dir, store)
            result = {"first": first, "second": second}
    except (ImportError, AttributeError, TypeError) as exc:
        result = {"error": f"microvmc's stage functions changed ({type(exc).__name__}: {exc}); update bench/_stages.py"}
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
