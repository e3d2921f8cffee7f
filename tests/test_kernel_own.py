"""microvmc's own kernel: the requirement table, the choice of kernel, pre-flight, and a real boot."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import fake_facts, real_kernel_dir
from microvmc.compiler.kernels import check_features, choose_kernel, required_features
from microvmc.compiler.manifest import Kernel, KernelSource
from microvmc.errors import KernelError, ManifestError
from microvmc.kernel.image import embedded_config
from microvmc.kernel.patches import EDITS, Edit, apply_edit, edits_digest
from microvmc.kernel.requirements import FEATURES, OPTIONS, fragment, fragment_digest, missing_options, parse_config

MICROVMC = [sys.executable, "-m", "microvmc"]


def test_fragment_lists_every_option_with_its_reason():
    text = fragment()
    for option in OPTIONS:
        line = f"# CONFIG_{option.name} is not set" if option.value == "n" else f"CONFIG_{option.name}={option.value}"
        assert f"# {option.reason}\n{line}\n" in text
    # Every option a feature needs is built in by the fragment.
    wanted = {o.name: o.value for o in OPTIONS}
    assert all(wanted.get(name) == "y" for f in FEATURES.values() for name in f.options)


def test_missing_options_names_what_did_not_survive():
    config = parse_config("CONFIG_64BIT=y\n# CONFIG_VIRTIO_FS is not set\nCONFIG_FUSE_FS=m\n")
    missing = missing_options(config)
    assert "CONFIG_VIRTIO_FS=y (got n)" in missing and "CONFIG_FUSE_FS=y (got m)" in missing
    assert not any(m.startswith("CONFIG_64BIT=") for m in missing)


def test_embedded_config_is_read_from_the_image():
    config = b"CONFIG_VIRTIO_FS=y\n"
    blob = b"\x7fELF" + bytes(100) + b"IKCFG_ST" + gzip.compress(config) + b"IKCFG_ED" + bytes(10)
    assert embedded_config(blob) == config.decode()
    assert embedded_config(b"\x7fELF" + bytes(100)) is None


def test_preflight_names_the_missing_feature_and_what_to_do():
    config = parse_config("CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_CONSOLE=y\nCONFIG_TMPFS=y\nCONFIG_DEVTMPFS=y\n"
                          "CONFIG_BLK_DEV_INITRD=y\nCONFIG_RD_GZIP=y\n")
    with pytest.raises(KernelError) as err:
        check_features(("ports", "virtiofs"), image="/k/vmlinux", release="6.1.0-x", config=config)
    assert str(err.value) == ('kernel /k/vmlinux (6.1.0-x) has no virtio-fs support, neither built in nor as a '
                              'module; use transport = "9p" or another kernel')


def test_preflight_loads_modules_only_for_what_is_not_built_in():
    config = parse_config("CONFIG_VIRTIO_MMIO=m\nCONFIG_VIRTIO_CONSOLE=m\nCONFIG_FUSE_FS=m\nCONFIG_VIRTIO_FS=m\n")
    modules = frozenset({"virtio_mmio", "virtio_console", "virtiofs", "fuse"})
    assert check_features(("ports", "virtiofs"), image="k", release="r", config=config, modules=modules) == \
        ("virtio_mmio", "virtio_console", "virtiofs")
    # A module the config promises but the tree lacks is missing, not loaded.
    with pytest.raises(KernelError, match="no virtio-fs support"):
        check_features(("virtiofs",), image="k", release="r", config=config, modules=frozenset({"fuse"}))
    # No config: modules.builtin and the tree decide.
    assert check_features(("virtiofs",), image="k", release="r", config=None,
                          builtin=frozenset({"virtiofs"}), modules=frozenset()) == ()


def _manifest(source: KernelSource):
    from microvmc.compiler.manifest import validate
    from microvmc.compiler.load import Loaded

    m = validate(Loaded(data={"version": 1, "process": {"argv": ["true"]}}, files=("m.toml",), origins={}, root="m.toml"))
    return replace(m, kernel=Kernel(source=source, image=None, modules=None, cmdline=()))


@pytest.fixture
def kernels(tmp_path: Path) -> Path:
    debian = tmp_path / "debian-6.1.0-x"
    (debian / "modules" / "kernel").mkdir(parents=True)
    (debian / "vmlinuz").write_bytes(b"")
    (tmp_path / "default").symlink_to(debian.name)
    return tmp_path


@pytest.mark.parametrize("own_default", [False, True])  # True: as shipped
def test_default_is_the_own_kernel_when_built_else_debian(kernels: Path, own_default: bool, monkeypatch):
    """The own kernel is chosen by the key of its inputs, built or not; "default" takes it only
    when its entry is complete, and the fallback says why."""
    import microvmc.compiler.kernels as k
    from microvmc.compiler.hostfiles import HostFiles

    monkeypatch.setattr(k, "DEFAULT_IS_OWN", own_default)
    source = kernels / "linux.tar.xz"
    source.write_bytes(b"not really a kernel source")
    facts = fake_facts(default_kernel_dir=str(kernels / "default"), cc_version="gcc (fixture) 12")
    choose = lambda s: choose_kernel(_manifest(s), facts, HostFiles(), own_source=str(source))
    chosen = choose(KernelSource.DEFAULT)
    assert (chosen.image, chosen.modules, chosen.own) == (str(kernels / "default/vmlinuz"), str(kernels / "default/modules"), None)
    key = k.build_key("sha256:" + hashlib.sha256(source.read_bytes()).hexdigest(), fragment_digest(), edits_digest(),
                      "gcc (fixture) 12")
    entry = kernels / f"microvmc-{key}"
    if own_default:  # the fallback says why it is not the own kernel
        assert chosen.what == f"the default kernel (the Debian kernel: microvmc's own kernel is not built ({entry}); " \
                              "`microvmc kernel build`)"
    own = choose(KernelSource.MICROVMC)  # asked for by name: a node the build makes
    assert (own.image, own.modules, own.own.entry, own.own.realised) == (str(entry / "vmlinux"), None, str(entry), False)
    entry.mkdir()
    (entry / "vmlinux").write_bytes(b"")
    assert not choose(KernelSource.MICROVMC).own.realised  # complete only once build.json is there
    (entry / "build.json").write_text("{}")
    for s in (KernelSource.DEFAULT, KernelSource.MICROVMC) if own_default else (KernelSource.MICROVMC,):
        assert (choose(s).own.entry, choose(s).own.realised) == (str(entry), True)
    assert choose(KernelSource.DEBIAN).modules == str(kernels / "default/modules")
    if not own_default:
        assert choose(KernelSource.DEFAULT).modules == str(kernels / "default/modules")
    source.write_bytes(b"another source")  # other inputs, another key: not built
    assert choose(KernelSource.MICROVMC).own.entry != str(entry)
    assert choose(KernelSource.DEFAULT).own is None
    source.unlink()
    missing = [f"m.toml: kernel.source: microvmc's own kernel cannot be built here: its source {source} "
               "is missing (Debian: apt-get install linux-source-6.1 gcc; or set kernel.source = \"debian\")"]
    with pytest.raises(ManifestError) as err:
        choose(KernelSource.MICROVMC)
    assert err.value.lines() == missing
    # A source removed after the build: the digest `microvmc kernel build` remembered still names the
    # kernel built from it, which is used; it cannot be built again.
    digest = "sha256:" + hashlib.sha256(b"not really a kernel source").hexdigest()
    (kernels / "sources.json").write_text(json.dumps({"digests": {str(source): [[0], digest]}}))
    for s in (KernelSource.DEFAULT, KernelSource.MICROVMC) if own_default else (KernelSource.MICROVMC,):
        assert (choose(s).own.entry, choose(s).own.realised, choose(s).own.buildable) == (str(entry), True, False)
    (entry / "build.json").unlink()
    with pytest.raises(ManifestError) as err:
        choose(KernelSource.MICROVMC)
    assert err.value.lines() == missing
    if own_default:
        assert choose(KernelSource.DEFAULT).what.endswith(f"microvmc's own kernel cannot be built: its source {source} "
                                                          "is missing)")


def test_required_features_follow_the_plan():
    m = _manifest(KernelSource.DEFAULT)
    from microvmc.compiler.manifest import Transport

    m = replace(m, image=replace(m.image, transport=Transport.NINEP))
    assert required_features(m, "overlay") == ("initramfs", "devtmpfs", "tmpfs", "ports", "9p", "overlay")
    assert "overlay" not in required_features(m, "ro")


OWN = real_kernel_dir().parent / "microvmc"


@pytest.mark.boot
def test_busybox_boots_on_the_own_kernel_with_everything_built_in(boot_env, tmp_path: Path):
    assert (OWN / "vmlinux").is_file(), f"no own kernel at {OWN}: run scripts/setup (or microvmc kernel build)"
    manifest = tmp_path / "own.toml"
    manifest.write_text('version = 1\n[kernel]\nsource = "microvmc"\n[image]\ntransport = "virtiofs"\n'
                        '[process]\nargv = ["/bin/sh", "-c", "uname -r; grep -w virtiofs /proc/filesystems; '
                        'zcat /proc/config.gz | grep -E \'^CONFIG_(VIRTIO_FS|MODULES)[=]\' ; ls /lib/modules 2>&1; exit 3"]\n')
    env = {**boot_env, "XDG_RUNTIME_DIR": str(tmp_path), "TMPDIR": str(tmp_path)}
    r = subprocess.run([*MICROVMC, "run", str(manifest)], env=env, capture_output=True, timeout=240, stdin=subprocess.DEVNULL)
    assert r.returncode == 3, r.stderr.decode()
    release = (OWN / "release").read_text().strip()
    lines = r.stdout.decode().splitlines()
    assert lines[0] == release and release.endswith("-microvmc")
    assert lines[1].split() == ["nodev", "virtiofs"]  # built in, not a module
    assert lines[2] == "CONFIG_VIRTIO_FS=y" and len(lines) == 4  # no CONFIG_MODULES line: modules are off
    assert "No such file" in lines[3]  # and the initramfs brought none


@pytest.mark.boot
def test_preflight_refuses_a_kernel_without_virtiofs_before_booting(boot_env, tmp_path: Path):
    assert (OWN / "vmlinux").is_file(), f"no own kernel at {OWN}: run scripts/setup (or microvmc kernel build)"
    kernel = tmp_path / "k"
    kernel.mkdir()
    (kernel / "vmlinux").symlink_to(OWN / "vmlinux")
    (kernel / "config").write_text((OWN / "config").read_text().replace("CONFIG_VIRTIO_FS=y",
                                                                        "# CONFIG_VIRTIO_FS is not set"))
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'version = 1\n[kernel]\nsource = "path"\nimage = "{kernel}/vmlinux"\n'
                        '[image]\ntransport = "virtiofs"\n[process]\nargv = ["true"]\n')
    env = {**boot_env, "XDG_RUNTIME_DIR": str(tmp_path), "TMPDIR": str(tmp_path)}
    r = subprocess.run([*MICROVMC, "run", str(manifest)], env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 125
    assert r.stderr.decode() == (f"microvmc: kernel {kernel}/vmlinux ({(OWN / 'release').read_text().strip()}) has no "
                                 'virtio-fs support, neither built in nor as a module; use transport = "9p" or another '
                                 "kernel\n")


def test_kernel_build_of_a_missing_source_is_one_line_and_leaves_nothing(tmp_path: Path):
    r = subprocess.run([*MICROVMC, "kernel", "build", "--source", str(tmp_path / "nope.tar.xz")],
                       env={"PATH": "/usr/bin:/bin", "XDG_DATA_HOME": str(tmp_path / "data"), "HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 125
    assert r.stderr == (f"microvmc: {tmp_path}/nope.tar.xz: no Linux source tarball or tree there "
                        "(Debian: apt-get install linux-source-6.1, or pass --source)\n")
    assert not (tmp_path / "data").exists()


def test_build_key_names_sources_fragment_edits_and_compiler():
    from microvmc.backends.kernelbuild import build_key

    key = build_key("sha256:a", "f", "e", "gcc 12")
    assert key == build_key("sha256:a", "f", "e", "gcc 12") and len(key) == 20
    assert len({key, build_key("sha256:b", "f", "e", "gcc 12"), build_key("sha256:a", "g", "e", "gcc 12"),
                build_key("sha256:a", "f", "d", "gcc 12"), build_key("sha256:a", "f", "e", "gcc 13")}) == 5


def test_an_edit_applies_only_where_its_text_is_exactly_once():
    edit = Edit(name="e", path="f.c", old="poison(x);\n", new="skip(x);\n", reason="r")
    assert apply_edit(edit, "a();\npoison(x);\nb();\n") == "a();\nskip(x);\nb();\n"
    assert apply_edit(edit, "a();\npoison(y);\n") is None
    assert apply_edit(edit, "poison(x);\npoison(x);\n") is None
    assert edits_digest() == edits_digest(EDITS) != edits_digest(EDITS[:-1])
    assert len({e.name for e in EDITS}) == len(EDITS) and all(e.reason and e.old != e.new for e in EDITS)


@pytest.mark.skipif(not Path("/usr/src/linux-source-6.1.tar.xz").is_file(), reason="needs linux-source-6.1")
def test_every_edit_applies_to_debians_linux_source_once():
    """Against the source the setup builds from: each edit finds its text once, in order, and the file
    differs only by the edits (the lines they name)."""
    import tarfile

    paths = sorted({e.path for e in EDITS})
    with tarfile.open("/usr/src/linux-source-6.1.tar.xz") as tar:
        texts = {p: tar.extractfile(f"linux-source-6.1/{p}").read().decode() for p in paths}
    edited = dict(texts)
    for e in EDITS:
        result = apply_edit(e, edited[e.path])
        assert result is not None, e.name
        edited[e.path] = result
    assert all(edited[p] != texts[p] for p in paths)
    assert "fill_queue_max(port->in_vq, &port->inbuf_lock, PORT_BUFS)" in edited["drivers/char/virtio_console.c"]
    assert edited["drivers/char/virtio_console.c"].count("fill_queue(portdev->c_ivq") == 2  # the control queue: full


def test_kernel_build_stops_naming_the_edit_that_does_not_apply_and_leaves_nothing(tmp_path: Path):
    """A tree of another version (here: one whose init.c lacks the edit's text) stops before make,
    with one line; no entry, no link, no half-made build is left in the store."""
    tree = tmp_path / "linux"
    (tree / "arch/x86/mm").mkdir(parents=True)
    (tree / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 99\n")
    (tree / "arch/x86/mm/init.c").write_text("/* another version */\n")
    data = tmp_path / "data"
    r = subprocess.run([*MICROVMC, "kernel", "build", "--source", str(tree)],
                       env={"PATH": "/usr/bin:/bin", "XDG_DATA_HOME": str(data), "HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 125, r.stderr
    assert r.stderr.splitlines()[-1] == (f"microvmc: {tree}: kernel/patches.py's edit 'x86-initmem-unpoisoned' does "
                                         "not apply: arch/x86/mm/init.c has not its text exactly once (is it a Linux "
                                         "source of another version?)")
    kernels = data / "microvmc/kernel"
    left = sorted(p.name for p in kernels.iterdir()) if kernels.is_dir() else []
    assert not [n for n in left if n.startswith(("microvmc-", ".build-")) or n == "microvmc"], left
    assert (tree / "arch/x86/mm/init.c").read_text() == "/* another version */\n"  # the user's tree untouched


def test_ipv6_is_required_where_init_sets_ipv6_addresses():
    """User mode always has QEMU's fec0::15; a namespace's interface only when it has an IPv6 address."""
    from microvmc.compiler.manifest import Network, NetworkMode

    m = _manifest(KernelSource.DEFAULT)
    assert "network" not in required_features(m, "ro")
    for mode in (NetworkMode.USER, NetworkMode.ISOLATED):
        assert required_features(replace(m, network=Network(mode=mode)), "ro")[-2:] == ("network", "ipv6")
    v4 = Network(mode=NetworkMode.NETNS, namespace="/run/netns/x", address="10.88.0.5/16", gateway="10.88.0.1")
    assert required_features(replace(m, network=v4), "ro")[-1] == "network"
    v6 = replace(v4, addresses=("fd00:88::5/64",))
    assert required_features(replace(m, network=v6), "ro")[-1] == "ipv6"
    with pytest.raises(KernelError) as err:
        check_features(("network", "ipv6"), image="k", release="r", config=parse_config("CONFIG_VIRTIO_NET=y\n"))
    assert str(err.value) == ('kernel k (r) has no IPv6 support, neither built in nor as a module; '
                              'use network.mode = "none" or another kernel')
    assert check_features(("network", "ipv6"), image="k", release="r",
                          config=parse_config("CONFIG_VIRTIO_NET=m\nCONFIG_IPV6=m\n"),
                          modules=frozenset({"virtio_net", "ipv6"})) == ("virtio_net", "ipv6")
