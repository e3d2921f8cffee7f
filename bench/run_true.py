"""Running /bin/true in a VM: `microvmc run` against a minimal hand-written shell script that boots
the identical VM (bench/baseline-true.sh), with the generated `launch.sh` as a third column.

The manifest is written to a temporary directory:  version = 1 / [process] argv = ["/bin/true"].
`microvmc plan --json` gives the kernel, initramfs, command line, root share, memory, CPUs and
accelerator the baseline boots, so all three boot the same kernel with the same command line.
A fourth column, `microvmc build` of the same manifest (cached, no VM), shows what `run` pays
before it boots. The four alternate (ABCD, BCDA, ...), --reps rounds after --warmup untimed ones.
Target: microvmc run / baseline ≤ 1.03 (ratio of medians).

The VM's own boot time scatters by ±10 % from one boot to the next under TCG, more than the target's
3 %: beside each paired median the report gives its 95 % interval (order statistics), and the
verdict says "too noisy to tell" while that interval holds the target. With --phases (perf, root),
each command's time is split on the host's clock into its start → QEMU's exec, QEMU's life (the VM)
and QEMU's exit → its own exit, paired between microvmc and the baseline: the parts outside QEMU are
microvmc's own and scatter little; the VM's part is where the noise is.

    python3 bench/run_true.py [-n 12] [--json] [--check] [--phases]
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
import _phases  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = os.path.join(HERE, "baseline-true.sh")
TARGET = 1.03
MANIFEST = 'version = 1\n\n[process]\nargv = ["/bin/true"]\n'
# The QEMU options baseline-true.sh writes out; a plan with others boots a different VM.
BASELINE_OPTIONS = frozenset({
    "-M", "-nodefaults", "-no-user-config", "-display", "-no-reboot", "-accel", "-cpu", "-smp", "-m",
    "-object", "-global", "-kernel", "-initrd", "-append", "-serial", "-chardev", "-device",
})


def _after(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


def baseline_env(plan: dict) -> dict[str, str]:
    """What baseline-true.sh needs, taken from the plan."""
    argv = plan["qemu_argv"]
    root = next(v for v in plan["virtiofsd"] if v["tag"] == "root")
    return {
        "QEMU": argv[0],
        "MACHINE": _after(argv, "-M"),  # acpi=off for a kernel without PCI (compiler/kernels.py)
        "VIRTIOFSD": root["argv"][root["argv"].index("-o") - 1],  # past the read-only jail
        "ROOTFS": root["shared_dir"],
        "KERNEL": plan["kernel"],
        "INITRD": plan["initramfs"],
        "APPEND": plan["cmdline"],
        "MEMORY": _after(argv, "-m"),
        "CPUS": _after(argv, "-smp"),
        "ACCEL": _after(argv, "-accel"),
        "CPU": _after(argv, "-cpu"),
        "CACHE": _option(root["argv"], "cache"),  # always for a store path (an immutable root), else auto
    }


def _option(argv: list[str], name: str) -> str:
    """The value of virtiofsd's `-o NAME=VALUE` in `argv` ("" if none)."""
    return next((argv[i + 1].split("=", 1)[1] for i, a in enumerate(argv[:-1])
                 if a == "-o" and argv[i + 1].startswith(f"{name}=")), "")


def differences(plan: dict) -> list[str]:
    """Where the plan's VM differs from what baseline-true.sh boots (empty: the same VM)."""
    found = []
    extra = sorted({a for a in plan["qemu_argv"][1:] if a.startswith("-") and a not in BASELINE_OPTIONS})
    if extra:
        found.append(f"the plan has QEMU options the baseline lacks: {' '.join(extra)}")
    if _after(plan["qemu_argv"], "-M").split(",")[0] != "microvm":
        found.append("the plan's machine is not microvm")
    shares = [v["tag"] for v in plan["virtiofsd"]]
    if shares != ["root"]:
        found.append(f"the plan has virtiofs shares {shares}, the baseline only 'root'")
    else:
        argv = plan["virtiofsd"][0]["argv"]
        options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
        if sorted(o for o in options if not o.startswith(("source=", "cache="))) != ["sandbox=chroot"] \
                or _option(argv, "cache") not in ("auto", "always"):
            found.append(f"the plan's virtiofsd options differ: {argv[1:]}")
        if argv[0] != "unshare":
            found.append("the plan's root is not served read-only, as the baseline's is")
    return found


