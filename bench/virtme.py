"""microvmc against virtme-ng: the same `true`, booted by each, alternating, in one run of this script.

Columns (ABCD, BCDA, ... over --reps rounds after --warmup untimed ones):
  own     `microvmc run` of /bin/true on microvmc's own kernel (the default after the set-up)
  debian  `microvmc run` of /bin/true on the Debian kernel (modules from the initramfs)
  vng     `vng --run <the Debian kernel> --disable-kvm --cpus N -e true`: virtme-ng on the same
          Debian kernel, its modules given the way virtme-ng finds them (<root>/boot/vmlinuz-<release>
          beside <root>/lib/modules/<release>, hard links to microvmc's copy in a temporary root)
Targets (issue 10): microvmc / virtme-ng <= 0.1 (ratio of medians).

virtme-ng's best settings here, and why they are what they are (read from virtme-ng 1.42's source):
  - it uses QEMU's microvm machine only with KVM (`can_use_microvm`), so under TCG it boots q35;
  - it uses virtio-fs only with the Rust virtiofsd (it refuses QEMU's C one, which Debian 12 ships),
    so its root is 9p; the host's own / read-only with overlays, as virtme-ng always does;
  - `--cpus 1` beat its default of all host CPUs here (one vCPU has less to bring up under TCG);
    `--vng-cpus` measures another count.
virtme-ng on microvmc's own kernel is tried once and reported: under TCG it boots q35, whose virtio
devices are PCI, and our kernel leaves PCI out (a microvm has none), so it cannot mount its root.

Before timing, one run of each side with `echo <marker>; exit 3` checks that the command really ran
inside the VM (the marker on stdout, or for virtme-ng with -v at least on its console) and reports
where its output arrived and whether its exit status came back.

    scripts/setup --bench             # virtme-ng (pinned) in .venv-bench, and kmod (its modprobe)
    python3 bench/virtme.py [-n 3] [--json] [--vng PATH]
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TARGET = 0.1
MARKER = "microvmc-bench-ran-the-command"
MANIFEST = 'version = 1\n\n[kernel]\nsource = "{source}"\n\n[process]\nargv = {argv}\n'
CHECK_TIMEOUT = 180.0


def find_vng(given: str | None) -> str | None:
    for candidate in (given, os.path.join(REPO, ".venv-bench", "bin", "vng"), shutil.which("vng")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def kernels(microvmc: tuple[str, ...]) -> dict[str, dict]:
    out = subprocess.run([*microvmc, "doctor", "--json"], check=True, capture_output=True, text=True).stdout
    return {k["name"]: k for k in json.loads(out)["kernels"] if k.get("present")}


def _link_tree(source: str, target: str) -> None:
    """A copy of `source` made of hard links (a plain copy across file systems): virtme-ng runs depmod
    in it, which adds files and changes none."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(source, target, copy_function=link, symlinks=True)


def virtme_root(tmp: str, kernel: dict) -> str:
    """<root>/boot/vmlinuz-<release> and <root>/lib/modules/<release>: where virtme-ng looks for a
    kernel's modules (get_rootfs_from_kernel_path). Returns the image's path."""
    root = os.path.join(tmp, "virtme-root")
    image = os.path.join(root, "boot", f"vmlinuz-{kernel['release']}")
    os.makedirs(os.path.dirname(image))
    shutil.copy2(kernel["image"], image)
    _link_tree(kernel["modules"], os.path.join(root, "lib", "modules", kernel["release"]))
    return image


