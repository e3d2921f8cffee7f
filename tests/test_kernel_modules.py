"""kernel/modules.py against the real Debian module tree and small modules built with gcc."""

from __future__ import annotations

import gzip
import lzma
import os
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import zstandard

from microvmc.errors import KernelError
from microvmc.kernel.modules import (
    ModInfo,
    ResolvedModule,
    decompress_module,
    read_modinfo,
    resolve_modules,
    scan_modules,
)

# CI installs the kernel: its absence is a failure, not a skip.
KERNEL_DIR = Path(os.environ.get("MICROVMC_KERNEL_DIR", Path.home() / ".local/share/microvmc/kernel/default"))
MODULES = KERNEL_DIR / "modules"
WANTED = ["virtiofs", "virtio_mmio", "virtio_console", "9p", "9pnet_virtio", "overlay"]

COMPRESSORS = {
    # kmod's own choices: xz with CRC32, zstd, gzip
    ".ko.xz": lambda data: lzma.compress(data, check=lzma.CHECK_CRC32, preset=0),
    ".ko.zst": lambda data: zstandard.ZstdCompressor(level=1).compress(data),
    ".ko.gz": lambda data: gzip.compress(data, compresslevel=1, mtime=0),
}


def vermagic_of(path: Path) -> str:
    """Read with a regex rather than the code under test."""
    return re.search(rb"vermagic=([^\0]*)", path.read_bytes()).group(1).decode()


@pytest.fixture(scope="module")
def tree():
    return scan_modules(MODULES)


@pytest.fixture(scope="module")
def release() -> str:
    return vermagic_of(MODULES / "kernel/fs/fuse/fuse.ko").split()[0]


# --- the real tree -----------------------------------------------------------------------


def test_scan_indexes_every_module_by_normalized_name(tree):
    files = sorted(MODULES.glob("kernel/**/*.ko*"))
    assert len(tree.modules) == len({path.name.split(".ko")[0].replace("-", "_") for path in files})
    assert tree.root == MODULES
    assert tree.modules["virtiofs"] == PurePosixPath("kernel/fs/fuse/virtiofs.ko")
    assert tree.modules["virtio_rng"] == PurePosixPath("kernel/drivers/char/hw_random/virtio-rng.ko")
    assert all((MODULES / path).is_file() for path in tree.modules.values())


def test_scan_reads_builtin_names(tree):
    lines = (MODULES / "modules.builtin").read_text().split()
    assert len(tree.builtin) == len(set(lines))
    first = PurePosixPath(lines[0]).name.removesuffix(".ko").replace("-", "_")
    assert first in tree.builtin
    assert not tree.builtin & set(tree.modules)


def test_resolve_real_modules_dependencies_first(tree, release):
    resolved = resolve_modules(tree, WANTED, release=release)
    names = [module.name for module in resolved]
    assert len(names) == len(set(names))
    assert set(WANTED) | {"virtio", "virtio_ring", "fuse", "netfs", "9pnet"} <= set(names)
    for index, module in enumerate(resolved):
        assert module.path == tree.modules[module.name]
        assert module.modinfo.vermagic.split()[0] == release
        for dependency in module.modinfo.depends:
            assert dependency in tree.builtin or names.index(dependency) < index, (module.name, dependency)
    # virtiofs.ko says so itself; read it without the code under test
    depends = re.search(rb"depends=([^\0]*)", (MODULES / "kernel/fs/fuse/virtiofs.ko").read_bytes()).group(1)
    assert resolved[names.index("virtiofs")].modinfo.depends == tuple(depends.decode().split(","))
    assert resolve_modules(tree, list(reversed(WANTED)), release=release) == resolved
    assert resolve_modules(tree, ["virtio-mmio"], release=release)[-1].name == "virtio_mmio"


def test_real_builtin_module_needs_nothing(tree, release):
    builtin = sorted(tree.builtin)[0]
    assert resolve_modules(tree, [builtin], release=release) == ()


def test_real_module_of_another_release(tree):
    path = MODULES / "kernel/fs/fuse/virtiofs.ko"
    with pytest.raises(KernelError) as err:
        resolve_modules(tree, ["virtiofs"], release="6.1.0-50-amd64")
    assert str(err.value) == (
        f"{path}: vermagic {vermagic_of(path).strip()!r} does not match kernel release 6.1.0-50-amd64"
    )
    assert err.value.hint == "the modules directory belongs to another kernel build"


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_compressed_real_module_reads_the_same(suffix):
    raw = (MODULES / "kernel/fs/fuse/virtiofs.ko").read_bytes()
    compressed = COMPRESSORS[suffix](raw)
    assert decompress_module(compressed, path="virtiofs" + suffix) == raw
    # told by magic, not by the name
    assert read_modinfo(compressed, path="virtiofs.ko") == read_modinfo(raw, path="virtiofs.ko")


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_compressed_real_tree_resolves_the_same(tmp_path, tree, release, suffix):
    plain = resolve_modules(tree, WANTED, release=release)
    (tmp_path / "kernel").mkdir()
    for module in plain:
        target = tmp_path / f"{module.path}"[: -len(".ko")]
        target.parent.mkdir(parents=True, exist_ok=True)
        data = COMPRESSORS[suffix]((MODULES / module.path).read_bytes())
        target.with_name(target.name + suffix).write_bytes(data)
    compressed = resolve_modules(scan_modules(tmp_path), WANTED, release=release)
    assert [(m.name, str(m.path), m.modinfo) for m in compressed] == [
        (m.name, f"{m.path}{suffix.removeprefix('.ko')}", m.modinfo) for m in plain
    ]


