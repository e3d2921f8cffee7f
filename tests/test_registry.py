"""Pulling from a real registry (Debian's docker-registry on 127.0.0.1), and what the store then
holds: each manifest type, by tag and by digest, platforms, a corrupted blob, an interrupted
download, bearer-token auth, `images`, the lockfile, `gc`, and the image sources compiled."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

import imagekit
from conftest import real_kernel_dir
from microvmc.backends.blobs import BlobStore
from microvmc.backends.images import pull
from microvmc.backends.registry import RegistryClient, RegistryError, credentials_for, is_loopback
from microvmc.compiler.ociimage import MANIFEST_ACCEPT, MediaType, parse_platform, parse_reference
from microvmc.errors import MicrovmcError


def microvmc(*args: str, env: dict, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "microvmc", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"microvmc {' '.join(args)}: {done.returncode}: {done.stderr}")
    return done


@pytest.fixture
def env(tmp_path) -> dict:
    e = dict(os.environ)
    e.update(MICROVMC_STORE=str(tmp_path / "store"), XDG_CACHE_HOME=str(tmp_path / "cache"),
             XDG_STATE_HOME=str(tmp_path / "state"), HOME=str(tmp_path / "home"),
             MICROVMC_KERNEL_DIR=str(real_kernel_dir()))
    return e


def registry_manifest(host: str, name: str, ref: str) -> tuple[bytes, str]:
    request = urllib.request.Request(f"http://{host}/v2/{name}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT})
    with urllib.request.urlopen(request) as answer:
        return answer.read(), answer.headers["Content-Type"]


@pytest.mark.parametrize("name, media_type", [
    ("t/bbox:oci", MediaType.OCI_MANIFEST),
    ("t/bbox:v2s2", MediaType.DOCKER_MANIFEST),
    ("t/multi:oci", MediaType.OCI_INDEX),
    ("t/multi:v2s2", MediaType.DOCKER_LIST),
])
def test_pull_each_manifest_type(registry, env, tmp_path, name, media_type):
    repo, tag = name.split(":")
    body, content_type = registry_manifest(registry, repo, tag)
    assert content_type == media_type  # the image really is of that type
    done = microvmc("pull", f"{registry}/{name}", env=env)
    assert done.stdout == "sha256:" + hashlib.sha256(body).hexdigest() + "\n"
    assert done.stderr == ""  # no progress display when stderr is not a terminal
    blobs = BlobStore(str(tmp_path / "store"))
    assert blobs.read(done.stdout.strip()) == body
    images = json.loads(microvmc("images", "--json", env=env).stdout)
    assert [(i["source"], i["platform"], i["present"]) for i in images] == [(f"{registry}/{name}", "linux/amd64", True)]
    assert images[0]["size"] > 900_000  # busybox
    if media_type in (MediaType.OCI_INDEX, MediaType.DOCKER_LIST):
        single = "t/bbox:oci" if media_type == MediaType.OCI_INDEX else "t/bbox:v2s2"
        expected = hashlib.sha256(registry_manifest(registry, *single.split(":"))[0]).hexdigest()
        assert images[0]["manifest"] == f"sha256:{expected}"  # the index's amd64 entry


def test_pull_by_digest_and_platform(registry, tmp_path):
    store = str(tmp_path / "store")
    body, _ = registry_manifest(registry, "t/bbox", "oci")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert pull(f"{registry}/t/bbox@{digest}", store=store).digest == digest
    assert pull(f"{registry}/t/bbox:oci@{digest}", store=store).manifest == digest
    arm = pull(f"{registry}/t/multi:oci", store=store, platform=parse_platform("linux/arm64/v8"))
    assert arm.manifest != digest and arm.platform == parse_platform("linux/arm64/v8")
    with pytest.raises(MicrovmcError) as err:
        pull(f"{registry}/t/multi:oci", store=store, platform=parse_platform("linux/s390x"))
    assert str(err.value) == (f"{registry}/t/multi:oci: no image for platform linux/s390x; "
                              "it has linux/amd64, linux/arm64/v8")
    with pytest.raises(RegistryError) as err:
        pull(f"{registry}/t/bbox@sha256:{'0' * 64}", store=store)
    assert str(err.value).startswith(f"{registry}/t/bbox@sha256:{'0' * 64}: not found in {registry}")


def test_pull_errors_are_one_line(registry, env):
    done = microvmc("pull", f"{registry}/t/nothing:here", env=env, check=False)
    assert done.returncode == 125
    assert done.stderr.startswith(f"microvmc: {registry}/t/nothing:here: not found in {registry}")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    done = microvmc("pull", "127.0.0.1:1/x", env=env, check=False)
    assert done.stderr == "microvmc: 127.0.0.1:1: cannot reach the registry (Connection refused)\n"


def _unique_image(tmp_path: Path, host: str, name: str) -> tuple[str, str]:
    """An image with a layer of its own (so it can be corrupted alone); (reference, layer digest)."""
    layer = tmp_path / "own.tar"
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        data = os.urandom(300_000)
        info = tarfile.TarInfo("payload")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    layer.write_bytes(buf.getvalue())
    imagekit._umoci_image(tmp_path / "own", "x", [layer], ["--architecture", "amd64", "--os", "linux"])
    imagekit.push(tmp_path / "own", "x", host, name, format="oci")
    manifest = json.loads(registry_manifest(host, name.split(":")[0], name.split(":")[1])[0])
    return f"{host}/{name}", manifest["layers"][0]["digest"]


def _registry_blob(host_root: Path, digest: str) -> Path:
    hexd = digest.split(":")[1]
    return next(host_root.rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data"))


def test_corrupted_blob_is_refused_and_not_kept(registry, tmp_path, tmp_path_factory):
    ref, layer = _unique_image(tmp_path, registry, "t/corrupt:1")
    storage = Path(tmp_path_factory.getbasetemp())
    data = _registry_blob(storage, layer)
    content = bytearray(data.read_bytes())
    content[1000] ^= 0xFF
    data.write_bytes(bytes(content))
    store = tmp_path / "store"
    with pytest.raises(MicrovmcError) as err:
        pull(ref, store=str(store))
    assert f"t/corrupt:1: layer 1/1 {layer[7:19]}: the download has digest sha256:" in str(err.value)
    assert str(err.value).endswith(f"not {len(content)} bytes with digest {layer}; it was not used")
    blobs = BlobStore(str(store))
    assert not blobs.has(layer)
    assert [p.name for p in blobs.leftovers() if not p.name.endswith(".lock")] == []


def test_interrupted_download_resumes_or_restarts(registry, tmp_path):
    ref, layer = _unique_image(tmp_path, registry, "t/resume:1")
    store = tmp_path / "store"
    pull(ref, store=str(store))  # the whole image, to learn the layer's bytes
    blobs = BlobStore(str(store))
    whole = blobs.read(layer)
    # An interrupted transfer left half the blob: the next pull asks for the rest (206) and verifies it all.
    blobs.path(layer).unlink()
    partial = blobs.path(layer).with_name(blobs.path(layer).name + ".partial")
    partial.write_bytes(whole[: len(whole) // 2])
    pull(ref, store=str(store))
    assert blobs.read(layer) == whole and not partial.exists()
    # A partial file with wrong bytes fails verification once, is removed, and the next pull starts afresh.
    blobs.path(layer).unlink()
    partial.write_bytes(b"x" * 1000)
    with pytest.raises(MicrovmcError, match="it was not used"):
        pull(ref, store=str(store))
    assert not partial.exists() and not blobs.has(layer)
    pull(ref, store=str(store))
    assert blobs.read(layer) == whole


class _TokenProxy(http.server.BaseHTTPRequestHandler):
    """A registry front that wants a bearer token (as Docker Hub does), from its token service
    that wants the user and password `tester:secret`."""

    upstream = ""
    token = "opaque-token-123"

    def log_message(self, *args):
        pass

    def do_GET(self):
        port = self.server.server_address[1]
        if self.path.startswith("/token"):
            expected = "Basic " + base64.b64encode(b"tester:secret").decode()
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"token": self.token}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="http://127.0.0.1:{port}/token",'
                                                 'service="test",scope="repository:t/bbox:pull"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.upstream + self.path, headers=headers)) as up:
                body = up.read()
                self.send_response(up.status)
                for k, v in up.headers.items():
                    if k.lower() in ("content-type", "docker-content-digest"):
                        self.send_header(k, v)
        except urllib.error.HTTPError as err:
            body = err.read()
            self.send_response(err.code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_bearer_token_auth_with_credentials_from_an_auth_file(registry, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenProxy)
    _TokenProxy.upstream = f"http://{registry}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        front = f"127.0.0.1:{server.server_address[1]}"
        environ = {"HOME": str(tmp_path)}
        with pytest.raises(RegistryError) as err:
            pull(f"{front}/t/bbox:oci", store=str(tmp_path / "store"), environ=environ)
        assert str(err.value) == f"{front}/t/bbox: the token service refused anonymously (HTTP 401)"
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps({"auths": {front: {"auth": base64.b64encode(b"tester:secret").decode()}}}))
        pulled = pull(f"{front}/t/bbox:oci", store=str(tmp_path / "store"),
                      environ={"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": str(auth)})
        assert pulled.digest == "sha256:" + hashlib.sha256(registry_manifest(registry, "t/bbox", "oci")[0]).hexdigest()
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_from_the_usual_files(tmp_path):
    def auth(user: str) -> dict:
        return {"auth": base64.b64encode(f"{user}:pw".encode()).decode()}

    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(json.dumps({"auths": {"https://index.docker.io/v1/": auth("hub")}}))
    (tmp_path / ".config" / "containers").mkdir(parents=True)
    (tmp_path / ".config" / "containers" / "auth.json").write_text(json.dumps(
        {"auths": {"quay.io/org": auth("org"), "quay.io": auth("quay")}}))
    environ = {"HOME": str(tmp_path)}
    assert credentials_for("docker.io", "library/alpine", environ) == ("hub", "pw")
    assert credentials_for("quay.io", "org/app", environ) == ("org", "pw")
    assert credentials_for("quay.io", "other/app", environ) == ("quay", "pw")
    assert credentials_for("ghcr.io", "x/y", environ) is None


def test_plain_http_only_for_loopback_or_insecure():
    assert RegistryClient(parse_reference("example.com/a")).scheme == "https"
    assert RegistryClient(parse_reference("example.com/a"), insecure=True).scheme == "http"
    assert RegistryClient(parse_reference("alpine")).scheme == "https"
    for host in ("127.0.0.1:5000", "localhost:5000", "[::1]:5000", "127.1.2.3"):
        assert is_loopback(host)
        assert RegistryClient(parse_reference(f"{host}/a")).scheme == "http"
    assert not is_loopback("10.0.0.1:5000")


# --- manifests that use images ---------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def plan_json(env: dict, manifest: Path, *extra: str) -> dict:
    return json.loads(microvmc("plan", "--json", str(manifest), *extra, env=env).stdout)


def guest_argv(plan: dict) -> list[str]:
    from microvmc.compiler.cmdline import decode

    params = dict(p.split("=", 1) for p in plan["cmdline"].split() if p.startswith("MVMC_"))
    return [decode(params[f"MVMC_A{i}"]) for i in range(sum(1 for k in params if k.startswith("MVMC_A")))]


def test_image_config_and_manifest_overrides(registry, env, tmp_path):
    app = write(tmp_path / "app.toml", f'version = 1\n[image]\nsource = "registry"\nreference = "{registry}/t/bbox:oci"\n')
    plan = plan_json(env, app)
    assert guest_argv(plan) == ["/bin/sh", "-c", 'echo "cmd in $PWD as $(id -u):$(id -g) groups $(id -G) $GREETING"']
    params = dict(p.split("=", 1) for p in plan["cmdline"].split() if p.startswith("MVMC_"))
    assert params["MVMC_CWD"] == "/srv/work" and params["MVMC_USER"] == "1000:1000:10,1000"
    # `-- argv` replaces Cmd and keeps the Entrypoint, as `docker run IMAGE argv`.
    assert guest_argv(plan_json(env, app, "--", "echo hi")) == ["/bin/sh", "-c", "echo hi"]
    over = write(tmp_path / "over.toml", f'version = 1\n[image]\nsource = "registry"\nreference = "{registry}/t/bbox:oci"\n'
                 '[process]\nentrypoint = []\nargv = ["/bin/id"]\ncwd = "/"\nuser = "root"\nenv = {PATH = "/bin"}\n')
    plan = plan_json(env, over)
    params = dict(p.split("=", 1) for p in plan["cmdline"].split() if p.startswith("MVMC_"))
    assert guest_argv(plan) == ["/bin/id"] and params["MVMC_CWD"] == "/" and params["MVMC_USER"] == "0:0:"
    assert "MVMC_E0=GREETING=from-the-image" in plan["cmdline"] and "PATH=/bin" in plan["cmdline"]
    bad = write(tmp_path / "bad.toml", f'version = 1\n[image]\nsource = "registry"\nreference = "{registry}/t/bbox:oci"\n'
                '[process]\nuser = "nosuch"\n')
    done = microvmc("plan", str(bad), env=env, check=False)
    assert (done.returncode, done.stderr) == (125, f"{bad}: process.user: process.user: user 'nosuch' is not in "
                                                   "the image's /etc/passwd\n")


def test_whiteouts_and_opaque_directories_from_the_registry(registry, env, tmp_path):
    store = tmp_path / "store"
    pulled = pull(f"{registry}/t/layered:v2s2", store=str(store))
    from microvmc.backends.images import ensure_rootfs
    from microvmc.backends.unpack import default_ownership

    root = Path(ensure_rootfs(str(store), pulled.manifest, default_ownership()))
    assert not (root / "etc/gone").exists()
    assert (root / "etc/replaced").read_text() == "new\n" and (root / "etc/keep").read_text() == "kept\n"
    assert sorted(os.listdir(root / "opt")) == ["upper"]
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    st = os.lstat(root / "usr/bin/su-test")
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o4755)


@pytest.fixture
def sources(image_layout, tmp_path) -> dict[str, Path]:
    """bbox as an OCI layout, a docker archive and an OCI bundle."""
    archive = tmp_path / "bbox-archive.tar"
    imagekit.run("skopeo", "copy", "--quiet", f"oci:{image_layout}:bbox", f"docker-archive:{archive}:t/bbox:1")
    bundle = tmp_path / "bundle"
    imagekit.run("umoci", "unpack", "--image", f"{image_layout}:bbox", str(bundle))
    return {"layout": image_layout, "archive": archive, "bundle": bundle}


@pytest.mark.parametrize("kind, extra", [("oci-layout", 'tag = "layered"'), ("docker-archive", 'tag = "t/bbox:1"'),
                                         ("oci-bundle", "")])
def test_sources_compile_with_the_image_config(sources, env, tmp_path, kind, extra):
    path = sources[{"oci-layout": "layout", "docker-archive": "archive", "oci-bundle": "bundle"}[kind]]
    app = write(tmp_path / "app.toml", f'version = 1\n[image]\nsource = "{kind}"\npath = "{path}"\n{extra}\n')
    plan = plan_json(env, app)
    assert guest_argv(plan) == ["/bin/sh", "-c", 'echo "cmd in $PWD as $(id -u):$(id -g) groups $(id -G) $GREETING"']
    assert "MVMC_USER=1000:1000:" in plan["cmdline"] and "MVMC_CWD=/srv/work" in plan["cmdline"]
    graph = json.loads(microvmc("graph", "--json", str(app), env=env).stdout)
    rootfs = next(n for n in graph["nodes"] if n["id"] == "rootfs")
    if kind == "oci-bundle":
        assert rootfs["builder"] == "source" and rootfs["path"] == str(path / "rootfs")  # shared live
    else:
        assert rootfs["builder"] == "image" and rootfs["path"].startswith(env["MICROVMC_STORE"])


def test_source_errors(sources, env, tmp_path):
    app = write(tmp_path / "app.toml", f'version = 1\n[image]\nsource = "oci-layout"\npath = "{sources["layout"]}"\n')
    done = microvmc("plan", str(app), env=env, check=False)
    assert done.returncode == 125
    assert done.stderr == (f"{app}: image.path: {sources['layout']}: it holds 4 images; choose one with image.tag "
                           "(bbox, debian, layered, multi)\n")
    app = write(tmp_path / "app.toml", f'version = 1\n[image]\nsource = "docker-archive"\npath = "{sources["archive"]}"\n'
                'tag = "nope"\n')
    done = microvmc("plan", str(app), env=env, check=False)
    assert done.stderr == f"{app}: image.path: {sources['archive']}: no image is tagged 'nope' (it has docker.io/t/bbox:1)\n"


def test_lockfile_round_trip(registry, image_layout, env, tmp_path):
    imagekit.push(image_layout, "bbox", registry, "t/moving:1", format="oci")
    # (the Debian kernel: a kernel with modules, so that the lock pins them too)
    app = write(tmp_path / "app.toml", f'version = 1\n[kernel]\nsource = "debian"\n[image]\nsource = "registry"\n'
                f'reference = "{registry}/t/moving:1"\n')
    done = microvmc("build", "--locked", str(app), env=env, cwd=tmp_path, check=False)
    assert (done.returncode, done.stderr) == (125, f"microvmc: app.lock is missing, and --locked needs it "
                                                   f"(make it with: microvmc lock {app})\n")
    microvmc("lock", str(app), env=env, cwd=tmp_path)
    lock = json.loads((tmp_path / "app.lock").read_text())
    first = lock["images"][f"{registry}/t/moving:1"]
    assert first["platforms"]["linux/amd64"] == first["digest"]
    assert set(lock) == {"version", "images", "kernel", "init", "host"} and lock["kernel"]["modules"]
    assert (tmp_path / "app.lock").read_text() == json.dumps(lock, sort_keys=True, indent=2) + "\n"
    built = microvmc("build", "--locked", str(app), env=env, cwd=tmp_path).stdout
    # The tag moves to another image: the lockfile keeps the build where it was, pull or not.
    imagekit.push(image_layout, "layered", registry, "t/moving:1", format="oci")
    microvmc("pull", f"{registry}/t/moving:1", env=env)
    assert microvmc("build", "--locked", str(app), env=env, cwd=tmp_path).stdout == built
    assert microvmc("build", str(app), env=env, cwd=tmp_path).stdout == built
    microvmc("lock", "--update", str(app), env=env, cwd=tmp_path)
    second = json.loads((tmp_path / "app.lock").read_text())["images"][f"{registry}/t/moving:1"]
    assert second["digest"] != first["digest"]
    assert microvmc("build", "--locked", str(app), env=env, cwd=tmp_path).stdout != built
    # A stale lockfile names what changed.
    stale = json.loads((tmp_path / "app.lock").read_text())
    stale["kernel"]["image"] = "sha256:" + "0" * 64
    stale["host"]["qemu"] = "1.0.0"
    (tmp_path / "app.lock").write_text(json.dumps(stale))
    done = microvmc("build", "--locked", str(app), env=env, cwd=tmp_path, check=False)
    assert done.returncode == 125
    assert "microvmc: app.lock is stale: host.qemu: locked 1.0.0, now " in done.stderr
    assert f"kernel.image: locked sha256:{'0' * 64}, now sha256:" in done.stderr
    assert done.stderr.endswith(f"(refresh it with: microvmc lock --update {app})\n")


def test_a_repulled_tag_is_not_a_stale_cached_plan(registry, image_layout, env, tmp_path):
    imagekit.push(image_layout, "bbox", registry, "t/cached:1", format="oci")
    app = write(tmp_path / "app.toml", f'version = 1\n[image]\nsource = "registry"\nreference = "{registry}/t/cached:1"\n')
    first = microvmc("build", "--no-link", str(app), env=env).stdout
    assert microvmc("build", "--no-link", str(app), env=env).stdout == first  # from the evaluation cache
    imagekit.push(image_layout, "layered", registry, "t/cached:1", format="oci")
    assert microvmc("build", "--no-link", str(app), env=env).stdout == first  # the stored tag, until pulled
    microvmc("pull", f"{registry}/t/cached:1", env=env)
    assert microvmc("build", "--no-link", str(app), env=env).stdout != first


def test_gc_keeps_what_is_in_use(registry, env, tmp_path):
    store = tmp_path / "store"
    app = write(tmp_path / "app.toml", f'version = 1\n[image]\nsource = "registry"\nreference = "{registry}/t/bbox:v2s2"\n')
    out = Path(microvmc("build", str(app), env=env, cwd=tmp_path).stdout.strip())
    microvmc("pull", f"{registry}/t/layered:oci", env=env)
    locked = write(tmp_path / "locked.toml", f'version = 1\n[image]\nsource = "registry"\n'
                   f'reference = "{registry}/t/multi:oci"\n')
    microvmc("lock", str(locked), env=env, cwd=tmp_path)
    before = set(BlobStore(str(store)).digests())
    done = microvmc("gc", env=env)
    assert done.stdout.startswith("removed ")
    images = {i["source"] for i in json.loads(microvmc("images", "--json", env=env).stdout)}
    assert images == {f"{registry}/t/bbox:v2s2", f"{registry}/t/multi:oci"}
    after = set(BlobStore(str(store)).digests())
    assert after < before  # layered's own layer went
    assert out.is_dir()
    plan = json.loads((out / "plan.json").read_text())
    assert all(os.path.exists(n["path"]) for n in plan["graph"]["nodes"]
               if n["path"].startswith(str(store)))
    assert microvmc("build", str(app), env=env, cwd=tmp_path).stdout.strip() == str(out)
    # Without the result link and the lockfile, nothing is in use.
    (tmp_path / "result").unlink()
    (tmp_path / "locked.lock").unlink()
    microvmc("gc", env=env)
    assert json.loads(microvmc("images", "--json", env=env).stdout) == []
    assert list(BlobStore(str(store)).digests()) == [] and not out.exists()
