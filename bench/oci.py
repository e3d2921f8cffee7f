"""The OCI runtime: `podman run --rm IMG true` with microvmc-runtime against the same with runc, and
against `microvmc run` of the same program, alternating, as ratios in one run; and where the extra
time goes: each runtime call podman makes (create, start, kill, delete, ...), timed by a wrapper.

podman runs on a private root (tests/oci_engines.py's Podman: its own storage, CNI network and
containers.conf, as NOTES-oci.md says this machine needs), with a static busybox in a scratch image
built offline. Needs root, podman, buildah, conmon and runc (scripts/setup --test).

    python3 bench/oci.py [-n 5] [--json]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import _measure as m  # noqa: E402

IMAGE = "localhost/mvmc-bench-busybox:1"
MANIFEST = 'version = 1\n\n[process]\nargv = ["/bin/true"]\n'


def timing_wrapper(path: Path, target: list[str], log: Path) -> Path:
    """A runtime at `path` that runs `target` with its arguments and appends `verb start end` (the
    host's clock, seconds) to `log`. The verb is the first word that is not a global option."""
    script = (
        "#!/bin/sh\n"
        "start=$(date +%s.%N)\n"
        f"{shlex.join(target)} \"$@\"\n"
        "status=$?\n"
        "verb=''\n"
        "skip=''\n"
        "for a in \"$@\"; do\n"
        "  if [ -n \"$skip\" ]; then skip=''; continue; fi\n"
        "  case \"$a\" in --root|--log|--log-format|--criu|--rootless) skip=1 ;; -*) ;; *) verb=$a; break ;; esac\n"
        "done\n"
        f"printf '%s %s %s\\n' \"$verb\" \"$start\" \"$(date +%s.%N)\" >> {shlex.quote(str(log))}\n"
        "exit $status\n"
    )
    path.write_text(script)
    path.chmod(0o755)
    return path


def verb_times(log: Path) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            verb, start, end = line.split()
            times.setdefault(verb, []).append(float(end) - float(start))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=5)
    args = parser.parse_args(argv)
    import oci_engines as engines

    missing = engines.missing_tools("podman", "buildah", "conmon", engines.RUNC)
    if missing or os.geteuid() != 0:
        print(f"bench: oci needs root and {missing or 'podman'}: run scripts/setup --test as root", file=sys.stderr)
        return 2
    microvmc = m.microvmc_command(args.microvmc)
    work = Path(tempfile.mkdtemp(prefix="microvmc-bench-oci-"))
    created = engines.Created(*engines.ENGINE_DIRS)
    result: dict = {"benchmark": "oci", "machine": m.machine()}
    try:
        logs = {name: work / f"{name}-times.log" for name in ("runc", "microvm")}
        runtime = engines.microvmc_runtime()
        runtimes = {
            "runc": timing_wrapper(work / "runc-runtime", [engines.RUNC], logs["runc"]),
            "microvm": timing_wrapper(work / "microvm-runtime", [*runtime, "--root", str(work / "microvm-state")],
                                      logs["microvm"]),
        }
        manifest = work / "true.toml"
        manifest.write_text(MANIFEST)
        with engines.Podman(work / "podman", runtimes) as podman:
            podman.build_scratch_image(engines.busybox_rootfs(work / "rootfs"), IMAGE, cmd=["/bin/sh"], env=["PATH=/bin"])
            m.become_subreaper()  # after the image is built: what podman leaves from here on is ours to sweep
            env = {k: v for k, v in podman.env.items() if k.startswith(("CONTAINERS_", "TMPDIR"))}
            commands = [
                m.Command(key="runc", label="podman run --rm, runc (baseline)",
                          argv=("podman", "run", "--rm", "--runtime", "runc", IMAGE, "true"), env=env),
                m.Command(key="microvm", label="podman run --rm, microvmc-runtime",
                          argv=("podman", "run", "--rm", "--runtime", "microvm", IMAGE, "true"), env=env),
                m.Command(key="run", label="microvmc run of the same program",
                          argv=(*microvmc, "run", str(manifest)), env={"XDG_STATE_HOME": str(work / "state")}),
            ]
            samples = m.interleave(commands, args.reps, warmup=args.warmup, progress=not args.quiet)
        result["commands"] = {c.key: {"label": c.label, **m.summarize(samples[c.key])} for c in commands}
        result["microvm_vs_runc"] = m.ratio_block(samples, "microvm", "runc")
        result["microvm_vs_run"] = m.ratio_block(samples, "microvm", "run")
        result["runtime_calls_s"] = {name: {verb: m.median(t) for verb, t in verb_times(log).items()}
                                     for name, log in logs.items()}
    finally:
        result["left_running"] = list(m.sweep_leftovers())
        shutil.rmtree(work, ignore_errors=True)
        created.remove()
    rows = [[c["label"], m.secs(c["wall_median_s"])] for c in result["commands"].values()]
    calls = result["runtime_calls_s"]
    verbs = sorted(set(calls["runc"]) | set(calls["microvm"]), key=lambda v: -calls["microvm"].get(v, 0))
    call_rows = [[verb, m.secs(calls["runc"].get(verb, 0)), m.secs(calls["microvm"].get(verb, 0))] for verb in verbs]
    a, b = result["microvm_vs_runc"], result["microvm_vs_run"]
    text = "\n".join([
        m.table(rows, ["command", "median"]),
        f"microvmc-runtime / runc: {a['of_medians']:.2f} (ratio of medians), {a['median_of_paired']:.2f} (paired)",
        f"podman + microvmc-runtime / microvmc run: {b['of_medians']:.2f} (ratio of medians), "
        f"{b['median_of_paired']:.2f} (paired), {b['delta_paired_median_s']:+.3f} s",
        "",
        "where the time goes: each runtime call podman made, median (the rest is podman and conmon)",
        m.table(call_rows, ["call", "runc", "microvmc-runtime"]),
    ])
    m.emit_report(result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
