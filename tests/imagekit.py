"""Test images made offline, and a real registry on 127.0.0.1 (Debian's docker-registry).

- `bbox`: busybox-static in an empty image, with an Entrypoint, Cmd, Env, WorkingDir and User, and a
  user `app` (1000:1000, also in group `wheel` 10);
- `layered`: bbox plus an upper layer that deletes and replaces files (whiteouts) and empties a
  directory (an opaque whiteout);
- `multi`: an OCI index of bbox for linux/amd64 and a (config-only) linux/arm64 image;
- `debian`: a Debian 12 userland, `mmdebstrap --variant=minbase --include=python3-minimal,passwd`,
  made once and kept in ~/.cache/microvmc/test-images/ (scripts/setup --test makes it too).

All are OCI layouts made with umoci (and a hand-written index), pushed with skopeo as OCI and as
Docker v2s2.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Iterator

import urllib.request

BUSYBOX = "/bin/busybox"
DEBIAN_CACHE = Path(os.environ.get("MICROVMC_TEST_IMAGES")
                    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "microvmc", "test-images"))
DEBIAN_TAR = DEBIAN_CACHE / "debian-bookworm-minbase-python3.tar"
MMDEBSTRAP = ["mmdebstrap", "--quiet", "--variant=minbase", "--include=python3-minimal,passwd", "bookworm"]

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\nwheel:x:10:app\napp:x:1000:\n"


def run(*argv: str, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def debian_tar() -> Path:
    """The Debian userland as a tar, made with mmdebstrap the first time (about 30 s)."""
    if DEBIAN_TAR.is_file():
        return DEBIAN_TAR
    DEBIAN_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = DEBIAN_CACHE / f"debian-{os.getpid()}.tmp.tar"
    try:
        run("nice", "-n", "10", *MMDEBSTRAP, str(tmp))
        os.replace(tmp, DEBIAN_TAR)
    finally:
        tmp.unlink(missing_ok=True)
    return DEBIAN_TAR


def _tar(entries: list[tuple[str, bytes | None, int, str]]) -> bytes:
    """(name, data or None for a directory, mode, symlink target) → an uncompressed tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, mode, link in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 1_700_000_000
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link
                t.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _busybox_layer() -> bytes:
    applets = run(BUSYBOX, "--list-full").stdout.split()
    entries: list[tuple[str, bytes | None, int, str]] = [(d, None, 0o755, "") for d in
                                                         ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "home")]
    entries += [("tmp", None, 0o1777, ""), ("home/app", None, 0o755, ""), ("srv", None, 0o755, ""),
                ("srv/work", None, 0o755, "")]
    entries.append(("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755, ""))
    entries += [(a, None, 0, "/bin/busybox") for a in sorted(set(applets)) if a != "bin/busybox"]
    entries += [("etc/passwd", PASSWD.encode(), 0o644, ""), ("etc/group", GROUP.encode(), 0o644, ""),
                ("etc/keep", b"kept\n", 0o644, ""), ("etc/gone", b"deleted above\n", 0o644, ""),
                ("etc/replaced", b"old\n", 0o644, ""),
                ("opt", None, 0o755, ""), ("opt/lower1", b"1\n", 0o644, ""), ("opt/lower2", b"2\n", 0o644, ""),
                ("usr/bin/su-test", b"#!/bin/sh\nid -u\n", 0o4755, "")]
    return _tar(entries)


def _upper_layer() -> bytes:
    return _tar([("etc", None, 0o755, ""), ("etc/.wh.gone", b"", 0o644, ""), ("etc/replaced", b"new\n", 0o644, ""),
                 ("opt", None, 0o755, ""), ("opt/.wh..wh..opq", b"", 0o644, ""), ("opt/upper", b"u\n", 0o644, "")])


def _umoci_image(layout: Path, tag: str, layers: list[Path], config: list[str]) -> None:
    if not (layout / "index.json").exists():
        run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:{tag}")
    for layer in layers:
        run("umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", str(layer))
    run("umoci", "config", "--image", f"{layout}:{tag}", *config)


BBOX_CONFIG = ["--config.entrypoint", "/bin/sh", "--config.entrypoint", "-c",
               "--config.cmd", 'echo "cmd in $PWD as $(id -u):$(id -g) groups $(id -G) $GREETING"',
               "--config.env", "GREETING=from-the-image", "--config.env", "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
               "--config.workingdir", "/srv/work", "--config.user", "app", "--architecture", "amd64", "--os", "linux"]


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _add_index(layout: Path, tag: str, base_tag: str) -> None:
    """An OCI index `tag`: base_tag's manifest as linux/amd64, and an arm64 image beside it."""
    index = json.loads((layout / "index.json").read_text())
    base = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == base_tag)
    manifest = json.loads((layout / "blobs" / "sha256" / base["digest"].split(":")[1]).read_bytes())
    config = json.loads((layout / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]).read_bytes())
    config["architecture"] = "arm64"
    config["variant"] = "v8"
    arm_config = _blob(layout, json.dumps(config).encode())
    arm_manifest = dict(manifest, config={**manifest["config"], **arm_config})
    arm = _blob(layout, json.dumps(arm_manifest).encode())
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **arm,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": base["digest"], "size": base["size"],
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]}
    entry = {"mediaType": "application/vnd.oci.image.index.v1+json", **_blob(layout, json.dumps(doc).encode()),
             "annotations": {"org.opencontainers.image.ref.name": tag}}
    index["manifests"].append(entry)
    (layout / "index.json").write_text(json.dumps(index))


def make_layout(work: Path, *, debian: bool = True) -> Path:
    """The OCI layout with bbox, layered, multi (and debian)."""
    layout = work / "layout"
    base, upper = work / "busybox.tar", work / "upper.tar"
    base.write_bytes(_busybox_layer())  # umoci compresses it
    upper.write_bytes(_upper_layer())
    _umoci_image(layout, "bbox", [base], BBOX_CONFIG)
    _umoci_image(layout, "layered", [base, upper], BBOX_CONFIG)
    _add_index(layout, "multi", "bbox")
    if debian:
        _umoci_image(layout, "debian", [debian_tar()],
                     ["--config.cmd", "/bin/bash", "--config.env",
                      "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--architecture", "amd64",
                      "--os", "linux"])
    return layout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def registry(work: Path, *, timeout: float = 30) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 with a free port and its storage in `work`; yields
    host:port, and stops it (and waits for it) on the way out."""
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    port = free_port()
    config = work / "registry.yml"
    config.write_text(json.dumps({"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
                                  "storage": {"filesystem": {"rootdirectory": str(work / "registry")},
                                              "delete": {"enabled": True}},
                                  "http": {"addr": f"127.0.0.1:{port}"}}))
    log = open(work / "registry.log", "wb")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start: {(work / 'registry.log').read_text()[-500:]}")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def push(layout: Path, tag: str, host: str, name: str, *, format: str, all_platforms: bool = False) -> None:
    argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--format", format]
    if all_platforms:
        argv.append("--all")
    run(*argv, f"oci:{layout}:{tag}", f"docker://{host}/{name}")
