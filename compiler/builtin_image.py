"""The built-in image's layout: what the busybox root filesystem contains.

The builder (backends/build.py) makes these directories; validation (compiler/manifest.py) uses the
same list to tell whether a share can be mounted on a read-only built-in root, where init cannot
create a missing mount point.
"""

from __future__ import annotations

__all__ = ["DIRECTORIES", "APPLET_DIRECTORIES", "PASSWD", "GROUP", "has_directory"]

# (path, mode), made empty in the image.
DIRECTORIES: tuple[tuple[str, int], ...] = (
    ("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777), ("run", 0o755), ("root", 0o700),
    ("etc", 0o755), ("mnt", 0o755), ("home", 0o755), ("var/tmp", 0o1777),
)
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
# Where `busybox --list-full` puts its applet links.
APPLET_DIRECTORIES = ("bin", "sbin", "usr/bin", "usr/sbin")


def has_directory(path: str) -> bool:
    """Whether `path` (absolute, normalized) is a directory of the built-in image."""
    if path == "/":
        return True
    rel = path.lstrip("/")
    known = {d for d, _ in DIRECTORIES} | set(APPLET_DIRECTORIES)
    return any(d == rel or d.startswith(rel + "/") for d in known)
