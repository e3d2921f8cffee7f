"""The planner on a fake host: accelerator choice, virtiofsd flavours, escaping, host errors."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURE_SOURCES, fake_facts
from microvmc.compiler.host import VirtiofsdFlavour
from microvmc.compiler.load import load
from microvmc.compiler.manifest import validate
from microvmc.compiler.pipeline import compile_manifest
from microvmc.compiler.plan import READ_ONLY_JAIL
from microvmc.errors import HostError, ManifestError


def compiled(tmp_path: Path, text: str, **facts):
    path = tmp_path / "m.toml"
    path.write_text("version = 1\n" + text)
    manifest = validate(load(path, cwd=str(tmp_path)))
    return compile_manifest(manifest, facts=fake_facts(**facts), store="/s", sources=FIXTURE_SOURCES)


def test_auto_uses_kvm_when_usable(tmp_path: Path) -> None:
    c = compiled(tmp_path, '[process]\nargv = ["true"]\n', kvm_usable=True, kvm_reason="/dev/kvm works")
    argv = c.plan.qemu_argv
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"
    assert "tsc_early_khz" not in c.plan.cmdline
    assert c.plan.accel_reason == "auto: /dev/kvm works"


def test_auto_falls_back_to_tcg_and_says_why(tmp_path: Path) -> None:
    c = compiled(tmp_path, '[process]\nargv = ["true"]\n', kvm_reason="/dev/kvm is kvm_pvm, a nested hypervisor that cannot run a normal guest")
    argv = c.plan.qemu_argv
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-cpu") + 1] == "max,-erms,-fsrm"
    assert "tsc_early_khz=2000000 tsc=reliable" in c.plan.cmdline
    assert c.plan.accel_reason == "auto: KVM is not usable (/dev/kvm is kvm_pvm, a nested hypervisor that cannot run a normal guest)"


def test_explicit_kvm_that_cannot_work_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(HostError) as err:
        compiled(tmp_path, '[process]\nargv = ["true"]\n[resources]\naccel = "kvm"\n', kvm_reason="/dev/kvm is missing")
    assert err.value.lines() == ['m.toml: resources.accel: "kvm" is not usable here: /dev/kvm is missing (use "auto" or "tcg")']
    assert err.value.status == 121


def test_virtiofsd_flavours(tmp_path: Path) -> None:
    (tmp_path / "d,ata").mkdir()
    text = '[process]\nargv = ["true"]\n[shares.data]\nhost = "d,ata"\nguest = "/mnt"\nread_only = true\n'
    c = compiled(tmp_path, text)
    share = c.plan.virtiofsd[1]
    # The C virtiofsd has no read-only mode: it serves a read-only bind mount of the share, made in a
    # mount namespace of its own (issue 6, item 1).
    assert share.argv == ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", READ_ONLY_JAIL,
                          "microvmc-read-only", f"{tmp_path}/d,ata",
                          "/usr/lib/qemu/virtiofsd", "-o", f"source={tmp_path}/d\\,ata", "-o", "cache=auto", "-o", "sandbox=chroot")
    assert share.argv_with_fd(7)[-1] == "--fd=7"
    assert c.plan.virtiofsd[0].argv[:5] == ("unshare", "--mount", "--propagation", "private", "--")  # the read-only root
    writable = compiled(tmp_path, text.replace("read_only = true", "read_only = false"))
    assert writable.plan.virtiofsd[1].argv[0] == "/usr/lib/qemu/virtiofsd"
    rust = compiled(tmp_path, text, virtiofsd="/usr/libexec/virtiofsd", virtiofsd_flavour=VirtiofsdFlavour.RUST)
    assert rust.plan.virtiofsd[1].argv == ("/usr/libexec/virtiofsd", "--shared-dir", f"{tmp_path}/d,ata",
                                           "--cache", "auto", "--sandbox", "chroot", "--readonly")
    assert rust.plan.virtiofsd[0].argv[-1] != "--readonly" or rust.plan.virtiofsd[0].read_only


def test_only_a_root_from_the_store_is_cached_without_revalidation(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "rootfs").mkdir()
    shares = '[shares.data]\nhost = "data"\nguest = "/mnt"\nread_only = true\n'
    builtin = compiled(tmp_path, '[process]\nargv = ["true"]\n' + shares)
    root, share = builtin.plan.virtiofsd
    # The built-in image is a store path, never written: cached as long as the guest likes; a share is live.
    assert ("cache=always" in root.argv, "cache=auto" in share.argv) == (True, True)
    assert [fs.immutable for fs in builtin.plan.machine.filesystems] == [True, False]
    directory = compiled(tmp_path, '[image]\nsource = "directory"\npath = "rootfs"\n[process]\nargv = ["true"]\n')
    assert "cache=auto" in directory.plan.virtiofsd[0].argv  # the host's own directory: it may change
    overlay = compiled(tmp_path, '[image]\nmode = "overlay"\n[process]\nargv = ["true"]\n')
    assert "cache=always" in overlay.plan.virtiofsd[0].argv  # the guest writes to its own upper layer
    rust = compiled(tmp_path, '[process]\nargv = ["true"]\n', virtiofsd="/usr/libexec/virtiofsd",
                    virtiofsd_flavour=VirtiofsdFlavour.RUST)
    assert rust.plan.virtiofsd[0].argv[3:5] == ("--cache", "always")


def test_a_comma_in_a_path_cannot_split_a_qemu_option(tmp_path: Path) -> None:
    (tmp_path / "x,id=evil").mkdir()
    c = compiled(tmp_path, '[process]\nargv = ["true"]\n[shares.data]\nhost = "x,id=evil"\nguest = "/mnt"\ntransport = "9p"\n')
    argv = c.plan.qemu_argv
    fsdev = argv[argv.index("-fsdev") + 1]
    assert fsdev == f"local,id=fs-data,path={tmp_path}/x,,id=evil,security_model=none,readonly=off"


def test_missing_qemu_or_virtiofsd(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="QEMU is not installed"):
        compiled(tmp_path, '[process]\nargv = ["true"]\n', qemu="")
    with pytest.raises(HostError) as err:
        compiled(tmp_path, '[image]\ntransport = "virtiofs"\n[process]\nargv = ["true"]\n', virtiofsd=None,
                 virtiofsd_flavour=None)
    assert str(err.value) == 'm.toml: image.transport: "virtiofs" is not usable here: virtiofsd is not installed'
    # 9p needs no virtiofsd.
    c = compiled(tmp_path, '[image]\ntransport = "9p"\n[process]\nargv = ["true"]\n', virtiofsd=None, virtiofsd_flavour=None)
    assert c.plan.virtiofsd == () and "virtio-mmio.force-legacy=false" not in c.plan.qemu_argv


def test_auto_transport_is_virtiofs_where_virtiofsd_runs_else_9p(tmp_path: Path) -> None:
    text = '[process]\nargv = ["true"]\n[shares.data]\nhost = "."\nguest = "/mnt"\n'
    root = compiled(tmp_path, text)
    assert [v.tag for v in root.plan.virtiofsd] == ["root", "data"]
    assert root.manifest.image.transport == "virtiofs" and root.manifest.shares[0].transport == "virtiofs"
    assert "MVMC_ROOT=virtiofs:root:ro" in root.plan.cmdline.split()
    user = compiled(tmp_path, text, virtiofsd_usable=False, virtiofsd_reason="virtiofsd needs root")
    assert user.plan.virtiofsd == ()
    assert user.manifest.image.transport == "9p" and user.manifest.shares[0].transport == "9p"
    argv = user.plan.qemu_argv
    assert [argv[i + 1].split(",")[0:2] for i, a in enumerate(argv) if a == "-fsdev"] == [
        ["local", "id=fs-root"], ["local", "id=fs-data"]]
    modules = [m["name"] for m in user.graph.node("modules").to_dict()["params"]["modules"]]
    assert "9p" in modules and "virtiofs" not in modules
    assert "MVMC_ROOT=9p:root:ro" in user.plan.cmdline.split() and "virtiofs" not in user.plan.cmdline


def test_explicit_virtiofs_that_cannot_run_is_refused_with_the_reason(tmp_path: Path) -> None:
    text = '[process]\nargv = ["true"]\n[shares.data]\nhost = "."\nguest = "/mnt"\ntransport = "virtiofs"\n'
    with pytest.raises(HostError) as err:
        compiled(tmp_path, text, virtiofsd_usable=False,
                 virtiofsd_reason="virtiofsd (/usr/lib/qemu/virtiofsd) needs root, and microvmc runs as uid 1000")
    assert str(err.value) == ('m.toml: shares.data.transport: "virtiofs" is not usable here: '
                              "virtiofsd (/usr/lib/qemu/virtiofsd) needs root, and microvmc runs as uid 1000")
    assert err.value.hint == 'use "auto" or "9p"'


def test_missing_default_kernel_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as err:
        compiled(tmp_path, '[process]\nargv = ["true"]\n', default_kernel_dir=str(tmp_path / "none"))
    assert err.value.lines() == [
        f"m.toml: kernel.source: the default kernel is not installed: {tmp_path}/none/vmlinuz is missing "
        '(run scripts/setup, or set kernel.source = "path")'
    ]


def test_the_graph_says_what_is_built_from_what(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    c = compiled(tmp_path, '[image]\nmode = "overlay"\n[process]\nargv = ["true"]\n[shares.data]\nhost = "data"\nguest = "/data"\n')
    edges = set(c.graph.edges)
    assert {("busybox", "rootfs"), ("rootfs", "share:root"), ("share:root", "virtiofsd:root"),
            ("share:data", "virtiofsd:data"), ("kernel", "boot-kernel"), ("kernel", "modules"),
            ("init-src", "init"), ("init", "initramfs"), ("modules", "initramfs"),
            ("initramfs", "plan"), ("boot-kernel", "plan"), ("virtiofsd:root", "plan"), ("virtiofsd:data", "plan")} <= edges
    order = [n.id for n in c.graph.nodes]
    assert order.index("init") < order.index("initramfs") < order.index("plan")
    modules = [m["name"] for m in c.graph.node("modules").param("modules")]
    # Dependencies first; ties broken by name, so the order (and the initramfs) is deterministic.
    assert modules == ["fuse", "overlay", "virtio_ring", "virtio", "virtio_console", "virtio_mmio", "virtiofs"]


def test_a_kernel_whose_release_cannot_be_told(tmp_path: Path) -> None:
    from conftest import FIXTURES
    from microvmc.errors import KernelError

    elf = FIXTURES / "kernel" / "modules" / "kernel" / "fs" / "fuse" / "fuse.ko"  # an ELF with no banner
    with pytest.raises(KernelError) as err:
        compiled(tmp_path, f'[kernel]\nsource = "path"\nimage = "{elf}"\nmodules = "{FIXTURES}/kernel/modules"\n'
                           '[process]\nargv = ["true"]\n')
    assert err.value.lines() == [f"{elf}: cannot tell which kernel release this is, so its modules cannot be checked "
                                 "(name the modules directory after the release, as lib/modules/<release> is)"]


def test_stop_timeout_in_the_launch_script(tmp_path: Path) -> None:
    from microvmc.compiler.emit import launch_script

    default = launch_script(compiled(tmp_path, '[process]\nargv = ["true"]\n').plan)
    assert "trap 'stop 15' TERM" in default and "( watch 10 stop-timed-out '' ) 7>&- &" in default
    assert 'printf \'signal %s\\n\' "$1" >&8' in default
    fractional = launch_script(compiled(tmp_path, '[process]\nargv = ["true"]\n[resources]\nstop_timeout = 2.5\n').plan)
    assert "( watch 3 stop-timed-out '' ) 7>&- &" in fractional and "within 2.5 s of signal" in fractional
    at_once = launch_script(compiled(tmp_path, '[process]\nargv = ["true"]\n[resources]\nstop_timeout = 0\n').plan)
    assert "trap 'exit 143' TERM" in at_once and "stop()" not in at_once


def test_a_read_only_root_lacking_a_mount_point_becomes_a_read_only_overlay(tmp_path: Path) -> None:
    """init cannot make a directory on a read-only root. Where the image has every mount point (or
    they lie below /tmp, /run, /dev, a writable share, or in the read-only share above), the root
    stays a plain read-only mount; otherwise it is an overlay made read-only after the shares."""
    (tmp_path / "ro" / "sub").mkdir(parents=True)
    (tmp_path / "img" / "opt" / "data").mkdir(parents=True)
    for d in ("proc", "sys", "dev"):
        (tmp_path / "img" / d).mkdir()
    (tmp_path / "bare").mkdir()  # an image without /proc, /sys, /dev (a container image often is)

    def root_flag(*entries: tuple[str, str, bool], image: str = "") -> tuple[str, bool]:
        text = image + '[process]\nargv = ["true"]\n'
        for i, (host, guest, ro) in enumerate(entries):
            text += f'[shares.s{i}]\nhost = "{host}"\nguest = "{guest}"\nread_only = {str(ro).lower()}\n'
        c = compiled(tmp_path, text)
        [root] = [p for p in c.plan.cmdline.split() if p.startswith("MVMC_ROOT=")]
        modules = [m["name"] for m in c.graph.node("modules").to_dict()["params"]["modules"]]
        return root.rsplit(":", 1)[1], "overlay" in modules

    directory = '[image]\nsource = "directory"\npath = "img"\n'
    assert root_flag((".", "/mnt", False), (".", "/tmp/a/b", False), (".", "/run/x", True),
                     (".", "/dev/y", False)) == ("ro", False)
    assert root_flag((".", "/mnt", False), (".", "/mnt/deeper", True)) == ("ro", False)  # in a writable share
    assert root_flag(("ro", "/mnt", True), (".", "/mnt/sub", False)) == ("ro", False)  # the share has it
    assert root_flag((".", "/opt/data", False), image=directory) == ("ro", False)
    assert root_flag((".", "/data", False)) == ("overlay-ro", True)
    assert root_flag(("ro", "/mnt", True), (".", "/mnt/nope", False)) == ("overlay-ro", True)
    assert root_flag((".", "/opt/other", False), image=directory) == ("overlay-ro", True)
    assert root_flag((".", "/new", False), image='[image]\nmode = "overlay"\n') == ("overlay", True)
    assert root_flag(image='[image]\nsource = "directory"\npath = "bare"\n') == ("overlay-ro", True)


def test_a_share_is_mounted_before_the_shares_inside_it(tmp_path: Path) -> None:
    text = ('[image]\nmode = "overlay"\n[process]\nargv = ["true"]\n'
            '[shares.a]\nhost = "."\nguest = "/data/inner/deep"\n[shares.b]\nhost = "."\nguest = "/data/inner"\n'
            '[shares.c]\nhost = "."\nguest = "/data"\n')
    cmdline = compiled(tmp_path, text).plan.cmdline.split()
    assert [p.split(":")[1] for p in cmdline if p.startswith("MVMC_S")] == ["c", "b", "a"]


def test_argv_and_env_within_what_execve_takes(tmp_path: Path) -> None:
    """Beyond these the program would fail to start with E2BIG after the boot; the largest allowed
    entry boots in tests/test_run.py."""
    largest = "x" * (131071 - len("K="))
    compiled(tmp_path, f'[process]\nargv = ["true"]\nenv = {{ K = "{largest}" }}\n')
    with pytest.raises(ManifestError) as err:
        compiled(tmp_path, f'[process]\nargv = ["true", "{"a" * 131072}"]\nenv = {{ K = "{largest}x" }}\n')
    assert err.value.lines() == [
        "m.toml: process.argv[1]: is 131072 bytes long; Linux passes at most 131071 bytes in one argument or "
        "environment entry",
        "m.toml: process.env.K: is 131072 bytes long; Linux passes at most 131071 bytes in one argument or "
        "environment entry",
    ]
    many = "".join(f'V{i} = "{"y" * 100000}"\n' for i in range(21))
    with pytest.raises(ManifestError) as err:
        compiled(tmp_path, f'[process]\nargv = ["true"]\n[process.env]\n{many}')
    [line] = err.value.lines()
    assert line.startswith("m.toml: process: argv and env take 2100") and line.endswith(
        "bytes; Linux gives a program at most 2097152 (a quarter of its 8 MiB stack)")


def test_the_machine_is_described_once_and_lowered_to_the_argv(tmp_path: Path) -> None:
    from microvmc.compiler.machine import Link, Machine, Port
    from microvmc.compiler.qemu import lower

    c = compiled(tmp_path, '[process]\nargv = ["true"]\n[resources]\ncpus = 2\nmemory = 512\n')
    machine = c.plan.machine
    assert (machine.cpus, machine.memory_mib, machine.cmdline) == (2, 512, c.plan.cmdline)
    assert [p.name for p in machine.ports] == ["stdin", "stdout", "stderr", "status", "control", "channel"]
    assert Machine.from_dict(machine.to_dict()) == machine
    assert tuple(a for g in lower(machine, fake_facts()) for a in g.args) == c.plan.qemu_argv
    # A socket port: QEMU listens in the run directory, the host connects when it needs it.
    sock = Port(name="channel", link=Link.SOCKET, socket="channel.sock")
    argv = [a for g in lower(replace(machine, ports=(sock,)), fake_facts()) for a in g.args]
    # max_ports: the one port and port 0, which QEMU keeps for a console
    assert argv[argv.index("virtio-serial-device,max_ports=2") + 1:][:4] == [
        "-chardev", "socket,id=channel,path=channel.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=channel,name=channel"]


@contextmanager
def terminates(seconds: int) -> Iterator[None]:
    """The block must end within `seconds`; a loop that does not is an error, not a hung suite."""
    def hang(*_) -> None:
        raise TimeoutError(f"did not end within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_share_mount_points_are_normalised_and_any_path_terminates(tmp_path: Path) -> None:
    """Issue 6, item 3: `guest = "//x"` looped forever in missing_mount_points (dirname("//x") is "//")."""
    from microvmc.compiler.cmdline import encode

    with terminates(60):
        c = compiled(tmp_path, '[process]\nargv = ["true"]\n[shares.s]\nhost = "."\nguest = "//srv//x/"\n')
    assert c.manifest.shares[0].guest == "/srv/x"
    assert f"MVMC_S0=virtiofs:s:rw:{encode('/srv/x')}" in c.plan.cmdline
    assert c.plan.cmdline.split("MVMC_ROOT=")[1].split()[0] == "virtiofs:root:overlay-ro"  # /srv is not in the image

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.text(st.sampled_from("/.ab"), min_size=1, max_size=12), min_size=1, max_size=3))
    def check(guests: list[str]) -> None:
        text = '[process]\nargv = ["true"]\n' + "".join(
            f'[shares.s{i}]\nhost = "."\nguest = "/{g}"\n' for i, g in enumerate(guests))
        try:
            compiled(tmp_path, text)
        except ManifestError:
            pass

    with terminates(120):
        check()
