"""validate: a loaded document → a frozen Manifest, or every problem with it at once.

Two passes over the same document: the JSON Schema (schemas/manifest.schema.json) for shape and
types, then the checks a schema cannot express (hostname syntax, paths that must exist, duplicate
mount points, kernel parameters that would break the boot, ...). Each problem is one sentence naming
the file, the key path and the value.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import Any, Callable

from microvmc.compiler.cmdline import GuestUser, Rlimit, extra_problem
from microvmc.compiler.load import KeyPath, Loaded, clip, display_path, key_path
from microvmc.errors import ManifestError, Problem

__all__ = [
    "ImageSource",
    "RootMode",
    "Transport",
    "Accel",
    "KernelSource",
    "NetworkMode",
    "Image",
    "MountKind",
    "Mount",
    "Process",
    "Kernel",
    "Resources",
    "Share",
    "Network",
    "Forward",
    "Protocol",
    "Manifest",
    "validate",
    "from_document",
    "with_defaults",
    "schema",
    "schema_node",
    "with_defaults",
    "DEFAULT_PATH",
    "guest_path",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MAX_ARG_STRLEN = 32 * 4096  # bytes of one argv or env string, NUL included (linux/binfmts.h)
MAX_ARG_TOTAL = 8 * 1024 * 1024 // 4  # argv + env with pointers: a quarter of the default 8 MiB stack
MAX_TAG = 31  # 9p mount tags are limited to 31 bytes; virtiofs to 36: use the smaller for both
ROOT_TAG = "root"
# Kernel parameters microvmc sets or relies on: a manifest changing them would break the boot or the
# guest protocol.
RESERVED_KERNEL_PARAMS = ("init", "rdinit", "console", "reboot", "panic")

# Sources that are container images: their config supplies the program's defaults.
IMAGE_SOURCES = ("registry", "oci-layout", "docker-archive", "oci-bundle")

# Mount points a share must not take: what init mounts first, which the program and init need.
HIDDEN_BY_A_SHARE = ("/", "/proc", "/sys", "/dev", "/dev/pts", "/dev/shm")
KERNEL_FILESYSTEMS = ("/proc", "/sys")  # nothing can be made in them


def guest_path(path: str) -> str:
    """An absolute guest path in its one normal form: "//x", "/x/" and "/a/../x" are all "/x" (POSIX
    keeps a leading "//", which Linux treats as "/")."""
    return "/" + os.path.normpath(path).lstrip("/")


_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_TAG = re.compile(r"[A-Za-z0-9_-]+")


class ImageSource(StrEnum):
    BUILTIN = "builtin"
    DIRECTORY = "directory"
    REGISTRY = "registry"
    OCI_LAYOUT = "oci-layout"
    DOCKER_ARCHIVE = "docker-archive"
    OCI_BUNDLE = "oci-bundle"


class RootMode(StrEnum):
    READ_ONLY = "read-only"
    OVERLAY = "overlay"
    READ_WRITE = "read-write"


class Transport(StrEnum):
    AUTO = "auto"  # virtiofs where virtiofsd can run, else 9p: chosen with the host's facts
    VIRTIOFS = "virtiofs"
    NINEP = "9p"


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class KernelSource(StrEnum):
    DEFAULT = "default"
    MICROVMC = "microvmc"
    DEBIAN = "debian"
    HOST = "host"
    PATH = "path"


class NetworkMode(StrEnum):
    NONE = "none"
    USER = "user"  # QEMU's user-mode network (slirp): NAT through the host
    ISOLATED = "isolated"  # the same with no way out: only the forwards reach the guest
    NETNS = "netns"  # a Linux network namespace's (a container engine's), through a tap joined to its interface


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True, kw_only=True, slots=True)
class Image:
    source: ImageSource
    name: str
    path: str | None
    reference: str | None
    mode: RootMode
    transport: Transport
    tag: str | None = None  # which image of an OCI layout or docker archive
    platform: str | None = None  # os/arch[/variant]; None: the host's
    insecure: bool | None = None  # plain HTTP to a registry that is not on loopback


class MountKind(StrEnum):
    BIND = "bind"  # a guest path (a file or directory of a share) mounted at another
    TMPFS = "tmpfs"


@dataclass(frozen=True, kw_only=True, slots=True)
class Mount:
    """A mount the guest makes after the shares, in order."""

    kind: MountKind
    target: str  # absolute guest path
    source: str = ""  # bind: the guest path mounted there
    read_only: bool = False
    options: str = ""  # tmpfs: its data options (mode=..., size=...)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in _fields(self).items() if v not in ("", False)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Process:
    argv: tuple[str, ...]  # () only for an image source, until the image's config fills it in
    env: tuple[tuple[str, str], ...]  # sorted by name, PATH included (for an image source: once its Env is merged)
    cwd: str
    # Not manifest keys (yet): what `run -t` and the OCI runtime set.
    tty: bool = False  # a terminal in the guest (`run -t`)
    user: GuestUser | None = None  # numeric: resolved from user_spec (or the image's User) by compiler/program.py
    rlimits: tuple[Rlimit, ...] = ()
    entrypoint: tuple[str, ...] | None = None  # replaces an image's Entrypoint
    user_spec: str | dict | None = None  # process.user as written: "name", "uid:gid", {uid, gid, groups}
    explicit: tuple[str, ...] = ()  # the process keys the manifest set (an image's config fills in the rest)


@dataclass(frozen=True, kw_only=True, slots=True)
class Kernel:
    source: KernelSource
    image: str | None
    modules: str | None
    cmdline: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Resources:
    cpus: int
    memory: int  # MiB
    accel: Accel
    boot_timeout: float
    stop_timeout: float  # seconds the program gets after a signal passed on to it
    timeout: float


@dataclass(frozen=True, kw_only=True, slots=True)
class LogRotation:
    max_size: int  # bytes; 0: never rotated
    max_files: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Share:
    tag: str
    host: str
    guest: str
    read_only: bool
    transport: Transport
    # Not manifest keys: the OCI runtime's and `run -v`'s staged single files.
    hidden: bool = False  # mounted only for `Manifest.mounts` to bind from, then detached
    staged_from: str = ""  # `run -v` of a file: `host` is a directory made per run (relative to the run directory) holding it


@dataclass(frozen=True, kw_only=True, slots=True)
class Forward:
    """A host port forwarded to a guest port."""

    host_address: str  # IPv4, "0.0.0.0" for every address
    host: int
    guest: int
    protocol: Protocol
    key: str = ""  # where it was written, for messages: "network.forwards[0]"
    origin: str = ""  # the file that wrote it, or "command line"

    @property
    def shown(self) -> str:
        """How the user wrote it: "-p 8080:80" on the command line, else its manifest key."""
        return self.origin if self.origin.startswith("-p ") else self.key

    def to_dict(self) -> dict[str, Any]:
        return {"host_address": self.host_address, "host": self.host, "guest": self.guest,
                "protocol": str(self.protocol)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Network:
    mode: NetworkMode
    forwards: tuple[Forward, ...] = ()
    # mode netns: the namespace, its interface ("": its one other than lo), and the guest's configuration
    namespace: str = ""
    interface: str = ""
    address: str = ""  # "10.88.0.5/16"
    addresses: tuple[str, ...] = ()  # further ones, IPv4 or IPv6: "fd00:88::5/64"
    gateway: str = ""
    gateway6: str = ""
    mac: str = ""
    dns: tuple[str, ...] = ()
    mtu: int = 0  # the guest NIC's (network.mtu); 0 only without a network device

    def to_dict(self) -> dict[str, Any]:
        # keys absent when unset, so that manifests without them keep their digests
        netns = {k: v for k in ("namespace", "interface", "address", "gateway", "gateway6", "mac") if (v := getattr(self, k))}
        return {"mode": str(self.mode), **netns, **({"addresses": list(self.addresses)} if self.addresses else {}),
                **({"dns": list(self.dns)} if self.dns else {}),
                **({"mtu": self.mtu} if self.mode is not NetworkMode.NONE else {}),
                **({"forwards": [f.to_dict() for f in self.forwards]} if self.forwards else {})}


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    version: int
    hostname: str
    image: Image
    process: Process
    kernel: Kernel
    resources: Resources
    logs: LogRotation
    shares: tuple[Share, ...]  # sorted by tag
    network: Network
    files: tuple[str, ...]  # every manifest file it was loaded from, absolute
    name: str  # the root manifest's display path, for messages
    mounts: tuple[Mount, ...] = ()  # made in the guest after the shares, in order

    def to_dict(self) -> dict[str, Any]:
        # Keys absent when unset, so that manifests without them keep their digests.
        extra = {"mounts": [m.to_dict() for m in self.mounts]} if self.mounts else {}
        return extra | {
            "version": self.version,
            "hostname": self.hostname,
            "image": _fields(self.image),
            "process": {
                "argv": list(self.process.argv),
                "env": dict(self.process.env),
                "cwd": self.process.cwd,
                **({"tty": True} if self.process.tty else {}),
                **({"user": {"uid": self.process.user.uid, "gid": self.process.user.gid,
                             "groups": list(self.process.user.groups)}} if self.process.user else {}),
                **({"rlimits": [[r.name, r.soft, r.hard] for r in self.process.rlimits]}
                   if self.process.rlimits else {}),
            },
            "kernel": {**_fields(self.kernel), "cmdline": list(self.kernel.cmdline)},
            "resources": _fields(self.resources),
            "logs": _fields(self.logs),
            "shares": {s.tag: {k: v for k, v in _fields(s).items()
                               if k != "tag" and (k, v) not in (("hidden", False), ("staged_from", ""))}
                       for s in self.shares},
            "network": self.network.to_dict(),
        }


def _fields(obj: Any) -> dict[str, Any]:
    return {name: (str(v) if isinstance(v, StrEnum) else v) for name in obj.__slots__ if (v := getattr(obj, name)) is not None}


@cache
def schema() -> dict[str, Any]:
    from importlib.resources import files

    return json.loads(files("microvmc.schemas").joinpath("manifest.schema.json").read_text("utf-8"))


def show(value: Any) -> str:
    """A value as it would be written in TOML, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return clip(json.dumps(value, ensure_ascii=False))
    if isinstance(value, (list, dict)):
        return clip(json.dumps(value, ensure_ascii=False), 60)
    return clip(str(value))


