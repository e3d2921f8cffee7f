"""Container images: pull + unpack against `skopeo copy` + `umoci unpack` of the same image from the
same local registry; and the boot of an image's VM against today's directory root. Ratios in one run.

The image is the tests' Debian userland (mmdebstrap minbase + python3, ~190 MB unpacked; a gzip layer
made by umoci), served by Debian's docker-registry on 127.0.0.1 for the length of the run. Every
round starts both pull columns from empty directories. The boot columns run `python3 -c pass` in a
VM whose read-only root is the image from the registry (source = "registry"), and in one whose root
is the same tree as `source = "directory"`: what an image costs a run once it is in the store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import _measure as m  # noqa: E402

PULL = """
import sys
from microvmc.backends.images import ensure_rootfs, pull
from microvmc.backends.unpack import default_ownership
p = pull(sys.argv[1], store=sys.argv[2])
ensure_rootfs(sys.argv[2], p.manifest, default_ownership())
"""


def _with_registry(argv: list[str]) -> int:
    """Start the registry with the image, then measure in a child process: the measuring half
    stops every process it did not time, as leftovers."""
    import subprocess

    import imagekit

    work = Path(tempfile.mkdtemp(prefix="microvmc-bench-registry-"))
    try:
        imagekit._umoci_image(work / "layout", "debian", [imagekit.debian_tar()],
                              ["--config.cmd", "/bin/bash", "--architecture", "amd64", "--os", "linux"])
        with imagekit.registry(work) as host:
            imagekit.push(work / "layout", "debian", host, "bench/debian:1", format="oci")
            return subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--registry", host]).returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m.add_common_args(parser, reps=3)
    parser.add_argument("--registry", help=argparse.SUPPRESS)  # the measuring half: the registry is up at HOST
    args = parser.parse_args(argv)
    if args.registry is None:
        return _with_registry(argv if argv is not None else sys.argv[1:])
    m.become_subreaper()
    microvmc = m.microvmc_command(args.microvmc)
    python = m.python_for(microvmc)
    work = Path(tempfile.mkdtemp(prefix="microvmc-bench-images-"))
    result: dict = {"benchmark": "images", "machine": m.machine(), "microvmc": list(microvmc)}
    try:
        if True:  # the registry runs in the parent: the sweep of leftovers here would stop it
            ref = f"{args.registry}/bench/debian:1"
            a, b = work / "a", work / "b"
            pulls = [
                m.Command(key="microvmc", label="microvmc pull + unpack", timeout=600,
                          argv=("sh", "-c", f'rm -rf "{a}" && exec "$0" -c "$1" "$2" "{a}"', python, PULL, ref)),
                m.Command(key="skopeo", label="skopeo copy + umoci unpack (baseline)", timeout=600,
                          argv=("sh", "-c", f'rm -rf "{b}" && mkdir -p "{b}" && skopeo copy --quiet --src-tls-verify=false '
                                f'"docker://{ref}" "oci:{b}/layout:x" && umoci unpack --image "{b}/layout:x" "{b}/bundle"')),
            ]
            samples = m.interleave(pulls, args.reps, warmup=args.warmup, progress=not args.quiet)
            result["pull"] = {c.key: dict(m.summarize(samples[c.key]), label=c.label) for c in pulls}
            result["pull_ratio"] = m.ratio_block(samples, "microvmc", "skopeo")

            store = work / "store"
            env = {"MICROVMC_STORE": str(store), "XDG_STATE_HOME": str(work / "state"), "XDG_CACHE_HOME": str(work / "cache")}
            image = work / "image.toml"
            image.write_text(f'version = 1\n[image]\nsource = "registry"\nreference = "{ref}"\n'
                             '[process]\nargv = ["/usr/bin/python3", "-c", "pass"]\n')
            import subprocess

            built = subprocess.run([*microvmc, "graph", "--json", str(image)], env=dict(os.environ, **env),
                                   capture_output=True, text=True, check=True).stdout
            import json

            rootfs = next(n["path"] for n in json.loads(built)["nodes"] if n["id"] == "rootfs")
            directory = work / "directory.toml"
            directory.write_text(f'version = 1\n[image]\nsource = "directory"\npath = "{rootfs}"\n'
                                 '[process]\nargv = ["/usr/bin/python3", "-c", "pass"]\n')
            boots = [
                m.Command(key="image", label="microvmc run (registry image)", argv=(*microvmc, "run", str(image)),
                          env=env, timeout=300),
                m.Command(key="directory", label="microvmc run (directory root, baseline)",
                          argv=(*microvmc, "run", str(directory)), env=env, timeout=300),
            ]
            for c in boots:  # build once, outside the timing
                subprocess.run(c.argv, env=dict(os.environ, **env), capture_output=True, check=True, timeout=600)
            samples = m.interleave(boots, args.reps, warmup=args.warmup, progress=not args.quiet)
            result["boot"] = {c.key: dict(m.summarize(samples[c.key]), label=c.label) for c in boots}
            result["boot_ratio"] = m.ratio_block(samples, "image", "directory")
    except (RuntimeError, OSError) as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 2
    finally:
        result["left_running"] = list(m.sweep_leftovers())
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for section, ratio_key, base in (("pull", "pull_ratio", "skopeo"), ("boot", "boot_ratio", "directory")):
        r = result[ratio_key]
        for key, s in result[section].items():
            mine = key != base
            rows.append([s["label"], m.secs(s["wall_median_s"]), m.secs(s["wall_min_s"]), m.secs(s["wall_max_s"]),
                         m.secs(s["cpu_median_s"]), f"{r['of_medians']:.3f}x" if mine else "1.000x",
                         f"{r['median_of_paired']:.3f}x" if mine else "1.000x"])
    lines = [
        f"container images: {args.reps} runs each, alternated; ratio = median / median of the baseline",
        m.table(rows, ["command", "median", "min", "max", "cpu", "ratio", "paired"]),
        "",
        f"pull + unpack / skopeo + umoci = {result['pull_ratio']['of_medians']:.3f}; "
        f"image boot / directory boot = {result['boot_ratio']['of_medians']:.3f}",
    ]
    m.emit_report(result, "\n".join(lines), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
