"""Kernel images: tell a bzImage from an ELF vmlinux, unpack one into the other, find PVH.

QEMU's `-kernel` boots an ELF vmlinux directly (the fast path, no real-mode setup and
no self-decompression) only when the ELF carries the Xen PVH entry note; distribution
kernels ship a bzImage, whose compressed payload is that ELF. Everything here is a pure
function over bytes; reading the file is the caller's job.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from microvmc.errors import KernelError

__all__ = [
    "KernelFormat",
    "Compression",
    "KernelInfo",
    "inspect_kernel",
    "extract_vmlinux",
    "pvh_entry",
    "embedded_config",
    "XEN_ELFNOTE_PHYS32_ENTRY",
]

# include/xen/interface/elfnote.h
XEN_ELFNOTE_PHYS32_ENTRY = 18

_ELF_MAGIC = b"\x7fELF"
# Documentation/arch/x86/boot.rst: offsets in the real-mode setup header.
_SETUP_SECTS = 0x1F1
_HDR_MAGIC_AT = 0x202
_HDR_MAGIC = b"HdrS"
_VERSION = 0x206
_KERNEL_VERSION = 0x20E
_PAYLOAD_OFFSET = 0x248  # payload_offset, payload_length: protocol 2.08+
_PROTOCOL_WITH_PAYLOAD = 0x0208
# A probe decompresses this much input at most; bzip2 needs a whole block (<= 900 kB)
# before it yields a byte.
_PROBE_WINDOW = 2 * 1024 * 1024
# Legacy .lzma streams name their dictionary size in the header; cap what a false
# candidate (random bytes that happen to start with 5d 00 00) can make liblzma allocate.
_LZMA_MEMLIMIT = 1024 * 1024 * 1024


class KernelFormat(StrEnum):
    BZIMAGE = "bzimage"
    ELF = "elf"


class Compression(StrEnum):
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"
    LZMA = "lzma"
    BZIP2 = "bzip2"
    LZ4 = "lz4"
    LZO = "lzo"
    NONE = "none"


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelInfo:
    format: KernelFormat
    release: str | None  # "6.1.0-57-amd64"; None when the image does not say
    compression: Compression | None  # of a bzImage's payload; None for ELF or not found


@dataclass(frozen=True, kw_only=True, slots=True)
class _Payload:
    compression: Compression
    offset: int  # in the file
    length: int | None  # from the setup header, when it is known


# Magics as the kernel's own lib/decompress.c recognises them (bzip2 with its block magic,
# to make false hits in the decompressor stub unlikely).
_MAGICS: tuple[tuple[Compression, bytes], ...] = (
    (Compression.GZIP, b"\x1f\x8b\x08"),
    (Compression.XZ, b"\xfd7zXZ\x00"),
    (Compression.ZSTD, b"\x28\xb5\x2f\xfd"),
    (Compression.LZMA, b"\x5d\x00\x00"),
    (Compression.BZIP2, b"BZh"),
    (Compression.LZ4, b"\x02\x21\x4c\x18"),
    (Compression.LZO, b"\x89LZO\x00\r\n\x1a\n"),
    (Compression.NONE, _ELF_MAGIC),
)
_DECOMPRESSIBLE = (
    Compression.GZIP,
    Compression.XZ,
    Compression.ZSTD,
    Compression.LZMA,
    Compression.BZIP2,
    Compression.LZ4,
    Compression.NONE,
)
# The kernel's lz4 is the legacy format (`lz4 -l`, lib/decompress_unlz4.c): the magic, then blocks
# of at most 8 MiB of output, each after its compressed size (le32); a block cannot be decoded in
# part, so an lz4 probe takes a whole first block.
_LZ4_MAGIC = 0x184C2102
_LZ4_BLOCK = 8 << 20
_LZ4_BOUND = _LZ4_BLOCK + _LZ4_BLOCK // 255 + 16  # LZ4_compressBound of a block
_PROBE_WINDOWS = {Compression.LZ4: 4 + 4 + _LZ4_BOUND}


def inspect_kernel(data: bytes, *, path: str) -> KernelInfo:
    """What kind of kernel image `data` is, without decompressing more than a few bytes."""
    if data.startswith(_ELF_MAGIC):
        return KernelInfo(format=KernelFormat.ELF, release=_banner_release(data), compression=None)
    if not _is_bzimage(data):
        raise KernelError(
            f"{path}: not a Linux kernel image (no bzImage 'HdrS' header at 0x202 and no ELF magic)",
            hint="pass a bzImage (vmlinuz) or an ELF vmlinux",
        )
    payload = next(_payloads(data), None)
    return KernelInfo(
        format=KernelFormat.BZIMAGE,
        release=_setup_release(data),
        compression=payload.compression if payload else None,
    )


def extract_vmlinux(data: bytes, *, path: str) -> bytes:
    """The ELF vmlinux inside a bzImage; an ELF input is returned as is."""
    if data.startswith(_ELF_MAGIC):
        return data
    if not _is_bzimage(data):
        raise KernelError(
            f"{path}: not a Linux kernel image (no bzImage 'HdrS' header at 0x202 and no ELF magic)",
            hint="pass a bzImage (vmlinuz) or an ELF vmlinux",
        )
    view = memoryview(data)
    broken: _Payload | None = None
    for payload in _payloads(data):
        if payload.compression not in _DECOMPRESSIBLE:
            raise KernelError(
                f"{path}: the kernel payload is {payload.compression}-compressed, "
                "which microvmc cannot decompress",
                hint="use a kernel built with gzip, xz, zstd, lzma, bzip2 or lz4 compression, or an ELF vmlinux",
            )
        elf, complete = _DECOMPRESS[payload.compression](view[payload.offset :], payload.length)
        if complete and _looks_like_elf(elf):
            return elf
        broken = broken or payload
    if broken is not None:
        raise KernelError(
            f"{path}: the {broken.compression} kernel payload at offset {broken.offset:#x} "
            "is truncated or corrupt",
            hint="the file is incomplete; copy or download it again",
        )
    raise KernelError(
        f"{path}: found no gzip, xz, zstd, lzma, bzip2 or lz4 compressed kernel in the bzImage",
        hint="the file is truncated, or not a bzImage",
    )


def pvh_entry(elf: bytes, *, path: str) -> int | None:
    """The 32-bit PVH entry point from the Xen PHYS32_ENTRY note, or None without one."""
    if not elf.startswith(_ELF_MAGIC):
        raise KernelError(f"{path}: not an ELF file (starts with {bytes(elf[:4])!r})")
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elffile = ELFFile(io.BytesIO(elf))
        endian = "<" if elffile.little_endian else ">"
        for note in _iter_notes(elffile):
            # elftools names some raw types after GNU notes even under other owners;
            # the raw n_type word is what Xen's number refers to.
            (n_type,) = struct.unpack_from(endian + "I", elf, note["n_offset"] + 8)
            if note["n_name"] != "Xen" or n_type != XEN_ELFNOTE_PHYS32_ENTRY:
                continue
            desc = bytes(note["n_descdata"])
            if len(desc) not in (4, 8):
                raise KernelError(
                    f"{path}: the Xen PHYS32_ENTRY note has a {len(desc)}-byte descriptor, "
                    "expected 4 or 8"
                )
            (entry,) = struct.unpack(endian + ("I" if len(desc) == 4 else "Q"), desc)
            return entry
    # Damaged headers can make elftools seek or unpack out of range, not only raise ELFError.
    except (ELFError, struct.error, ValueError, OverflowError) as exc:
        raise KernelError(f"{path}: not a valid ELF file ({exc})") from None
    return None


def _iter_notes(elffile) -> Iterator:
    # A linked vmlinux has PT_NOTE segments; an object file (tests) only SHT_NOTE sections.
    for segment in elffile.iter_segments():
        if segment["p_type"] == "PT_NOTE":
            yield from segment.iter_notes()
    for section in elffile.iter_sections():
        if section["sh_type"] == "SHT_NOTE":
            yield from section.iter_notes()


def _is_bzimage(data: bytes) -> bool:
    return data[_HDR_MAGIC_AT : _HDR_MAGIC_AT + 4] == _HDR_MAGIC


def _setup_release(data: bytes) -> str | None:
    """The first word of the setup header's kernel_version string."""
    if len(data) < _KERNEL_VERSION + 2:
        return None
    (pointer,) = struct.unpack_from("<H", data, _KERNEL_VERSION)
    if pointer == 0:
        return None
    start = pointer + 0x200
    end = data.find(b"\0", start, start + 512)
    return _first_word(data[start:end] if end >= 0 else b"")