# Run by the interpreter microvmc runs under: which of microvmc's modules have no current .pyc. With
# PYTHONDONTWRITEBYTECODE set (as here), such a module is compiled again by every run (~20 ms for the
# run's modules): a benchmark of sources edited since the last `python -m compileall` times that.
STALE_BYTECODE = r"""
import importlib, importlib.util, json, os
stale, total = [], 0
for name in ("microvmc", "microvmc.compiler", "microvmc.backends", "microvmc.kernel"):
    for location in importlib.import_module(name).__path__:
        for entry in os.scandir(location):
            if not entry.name.endswith(".py"):
                continue
            total += 1
            st = entry.stat()
            try:
                with open(importlib.util.cache_from_source(entry.path), "rb") as f:
                    head = f.read(16)
            except OSError:
                head = b""
            fresh = (head[:4] == importlib.util.MAGIC_NUMBER and head[4:8] == bytes(4)
                     and int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                     and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)
            if not fresh:
                stale.append(f"{name}.{entry.name[:-3]}")
print(json.dumps({"modules": total, "stale": sorted(stale)}))
"""


def bytecode(python: str) -> dict:
    """{"modules": N, "stale": [modules without a current .pyc]} of the microvmc `python` imports."""
    done = subprocess.run([python, "-c", STALE_BYTECODE], capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else {"modules": 0, "stale": [], "error": done.stderr}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=12)
    parser.add_argument("--check", action="store_true", help=f"exit 1 if microvmc run / baseline > {TARGET}")
    parser.add_argument("--phases", action="store_true",
                        help="split each run on the host's clock (perf record of exec/exit): to QEMU, QEMU, after")
    args = parser.parse_args(argv)
    m.become_subreaper()

    microvmc = m.microvmc_command(args.microvmc)
    work = tempfile.mkdtemp(prefix="microvmc-bench-run-")
    tmp = os.path.join(work, "tmp")  # TMPDIR of every run: whatever a run leaves there shows up
    os.mkdir(tmp)
    env = {"TMPDIR": tmp, "XDG_STATE_HOME": os.path.join(work, "state")}  # run records stay in here
    manifest = os.path.join(work, "true.toml")
    result: dict = {"benchmark": "run_true", "machine": m.machine(), "microvmc": list(microvmc), "target": TARGET}
    try:
        with open(manifest, "w") as f:
            f.write(MANIFEST)
        subprocess.run([*microvmc, "build", manifest], cwd=work, check=True, capture_output=True,
                       env=dict(os.environ, **env), timeout=600)
        plan_json = subprocess.run([*microvmc, "plan", "--json", manifest], cwd=work, check=True,
                                   capture_output=True, text=True, env=dict(os.environ, **env), timeout=120).stdout
        plan = json.loads(plan_json)
        result["bytecode"] = bytecode(m.python_for(microvmc))
        result["accel"] = plan["accel"]
        result["cmdline"] = plan["cmdline"]
        result["differences"] = differences(plan)
        commands = [
            m.Command(key="microvmc", label="microvmc run true.toml", argv=(*microvmc, "run", manifest),
                      cwd=work, env=env, timeout=180),
            m.Command(key="baseline", label="baseline-true.sh (baseline)", argv=("sh", BASELINE),
                      cwd=work, env=dict(env, **baseline_env(plan)), timeout=180),
            m.Command(key="launch", label="sh result/launch.sh", argv=("sh", os.path.join(work, "result", "launch.sh")),
                      cwd=work, env=env, timeout=180),
            # Not a VM: what `microvmc run` does before it boots (compile, realize), for attribution.
            m.Command(key="build", label="(microvmc build true.toml, cached)", argv=(*microvmc, "build", manifest),
                      cwd=work, env=env, timeout=180),
        ]
        tracer = _phases.Tracer() if args.phases else None
        if tracer is not None and not tracer.start():
            result["phases_not_measured"] = tracer.why_not
            tracer = None
        try:
            samples = m.interleave(commands, args.reps, warmup=args.warmup, progress=not args.quiet)
        finally:
            events = tracer.stop() if tracer is not None else None
        if events is not None:
            result["phases"] = phase_blocks(events, samples)
        result["commands"] = {c.key: dict(m.summarize(samples[c.key]), label=c.label) for c in commands}
        result["ratios"] = {
            "microvmc/baseline": m.ratio_block(samples, "microvmc", "baseline"),
            "launch/baseline": m.ratio_block(samples, "launch", "baseline"),
            "microvmc/launch": m.ratio_block(samples, "microvmc", "launch"),
            "build/baseline": m.ratio_block(samples, "build", "baseline"),
        }
        result["left_in_tmpdir"] = sorted(os.listdir(tmp))
    except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", None)
        print(f"run_true: {exc}" + (f"\n{detail}" if detail else ""), file=sys.stderr)
        return 2
    finally:
        result["left_running"] = list(m.sweep_leftovers())
        shutil.rmtree(work, ignore_errors=True)

    c, r = result["commands"], result["ratios"]
    rows = []
    for key, ratio in (("microvmc", "microvmc/baseline"), ("baseline", None), ("launch", "launch/baseline"),
                       ("build", "build/baseline")):
        s = c[key]
        rows.append([s["label"], m.secs(s["wall_median_s"]), m.secs(s["wall_min_s"]), m.secs(s["wall_max_s"]),
                     m.secs(s["cpu_median_s"]),
                     f"{r[ratio]['of_medians']:.3f}x" if ratio else "1.000x",
                     f"{r[ratio]['median_of_paired']:.3f}x" if ratio else "1.000x",
                     f"{r[ratio]['delta_paired_median_s']:+.3f} s" if ratio else "",
                     f"{r[ratio]['cpu_delta_paired_median_s']:+.3f} s" if ratio else ""])
    ratio = r["microvmc/baseline"]["of_medians"]
    paired = r["microvmc/baseline"]["median_of_paired"]
    band = r["microvmc/baseline"]["paired_spread"]
    verdict = "met" if ratio <= TARGET else "NOT met"
    if (ratio <= TARGET) != (paired <= TARGET):
        verdict += f", but the paired ratio ({paired:.3f}) says otherwise: too noisy to tell, rerun with a larger -n"
    elif band["ci95_low"] <= TARGET < band["ci95_high"]:
        verdict += (f", but the paired ratio's 95 % interval ({band['ci95_low']:.3f}–{band['ci95_high']:.3f}) "
                    "holds the target: too noisy to tell, rerun with a larger -n")
    leftovers = [f"after {c[k]['label']}: {', '.join(c[k]['leftovers'])}" for k in c if c[k]["leftovers"]]
    lines = [
        f"run /bin/true in a VM ({result['accel']}): {args.reps} runs each, alternated; "
        "ratio = median / median of the baseline; paired, delta, cpu delta = medians over rounds of "
        "the per-round ratio and differences",
        m.table(rows, ["command", "median", "min", "max", "cpu", "ratio", "paired", "delta", "cpu delta"]),
        "",
        f"microvmc run / baseline = {ratio:.3f} (target ≤ {TARGET}): {verdict}; "
        f"microvmc run / launch.sh = {r['microvmc/launch']['of_medians']:.3f}",
        f"microvmc run − baseline = {r['microvmc/baseline']['delta_paired_median_s']:+.3f} s; "
        f"a cached microvmc build alone takes {m.secs(c['build']['wall_median_s'])}, which run pays before booting",
        "paired, microvmc run − baseline, median (95 % interval; quartiles) over " f"{args.reps} rounds: "
        f"ratio {_band(band, '.3f')}; wall {_band(r['microvmc/baseline']['delta_paired_spread_s'], '+.3f', ' s')}; "
        f"cpu {_band(r['microvmc/baseline']['cpu_delta_paired_spread_s'], '+.3f', ' s')}",
        *_phase_lines(result),
        _bytecode_line(result["bytecode"]),
        "same VM as the plan: " + ("yes" if not result["differences"] else "NO: " + "; ".join(result["differences"])),
        "left running after a run (stopped by the benchmark): " + ("; ".join(leftovers) if leftovers else "nothing")
        + "; left in TMPDIR by the runs: " + (", ".join(result["left_in_tmpdir"]) or "nothing"),
    ]
    m.emit_report(result, "\n".join(lines), args.json)
    return 1 if args.check and ratio > TARGET else 0


