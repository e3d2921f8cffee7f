"""The kernel as a node of the graph (issue 10): microvmc's own kernel is planned from its inputs
whether it is built or not, `build` makes it when it is asked for by name, and the evaluation cache
follows every kernel change: the own kernel built or rebuilt, a kernel file by path replaced, the
Debian kernel reinstalled. No kernel is compiled here: the own kernel's source is a few fake bytes,
and its "build" an entry made by hand with the real own kernel's vmlinux in it.

These build for real (gcc, busybox, the real kernels' files) but boot nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import own_kernel_dir, real_kernel_dir

MICROVMC = [sys.executable, "-m", "microvmc"]
TRUE = '[process]\nargv = ["true"]\n'
# A build in a fresh interpreter that says whether it compiled (imported jsonschema) or was answered
# from the evaluation cache.
BUILD = ("import sys; from microvmc.cli import main; status = main(['build', '--no-link', sys.argv[1]]); "
         "print('COMPILED' if 'jsonschema' in sys.modules else 'CACHED', file=sys.stderr); sys.exit(status)")


@pytest.fixture
def kernels(tmp_path: Path) -> Path:
    """A kernel directory of its own: the real Debian kernel as the default, a fake own-kernel
    source that `microvmc kernel build` is taken to have used last, no own kernel built."""
    real = real_kernel_dir().resolve()
    assert (real / "vmlinuz").is_file(), f"no Debian kernel at {real}: run scripts/setup"
    assert (own_kernel_dir() / "vmlinux").is_file(), f"no own kernel at {own_kernel_dir()}: run scripts/setup"
    kernels = tmp_path / "kernels"
    debian = kernels / "debian-a"
    debian.mkdir(parents=True)
    shutil.copyfile(real / "vmlinuz", debian / "vmlinuz")
    (debian / "modules").symlink_to(real / "modules")
    (kernels / "default").symlink_to(debian.name)
    (kernels / "linux.tar.xz").write_bytes(b"a fake Linux source\n")
    (kernels / "sources.json").write_text(json.dumps({"source": str(kernels / "linux.tar.xz")}))
    return kernels


@pytest.fixture
def env(boot_env, tmp_path: Path, kernels: Path) -> dict[str, str]:
    return dict(boot_env, MICROVMC_STORE=str(tmp_path / "store"), XDG_CACHE_HOME=str(tmp_path / "cache"),
                MICROVMC_KERNEL_DIR=str(kernels / "default"))


def build(env: dict[str, str], manifest: Path) -> tuple[str, bool]:
    """(the output, whether it compiled)."""
    r = subprocess.run([sys.executable, "-c", BUILD, str(manifest)], cwd=manifest.parent, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr.splitlines()[-1] == "COMPILED"


def plan_of(output: str) -> dict:
    return json.loads(Path(output, "plan.json").read_text())


def graph(env: dict[str, str], manifest: Path) -> dict[str, dict]:
    r = subprocess.run([*MICROVMC, "graph", "--json", str(manifest)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return {n["id"]: n for n in json.loads(r.stdout)["nodes"]}


def make_entry(entry: Path, note: str = "") -> None:
    """What `microvmc kernel build` leaves, build.json last (it is what makes the entry complete)."""
    entry.mkdir()
    (entry / "vmlinux").symlink_to(own_kernel_dir().resolve() / "vmlinux")
    (entry / "build.json").write_text(json.dumps({"key": entry.name, "note": note}))


def test_the_own_kernel_is_planned_before_it_is_built(env, tmp_path: Path, kernels: Path) -> None:
    """Resolve needs nothing of a kernel that is not there: the graph shows the own kernel's node,
    keyed by its inputs, not built; `plan` shows what it will boot and says how it gets built."""
    manifest = tmp_path / "own.toml"
    manifest.write_text('version = 1\n[kernel]\nsource = "microvmc"\n' + TRUE)
    nodes = graph(env, manifest)
    kernel = nodes["kernel"]
    entry = kernel["path"]
    assert (kernel["builder"], kernel["realised"], os.path.dirname(entry)) == ("kernel", False, str(kernels))
    assert kernel["locations"]["source"] == str(kernels / "linux.tar.xz")
    assert "boot-kernel" not in nodes and nodes["modules"]["params"]["modules"] == []
    r = subprocess.run([*MICROVMC, "plan", str(manifest)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"-kernel {entry}/vmlinux" in r.stdout
    assert r.stdout.splitlines()[-1] == (f"# the kernel {entry} is not built yet: `microvmc build` builds it (minutes), "
                                         "or `microvmc kernel build`")

    # `build` builds it, with the kernel build's own progress lines; this source cannot be built, and
    # the failure is one line saying where the log is, with nothing half-made left behind.
    r = subprocess.run([*MICROVMC, "build", "--no-link", str(manifest)], env=env, capture_output=True, text=True,
                       timeout=300)
    lines = r.stderr.splitlines()
    assert r.returncode == 125, r.stderr
    assert lines[0] == f"microvmc: kernel: unpacking {kernels}/linux.tar.xz"
    assert lines[-1].startswith("microvmc: kernel build failed at unpack (exit status 2): ") and \
        lines[-1].endswith(f"(the whole log is in {entry}.failed.log)")
    assert not Path(entry).exists() and not list(kernels.glob(".build-*"))

    make_entry(Path(entry))  # built (by hand here): realised, and nothing else about the plan changed
    assert graph(env, manifest)["kernel"]["realised"] is True
    output, compiled = build(env, manifest)
    assert compiled and plan_of(output)["plan"]["kernel"] == f"{entry}/vmlinux"


def test_the_cache_follows_the_own_kernel_being_built_rebuilt_and_changed(env, tmp_path: Path, kernels: Path) -> None:
    manifest = tmp_path / "m.toml"  # kernel.source = "default"
    manifest.write_text("version = 1\n" + TRUE)
    entry = _own_entry(env, tmp_path)

    debian, compiled = build(env, manifest)  # not built: the Debian kernel, and the graph says why
    assert compiled and plan_of(debian)["plan"]["kernel"].endswith("-kernel/kernel")
    chosen = next(n for n in plan_of(debian)["graph"]["nodes"] if n["id"] == "kernel")["locations"]["chosen"]
    assert chosen == f"the default kernel (the Debian kernel: microvmc's own kernel is not built ({entry}); " \
                     "`microvmc kernel build`)"
    assert build(env, manifest) == (debian, False)  # unchanged: a hit

    make_entry(entry)  # built: the plans of the default kernel compile again, on it
    own, compiled = build(env, manifest)
    assert compiled and own != debian
    launch = Path(own, "launch.sh").read_text()
    assert f"{entry}/vmlinux" in launch and f"{entry}/vmlinux" not in Path(debian, "launch.sh").read_text()
    assert plan_of(own)["plan"]["initramfs"] != plan_of(debian)["plan"]["initramfs"]  # no modules in it
    assert build(env, manifest) == (own, False)

    shutil.rmtree(entry)  # the same key rebuilt: the same inputs, so the same plan, byte for byte
    make_entry(entry, note="rebuilt")
    again, _ = build(env, manifest)
    assert again == own and Path(again, "launch.sh").read_text() == launch

    shutil.rmtree(entry)  # gone: compiled again, on the Debian kernel: the very output of before
    assert build(env, manifest) == (debian, True)
    make_entry(entry)
    assert build(env, manifest) == (own, True)

    (kernels / "linux.tar.xz").write_bytes(b"another fake Linux source\n")  # other inputs: another key, not built
    fallback, compiled = build(env, manifest)  # (its note names the entry it lacks)
    assert compiled and plan_of(fallback)["plan"]["kernel"] == plan_of(debian)["plan"]["kernel"]
    other = _own_entry(env, tmp_path)
    assert other != entry
    make_entry(other)
    changed, compiled = build(env, manifest)
    assert compiled and changed != own and f"{other}/vmlinux" in Path(changed, "launch.sh").read_text()


def _own_entry(env: dict[str, str], tmp_path: Path) -> Path:
    manifest = tmp_path / "own.toml"
    manifest.write_text('version = 1\n[kernel]\nsource = "microvmc"\n' + TRUE)
    return Path(graph(env, manifest)["kernel"]["path"])


def test_the_cache_follows_a_kernel_by_path_and_the_debian_kernel(env, tmp_path: Path, kernels: Path) -> None:
    """A kernel file given by path replaced, or the Debian kernel installed anew: the plans that
    boot it compile again, onto another boot kernel; the others are still hits."""
    folder = tmp_path / "k"
    folder.mkdir()
    shutil.copyfile(own_kernel_dir() / "vmlinux", folder / "vmlinux")
    shutil.copyfile(own_kernel_dir() / "config", folder / "config")
    by_path = tmp_path / "path.toml"
    by_path.write_text(f'version = 1\n[kernel]\nsource = "path"\nimage = "{folder}/vmlinux"\n' + TRUE)
    debian = tmp_path / "debian.toml"
    debian.write_text('version = 1\n[kernel]\nsource = "debian"\n' + TRUE)
    first_path, _ = build(env, by_path)
    first_debian, _ = build(env, debian)
    assert build(env, by_path) == (first_path, False) and build(env, debian) == (first_debian, False)

    with open(folder / "vmlinux", "ab") as f:  # another kernel at the same path
        f.write(b"\0")
    second_path, compiled = build(env, by_path)
    assert compiled and second_path != first_path
    assert plan_of(second_path)["plan"]["kernel"] != plan_of(first_path)["plan"]["kernel"]
    assert Path(plan_of(second_path)["plan"]["kernel"]).read_bytes() == (folder / "vmlinux").read_bytes()
    assert build(env, debian) == (first_debian, False)  # it did not depend on that file

    installed = kernels / "debian-b"  # a Debian kernel installed anew: `default` points at it
    installed.mkdir()
    shutil.copyfile(kernels / "debian-a" / "vmlinuz", installed / "vmlinuz")
    with open(installed / "vmlinuz", "ab") as f:
        f.write(b"\0")
    (installed / "modules").symlink_to(os.readlink(kernels / "debian-a" / "modules"))
    (kernels / "default.new").symlink_to(installed.name)
    os.replace(kernels / "default.new", kernels / "default")
    second_debian, compiled = build(env, debian)
    assert compiled and second_debian != first_debian
    assert plan_of(second_debian)["plan"]["kernel"] != plan_of(first_debian)["plan"]["kernel"]
    assert build(env, by_path) == (second_path, False)


def test_the_debian_kernel_s_boot_cuts_are_on_its_command_line_only(boot_env, tmp_path: Path) -> None:
    """resolve chooses the cuts from the kernel's own config (kernel/cuts.py): the Debian kernel's
    plan has them, the own kernel's does not."""
    env = dict(boot_env, MICROVMC_STORE=str(tmp_path / "store"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    cmdlines = {}
    for source in ("debian", "microvmc"):
        manifest = tmp_path / f"{source}.toml"
        manifest.write_text(f'version = 1\n[kernel]\nsource = "{source}"\n[resources]\naccel = "tcg"\n' + TRUE)
        r = subprocess.run([*MICROVMC, "plan", "--json", str(manifest)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        cmdlines[source] = json.loads(r.stdout)["cmdline"].split()
    cuts = ["init_on_alloc=0", "rodata=off", "initcall_blacklist=ftrace_check_for_weak_functions,crypto_kdf108_init"]
    assert [p for p in cmdlines["debian"] if p in cuts] == cuts
    assert not set(cuts) & set(cmdlines["microvmc"])
    assert not any(p.startswith("initcall_blacklist=") for p in cmdlines["microvmc"])
