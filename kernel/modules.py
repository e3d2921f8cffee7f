"""Kernel modules: index a lib/modules/<release> tree and resolve what a guest must load.

The guest's init loads modules itself with init_module(2), in order and uncompressed,
so there is no modprobe and no modules.dep in the guest: the dependency closure and its
order are computed here, from each module's own `.modinfo` (`depends=`), which is what
depmod reads too. Only the modules actually wanted are opened; scanning the tree reads
file names only.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from microvmc.compiler.hostfiles import HostFiles
from microvmc.errors import KernelError

__all__ = [
    "ModInfo",
    "ModuleTree",
    "ResolvedModule",
    "normalize_name",
    "decompress_module",
    "read_modinfo",
    "scan_modules",
    "resolve_modules",
    "strip_signature",
    "signatures_optional",
]

SIGNATURE_MAGIC = b"~Module signature appended~\n"

# Preferred first when one module exists under several suffixes.
_SUFFIXES = (".ko", ".ko.zst", ".ko.xz", ".ko.gz")
_ELF_MAGIC = b"\x7fELF"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, kw_only=True, slots=True)
class ModInfo:
    name: str
    depends: tuple[str, ...]
    vermagic: str  # "6.1.0-57-amd64 SMP preempt mod_unload modversions "
    softdep_pre: tuple[str, ...] = ()
    softdep_post: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class ModuleTree:
    root: Path  # lib/modules/<release>
    # normalized module name -> path relative to root (read-only mapping)
    modules: Mapping[str, PurePosixPath]
    builtin: frozenset[str]


@dataclass(frozen=True, kw_only=True, slots=True)
class ResolvedModule:
    name: str
    path: PurePosixPath  # relative to ModuleTree.root
    modinfo: ModInfo


def normalize_name(name: str) -> str:
    """The kernel treats '-' and '_' in module names as the same character."""
    return name.replace("-", "_")


def decompress_module(data: bytes, *, path: str) -> bytes:
    """The raw ELF of a .ko, .ko.xz, .ko.zst or .ko.gz, told apart by magic."""
    if data.startswith(_ELF_MAGIC):
        return data
    try:
        if data.startswith(_XZ_MAGIC):
            import lzma

            return lzma.decompress(data, format=lzma.FORMAT_XZ)
        if data.startswith(_ZSTD_MAGIC):
            import zstandard

            # decompressobj, unlike decompress(), needs no content size in the frame header.
            decoder = zstandard.ZstdDecompressor().decompressobj()
            elf = decoder.decompress(data)
            if not decoder.eof:
                raise EOFError("the zstd frame is truncated")
            return elf
        if data.startswith(_GZIP_MAGIC):
            import gzip

            return gzip.decompress(data)
    except Exception as exc:  # lzma, zstd and gzip each raise their own error types
        raise KernelError(f"{path}: cannot decompress the module ({exc})") from None
    raise KernelError(
        f"{path}: not a kernel module (starts with {bytes(data[:4])!r}, not ELF, xz, zstd or gzip)"
    )


def read_modinfo(data: bytes, *, path: str) -> ModInfo:
    """The `.modinfo` of a module file, compressed or not."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    elf = decompress_module(data, path=path)
    try:
        section = ELFFile(io.BytesIO(elf)).get_section_by_name(".modinfo")
        raw = section.data() if section is not None else None
    # Damaged headers can make elftools seek or unpack out of range, not only raise ELFError.
    except (ELFError, struct.error, ValueError, OverflowError) as exc:
        raise KernelError(f"{path}: not a valid ELF kernel module ({exc})") from None
    if raw is None:
        raise KernelError(f"{path}: not a kernel module (no .modinfo section)")
    fields: dict[str, list[str]] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            fields.setdefault(key, []).append(value)

    def first(key: str) -> str:
        return fields.get(key, [""])[0]

    pre, post = _parse_softdeps(fields.get("softdep", []))
    name = first("name") or _name_from_path(PurePosixPath(path).name)
    return ModInfo(
        name=normalize_name(name),
        depends=tuple(normalize_name(dep) for dep in first("depends").split(",") if dep),
        vermagic=first("vermagic"),
        softdep_pre=pre,
        softdep_post=post,
    )


def scan_modules(modules_dir: Path, files: HostFiles | None = None) -> ModuleTree:
    """Index module names under `modules_dir`/kernel and the built-in ones, by name only. `files`:
    what records the looks (compiler/hostfiles.py)."""
    files = files or HostFiles()
    kernel_dir = modules_dir / "kernel"
    if not files.is_dir(str(kernel_dir)):
        raise KernelError(
            f"{modules_dir}: not a kernel modules directory (no kernel/ subdirectory)",
            hint="point it at lib/modules/<release> of the kernel",
        )
    found: dict[str, tuple[int, str]] = {}
    for dirpath, _dirnames, filenames in files.walk(str(kernel_dir)):
        relative_dir = os.path.relpath(dirpath, modules_dir).replace(os.sep, "/")
        for filename in filenames:
            rank = _suffix_rank(filename)
            if rank is None:
                continue
            name = _name_from_path(filename)
            candidate = (rank, f"{relative_dir}/{filename}")
            # Same name twice: the preferred suffix, then the smaller path, wins, whatever
            # order the file system lists them in.
            if name not in found or candidate < found[name]:
                found[name] = candidate
    modules = {name: PurePosixPath(found[name][1]) for name in sorted(found)}
    return ModuleTree(
        root=modules_dir,
        modules=MappingProxyType(modules),
        builtin=_read_builtin(modules_dir / "modules.builtin", files),
    )


