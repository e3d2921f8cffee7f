"""OCI and Docker images as values: references, manifests, indexes, configs, and what an image's
config means for the program (argv, environment, working directory, user).

Pure: everything here parses bytes it is given or decides from values. The registry client, the
image sources and the unpacker (backends/) fetch and read what these functions take.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Mapping

from microvmc.errors import MicrovmcError

__all__ = [
    "MediaType",
    "MANIFEST_ACCEPT",
    "ImageError",
    "Reference",
    "parse_reference",
    "Platform",
    "parse_platform",
    "Descriptor",
    "ImageManifest",
    "ImageIndex",
    "parse_manifest",
    "select_platform",
    "ImageConfig",
    "parse_config",
    "check_digest",
    "sha256_digest",
    "User",
    "parse_user",
    "resolve_user",
    "ProcessDefaults",
    "image_process",
    "ResolvedImage",
]


class MediaType(StrEnum):
    OCI_INDEX = "application/vnd.oci.image.index.v1+json"
    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
    DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
    OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
    DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
    OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
    OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
    OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
    OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
    DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"


INDEX_TYPES = frozenset({MediaType.OCI_INDEX, MediaType.DOCKER_LIST})
MANIFEST_TYPES = frozenset({MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST})
SCHEMA1_TYPES = frozenset({MediaType.DOCKER_SCHEMA1, MediaType.DOCKER_SCHEMA1_SIGNED})
# Every manifest type handled: a registry answers an OCI manifest with 404 when the OCI type is
# missing, and downgrades a Docker image to schema 1 when the Docker types are (NOTES-oci.md).
MANIFEST_ACCEPT = ", ".join([MediaType.OCI_INDEX, MediaType.OCI_MANIFEST, MediaType.DOCKER_LIST,
                             MediaType.DOCKER_MANIFEST])
# How each layer type is compressed (what backends/unpack.py decompresses with).
LAYER_COMPRESSION: dict[str, str] = {
    MediaType.OCI_LAYER: "none",
    MediaType.OCI_LAYER_GZIP: "gzip",
    MediaType.OCI_LAYER_ZSTD: "zstd",
    MediaType.OCI_LAYER_NONDIST_GZIP: "gzip",
    MediaType.DOCKER_LAYER_GZIP: "gzip",
    MediaType.DOCKER_LAYER_FOREIGN: "gzip",
}

DOCKER_HUB = "docker.io"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the distribution spec's limit registries enforce


class ImageError(MicrovmcError):
    """An image, reference or platform is malformed or cannot be used; one sentence."""


# --- references ------------------------------------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
                   r"|\[[0-9a-fA-F:]+\](?::[0-9]+)?")


@dataclass(frozen=True, kw_only=True, slots=True)
class Reference:
    registry: str  # host[:port] as written, "docker.io" for Docker Hub
    repository: str  # library/alpine
    tag: str | None = None
    digest: str | None = None  # sha256:...

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """Where the distribution API of the registry is served."""
        return "registry-1.docker.io" if self.registry == DOCKER_HUB else self.registry

    @property
    def manifest_ref(self) -> str:
        """What to ask the manifests endpoint for: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def pinned(self, digest: str) -> "Reference":
        return Reference(registry=self.registry, repository=self.repository, tag=self.tag, digest=digest)


def parse_reference(text: str) -> Reference:
    """A reference as docker and podman read it. Short names are expanded the way docker does:
    `alpine` is `docker.io/library/alpine:latest`, `user/app` is `docker.io/user/app:latest`; the
    first component is a registry only if it has a `.` or `:` or is `localhost`."""
    if not text or text != text.strip():
        raise ImageError(f"{text!r} is not an image reference")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ImageError(f"{text!r}: {digest!r} is not a sha256 digest (sha256: and 64 lower-case hex digits)")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
        if not _HOST.fullmatch(registry):
            raise ImageError(f"{text!r}: {registry!r} is not a registry host")
    else:
        registry, path = DOCKER_HUB, rest
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise ImageError(f"{text!r}: {tag!r} is not a valid tag")
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _REPOSITORY.fullmatch(path) or len(path) > 255:
        raise ImageError(f"{text!r}: {path!r} is not a repository name (lower-case letters, digits, "
                         "and . _ - separators, components joined by /)")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


