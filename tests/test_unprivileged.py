"""`microvmc run` as an ordinary user (uid 65534, `nobody`): virtiofsd needs root, so `transport = "auto"`
shares over 9p and the examples still run; an explicit virtiofs is refused before anything starts.

Runs as root only, to switch to `nobody` with setpriv. The user needs a Python that can import the
project (the venv's interpreter may live under an unreadable /root) and a kernel it can read (a
hard-linked copy of the default one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO, real_kernel_dir

pytestmark = pytest.mark.boot

NOBODY = 65534
TIMEOUT = 180


def as_nobody(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv]


def runs_as_nobody(argv: list[str], env: dict[str, str]) -> bool:
    return subprocess.run(as_nobody(*argv), env=env, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> tuple[list[str], dict[str, str]]:
    """(the command that runs microvmc as nobody, its environment)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to switch to an ordinary user")
    home = Path(tempfile.mkdtemp(prefix="microvmc-nobody-"))
    try:
        home.chmod(0o755)
        kernel = home / "kernel"
        # Hard links: the same inodes, so the copy costs nothing and the files stay root's.
        done = subprocess.run(["cp", "-al", str(real_kernel_dir().resolve()), str(kernel)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot hard-link the kernel: {done.stderr.decode().strip()}")
        private = home / "user"
        private.mkdir()
        os.chown(private, NOBODY, NOBODY)
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(private),
            "TMPDIR": str(private),
            "MICROVMC_KERNEL_DIR": str(kernel),
        }
        site = sysconfig.get_paths()["purelib"]
        venv_python = [sys.executable, "-m", "microvmc"]
        system_python = [f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}", "-c",
                         f"import site, sys; site.addsitedir({site!r}); from microvmc.cli import main; sys.exit(main())"]
        for command in (venv_python, system_python):
            if runs_as_nobody([*command, "--version"], env):
                yield command, env
                break
        else:
            pytest.skip(f"no Python that {NOBODY} can run imports microvmc from {REPO}")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_an_ordinary_user_runs_the_examples_over_9p(user) -> None:
    command, env = user
    plan = subprocess.run(as_nobody(*command, "plan", str(EXAMPLES / "hello.toml")), env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert plan.returncode == 0, plan.stderr
    assert "virtio-9p-device" in plan.stdout and "vhost-user-fs" not in plan.stdout
    assert plan.stdout.startswith("# virtiofsd\n# qemu\n")  # no virtiofsd to start
    hello = subprocess.run(as_nobody(*command, "run", "-v", str(EXAMPLES / "hello.toml")), env=env,
                           capture_output=True, timeout=TIMEOUT)
    assert (hello.returncode, hello.stdout) == (0, b"hello from a microVM\n")
    assert "; root over 9p; logs in " in hello.stderr.decode().splitlines()[1]
    # A read-only data share and an overlay root, both over 9p, in one boot.
    shares = subprocess.run(as_nobody(*command, "run", str(EXAMPLES / "shares.toml")), env=env,
                            capture_output=True, timeout=TIMEOUT)
    assert (shares.returncode, shares.stderr) == (0, b"")
    assert shares.stdout == (EXAMPLES / "data" / "message.txt").read_bytes() + b"scratch\n"
    leftover = [p for p in Path(env["TMPDIR"]).iterdir() if p.name.startswith("microvmc")]
    assert leftover == []


def test_an_explicit_virtiofs_is_refused_in_one_line(user, tmp_path: Path) -> None:
    command, env = user
    manifest = Path(env["HOME"]) / "virtiofs.toml"
    manifest.write_text('version = 1\n[image]\ntransport = "virtiofs"\n[process]\nargv = ["true"]\n')
    r = subprocess.run(as_nobody(*command, "run", str(manifest)), env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 121
    assert r.stderr.startswith(f'microvmc: {manifest}: image.transport: "virtiofs" is not usable here: ')
    assert "needs root" in r.stderr and r.stderr.endswith(' (use "auto" or "9p")\n') and r.stderr.count("\n") == 1


def test_an_ordinary_users_image_keeps_its_owners_and_setuid_bits(user, registry) -> None:
    """The user cannot chown: the unpacked image keeps owners and modes in 9p's mapped-xattr xattrs,
    and the guest sees root's files as root's, setuid bits included, and runs the program as root."""
    command, env = user
    manifest = Path(env["HOME"]) / "debian.toml"
    manifest.write_text(f'version = 1\n[resources]\nboot_timeout = 240\n[image]\nsource = "registry"\n'
                        f'reference = "{registry}/t/debian:oci"\n[process]\nargv = ["/bin/bash", "-c", '
                        '"ls -ln /usr/bin/passwd | cut -d\\" \\" -f1,3,4; stat -c \\"%u %g %a\\" /etc/shadow; id -u; '
                        'readlink /bin/sh"]\n')
    r = subprocess.run(as_nobody(*command, "run", str(manifest)), env=env, capture_output=True, timeout=2 * TIMEOUT)
    assert (r.returncode, r.stderr) == (0, b""), r.stderr
    assert r.stdout == b"-rwsr-xr-x 0 0\n0 42 640\n0\ndash\n"
    store = Path(env["HOME"]) / ".cache" / "microvmc" / "store"
    [rootfs] = list(store.glob("*-image-*"))
    passwd = rootfs / "usr" / "bin" / "passwd"
    assert passwd.stat().st_uid == NOBODY and passwd.stat().st_mode & 0o7777 == 0o600  # on the host: the user's
    assert os.getxattr(passwd, "user.virtfs.uid") == b"\0\0\0\0"
