"""backends/host.py: probing a fake host tree, and the probe cache."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from microvmc.backends.host import (
    default_kernel_dir,
    facts_from_dict,
    kvm_status,
    probe_host,
    qemu_version,
    tsc_khz,
    virtiofsd_flavour,
    virtiofsd_status,
)
from microvmc.compiler.host import HostFacts, VirtiofsdFlavour

C_VIRTIOFSD = """virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)
Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers
using FUSE kernel interface version 7.36
"""
QEMU = """QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)
Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers
"""


def script(path: Path, output: str, *, count: Path | None = None) -> Path:
    """An executable that prints `output` for --version (and counts its runs in `count`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = f"echo run >> '{count}'\n" if count else ""
    path.write_text(f"#!/bin/sh\n{record}cat <<'EOF'\n{output}EOF\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake(tmp_path: Path) -> dict:
    """A fake root, PATH, HOME and cache directory."""
    root = tmp_path / "root"
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text("boot-1\n")
    (root / "proc/cpuinfo").write_text("processor\t: 0\ncpu MHz\t\t: 2596.134\n")
    bin_dir = tmp_path / "bin"
    runs = tmp_path / "runs"
    script(bin_dir / "qemu-system-x86_64", QEMU, count=runs)
    script(root / "usr/lib/qemu/virtiofsd", C_VIRTIOFSD, count=runs)
    environ = {
        "PATH": str(bin_dir),
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    return {"root": str(root), "environ": environ, "runs": runs, "bin": bin_dir, "tmp": tmp_path}


def test_probe_fake_host(fake):
    facts = probe_host(fake["environ"], root=fake["root"])
    assert facts.qemu == str(fake["bin"] / "qemu-system-x86_64")
    assert facts.qemu_version == (7, 2, 22)
    assert facts.virtiofsd == os.path.join(fake["root"], "usr/lib/qemu/virtiofsd")
    assert facts.virtiofsd_flavour == VirtiofsdFlavour.C
    assert facts.virtiofsd_usable == (os.geteuid() == 0) and facts.virtiofs_ready == (os.geteuid() == 0)
    assert (facts.kvm_usable, facts.kvm_reason) == (False, "there is no /dev/kvm")
    assert facts.tsc_khz == 2596000
    assert facts.default_kernel_dir == os.path.join(
        fake["environ"]["HOME"], ".local/share/microvmc/kernel/default"
    )
    assert facts.busybox is None
    assert facts.host_kernel_release == os.uname().release


def test_missing_qemu_is_a_fact_not_an_error(fake):
    (fake["bin"] / "qemu-system-x86_64").unlink()
    facts = probe_host(fake["environ"], root=fake["root"])
    assert (facts.qemu, facts.qemu_version) == ("", (0, 0, 0))


def test_overrides(fake, tmp_path):
    rust = script(tmp_path / "other/virtiofsd", "virtiofsd 1.10.1\n")
    qemu = script(tmp_path / "other/qemu", "QEMU emulator version 8.2.1\n")
    environ = fake["environ"] | {
        "MICROVMC_QEMU": str(qemu),
        "MICROVMC_VIRTIOFSD": str(rust),
        "MICROVMC_KERNEL_DIR": "/k",
        "MICROVMC_BUSYBOX": "/bb",
    }
    facts = probe_host(environ, root=fake["root"])
    assert (facts.qemu, facts.qemu_version) == (str(qemu), (8, 2, 1))
    assert (facts.virtiofsd, facts.virtiofsd_flavour) == (str(rust), VirtiofsdFlavour.RUST)
    assert (facts.default_kernel_dir, facts.busybox) == ("/k", "/bb")


def test_cached_probe_runs_nothing(fake):
    first = probe_host(fake["environ"], root=fake["root"])
    assert fake["runs"].read_text().count("run") == 2  # qemu and virtiofsd --version
    assert probe_host(fake["environ"], root=fake["root"]) == first
    assert fake["runs"].read_text().count("run") == 2
    assert (Path(fake["environ"]["XDG_CACHE_HOME"]) / "microvmc/host-facts.json").is_file()


@pytest.mark.parametrize("change", ["binary", "boot", "env"])
def test_cache_invalidated(fake, change):
    probe_host(fake["environ"], root=fake["root"])
    environ = fake["environ"]
    if change == "binary":
        script(
            fake["bin"] / "qemu-system-x86_64", "QEMU emulator version 9.0.0\n", count=fake["runs"]
        )
    elif change == "boot":
        Path(fake["root"], "proc/sys/kernel/random/boot_id").write_text("boot-2\n")
    else:
        environ = environ | {"MICROVMC_KERNEL_DIR": "/elsewhere"}
    facts = probe_host(environ, root=fake["root"])
    assert fake["runs"].read_text().count("run") == 4
    if change == "binary":
        assert facts.qemu_version == (9, 0, 0)


def test_unwritable_cache_is_not_an_error(fake):
    environ = fake["environ"] | {"XDG_CACHE_HOME": "/proc/no-such-dir"}
    assert probe_host(environ, root=fake["root"]).qemu_version == (7, 2, 22)


def test_corrupt_cache_is_reprobed(fake):
    probe_host(fake["environ"], root=fake["root"])
    cache = Path(fake["environ"]["XDG_CACHE_HOME"], "microvmc/host-facts.json")
    cache.write_text("{not json")
    assert probe_host(fake["environ"], root=fake["root"]).qemu_version == (7, 2, 22)


def test_kvm_pvm(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").write_text("")
    (tmp_path / "sys/module/kvm_pvm").mkdir(parents=True)
    assert kvm_status(str(tmp_path)) == (
        False,
        "/dev/kvm is kvm_pvm, a nested hypervisor that cannot run a normal guest",
    )


def test_kvm_not_a_kvm_device(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").write_text("")
    usable, reason = kvm_status(str(tmp_path))
    assert not usable
    assert reason.startswith("/dev/kvm does not answer KVM_GET_API_VERSION")


def test_tsc_prefers_the_kernels_figure(tmp_path):
    (tmp_path / "sys/devices/system/cpu/cpu0").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/cpu0/tsc_freq_khz").write_text("2596134\n")
    assert tsc_khz(str(tmp_path)) == 2596134
    assert tsc_khz(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize(
    "output, expected",
    [
        (C_VIRTIOFSD, VirtiofsdFlavour.C),
        ("virtiofsd 1.10.1\n", VirtiofsdFlavour.RUST),
        ("virtiofsd v1.7.0\n", VirtiofsdFlavour.RUST),
        ("", None),
    ],
)
def test_virtiofsd_flavour(output, expected):
    assert virtiofsd_flavour(output) == expected


@pytest.mark.parametrize(
    "path, flavour, output, euid, expected",
    [
        (None, None, "", 0, (False, "virtiofsd is not installed")),
        ("/v", VirtiofsdFlavour.C, C_VIRTIOFSD, 0, (True, "virtiofsd (/v, c flavour) runs as root")),
        ("/v", VirtiofsdFlavour.RUST, "virtiofsd 1.10.1\n", 1000,
         (False, "virtiofsd (/v) needs root, and microvmc runs as uid 1000")),
        # What the Debian 12 C virtiofsd prints to an ordinary user, even for --version.
        ("/v", None, "setgroups() failed with error=1:Operation not permitted\n", 1000,
         (False, "/v --version failed (setgroups() failed with error=1:Operation not permitted); it needs root")),
        ("/v", None, "", 0, (False, "/v --version failed (no output)")),
    ],
)
def test_virtiofsd_status(path, flavour, output, euid, expected):
    assert virtiofsd_status(path, flavour, output, euid=euid) == expected


@pytest.mark.parametrize(
    "output, expected",
    [(QEMU, (7, 2, 22)), ("QEMU emulator version 8.2\n", (8, 2, 0)), ("garbage", (0, 0, 0))],
)
def test_qemu_version(output, expected):
    assert qemu_version(output) == expected


MUSL_LOADER = "musl libc (x86_64)\nVersion 1.2.3\nDynamic Program Loader\n"


def test_the_init_is_compiled_with_musl_when_musl_gcc_and_its_loader_are_there(fake):
    script(fake["bin"] / "gcc", "gcc (Debian 12.2.0-14) 12.2.0\n")
    glibc = probe_host(fake["environ"], root=fake["root"])
    assert (glibc.init_cc, glibc.init_cc_version, glibc.init_libc) == (
        str(fake["bin"] / "gcc"), "gcc (Debian 12.2.0-14) 12.2.0; glibc", "glibc")
    script(fake["bin"] / "musl-gcc", "x86_64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0\n")
    # musl-gcc alone is not enough: musl's loader names its version, which keys the cached init
    assert probe_host(fake["environ"], root=fake["root"]).init_libc == "glibc"
    script(Path(fake["root"], "lib/ld-musl-x86_64.so.1"), MUSL_LOADER)
    musl = probe_host(fake["environ"], root=fake["root"])  # (both binaries are in the probe cache's key)
    assert (musl.init_cc, musl.init_cc_version, musl.init_libc) == (
        str(fake["bin"] / "musl-gcc"), "x86_64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0; musl 1.2.3", "musl")
    assert (musl.cc, musl.cc_version) == (glibc.cc, glibc.cc_version)  # the own kernel's compiler is unchanged
    assert facts_from_dict(musl.to_dict()) == musl


def test_default_kernel_dir_xdg():
    assert default_kernel_dir({"XDG_DATA_HOME": "/d", "HOME": "/h"}) == "/d/microvmc/kernel/default"


def test_facts_round_trip():
    facts = HostFacts(qemu_version=(8, 1, 3), virtiofsd=None, virtiofsd_flavour=None, tsc_khz=1)
    assert facts_from_dict(facts.to_dict()) == facts
    assert facts_from_dict(HostFacts().to_dict()) == HostFacts()


def test_real_host_probe_is_cheap_when_cached(tmp_path):
    """On this machine: the second probe answers from the cache."""
    environ = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    assert probe_host(environ) == probe_host(environ)
    assert (tmp_path / "microvmc/host-facts.json").is_file()


def test_the_tiny_guest_runs_under_tcg() -> None:
    """The test guest that decides whether KVM can run guest code is itself sound: QEMU boots it."""
    import shutil

    from microvmc.backends.host import guest_runs

    assert guest_runs(shutil.which("qemu-system-x86_64"), "tcg") == (True, "it ran")


def test_a_guest_that_cannot_start_is_explained(tmp_path) -> None:
    from microvmc.backends.host import guest_runs

    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: could not access KVM kernel module: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    assert guest_runs(str(fake), "kvm") == (False, "qemu: could not access KVM kernel module: Permission denied")
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    assert guest_runs(str(slow), "kvm", timeout=0.5) == (False, "it did not finish within 0.5 s")
