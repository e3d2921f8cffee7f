"""The compiler's stages in order: load → validate → resolve → plan → emit.

Resolve starts by settling what the manifest leaves to the host (`transport = "auto"`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from microvmc.compiler.emit import Output, emit
from microvmc.compiler.graph import Graph, Sources, choose_transports, resolve, with_name_resolution
from microvmc.compiler.builtin_image import GROUP, PASSWD
from microvmc.compiler.host import HostFacts
from microvmc.compiler.hostfiles import HostFiles
from microvmc.compiler.ociimage import ResolvedImage
from microvmc.compiler.program import apply_image
from microvmc.compiler.launch import LaunchPlan
from microvmc.compiler.load import load
from microvmc.compiler.manifest import Manifest, validate
from microvmc.compiler.plan import plan

__all__ = ["Compiled", "compile_manifest", "read_manifest"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Compiled:
    manifest: Manifest
    graph: Graph
    plan: LaunchPlan
    output: Output


def read_manifest(
    path: str | os.PathLike[str],
    *,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    tty: bool = False,
    publish: Sequence[str] | None = None,
    volumes: Sequence[str] | None = None,
    store: str | None = None,
    files: HostFiles | None = None,
) -> Manifest:
    """load + validate, with command-line overrides applied (`tty`: `run -t`, a pty in the guest;
    `publish`: `run -p` forwards; `volumes`: `run -v` shares and files, never `store` read-write).
    `files`: what records the looks at the host (whether a volume is a file or a directory); pass
    the same one to compile_manifest, so the graph's `observed` has them all."""
    from microvmc.compiler.volumes import apply_file_volumes, with_volumes

    loaded, staged = with_volumes(load(path, cwd=cwd).overridden(argv=argv, env=env, publish=publish),
                                  volumes or (), cwd=cwd or os.getcwd(), store=store, files=files)
    manifest = apply_file_volumes(validate(loaded), staged)
    if tty:
        from dataclasses import replace

        manifest = replace(manifest, process=replace(manifest.process, tty=True))
    return manifest


def compile_manifest(
    manifest: Manifest, *, facts: HostFacts, store: str, sources: Sources = Sources(), hold: bool = False,
    image: ResolvedImage | None = None, files: HostFiles | None = None,
) -> Compiled:
    """`hold`: the program waits for the host's `start` (init/PROTOCOL.md; the OCI runtime's create).
    `image`: what backends/images.py found for the manifest's image (needed for the OCI sources;
    without it the built-in image's users are assumed). `files`: the HostFiles read_manifest used."""
    manifest = apply_image(manifest, image or ResolvedImage(kind=str(manifest.image.source), passwd=PASSWD, group=GROUP))
    manifest = with_name_resolution(choose_transports(manifest, facts, image))
    graph = resolve(manifest, facts, store, sources, hold=hold, image=image, files=files)
    launch = plan(manifest, graph, facts)
    return Compiled(manifest=manifest, graph=graph, plan=launch, output=emit(launch, graph, store))