def schema_node(path: KeyPath) -> dict[str, Any]:
    """The schema of the value at `path` ({} where the schema says nothing): ("resources", "memory"),
    ("shares", "<any tag>", "host"), ("kernel", "cmdline", 0)."""
    node = schema()
    for part in path:
        if isinstance(part, int):
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return {}
    return node


def with_defaults(data: Any, node: dict[str, Any] | None = None) -> Any:
    """The document with every absent key that has a schema `default` filled in, in tables present
    or absent (an absent [resources] is a table of defaults). Values of the wrong type are left as they
    are, for the checks to report."""
    node = schema() if node is None else node
    if isinstance(data, list) and isinstance(node.get("items"), dict):
        return [with_defaults(item, node["items"]) for item in data]
    if not isinstance(data, dict):
        return data
    properties = node.get("properties", {})
    extra = node.get("additionalProperties")
    out = {}
    for key, value in data.items():
        child = properties.get(key, extra if isinstance(extra, dict) else {})
        out[key] = with_defaults(value, child)
    for key, child in properties.items():
        if key in out:
            continue
        if "default" in child:
            out[key] = child["default"]
        elif child.get("type") == "object" and any("default" in c for c in child.get("properties", {}).values()):
            out[key] = with_defaults({}, child)
    return out


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _validator():
    from jsonschema import Draft202012Validator, validators

    checker = Draft202012Validator.TYPE_CHECKER.redefine_many({
        # TOML writes integers without a dot: 2.0 is a float, which -smp or -m would not take.
        "integer": lambda _, value: isinstance(value, int) and not isinstance(value, bool),
        # TOML has nan and inf; JSON numbers, and every number microvmc takes, are finite.
        "number": lambda _, value: isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value),
    })
    return validators.extend(Draft202012Validator, type_checker=checker)(schema())


