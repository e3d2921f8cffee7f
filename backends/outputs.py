"""Build outputs: from a manifest to the store path of its output, and the ./result link.

The entry point of `build` and `run`. An unchanged manifest on an unchanged host is answered from
the evaluation cache (backends/evalcache.py) without importing the compiler at all; only a miss
compiles (compiler/) and builds what the store lacks (backends/build.py).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from microvmc.compiler.host import HostFacts
from microvmc.compiler.launch import LaunchPlan
from microvmc.errors import BuildError

__all__ = ["build", "link_result"]


def build(manifest: str, *, argv: Sequence[str] | None, env: Mapping[str, str] | None, store: str,
          facts: HostFacts, environ: Mapping[str, str] = os.environ) -> tuple[str, LaunchPlan]:
    """The output path and plan of a manifest, compiling and building only what changed.

    An unchanged manifest on an unchanged host is answered from the evaluation cache
    (backends/evalcache.py) without compiling at all."""
    from microvmc.backends import evalcache

    key = evalcache.CacheKey(manifest=os.path.abspath(manifest), argv=tuple(argv or ()),
                             env=tuple(sorted((env or {}).items())), store=store, facts=facts)
    hit = evalcache.lookup(key, environ)
    if hit is not None:
        return hit.output, hit.plan
    from microvmc.backends.build import BUILDERS, realize
    from microvmc.compiler.graph import Builder
    from microvmc.compiler.pipeline import compile_manifest, read_manifest

    compiled = compile_manifest(read_manifest(manifest, argv=argv, env=env), facts=facts, store=store)
    output = realize(compiled)
    graph = compiled.graph
    sources = [n.path for n in graph.nodes if n.builder is Builder.SOURCE and n.path]
    modules = graph.node("modules")
    modules_dir = modules.location("modules_dir")
    sources += [modules_dir] + [os.path.join(modules_dir, m["path"]) for m in modules.param("modules")]
    requires = [n.path for n in graph.nodes if n.builder in BUILDERS]
    evalcache.record(key, files=compiled.manifest.files, sources=sources, requires=requires, output=output,
                     environ=environ)
    return output, compiled.plan


def link_result(target: str, link: str) -> None:
    """Point `link` (./result) at `target`, replacing an older link atomically."""
    if os.path.lexists(link) and not os.path.islink(link):
        raise BuildError(f"{link} exists and is not a symbolic link; not replacing it", hint="use -o to choose another name")
    tmp = f"{link}.tmp-{os.getpid()}"
    os.symlink(target, tmp)
    os.replace(tmp, link)