def test_read_modinfo_of_virtiofs():
    info = read_modinfo((MODULES / "kernel/fs/fuse/virtiofs.ko").read_bytes(), path="virtiofs.ko")
    assert info.name == "virtiofs"
    assert set(info.depends) == {"fuse", "virtio", "virtio_ring"}


# --- modules built with gcc: a .o with a .modinfo section is all read_modinfo needs --------

RELEASE = "9.9.9-test"
VERMAGIC = f"{RELEASE} SMP preempt mod_unload modversions "


def build_module(directory: Path, modinfo: list[str]) -> bytes:
    literal = "".join(entry + "\\0" for entry in modinfo)
    source = directory / "module.c"
    source.write_text(
        f'__attribute__((section(".modinfo"), used, aligned(1))) static const char modinfo[] = "{literal}";\n'
    )
    output = directory / "module.o"
    subprocess.run(["gcc", "-c", "-o", str(output), str(source)], check=True)
    return output.read_bytes()


# path -> .modinfo fields ("name=" is added from the path's file name unless given)
FAKE_TREE = {
    "kernel/fs/a.ko": ["depends=b,c-dash", "softdep=pre: crc32c post: zz"],
    "kernel/lib/b.ko": ["depends=d"],
    "kernel/lib/c-dash.ko": ["name=c_dash", "depends="],
    "kernel/lib/d.ko.xz": ["depends="],
    "kernel/lib/f.ko": ["depends=e"],  # e is built in
    "kernel/net/x.ko": ["depends=y"],
    "kernel/net/y.ko": ["depends=x"],
    "kernel/net/needs_ghost.ko": ["depends=ghost"],
    "kernel/net/old.ko": ["vermagic=5.10.0-1-amd64 SMP mod_unload "],
}


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("modules")
    work = tmp_path_factory.mktemp("build")
    for relative, fields in FAKE_TREE.items():
        name = PurePosixPath(relative).name.split(".ko")[0]
        if not any(field.startswith("name=") for field in fields):
            fields = [f"name={name}", *fields]
        if not any(field.startswith("vermagic=") for field in fields):
            fields = [*fields, f"vermagic={VERMAGIC}"]
        data = build_module(work, ["license=GPL", *fields])
        if relative.endswith(".xz"):
            data = lzma.compress(data)
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    (root / "modules.builtin").write_text("kernel/fs/e.ko\nkernel/drivers/builtin-dash.ko\n")
    return scan_modules(root)


def test_fake_tree_resolves_dependencies_first(fake):
    def expected(name, path, depends, **extra):
        info = ModInfo(name=name, depends=depends, vermagic=VERMAGIC, **extra)
        return ResolvedModule(name=name, path=PurePosixPath(path), modinfo=info)

    # sources c_dash and d sort first; d before b before a
    assert resolve_modules(fake, ["a"], release=RELEASE) == (
        expected("c_dash", "kernel/lib/c-dash.ko", ()),
        expected("d", "kernel/lib/d.ko.xz", ()),
        expected("b", "kernel/lib/b.ko", ("d",)),
        expected("a", "kernel/fs/a.ko", ("b", "c_dash"), softdep_pre=("crc32c",), softdep_post=("zz",)),
    )


def test_fake_builtin_needs_nothing(fake):
    assert fake.builtin == frozenset({"e", "builtin_dash"})
    assert resolve_modules(fake, ["e", "builtin-dash"], release=RELEASE) == ()
    assert [m.name for m in resolve_modules(fake, ["f", "e"], release=RELEASE)] == ["f"]


def test_fake_missing_module(fake):
    with pytest.raises(KernelError) as err:
        resolve_modules(fake, ["b", "nosuch"], release=RELEASE)
    assert str(err.value) == f"{fake.root}: no module 'nosuch' (neither built in nor under kernel/)"


def test_fake_missing_dependency(fake):
    with pytest.raises(KernelError) as err:
        resolve_modules(fake, ["needs-ghost"], release=RELEASE)
    assert str(err.value) == (
        f"{fake.root}: no module 'ghost', which 'needs_ghost' depends on (neither built in nor under kernel/)"
    )