def phase_blocks(events, samples: dict[str, list[m.Sample]]) -> dict:
    """Per VM column: the medians of to_qemu, qemu, after; and microvmc's and launch.sh's paired
    differences from the baseline in each (rounds where both were traced)."""
    split = _phases.phases(events, {s.pid: s.started for k in ("microvmc", "baseline", "launch") for s in samples[k]})
    parts = ("to_qemu", "qemu", "after")
    out: dict = {"columns": {}, "paired": {}}
    for key in ("microvmc", "baseline", "launch"):
        rows = [split.get(s.pid) for s in samples[key]]
        got = [x for x in rows if x]
        out["columns"][key] = {p: m.median([x[p] for x in got]) for p in parts} if got else {}
        out["columns"][key]["traced"] = len(got)
        if key != "baseline":
            pairs = [(x, y) for x, y in zip(rows, (split.get(s.pid) for s in samples["baseline"])) if x and y]
            out["paired"][key] = {p: m.spread([x[p] - y[p] for x, y in pairs]) for p in parts} if pairs else {}
    return out


def _phase_lines(result: dict) -> list[str]:
    if "phases_not_measured" in result:
        return [f"phases: not measured ({result['phases_not_measured']})"]
    found = result.get("phases")
    if not found:
        return []
    lines = ["phases (host clock, medians): start → QEMU exec, QEMU exec → exit (the VM), QEMU exit → exit"]
    for key, label in (("microvmc", "microvmc run"), ("baseline", "baseline"), ("launch", "launch.sh")):
        col = found["columns"][key]
        if not col.get("traced"):
            lines.append(f"  {label}: not traced")
            continue
        text = ", ".join(f"{m.secs(col[p])}" for p in ("to_qemu", "qemu", "after"))
        paired = found["paired"].get(key)
        if paired:
            text += "; paired − baseline: " + ", ".join(_band(paired[p], "+.3f", " s") for p in ("to_qemu", "qemu", "after"))
        lines.append(f"  {label}: {text} ({col['traced']} traced)")
    return lines


def _band(s: dict, fmt: str, unit: str = "") -> str:
    return (f"{s['median']:{fmt}}{unit} ({s['ci95_low']:{fmt}}..{s['ci95_high']:{fmt}}; "
            f"{s['q1']:{fmt}}..{s['q3']:{fmt}})")


def _bytecode_line(found: dict) -> str:
    if found.get("error") or not found["modules"]:
        return "bytecode: not checked (" + (found.get("error") or "no modules found").strip().splitlines()[-1] + ")"
    if not found["stale"]:
        return f"bytecode: every one of microvmc's {found['modules']} modules has a current .pyc"
    return (f"bytecode: {len(found['stale'])} of microvmc's {found['modules']} modules have no current .pyc, so "
            "every run compiles them (PYTHONDONTWRITEBYTECODE): run `python -m compileall` on the sources first")


if __name__ == "__main__":
    sys.exit(main())
