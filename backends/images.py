"""Image sources → an unpacked, read-only root filesystem in the store, and what the image says.

Every source ends as a `ResolvedImage` (compiler/ociimage.py), the value the compiler takes:

- `registry`: pulled once (`pull`), then found by its reference in `<store>/images/refs/`; a
  lockfile's digest, or a digest in the reference, wins over the stored tag.
- `oci-layout`: an OCI image layout directory (index.json, blobs/), by `tag`.
- `docker-archive`: a `docker save` / `podman save` tar (manifest.json, or index.json for OCI ones).
- `oci-bundle`: an OCI runtime bundle (config.json + its rootfs), shared live, never unpacked.
- `directory` and `builtin`: as before; only their /etc/passwd and /etc/group are read.

Blobs go to the blob store (backends/blobs.py) verified; layers are unpacked once per image digest
and ownership representation into a store path, by backends/unpack.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from microvmc.backends.blobs import BlobError, BlobStore
from microvmc.backends.unpack import Layer, Ownership, default_ownership, read_guest_file, unpack_layers
from microvmc.compiler.builtin_image import GROUP as BUILTIN_GROUP, PASSWD as BUILTIN_PASSWD
from microvmc.compiler.layers import LayerError
from microvmc.compiler.manifest import ImageSource, Manifest
from microvmc.compiler.ociimage import (
    LAYER_COMPRESSION,
    MACHINE_ARCH,
    Descriptor,
    ImageConfig,
    ImageError,
    ImageManifest,
    MediaType,
    Platform,
    ProcessDefaults,
    Reference,
    ResolvedImage,
    parse_config,
    parse_manifest,
    parse_platform,
    parse_reference,
    select_platform,
    sha256_digest,
)
from microvmc.compiler.store import digest as value_digest, store_path
from microvmc.errors import ManifestError, MicrovmcError, Problem

__all__ = ["pull", "resolve_image", "host_platform", "list_images", "ImageRecord", "Progress", "rootfs_path",
           "read_bundle", "BundleImage", "UNPACK_VERSION"]

UNPACK_VERSION = 1  # bumped when the unpacker writes differently: old store paths are not reused


class Progress:
    """What pull reports as it downloads (backends/progress.py shows it on a terminal)."""

    def start(self, key: str, label: str, total: int) -> None: ...
    def advance(self, key: str, amount: int) -> None: ...
    def finish(self, key: str) -> None: ...
    def close(self) -> None: ...


def host_platform() -> Platform:
    machine = os.uname().machine
    return Platform(os="linux", architecture=MACHINE_ARCH.get(machine, machine),
                    variant="v8" if machine == "aarch64" else "")


def _platform(text: str | None) -> Platform:
    return parse_platform(text) if text else host_platform()


# --- records of what the store holds -------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class ImageRecord:
    source: str  # the reference, or oci:PATH:TAG, docker-archive:PATH[:TAG]
    digest: str  # what the source resolved to: the index or manifest digest
    manifests: tuple[tuple[str, str], ...]  # (platform, manifest digest) pulled
    updated: float

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "digest": self.digest, "manifests": dict(self.manifests),
                "updated": self.updated}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ImageRecord":
        return cls(source=d["source"], digest=d["digest"], manifests=tuple(sorted(d["manifests"].items())),
                   updated=float(d["updated"]))


def _records_dir(store: str) -> Path:
    return Path(store, "images", "refs")


def record_path(store: str, source: str) -> Path:
    """The file that says what `source` resolved to: a build depends on it (a re-pull changes it)."""
    return _records_dir(store) / (hashlib.sha256(source.encode()).hexdigest()[:32] + ".json")


def _read_record(store: str, source: str) -> ImageRecord | None:
    try:
        return ImageRecord.from_dict(json.loads(record_path(store, source).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(store: str, record: ImageRecord) -> None:
    path = record_path(store, record.source)
    old = _read_record(store, record.source)
    if old and old.digest == record.digest and dict(old.manifests) == dict(record.manifests):
        return  # unchanged: keep the file as it is, so builds that depend on it stay cached
    if old and old.digest == record.digest:
        record = ImageRecord(source=record.source, digest=record.digest, updated=record.updated,
                             manifests=tuple(sorted({**dict(old.manifests), **dict(record.manifests)}.items())))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(record.to_dict(), sort_keys=True, indent=1) + "\n")
    os.replace(tmp, path)


def records(store: str) -> Iterator[ImageRecord]:
    folder = _records_dir(store)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        try:
            yield ImageRecord.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue


def _touch_used(store: str, manifest_digest: str) -> None:
    path = Path(store, "images", "used", manifest_digest.split(":", 1)[1])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        pass  # the last-use time is only for `images`


def last_used(store: str, manifest_digest: str) -> float | None:
    try:
        return Path(store, "images", "used", manifest_digest.split(":", 1)[1]).stat().st_mtime
    except OSError:
        return None


# --- pulling -----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class Pulled:
    reference: Reference
    digest: str  # what the reference names: an index or a manifest
    manifest: str  # the platform's image manifest
    platform: Platform


def _manifest_for_platform(get: Callable[[str, str | None], tuple[bytes, str]], top: str, platform: Platform,
                           blobs: BlobStore, what: str) -> tuple[str, ImageManifest]:
    """Follow an index (nested ones too) to the platform's manifest; every document is stored by
    digest as it is read. `get(digest_or_ref, expected_digest)` → (body, content type)."""
    body, content_type = get(top, None)
    digest = sha256_digest(body)
    for _ in range(4):
        blobs.put(body, digest, what=what)
        doc = parse_manifest(body, content_type, what=what)
        if isinstance(doc, ImageManifest):
            return digest, doc
        chosen = select_platform(doc, platform, what=what)
        body, content_type = get(chosen.digest, chosen.digest)
        digest = chosen.digest
        if sha256_digest(body) != digest:
            raise ImageError(f"{what}: the manifest for {platform} does not match its digest {digest}")
    raise ImageError(f"{what}: indexes nested more than 4 deep")


def _check_platform(config: ImageConfig, platform: Platform, what: str) -> None:
    if config.platform.architecture and config.platform.architecture != platform.architecture:
        raise ImageError(f"{what}: the image is for {config.platform}, and the VM runs {platform}")


def pull(reference: str, *, store: str, platform: Platform | None = None, insecure: bool = False,
         progress: Progress | None = None, environ: Mapping[str, str] = os.environ) -> Pulled:
    """Download an image into the store (what it lacks of it) and record what the reference
    names. Raises RegistryError, BlobError or ImageError (as MicrovmcError)."""
    from microvmc.backends.registry import RegistryClient

    ref = parse_reference(reference)
    platform = platform or host_platform()
    client = RegistryClient(ref, insecure=insecure, environ=environ)
    blobs = BlobStore(store)
    what = str(ref)

    def get(name: str, expect: str | None) -> tuple[bytes, str]:
        if expect and blobs.has(expect):
            return blobs.read(expect), ""
        body, content_type, _ = client.manifest(name, expect=expect)
        return body, content_type

    top_body, top_type, top = client.manifest(ref.manifest_ref)
    manifest_digest, manifest = _manifest_for_platform(
        lambda name, expect: (top_body, top_type) if expect is None else get(name, expect), top, platform, blobs, what)
    config_path = client.blob(manifest.config, blobs, what=f"{what}: config {manifest.config.digest[:19]}")
    config = parse_config(config_path.read_bytes(), what=f"{what}: config")
    _check_platform(config, platform, what)
    try:
        for i, layer in enumerate(manifest.layers):
            label = f"layer {i + 1}/{len(manifest.layers)} {layer.digest[7:19]}"
            if progress and not blobs.has(layer.digest, layer.size):
                progress.start(layer.digest, label, layer.size)
            client.blob(layer, blobs, what=f"{what}: {label}",
                        progress=(lambda n, d=layer.digest: progress.advance(d, n)) if progress else None)
            if progress:
                progress.finish(layer.digest)
    finally:
        if progress:
            progress.close()
    _write_record(store, ImageRecord(source=str(ref), digest=top, manifests=((str(platform), manifest_digest),),
                                     updated=time.time()))
    return Pulled(reference=ref, digest=top, manifest=manifest_digest, platform=platform)


# --- OCI layouts and docker archives -------------------------------------------------------------

def _layout_index(path: Path, tag: str | None, what: str) -> Descriptor:
    try:
        layout = json.loads((path / "oci-layout").read_text())
        index = json.loads((path / "index.json").read_text())
    except FileNotFoundError as err:
        raise ImageError(f"{what}: not an OCI image layout ({os.path.basename(err.filename)} is missing)") from None
    except (OSError, ValueError) as err:
        raise ImageError(f"{what}: not an OCI image layout ({err})") from None
    if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
        raise ImageError(f"{what}: oci-layout is not version 1.0.0")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{what}: index.json lists no images")

    def name(entry: Any) -> str | None:
        return (entry.get("annotations") or {}).get("org.opencontainers.image.ref.name") if isinstance(entry, dict) else None

    names = [name(e) for e in entries]
    if tag is None:
        if len(entries) > 1:
            raise ImageError(f"{what}: it holds {len(entries)} images; choose one with image.tag "
                             f"({', '.join(sorted(n for n in names if n)) or 'none is named'})")
        chosen = entries[0]
    else:
        matching = [e for e, n in zip(entries, names) if n == tag]
        if not matching:
            raise ImageError(f"{what}: no image is tagged {tag!r}"
                             + (f" (it has {', '.join(sorted(n for n in names if n))})" if any(names) else ""))
        chosen = matching[0]
    return Descriptor.from_dict(chosen, f"{what}: index.json")


def _import_layout(path: Path, tag: str | None, platform: Platform, blobs: BlobStore, what: str) -> tuple[str, str]:
    """Copy what the image needs of a layout into the blob store, each blob verified; return
    (the tag's digest, the platform's manifest digest)."""
    top = _layout_index(path, tag, what)

    def blob(digest: str) -> Path:
        return path / "blobs" / "sha256" / digest.split(":", 1)[1]

    def get(name: str, expect: str | None) -> tuple[bytes, str]:
        try:
            return blob(name).read_bytes(), ""
        except OSError:
            raise ImageError(f"{what}: blob {name} is missing from the layout") from None

    manifest_digest, manifest = _manifest_for_platform(get, top.digest, platform, blobs, what)
    if sha256_digest(get(top.digest, None)[0]) != top.digest:
        raise BlobError(f"{what}: the blob {top.digest} does not match its digest; it was not used")
    for d in (manifest.config, *manifest.layers):
        if not blobs.has(d.digest, d.size):
            try:
                with open(blob(d.digest), "rb") as f:
                    blobs.put_file(f, d.digest, d.size, what=f"{what}: blob {d.digest[:19]}")
            except FileNotFoundError:
                raise ImageError(f"{what}: blob {d.digest} is missing from the layout") from None
    return top.digest, manifest_digest


def _sniff_compression(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


_LAYER_TYPE = {"gzip": MediaType.OCI_LAYER_GZIP, "zstd": MediaType.OCI_LAYER_ZSTD, "none": MediaType.OCI_LAYER}


def _import_archive(path: Path, tag: str | None, platform: Platform, blobs: BlobStore, what: str) -> tuple[str, str]:
    """A `docker save` / `podman save` archive: its config and layers go to the blob store, and an
    OCI manifest is made for them (an archive has none), whose digest names the image."""
    try:
        archive = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as err:
        raise ImageError(f"{what}: not a tar archive ({err})") from None
    with archive:
        members = {os.path.normpath(m.name): m for m in archive.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            member = members.get(os.path.normpath(name))
            f = archive.extractfile(member) if member else None
            if f is None:
                raise ImageError(f"{what}: {name} is missing from the archive")
            return f.read()

        if "manifest.json" not in members:
            raise ImageError(f"{what}: not a docker or podman archive (manifest.json is missing)")
        try:
            entries = json.loads(read("manifest.json"))
        except ValueError as err:
            raise ImageError(f"{what}: manifest.json is not JSON ({err})") from None
        if not isinstance(entries, list) or not entries:
            raise ImageError(f"{what}: manifest.json lists no images")
        if tag is None:
            if len(entries) > 1:
                tags = sorted(t for e in entries for t in (e.get("RepoTags") or []))
                raise ImageError(f"{what}: it holds {len(entries)} images; choose one with image.tag ({', '.join(tags)})")
            entry = entries[0]
        else:
            wanted = _normal_tag(tag)
            found = [e for e in entries if wanted in {_normal_tag(t) for t in e.get("RepoTags") or []}]
            if not found:
                tags = sorted(t for e in entries for t in (e.get("RepoTags") or []))
                raise ImageError(f"{what}: no image is tagged {tag!r} (it has {', '.join(tags) or 'no tags'})")
            entry = found[0]
        config_bytes = read(entry["Config"])
        config_digest = sha256_digest(config_bytes)
        config = parse_config(config_bytes, what=f"{what}: config")
        _check_platform(config, platform, what)
        blobs.put(config_bytes, config_digest, what=f"{what}: config")
        layers = []
        for i, name in enumerate(entry.get("Layers") or []):
            member = members.get(os.path.normpath(name))
            f = archive.extractfile(member) if member else None
            if f is None:
                raise ImageError(f"{what}: layer {name} is missing from the archive")
            head = f.read(4)
            f.seek(0)
            sha = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
            digest = "sha256:" + sha.hexdigest()
            f.seek(0)
            compression = _sniff_compression(head)
            if compression == "none" and i < len(config.diff_ids) and config.diff_ids[i] != digest:
                raise BlobError(f"{what}: layer {i + 1} ({name}) does not match the config's diff_id "
                                f"{config.diff_ids[i]}; it was not used")
            blobs.put_file(f, digest, member.size, what=f"{what}: layer {i + 1}")
            layers.append(Descriptor(media_type=_LAYER_TYPE[compression], digest=digest, size=member.size))
    manifest = {"schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
                "config": {"mediaType": MediaType.OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": [layer.to_dict() for layer in layers]}
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    digest = sha256_digest(body)
    blobs.put(body, digest, what=what)
    return digest, digest


def _normal_tag(text: str) -> str:
    """`bbox`, `bbox:latest`, `docker.io/library/bbox:latest` are the same tag (podman saves the
    long form, docker the short one)."""
    try:
        return str(parse_reference(text))
    except ImageError:
        return text


# --- unpacked root filesystems -------------------------------------------------------------------

def rootfs_path(store: str, manifest_digest: str, ownership: Ownership) -> str:
    key = value_digest({"image": manifest_digest, "ownership": str(ownership), "unpacker": UNPACK_VERSION})
    return store_path(store, key, f"image-{manifest_digest[7:19]}")


def ensure_rootfs(store: str, manifest_digest: str, ownership: Ownership, *, notes: list[str] | None = None) -> str:
    """The unpacked root filesystem of an image whose blobs are in the store: unpacked now if
    the store lacks it, aside and renamed into place."""
    out = rootfs_path(store, manifest_digest, ownership)
    if os.path.isdir(out):
        return out
    from microvmc.backends.build import staging

    blobs = BlobStore(store)
    manifest = parse_manifest(blobs.read(manifest_digest), what=manifest_digest)
    assert isinstance(manifest, ImageManifest)
    config = parse_config(blobs.read(manifest.config.digest))
    if config.diff_ids and len(config.diff_ids) != len(manifest.layers):
        raise ImageError(f"{manifest_digest}: the config lists {len(config.diff_ids)} layers, the manifest "
                         f"{len(manifest.layers)}")
    layers = []
    for i, d in enumerate(manifest.layers):
        if not blobs.has(d.digest, d.size):
            raise ImageError(f"{manifest_digest}: layer {d.digest} is not in the store; pull the image again")
        compression = LAYER_COMPRESSION[d.media_type]
        if compression == "none":  # docker archives' layers may be compressed whatever they are called
            with open(blobs.path(d.digest), "rb") as f:
                compression = _sniff_compression(f.read(4))
        layers.append(Layer(path=str(blobs.path(d.digest)), compression=compression, digest=d.digest,
                            diff_id=config.diff_ids[i] if config.diff_ids else None))
    with staging(out) as tmp:
        # mkdtemp made it 0700: as root the image's own mode for / is applied by the unpacker.
        found = unpack_layers(layers, str(tmp), ownership)
        if notes is not None:
            notes.extend(found)
    return out


# --- OCI runtime bundles -----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class BundleImage:
    """What a bundle's config.json says about its root and its program (for the OCI runtime too)."""

    rootfs: str  # absolute
    read_only: bool
    defaults: ProcessDefaults
    config: str  # config.json's path