def _schema_problems(loaded: Loaded) -> list[tuple[KeyPath, Problem]]:
    problems = []
    for err in _validator().iter_errors(loaded.data):
        path: KeyPath = tuple(err.absolute_path)
        if err.validator in ("minimum", "maximum") and not _finite(err.instance):
            continue  # reported once, by "type"
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            for key in extra:
                where = (*path, key)
                problems.append((where, Problem(loaded.origin(where), key_path(where), "unknown key")))
            continue
        if err.validator == "required":
            missing = err.message.split("'")[1]
            where = (*path, missing)
            problems.append((where, Problem(loaded.origin(path), key_path(where), "is required")))
            continue
        problems.append((path, Problem(loaded.origin(path), key_path(path), _schema_message(err))))
    return problems


def _schema_message(err: Any) -> str:
    kind = err.validator
    value = show(err.instance)
    unit = f" {err.schema['x-unit']}" if "x-unit" in err.schema else ""
    if kind == "type":
        if isinstance(err.instance, float) and not _finite(err.instance):
            return f"{value} is not a finite number"
        expected = err.validator_value
        names = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
                 "array": "a list", "object": "a table"}
        want = names.get(expected, expected) if isinstance(expected, str) else " or ".join(names.get(e, e) for e in expected)
        return f"{value} is not {want}"
    if kind == "enum":
        return f"{value} is not one of " + ", ".join(show(v) for v in err.validator_value)
    if kind == "const":
        return f"{value} is not supported; this microvmc reads version {show(err.validator_value)}"
    if kind == "minimum":
        return f"{value} is below the minimum of {show(err.validator_value)}{unit}"
    if kind == "maximum":
        return f"{value} is above the maximum of {show(err.validator_value)}{unit}"
    if kind == "minItems":
        return f"{value} must have at least {err.validator_value} item" + ("s" if err.validator_value != 1 else "")
    if kind == "maxItems":
        return f"{value} has more than {err.validator_value} item" + ("s" if err.validator_value != 1 else "")
    if kind == "minLength":
        return f"{value} must not be empty"
    return f"{value}: {err.message}"


