"""A cache of compiled plans: `run` or `build` of an unchanged manifest skips compiling.

Like Nix's evaluation cache. An entry is keyed by what the command asked for (the manifest's path,
the command-line overrides, the store, the host facts, microvmc's own code) and records everything
else the compiler read: every manifest file by content, everything resolve looked at on the host and
what it saw (compiler/hostfiles.py: whether a path is a file or a directory, a directory's entries, a
file's fingerprint), and a fingerprint of what the image and lockfile came from. It is used only
when every one of these looks gives the same answer again and the output and the store paths it
needs are all present; otherwise the manifest is compiled afresh. A hit imports none of jsonschema, networkx and elftools, which is most of a cached build's
time (bench/cached_build.py), and which a short `run` cannot afford (bench/run_true.py).

An unreadable or stale entry is never an error, only a miss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from microvmc._value import Value
from microvmc.compiler.store import file_digest, sha256

TYPE_CHECKING = False  # (not typing's: importing typing is ~3 ms of a `run` before QEMU starts)
if TYPE_CHECKING:
    from typing import Any, Mapping, Sequence

    from microvmc.compiler.host import HostFacts
    from microvmc.compiler.hostfiles import Observation
    from microvmc.compiler.launch import LaunchPlan

__all__ = ["CacheKey", "Hit", "lookup", "lookup_json", "record"]

FORMAT = 2
_CODE_PACKAGES = ("microvmc", "microvmc.compiler", "microvmc.backends", "microvmc.kernel", "microvmc.init",
                  "microvmc.schemas")


class CacheKey(Value):
    """(Not a dataclass: `microvmc run` imports this before it starts QEMU, microvmc/_value.py.)"""

    __slots__ = ("manifest", "argv", "env", "store", "facts", "locked", "tty", "publish", "volumes", "cwd")
    manifest: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    store: str
    facts: HostFacts
    locked: bool
    tty: bool
    publish: tuple[str, ...]
    volumes: tuple[str, ...]
    cwd: str

    def __init__(self, *, manifest: str, argv: tuple[str, ...], env: tuple[tuple[str, str], ...], store: str,
                 facts: HostFacts,
                 locked: bool = False,  # --locked: a hit must have been checked against the lockfile too
                 tty: bool = False,  # run -t: the program gets a pty
                 publish: tuple[str, ...] = (),  # run -p: forwards, as written
                 volumes: tuple[str, ...] = (),  # run -v: as written, relative to `cwd`
                 cwd: str = "") -> None:  # (manifest: an absolute path)
        self._init(locals())

    def digest(self) -> str:
        value = {
            "format": FORMAT,
            "manifest": self.manifest,
            "argv": list(self.argv),
            "env": [list(e) for e in self.env],
            "store": self.store,
            "facts": self.facts.to_dict(),
            **({"locked": True} if self.locked else {}),
            **({"tty": True} if self.tty else {}),
            **({"publish": list(self.publish)} if self.publish else {}),
            **({"volumes": list(self.volumes), "cwd": self.cwd} if self.volumes else {}),
            "code": _code_fingerprint(),
        }
        return sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class Hit(Value):
    __slots__ = ("output", "plan")
    output: str
    plan: LaunchPlan

    def __init__(self, *, output: str, plan: LaunchPlan) -> None:
        self._init(locals())


def _cache_dir(environ: Mapping[str, str]) -> Path:
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "microvmc", "eval")


def _code_fingerprint() -> list[Any]:
    """microvmc's own files (sources, schema, the init sources) by size and mtime: a new version, or an edit
    in a development checkout, invalidates every entry."""
    import importlib

    out = []
    for name in _CODE_PACKAGES:
        package = importlib.import_module(name)  # their __init__ files are empty: cheap
        for location in getattr(package, "__path__", []):
            for entry in sorted(os.scandir(location), key=lambda e: e.name):
                if entry.is_file() and entry.name.endswith((".py", ".json", ".c", ".h", ".in")):
                    st = entry.stat()
                    out.append([name, entry.name, st.st_size, st.st_mtime_ns])
    return out


def _fingerprint(path: str) -> list[Any] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if os.path.isdir(path):
        return ["dir"]
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _file_sha(path: str) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None


def lookup(key: CacheKey, environ: Mapping[str, str] = os.environ) -> Hit | None:
    found = lookup_json(key, environ)
    if found is None:
        return None
    from microvmc.compiler.launch import LaunchPlan

    output, plan = found
    try:
        return Hit(output=output, plan=LaunchPlan.from_dict(plan))
    except (ValueError, KeyError, TypeError):
        return None


def lookup_json(key: CacheKey, environ: Mapping[str, str] = os.environ) -> tuple[str, dict[str, Any]] | None:
    """(the output, its plan in JSON form: `LaunchPlan.to_dict()`) of a hit, without the plan's
    types (a run starts QEMU from it before it imports them)."""
    from microvmc.compiler.hostfiles import Observation

    entry_path = _cache_dir(environ) / f"{key.digest()}.json"
    try:
        entry = json.loads(entry_path.read_text())
        if any(_file_sha(f) != sha for f, sha in entry["files"].items()):
            return None
        if any(_fingerprint(p) != fp for p, fp in entry["sources"].items()):
            return None
        if not all(Observation.from_list(o).holds() for o in entry["observed"]):
            return None
        if not all(os.path.isdir(p) for p in [entry["output"], *entry["requires"]]):
            return None
        plan = json.loads(Path(entry["output"], "plan.json").read_text())["plan"]
        if not isinstance(plan, dict):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry["output"], plan


def record(key: CacheKey, *, files: Sequence[str], sources: Sequence[str], observed: Sequence[Observation],
           requires: Sequence[str], output: str, environ: Mapping[str, str] = os.environ) -> None:
    """Remember a compiled output: `files` by content, `sources` by fingerprint, `observed` as seen
    while compiling. Written aside and renamed, so a reader never sees half an entry."""
    entry = {
        "files": {f: _file_sha(f) for f in files},
        "sources": {p: _fingerprint(p) for p in sources},
        "observed": [o.to_list() for o in observed],
        "requires": list(requires),
        "output": output,
    }
    directory = _cache_dir(environ)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{key.digest()}.json"
        tmp = target.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(entry, sort_keys=True, indent=1))
        os.replace(tmp, target)
    except OSError:
        pass  # a cache that cannot be written only costs time