def read_bundle(bundle: str) -> BundleImage:
    """The root filesystem and process of an OCI runtime bundle, from its config.json. The
    rootfs is a directory the engine (or the user) made: it is shared as it is, live."""
    path = os.path.join(bundle, "config.json")
    what = path
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ImageError(f"{bundle}: not an OCI bundle (config.json is missing)") from None
    except (OSError, ValueError) as err:
        raise ImageError(f"{what}: not JSON ({err})") from None
    root = doc.get("root") if isinstance(doc, dict) else None
    if not isinstance(root, dict) or not isinstance(root.get("path"), str):
        raise ImageError(f"{what}: root.path is required")
    rootfs = os.path.normpath(os.path.join(bundle, root["path"]))
    if not os.path.isdir(rootfs):
        raise ImageError(f"{what}: root.path {root['path']!r} is not a directory")
    process = doc.get("process") or {}
    user = process.get("user") or {}
    env = [tuple(e.split("=", 1)) if "=" in e else (e, "") for e in process.get("env") or [] if isinstance(e, str)]
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    groups = user.get("additionalGids") or []
    return BundleImage(
        rootfs=os.path.abspath(rootfs),
        read_only=bool(root.get("readonly", False)),
        defaults=ProcessDefaults(cmd=tuple(process.get("args") or ()), env=tuple(env), cwd=process.get("cwd") or "",
                                 user=f"{uid}:{gid}" if user else "", groups=tuple(groups) if user else None),
        config=os.path.abspath(path),
    )