def resolve_modules(
    tree: ModuleTree,
    wanted: Sequence[str],
    *,
    release: str,
    read: Callable[[Path], bytes] = Path.read_bytes,
) -> tuple[ResolvedModule, ...]:
    """The modules to load for `wanted`, dependencies first; built-in ones need nothing."""
    import networkx as nx

    graph = nx.DiGraph()
    resolved: dict[str, ResolvedModule] = {}
    # (module, the module that needs it, or None for a wanted one)
    pending = [(normalize_name(name), None) for name in wanted]
    while pending:
        name, needed_by = pending.pop()
        if name in resolved or name in tree.builtin:
            continue
        relative = tree.modules.get(name)
        if relative is None:
            reason = f", which {needed_by!r} depends on" if needed_by else ""
            raise KernelError(
                f"{tree.root}: no module {name!r}{reason} (neither built in nor under kernel/)",
                hint="the kernel does not provide it; check its config or the module name",
            )
        file = tree.root / relative
        modinfo = read_modinfo(read(file), path=str(file))
        if modinfo.vermagic.split(maxsplit=1)[:1] != [release]:
            raise KernelError(
                f"{file}: vermagic {modinfo.vermagic.strip()!r} does not match kernel release {release}",
                hint="the modules directory belongs to another kernel build",
            )
        resolved[name] = ResolvedModule(name=name, path=relative, modinfo=modinfo)
        graph.add_node(name)
        for dependency in modinfo.depends:
            if dependency in tree.builtin:
                continue
            graph.add_edge(dependency, name)
            pending.append((dependency, name))
    try:
        order = list(nx.lexicographical_topological_sort(graph))
    except nx.NetworkXUnfeasible:
        cycle = [edge[0] for edge in nx.find_cycle(graph)]
        loop = " -> ".join([*cycle, cycle[0]])
        raise KernelError(f"{tree.root}: modules depend on each other in a cycle: {loop}") from None
    return tuple(resolved[name] for name in order)


def _suffix_rank(filename: str) -> int | None:
    for rank, suffix in enumerate(_SUFFIXES):
        if filename.endswith(suffix):
            return rank
    return None


def _name_from_path(filename: str) -> str:
    for suffix in _SUFFIXES:
        if filename.endswith(suffix):
            return normalize_name(filename[: -len(suffix)])
    return normalize_name(filename)


def _read_builtin(path: Path, files: HostFiles) -> frozenset[str]:
    # Custom builds without built-in modules may lack the file; it then lists nothing.
    try:
        text = files.read(str(path)).decode("utf-8")
    except FileNotFoundError:
        return frozenset()
    return frozenset(_name_from_path(PurePosixPath(line).name) for line in text.split() if line)


def _parse_softdeps(values: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`softdep=pre: a b post: c` (modprobe.d syntax), possibly several times."""
    pre: list[str] = []
    post: list[str] = []
    target = pre
    for value in values:
        for word in value.split():
            if word == "pre:":
                target = pre
            elif word == "post:":
                target = post
            else:
                target.append(normalize_name(word))
    return tuple(pre), tuple(post)


def strip_signature(data: bytes, *, path: str) -> bytes:
    """The module without its appended signature. The kernel checks a signature it finds even when
    it does not require one, which costs ~80 ms for a virtiofs root's modules under TCG; it loads an
    unsigned module all the same unless signatures are forced (see signatures_optional)."""
    if not data.endswith(SIGNATURE_MAGIC):
        return data
    end = len(data) - len(SIGNATURE_MAGIC)
    # struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], __be32 sig_len
    if end < 12:
        raise KernelError(f"{path}: truncated module signature")
    signer_len, key_id_len = data[end - 12 + 3], data[end - 12 + 4]
    (sig_len,) = struct.unpack(">I", data[end - 4 : end])
    start = end - 12 - sig_len - signer_len - key_id_len
    if start <= 0:
        raise KernelError(f"{path}: module signature of {sig_len} bytes is longer than the module")
    return data[:start]


def signatures_optional(config: str | None, cmdline: Sequence[str] = ()) -> bool:
    """Whether a kernel with this .config text loads unsigned modules: only when the config is
    known and does not force signatures, and the command line does not either."""
    if config is None:
        return False
    if any(p.startswith(("module.sig_enforce=", "lockdown=")) for p in cmdline):
        return False
    lines = set(config.splitlines())
    return "CONFIG_MODULE_SIG_FORCE=y" not in lines
