"""VMs booted from each image source: a registry (busybox and a real Debian userland), an OCI
layout, a docker archive, an OCI bundle; the image's Entrypoint, Cmd, Env, WorkingDir and User
honoured; Debian's bash, apt-get and python3 run as root and as another user, with ownership and
setuid bits as the image has them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import imagekit
from conftest import private_runtime

pytestmark = pytest.mark.boot

MICROVMC = [sys.executable, "-m", "microvmc"]
TIMEOUT = 400
BBOX_OUT = b"cmd in /srv/work as 1000:1000 groups 1000 10 from-the-image\n"


@pytest.fixture(scope="module")
def env(boot_env, tmp_path_factory) -> dict[str, str]:
    return private_runtime(boot_env, tmp_path_factory)


def run(env, manifest: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MICROVMC, "run", str(manifest), *args], env=env, input=b"", capture_output=True,
                          timeout=TIMEOUT)


def manifest(tmp_path: Path, name: str, image: str, process: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    # A generous boot timeout: these check images, and six engineers share two cores here.
    path.write_text(f"version = 1\nhostname = \"{name}\"\n[resources]\nboot_timeout = 240\n[image]\n{image}\n"
                    + (f"[process]\n{process}\n" if process else ""))
    return path


def test_registry_image_config_is_honoured(env, registry, tmp_path):
    app = manifest(tmp_path, "bbox", f'source = "registry"\nreference = "{registry}/t/bbox:v2s2"')
    r = run(env, app)
    assert (r.returncode, r.stdout, r.stderr) == (0, BBOX_OUT, b"")
    # The argv replaces Cmd and keeps the Entrypoint (sh -c); the user and cwd stay the image's.
    r = run(env, app, "--", 'echo "$0" $(id -un) $HOME; ls -ln /usr/bin/su-test | cut -c1-10; exit 7')
    assert (r.returncode, r.stdout, r.stderr) == (7, b"/bin/sh app /home/app\n-rwsr-xr-x\n", b"")


def test_debian_from_the_registry(env, registry, tmp_path):
    script = ('echo "$BASH_VERSION" | cut -d. -f1; apt-get --version | head -n 1 | cut -d" " -f1; '
              'python3 -c "import os, sys; print(sys.version_info[0], os.getuid(), os.getgroups())"; '
              'ls -ln /usr/bin/passwd | cut -d" " -f1,3,4; stat -c "%u %g %a %n" /etc/shadow')
    image = f'source = "registry"\nreference = "{registry}/t/debian:oci"\nmode = "overlay"'
    root = tmp_path / "debian.toml"
    root.write_text(f'version = 1\nhostname = "debian"\n[resources]\nboot_timeout = 240\n[image]\n{image}\n[process]\nargv = ["/bin/bash", "-c", '
                    f'{_toml(script)}]\n')
    r = run(env, root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "5" and lines[1] == "apt"
    assert lines[2] == "3 0 []"  # root, with no supplementary groups
    assert lines[3] == "-rwsr-xr-x 0 0"  # the setuid bit and the owner survive
    assert lines[4] == "0 42 640 /etc/shadow"  # group shadow (42), as Debian ships it
    other = tmp_path / "nobody.toml"
    other.write_text(f'version = 1\nhostname = "debian"\n[resources]\nboot_timeout = 240\n[image]\n{image}\n[process]\nuser = "nobody"\n'
                     'argv = ["/usr/bin/python3", "-c", "import os; print(os.getuid(), os.getgid(), os.getcwd()); '
                     'open(\\"/etc/shadow\\")"]\ncwd = "/tmp"\n')
    r = run(env, other)
    assert r.stdout == b"65534 65534 /tmp\n"
    assert r.returncode == 1 and b"PermissionError: [Errno 13] Permission denied: '/etc/shadow'" in r.stderr


def _toml(text: str) -> str:
    import json

    return json.dumps(text)


def test_layout_archive_and_bundle_sources(env, image_layout, tmp_path):
    """One boot per source: an OCI layout (the two-layer image: its whiteouts and opaque
    directory applied), a docker archive, an OCI bundle (its rootfs shared live)."""
    check = 'test ! -e /etc/gone && cat /etc/replaced /etc/keep && ls /opt && id -u'
    layout = manifest(tmp_path, "layout", f'source = "oci-layout"\npath = "{image_layout}"\ntag = "layered"',
                      f"argv = [{_toml(check)}]")
    r = run(env, layout)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"new\nkept\nupper\n1000\n", b"")
    archive = tmp_path / "bbox.tar"
    imagekit.run("skopeo", "copy", "--quiet", f"oci:{image_layout}:bbox", f"docker-archive:{archive}:t/bbox:1")
    r = run(env, manifest(tmp_path, "archive", f'source = "docker-archive"\npath = "{archive}"'))
    assert (r.returncode, r.stdout, r.stderr) == (0, BBOX_OUT, b"")
    bundle = tmp_path / "bundle"
    imagekit.run("umoci", "unpack", "--image", f"{image_layout}:bbox", str(bundle))
    (bundle / "rootfs" / "srv" / "work" / "live").write_text("seen live\n")
    r = run(env, manifest(tmp_path, "bundle", f'source = "oci-bundle"\npath = "{bundle}"',
                          'argv = ["/bin/sh", "-c", "cat live; id -u"]'))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"seen live\n1000\n", b"")