def _order(path: KeyPath, data: Any) -> tuple[int, ...]:
    """Where a key path sits, for listing problems: in the schema's key order, the keys of a table
    of anything (shares, env) and list items in the document's order, unknown keys last."""
    node, order = schema(), []
    for part in path:
        properties = list(node.get("properties", {}))
        if isinstance(part, int):
            order.append(part)
            node = node.get("items", {})
        elif part in properties:
            order.append(properties.index(part))
            node = node["properties"][part]
        else:
            keys = list(data) if isinstance(data, dict) else []
            order.append(len(properties) + (keys.index(part) if part in keys else len(keys)))
            node = node.get("additionalProperties") if isinstance(node.get("additionalProperties"), dict) else {}
        data = data[part] if isinstance(data, dict) and part in data else (
            data[part] if isinstance(data, list) and isinstance(part, int) and part < len(data) else None)
    return tuple(order)


def _semantic_problems(loaded: Loaded) -> list[tuple[KeyPath, Problem]]:
    data = with_defaults(loaded.data)
    problems: list[tuple[KeyPath, Problem]] = []

    def add(path: KeyPath, message: str, hint: str = "") -> None:
        problems.append((path, Problem(loaded.origin(path), key_path(path), message, hint)))

    hostname = data.get("hostname")
    if isinstance(hostname, str):
        labels = hostname.split(".")
        if len(hostname) > 64 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
            add(("hostname",), f"{show(hostname)} is not a valid hostname",
                "letters, digits and '-', at most 63 per dot-separated label")

    process = data.get("process") if isinstance(data.get("process"), dict) else {}
    argv = process.get("argv")
    if isinstance(argv, list):
        for i, arg in enumerate(argv):
            if isinstance(arg, str) and "\0" in arg:
                add(("process", "argv", i), f"{show(arg)} contains a NUL character, which no program can receive")
        if argv and argv[0] == "":
            add(("process", "argv", 0), "\"\" is not a program")
    env = process.get("env")
    if isinstance(env, dict):
        for name, value in env.items():
            if name == "" or "=" in name or "\0" in name:
                add(("process", "env", name), f"{show(name)} is not a valid environment variable name",
                    "a name must be non-empty and contain neither '=' nor NUL")
            elif isinstance(value, str) and "\0" in value:
                add(("process", "env", name), f"{show(value)} contains a NUL character")
    # What execve(2) takes, as init hands argv and env to it unchanged: else the program fails to
    # start with E2BIG ("Argument list too long"), after the boot.
    strings = [(("process", "argv", i), a) for i, a in enumerate(argv if isinstance(argv, list) else ())
               if isinstance(a, str)]
    strings += [(("process", "env", n), f"{n}={v}") for n, v in (env.items() if isinstance(env, dict) else ())
                if isinstance(v, str)]
    total = 0
    for where, text in strings:
        size = len(text.encode("utf-8", "surrogateescape")) + 1  # with its NUL
        total += size + 8  # and its pointer
        if size > MAX_ARG_STRLEN:
            add(where, f"is {size - 1} bytes long; Linux passes at most {MAX_ARG_STRLEN - 1} bytes in one "
                "argument or environment entry")
    if total > MAX_ARG_TOTAL:
        add(("process",), f"argv and env take {total} bytes; Linux gives a program at most {MAX_ARG_TOTAL} "
            "(a quarter of its 8 MiB stack)")
    cwd = process.get("cwd")
    if isinstance(cwd, str) and (not cwd.startswith("/") or "\0" in cwd):
        add(("process", "cwd"), f"{show(cwd)} is not an absolute path")

    image = data.get("image") if isinstance(data.get("image"), dict) else {}
    source = image.get("source")
    if source not in IMAGE_SOURCES:
        if "process" not in data:
            add(("process",), "is required")
        elif isinstance(data["process"], dict) and "argv" not in data["process"]:
            add(("process", "argv"), "is required", f"only an image's config can supply it, and {show(source)} has none")
    if "entrypoint" in process and source not in IMAGE_SOURCES:
        add(("process", "entrypoint"), f"is not used when image.source is {show(source)}", "put the program in argv")
    if isinstance(process.get("user"), str):
        user = process["user"]
        if user.count(":") > 1 or not all(part and ":" not in part and "\0" not in part for part in user.split(":")):
            add(("process", "user"), f"{show(user)} is not a user", "a name or uid, or user:group")
    for key, wanted in (("reference", ("registry",)), ("tag", ("oci-layout", "docker-archive")),
                        ("platform", ("registry", "oci-layout", "docker-archive")), ("insecure", ("registry",))):
        if key in image and source not in wanted:
            add(("image", key), f"is not used when image.source is {show(source)}")
    if source == "registry":
        reference = image.get("reference")
        if reference is None:
            add(("image", "reference"), "is required when image.source is \"registry\"")
        elif isinstance(reference, str):
            from microvmc.compiler.ociimage import ImageError, parse_reference

            try:
                parse_reference(reference)
            except ImageError as err:
                add(("image", "reference"), str(err))
    if isinstance(image.get("platform"), str):
        from microvmc.compiler.ociimage import ImageError, parse_platform

        try:
            parse_platform(image["platform"])
        except ImageError as err:
            add(("image", "platform"), str(err))
    if source in ("oci-layout", "docker-archive", "oci-bundle"):
        path = image.get("path")
        want_dir = source != "docker-archive"
        if path is None:
            add(("image", "path"), f"is required when image.source is {show(source)}")
        elif isinstance(path, str) and not (os.path.isdir(path) if want_dir else os.path.isfile(path)):
            add(("image", "path"), f"{show(display_path(path))} is not a {'directory' if want_dir else 'file'}")
    if source in ("registry", "oci-layout", "docker-archive") and image.get("mode") == "read-write":
        add(("image", "mode"), "\"read-write\" would modify the image in the store",
            "use \"overlay\" for a writable root whose changes are discarded")
    if source == "directory":
        path = image.get("path")
        if path is None:
            add(("image", "path"), "is required when image.source is \"directory\"")
        elif isinstance(path, str) and not os.path.isdir(path):
            add(("image", "path"), f"{show(display_path(path))} is not a directory")
    elif source == "builtin":
        for key in ("path", "reference"):
            if key in image:
                add(("image", key), "is not used when image.source is \"builtin\"")
        if image.get("mode") == "read-write":
            add(("image", "mode"), "\"read-write\" would modify the built-in image",
                "use \"overlay\" for a writable root whose changes are discarded")

    kernel = data.get("kernel") if isinstance(data.get("kernel"), dict) else {}
    ksource = kernel.get("source")
    for key in ("image", "modules"):
        value = kernel.get(key)
        if ksource == "path":
            if value is None:
                if key == "image":  # without modules: a kernel with everything built in
                    add(("kernel", key), "is required when kernel.source is \"path\"")
            elif isinstance(value, str):
                ok = os.path.isfile(value) if key == "image" else os.path.isdir(value)
                if not ok:
                    add(("kernel", key), f"{show(display_path(value))} is not a {'file' if key == 'image' else 'directory'}")
        elif value is not None:
            add(("kernel", key), f"is not used when kernel.source is {show(ksource)}")
    cmdline = kernel.get("cmdline")
    if isinstance(cmdline, list):
        for i, param in enumerate(cmdline):
            if not isinstance(param, str):
                continue
            name = param.split("=", 1)[0]
            if any(c.isspace() for c in param) or '"' in param or not param.isascii() or not param.isprintable():
                add(("kernel", "cmdline", i), f"{show(param)} is not a single kernel parameter",
                    "one parameter per item, without spaces, quotes or control characters")
            elif param == "--":
                add(("kernel", "cmdline", i), "\"--\" would hand the rest of the command line to init")
            elif name in RESERVED_KERNEL_PARAMS or name.startswith("MVMC_"):
                add(("kernel", "cmdline", i), f"{show(param)} sets {show(name)}, which microvmc sets itself")
        if all(isinstance(p, str) for p in cmdline) and (problem := extra_problem(cmdline)):
            add(("kernel", "cmdline"), problem)

    shares = data.get("shares") if isinstance(data.get("shares"), dict) else {}
    seen_guest: dict[str, str] = {}
    for tag, share in shares.items():
        if not (_TAG.fullmatch(tag) and len(tag) <= MAX_TAG):
            add(("shares", tag), f"{show(tag)} is not a valid share tag",
                f"letters, digits, '-' and '_', at most {MAX_TAG} characters")
        elif tag == ROOT_TAG:
            add(("shares", tag), f"{show(tag)} is the root filesystem's tag")
        if not isinstance(share, dict):
            continue
        host = share.get("host")
        if isinstance(host, str) and not os.path.isdir(host):
            add(("shares", tag, "host"), f"{show(display_path(host))} is not a directory")
        guest = share.get("guest")
        if isinstance(guest, str):
            normal = guest_path(guest)
            inside = next((k for k in KERNEL_FILESYSTEMS if normal.startswith(k + "/")), None)
            if not guest.startswith("/") or "\0" in guest:
                add(("shares", tag, "guest"), f"{show(guest)} is not an absolute path")
            elif normal in HIDDEN_BY_A_SHARE:
                add(("shares", tag, "guest"), f"{show(guest)} would hide the guest's {normal}")
            elif inside:
                add(("shares", tag, "guest"), f"{show(guest)} is inside the guest's {inside}, where init cannot "
                    "make a mount point")
            elif normal in seen_guest:
                add(("shares", tag, "guest"), f"{show(guest)} is already the mount point of share {show(seen_guest[normal])}")
            else:
                seen_guest[normal] = tag

    network = data.get("network") if isinstance(data.get("network"), dict) else {}
    forwards = network.get("forwards") if isinstance(network.get("forwards"), list) else []
    if forwards and network.get("mode") in ("none", "netns"):
        add(("network", "forwards"), "need network.mode = \"user\" or \"isolated\"", f"network.mode is {show(network.get('mode'))}"
            + (": the namespace's own port mappings reach the guest" if network.get("mode") == "netns" else ""))
    _netns_problems(network, add)
    listening: dict[tuple[str, int], list[tuple[str, int]]] = {}  # (protocol, host port) → (address, index)
    for i, forward in enumerate(forwards):
        if not isinstance(forward, dict):
            continue
        address = forward.get("host_address")
        if isinstance(address, str):
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                add(("network", "forwards", i, "host_address"), f"{show(address)} is not an IPv4 address",
                    "QEMU's user-mode network listens on IPv4 only")
                continue
        port, protocol = forward.get("host"), forward.get("protocol")
        if not (isinstance(port, int) and isinstance(address, str) and isinstance(protocol, str)):
            continue
        for other, j in listening.get((protocol, port), ()):
            if "0.0.0.0" in (other, address) or other == address:
                by = loaded.origin(("network", "forwards", j))
                by = by if by.startswith("-p ") else f"network.forwards[{j}]"
                add(("network", "forwards", i, "host"), f"{port} is already forwarded by {by} ({protocol} on {other})")
                break
        listening.setdefault((protocol, port), []).append((address, i))
    return problems


