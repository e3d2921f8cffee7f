"""The lockfile (`app.lock` beside `app.toml`): what a manifest's inputs were, pinned, like Nix's
flake.lock. JSON, keys sorted, two-space indent, so it diffs well and is the same bytes for the same
inputs.

    {"version": 1,
     "images": {"docker.io/library/alpine:3.20": {"digest": "sha256:…", "platforms": {"linux/amd64": "sha256:…"}}},
     "kernel": {"image": "sha256:…", "modules": {"virtio_mmio": "sha256:…", …}, "release": "6.1.0-…"},
     "init": {"source": "sha256:…"},
     "host": {"qemu": "7.2.0", "virtiofsd": "c"}}

`build` and `run` take a registry image's digest from it; `--locked` refuses to go on when any entry
differs from what the manifest resolves to now (the lines say what changed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Lock", "LockError", "lock_path", "render", "parse", "changes", "FORMAT"]

FORMAT = 1


class LockError(Exception):
    """A lockfile that cannot be read; one sentence naming the file."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Lock:
    images: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # source → {digest, platforms}
    kernel: Mapping[str, Any] = field(default_factory=dict)
    init: Mapping[str, Any] = field(default_factory=dict)
    host: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT, "images": dict(self.images), "kernel": dict(self.kernel), "init": dict(self.init),
                "host": dict(self.host)}

    def pins(self) -> dict[str, dict[str, str]]:
        """What backends/images.py takes: source → {"digest": …, platform: manifest digest}."""
        return {source: {"digest": entry["digest"], **entry.get("platforms", {})} for source, entry in self.images.items()}


def lock_path(manifest: str) -> str:
    root, ext = os.path.splitext(manifest)
    return (root if ext == ".toml" else manifest) + ".lock"


def render(lock: Lock) -> str:
    return json.dumps(lock.to_dict(), sort_keys=True, indent=2) + "\n"


def parse(text: str, path: str) -> Lock:
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise LockError(f"{path}: not a lockfile (not JSON: {err})") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT:
        raise LockError(f"{path}: not a version {FORMAT} lockfile")
    for key in ("images", "kernel", "init", "host"):
        if not isinstance(doc.get(key, {}), dict):
            raise LockError(f"{path}: {key} must be a table")
    for source, entry in doc.get("images", {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str) or \
                not isinstance(entry.get("platforms", {}), dict):
            raise LockError(f"{path}: images.{json.dumps(source)} needs a digest and its platforms")
    return Lock(images=doc.get("images", {}), kernel=doc.get("kernel", {}), init=doc.get("init", {}),
                host=doc.get("host", {}))


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, child in value.items():
            out.update(_flatten(child, f"{prefix}.{json.dumps(key) if '.' in key or '/' in key or ':' in key else key}"))
        return out
    return {prefix: value}


def changes(locked: Lock, now: Lock) -> list[str]:
    """What differs between the lockfile and what resolves now, one line each, sorted."""
    old = _flatten(locked.to_dict(), "")
    new = _flatten(now.to_dict(), "")
    lines = []
    for key in sorted(set(old) | set(new)):
        name = key.lstrip(".")
        if key not in new:
            lines.append(f"{name}: locked {old[key]}, no longer used")
        elif key not in old:
            lines.append(f"{name}: {new[key]}, not in the lockfile")
        elif old[key] != new[key]:
            lines.append(f"{name}: locked {old[key]}, now {new[key]}")
    return lines


def from_graph(graph: Any, facts: Any, image: Any) -> Lock:
    """The lock of a compiled manifest: its graph (kernel, modules, init), the host facts and the
    image backends/images.py resolved."""
    nodes = {n.id: n for n in graph.nodes}
    kernel = {"image": "sha256:" + nodes["kernel"].digest}
    modules = nodes.get("modules")
    if modules is not None:
        kernel["release"] = modules.param("release")
        kernel["modules"] = {m["name"]: "sha256:" + m["digest"] for m in modules.param("modules")}
    init_node = nodes.get("init-src") or nodes.get("init.c")
    images = {}
    if image is not None and image.manifest_digest:
        images[image.source] = {"digest": image.digest, "platforms": {image.platform: image.manifest_digest}}
    host = {"qemu": ".".join(map(str, facts.qemu_version))}
    if facts.virtiofsd_flavour:
        host["virtiofsd"] = str(facts.virtiofsd_flavour)
    return Lock(images=images, kernel=kernel, init={"source": "sha256:" + init_node.digest} if init_node else {},
                host=host)