# --- the image of a manifest ---------------------------------------------------------------------

def _problem(manifest: Manifest, key: str, err: Exception) -> ManifestError:
    return ManifestError([Problem(manifest.name, key, str(err))])


def resolve_image(manifest: Manifest, *, store: str, pins: Mapping[str, Mapping[str, str]] | None = None,
                  progress: Progress | None = None, environ: Mapping[str, str] = os.environ,
                  notes: list[str] | None = None, refresh: bool = False) -> ResolvedImage:
    """What the manifest's image is: fetched, imported and unpacked into the store as needed.
    `pins` (a lockfile's images) maps a source to {"digest", platform: manifest digest};
    `refresh` asks the registry what a tag names now (lock --update)."""
    image = manifest.image
    try:
        platform = _platform(image.platform)
    except ImageError as err:
        raise _problem(manifest, "image.platform", err) from None
    ownership = default_ownership()
    blobs = BlobStore(store)
    source = image.source
    if source is ImageSource.BUILTIN:
        return ResolvedImage(kind=str(source), passwd=BUILTIN_PASSWD, group=BUILTIN_GROUP)
    if source is ImageSource.DIRECTORY:
        assert image.path
        inputs = tuple(os.path.join(image.path, "etc", f) for f in ("passwd", "group"))
        return ResolvedImage(kind=str(source), rootfs=image.path, live=True,
                             passwd=read_guest_file(image.path, "/etc/passwd", Ownership.NATIVE),
                             group=read_guest_file(image.path, "/etc/group", Ownership.NATIVE), inputs=inputs)
    if source is ImageSource.OCI_BUNDLE:
        assert image.path
        try:
            bundle = read_bundle(image.path)
        except ImageError as err:
            raise _problem(manifest, "image.path", err) from None
        return ResolvedImage(kind=str(source), rootfs=bundle.rootfs, live=True, defaults=bundle.defaults,
                             passwd=read_guest_file(bundle.rootfs, "/etc/passwd", Ownership.NATIVE),
                             group=read_guest_file(bundle.rootfs, "/etc/group", Ownership.NATIVE),
                             inputs=(bundle.config, *(os.path.join(bundle.rootfs, "etc", f) for f in ("passwd", "group"))))
    key = "image.reference" if source is ImageSource.REGISTRY else "image.path"
    try:
        if source is ImageSource.REGISTRY:
            assert image.reference
            ref = parse_reference(image.reference)
            label, inputs = str(ref), (str(record_path(store, str(ref))),)
            pin = (pins or {}).get(str(ref))
            manifest_digest = (pin or {}).get(str(platform))
            if manifest_digest and not _complete(blobs, manifest_digest):
                pulled = pull(str(ref.pinned(pin["digest"])), store=store, platform=platform,
                              insecure=bool(image.insecure), progress=progress, environ=environ)
                if pulled.manifest != manifest_digest:
                    raise ImageError(f"{ref}: the lockfile pins {manifest_digest} for {platform}, and the registry's "
                                     f"{pin['digest']} gives {pulled.manifest}")
                inputs = ()
            elif not manifest_digest:
                record = None if refresh else _read_record(store, str(ref))
                manifest_digest = dict(record.manifests).get(str(platform)) if record else None
                if ref.digest and record and record.digest != ref.digest:
                    manifest_digest = None
                if not manifest_digest or not _complete(blobs, manifest_digest):
                    manifest_digest = pull(str(ref), store=store, platform=platform, insecure=bool(image.insecure),
                                           progress=progress, environ=environ).manifest
            top = (pin or {}).get("digest") or (_read_record(store, str(ref)) or _no_record(ref)).digest
        else:
            assert image.path
            path = Path(image.path)
            if source is ImageSource.OCI_LAYOUT:
                label = f"oci:{os.path.abspath(path)}" + (f":{image.tag}" if image.tag else "")
                top, manifest_digest = _import_layout(path, image.tag, platform, blobs, display(image.path))
                inputs = (str(path / "index.json"),)
            else:
                label = f"docker-archive:{os.path.abspath(path)}" + (f":{image.tag}" if image.tag else "")
                top, manifest_digest = _import_archive(path, image.tag, platform, blobs, display(image.path))
                inputs = (str(path),)
            _write_record(store, ImageRecord(source=label, digest=top, manifests=((str(platform), manifest_digest),),
                                             updated=time.time()))
        rootfs = ensure_rootfs(store, manifest_digest, ownership, notes=notes)
    except (ImageError, LayerError) as err:
        raise _problem(manifest, key, err) from None
    except MicrovmcError as err:
        err.message = f"{manifest.name}: {key}: {err.message}"
        raise
    _touch_used(store, manifest_digest)
    m = parse_manifest(blobs.read(manifest_digest))
    assert isinstance(m, ImageManifest)
    config = parse_config(blobs.read(m.config.digest))
    return ResolvedImage(kind=str(source), source=label, digest=top, manifest_digest=manifest_digest,
                         platform=str(platform), rootfs=rootfs, ownership=str(ownership),
                         defaults=ProcessDefaults.from_config(config),
                         passwd=read_guest_file(rootfs, "/etc/passwd", ownership),
                         group=read_guest_file(rootfs, "/etc/group", ownership), inputs=inputs)


