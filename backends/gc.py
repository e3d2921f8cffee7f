"""Garbage collection of the store: remove what no result link, lockfile or live run uses.

Roots are registered as they are made: `build` records each result link it makes, and `lock` (and
any build that read a lockfile) records the lockfile, as symbolic links in `<store>/gcroots/`. A root
whose link or lockfile is gone, or now points elsewhere, no longer counts. Live runs are found from
their records (a run that has not ended and whose process is alive). What a root keeps: its output,
every store path its plan's graph names, and each image's blobs (manifest, config, layers) and
unpacked root filesystem; a lockfile keeps its pinned images.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from microvmc.backends.blobs import BlobStore
from microvmc.backends.images import records, record_path, rootfs_path
from microvmc.backends.unpack import Ownership
from microvmc.compiler.ociimage import ImageError, ImageIndex, ImageManifest, parse_manifest

__all__ = ["register_root", "collect", "Collected"]

_STORE_ENTRY = re.compile(r"[a-z2-7]{32}-.+")
STALE_TEMP = 24 * 3600  # a build's or unpack's temporary directory older than this was abandoned


def _roots_dir(store: str) -> Path:
    return Path(store, "gcroots")


def register_root(store: str, path: str) -> None:
    """Record `path` (a result link or a lockfile, made absolute) as a root of the store."""
    path = os.path.abspath(path)
    folder = _roots_dir(store)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / hashlib.sha256(path.encode()).hexdigest()[:32]
        if os.path.islink(link) and os.readlink(link) == path:
            return
        tmp = folder / f".tmp-{os.getpid()}-{link.name}"
        os.symlink(path, tmp)
        os.replace(tmp, link)
    except OSError:
        pass  # an unregistered root only means gc may remove what it names


@dataclass
class Collected:
    kept: set[str] = field(default_factory=set)  # store paths kept
    removed_paths: list[str] = field(default_factory=list)
    removed_blobs: list[str] = field(default_factory=list)
    removed_records: list[str] = field(default_factory=list)
    freed: int = 0


def _size(path: str) -> int:
    total = 0
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            return os.lstat(path).st_size
        for base, dirs, files in os.walk(path):
            for name in files + dirs:
                try:
                    total += os.lstat(os.path.join(base, name)).st_size
                except OSError:
                    pass
    except OSError:
        pass
    return total


def _live_outputs(state_roots: Iterable[Path]) -> set[str]:
    """Outputs of runs whose monitor still lives (it holds the run's lock)."""
    from microvmc.backends.runstore import RunStore

    out = set()
    for root in state_roots:
        for run in RunStore(root).all():
            output = run.record().get("output")
            if isinstance(output, str) and run.alive():
                out.add(os.path.realpath(output))
    return out


def _root_targets(store: str) -> tuple[set[str], list[str]]:
    """(outputs that result links point at, lockfiles that exist)."""
    outputs, locks = set(), []
    folder = _roots_dir(store)
    if not folder.is_dir():
        return outputs, locks
    real_store = os.path.realpath(store)
    for link in folder.iterdir():
        if not link.is_symlink():
            continue
        target = os.readlink(link)
        if target.endswith(".lock") and os.path.isfile(target):
            locks.append(target)
            continue
        if os.path.islink(target):
            pointed = os.path.realpath(target)
            if os.path.dirname(pointed) == real_store and os.path.isdir(pointed):
                outputs.add(pointed)
                continue
        link.unlink(missing_ok=True)  # the root is gone or points elsewhere now
    return outputs, locks


def _image_blobs(blobs: BlobStore, digest: str) -> set[str]:
    """The digest and everything it names, through indexes too."""
    keep = {digest}
    try:
        doc = parse_manifest(blobs.read(digest))
    except (OSError, ImageError):
        return keep
    if isinstance(doc, ImageIndex):
        for m in doc.manifests:
            if blobs.has(m.digest):
                keep |= _image_blobs(blobs, m.digest)
    elif isinstance(doc, ImageManifest):
        keep |= {doc.config.digest, *(layer.digest for layer in doc.layers)}
    return keep


def collect(store: str, *, environ: Mapping[str, str] = os.environ, dry_run: bool = False,
            extra_state: Iterable[Path] = ()) -> Collected:
    from microvmc.backends.runstore import state_root

    result = Collected()
    blobs = BlobStore(store)
    outputs, locks = _root_targets(store)
    outputs |= {o for o in _live_outputs([state_root(environ) / "runs", *extra_state]) if os.path.dirname(o) == os.path.realpath(store)}
    keep_paths: set[str] = set()
    keep_blobs: set[str] = set()
    manifests: set[str] = set()
    for output in outputs:
        keep_paths.add(os.path.basename(output))
        try:
            graph = json.loads(Path(output, "plan.json").read_text()).get("graph", {})
        except (OSError, ValueError):
            continue
        for node in graph.get("nodes", []):
            path = node.get("path") or ""
            if os.path.dirname(os.path.realpath(path)) == os.path.realpath(store):
                keep_paths.add(os.path.basename(path))
            params = node.get("params") or {}
            if node.get("builder") == "image":
                for key in ("digest", "manifest"):
                    if isinstance(params.get(key), str) and params[key].startswith("sha256:"):
                        keep_blobs |= _image_blobs(blobs, params[key])
                if isinstance(params.get("manifest"), str):
                    manifests.add(params["manifest"])
    for lock in locks:
        try:
            doc = json.loads(Path(lock).read_text())
        except (OSError, ValueError):
            continue
        for entry in (doc.get("images") or {}).values():
            if not isinstance(entry, dict):
                continue
            for digest in [entry.get("digest"), *(entry.get("platforms") or {}).values()]:
                if isinstance(digest, str) and digest.startswith("sha256:"):
                    keep_blobs |= _image_blobs(blobs, digest)
            for manifest in (entry.get("platforms") or {}).values():
                if isinstance(manifest, str):
                    manifests.add(manifest)
                    for ownership in Ownership:
                        keep_paths.add(os.path.basename(rootfs_path(store, manifest, ownership)))
    result.kept = keep_paths

    now = time.time()
    for entry in sorted(os.scandir(store), key=lambda e: e.name) if os.path.isdir(store) else []:
        if entry.name.startswith(".tmp-"):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < STALE_TEMP:
                    continue  # a build in progress
            except OSError:
                continue
        elif not _STORE_ENTRY.fullmatch(entry.name) or entry.name in keep_paths:
            continue
        result.freed += _size(entry.path)
        result.removed_paths.append(entry.path)
        if not dry_run:
            _remove(entry.path)
    for digest in sorted(blobs.digests()):
        if digest in keep_blobs:
            continue
        path = blobs.path(digest)
        result.freed += _size(str(path))
        result.removed_blobs.append(digest)
        if not dry_run:
            path.unlink(missing_ok=True)
    if not dry_run:
        for leftover in blobs.leftovers():
            if now - leftover.stat().st_mtime > STALE_TEMP or leftover.name.endswith(".lock"):
                leftover.unlink(missing_ok=True)
    for record in records(store):
        if any(m in manifests for _, m in record.manifests):
            continue
        result.removed_records.append(record.source)
        if not dry_run:
            record_path(store, record.source).unlink(missing_ok=True)
            for _, m in record.manifests:
                Path(store, "images", "used", m.split(":", 1)[1]).unlink(missing_ok=True)
    return result


def _remove(path: str) -> None:
    def writable(func, p, _):  # a read-only directory of an image (e.g. 0555) cannot lose its entries
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=writable)
    else:
        os.unlink(path)
