"""What each member of an image layer means, and where it may go: the pure half of unpacking.

A layer is a tar archive applied on top of the layers below it (the OCI image spec's "changeset"):
`.wh.NAME` deletes NAME from the layers below, `.wh..wh..opq` empties its directory of what the
layers below put there. A layer comes from whoever published the image, so every member is checked
before anything is written: a name must stay inside the root filesystem, a hard link must point at
something inside it, and a symbolic link is never followed on the host (paths are resolved the way
the guest will see them, inside the root). backends/unpack.py writes what these functions decide.
"""

from __future__ import annotations

import posixpath
import stat
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable

from microvmc.errors import MicrovmcError

__all__ = ["LayerError", "Kind", "Action", "classify", "resolve_in_root", "WHITEOUT", "OPAQUE",
           "MAX_NAME", "MAX_COMPONENT", "MAX_SPECIAL_HEADER", "MAX_SYMLINK_HOPS"]

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_NAME = 4095  # PATH_MAX without its NUL
MAX_COMPONENT = 255  # NAME_MAX
MAX_SPECIAL_HEADER = 1 << 20  # pax and GNU long-name headers: Go's archive/tar allows 1 MiB, as here
MAX_SYMLINK_HOPS = 40  # Linux's MAXSYMLINKS


class LayerError(MicrovmcError):
    """A layer member that cannot be unpacked safely; the message names the member."""


class Kind(StrEnum):
    DIRECTORY = "directory"
    FILE = "file"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    FIFO = "fifo"
    WHITEOUT = "whiteout"  # delete `path` from the layers below
    OPAQUE = "opaque"  # empty the directory `path` of the layers below
    SKIP = "skip"  # neutralised: not unpacked, with a note saying why


@dataclass(frozen=True, kw_only=True, slots=True)
class Action:
    kind: Kind
    path: tuple[str, ...]  # components below the root; () is the root itself
    link: tuple[str, ...] = ()  # a hard link's target, below the root
    note: str = ""  # why a member was skipped


# tarfile's type bytes (tarfile.REGTYPE, ...), so this module needs no tarfile import.
_REG, _AREG, _LNK, _SYM, _CHR, _BLK, _DIR, _FIFO, _CONT = b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"
_GNU_SPARSE = b"S"


def _components(name: str, member: str) -> tuple[str, ...]:
    if "\0" in name:
        raise LayerError(f"{member!r}: the name contains a NUL byte")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise LayerError(f"{member[:60]!r}...: a name of {len(name)} characters is longer than a path may be ({MAX_NAME})")
    if name.startswith("/"):
        raise LayerError(f"{member!r}: an absolute name would be written outside the root filesystem")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise LayerError(f"{member!r}: '..' would climb out of the root filesystem")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT:
            raise LayerError(f"{member!r}: a name component longer than {MAX_COMPONENT} bytes")
        parts.append(part)
    return tuple(parts)


def classify(name: str, type_: bytes, linkname: str = "") -> Action:
    """What a member (its tar name, type byte and link name) does to the root filesystem. Raises
    LayerError for a member that no honest layer contains."""
    path = _components(name, name)
    base = path[-1] if path else ""
    if base == OPAQUE:
        return Action(kind=Kind.OPAQUE, path=path[:-1])
    if base.startswith(WHITEOUT):
        if base.startswith(".wh..wh."):  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content
            return Action(kind=Kind.SKIP, path=path, note="aufs metadata")
        target = base[len(WHITEOUT):]
        if target in ("", ".", ".."):
            raise LayerError(f"{name!r}: a whiteout of {target!r} names no file")
        return Action(kind=Kind.WHITEOUT, path=(*path[:-1], target))
    if not path and type_ != _DIR:
        raise LayerError(f"{name!r}: only a directory may stand for the root itself")
    if type_ == _DIR:
        return Action(kind=Kind.DIRECTORY, path=path)
    if type_ in (_REG, _AREG, _CONT):
        return Action(kind=Kind.FILE, path=path)
    if type_ == _SYM:
        if not linkname or "\0" in linkname or len(linkname) > MAX_NAME:
            raise LayerError(f"{name!r}: the symbolic link's target {linkname[:60]!r} is not a path")
        return Action(kind=Kind.SYMLINK, path=path)
    if type_ == _LNK:
        target = linkname.lstrip("/")  # docker writes some hard links' targets absolute, meaning the root's
        link = _components(target, f"{name} -> {linkname}")
        if not link:
            raise LayerError(f"{name!r}: a hard link to the root directory")
        return Action(kind=Kind.HARDLINK, path=path, link=link)
    if type_ == _FIFO:
        return Action(kind=Kind.FIFO, path=path)
    if type_ in (_CHR, _BLK):
        # The guest's /dev is a devtmpfs; a device node in the store would give its readers the
        # host's device.
        return Action(kind=Kind.SKIP, path=path, note="a device node (the guest's /dev is a devtmpfs)")
    if type_ == _GNU_SPARSE:
        raise LayerError(f"{name!r}: GNU sparse files are not supported")
    raise LayerError(f"{name!r}: tar member type {type_!r} is not a file, directory or link")


def resolve_in_root(path: tuple[str, ...], readlink: Callable[[tuple[str, ...]], str | None],
                    *, follow_last: bool = False) -> tuple[str, ...]:
    """Where `path` is inside the root, with each symbolic link on the way resolved as the guest
    would (an absolute target starts at the root, `..` stops at the root), so that no link in a
    layer can make the unpacker write outside it. `readlink(components)` gives a link's target, or
    None when that path is not a symbolic link (or does not exist). The last component is followed
    only with `follow_last`."""
    resolved: list[str] = []
    pending = list(path)
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = (*resolved, part)
        target = readlink(candidate) if (pending or follow_last) else None
        if target is None:
            resolved.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            raise LayerError(f"{'/'.join(path)!r}: more than {MAX_SYMLINK_HOPS} symbolic links on the way")
        if target.startswith("/"):
            resolved = []
        pending = [p for p in target.split("/")] + pending
    return tuple(resolved)


def file_type(mode: int) -> str:
    """For messages: what an existing file is."""
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"), (stat.S_ISREG, "file")):
        if test(mode):
            return name
    return "special file"


def join(root: str, path: tuple[str, ...]) -> str:
    return posixpath.join(root, *path) if path else root