NETNS_KEYS = ("namespace", "interface", "address", "addresses", "gateway", "gateway6", "mac", "dns")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_IFNAME = re.compile(r"[^/\s:]{1,15}")  # the kernel's IFNAMSIZ less its NUL; no '/', ':' or space


def _parsed(network: dict[str, Any], key: str, parse: Callable[[str], Any], what: str, add: Any) -> Any:
    """network[key] parsed, or None: absent, not a string (the schema says so), or not `what` (said here)."""
    value = network.get(key)
    if not isinstance(value, str):
        return None
    try:
        return parse(value)
    except ValueError:
        add(("network", key), f"{show(value)} is not {what}")
        return None


def _netns_problems(network: dict[str, Any], add: Any) -> None:
    """mode netns: a namespace path and the guest's address, gateway and MAC, each well-formed."""
    if network.get("mode") != "netns":
        for key in NETNS_KEYS:
            if key in network:
                add(("network", key), "is used only when network.mode is \"netns\"")
        return
    for key in ("namespace", "address", "gateway", "mac"):
        if key not in network:
            add(("network", key), "is required when network.mode is \"netns\"")
    namespace = network.get("namespace")
    if isinstance(namespace, str) and namespace:
        if not namespace.startswith("/"):
            add(("network", "namespace"), f"{show(namespace)} is not an absolute path",
                "a network namespace such as /run/netns/NAME or /proc/PID/ns/net")
        elif not os.path.exists(namespace):
            add(("network", "namespace"), f"{show(namespace)} does not exist")
    interface = network.get("interface")
    if isinstance(interface, str) and interface and not _IFNAME.fullmatch(interface):
        add(("network", "interface"), f"{show(interface)} is not an interface name",
            "at most 15 characters, without '/', ':' or spaces")
    address, net = network.get("address"), None
    if isinstance(address, str):
        try:
            if "/" not in address:
                raise ValueError
            net = ipaddress.IPv4Interface(address)
        except ValueError:
            add(("network", "address"), f"{show(address)} is not an IPv4 address with a prefix length",
                "such as \"10.88.0.5/16\"")
        else:
            if not 1 <= net.network.prefixlen <= 30:
                add(("network", "address"), f"{show(address)}: the prefix length must be 1 to 30, so that "
                    "the gateway is in the guest's network")
                net = None
            elif net.ip in (net.network.network_address, net.network.broadcast_address):
                add(("network", "address"), f"{show(address)} is its network's "
                    + ("network address" if net.ip == net.network.network_address else "broadcast address"))
                net = None
    gw = _parsed(network, "gateway", ipaddress.IPv4Address, "an IPv4 address", add)
    if gw is not None and net is not None and (gw not in net.network or gw == net.ip):
        add(("network", "gateway"), f"{show(network['gateway'])} is not another address in network.address's network {net.network}")
    networks6 = []
    addresses = network.get("addresses")
    for i, item in enumerate(addresses if isinstance(addresses, list) else ()):
        if not isinstance(item, str):
            continue
        try:
            if "/" not in item:
                raise ValueError
            further = ipaddress.ip_interface(item)
        except ValueError:
            add(("network", "addresses", i), f"{show(item)} is not an IP address with a prefix length",
                "such as \"fd00:88::5/64\"")
            continue
        if further.ip.is_link_local and further.version == 6:
            add(("network", "addresses", i), f"{show(item)} is link-local: the guest's kernel makes its own")
        elif further.ip in {x.ip for x in ([net] if net else [])} or item in addresses[:i]:
            add(("network", "addresses", i), f"{show(item)} is already the guest's")
        elif further.version == 6:
            networks6.append(further.network)
    gw6 = _parsed(network, "gateway6", ipaddress.IPv6Address, "an IPv6 address", add)
    if gw6 is not None and not gw6.is_link_local and not any(gw6 in n for n in networks6):
        add(("network", "gateway6"), f"{show(network['gateway6'])} is neither link-local nor in the network of an IPv6 "
            "address of network.addresses")
    mac = network.get("mac")
    if isinstance(mac, str):
        if not _MAC.fullmatch(mac):
            add(("network", "mac"), f"{show(mac)} is not a MAC address", "six hex bytes: \"aa:bb:cc:dd:ee:ff\"")
        elif int(mac[:2], 16) & 1:
            add(("network", "mac"), f"{show(mac)} is a multicast address, not a NIC's")
    dns = network.get("dns")
    for i, server in enumerate(dns if isinstance(dns, list) else ()):
        if isinstance(server, str):
            try:
                ipaddress.ip_address(server)
            except ValueError:
                add(("network", "dns", i), f"{show(server)} is not an IP address")


