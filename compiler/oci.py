"""An OCI bundle's config.json → the Manifest of the microVM that runs it (pure).

A container engine hands its runtime a bundle: config.json and a root filesystem it has already
mounted (its overlay). The VM shares that root live, never unpacks an image, and runs
`process` in it with the user, rlimits, terminal, hostname and mounts config.json asks for:

- a bind mount of a directory is a share;
- a bind mount of a single file (/etc/hosts, /etc/resolv.conf, /etc/hostname, /run/.containerenv):
  virtiofs and 9p share directories only, so the file is staged (hard-linked or copied by the
  backend) into a directory of its own, `staging`, which is shared hidden and bind-mounted file by
  file in the guest;
- the kernel filesystems (proc, sysfs, devpts, /dev, /dev/shm, /tmp and /run as tmpfs) are the
  ones the guest init mounts itself; other tmpfs mounts are made in the guest;
- what has no meaning in a VM of its own (namespaces, cgroups, seccomp, AppArmor, SELinux labels,
  capabilities, sysctls, masked paths) is accepted and noted;
- hooks are read (`Hooks`) for the backend to run on the host: createRuntime, prestart (docker's
  network), poststart and poststop; createContainer and startContainer would run in the container's
  namespaces, which here are the guest's, and are noted, not run;
- the network: a namespace with a path (podman) is the VM's, one without (docker, ctr) is for the
  runtime to make, and none at all (`--network host`) gives the VM QEMU's user-mode network;
- what would silently change the program's meaning (a user namespace with ID mappings, devices,
  a socket or device bind mount, mount types the guest cannot make) is refused, naming the key.

Every host fact it needs (whether a mount source is a file or a directory) comes in as a function,
so it is tested over real config.json files captured from podman, docker and ctr.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Callable, Mapping

from microvmc.compiler.cmdline import GuestUser, Rlimit
from microvmc.compiler.manifest import (
    MAX_ARG_STRLEN,
    MAX_TAG,
    ImageSource,
    Manifest,
    Mount,
    MountKind,
    RootMode,
    from_document,
    schema_node,
    with_defaults,
)
from microvmc.errors import ManifestError, Problem

__all__ = [
    "PathKind",
    "StagedFile",
    "ExecProcess",
    "Container",
    "ContainerNetwork",
    "Hook",
    "Hooks",
    "RUN_HOOKS",
    "STAGING_GUEST",
    "STAGING_TAG",
    "container_manifest",
    "exec_process",
    "path_kind",
    "valid_container_id",
]

STAGING_TAG = "oci-files"
STAGING_GUEST = "/run/.microvmc-files"  # where the staged files' share is mounted, until detached
MAX_CONTAINER_ID = 1024
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # what runc accepts, less nothing
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
RLIMIT_NAMES = frozenset({"AS", "CORE", "CPU", "DATA", "FSIZE", "LOCKS", "MEMLOCK", "MSGQUEUE", "NICE",
                          "NOFILE", "NPROC", "RSS", "RTPRIO", "RTTIME", "SIGPENDING", "STACK"})
RLIM_INFINITY = (1 << 64) - 1

# Mounts the guest init makes itself (init/PROTOCOL.md), with the types an engine asks for them by:
# the request is met as it is. podman binds its own shm directory on /dev/shm: a tmpfs in the guest.
GUEST_MADE = {
    "/proc": {"proc"},
    "/sys": {"sysfs"},
    "/dev": {"tmpfs", "devtmpfs"},
    "/dev/pts": {"devpts"},
    "/dev/shm": {"tmpfs", "bind"},
    "/tmp": {"tmpfs"},
    "/run": {"tmpfs"},
}
# Mount types with no meaning for a VM of its own: noted, not mounted.
NOT_IN_VM = {
    "cgroup": "the VM is its own resource boundary",
    "cgroup2": "the VM is its own resource boundary",
    "mqueue": "not mounted in the guest",
}
# Mount options that are about propagation between mount namespaces, or how: the VM has one.
QUIET_OPTIONS = frozenset({"bind", "rbind", "private", "rprivate", "shared", "rshared", "slave", "rslave",
                           "unbindable", "runbindable", "rw", "ro", "relatime", "norelatime", "strictatime",
                           "noatime", "nodiratime", "newinstance", "tmpcopyup", "Z", "z"})
TMPFS_DATA = re.compile(r"(mode=[0-7]{1,4}|size=[0-9]+[kmg%]?|nr_inodes=[0-9]+[kmg]?|uid=[0-9]+|gid=[0-9]+)")
# Top-level and linux keys that are accepted and noted: why each has no effect in the VM.
IGNORED = {
    "annotations": None,  # information for the engine, quietly
    "hooks": None,  # read by _hooks
    "linux.cgroupsPath": None,
    "linux.resources": None,  # memory and CPU are read; the rest is the VM's own boundary
    "linux.namespaces": None,  # each a note of its own below
    "linux.seccomp": "a VM is its own sandbox; the guest runs without a seccomp filter",
    "linux.maskedPaths": "paths are not masked in the guest (the guest's /proc is its own)",
    "linux.readonlyPaths": "paths are not made read-only in the guest (the guest's /proc and /sys are its own)",
    "linux.sysctl": "sysctls are not set in the guest",
    "linux.mountLabel": "SELinux labels do not apply in the guest",
    "linux.rootfsPropagation": None,
    "linux.intelRdt": "RDT classes are not set",
    "linux.personality": "the personality is not set",
    "linux.devices": None,  # refused when non-empty, below
    "linux.uidMappings": None,  # refused when non-empty, below
    "linux.gidMappings": None,
    "linux.timeOffsets": "time offsets are not set",
    "domainname": "the NIS domain name is not set",
}
PROCESS_IGNORED = {
    "capabilities": "capabilities are not dropped in the guest (the VM is the boundary)",
    "noNewPrivileges": None,
    "apparmorProfile": "AppArmor does not apply in the guest",
    "selinuxLabel": "SELinux labels do not apply in the guest",
    "oomScoreAdj": None,
    "ioPriority": None,
    "scheduler": "the scheduling policy is not set",
    "execCPUAffinity": None,
}


class PathKind(StrEnum):
    DIRECTORY = "directory"
    FILE = "file"
    SOCKET = "socket"
    DEVICE = "device"
    OTHER = "other"  # a fifo, ...
    MISSING = "missing"


def path_kind(path: str) -> PathKind:
    """What `path` is on this host, following symbolic links as a bind mount does (the impure
    fact the translation needs; tests pass their own)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return PathKind.MISSING
    if stat.S_ISDIR(mode):
        return PathKind.DIRECTORY
    if stat.S_ISREG(mode):
        return PathKind.FILE
    if stat.S_ISSOCK(mode):
        return PathKind.SOCKET
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return PathKind.DEVICE
    return PathKind.OTHER


