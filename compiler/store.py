"""The content-addressed store: where built things live, named by the hash of what went into them.

A store path is `<root>/<32 base32 chars of sha256>-<name>`, like Nix's: the hash covers the builder,
its parameters and the hashes of its inputs, so an unchanged input rebuilds nothing and a changed one
can never be confused with the old output. Outputs are built aside and renamed into place
(backends/build.py), so a reader never sees half an output and concurrent builds cannot corrupt it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TYPE_CHECKING = False  # (not typing's: importing typing is ~3 ms of a `run` before QEMU starts)
if TYPE_CHECKING:
    from typing import Any, Mapping

__all__ = ["default_store_root", "digest", "file_digest", "sha256", "store_path"]

SMALL = 1 << 20  # bytes up to which `sha256` hashes without OpenSSL


def default_store_root(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get("MICROVMC_STORE"):
        return Path(environ["MICROVMC_STORE"]).absolute()
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "microvmc", "store").absolute()


def digest(value: Any) -> str:
    """sha256 (hex) of a JSON-serializable value, canonically encoded."""
    # surrogateescape: a command-line argument may carry bytes that are not UTF-8 (as os.fsdecode gives them)
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
    return sha256(data).hexdigest()


def sha256(data: bytes = b"", *, size: int | None = None):
    """hashlib.sha256(data), with Python's own sha256 when `size` (default: len(data)) is below SMALL:
    importing hashlib loads OpenSSL, ~2.5 ms of a `run` before QEMU starts (the cache key, the
    manifest's digest), and OpenSSL's is only faster on large data (6x)."""
    if (len(data) if size is None else size) < SMALL:
        try:
            from _sha256 import sha256 as builtin
        except ImportError:  # (a Python built without it)
            pass
        else:
            return builtin(data)
    import hashlib

    return hashlib.sha256(data)


def file_digest(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        h = sha256(size=os.fstat(f.fileno()).st_size)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def store_path(root: str | os.PathLike[str], hexdigest: str, name: str) -> str:
    import base64  # (where it is used: `microvmc run` imports this module before it starts QEMU)

    short = base64.b32encode(bytes.fromhex(hexdigest)).decode("ascii").lower()[:32]
    return os.path.join(os.fspath(root), f"{short}-{name}")
