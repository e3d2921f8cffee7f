"""`run -v HOST:GUEST[:ro|rw]`: command-line volumes, as docker's bind volumes.

A directory becomes a share (`shares.v<n>`), validated with the manifest's own. A single file cannot
be shared by virtiofs or 9p, which share directories: it is staged per run into a directory of its
own in the run directory (backends/qemu.py, with backends/oci.py's staging: a hard link, a bind
mount as root, a copy when read-only), shared hidden over 9p, bound onto GUEST in the guest and the
share detached (init/PROTOCOL.md, MVMC_M<n>), so the program sees that one file and nothing beside
it. Its own directory means its own read-only flag, enforced by QEMU. Writes go to the file itself
(the same inode), so they are on the host by the time the run ends, however it ends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence

from microvmc.compiler.hostfiles import HostFiles
from microvmc.compiler.load import Loaded
from microvmc.compiler.manifest import (
    HIDDEN_BY_A_SHARE,
    KERNEL_FILESYSTEMS,
    Manifest,
    Mount,
    MountKind,
    Share,
    Transport,
    guest_path,
)
from microvmc.errors import ManifestError, Problem

__all__ = ["FileVolume", "parse_volume", "with_volumes", "apply_file_volumes", "STAGED_GUEST"]

SYNTAX = "HOST:GUEST[:ro|rw]"
STAGED_GUEST = "/dev/.microvmc-{tag}"  # where a staged file's share is mounted until detached (/dev is always writable)


@dataclass(frozen=True, kw_only=True, slots=True)
class FileVolume:
    """A single file from `-v`, to be staged: the share is `stage-<tag>` in the run directory."""

    text: str  # as written, for messages
    host: str  # absolute
    guest: str
    read_only: bool
    tag: str


def origin(text: str) -> str:
    return f"-v {text}"


def parse_volume(text: str, *, cwd: str) -> tuple[str, str, bool]:
    """(absolute host path, guest path, read-only) of `HOST:GUEST[:ro|rw]`; the host path is relative
    to `cwd` unless absolute (docker takes only absolute ones)."""
    def bad(why: str) -> ManifestError:
        return ManifestError([Problem(origin(text), "", f"{why}; expected {SYNTAX}")])

    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise bad("a host path and a guest path are both needed" if len(parts) == 1 else "too many ':'")
    host, guest, *mode = parts
    if mode and mode[0] not in ("ro", "rw"):
        raise bad(f"{mode[0]!r} is not ro or rw")
    if not host:
        raise bad("the host path is empty")
    if not guest.startswith("/"):
        raise bad(f"{guest!r} is not an absolute guest path")
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(host))), guest, mode == ["ro"]


def with_volumes(loaded: Loaded, volumes: Sequence[str], *, cwd: str, store: str | None,
                 files: HostFiles | None = None) -> tuple[Loaded, tuple[FileVolume, ...]]:
    """The document with each directory volume as a share, and the file volumes to stage. Refuses
    what must not be shared: `/` or the store read-write, and what is neither file nor directory.
    `files`: what records the looks at the host (a path that turns from a directory into a file
    must compile again)."""
    if not volumes:
        return loaded, ()
    look = files or HostFiles()
    data = dict(loaded.data)
    shares = dict(data["shares"]) if isinstance(data.get("shares"), dict) else {}
    origins = dict(loaded.origins)
    staged: list[FileVolume] = []
    problems: list[Problem] = []
    taken = set(shares)
    for text in volumes:
        try:
            host, guest, read_only = parse_volume(text, cwd=cwd)
        except ManifestError as err:
            problems += err.problems
            continue
        where = origin(text)
        real = look.realpath(host)
        if not read_only and real == "/":
            problems.append(Problem(where, "", "sharing the host's / read-write is refused", "add :ro"))
            continue
        if not read_only and store and _inside(real, os.path.realpath(store)):
            problems.append(Problem(where, "", f"{host} is in microvmc's store, which is never shared read-write",
                                    "add :ro"))
            continue
        tag = next(t for n in range(len(taken) + 1) if (t := f"v{n}") not in taken)
        taken.add(tag)
        if look.is_dir(host):
            shares[tag] = {"host": host, "guest": guest, "read_only": read_only}
            origins.update({("shares", tag): where, **{("shares", tag, k): where for k in ("host", "guest", "read_only")}})
        elif look.is_file(host):
            staged.append(FileVolume(text=text, host=host, guest=guest, read_only=read_only, tag=tag))
        elif look.exists(host):
            problems.append(Problem(where, "", f"{host} is neither a directory nor a regular file, which cannot "
                                    "cross into a VM"))
        else:
            problems.append(Problem(where, "", f"{host} does not exist"))
    if problems:
        raise ManifestError(problems)
    if shares:
        data["shares"] = shares
    return replace(loaded, data=data, origins=origins), tuple(staged)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def apply_file_volumes(manifest: Manifest, files: Sequence[FileVolume]) -> Manifest:
    """Each file volume as a hidden 9p share of its staging directory (relative to the run
    directory) and a bind mount onto its guest path; ManifestError for a guest path no file can take."""
    if not files:
        return manifest
    problems = []
    taken = {s.guest: f"share {s.tag!r}" for s in manifest.shares}
    shares, mounts = list(manifest.shares), list(manifest.mounts)
    for f in files:
        target = guest_path(f.guest)
        inside = next((k for k in KERNEL_FILESYSTEMS if target.startswith(k + "/")), None)
        if target in HIDDEN_BY_A_SHARE or inside:
            problems.append(Problem(origin(f.text), "", f"{f.guest!r} is the guest's own "
                                    f"{inside or target}, where a file cannot be mounted"))
            continue
        if target in taken:
            problems.append(Problem(origin(f.text), "", f"{f.guest!r} is already the mount point of {taken[target]}"))
            continue
        taken[target] = f"-v {f.text}"
        staged = STAGED_GUEST.format(tag=f.tag)
        shares.append(Share(tag=f.tag, host=f"stage-{f.tag}", guest=staged, read_only=f.read_only,
                            transport=Transport.NINEP, hidden=True, staged_from=f.host))
        mounts.append(Mount(kind=MountKind.BIND, target=target, source=f"{staged}/{os.path.basename(f.host)}",
                            read_only=f.read_only))
    if problems:
        raise ManifestError(problems)
    return replace(manifest, shares=tuple(sorted(shares, key=lambda s: s.tag)), mounts=tuple(mounts))
