"""The content-addressed store: where built things live, named by the hash of what went into them.

A store path is `<root>/<32 base32 chars of sha256>-<name>`, like Nix's: the hash covers the builder,
its parameters and the hashes of its inputs, so an unchanged input rebuilds nothing and a changed one
can never be confused with the old output. Outputs are built aside and renamed into place
(backends/build.py), so a reader never sees half an output and concurrent builds cannot corrupt it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

TYPE_CHECKING = False  # (not typing's: importing typing is ~3 ms of a `run` before QEMU starts)
if TYPE_CHECKING:
    from typing import Any, Mapping

__all__ = ["default_store_root", "digest", "file_digest", "store_path"]


def default_store_root(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get("MICROVMC_STORE"):
        return Path(environ["MICROVMC_STORE"]).absolute()
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "microvmc", "store").absolute()


def digest(value: Any) -> str:
    """sha256 (hex) of a JSON-serializable value, canonically encoded."""
    # surrogateescape: a command-line argument may carry bytes that are not UTF-8 (as os.fsdecode gives them)
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def store_path(root: str | os.PathLike[str], hexdigest: str, name: str) -> str:
    import base64  # (where it is used: `microvmc run` imports this module before it starts QEMU)

    short = base64.b32encode(bytes.fromhex(hexdigest)).decode("ascii").lower()[:32]
    return os.path.join(os.fspath(root), f"{short}-{name}")
