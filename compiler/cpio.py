"""A deterministic newc ("070701") cpio writer, for the guest's initramfs.

The same entries give the same bytes, in any order and on any host: entries are sorted,
inodes are numbered in that order, and owner, times and devices are zero. Missing parent
directories are added, because the kernel's initramfs unpacker does not create them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["EntryKind", "Entry", "write_newc", "gzip_deterministic"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_MAX_SIZE = 0xFFFFFFFF  # newc sizes are 8 hex digits
_PARENT_MODE = 0o755


class EntryKind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"


_TYPE_BITS: dict[EntryKind, int] = {
    EntryKind.FILE: 0o100000,
    EntryKind.DIR: 0o040000,
    EntryKind.SYMLINK: 0o120000,
}
# A directory's "." and its entry in the parent; GNU cpio and the kernel ignore it anyway.
_NLINK: dict[EntryKind, int] = {EntryKind.FILE: 1, EntryKind.DIR: 2, EntryKind.SYMLINK: 1}
_DEFAULT_MODE: dict[EntryKind, int] = {
    EntryKind.FILE: 0o644,
    EntryKind.DIR: 0o755,
    EntryKind.SYMLINK: 0o777,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Entry:
    path: str  # relative, "/"-separated, e.g. "etc/hosts"
    kind: EntryKind
    mode: int | None = None  # permission bits (0o7777); None: 0o644 file, 0o755 dir, 0o777 link
    data: bytes = b""  # file contents
    target: str = ""  # symlink target

    def __post_init__(self) -> None:
        parts = self.path.split("/")
        if not self.path or any(part in ("", ".", "..") for part in parts) or "\0" in self.path:
            raise ValueError(f"cpio entry path {self.path!r} is not a normalized relative path")
        if self.mode is not None and not 0 <= self.mode <= 0o7777:
            raise ValueError(f"{self.path}: mode {self.mode:#o} has bits beyond the permission bits 0o7777")
        if self.kind is not EntryKind.FILE and self.data:
            raise ValueError(f"{self.path}: a {self.kind} entry cannot have data")
        if self.kind is EntryKind.SYMLINK:
            if not self.target or "\0" in self.target:
                raise ValueError(f"{self.path}: symlink target {self.target!r} is empty or contains NUL")
        elif self.target:
            raise ValueError(f"{self.path}: a {self.kind} entry cannot have a symlink target")
        if len(self.data) > _MAX_SIZE:
            raise ValueError(f"{self.path}: {len(self.data)} bytes exceed the newc limit of 4 GiB")


def write_newc(entries: Iterable[Entry]) -> bytes:
    """The newc archive of `entries`, sorted by path, parents first, with a trailer."""
    by_path: dict[str, Entry] = {}
    for entry in entries:
        if entry.path in by_path:
            raise ValueError(f"duplicate cpio entry path {entry.path!r}")
        by_path[entry.path] = entry
    for path in list(by_path):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            existing = by_path.get(parent)
            if existing is None:
                by_path[parent] = Entry(path=parent, kind=EntryKind.DIR, mode=_PARENT_MODE)
            elif existing.kind is not EntryKind.DIR:
                raise ValueError(f"{path}: parent {parent!r} is a {existing.kind}, not a dir")
    # Byte order, so the archive does not depend on how str compares non-UTF-8 names;
    # a parent always sorts before its children since it is their prefix.
    ordered = sorted(by_path.values(), key=lambda entry: _encode(entry.path))
    records: list[bytes] = []
    for inode, entry in enumerate(ordered, start=1):
        permissions = entry.mode if entry.mode is not None else _DEFAULT_MODE[entry.kind]
        records += _record(
            name=_encode(entry.path),
            inode=inode,
            mode=_TYPE_BITS[entry.kind] | permissions,
            nlink=_NLINK[entry.kind],
            body=_encode(entry.target) if entry.kind is EntryKind.SYMLINK else entry.data,
        )
    records += _record(name=_TRAILER.encode(), inode=0, mode=0, nlink=1, body=b"")
    return b"".join(records)


def gzip_deterministic(data: bytes, level: int = 6) -> bytes:
    """gzip (RFC 1952) with mtime 0, no file name and OS "unknown", for stable bytes."""
    import zlib

    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(data) + compressor.flush()
    # XFL as gzip(1) sets it: 2 for the slowest level, 4 for the fastest.
    extra_flags = 2 if level == 9 else 4 if level == 1 else 0
    # zlib and gzip.compress write the host's OS code (3 on Unix); 255 is the same everywhere.
    header = struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, extra_flags, 255)
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return header + deflated + trailer


def _encode(text: str) -> bytes:
    # surrogateescape round-trips host file names that are not valid UTF-8 (os.fsdecode).
    return text.encode("utf-8", "surrogateescape")


def _record(*, name: bytes, inode: int, mode: int, nlink: int, body: bytes) -> tuple[bytes, ...]:
    """One header, name and body, each padded to 4 bytes (the body is not copied)."""
    name_size = len(name) + 1  # with its NUL
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (inode, mode, 0, 0, nlink, 0, len(body), 0, 0, 0, 0, name_size, 0)
    header = _MAGIC + b"".join(b"%08X" % value for value in fields)
    return header, name + b"\0" + _padding(len(header) + name_size), body, _padding(len(body))


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)
