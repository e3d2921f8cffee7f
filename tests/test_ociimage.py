"""The pure image values: references, manifests and indexes of every type, configs, users, argv."""

from __future__ import annotations

import json

import pytest

from microvmc.compiler.ociimage import (
    ImageError,
    ImageIndex,
    ImageManifest,
    MediaType,
    Platform,
    ProcessDefaults,
    User,
    image_process,
    parse_config,
    parse_manifest,
    parse_platform,
    parse_reference,
    parse_user,
    resolve_user,
    select_platform,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest.mark.parametrize("text, registry, repository, tag, digest", [
    ("alpine", "docker.io", "library/alpine", "latest", None),
    ("alpine:3.20", "docker.io", "library/alpine", "3.20", None),
    ("docker.io/library/alpine:3.20", "docker.io", "library/alpine", "3.20", None),
    ("index.docker.io/user/app", "docker.io", "user/app", "latest", None),
    ("user/app:v1", "docker.io", "user/app", "v1", None),
    ("127.0.0.1:5000/tools/bbox@" + D1, "127.0.0.1:5000", "tools/bbox", None, D1),
    ("localhost/a/b:t@" + D1, "localhost", "a/b", "t", D1),
    ("quay.io/x/y-z_w.v", "quay.io", "x/y-z_w.v", "latest", None),
])
def test_reference(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_reference_hub_api_host():
    assert parse_reference("alpine").api_host == "registry-1.docker.io"
    assert parse_reference("127.0.0.1:5000/a").api_host == "127.0.0.1:5000"
    assert str(parse_reference("alpine")) == "docker.io/library/alpine:latest"


@pytest.mark.parametrize("text, message", [
    ("Alpine", "'Alpine': 'library/Alpine' is not a repository name (lower-case letters, digits, and . _ - "
               "separators, components joined by /)"),
    ("alpine@sha256:12", "'alpine@sha256:12': 'sha256:12' is not a sha256 digest (sha256: and 64 lower-case hex digits)"),
    ("alpine:-x", "'alpine:-x': '-x' is not a valid tag"),
    ("", "'' is not an image reference"),
    (" alpine", "' alpine' is not an image reference"),
])
def test_reference_errors(text, message):
    with pytest.raises(ImageError) as err:
        parse_reference(text)
    assert str(err.value) == message


def manifest(media_type=MediaType.OCI_MANIFEST, layer_type=MediaType.OCI_LAYER_GZIP, **extra):
    doc = {"schemaVersion": 2, "mediaType": media_type,
           "config": {"mediaType": MediaType.OCI_CONFIG, "digest": D1, "size": 10},
           "layers": [{"mediaType": layer_type, "digest": D2, "size": 20}], **extra}
    return json.dumps(doc).encode()


@pytest.mark.parametrize("media_type", [MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST])
def test_manifest_types(media_type):
    m = parse_manifest(manifest(media_type))
    assert isinstance(m, ImageManifest)
    assert m.media_type == media_type and m.config.digest == D1 and m.layers[0].size == 20


def test_manifest_type_from_header_and_fields():
    doc = json.loads(manifest())
    del doc["mediaType"]
    assert parse_manifest(json.dumps(doc).encode()).media_type == MediaType.OCI_MANIFEST
    assert parse_manifest(json.dumps(doc).encode(), MediaType.DOCKER_MANIFEST + "; charset=utf-8").media_type \
        == MediaType.DOCKER_MANIFEST


@pytest.mark.parametrize("media_type", [MediaType.OCI_INDEX, MediaType.DOCKER_LIST])
def test_index_and_platform(media_type):
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": [
        {"mediaType": MediaType.OCI_MANIFEST, "digest": D1, "size": 1, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": MediaType.OCI_MANIFEST, "digest": D2, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
    ]}
    index = parse_manifest(json.dumps(doc).encode())
    assert isinstance(index, ImageIndex)
    assert select_platform(index, Platform()).digest == D2
    assert select_platform(index, parse_platform("linux/arm64")).digest == D1
    assert select_platform(index, parse_platform("linux/arm64/v8")).digest == D1
    with pytest.raises(ImageError) as err:
        select_platform(index, parse_platform("linux/s390x"))
    assert str(err.value) == "index: no image for platform linux/s390x; it has linux/amd64, linux/arm64/v8"


@pytest.mark.parametrize("body, message", [
    (b'{"schemaVersion": 1, "name": "x", "fsLayers": []}',
     "manifest: Docker image manifest schema 1 is not supported (deprecated since 2017); push the image again "
     "with a current docker, podman or skopeo"),
    (b"[1]", "manifest: not a JSON object"),
    (b"{", "manifest: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    (manifest(layer_type="application/x-foo"), "manifest: layers[0]: media type 'application/x-foo' is not a layer type microvmc can unpack"),
    (manifest(media_type="text/plain"), "manifest: media type 'text/plain' is not an image manifest or index"),
    (json.dumps({"schemaVersion": 2, "config": {"digest": "md5:x", "size": 1}, "layers": []}).encode(),
     "manifest: config: 'md5:x' is not a sha256 digest"),
    (json.dumps({"schemaVersion": 2, "config": {"digest": D1, "size": -1}, "layers": []}).encode(),
     "manifest: config: size -1 is not a byte count"),
])
def test_manifest_errors(body, message):
    with pytest.raises(ImageError) as err:
        parse_manifest(body)
    assert str(err.value) == message


def test_schema1_by_content_type():
    with pytest.raises(ImageError, match="schema 1"):
        parse_manifest(b'{"schemaVersion": 2}', MediaType.DOCKER_SCHEMA1_SIGNED)


def test_config():
    doc = {"architecture": "amd64", "os": "linux", "config": {
        "Entrypoint": ["/bin/tini", "--"], "Cmd": ["sh"], "Env": ["PATH=/x:/y", "A=b=c", "EMPTY="],
        "WorkingDir": "/srv", "User": "app"}, "rootfs": {"type": "layers", "diff_ids": [D1]}}
    c = parse_config(json.dumps(doc).encode())
    assert c.entrypoint == ("/bin/tini", "--") and c.cmd == ("sh",)
    assert c.env == (("PATH", "/x:/y"), ("A", "b=c"), ("EMPTY", ""))
    assert (c.working_dir, c.user, c.diff_ids, str(c.platform)) == ("/srv", "app", (D1,), "linux/amd64")
    with pytest.raises(ImageError) as err:
        parse_config(b'{"config": {"Cmd": "sh"}}')
    assert str(err.value) == "image config: config.Cmd must be a list of strings"


PASSWD = "root:x:0:0:root:/root:/bin/bash\napp:x:1000:1001:App:/home/app:/bin/sh\nbad:x:zz:0::/:\n"
GROUP = "root:x:0:\nappgrp:x:1001:\nwheel:x:10:app,other\naudio:x:29:app\nstaff:x:50:other\n"


@pytest.mark.parametrize("spec, expected", [
    ("root", (0, 0, (), "/root")),
    ("app", (1000, 1001, (10, 29, 1001), "/home/app")),
    ("1000", (1000, 1001, (10, 29, 1001), "/home/app")),
    ("4242", (4242, 0, (), "/")),
    ("app:staff", (1000, 50, (10, 29, 50), "/home/app")),
    ("4242:77", (4242, 77, (), "/")),
    ({"uid": 5, "gid": 6, "groups": [7, 8]}, (5, 6, (6, 7, 8), "/")),
    ({"uid": 1000}, (1000, 1001, (10, 29, 1001), "/home/app")),
])
def test_resolve_user(spec, expected):
    assert resolve_user(parse_user(spec), PASSWD, GROUP) == expected


@pytest.mark.parametrize("spec, message", [
    ("nobody", "process.user: user 'nobody' is not in the image's /etc/passwd"),
    ("app:nogroup", "process.user: group 'nogroup' is not in the image's /etc/group"),
    ("bad", "process.user: the image's /etc/passwd gives 'bad' the uid 'zz'"),
    ("4294967295", "process.user: 4294967295 is larger than the largest id (4294967294)"),
])
def test_resolve_user_errors(spec, message):
    with pytest.raises(ImageError) as err:
        resolve_user(parse_user(spec), PASSWD, GROUP)
    assert str(err.value) == message


IMAGE = ProcessDefaults(entrypoint=("/entry",), cmd=("default", "cmd"), env=(("PATH", "/img"), ("A", "1")),
                        cwd="/srv", user="app")


@pytest.mark.parametrize("argv, entrypoint, expected", [
    (None, None, ("/entry", "default", "cmd")),  # docker run IMG
    (("x", "y"), None, ("/entry", "x", "y")),  # docker run IMG x y: the entrypoint is kept
    (None, ("/other",), ("/other",)),  # docker run --entrypoint /other IMG: the image's Cmd is dropped
    (("x",), ("/other",), ("/other", "x")),
    (("x",), (), ("x",)),  # entrypoint = []: the argv exactly
])
def test_image_process_argv(argv, entrypoint, expected):
    chosen = image_process(IMAGE, argv=argv, entrypoint=entrypoint, env={}, cwd=None, user=None, default_path="/d")
    assert chosen.argv == expected


def test_image_process_env_cwd_user():
    chosen = image_process(IMAGE, argv=None, entrypoint=None, env={"A": "2", "B": "3"}, cwd=None, user=None,
                           default_path="/d")
    assert chosen.env == (("A", "2"), ("B", "3"), ("PATH", "/img"))
    assert (chosen.cwd, chosen.user) == ("/srv", "app")
    chosen = image_process(ProcessDefaults(), argv=("sh",), entrypoint=None, env={}, cwd="/w", user="0",
                           default_path="/d")
    assert (chosen.env, chosen.cwd, chosen.user) == ((("PATH", "/d"),), "/w", "0")
    assert parse_user("a:b") == User(user="a", group="b")
