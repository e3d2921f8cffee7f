"""kernel/image.py against the real Debian kernel and hand-made bzImages and ELFs."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest
import zstandard

from microvmc.errors import KernelError
from microvmc.kernel.image import (
    Compression,
    KernelFormat,
    KernelInfo,
    extract_vmlinux,
    inspect_kernel,
    pvh_entry,
)

# CI installs the kernel: its absence is a failure, not a skip.
KERNEL_DIR = Path(os.environ.get("MICROVMC_KERNEL_DIR", Path.home() / ".local/share/microvmc/kernel/default"))

_MODULE_DECOMPRESS = {
    ".ko": lambda data: data,
    ".xz": lzma.decompress,
    ".gz": gzip.decompress,
    ".zst": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data),
}


def release_of_modules(modules: Path) -> str:
    """The release from a module's vermagic, read with a regex rather than the code under test."""
    module = next(path for path in sorted(modules.glob("kernel/fs/*/*.ko*")))
    data = _MODULE_DECOMPRESS[module.suffix](module.read_bytes())
    return re.search(rb"vermagic=(\S+)", data).group(1).decode()


@pytest.fixture(scope="module")
def vmlinuz() -> bytes:
    return (KERNEL_DIR / "vmlinuz").read_bytes()


@pytest.fixture(scope="module")
def release() -> str:
    return release_of_modules(KERNEL_DIR / "modules")


@pytest.fixture(scope="module")
def vmlinux(vmlinuz) -> bytes:
    return extract_vmlinux(vmlinuz, path="vmlinuz")


def test_real_bzimage_is_inspected(vmlinuz, release):
    assert release.startswith("6.")
    assert inspect_kernel(vmlinuz, path="vmlinuz") == KernelInfo(
        format=KernelFormat.BZIMAGE, release=release, compression=Compression.XZ
    )


def test_real_vmlinux_is_an_x86_64_elf_with_a_pvh_entry(vmlinux, release):
    ident, e_type, e_machine = vmlinux[:16], *struct.unpack_from("<HH", vmlinux, 16)
    assert ident[:7] == b"\x7fELF\x02\x01\x01"
    assert (e_type, e_machine) == (2, 62)  # ET_EXEC, EM_X86_64
    assert inspect_kernel(vmlinux, path="vmlinux") == KernelInfo(
        format=KernelFormat.ELF, release=release, compression=None
    )
    entry = pvh_entry(vmlinux, path="vmlinux")
    # The entry is a physical address inside one of the loaded segments.
    (phoff,) = struct.unpack_from("<Q", vmlinux, 32)
    phentsize, phnum = struct.unpack_from("<HH", vmlinux, 54)
    loads = []
    for index in range(phnum):
        header = struct.unpack_from("<IIQQQQQ", vmlinux, phoff + index * phentsize)
        p_type, p_paddr, p_memsz = header[0], header[4], header[6]
        if p_type == 1:
            loads.append((p_paddr, p_paddr + p_memsz))
    assert any(start <= entry < end for start, end in loads), (hex(entry), loads)


def test_elf_input_is_returned_as_is(vmlinux):
    assert extract_vmlinux(vmlinux, path="vmlinux") is vmlinux


def test_truncated_real_bzimage(vmlinuz, release):
    truncated = vmlinuz[: len(vmlinuz) // 2]
    assert inspect_kernel(truncated, path="/k/vmlinuz").release == release
    setup_sects = vmlinuz[0x1F1]
    (payload_offset,) = struct.unpack_from("<I", vmlinuz, 0x248)
    offset = (setup_sects + 1) * 512 + payload_offset
    with pytest.raises(KernelError) as err:
        extract_vmlinux(truncated, path="/k/vmlinuz")
    assert str(err.value) == (
        f"/k/vmlinuz: the xz kernel payload at offset {offset:#x} is truncated or corrupt"
    )
    assert err.value.hint == "the file is incomplete; copy or download it again"


@pytest.mark.parametrize("data", [b"", b"garbage" * 100, b"MZ" + bytes(4096)])
@pytest.mark.parametrize("function", [inspect_kernel, extract_vmlinux])
def test_not_a_kernel(function, data):
    with pytest.raises(KernelError) as err:
        function(data, path="/k/junk")
    assert str(err.value) == (
        "/k/junk: not a Linux kernel image (no bzImage 'HdrS' header at 0x202 and no ELF magic)"
    )


# A hand-made bzImage: the real-mode setup (one sector plus the boot sector) with the
# header fields image.py reads, then the "protected-mode kernel": decompressor code,
# the compressed ELF, the 4-byte size the kernel appends, and more code.
FAKE_ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64
DECOY = b"\x1f\x8b\x08\x00junk\xfd7zXZ\x00junk(\xb5/\xfdjunkBZh91AY&SYjunk]\x00\x00junk\x7fELF\x09\x09"

COMPRESS = {
    Compression.GZIP: lambda data: gzip.compress(data, mtime=0),
    # as the kernel's Makefile does it: CRC32, x86 BCJ filter
    Compression.XZ: lambda data: lzma.compress(
        data, check=lzma.CHECK_CRC32, filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}]
    ),
    # the kernel pipes into zstd, so the frame has no content size
    Compression.ZSTD: lambda data: zstandard.ZstdCompressor(write_content_size=False).compress(data),
    Compression.LZMA: lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
    Compression.BZIP2: bz2.compress,
    Compression.LZ4: lambda data: lz4_legacy(data),
    Compression.NONE: lambda data: data,
}


