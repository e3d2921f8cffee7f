"""Build outputs: from a manifest to the store path of its output, and the ./result link.

The entry point of `build` and `run`. An unchanged manifest on an unchanged host is answered from
the evaluation cache (backends/evalcache.py) without importing the compiler at all; only a miss
compiles (compiler/) and builds what the store lacks (backends/build.py).
"""

from __future__ import annotations

import os

from microvmc.errors import BuildError

TYPE_CHECKING = False  # (not typing's: importing typing is ~3 ms of a `run` before QEMU starts)
if TYPE_CHECKING:
    from typing import Any, Mapping, Sequence

    from microvmc.backends.evalcache import CacheKey
    from microvmc.compiler.host import HostFacts
    from microvmc.compiler.launch import LaunchPlan

__all__ = ["build", "cached", "link_result"]


def build(manifest: str, *, argv: Sequence[str] | None, env: Mapping[str, str] | None, store: str,
          facts: HostFacts, environ: Mapping[str, str] = os.environ, locked: bool = False,
          progress: Any = None, tty: bool = False, publish: Sequence[str] = (),
          volumes: Sequence[str] = ()) -> tuple[str, LaunchPlan]:
    """The output path and plan of a manifest, compiling and building only what changed.

    An unchanged manifest on an unchanged host is answered from the evaluation cache
    (backends/evalcache.py) without compiling at all. A lockfile beside the manifest pins its
    image; `locked`: it must exist and match what the manifest resolves to now."""
    from microvmc.backends import evalcache

    key = _cache_key(manifest, argv=argv, env=env, store=store, facts=facts, locked=locked, tty=tty, publish=publish,
                     volumes=volumes)
    hit = evalcache.lookup(key, environ)
    if hit is not None:
        return hit.output, hit.plan
    compiled, image, lock_file = compile_with_image(manifest, argv=argv, env=env, store=store, facts=facts,
                                                    environ=environ, locked=locked, progress=progress, tty=tty,
                                                    publish=publish, volumes=volumes)
    from microvmc.backends.build import BUILDERS, realize
    from microvmc.compiler.graph import Builder

    output = realize(compiled)
    graph = compiled.graph
    sources = [*image.inputs, lock_file]  # a re-pulled tag, a changed layout or lockfile: compile again
    requires = [n.path for n in graph.nodes if n.builder in BUILDERS or n.builder in (Builder.IMAGE, Builder.KERNEL)]
    evalcache.record(key, files=compiled.manifest.files, sources=sources, observed=graph.observed,
                     requires=requires, output=output, environ=environ)
    return output, compiled.plan


def cached(manifest: str, *, argv: Sequence[str] | None, env: Mapping[str, str] | None, store: str,
           facts: HostFacts, environ: Mapping[str, str] = os.environ, locked: bool = False, tty: bool = False,
           publish: Sequence[str] = (), volumes: Sequence[str] = ()) -> tuple[str, dict[str, Any]] | None:
    """What `build` answers from the evaluation cache, (the output path, its plan in JSON form),
    without importing the compiler or the plan's types; None: `build` has to compile."""
    from microvmc.backends import evalcache

    key = _cache_key(manifest, argv=argv, env=env, store=store, facts=facts, locked=locked, tty=tty, publish=publish,
                     volumes=volumes)
    return evalcache.lookup_json(key, environ)


def _cache_key(manifest: str, *, argv: Sequence[str] | None, env: Mapping[str, str] | None, store: str,
               facts: HostFacts, locked: bool, tty: bool, publish: Sequence[str], volumes: Sequence[str]) -> CacheKey:
    from microvmc.backends import evalcache

    return evalcache.CacheKey(manifest=os.path.abspath(manifest), argv=tuple(argv or ()),
                              env=tuple(sorted((env or {}).items())), store=store, facts=facts, locked=locked, tty=tty,
                              publish=tuple(publish), volumes=tuple(volumes), cwd=os.getcwd() if volumes else "")


def compile_with_image(manifest: str, *, argv: Sequence[str] | None, env: Mapping[str, str] | None, store: str,
                       facts: HostFacts, environ: Mapping[str, str] = os.environ, locked: bool = False,
                       update: bool = False, progress: Any = None, notes: list[str] | None = None,
                       tty: bool = False, publish: Sequence[str] = (), volumes: Sequence[str] = ()):
    """(compiled, the image it uses, the lockfile's path): the manifest read, its image fetched and
    unpacked as needed (pinned by the lockfile unless `update`), then compiled."""
    from microvmc.backends.images import resolve_image
    from microvmc.compiler import lockfile
    from microvmc.compiler.hostfiles import HostFiles
    from microvmc.compiler.pipeline import compile_manifest, read_manifest

    files = HostFiles()  # one for the whole compile: the evaluation cache checks every look it made
    value = read_manifest(manifest, argv=argv, env=env, tty=tty, publish=publish, volumes=volumes, store=store,
                          files=files)
    lock_file = lockfile.lock_path(os.path.abspath(manifest))
    lock = read_lock(lock_file)
    if locked and lock is None:
        raise BuildError(f"{display(lock_file)} is missing, and --locked needs it",
                         hint=f"make it with: microvmc lock {manifest}")
    pins = lock.pins() if lock is not None and not update else None
    image = resolve_image(value, store=store, pins=pins, environ=environ, progress=progress, notes=notes,
                          refresh=update)
    compiled = compile_manifest(value, facts=facts, store=store, image=image, files=files)
    if locked:
        assert lock is not None
        now = lockfile.from_graph(compiled.graph, facts, image)
        stale = lockfile.changes(lock, now)
        if stale:
            raise BuildError(f"{display(lock_file)} is stale: " + "; ".join(stale),
                             hint=f"refresh it with: microvmc lock --update {manifest}")
    return compiled, image, lock_file


def read_lock(path: str):
    from microvmc.compiler import lockfile

    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        return None
    try:
        return lockfile.parse(text, display(path))
    except lockfile.LockError as err:
        raise BuildError(str(err)) from None


def display(path: str) -> str:
    from microvmc.compiler.load import display_path

    return display_path(path)


def link_result(target: str, link: str) -> None:
    """Point `link` (./result) at `target`, replacing an older link atomically."""
    if os.path.lexists(link) and not os.path.islink(link):
        raise BuildError(f"{link} exists and is not a symbolic link; not replacing it", hint="use -o to choose another name")
    tmp = f"{link}.tmp-{os.getpid()}"
    os.symlink(target, tmp)
    os.replace(tmp, link)