def validate(loaded: Loaded) -> Manifest:
    """The Manifest a loaded document describes; ManifestError with every problem otherwise."""
    found = _schema_problems(loaded) + _semantic_problems(loaded)
    if found:
        # In key order whichever pass found them; the same problem found by both passes, once.
        found.sort(key=lambda item: _order(item[0], loaded.data))
        raise ManifestError(list(dict.fromkeys(problem for _, problem in found)))
    network = loaded.data.get("network") or {}
    origins = {i: loaded.origin(("network", "forwards", i)) for i in range(len(network.get("forwards", ())))}
    return from_document(with_defaults(loaded.data), files=loaded.files, name=loaded.root, origins=origins)


def from_document(data: dict[str, Any], *, files: tuple[str, ...], name: str,
                  origins: dict[int, str] | None = None) -> Manifest:
    """The Manifest of a valid document whose defaults are filled in (with_defaults); also how the
    OCI runtime builds one from config.json (compiler/oci.py). `origins`: the file (or "command
    line") that wrote each network forward, by index, for the messages about them after validation."""
    image, kernel, resources = data["image"], data["kernel"], data["resources"]
    process = data.get("process", {})  # an image's config can supply all of it
    from_image = image["source"] in IMAGE_SOURCES
    env = dict(process.get("env", {}))
    if not from_image:  # an image's Env comes first: its PATH too (compiler/ociimage.py image_process)
        env.setdefault("PATH", DEFAULT_PATH)
    return Manifest(
        version=data["version"],
        hostname=data["hostname"],
        image=Image(
            source=ImageSource(image["source"]),
            name=image["name"],
            path=image.get("path"),
            reference=image.get("reference"),
            mode=RootMode(image["mode"]),
            transport=Transport(image["transport"]),
            tag=image.get("tag"),
            platform=image.get("platform"),
            insecure=image.get("insecure"),
        ),
        process=Process(
            argv=tuple(process.get("argv", ())),
            env=tuple(sorted(env.items())),
            cwd=process.get("cwd", "/"),  # an image's WorkingDir when it is not set (compiler/program.py)
            entrypoint=tuple(process["entrypoint"]) if "entrypoint" in process else None,
            user_spec=process.get("user"),
            explicit=tuple(sorted(k for k in ("argv", "cwd", "env", "entrypoint", "user") if k in process)),
        ),
        kernel=Kernel(
            source=KernelSource(kernel["source"]),
            image=kernel.get("image"),
            modules=kernel.get("modules"),
            cmdline=tuple(kernel.get("cmdline", ())),
        ),
        resources=Resources(
            cpus=resources["cpus"],
            memory=resources["memory"],
            accel=Accel(resources["accel"]),
            boot_timeout=resources["boot_timeout"],
            stop_timeout=resources["stop_timeout"],
            timeout=resources["timeout"],
        ),
        logs=LogRotation(max_size=data["logs"]["max_size"], max_files=data["logs"]["max_files"]),
        shares=tuple(
            Share(
                tag=tag,
                host=share["host"],
                guest=guest_path(share["guest"]),
                read_only=share["read_only"],
                transport=Transport(share["transport"]),
            )
            for tag, share in sorted(data.get("shares", {}).items())
        ),
        network=Network(mode=NetworkMode(data["network"]["mode"]), forwards=tuple(
            Forward(host_address=f["host_address"], host=f["host"], guest=f["guest"], protocol=Protocol(f["protocol"]),
                    key=f"network.forwards[{i}]", origin=(origins or {}).get(i, name))
            for i, f in enumerate(data["network"].get("forwards", ()))),
            **{k: data["network"][k] for k in ("namespace", "interface", "address", "gateway", "gateway6") if k in data["network"]},
            addresses=tuple(data["network"].get("addresses", ())),
            mac=data["network"].get("mac", "").lower(), dns=tuple(data["network"].get("dns", ())),
            mtu=data["network"]["mtu"] if data["network"]["mode"] != "none" else 0),
        files=files,
        name=name,
    )
