"""load: manifest files → one merged document, with the file each value came from.

Composition, in the Nix spirit: `imports = [...]` names manifests (relative to the importing file)
that are merged in order, then the importing file on top. Tables merge key by key, recursively;
every other value (strings, numbers, arrays) is replaced whole by the later file. Relative paths are
resolved against the file that wrote them, before merging, so an imported manifest means the same
thing wherever it is imported from. An import cycle is an error that shows the cycle.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from microvmc.errors import ManifestError, Problem

__all__ = ["Loaded", "load", "display_path", "key_path", "clip", "parse_publish", "publish_origin",
           "MAX_MANIFEST_BYTES", "MAX_DEPTH"]

# Keys whose values are host paths, relative to the file they are written in. "*" matches any key.
PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("image", "path"),
    ("kernel", "image"),
    ("kernel", "modules"),
    ("shares", "*", "host"),
)

# What a manifest may be: every stage after load walks the document recursively, and reads it whole.
MAX_MANIFEST_BYTES = 4 << 20  # above the 2 MiB of argv and env execve takes
MAX_DEPTH = 32  # the schema's deepest key is network.forwards[i].host, at depth 4

KeyPath = tuple[str | int, ...]
COMMAND_LINE = "command line"  # the origin of -e and -- overrides, in messages
PUBLISH_SYNTAX = "[HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|udp]"


def publish_origin(text: str) -> str:
    """The origin of a forward given as `run -p TEXT`, in messages and in launch.sh."""
    return f"-p {text}"


def parse_publish(text: str) -> dict[str, Any]:
    """`-p [HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|udp]` (docker's syntax) → a network.forwards entry.
    The host address is loopback unless given (docker's default is every address). Only the syntax
    is checked here; ranges, duplicates and the mode are validation's, as for the manifest's own."""
    def bad(why: str) -> ManifestError:
        return ManifestError([Problem(publish_origin(text), "", f"{why}; expected {PUBLISH_SYNTAX}")])

    from microvmc.compiler.manifest import schema_node  # (manifest imports this module)

    protocols = schema_node(("network", "forwards", 0, "protocol"))["enum"]  # and its default is the schema's
    spec, slash, protocol = text.partition("/")
    if slash and protocol not in protocols:
        raise bad(f"{json.dumps(protocol)} is not {' or '.join(protocols)}")
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise bad("a host port and a guest port are both needed" if len(parts) == 1 else "too many ':'")
    *address, host, guest = parts
    for port in (host, guest):
        if not port:
            raise bad("a port is empty (a random host port is not supported)")
        if "-" in port:
            raise bad(f"{json.dumps(port)}: port ranges are not supported")
        if not port.isascii() or not port.isdigit():
            raise bad(f"{json.dumps(port)} is not a port number")
    forward: dict[str, Any] = {"host": int(host), "guest": int(guest), **({"protocol": protocol} if slash else {})}
    if address:
        if not address[0]:
            raise bad("the host address is empty")
        forward["host_address"] = address[0]
    return forward


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


SHOWN_MAX = 100  # characters of one value or key that a message shows


def clip(text: str, limit: int = SHOWN_MAX) -> str:
    """`text` cut to `limit` characters, with "..." saying so: a message stays one readable line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_path(path: KeyPath) -> str:
    """("shares", "data", "host") → "shares.data.host", as TOML writes it: list indexes as [i],
    keys that are not bare quoted ("process.env.\"A=B\"")."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            out += ("." if out else "") + clip(text)
    return out


def display_path(path: str | os.PathLike[str], cwd: str | None = None) -> str:
    """A path as a person wants to read it in a message: relative when under the working directory."""
    path = os.fspath(path)
    try:
        rel = os.path.relpath(path, cwd or os.getcwd())
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


@dataclass(frozen=True, kw_only=True, slots=True)
class Loaded:
    data: dict[str, Any]  # the merged document; treat as read-only
    origins: dict[KeyPath, str]  # key path of every value → display path of the file that set it
    files: tuple[str, ...]  # absolute paths of every file read, in merge order
    root: str  # display path of the manifest asked for

    def overridden(self, *, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                   publish: Sequence[str] | None = None) -> "Loaded":
        """The document with the command line's argv, environment entries and forwards (`-p`, after
        the manifest's) on top, so they are validated like the rest; a problem in them is reported as
        the command line's."""
        process = dict(self.data.get("process") or {}) if isinstance(self.data.get("process"), dict) else {}
        origins = dict(self.origins)
        data = dict(self.data)
        if publish:
            network = dict(data["network"]) if isinstance(data.get("network"), dict) else {}
            forwards = list(network["forwards"]) if isinstance(network.get("forwards"), list) else []
            if not forwards:  # a problem with the forwards as a whole (mode "none") names the first -p
                origins[("network", "forwards")] = publish_origin(publish[0])
            problems = []
            for text in publish:
                try:
                    forwards.append(parse_publish(text))
                except ManifestError as err:
                    problems += err.problems
                    continue
                where = ("network", "forwards", len(forwards) - 1)
                origins.update({where: publish_origin(text),
                                **{(*where, key): publish_origin(text) for key in forwards[-1]}})
            if problems:
                raise ManifestError(problems)
            data["network"] = {**network, "forwards": forwards}
        if argv:
            process["argv"] = list(argv)
            origins.update({("process", "argv"): COMMAND_LINE, **{("process", "argv", i): COMMAND_LINE for i in range(len(argv))}})
        if env:
            process["env"] = {**(process.get("env") if isinstance(process.get("env"), dict) else {}), **env}
            origins.update({("process", "env", name): COMMAND_LINE for name in env})
        return replace(self, data={**data, "process": process}, origins=origins)

    def origin(self, path: KeyPath) -> str:
        """The file that set `path`, or the closest enclosing value, or the root manifest."""
        for n in range(len(path), 0, -1):
            found = self.origins.get(tuple(path[:n]))
            if found:
                return found
        return self.root


def _read_toml(path: Path, shown: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    def problem(message: str) -> ManifestError:
        return ManifestError([Problem(shown, "", message)])

    try:
        with open(path, "rb") as f:  # at most one byte past the limit: /dev/zero is not read forever
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise problem("the file does not exist") from None
    except IsADirectoryError:
        raise problem("is a directory, not a manifest") from None
    except OSError as err:
        raise problem(f"cannot be read: {err.strerror}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise problem(f"is larger than {MAX_MANIFEST_BYTES // (1 << 20)} MiB, which no manifest needs")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise problem(f"is not UTF-8 (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise problem(f"is not valid TOML: {err}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise problem(f"nests tables or lists more than {MAX_DEPTH} deep") from None
    if _depth(doc) > MAX_DEPTH:
        raise problem(f"nests tables or lists more than {MAX_DEPTH} deep")
    return doc


def _depth(value: Any) -> int:
    """How deeply tables and lists nest in `value`, without recursion (every later stage recurses)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH and isinstance(node, (dict, list)):
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _resolve_paths(doc: dict[str, Any], base: Path) -> None:
    def walk(node: Any, pattern: tuple[str, ...]) -> None:
        if not isinstance(node, dict) or not pattern:
            return
        head, rest = pattern[0], pattern[1:]
        keys = list(node) if head == "*" else [head] if head in node else []
        for key in keys:
            if rest:
                walk(node[key], rest)
            elif isinstance(node[key], str) and node[key]:
                node[key] = os.path.normpath(os.path.join(base, os.path.expanduser(node[key])))

    for pattern in PATH_KEYS:
        walk(doc, pattern)


def _leaves(node: Any, prefix: KeyPath) -> list[KeyPath]:
    if isinstance(node, dict) and node:
        out: list[KeyPath] = [prefix] if prefix else []
        for key, value in node.items():
            out.extend(_leaves(value, (*prefix, key)))
        return out
    return [prefix]


def _merge(
    base: dict[str, Any],
    origins: dict[KeyPath, str],
    top: dict[str, Any],
    top_origins: dict[KeyPath, str],
    prefix: KeyPath = (),
) -> dict[str, Any]:
    """Merge `top` over `base`; `origins` (of base) is updated in place from `top_origins`."""
    merged = dict(base)
    for key, value in top.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], origins, value, top_origins, path)
            continue
        for stale in [p for p in origins if p[: len(path)] == path]:
            del origins[stale]
        merged[key] = value
        origins.update((p, f) for p, f in top_origins.items() if p[: len(path)] == path)
    return merged


def load(path: str | os.PathLike[str], *, cwd: str | None = None) -> Loaded:
    """Read a manifest and everything it imports; raise ManifestError on any problem."""
    cwd = cwd or os.getcwd()
    root = Path(os.path.normpath(os.path.join(cwd, os.fspath(path))))
    files: list[str] = []

    def visit(
        file: Path, stack: tuple[Path, ...], importer: tuple[str, KeyPath] | None
    ) -> tuple[dict[str, Any], dict[KeyPath, str]]:
        shown = display_path(file, cwd)
        if file in stack:
            cycle = " → ".join(display_path(p, cwd) for p in (*stack[stack.index(file):], file))
            where, key = importer or (shown, ())
            raise ManifestError([Problem(where, key_path(key), f"import cycle: {cycle}")])
        if importer and not file.is_file():
            where, key = importer
            what = "is a directory, not a manifest" if file.is_dir() else "does not exist"
            raise ManifestError([Problem(where, key_path(key), f"{json.dumps(shown)} {what}")])
        doc = _read_toml(file, shown)
        imports = doc.pop("imports", [])
        if not isinstance(imports, list) or not all(isinstance(i, str) and i for i in imports):
            raise ManifestError([Problem(shown, "imports", f"{imports!r} is not a list of file names")])
        _resolve_paths(doc, file.parent)
        merged: dict[str, Any] = {}
        origins: dict[KeyPath, str] = {}
        for index, name in enumerate(imports):
            target = Path(os.path.normpath(file.parent / os.path.expanduser(name)))
            sub, sub_origins = visit(target, (*stack, file), (shown, ("imports", index)))
            merged = _merge(merged, origins, sub, sub_origins)
        files.append(str(file))
        own = {leaf: shown for leaf in _leaves(doc, ())}
        return _merge(merged, origins, doc, own), origins

    data, origins = visit(root, (), None)
    return Loaded(data=data, origins=origins, files=tuple(files), root=display_path(root, cwd))
