"""Unpack image layers into a root filesystem directory (compiler/layers.py decides, this writes).

Ownership is written one of two ways (`Ownership`):

- `native` (microvmc runs as root): real owners, modes, setuid bits, xattrs; shared as it is.
- `mapped-xattr` (an ordinary user, who cannot chown): every file belongs to the user on the host,
  and its guest owner, group, mode and device number are kept in the `user.virtfs.*` xattrs that
  QEMU's 9p server reads with `security_model=mapped-xattr`; symbolic links are regular files holding
  their target, as QEMU stores them in that model. The guest then sees `0 0` and the setuid bit.

Each layer's uncompressed bytes are checked against the image config's `diff_ids` as they stream.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import struct
import tarfile
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import BinaryIO, Iterable, Sequence

from microvmc.compiler.layers import (
    MAX_SPECIAL_HEADER,
    Kind,
    LayerError,
    classify,
    join,
    resolve_in_root,
)

__all__ = ["Ownership", "Layer", "unpack_layers", "default_ownership", "read_guest_file"]


class Ownership(StrEnum):
    NATIVE = "native"
    MAPPED_XATTR = "mapped-xattr"


def default_ownership() -> Ownership:
    return Ownership.NATIVE if os.geteuid() == 0 else Ownership.MAPPED_XATTR


@dataclass(frozen=True, kw_only=True, slots=True)
class Layer:
    path: str  # the blob
    compression: str  # "gzip" | "zstd" | "none"
    digest: str  # of the blob, for messages
    diff_id: str | None = None  # sha256 of the uncompressed tar, from the image config


# QEMU's hw/9pfs/9p-local.c: the host modes of files and directories it creates in mapped mode.
_MAPPED_FILE_MODE = 0o600
_MAPPED_DIR_MODE = 0o700
_MAPPED_KEYS = ("user.virtfs.uid", "user.virtfs.gid", "user.virtfs.mode", "user.virtfs.rdev")


class _SafeTarInfo(tarfile.TarInfo):
    """Refuses a pax or GNU long-name header larger than MAX_SPECIAL_HEADER before tarfile reads it
    into memory (a 'header' of gigabytes would otherwise be read whole)."""

    def _proc_member(self, tarfile_):  # tarfile's hook for every header it reads
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > MAX_SPECIAL_HEADER:
            raise LayerError(f"a tar extended header of {self.size} bytes (at most {MAX_SPECIAL_HEADER} are accepted)")
        return super()._proc_member(tarfile_)


class _Hashing(io.RawIOBase):
    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        self.sha.update(data)
        buffer[: len(data)] = data
        return len(data)


def _open_layer(f: BinaryIO, compression: str) -> BinaryIO:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return f


class _Writer:
    """Applies the members of one layer after another to `root`."""

    def __init__(self, root: str, ownership: Ownership):
        self.root = root
        self.ownership = ownership
        self.notes: list[str] = []
        self.dir_times: dict[tuple[str, ...], tuple[int, int]] = {}
        self.layer_paths: set[tuple[str, ...]] = set()  # what the current layer created

    # -- reading the tree as the guest will see it

    def _readlink(self, path: tuple[str, ...]) -> str | None:
        full = join(self.root, path)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return os.readlink(full)
        if self.ownership is Ownership.MAPPED_XATTR and stat.S_ISREG(st.st_mode):
            mode = _mapped_mode(full)
            if mode is not None and stat.S_ISLNK(mode):
                with open(full, "rb") as f:
                    return os.fsdecode(f.read())
        return None

    def _parent(self, path: tuple[str, ...]) -> tuple[str, ...]:
        """The member's path with its directories resolved inside the root and made if missing."""
        parent = resolve_in_root(path[:-1], self._readlink, follow_last=True) if len(path) > 1 else ()
        current = self.root
        for i, part in enumerate(parent):
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                self._own(current, parent[: i + 1], stat.S_IFDIR | 0o755, 0, 0)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise LayerError(f"{'/'.join(path)!r}: {'/'.join(parent[: i + 1])!r} is not a directory")
        return (*parent, path[-1]) if path else ()

    # -- writing

    def _remove(self, full: str, *, keep_dir: bool) -> None:
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not keep_dir:
                shutil.rmtree(full)
        else:
            os.unlink(full)

    def _own(self, full: str, path: tuple[str, ...], mode: int, uid: int, gid: int, rdev: int = 0,
             *, symlink: bool = False) -> None:
        if self.ownership is Ownership.NATIVE:
            os.lchown(full, uid, gid)
            if not symlink:
                os.chmod(full, stat.S_IMODE(mode))  # after chown, which clears setuid bits
            return
        os.chmod(full, _MAPPED_DIR_MODE if stat.S_ISDIR(mode) else _MAPPED_FILE_MODE)
        values = (struct.pack("<I", uid), struct.pack("<I", gid), struct.pack("<I", mode), struct.pack("<Q", rdev))
        try:
            for key, value in zip(_MAPPED_KEYS, values):
                os.setxattr(full, key, value)
        except OSError as err:
            raise LayerError(f"cannot record ownership in user xattrs on {self.root} ({err.strerror}); "
                             "as an ordinary user the store must be on a filesystem with user xattrs") from None

    def _xattrs(self, full: str, member: tarfile.TarInfo, *, symlink: bool) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr."):]
            if self.ownership is Ownership.MAPPED_XATTR and (symlink or name.startswith("user.virtfs.")):
                continue
            data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
            try:
                os.setxattr(full, name, data, follow_symlinks=False)
            except OSError as err:
                self.notes.append(f"{member.name}: xattr {name} not kept ({err.strerror})")

    def apply(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        action = classify(member.name, member.type, member.linkname)
        if action.kind is Kind.SKIP:
            self.notes.append(f"{member.name}: skipped, {action.note}")
            return
        if action.kind is Kind.WHITEOUT:
            path = self._parent(action.path)
            if path not in self.layer_paths:  # a whiteout hides only what the layers below have
                self._remove(join(self.root, path), keep_dir=False)
            return
        if action.kind is Kind.OPAQUE:
            directory = resolve_in_root(action.path, self._readlink, follow_last=True)
            full = join(self.root, directory)
            if os.path.isdir(full) and not os.path.islink(full):
                for name in os.listdir(full):
                    if (*directory, name) not in self.layer_paths:
                        self._remove(os.path.join(full, name), keep_dir=False)
            return
        path = self._parent(action.path)
        full = join(self.root, path)
        self.layer_paths.add(path)
        uid, gid = member.uid, member.gid
        mode = stat.S_IMODE(member.mode)
        if action.kind is Kind.DIRECTORY:
            self._remove(full, keep_dir=True)
            if not os.path.isdir(full):
                os.mkdir(full, 0o700)
            self._own(full, path, stat.S_IFDIR | mode, uid, gid)
            self._xattrs(full, member, symlink=False)
            self.dir_times[path] = (member.mtime, member.mtime)
            return
        self._remove(full, keep_dir=False)
        symlink = False
        if action.kind is Kind.FILE:
            source = archive.extractfile(member)
            assert source is not None
            with open(full, "xb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            self._own(full, path, stat.S_IFREG | mode, uid, gid)
        elif action.kind is Kind.SYMLINK:
            if self.ownership is Ownership.NATIVE:
                os.symlink(member.linkname, full)
                symlink = True
            else:
                with open(full, "xb") as out:
                    out.write(os.fsencode(member.linkname))
            self._own(full, path, stat.S_IFLNK | 0o777, uid, gid, symlink=symlink)
        elif action.kind is Kind.HARDLINK:
            target = resolve_in_root(action.link, self._readlink)
            source_path = join(self.root, target)
            try:
                st = os.lstat(source_path)
            except FileNotFoundError:
                raise LayerError(f"{member.name!r}: the hard link's target {member.linkname!r} is not in the image") from None
            if stat.S_ISDIR(st.st_mode):
                raise LayerError(f"{member.name!r}: a hard link to the directory {member.linkname!r}")
            os.link(source_path, full, follow_symlinks=False)
            return  # the same inode: its owner and mode are the target's
        elif action.kind is Kind.FIFO:
            if self.ownership is Ownership.NATIVE:
                os.mkfifo(full, 0o600)
            else:
                open(full, "xb").close()
            self._own(full, path, stat.S_IFIFO | mode, uid, gid)
        self._xattrs(full, member, symlink=symlink)
        os.utime(full, (member.mtime, member.mtime), follow_symlinks=False)

    def finish(self) -> None:
        # Directory times last: creating their entries changed them.
        for path in sorted(self.dir_times, key=len, reverse=True):
            full = join(self.root, path)
            if os.path.isdir(full) and not os.path.islink(full):
                os.utime(full, self.dir_times[path])


def _mapped_mode(full: str) -> int | None:
    try:
        return struct.unpack("<I", os.getxattr(full, "user.virtfs.mode", follow_symlinks=False))[0]
    except OSError:
        return None


def unpack_layers(layers: Sequence[Layer], root: str, ownership: Ownership) -> list[str]:
    """Apply `layers`, lowest first, to the (empty) directory `root`. Returns notes on what was
    neutralised (device nodes skipped, xattrs that could not be kept). Raises LayerError."""
    writer = _Writer(root, ownership)
    writer._own(root, (), stat.S_IFDIR | 0o755, 0, 0)
    for index, layer in enumerate(layers):
        writer.layer_paths = set()
        with open(layer.path, "rb") as blob:
            hashing = _Hashing(_open_layer(blob, layer.compression))
            stream = io.BufferedReader(hashing, 1 << 20)
            try:
                with tarfile.open(fileobj=stream, mode="r|", tarinfo=_SafeTarInfo) as archive:
                    for member in archive:
                        try:
                            writer.apply(member, archive)
                        except LayerError as err:
                            raise LayerError(f"layer {index + 1} ({layer.digest[:19]}): {err}") from None
                while stream.read(1 << 20):  # the tar's trailing padding belongs to the diff_id too
                    pass
            except LayerError as err:
                if str(err).startswith("layer "):
                    raise
                raise LayerError(f"layer {index + 1} ({layer.digest[:19]}): {err}") from None
            except _corrupt_errors(layer.compression) as err:
                kind = "" if layer.compression == "none" else layer.compression + " "
                raise LayerError(f"layer {index + 1} ({layer.digest[:19]}) is not a valid {kind}tar archive: "
                                 f"{err}") from None
        if layer.diff_id and "sha256:" + hashlib_hex(hashing) != layer.diff_id:
            raise LayerError(f"layer {index + 1} ({layer.digest[:19]}): its uncompressed content does not match "
                             f"the image config's diff_id {layer.diff_id}")
    writer.finish()
    return writer.notes


def hashlib_hex(hashing: _Hashing) -> str:
    return hashing.sha.hexdigest()


def _corrupt_errors(compression: str) -> tuple[type[BaseException], ...]:
    """What a truncated or corrupt layer raises while it is read."""
    errors: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error)
    if compression == "zstd":
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


def read_guest_file(root: str, path: str, ownership: Ownership, limit: int = 1 << 20) -> str:
    """A text file of an unpacked root filesystem as the guest sees it (symbolic links resolved
    inside the root), "" when it is missing: /etc/passwd and /etc/group for process.user."""
    writer = _Writer(root, ownership)
    parts = tuple(p for p in path.split("/") if p)
    try:
        resolved = resolve_in_root(parts, writer._readlink, follow_last=True)
        with open(join(root, resolved), "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except (OSError, LayerError):
        return ""


def mapped_entries(paths: Iterable[str]) -> dict[str, tuple[int, int, int]]:
    """(uid, gid, mode) of mapped-xattr files, for tests and `images --verify`."""
    out = {}
    for p in paths:
        try:
            uid, gid, mode = (struct.unpack("<I", os.getxattr(p, k, follow_symlinks=False))[0] for k in _MAPPED_KEYS[:3])
        except OSError:
            continue
        out[p] = (uid, gid, mode)
    return out
