"""`microvmc build`: content-addressed, reproducible, nothing rebuilt, safe under concurrency.

These build for real (the default kernel, gcc, busybox) but boot nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES, on_kernel

MICROVMC = [sys.executable, "-m", "microvmc"]


def build(env: dict[str, str], cwd: Path, manifest: str, *extra: str) -> str:
    result = subprocess.run([*MICROVMC, "build", manifest, *extra], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def tree_bytes(path: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = Path(p).read_bytes()
    return out


@pytest.fixture
def env(boot_env, tmp_path: Path) -> dict[str, str]:
    env = dict(boot_env)
    env["MICROVMC_STORE"] = str(tmp_path / "store")
    return env


def plan_inputs(out: str) -> list[str]:
    import json

    plan = json.loads(Path(out, "plan.json").read_text())["plan"]
    return [os.path.dirname(plan["kernel"]), os.path.dirname(plan["initramfs"])]


def store_paths(out: str) -> list[str]:
    """Every store path an output was built from (kernel, init, initramfs, root filesystem)."""
    import json

    graph = json.loads(Path(out, "plan.json").read_text())["graph"]
    return sorted({n["path"] for n in graph["nodes"] if n["path"].startswith(os.path.dirname(out) + "/")})


def test_same_inputs_same_bytes_from_anywhere(env, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b" / "deeper"
    a.mkdir()
    b.mkdir(parents=True)
    first = build(env, a, str(EXAMPLES / "hello.toml"))
    assert Path(a, "result").resolve() == Path(first)
    built = [first, *store_paths(first)]
    # the output, the init, the initramfs, the busybox root filesystem; microvmc's own kernel is
    # booted from its entry, outside the store
    assert len(built) == 4
    before = {p: tree_bytes(p) for p in built}
    for p in before:
        shutil.rmtree(p)
    second = build(env, b, os.path.relpath(EXAMPLES / "hello.toml", b))
    assert second == first
    assert {p: tree_bytes(p) for p in [second, *store_paths(second)]} == before
    assert sorted(os.listdir(first)) == ["cmdline", "graph.dot", "launch.sh", "plan.json", "virtiofsd.json"]


def test_unchanged_manifest_rebuilds_nothing(env, tmp_path: Path) -> None:
    out = build(env, tmp_path, str(EXAMPLES / "hello.toml"), "--no-link")
    store = Path(env["MICROVMC_STORE"])
    stamps = {p: p.stat().st_mtime_ns for p in store.iterdir()}
    assert build(env, tmp_path, str(EXAMPLES / "hello.toml"), "--no-link") == out
    assert {p: p.stat().st_mtime_ns for p in store.iterdir()} == stamps
    assert not (tmp_path / "result").exists()


def test_concurrent_builds_do_not_corrupt_the_store(env, tmp_path: Path) -> None:
    manifest = on_kernel(EXAMPLES / "shares.toml", "debian", tmp_path)  # a kernel with modules to copy
    procs = [
        subprocess.Popen([*MICROVMC, "build", "--no-link", str(manifest)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [p.communicate() + (p.returncode,) for p in procs]
    assert all(code == 0 for _, _, code in results), results
    assert len({out for out, _, _ in results}) == 1
    store = Path(env["MICROVMC_STORE"])
    assert not [p for p in store.iterdir() if p.name.startswith(".tmp")]
    initramfs = Path(plan_inputs(results[0][0].strip())[1], "initramfs.cpio.gz")
    listing = subprocess.run(f"gzip -dc {initramfs} | cpio -t --quiet", shell=True, capture_output=True, text=True, check=True)
    names = listing.stdout.split()
    assert {"init", "microvmc/modules", "lib/modules/overlay.ko", "lib/modules/virtiofs.ko"} <= set(names)


def test_initramfs_extracts_identically_with_gnu_cpio(env, tmp_path: Path) -> None:
    out = build(env, tmp_path, str(on_kernel(EXAMPLES / "hello.toml", "debian", tmp_path)), "--no-link")
    initramfs = Path(plan_inputs(out)[1], "initramfs.cpio.gz")
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(f"gzip -dc {initramfs} | cpio -idm --quiet", shell=True, cwd=dest, check=True)
    order = (dest / "microvmc" / "modules").read_text().split()
    assert order[-1] in ("/lib/modules/virtiofs.ko", "/lib/modules/virtio_console.ko")
    assert all((dest / m.lstrip("/")).read_bytes()[:4] == b"\x7fELF" for m in order)
    init = dest / "init"
    assert init.stat().st_mode & 0o777 == 0o755 and init.read_bytes()[:4] == b"\x7fELF"
    # Dependencies come before the modules that need them.
    names = [Path(m).stem for m in order]
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_mmio")
    assert names.index("fuse") < names.index("virtiofs")


def test_spilled_configuration_goes_into_the_initramfs(env, tmp_path: Path) -> None:
    manifest = tmp_path / "many.toml"
    env_lines = "".join(f'V{i:02d} = "value {i}"\n' for i in range(40))
    manifest.write_text(f'version = 1\n[process]\nargv = ["env"]\n[process.env]\n{env_lines}')
    out = build(env, tmp_path, str(manifest), "--no-link")
    cmdline = Path(out, "cmdline").read_text()
    assert "MVMC_SPILL=1" in cmdline and "MVMC_E" not in cmdline
    initramfs = Path(plan_inputs(out)[1], "initramfs.cpio.gz")
    config = subprocess.run(f"gzip -dc {initramfs} | cpio -i --to-stdout --quiet microvmc/config", shell=True,
                            capture_output=True, text=True, check=True).stdout
    assert "MVMC_E40=V39=value%2039\n" in config  # MVMC_E0 is PATH


def test_result_link_must_not_clobber_a_file(env, tmp_path: Path) -> None:
    (tmp_path / "result").write_text("mine")
    r = subprocess.run([*MICROVMC, "build", str(EXAMPLES / "hello.toml")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 125
    assert r.stderr == "microvmc: result exists and is not a symbolic link; not replacing it (use -o to choose another name)\n"
    assert (tmp_path / "result").read_text() == "mine"


def _build_in_process(env, cwd: Path, manifest: Path) -> tuple[int, str, str, bool]:
    """A build in a fresh interpreter: status, stdout, stderr, and whether it compiled (imported jsonschema)."""
    code = ("import sys; from microvmc.cli import main; status = main(['build', '--no-link', sys.argv[1]]); "
            "print('COMPILED' if 'jsonschema' in sys.modules else 'CACHED', file=sys.stderr); sys.exit(status)")
    r = subprocess.run([sys.executable, "-c", code, str(manifest)], cwd=cwd, env=env, capture_output=True, text=True)
    lines = r.stderr.splitlines()
    return r.returncode, r.stdout.strip(), "\n".join(lines[:-1]), lines[-1] == "COMPILED"


def test_evaluation_cache_hits_only_while_every_input_is_unchanged(env, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "base.toml").write_text('version = 1\n[process]\nenv = { A = "1" }\n')
    manifest = tmp_path / "m.toml"
    manifest.write_text('version = 1\nimports = ["base.toml"]\n[process]\nargv = ["true"]\n'
                        '[shares.data]\nhost = "data"\nguest = "/mnt"\n')
    status, first, _, compiled = _build_in_process(env, tmp_path, manifest)
    assert (status, compiled) == (0, True)
    assert _build_in_process(env, tmp_path, manifest)[1:] == (first, "", False)  # a hit: nothing compiled

    (tmp_path / "base.toml").write_text('version = 1\n[process]\nenv = { A = "2" }\n')  # an imported file changed
    status, second, _, compiled = _build_in_process(env, tmp_path, manifest)
    assert (status, compiled) == (0, True) and second != first

    (tmp_path / "data").rmdir()  # a source the cache saw is gone: compile, and say what is wrong
    status, _, err, compiled = _build_in_process(env, tmp_path, manifest)
    assert (status, compiled) == (125, True)
    assert err == 'm.toml: shares.data.host: "data" is not a directory'

    (tmp_path / "data").mkdir()  # back: shared directories are identified by path, so the entry holds again
    assert _build_in_process(env, tmp_path, manifest)[1:] == (second, "", False)
    cache = Path(env["XDG_CACHE_HOME"], "microvmc", "eval")
    for entry in cache.iterdir():
        entry.write_text("{ not json")  # a damaged entry is a miss, never an error
    status, again, _, compiled = _build_in_process(env, tmp_path, manifest)
    assert (status, again, compiled) == (0, second, True)


def _root_mode(output: str) -> str:
    return next(p for p in Path(output, "cmdline").read_text().split() if p.startswith("MVMC_ROOT="))


def test_evaluation_cache_sees_what_resolve_looked_at(env, tmp_path: Path) -> None:
    """Issue 6, item 8: a directory image that loses the mount point of a share needs an overlay
    root for it; the cache answered with the old plan (`run` failed 120, `plan` was right)."""
    for d in ("image/proc", "image/sys", "image/dev", "image/data", "data"):
        (tmp_path / d).mkdir(parents=True)
    manifest = tmp_path / "m.toml"
    manifest.write_text('version = 1\n[image]\nsource = "directory"\npath = "image"\nmode = "read-only"\n'
                        '[process]\nargv = ["true"]\n[shares.data]\nhost = "data"\nguest = "/data"\n'
                        'read_only = true\n')
    status, first, _, compiled = _build_in_process(env, tmp_path, manifest)
    assert (status, compiled) == (0, True) and _root_mode(first).endswith(":ro")
    assert _build_in_process(env, tmp_path, manifest)[1:] == (first, "", False)

    (tmp_path / "image" / "data").rmdir()  # nothing the manifest names changed; what resolve saw did
    status, second, _, compiled = _build_in_process(env, tmp_path, manifest)
    assert (status, compiled) == (0, True) and _root_mode(second).endswith(":overlay-ro")
    plan = subprocess.run([*MICROVMC, "plan", str(manifest)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert _root_mode(second) in plan.stdout.split()  # what `plan` compiles, fresh

    (tmp_path / "image" / "etc").mkdir()  # what resolve did not look at: still a hit
    assert _build_in_process(env, tmp_path, manifest)[1:] == (second, "", False)


def test_a_kernel_given_by_path(env, tmp_path: Path, boot_env) -> None:
    """kernel.source = "path": the same bzImage is the same store path as the Debian kernel's;
    an ELF vmlinux works too; modules of another kernel are refused with the reason."""
    import json

    from conftest import FIXTURES, real_kernel_dir

    kernel = real_kernel_dir()
    default = build(env, tmp_path, str(on_kernel(EXAMPLES / "hello.toml", "debian", tmp_path)), "--no-link")
    (tmp_path / "by-path.toml").write_text(
        f'version = 1\n[kernel]\nsource = "path"\nimage = "{kernel}/vmlinuz"\nmodules = "{kernel}/modules"\n'
        '[process]\nargv = ["true"]\n'
    )
    by_path = build(env, tmp_path, "by-path.toml", "--no-link")
    kernel_of = lambda out: json.loads(Path(out, "plan.json").read_text())["plan"]["kernel"]
    assert kernel_of(by_path) == kernel_of(default)

    vmlinux = Path(kernel_of(default))
    assert vmlinux.read_bytes()[:4] == b"\x7fELF"  # the Debian kernel boots as its PVH vmlinux
    (tmp_path / "elf.toml").write_text(
        f'version = 1\n[kernel]\nsource = "path"\nimage = "{vmlinux}"\nmodules = "{kernel}/modules"\n'
        '[process]\nargv = ["true"]\n'
    )
    assert Path(kernel_of(build(env, tmp_path, "elf.toml", "--no-link"))).read_bytes() == vmlinux.read_bytes()

    (tmp_path / "mismatch.toml").write_text(
        f'version = 1\n[kernel]\nsource = "path"\nimage = "{FIXTURES}/kernel/vmlinuz"\nmodules = "{kernel}/modules"\n'
        '[process]\nargv = ["true"]\n'
    )
    r = subprocess.run([*MICROVMC, "build", "--no-link", "mismatch.toml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 125
    assert "vermagic" in r.stderr and "6.1.0-fixture-amd64" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


def test_an_unwritable_store_is_one_line(env, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    r = subprocess.run([*MICROVMC, "build", "--no-link", "--store", str(blocked / "store"), str(EXAMPLES / "hello.toml")],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 125
    assert r.stderr.startswith("microvmc: ") and len(r.stderr.splitlines()) == 1, r.stderr


def test_a_missing_compiler_is_one_clear_line(env, tmp_path: Path) -> None:
    import shutil as sh

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("qemu-system-x86_64",):
        (bin_dir / tool).symlink_to(sh.which(tool))
    env = dict(env, PATH=str(bin_dir))
    r = subprocess.run([*MICROVMC, "build", "--no-link", str(EXAMPLES / "hello.toml")], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 125
    assert r.stderr == "microvmc: cannot compile the guest init: the C compiler 'cc' is not installed (run scripts/setup)\n"
    assert not [p for p in Path(env["MICROVMC_STORE"]).iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("signum", [15, 1])
def test_a_build_stopped_by_a_signal_leaves_nothing_behind(env, tmp_path: Path, signum: int) -> None:
    """Issue 6, item 9: SIGTERM during a cold build left store/.tmp-* and /tmp/microvmc-init-* forever."""
    import signal
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(env, TMPDIR=str(tmp))
    proc = subprocess.Popen([*MICROVMC, "build", "--no-link", str(EXAMPLES / "hello.toml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a bound, not a measurement: the init compiles after the kernel
    while not list(tmp.glob("microvmc-init-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the build ended before the init was compiled"
    assert list(Path(env["MICROVMC_STORE"]).glob(".tmp-*"))  # caught mid-build
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out, err) == (
        128 + signum, "", f"microvmc: the build was stopped by {signal.Signals(signum).name}\n")
    assert list(Path(env["MICROVMC_STORE"]).glob(".tmp-*")) == []
    assert list(tmp.iterdir()) == []
    assert build(env, tmp_path, str(EXAMPLES / "hello.toml"), "--no-link")  # and the next build completes