def _banner_release(data: bytes) -> str | None:
    """The release from linux_banner ("Linux version 6.1.0-57-amd64 (...)") in a vmlinux."""
    marker = b"Linux version "
    at = data.find(marker)
    while at >= 0:
        start = at + len(marker)
        word = _first_word(data[start : start + 128].split(b"\0", 1)[0])
        if word and word[0].isdigit():
            return word
        at = data.find(marker, start)
    return None


def _first_word(raw: bytes) -> str | None:
    words = raw.split(maxsplit=1)
    if not words:
        return None
    try:
        return words[0].decode("ascii")
    except UnicodeDecodeError:
        return None


def _payloads(data: bytes) -> Iterator[_Payload]:
    """Payload candidates whose first bytes decompress to an ELF header, best first.

    The header's payload_offset (protocol 2.08+) is exact; scanning for magics is the
    fallback for older or hand-made images, and every hit is probed before it is trusted.
    """
    view = memoryview(data)
    setup_sects = data[_SETUP_SECTS] if len(data) > _SETUP_SECTS else 0
    kernel_start = ((setup_sects or 4) + 1) * 512
    header = _header_payload(data, kernel_start)
    if header is not None:
        if header.compression is Compression.LZO:
            yield header  # recognised, but nothing here can probe it
            return
        # (an lz4 block decodes only whole: a truncated first one would hide that the file is cut)
        if header.compression is Compression.LZ4 or _probe(view, header.offset, header.compression):
            yield header
    hits = sorted(
        (offset, compression)
        for compression, magic in _MAGICS
        if compression in _DECOMPRESSIBLE
        for offset in _find_all(data, magic, kernel_start)
    )
    inside = range(header.offset, header.offset + (header.length or 1)) if header is not None else range(0)
    for offset, compression in hits:
        if offset in inside:
            continue  # within the payload the header names (an lz4 stream begins with the ELF header as is)
        if _probe(view, offset, compression):
            yield _Payload(compression=compression, offset=offset, length=None)