@dataclass(frozen=True, kw_only=True, slots=True)
class StagedFile:
    """A single-file bind mount: `source` on the host is staged as `staging/<name>`."""

    source: str
    name: str  # the file's name in the staging directory
    destination: str
    read_only: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class ExecProcess:
    """config.json's `process`, or an `exec --process` file: what runs, as whom, how."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # in the order given, last one of a name kept
    cwd: str
    user: GuestUser
    terminal: bool
    console_size: tuple[int, int] | None  # (rows, columns)
    rlimits: tuple[Rlimit, ...]


class ContainerNetwork(StrEnum):
    """What config.json's network namespace asks of the runtime."""

    NAMESPACE = "namespace"  # a path: the engine prepared it (podman: CNI, netavark)
    NEW = "new"  # no path: the runtime makes it; the engine wires it in a hook (docker) or leaves it empty (ctr)
    HOST = "host"  # no network namespace (`--network host`): the VM gets QEMU's user-mode network


@dataclass(frozen=True, kw_only=True, slots=True)
class Hook:
    """One of config.json's hooks: a host program run with the container's state on stdin."""

    path: str  # absolute
    args: tuple[str, ...]  # argv, argv[0] included; empty: (path,)
    env: tuple[str, ...] | None  # None: the runtime's own environment (runc's, Go's exec with a nil Env)
    timeout: int | None  # seconds

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "args": list(self.args),
                **({"env": list(self.env)} if self.env is not None else {}),
                **({"timeout": self.timeout} if self.timeout is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Hook:
        env = data.get("env")
        return cls(path=data["path"], args=tuple(data.get("args") or ()), env=None if env is None else tuple(env),
                   timeout=data.get("timeout"))


# The hooks the runtime runs, in the order the runtime spec calls them, all in the runtime's (the
# host's) namespaces; each key is config.json's.
RUN_HOOKS = ("createRuntime", "prestart", "poststart", "poststop")
# Hooks that run in the container's namespaces: here the guest's, where the host's hook programs are not.
GUEST_HOOKS = {kind: f"{kind} hooks are not run: they run in the container's namespaces, which are the guest's"
               for kind in ("createContainer", "startContainer")}


@dataclass(frozen=True, kw_only=True, slots=True)
class Hooks:
    create_runtime: tuple[Hook, ...] = ()
    prestart: tuple[Hook, ...] = ()
    poststart: tuple[Hook, ...] = ()
    poststop: tuple[Hook, ...] = ()

    def of(self, kind: str) -> tuple[Hook, ...]:
        return getattr(self, _HOOK_FIELDS[kind])

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {kind: [h.to_dict() for h in self.of(kind)] for kind in RUN_HOOKS if self.of(kind)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Hooks:
        return cls(**{_HOOK_FIELDS[kind]: tuple(Hook.from_dict(h) for h in data.get(kind) or ()) for kind in RUN_HOOKS})


_HOOK_FIELDS = {"createRuntime": "create_runtime", "prestart": "prestart", "poststart": "poststart",
                "poststop": "poststop"}


@dataclass(frozen=True, kw_only=True, slots=True)
class Container:
    manifest: Manifest
    process: ExecProcess
    staged: tuple[StagedFile, ...]  # for the backend to put into the staging directory
    network: ContainerNetwork
    network_namespace: str | None  # the path of the engine's prepared namespace, if it gave one
    hooks: Hooks
    notes: tuple[str, ...]  # what was accepted without effect, one sentence each


def valid_container_id(container_id: str) -> bool:
    """An ID is used as a directory name and in messages: letters, digits and _.+- only, no
    leading dot or dash (so never `.`, `..` or an option), as runc demands."""
    return 0 < len(container_id) <= MAX_CONTAINER_ID and _CONTAINER_ID.fullmatch(container_id) is not None


class _Reader:
    """Collects problems and notes while reading one JSON document, each with its key path."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    def problem(self, key: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(self.file, key, message, hint))

    def note(self, key: str, message: str) -> None:
        self.notes.append(f"{self.file}: {key}: {message}")

    def raise_if_any(self) -> None:
        if self.problems:
            raise ManifestError(self.problems)

    def table(self, value: Any, key: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"{_show(value)} is not an object")
            return {}
        return value

    def string(self, value: Any, key: str, *, absolute: bool = False) -> str | None:
        if not isinstance(value, str):
            self.problem(key, f"{_show(value)} is not a string")
            return None
        if "\0" in value:
            self.problem(key, f"{_show(value)} contains a NUL character")
            return None
        if absolute and not value.startswith("/"):
            self.problem(key, f"{_show(value)} is not an absolute path")
            return None
        return value

    def integer(self, value: Any, key: str, *, low: int = 0, high: int = (1 << 32) - 1) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"{_show(value)} is not an integer")
            return None
        if not low <= value <= high:
            self.problem(key, f"{value} is out of range ({low} to {high})")
            return None
        return value


def _show(value: Any) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def exec_process(data: Any, *, file: str) -> ExecProcess:
    """The process an `exec --process FILE` (or config.json's `process`) describes."""
    reader = _Reader(file)
    process = _process(reader, reader.table(data, ""), prefix="")
    reader.raise_if_any()
    assert process is not None
    return process


def _process(reader: _Reader, data: Mapping[str, Any], *, prefix: str) -> ExecProcess | None:
    def key(name: str) -> str:
        return f"{prefix}{name}"

    argv: list[str] = []
    args = data.get("args")
    if not isinstance(args, list) or not args:
        reader.problem(key("args"), "is required: the program and its arguments")
    else:
        for i, arg in enumerate(args):
            text = reader.string(arg, key(f"args[{i}]"))
            if text is not None:
                if len(text.encode("utf-8", "surrogateescape")) >= MAX_ARG_STRLEN:
                    reader.problem(key(f"args[{i}]"), f"is longer than the {MAX_ARG_STRLEN - 1} bytes Linux passes")
                argv.append(text)
        if argv and argv[0] == "":
            reader.problem(key("args[0]"), "\"\" is not a program")
    if "commandLine" in data:
        reader.problem(key("commandLine"), "is for Windows; use args")

    env: dict[str, str] = {}
    for i, entry in enumerate(data.get("env") or ()):
        text = reader.string(entry, key(f"env[{i}]"))
        if text is None:
            continue
        name, sep, value = text.partition("=")
        if not sep or not name:
            reader.problem(key(f"env[{i}]"), f"{_show(text)} is not NAME=VALUE")
            continue
        env.pop(name, None)  # the last of a name counts, as with runc
        env[name] = value

    cwd = data.get("cwd", "/")
    cwd = reader.string(cwd, key("cwd"), absolute=True) or "/"

    user = reader.table(data.get("user"), key("user"))
    uid = reader.integer(user.get("uid", 0), key("user.uid"))
    gid = reader.integer(user.get("gid", 0), key("user.gid"))
    groups: list[int] = []
    for i, g in enumerate(user.get("additionalGids") or ()):
        number = reader.integer(g, key(f"user.additionalGids[{i}]"))
        if number is not None and number not in groups:
            groups.append(number)
    if user.get("umask") not in (None, 0o022):
        reader.note(key("user.umask"), f"{user['umask']:o} is not applied; the program gets init's umask 022")
    if "username" in user:
        reader.problem(key("user.username"), "is for Windows; give uid and gid")

    terminal = data.get("terminal", False)
    if not isinstance(terminal, bool):
        reader.problem(key("terminal"), f"{_show(terminal)} is not true or false")
        terminal = False
    console_size = None
    size = reader.table(data.get("consoleSize"), key("consoleSize"))
    if size:
        rows = reader.integer(size.get("height"), key("consoleSize.height"), high=65535)
        cols = reader.integer(size.get("width"), key("consoleSize.width"), high=65535)
        if rows and cols:
            console_size = (rows, cols)

    rlimits: list[Rlimit] = []
    for i, item in enumerate(data.get("rlimits") or ()):
        item = reader.table(item, key(f"rlimits[{i}]"))
        kind = item.get("type")
        name = kind[len("RLIMIT_"):] if isinstance(kind, str) and kind.startswith("RLIMIT_") else None
        if name not in RLIMIT_NAMES:
            reader.problem(key(f"rlimits[{i}].type"), f"{_show(kind)} is not a resource limit Linux has")
            continue
        soft = reader.integer(item.get("soft"), key(f"rlimits[{i}].soft"), high=RLIM_INFINITY)
        hard = reader.integer(item.get("hard"), key(f"rlimits[{i}].hard"), high=RLIM_INFINITY)
        if soft is None or hard is None:
            continue
        if soft > hard:
            reader.problem(key(f"rlimits[{i}]"), f"the soft limit {soft} is above the hard limit {hard}")
            continue
        rlimits = [r for r in rlimits if r.name != name]
        rlimits.append(Rlimit(name=name, soft=None if soft == RLIM_INFINITY else soft,
                              hard=None if hard == RLIM_INFINITY else hard))

    for name, why in PROCESS_IGNORED.items():
        if name in data and why:
            reader.note(key(name), why)
    if uid is None or gid is None or not argv:
        return None
    return ExecProcess(argv=tuple(argv), env=tuple(env.items()), cwd=os.path.normpath(cwd),
                       user=GuestUser(uid=uid, gid=gid, groups=tuple(groups)), terminal=terminal,
                       console_size=console_size, rlimits=tuple(rlimits))


def _hostname(reader: _Reader, value: Any, container_id: str) -> str:
    """config.json's hostname, else the first 12 characters of the ID, as docker names its
    containers' hosts (runc would keep the host's own name, which a VM should not learn)."""
    if value is None or value == "":
        candidate = container_id[:12]
        return candidate if _HOSTNAME_LABEL.fullmatch(candidate) else "microvm"
    text = reader.string(value, "hostname")
    if text is None:
        return "microvm"
    if len(text) > 64 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in text.split(".")):
        reader.problem("hostname", f"{_show(text)} is not a hostname the guest can take",
                       "letters, digits and '-', at most 63 per dot-separated label")
    return text


def _options(reader: _Reader, value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        reader.problem(key, f"{_show(value)} is not a list of strings")
        return []
    return value


def _read_only(options: list[str]) -> bool:
    flags = [o for o in options if o in ("ro", "rw")]
    return bool(flags) and flags[-1] == "ro"


def _resources(reader: _Reader, linux: Mapping[str, Any]) -> dict[str, int]:
    """resources.cpus and .memory from the container's cgroup limits (a limit is what the VM gets),
    within the schema's bounds; absent ones keep the schema's defaults."""
    resources = reader.table(linux.get("resources"), "linux.resources")
    out: dict[str, int] = {}
    limit = reader.table(resources.get("memory"), "linux.resources.memory").get("limit")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        bounds = schema_node(("resources", "memory"))
        mib = math.ceil(limit / (1 << 20))
        out["memory"] = min(max(mib, bounds["minimum"]), bounds["maximum"])
        if mib != out["memory"]:
            reader.note("linux.resources.memory.limit", f"{limit} bytes is outside what a VM here can have; "
                        f"the VM gets {out['memory']} MiB")
    cpu = reader.table(resources.get("cpu"), "linux.resources.cpu")
    quota, period = cpu.get("quota"), cpu.get("period")
    if isinstance(quota, int) and isinstance(period, int) and quota > 0 and period > 0:
        bounds = schema_node(("resources", "cpus"))
        out["cpus"] = min(max(math.ceil(quota / period), bounds["minimum"]), bounds["maximum"])
    return out


def container_manifest(
    config: Any,
    *,
    bundle: str,
    container_id: str,
    staging: str,
    kind: Callable[[str], PathKind] = path_kind,
    config_name: str = "config.json",
) -> Container:
    """The VM for a bundle. `bundle` is the bundle's absolute directory, `staging` the host
    directory the backend will stage single files into; `kind` says what a path on the host is.
    Raises ManifestError with every problem, each naming its key in config.json."""
    reader = _Reader(config_name)
    data = reader.table(config, "")
    reader.raise_if_any()

    version = data.get("ociVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        reader.problem("ociVersion", f"{_show(version)} is not a version of the OCI runtime spec this runtime reads (1.x)")

    process = _process(reader, reader.table(data.get("process"), "process"), prefix="process.")
    if "process" not in data:
        reader.problem("process", "is required")

    # The root: the engine's mounted root filesystem, shared live.
    root = reader.table(data.get("root"), "root")
    root_path = reader.string(root.get("path"), "root.path") if "path" in root else None
    if "path" not in root:
        reader.problem("root.path", "is required")
    root_dir = ""
    if root_path is not None:
        root_dir = os.path.normpath(os.path.join(bundle, root_path))
        if kind(root_dir) is not PathKind.DIRECTORY:
            reader.problem("root.path", f"{_show(root_path)} is not a directory ({root_dir})")
    read_only_root = root.get("readonly", False) is True

    hostname = _hostname(reader, data.get("hostname"), container_id)
    linux = reader.table(data.get("linux"), "linux")
    for name, why in IGNORED.items():
        section, _, leaf = name.rpartition(".")
        present = leaf in (linux if section == "linux" else data)
        if present and why:
            reader.note(name, why)

    network, network_namespace = ContainerNetwork.HOST, None
    for i, ns in enumerate(linux.get("namespaces") or ()):
        ns = reader.table(ns, f"linux.namespaces[{i}]")
        kind_name, path = ns.get("type"), ns.get("path")
        if kind_name == "network" and isinstance(path, str) and path:
            network, network_namespace = ContainerNetwork.NAMESPACE, path
            reader.note(f"linux.namespaces[{i}]", f"the network namespace {path} is the VM's network: the VM takes "
                        "over its interface (network.mode \"netns\")")
        elif kind_name == "network":
            network = ContainerNetwork.NEW
            reader.note(f"linux.namespaces[{i}]", "a new network namespace, made by the runtime, is the VM's network: "
                        "the VM takes over the interface the hooks put there, if any (network.mode \"netns\")")
        elif kind_name == "user":
            reader.note(f"linux.namespaces[{i}]", "the guest has no user namespace: IDs are the guest's own")
        elif path:
            reader.note(f"linux.namespaces[{i}]", f"the {kind_name} namespace {path} is not joined: the VM has its own")
    if linux.get("uidMappings") or linux.get("gidMappings"):
        key = "linux.uidMappings" if linux.get("uidMappings") else "linux.gidMappings"
        reader.problem(key, "ID mappings are not supported: the guest would see the host's IDs on shared files",
                       "run the engine without a user namespace (userns-remap, rootless) for this runtime")
    devices = linux.get("devices")
    if devices:
        paths = [d.get("path") for d in devices if isinstance(d, dict)]
        reader.problem("linux.devices", f"{_show(paths)}: host devices cannot be passed into the VM")

    if network is ContainerNetwork.HOST:
        reader.note("linux.namespaces", "no network namespace (the host's network): the VM gets QEMU's user-mode "
                    "network, outbound only (network.mode \"user\")")
    hooks = _hooks(reader, data.get("hooks"))
    resources = _resources(reader, linux)
    shares, mounts, staged = _mounts(reader, data.get("mounts"), bundle=bundle, staging=staging, kind=kind)
    reader.raise_if_any()
    assert process is not None

    # A manifest document, given the schema's defaults and built as a TOML one is; then what has no
    # manifest key: the user, rlimits, terminal, the staged files' share and the guest's mounts.
    document = {
        "version": 1,
        "hostname": hostname,
        "image": {"source": str(ImageSource.DIRECTORY), "path": root_dir,
                  "mode": str(RootMode.READ_ONLY if read_only_root else RootMode.READ_WRITE)},
        "process": {"argv": list(process.argv), "env": dict(process.env), "cwd": process.cwd},
        "resources": resources,
        "shares": {s.tag: {"host": s.host, "guest": s.guest, "read_only": s.read_only} for s in shares},
        **({"network": {"mode": "user"}} if network is ContainerNetwork.HOST else {}),
    }
    config_path = os.path.join(bundle, config_name)
    manifest = from_document(with_defaults(document), files=(config_path,), name=config_path)
    manifest = replace(
        manifest,
        # exactly config.json's environment: from_document would add a PATH
        process=replace(manifest.process, env=tuple(sorted(process.env)), user=process.user,
                        rlimits=process.rlimits, tty=process.terminal),
        shares=tuple(replace(s, hidden=s.tag == STAGING_TAG) for s in manifest.shares),
        mounts=tuple(mounts),
    )
    return Container(manifest=manifest, process=process, staged=tuple(staged), network=network,
                     network_namespace=network_namespace, hooks=hooks, notes=tuple(reader.notes))


def _hooks(reader: _Reader, value: Any) -> Hooks:
    """config.json's hooks (runtime spec, config.md, POSIX-platform hooks), each checked by key."""
    hooks = reader.table(value, "hooks")
    found: dict[str, list[Hook]] = {}
    for kind, entries in hooks.items():
        if kind in GUEST_HOOKS:
            if entries:
                reader.note(f"hooks.{kind}", GUEST_HOOKS[kind])
            continue
        if kind not in RUN_HOOKS:
            reader.note(f"hooks.{kind}", "is not a hook the runtime spec has: not run")
            continue
        if not isinstance(entries, list):
            reader.problem(f"hooks.{kind}", f"{_show(entries)} is not a list")
            continue
        for i, entry in enumerate(entries):
            hook = _hook(reader, reader.table(entry, f"hooks.{kind}[{i}]"), f"hooks.{kind}[{i}]")
            if hook is not None:
                found.setdefault(kind, []).append(hook)
    return Hooks(**{_HOOK_FIELDS[kind]: tuple(hs) for kind, hs in found.items()})


def _hook(reader: _Reader, data: Mapping[str, Any], key: str) -> Hook | None:
    if "path" not in data:
        reader.problem(f"{key}.path", "is required")
        return None
    path = reader.string(data["path"], f"{key}.path", absolute=True)
    args, env = [], None
    for name in ("args", "env"):
        items = data.get(name)
        if items is None:
            continue
        if not isinstance(items, list):
            reader.problem(f"{key}.{name}", f"{_show(items)} is not a list")
            continue
        texts = [reader.string(item, f"{key}.{name}[{i}]") for i, item in enumerate(items)]
        if name == "env":
            for i, text in enumerate(texts):
                if text is not None and (not text.partition("=")[1] or text.startswith("=")):
                    reader.problem(f"{key}.env[{i}]", f"{_show(text)} is not NAME=VALUE")
            env = [t for t in texts if t is not None]
        else:
            args = [t for t in texts if t is not None]
    timeout = data.get("timeout")
    if timeout is not None:
        timeout = reader.integer(timeout, f"{key}.timeout", low=1)
    if path is None:
        return None
    return Hook(path=path, args=tuple(args), env=None if env is None else tuple(env), timeout=timeout)


@dataclass(frozen=True, slots=True)
class _Share:
    tag: str
    host: str
    guest: str
    read_only: bool


def _mounts(reader: _Reader, value: Any, *, bundle: str, staging: str,
            kind: Callable[[str], PathKind]) -> tuple[list[_Share], list[Mount], list[StagedFile]]:
    shares: list[_Share] = []
    mounts: list[Mount] = []
    staged: list[StagedFile] = []
    if value is None:
        return shares, mounts, staged
    if not isinstance(value, list):
        reader.problem("mounts", f"{_show(value)} is not a list")
        return shares, mounts, staged
    seen: dict[str, str] = {}
    for i, entry in enumerate(value):
        key = f"mounts[{i}]"
        entry = reader.table(entry, key)
        destination = reader.string(entry.get("destination"), f"{key}.destination", absolute=True)
        if destination is None:
            continue
        destination = os.path.normpath(destination)
        options = _options(reader, entry.get("options"), f"{key}.options")
        mount_type = entry.get("type") or ("bind" if {"bind", "rbind"} & set(options) else "")
        if mount_type in GUEST_MADE.get(destination, ()):
            if mount_type == "bind":
                reader.note(key, f"{destination} is the guest's own tmpfs, not the host's {entry.get('source')}")
            continue
        if mount_type in NOT_IN_VM:
            reader.note(key, f"{mount_type} on {destination}: {NOT_IN_VM[mount_type]}")
            continue
        if destination in ("/", "/proc", "/sys", "/dev"):
            reader.problem(f"{key}.destination", f"{_show(destination)} with type {_show(mount_type)}: the guest "
                           "makes this mount itself and cannot replace it")
            continue
        if destination in seen:
            # A later mount on the same point hides the earlier one: only the last is visible.
            reader.note(key, f"{destination} is mounted twice; the last mount ({key}) is the one the program sees")
        seen[destination] = key
        unknown = [o for o in options if o not in QUIET_OPTIONS and not TMPFS_DATA.fullmatch(o)]
        flags = [o for o in unknown if o in ("nosuid", "nodev", "noexec", "nosymfollow")]
        if flags:
            reader.note(f"{key}.options", f"{', '.join(flags)} not applied in the guest")
        if "tmpcopyup" in options:
            reader.note(f"{key}.options", f"tmpcopyup: the tmpfs on {destination} starts empty")
        if mount_type == "tmpfs":
            data = ",".join(o for o in options if TMPFS_DATA.fullmatch(o))
            mounts.append(Mount(kind=MountKind.TMPFS, target=destination, read_only=_read_only(options), options=data))
            continue
        if mount_type != "bind":
            reader.problem(f"{key}.type", f"{_show(mount_type)} on {destination}: the guest can make bind and tmpfs "
                           "mounts only")
            continue
        source = reader.string(entry.get("source"), f"{key}.source")
        if source is None:
            continue
        source = os.path.normpath(os.path.join(bundle, source))
        read_only = _read_only(options)
        what = kind(source)
        if what is PathKind.DIRECTORY:
            tag = f"m{len(shares)}"
            assert len(tag) <= MAX_TAG
            shares.append(_Share(tag=tag, host=source, guest=destination, read_only=read_only))
        elif what is PathKind.FILE:
            name = str(len(staged))
            staged.append(StagedFile(source=source, name=name, destination=destination, read_only=read_only))
            mounts.append(Mount(kind=MountKind.BIND, target=destination, source=f"{STAGING_GUEST}/{name}",
                                read_only=read_only))
        elif what is PathKind.MISSING:
            reader.problem(f"{key}.source", f"{_show(source)} does not exist")
        else:
            reader.problem(f"{key}.source", f"{_show(source)} is a {what}, which cannot cross into a VM",
                           "only directories and regular files can be shared")
    if staged:
        # Writable if any file is: each read-only file is bound read-only on its own.
        shares.append(_Share(tag=STAGING_TAG, host=staging, guest=STAGING_GUEST,
                             read_only=all(f.read_only for f in staged)))
    return shares, mounts, staged