def lz4_legacy(data: bytes) -> bytes:
    """`lz4 -l`, as the kernel's Makefile compresses: the legacy magic, then 8 MiB blocks, each
    after its size."""
    import lz4.block  # (here: a venv made before lz4 became a dependency fails only these tests)

    out = bytearray(struct.pack("<I", 0x184C2102))
    for at in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[at : at + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return bytes(out)


def fake_bzimage(payload: bytes, *, with_payload_offset: bool, release: str = "9.9.9-fake") -> bytes:
    setup = bytearray(1024)
    setup[0x1F1] = 1  # setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F if with_payload_offset else 0x0207)
    struct.pack_into("<H", setup, 0x20E, 0x100)  # kernel_version at 0x100 + 0x200
    version = f"{release} (builder@host) #1 SMP\0".encode()
    setup[0x300 : 0x300 + len(version)] = version
    code = b"\x90" * 100 + DECOY
    if with_payload_offset:
        struct.pack_into("<II", setup, 0x248, len(code), len(payload))
    return bytes(setup) + code + payload + struct.pack("<I", len(FAKE_ELF)) + b"\xcc" * 300


@pytest.mark.parametrize(
    ("compression", "with_payload_offset"),
    [(compression, True) for compression in COMPRESS]
    # Uncompressed kernels (5.x+) always have payload_offset and _length, and without
    # them nothing tells where an uncompressed ELF ends.
    + [(compression, False) for compression in COMPRESS if compression is not Compression.NONE],
)
def test_fake_bzimage_extracts(compression, with_payload_offset):
    image = fake_bzimage(COMPRESS[compression](FAKE_ELF), with_payload_offset=with_payload_offset)
    assert inspect_kernel(image, path="fake") == KernelInfo(
        format=KernelFormat.BZIMAGE, release="9.9.9-fake", compression=compression
    )
    assert extract_vmlinux(image, path="fake") == FAKE_ELF


def test_setup_header_without_version_string():
    image = bytearray(fake_bzimage(COMPRESS[Compression.GZIP](FAKE_ELF), with_payload_offset=True))
    struct.pack_into("<H", image, 0x20E, 0)
    assert inspect_kernel(bytes(image), path="fake").release is None


OWN_BZIMAGE = KERNEL_DIR.parent / "microvmc" / "bzImage"


@pytest.mark.skipif(not OWN_BZIMAGE.is_file(), reason="microvmc's own kernel is not built (scripts/setup)")
def test_real_lz4_bzimage_is_unpacked():
    """microvmc's own kernel is built with CONFIG_KERNEL_LZ4 (as Debian's cloud-amd64 kernel is): its
    bzImage unpacks to an ELF with a PVH entry, and a cut one is named truncated."""
    data = OWN_BZIMAGE.read_bytes()
    release = (OWN_BZIMAGE.parent / "release").read_text().strip()
    assert inspect_kernel(data, path="own") == KernelInfo(format=KernelFormat.BZIMAGE, release=release,
                                                          compression=Compression.LZ4)
    elf = extract_vmlinux(data, path="own")
    assert pvh_entry(elf, path="own") is not None
    setup_sects = data[0x1F1]
    (payload_offset,) = struct.unpack_from("<I", data, 0x248)
    with pytest.raises(KernelError) as err:
        extract_vmlinux(data[: len(data) // 2], path="/k/own")
    assert str(err.value) == (f"/k/own: the lz4 kernel payload at offset {(setup_sects + 1) * 512 + payload_offset:#x} "
                              "is truncated or corrupt")


def test_bzimage_without_a_payload():
    image = fake_bzimage(b"\0" * 4096, with_payload_offset=False)
    assert inspect_kernel(image, path="/k/empty").compression is None
    with pytest.raises(KernelError) as err:
        extract_vmlinux(image, path="/k/empty")
    assert str(err.value) == (
        "/k/empty: found no gzip, xz, zstd, lzma, bzip2 or lz4 compressed kernel in the bzImage"
    )


def test_corrupt_payload():
    payload = bytearray(COMPRESS[Compression.GZIP](FAKE_ELF))
    payload[len(payload) // 2] ^= 0xFF
    image = fake_bzimage(bytes(payload), with_payload_offset=True)
    with pytest.raises(KernelError) as err:
        extract_vmlinux(image, path="/k/bad")
    offset = 1024 + 100 + len(DECOY)
    assert str(err.value) == f"/k/bad: the gzip kernel payload at offset {offset:#x} is truncated or corrupt"


def test_elf_release_from_banner():
    elf = FAKE_ELF + b"Linux version %s\0Linux version 5.10.0-9-arm64 (debian@x) #1 SMP\0"
    assert inspect_kernel(elf, path="vmlinux").release == "5.10.0-9-arm64"
    assert inspect_kernel(FAKE_ELF, path="vmlinux").release is None


# ELF notes built by gcc and ld, so the parser is checked against a real toolchain.
NOTE_SOURCE = r"""
struct note8 { unsigned namesz, descsz, type; char name[4]; unsigned long long desc; };
struct note4 { unsigned namesz, descsz, type; char name[4]; unsigned desc; };
#define NOTE(var, type, ...) \
    __attribute__((section(".note.Xen"), used, aligned(4))) static const type var = {__VA_ARGS__};
%s
void _start(void) {}
"""


def build_elf(tmp_path: Path, notes: str, *, link: bool) -> bytes:
    source = tmp_path / "notes.c"
    source.write_text(NOTE_SOURCE % notes)
    output = tmp_path / "notes"
    flags = ["-nostdlib", "-static", "-Wl,--build-id=none"] if link else ["-c"]
    subprocess.run(["gcc", *flags, "-o", str(output), str(source)], check=True)
    return output.read_bytes()


GUEST_OS = 'NOTE(guest, struct note8, 4, 6, 6, "Xen", 0x78756e696cULL)'  # XEN_ELFNOTE_GUEST_OS "linux"


@pytest.mark.parametrize("link", [True, False], ids=["PT_NOTE", "SHT_NOTE"])
@pytest.mark.parametrize(
    ("notes", "entry"),
    [
        (GUEST_OS + '\nNOTE(entry, struct note8, 4, 8, 18, "Xen", 0x1000850ULL)', 0x1000850),
        ('NOTE(entry, struct note4, 4, 4, 18, "Xen", 0x1000000)', 0x1000000),
        (GUEST_OS, None),
        # the right type under another owner is not Xen's note
        ('NOTE(entry, struct note4, 4, 4, 18, "GNU", 0x1000000)', None),
    ],
)
def test_pvh_entry_from_toolchain_elf(tmp_path, notes, entry, link):
    assert pvh_entry(build_elf(tmp_path, notes, link=link), path="notes") == entry


def test_pvh_note_with_a_bad_descriptor(tmp_path):
    elf = build_elf(tmp_path, 'NOTE(entry, struct note4, 4, 2, 18, "Xen", 0)', link=True)
    with pytest.raises(KernelError) as err:
        pvh_entry(elf, path="/k/odd")
    assert str(err.value) == "/k/odd: the Xen PHYS32_ENTRY note has a 2-byte descriptor, expected 4 or 8"


def test_pvh_entry_of_a_non_elf():
    with pytest.raises(KernelError) as err:
        pvh_entry(b"MZ\0\0junk", path="/k/pe")
    assert str(err.value) == "/k/pe: not an ELF file (starts with b'MZ\\x00\\x00')"


def test_pvh_entry_of_a_damaged_elf(tmp_path):
    elf = bytearray(build_elf(tmp_path, GUEST_OS, link=True))
    struct.pack_into("<Q", elf, 32, 0xFFFF_FFFF_FFFF_FF00)  # e_phoff far beyond the file
    with pytest.raises(KernelError) as err:
        pvh_entry(bytes(elf), path="/k/damaged")
    assert str(err.value).startswith("/k/damaged: not a valid ELF file (")