def _header_payload(data: bytes, kernel_start: int) -> _Payload | None:
    if len(data) < _PAYLOAD_OFFSET + 8:
        return None
    (version,) = struct.unpack_from("<H", data, _VERSION)
    if version < _PROTOCOL_WITH_PAYLOAD:
        return None
    relative, length = struct.unpack_from("<II", data, _PAYLOAD_OFFSET)
    offset = kernel_start + relative
    if relative == 0 or offset >= len(data):
        return None
    for compression, magic in _MAGICS:
        if data.startswith(magic, offset):
            return _Payload(compression=compression, offset=offset, length=length or None)
    return None


def _find_all(data: bytes, magic: bytes, start: int) -> Iterator[int]:
    at = data.find(magic, start)
    while at >= 0:
        yield at
        at = data.find(magic, at + 1)


def _probe(view: memoryview, offset: int, compression: Compression) -> bool:
    try:
        head = _PROBES[compression](view[offset : offset + _PROBE_WINDOWS.get(compression, _PROBE_WINDOW)])
    except Exception:  # any decoder error means "not this candidate"
        return False
    return _looks_like_elf(head)


def _looks_like_elf(head: bytes) -> bool:
    # EI_CLASS, EI_DATA and EI_VERSION must be valid, not just the four magic bytes.
    return (
        len(head) >= 7
        and head.startswith(_ELF_MAGIC)
        and head[4] in (1, 2)
        and head[5] in (1, 2)
        and head[6] == 1
    )


_HEAD = 16


def _probe_gzip(view: memoryview) -> bytes:
    import zlib

    return zlib.decompressobj(wbits=31).decompress(view, _HEAD)


def _probe_xz(view: memoryview) -> bytes:
    import lzma

    return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(view, max_length=_HEAD)


def _probe_lzma(view: memoryview) -> bytes:
    import lzma

    decoder = lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=_LZMA_MEMLIMIT)
    return decoder.decompress(view, max_length=_HEAD)


def _probe_bzip2(view: memoryview) -> bytes:
    import bz2

    return bz2.BZ2Decompressor().decompress(view, max_length=_HEAD)


def _probe_zstd(view: memoryview) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(view).read(_HEAD)


def _probe_lz4(view: memoryview) -> bytes:
    blocks, _ = _lz4_blocks(view, first_only=True)
    return blocks[0][:_HEAD] if blocks else b""


