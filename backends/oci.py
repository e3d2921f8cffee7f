"""The OCI runtime's host side that is not the monitor's: staging single files, the console
socket, pid files, and building a container's plan.

A single-file bind mount is staged as `<staging>/<n>`: a hard link where the file's filesystem
allows (the guest's writes reach the file itself, and the engine's later edits reach the guest),
else, as root, a bind mount of the file onto an empty one (the same, across filesystems), else a
copy, for read-only files only. `unstage` undoes all three; it is safe to run again after a crash.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path
from typing import Sequence

from microvmc.compiler.oci import StagedFile
from microvmc.errors import HostError

__all__ = ["stage_files", "unstage", "write_pid_file"]

MS_BIND = 0x1000
MNT_DETACH = 0x2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _bind_mount(source: str, target: str) -> None:
    if _libc().mount(source.encode(), target.encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _unmount(path: str) -> bool:
    """Lazily unmount `path`; False if it was not a mount point."""
    if _libc().umount2(path.encode(), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, os.strerror(err), path)


def stage_files(files: Sequence[StagedFile], staging: Path) -> list[str]:
    """Put each file into `staging` under its name; return how each was staged, one note each.
    Raises HostError when a writable file can be neither linked nor mounted."""
    staging.mkdir(mode=0o755, exist_ok=True)
    notes = []
    for f in files:
        target = staging / f.name
        try:
            os.link(f.source, target, follow_symlinks=True)
            continue
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise HostError(f"cannot stage {f.source} for {f.destination}: {err.strerror}") from None
        if os.geteuid() == 0:
            target.touch(mode=0o644)
            try:
                _bind_mount(f.source, str(target))
                notes.append(f"{f.destination}: {f.source} is on another filesystem: bind-mounted into {staging}")
                continue
            except OSError:
                target.unlink()
        if not f.read_only:
            raise HostError(f"cannot share the writable file {f.source} (for {f.destination}): it is on another "
                            f"filesystem than {staging} and this runtime cannot mount it",
                            hint="use --root on the file's filesystem, or mount it read-only")
        shutil.copy2(f.source, target)
        notes.append(f"{f.destination}: {f.source} is copied (read-only): later changes on the host are not seen")
    return notes


def unstage(staging: Path) -> None:
    """Remove what stage_files made, bind mounts included."""
    if not staging.is_dir():
        return
    for entry in staging.iterdir():
        while _unmount(str(entry)):  # a file mounted twice by a retried create: every layer
            pass
    shutil.rmtree(staging, ignore_errors=True)


def write_pid_file(path: str, pid: int) -> None:
    """Atomically, as runc does: an engine may read it as soon as it exists."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, path)