def test_fake_cycle(fake):
    with pytest.raises(KernelError) as err:
        resolve_modules(fake, ["x"], release=RELEASE)
    assert str(err.value) == f"{fake.root}: modules depend on each other in a cycle: x -> y -> x"


def test_fake_vermagic_mismatch(fake):
    with pytest.raises(KernelError) as err:
        resolve_modules(fake, ["old"], release=RELEASE)
    assert str(err.value) == (
        f"{fake.root}/kernel/net/old.ko: vermagic '5.10.0-1-amd64 SMP mod_unload' "
        "does not match kernel release 9.9.9-test"
    )


def test_injected_read_sees_the_full_path(fake, tmp_path):
    other = build_module(tmp_path, ["name=b", "depends=", "vermagic=6.1.0-50-amd64 SMP"])
    seen = []

    def read(path: Path) -> bytes:
        seen.append(path)
        return other

    with pytest.raises(KernelError) as err:
        resolve_modules(fake, ["b"], release=RELEASE, read=read)
    assert seen == [fake.root / "kernel/lib/b.ko"]
    assert str(err.value) == (
        f"{fake.root}/kernel/lib/b.ko: vermagic '6.1.0-50-amd64 SMP' does not match kernel release 9.9.9-test"
    )


def test_name_falls_back_to_the_file_name(tmp_path):
    data = build_module(tmp_path, ["depends=", f"vermagic={VERMAGIC}"])
    assert read_modinfo(data, path="/m/kernel/virtio-foo.ko.zst") == ModInfo(
        name="virtio_foo", depends=(), vermagic=VERMAGIC
    )


def test_not_a_module():
    with pytest.raises(KernelError) as err:
        read_modinfo(b"hello world", path="/m/x.ko")
    assert str(err.value) == "/m/x.ko: not a kernel module (starts with b'hell', not ELF, xz, zstd or gzip)"


def test_elf_without_modinfo(tmp_path):
    source = tmp_path / "plain.c"
    source.write_text("int x = 1;\n")
    subprocess.run(["gcc", "-c", "-o", str(tmp_path / "plain.o"), str(source)], check=True)
    with pytest.raises(KernelError) as err:
        read_modinfo((tmp_path / "plain.o").read_bytes(), path="/m/plain.ko")
    assert str(err.value) == "/m/plain.ko: not a kernel module (no .modinfo section)"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xfd7zXZ\x00" + b"garbage" * 3, "/m/x.ko.xz: cannot decompress the module (Corrupt input data)"),
        (
            zstandard.ZstdCompressor().compress(bytes(range(256)) * 100)[:-20],
            "/m/x.ko.xz: cannot decompress the module (the zstd frame is truncated)",
        ),
    ],
)
def test_corrupt_compressed_module(data, message):
    with pytest.raises(KernelError) as err:
        decompress_module(data, path="/m/x.ko.xz")
    assert str(err.value) == message


def test_scan_of_a_directory_without_kernel(tmp_path):
    with pytest.raises(KernelError) as err:
        scan_modules(tmp_path)
    assert str(err.value) == f"{tmp_path}: not a kernel modules directory (no kernel/ subdirectory)"


def test_scan_prefers_uncompressed_duplicates(tmp_path):
    for relative in ("kernel/b/m.ko.xz", "kernel/a/m.ko.zst", "kernel/c/m.ko", "kernel/a/m.ko"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    (tmp_path / "kernel/a/notes.txt").write_bytes(b"")
    tree = scan_modules(tmp_path)
    assert dict(tree.modules) == {"m": PurePosixPath("kernel/a/m.ko")}
    assert tree.builtin == frozenset()


def test_strip_signature_of_a_real_module() -> None:
    from microvmc.kernel.modules import SIGNATURE_MAGIC, read_modinfo, strip_signature

    path = MODULES / "kernel" / "fs" / "fuse" / "fuse.ko"
    signed = path.read_bytes()
    assert signed.endswith(SIGNATURE_MAGIC)
    stripped = strip_signature(signed, path=str(path))
    assert signed.startswith(stripped) and len(signed) - len(stripped) > len(SIGNATURE_MAGIC) + 12
    assert read_modinfo(stripped, path=str(path)).name == "fuse"
    assert strip_signature(stripped, path=str(path)) == stripped  # unsigned: unchanged


def test_signatures_are_kept_unless_the_kernel_surely_does_not_need_them() -> None:
    from microvmc.kernel.modules import signatures_optional

    assert signatures_optional("CONFIG_MODULE_SIG=y\n# CONFIG_MODULE_SIG_FORCE is not set\n")
    assert not signatures_optional("CONFIG_MODULE_SIG=y\nCONFIG_MODULE_SIG_FORCE=y\n")
    assert not signatures_optional(None)  # unknown kernel: keep them
    assert not signatures_optional("# CONFIG_MODULE_SIG_FORCE is not set\n", ["module.sig_enforce=1"])