def _lz4_blocks(view: memoryview, *, first_only: bool = False) -> tuple[list[bytes], bool]:
    """The decoded blocks of a legacy lz4 stream, and whether it ended cleanly: at the end of
    `view`, or at the uncompressed size (le32) the kernel appends, or at what cannot be a block
    header. A block that runs past `view` is truncation; one that does not decode raises."""
    import lz4.block

    if len(view) < 4 or struct.unpack_from("<I", view)[0] != _LZ4_MAGIC:
        return [], False
    blocks: list[bytes] = []
    at, decoded = 4, 0
    while len(view) - at >= 4 and not (first_only and blocks):
        (size,) = struct.unpack_from("<I", view, at)
        if size == _LZ4_MAGIC:  # a further stream, concatenated
            at += 4
            continue
        if size == 0 or size > _LZ4_BOUND or size == decoded:
            return blocks, True  # not a block: what follows the stream (the size, le32)
        if at + 4 + size > len(view):
            return blocks, False
        blocks.append(lz4.block.decompress(view[at + 4 : at + 4 + size], uncompressed_size=_LZ4_BLOCK))
        at, decoded = at + 4 + size, decoded + len(blocks[-1])
    return blocks, True


def _probe_none(view: memoryview) -> bytes:
    return bytes(view[:_HEAD])


# Each decompressor stops at the end of its stream and ignores what follows (the kernel
# appends the uncompressed size, and the decompressor's own code may follow); `complete`
# says whether the stream really ended.
def _decompress_gzip(view: memoryview, length: int | None) -> tuple[bytes, bool]:
    import zlib

    decoder = zlib.decompressobj(wbits=31)
    try:
        return decoder.decompress(view), decoder.eof
    except zlib.error:
        return b"", False


def _decompress_xz(view: memoryview, length: int | None) -> tuple[bytes, bool]:
    import lzma

    decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ)
    try:
        return decoder.decompress(view), decoder.eof
    except lzma.LZMAError:
        return b"", False


def _decompress_lzma(view: memoryview, length: int | None) -> tuple[bytes, bool]:
    import lzma

    decoder = lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=_LZMA_MEMLIMIT)
    try:
        return decoder.decompress(view), decoder.eof
    except lzma.LZMAError:
        return b"", False


def _decompress_bzip2(view: memoryview, length: int | None) -> tuple[bytes, bool]:
    import bz2

    decoder = bz2.BZ2Decompressor()
    try:
        return decoder.decompress(view), decoder.eof
    except OSError:
        return b"", False


def _decompress_zstd(view: memoryview, length: int | None) -> tuple[bytes, bool]:
    import zstandard

    decoder = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
    try:
        return decoder.decompress(view), decoder.eof
    except zstandard.ZstdError:
        return b"", False


def _decompress_lz4(view: memoryview, length: int | None) -> tuple[bytes, bool]:
    import lz4.block

    try:
        blocks, complete = _lz4_blocks(view[:length] if length else view)
    except lz4.block.LZ4BlockError:
        return b"", False
    return b"".join(blocks), complete and bool(blocks)


def _decompress_none(view: memoryview, length: int | None) -> tuple[bytes, bool]:
    return bytes(view[:length] if length else view), True


_PROBES: dict[Compression, Callable[[memoryview], bytes]] = {
    Compression.GZIP: _probe_gzip,
    Compression.XZ: _probe_xz,
    Compression.LZMA: _probe_lzma,
    Compression.BZIP2: _probe_bzip2,
    Compression.ZSTD: _probe_zstd,
    Compression.LZ4: _probe_lz4,
    Compression.NONE: _probe_none,
}
_DECOMPRESS: dict[Compression, Callable[[memoryview, int | None], tuple[bytes, bool]]] = {
    Compression.GZIP: _decompress_gzip,
    Compression.XZ: _decompress_xz,
    Compression.LZMA: _decompress_lzma,
    Compression.BZIP2: _decompress_bzip2,
    Compression.ZSTD: _decompress_zstd,
    Compression.LZ4: _decompress_lz4,
    Compression.NONE: _decompress_none,
}


_IKCFG_START = b"IKCFG_ST"


def embedded_config(data: bytes) -> str | None:
    """The .config a kernel built with CONFIG_IKCONFIG carries (kernel/configs.c: a gzip stream
    between the markers "IKCFG_ST" and "IKCFG_ED"), from an ELF vmlinux or a bzImage with an
    uncompressed payload; None when there is none to be read without decompressing."""
    import zlib

    at = data.find(_IKCFG_START)
    while at >= 0:
        start = at + len(_IKCFG_START)
        if data.startswith(b"\x1f\x8b\x08", start):
            decoder = zlib.decompressobj(wbits=31)
            try:
                text = decoder.decompress(memoryview(data)[start:])
            except zlib.error:
                text = b""
            if decoder.eof:
                return text.decode("utf-8", "replace")
        at = data.find(_IKCFG_START, start)
    return None