def _no_record(ref: Reference) -> ImageRecord:
    return ImageRecord(source=str(ref), digest=ref.digest or "", manifests=(), updated=0)


def _complete(blobs: BlobStore, manifest_digest: str) -> bool:
    """The manifest and everything it names are in the blob store."""
    if not blobs.has(manifest_digest):
        return False
    try:
        m = parse_manifest(blobs.read(manifest_digest))
    except (ImageError, OSError):
        return False
    return isinstance(m, ImageManifest) and all(blobs.has(d.digest, d.size) for d in (m.config, *m.layers))


def display(path: str) -> str:
    from microvmc.compiler.load import display_path

    return display_path(path)


# --- what the store holds ------------------------------------------------------------------------

def image_size(blobs: BlobStore, manifest_digest: str) -> int:
    try:
        m = parse_manifest(blobs.read(manifest_digest))
    except (OSError, ImageError):
        return 0
    if not isinstance(m, ImageManifest):
        return 0
    return sum(d.size for d in (m.config, *m.layers))


def list_images(store: str) -> list[dict[str, Any]]:
    blobs = BlobStore(store)
    out = []
    for record in records(store):
        for platform, manifest_digest in record.manifests:
            used = last_used(store, manifest_digest)
            out.append({"source": record.source, "digest": record.digest, "platform": platform,
                        "manifest": manifest_digest, "size": image_size(blobs, manifest_digest),
                        "present": _complete(blobs, manifest_digest),
                        "pulled": _iso(record.updated), "last_used": _iso(used) if used else None})
    return out


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