# --- platforms -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Platform":
        return cls(os=str(d.get("os", "")), architecture=str(d.get("architecture", "")),
                   variant=str(d.get("variant", "") or ""))


# uname -m → the OCI architecture name; the VM runs the host's architecture.
MACHINE_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
                "riscv64": "riscv64", "i686": "386"}


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_]+", p) for p in parts):
        raise ImageError(f"{text!r} is not a platform (os/architecture[/variant], e.g. linux/amd64)")
    return Platform(os=parts[0], architecture=parts[1], variant=parts[2] if len(parts) == 3 else "")


# --- manifests -------------------------------------------------------------------------------

def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str, what: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ImageError(f"{what}: {digest!r} is not a sha256 digest")
    return digest


@dataclass(frozen=True, kw_only=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None

    @classmethod
    def from_dict(cls, d: Any, what: str) -> "Descriptor":
        if not isinstance(d, dict):
            raise ImageError(f"{what}: a descriptor must be an object")
        size = d.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ImageError(f"{what}: size {size!r} is not a byte count")
        platform = d.get("platform")
        return cls(media_type=str(d.get("mediaType", "")), digest=check_digest(d.get("digest"), what), size=size,
                   platform=Platform.from_dict(platform) if isinstance(platform, dict) else None)

    def to_dict(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageIndex:
    media_type: str
    manifests: tuple[Descriptor, ...]


def parse_manifest(data: bytes, content_type: str = "", *, what: str = "manifest") -> ImageManifest | ImageIndex:
    """An image manifest or index, of any of the four types handled. Schema 1 is refused."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ImageError(f"{what}: {len(data)} bytes is more than a manifest may have ({MAX_MANIFEST_BYTES})")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ImageError(f"{what}: not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: not a JSON object")
    declared = doc.get("mediaType") or content_type.split(";")[0].strip()
    if doc.get("schemaVersion") == 1 or declared in SCHEMA1_TYPES:
        raise ImageError(f"{what}: Docker image manifest schema 1 is not supported (deprecated since 2017); "
                         "push the image again with a current docker, podman or skopeo")
    if doc.get("schemaVersion") != 2:
        raise ImageError(f"{what}: schemaVersion {doc.get('schemaVersion')!r} is not 2")
    if not declared:  # an OCI document may leave mediaType out: tell by its fields
        declared = MediaType.OCI_INDEX if "manifests" in doc else MediaType.OCI_MANIFEST
    if declared in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ImageError(f"{what}: an index needs a list of manifests")
        return ImageIndex(media_type=declared, manifests=tuple(
            Descriptor.from_dict(m, f"{what}: manifests[{i}]") for i, m in enumerate(entries)))
    if declared in MANIFEST_TYPES:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ImageError(f"{what}: an image manifest needs a list of layers")
        parsed = tuple(Descriptor.from_dict(layer, f"{what}: layers[{i}]") for i, layer in enumerate(layers))
        for i, layer in enumerate(parsed):
            if layer.media_type not in LAYER_COMPRESSION:
                raise ImageError(f"{what}: layers[{i}]: media type {layer.media_type!r} is not a layer type "
                                 "microvmc can unpack")
        return ImageManifest(media_type=declared, config=Descriptor.from_dict(doc.get("config"), f"{what}: config"),
                             layers=parsed)
    raise ImageError(f"{what}: media type {declared!r} is not an image manifest or index")


def select_platform(index: ImageIndex, platform: Platform, *, what: str = "index") -> Descriptor:
    """The index's manifest for `platform`. A variant asked for must match; none asked for takes
    the first entry of the architecture (the index's order is the publisher's preference)."""
    images = [m for m in index.manifests if m.media_type in MANIFEST_TYPES or not m.media_type]
    for m in images:
        p = m.platform
        if p and p.os == platform.os and p.architecture == platform.architecture and \
                (not platform.variant or p.variant == platform.variant):
            return m
    offered = sorted({str(m.platform) for m in images if m.platform and m.platform.os != "unknown"})
    raise ImageError(f"{what}: no image for platform {platform}"
                     + (f"; it has {', '.join(offered)}" if offered else "; it lists no platforms"))


# --- the image's config ----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class ImageConfig:
    platform: Platform
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # in the image's order
    working_dir: str = ""
    user: str = ""
    diff_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"platform": str(self.platform), "entrypoint": list(self.entrypoint), "cmd": list(self.cmd),
                "env": [f"{k}={v}" for k, v in self.env], "working_dir": self.working_dir, "user": self.user}


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"{what} must be a list of strings")
    return tuple(value)


def parse_config(data: bytes, *, what: str = "image config") -> ImageConfig:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ImageError(f"{what}: not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: not a JSON object")
    conf = doc.get("config") or {}
    if not isinstance(conf, dict):
        raise ImageError(f"{what}: config must be an object")
    env = []
    for entry in _strings(conf.get("Env"), f"{what}: config.Env"):
        name, _, value = entry.partition("=")
        env.append((name, value))
    rootfs = doc.get("rootfs") or {}
    return ImageConfig(
        platform=Platform(os=str(doc.get("os", "")), architecture=str(doc.get("architecture", "")),
                          variant=str(doc.get("variant", "") or "")),
        entrypoint=_strings(conf.get("Entrypoint"), f"{what}: config.Entrypoint"),
        cmd=_strings(conf.get("Cmd"), f"{what}: config.Cmd"),
        env=tuple(env),
        working_dir=str(conf.get("WorkingDir") or ""),
        user=str(conf.get("User") or ""),
        diff_ids=tuple(check_digest(d, f"{what}: rootfs.diff_ids")
                       for d in _strings(rootfs.get("diff_ids"), f"{what}: rootfs.diff_ids")),
    )


# --- users -----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class User:
    """A user as written (manifest `process.user`, the image's `User`): names or numbers."""

    user: str  # a name or a decimal uid
    group: str | None = None  # a name or a decimal gid; None: the user's primary group
    groups: tuple[int, ...] | None = None  # supplementary groups given as numbers; None: from /etc/group


def parse_user(value: Any) -> User:
    """`"name"`, `"uid"`, `"user:group"` or a table `{uid, gid, groups}`."""
    if isinstance(value, dict):
        uid, gid = value.get("uid"), value.get("gid")
        return User(user=str(uid), group=None if gid is None else str(gid),
                    groups=tuple(value.get("groups", ())) if "groups" in value else None)
    user, sep, group = str(value).partition(":")
    return User(user=user, group=group if sep else None)


def _table(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


MAX_ID = 2**32 - 2  # (uid_t) -1 means "no change" to setuid


def resolve_user(user: User, passwd: str, group: str, *, what: str = "process.user") -> tuple[int, int, tuple[int, ...], str]:
    """(uid, gid, supplementary groups, home) of `user` in an image whose /etc/passwd and
    /etc/group read `passwd` and `group`, the way docker and runc resolve it: a name must exist; a
    number need not (its group is then 0, its home /); the supplementary groups are those that list
    the user by name, and its primary group."""
    users = _table(passwd)
    groups = _table(group)

    def number(text: str) -> int | None:
        if text.isdigit() and text.isascii():
            n = int(text)
            if n > MAX_ID:
                raise ImageError(f"{what}: {text} is larger than the largest id ({MAX_ID})")
            return n
        return None

    uid = number(user.user)
    entry = next((u for u in users if len(u) >= 4 and (u[0] == user.user if uid is None else u[2] == str(uid))), None)
    if uid is None:
        if entry is None:
            raise ImageError(f"{what}: user {user.user!r} is not in the image's /etc/passwd")
        uid = number(entry[2])
        if uid is None:
            raise ImageError(f"{what}: the image's /etc/passwd gives {user.user!r} the uid {entry[2]!r}")
    name = entry[0] if entry else None
    home = entry[5] if entry and len(entry) >= 6 and entry[5] else "/"
    if user.group is None:
        gid = number(entry[3]) if entry else 0
        if gid is None:
            raise ImageError(f"{what}: the image's /etc/passwd gives {name!r} the gid {entry[3]!r}")
    else:
        gid = number(user.group)
        if gid is None:
            found = next((g for g in groups if len(g) >= 3 and g[0] == user.group), None)
            if found is None or number(found[2]) is None:
                raise ImageError(f"{what}: group {user.group!r} is not in the image's /etc/group")
            gid = number(found[2])
    assert gid is not None
    if user.groups is not None:
        extra = tuple(user.groups)
    elif name is not None:
        extra = tuple(n for g in groups if len(g) >= 4 and name in g[3].split(",") and (n := number(g[2])) is not None)
    else:
        extra = ()
    return uid, gid, tuple(sorted(set(extra) | {gid})) if extra else (), home


# --- what the program gets -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class ProcessDefaults:
    """What an image says about the program; the manifest's own values win (image_process)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = ""
    user: str = ""
    groups: tuple[int, ...] | None = None  # supplementary groups given as numbers (an OCI bundle's)

    @classmethod
    def from_config(cls, config: ImageConfig) -> "ProcessDefaults":
        return cls(entrypoint=config.entrypoint, cmd=config.cmd, env=config.env, cwd=config.working_dir,
                   user=config.user)


@dataclass(frozen=True, kw_only=True, slots=True)
class ProcessChoice:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = field(default=())
    cwd: str = "/"
    user: str | None = None  # as written; resolved against the image's passwd and group


def image_process(defaults: ProcessDefaults, *, argv: tuple[str, ...] | None, entrypoint: tuple[str, ...] | None,
                  env: Mapping[str, str], cwd: str | None, user: str | None, default_path: str) -> ProcessChoice:
    """The program as docker runs it: `entrypoint + argv`, where the manifest's `process.argv`
    replaces the image's Cmd and `process.entrypoint` its Entrypoint (an explicit entrypoint also
    drops the image's Cmd, as `docker run --entrypoint` does). The image's Env comes first, the
    manifest's on top; the manifest's cwd and user win over WorkingDir and User."""
    chosen_entry = defaults.entrypoint if entrypoint is None else entrypoint
    if argv is not None:
        chosen_cmd = argv
    elif entrypoint is not None:
        chosen_cmd = ()
    else:
        chosen_cmd = defaults.cmd
    merged = dict(defaults.env)
    merged.update(env)
    merged.setdefault("PATH", default_path)
    return ProcessChoice(argv=(*chosen_entry, *chosen_cmd), env=tuple(sorted(merged.items())),
                         cwd=cwd or defaults.cwd or "/", user=user if user is not None else (defaults.user or None))


@dataclass(frozen=True, kw_only=True, slots=True)
class ResolvedImage:
    """What the compiler needs of a manifest's image, found by backends/images.py before compiling
    (as HostFacts are probed before): where its root filesystem is and what its config says."""

    kind: str  # the image.source
    source: str = ""  # the reference, or oci:PATH[:TAG], docker-archive:PATH[:TAG]
    digest: str = ""  # what the source resolved to (an index or a manifest)
    manifest_digest: str = ""  # the platform's image manifest: names the unpacked root filesystem
    platform: str = ""
    rootfs: str = ""  # the unpacked store path, or the live directory (directory, bundle); "" builtin
    live: bool = False  # a directory shared as it is (changes show), not a store path
    ownership: str = "native"  # how the rootfs records ownership: "native" or "mapped-xattr" (9p)
    defaults: ProcessDefaults = field(default_factory=ProcessDefaults)
    passwd: str = ""  # the image's /etc/passwd, for process.user
    group: str = ""
    inputs: tuple[str, ...] = ()  # host files whose change makes this stale (for the evaluation cache)