def check_once(argv: list[str], env: dict[str, str], cwd: str) -> dict:
    """One run of `echo MARKER; exit 3`: did it run in the VM, where did its output arrive, and did
    its status come back?"""
    try:
        proc = subprocess.run(argv, cwd=cwd, env=dict(os.environ, **env), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=CHECK_TIMEOUT, start_new_session=True)
    except subprocess.TimeoutExpired:
        return {"ran": False, "output_on": None, "status": None, "status_kept": False,
                "why": f"no exit in {CHECK_TIMEOUT:.0f} s"}
    finally:
        m.sweep_leftovers()
    on = "stdout" if MARKER.encode() in proc.stdout else "stderr" if MARKER.encode() in proc.stderr else None
    lines = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip().splitlines() or [""]
    # a panic says why; otherwise the last line
    why = next((line for line in lines if "Kernel panic" in line), lines[-1]).split("] ", 1)[-1]
    return {"ran": on is not None, "output_on": on, "status": proc.returncode, "status_kept": proc.returncode == 3,
            "why": "" if on else why[-200:]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    m.add_common_args(parser, reps=3)
    parser.add_argument("--vng", metavar="PATH", help="virtme-ng's vng (default: .venv-bench/bin/vng, then PATH)")
    parser.add_argument("--vng-cpus", type=int, default=1, help="vCPUs virtme-ng boots (default 1: faster here)")
    args = parser.parse_args(argv)
    microvmc = m.microvmc_command(args.microvmc)
    vng = find_vng(args.vng)
    if vng is None:
        print("virtme.py: virtme-ng is not installed: run scripts/setup --bench (or give --vng PATH)", file=sys.stderr)
        return 2
    if shutil.which("modprobe", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        print("virtme.py: virtme-ng needs modprobe (Debian's kmod): run scripts/setup --bench", file=sys.stderr)
        return 2
    found = kernels(microvmc)
    if "microvmc" not in found or "debian" not in found:
        print(f"virtme.py: needs microvmc's own kernel and the Debian kernel; present: {sorted(found)}; "
              "run scripts/setup", file=sys.stderr)
        return 2
    m.become_subreaper()
    # vng runs its helpers (virtme-run, virtme-ng-init, ...) by name: they are beside it.
    vng_env = {"PATH": f"{os.path.dirname(vng)}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}
    with tempfile.TemporaryDirectory(prefix="microvmc-bench-virtme-") as tmp:
        debian_image = virtme_root(tmp, found["debian"])

        def vng_argv(kernel: str, command: str, *options: str) -> list[str]:
            return [vng, "--run", kernel, "--disable-kvm", "--cpus", str(args.vng_cpus), *options, "-e", command]

        def manifest(key: str, source: str, program: list[str]) -> str:
            path = os.path.join(tmp, f"{key}.toml")
            with open(path, "w") as f:
                f.write(MANIFEST.format(source=source, argv=json.dumps(program)))
            return path

        probe = ["/bin/sh", "-c", f"echo {MARKER}; exit 3"]
        checks = {
            "own": check_once([*microvmc, "run", manifest("own-check", "microvmc", probe)], {}, tmp),
            "debian": check_once([*microvmc, "run", manifest("debian-check", "debian", probe)], {}, tmp),
            # -v: the guest console on stderr, where virtme-ng falls back to when it finds no ports
            "vng": check_once(vng_argv(debian_image, f"echo {MARKER}; exit 3", "-v"), vng_env, tmp),
            "vng_own_kernel": check_once(vng_argv(found["microvmc"]["image"].replace("vmlinux", "bzImage"),
                                                  f"echo {MARKER}; exit 3", "-v"), vng_env, tmp),
        }
        for key in ("own", "debian", "vng"):
            if not checks[key]["ran"]:
                print(f"virtme.py: {key} did not run the command: {checks[key]['why']}", file=sys.stderr)
                return 1
        commands = [
            m.Command(key="own", label="microvmc run, own kernel",
                      argv=(*microvmc, "run", manifest("own", "microvmc", ["/bin/true"])), cwd=tmp),
            m.Command(key="debian", label="microvmc run, Debian kernel",
                      argv=(*microvmc, "run", manifest("debian", "debian", ["/bin/true"])), cwd=tmp),
            # virtme-ng's status is whatever it returns (see the check): timing does not judge it
            m.Command(key="vng", label=f"vng, Debian kernel (q35, 9p, {args.vng_cpus} vCPU)",
                      argv=tuple(vng_argv(debian_image, "true")), cwd=tmp, env=vng_env, expect_status=None),
        ]
        samples = m.interleave(commands, args.reps, warmup=args.warmup, progress=not args.quiet)
    result = {
        "machine": m.machine(),
        "vng": {"path": vng, "version": m._first_line([vng, "--version"]), "cpus": args.vng_cpus},
        "checks": checks,
        "commands": {c.key: {"label": c.label, "argv": list(c.argv), **m.summarize(samples[c.key])} for c in commands},
        "own_vs_vng": m.ratio_block(samples, "own", "vng"),
        "debian_vs_vng": m.ratio_block(samples, "debian", "vng"),
        "target": TARGET,
    }
    rows = [[c.label, m.secs(result["commands"][c.key]["wall_median_s"]), m.secs(result["commands"][c.key]["wall_min_s"])]
            for c in commands]
    lines = [m.table(rows, ["command", "median", "min"]), ""]
    for key, what in (("own_vs_vng", "microvmc (own kernel) / virtme-ng (Debian kernel)"),
                      ("debian_vs_vng", "microvmc / virtme-ng, both on the Debian kernel")):
        r = result[key]
        lines.append(f"{what}: {r['of_medians']:.3f} (ratio of medians), {r['median_of_paired']:.3f} "
                     f"(median of paired); target <= {TARGET}")
    lines.append("")
    for key, what in (("own", "microvmc, own kernel"), ("debian", "microvmc, Debian kernel"),
                      ("vng", "virtme-ng, Debian kernel"), ("vng_own_kernel", "virtme-ng, microvmc's own kernel")):
        c = checks[key]
        ran = (f"ran the command, its output on {c['output_on']}" if c["ran"]
               else f"did not run it ({c['why']})")
        status = "kept" if c["status_kept"] else f"not kept: it returned {c['status']}"
        lines.append(f"`exit 3` under {what}: {ran}; exit status {status}")
    m.emit_report(result, "\n".join(lines), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
