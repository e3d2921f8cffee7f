"""Runs that outlive the command: `microvmc ps -a` over 100 run records against `ps -a` over one,
and a detached run (`run -d`, then `wait`) against a foreground `run` of the same manifest.

The 100 records are made through the run store itself (ended runs, as `ps -a` lists them). The
manifest is written to a temporary directory:  version = 1 / [process] argv = ["/bin/true"].
Columns alternate (ABAB.., BABA..), --reps rounds after --warmup untimed ones; ratios of medians.

    python3 bench/lifecycle.py [-n 5] [--json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure as m  # noqa: E402

MANIFEST = 'version = 1\n\n[process]\nargv = ["/bin/true"]\n'
RECORDS = 100


def _records(state: str, count: int) -> None:
    """`count` ended runs in the run store under `state`, written by the store's own code."""
    code = ("import sys, time\n"
            "from pathlib import Path\n"
            "from microvmc.backends.runstore import RunStore\n"
            "store = RunStore(Path(sys.argv[1]) / 'microvmc' / 'runs')\n"
            "for n in range(int(sys.argv[2])):\n"
            "    run = store.create({'name': 'bench'}, manifest='/bench/true.toml', command=('/bin/true',))\n"
            "    run.update(state='exited', status=n % 3, ended_unix=time.time())\n"
            "    run.release()\n")
    subprocess.run([m.python_for(m.microvmc_command()), "-c", code, state, str(count)], check=True, timeout=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=5)
    args = parser.parse_args(argv)
    m.become_subreaper()
    microvmc = m.microvmc_command(args.microvmc)
    work = tempfile.mkdtemp(prefix="microvmc-bench-lifecycle-")
    result: dict = {"benchmark": "lifecycle", "machine": m.machine(), "microvmc": list(microvmc)}
    try:
        one, many, runs = (os.path.join(work, d) for d in ("one", "many", "runs"))
        _records(one, 1)
        _records(many, RECORDS)
        manifest = os.path.join(work, "true.toml")
        with open(manifest, "w") as f:
            f.write(MANIFEST)
        env = {"XDG_STATE_HOME": runs, "TMPDIR": work}
        subprocess.run([*microvmc, "build", "--no-link", manifest], check=True, capture_output=True,
                       env=dict(os.environ, **env), timeout=600)
        ps = [
            m.Command(key="ps1", label="microvmc ps -a, 1 record (baseline)", argv=(*microvmc, "ps", "-a"),
                      env={"XDG_STATE_HOME": one}),
            m.Command(key="ps100", label=f"microvmc ps -a, {RECORDS} records", argv=(*microvmc, "ps", "-a"),
                      env={"XDG_STATE_HOME": many}),
        ]
        detached = " ".join(["id=$(", *map(_quote, microvmc), "run -d", _quote(manifest), ") &&",
                             *map(_quote, microvmc), 'wait "$id" >/dev/null'])
        boots = [
            m.Command(key="foreground", label="microvmc run true.toml (baseline)", argv=(*microvmc, "run", manifest),
                      env=env, timeout=180),
            m.Command(key="detached", label="microvmc run -d true.toml; microvmc wait", argv=("sh", "-c", detached),
                      env=env, timeout=180),
        ]
        ps_samples = m.interleave(ps, args.reps, warmup=args.warmup, progress=not args.quiet)
        boot_samples = m.interleave(boots, args.reps, warmup=args.warmup, progress=not args.quiet)
        result["ps"] = {c.key: dict(m.summarize(ps_samples[c.key]), label=c.label) for c in ps}
        result["boot"] = {c.key: dict(m.summarize(boot_samples[c.key]), label=c.label) for c in boots}
        result["ps_ratio"] = m.ratio_block(ps_samples, "ps100", "ps1")
        result["detached_ratio"] = m.ratio_block(boot_samples, "detached", "foreground")
    except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", None)
        print(f"lifecycle: {exc}" + (f"\n{detail}" if detail else ""), file=sys.stderr)
        return 2
    finally:
        result["left_running"] = list(m.sweep_leftovers())
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for section, ratio_key, base in (("ps", "ps_ratio", "ps1"), ("boot", "detached_ratio", "foreground")):
        for key, s in result[section].items():
            ratio = 1.0 if key == base else result[ratio_key]["of_medians"]
            rows.append([s["label"], m.secs(s["wall_median_s"]), m.secs(s["wall_min_s"]), m.secs(s["wall_max_s"]),
                         m.secs(s["cpu_median_s"]), f"{ratio:.3f}x"])
    text = "\n".join([
        f"runs that outlive the command: {args.reps} runs each, alternated; ratio = median / median of the baseline",
        m.table(rows, ["command", "median", "min", "max", "cpu", "ratio"]),
        "",
        f"ps -a over {RECORDS} records / over 1 = {result['ps_ratio']['of_medians']:.3f}; "
        f"run -d + wait / foreground run = {result['detached_ratio']['of_medians']:.3f}",
    ])
    m.emit_report(result, text, args.json)
    return 0


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


if __name__ == "__main__":
    sys.exit(main())
