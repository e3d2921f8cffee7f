"""A bundle's config.json, translated (compiler/oci.py), staged (backends/oci.py) and booted: what the
guest program sees of its user, limits and mounts, and what its writes do on the host. No engine."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from oci_engines import busybox_rootfs, mounts_below

pytestmark = pytest.mark.boot

SCRIPT = r"""
id
echo "nofile $(ulimit -n) $(ulimit -Hn)"
echo "hosts: $(cat /etc/hosts)"
echo "ro: $(cat /etc/ro.txt)"
echo "shm: $(cat /etc/other-fs.txt)"
echo "data: $(cat /data/a.txt)"
echo changed > /etc/hosts && echo hosts-written
echo x 2>/dev/null > /etc/ro.txt || echo ro-refused
echo y 2>/dev/null > /data/b || echo data-refused
touch /var/tmp/t && echo var-tmp-writable
touch /newfile 2>/dev/null || echo root-refused
ls -a /run | tr '\n' ' '; echo
hostname
"""

# Runs in a subprocess, as `microvmc run` would: translate, stage, compile, build, boot, unstage.
DRIVER = r"""
import json, sys
from pathlib import Path
from microvmc.backends.build import realize
from microvmc.backends.host import probe_host
from microvmc.backends.oci import stage_files, unstage
from microvmc.backends.monitor import run_plan
from microvmc.compiler.oci import container_manifest
from microvmc.compiler.pipeline import compile_manifest

bundle, staging, store, logs = map(Path, sys.argv[1:5])
c = container_manifest(json.loads((bundle / "config.json").read_text()), bundle=str(bundle),
                       container_id="boot-test-container", staging=str(staging))
print("\n".join(stage_files(c.staged, staging)), file=sys.stderr)
try:
    compiled = compile_manifest(c.manifest, facts=probe_host(), store=str(store))
    realize(compiled)
    logs.mkdir()
    status = run_plan(compiled.plan, log_dir=logs)
finally:
    unstage(staging)
sys.exit(status)
"""


def bind(source: Path, destination: str, *options: str) -> dict:
    return {"destination": destination, "type": "bind", "source": str(source), "options": ["rbind", *options]}


def test_bundle_mounts_user_and_limits(boot_env, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    busybox_rootfs(bundle / "rootfs")
    host = tmp_path / "host"
    (host / "data").mkdir(parents=True)
    (host / "data" / "a.txt").write_text("in a directory\n")
    (host / "hosts").write_text("127.0.0.1 localhost\n")
    (host / "hosts").chmod(0o666)
    (host / "ro.txt").write_text("read only\n")
    # a file on another filesystem (tmpfs) than the staging directory: bind-mounted, not linked
    other = Path("/dev/shm") / f"mvmc-test-{uuid.uuid4().hex}"
    other.write_text("from tmpfs\n")
    config = {
        "ociVersion": "1.0.2-dev",
        "process": {"args": ["/bin/sh", "-c", SCRIPT], "env": ["PATH=/bin"], "cwd": "/",
                    "user": {"uid": 1000, "gid": 1000, "additionalGids": [10]},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "bundle-host",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
            bind(host / "hosts", "/etc/hosts", "rw"),
            bind(host / "ro.txt", "/etc/ro.txt", "ro"),
            bind(other, "/etc/other-fs.txt", "ro"),
            bind(host / "data", "/data", "ro"),
            {"destination": "/var/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777", "nosuid"]},
        ],
        "linux": {"namespaces": [{"type": "mount"}, {"type": "network"}], "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}},
    }
    (bundle / "config.json").write_text(json.dumps(config))
    staging = tmp_path / "staging"
    try:
        r = subprocess.run([sys.executable, "-c", DRIVER, str(bundle), str(staging), boot_env["MICROVMC_STORE"],
                            str(tmp_path / "logs")], env=boot_env, capture_output=True, timeout=300)
    finally:
        other.unlink()
    out = r.stdout.decode().splitlines()
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert out == [
        "uid=1000(user) gid=1000(user) groups=10",  # additionalGids exactly
        "nofile 123 456",
        "hosts: 127.0.0.1 localhost",
        "ro: read only",
        "shm: from tmpfs",
        "data: in a directory",
        "hosts-written",
        "ro-refused",
        "data-refused",
        "var-tmp-writable",
        "root-refused",
        ". .. ",  # the staged files' share was detached: nothing of it shows
        "bundle-host",
    ], r.stderr
    assert b"bind-mounted into" in r.stderr  # the tmpfs file took the mount path
    # The guest's write reached the host's file (the hard link), and nothing is left mounted or staged.
    assert (host / "hosts").read_text() == "changed\n"
    assert (host / "ro.txt").read_text() == "read only\n"
    assert not staging.exists() and mounts_below(tmp_path) == []
    assert not (bundle / "rootfs" / "etc" / "hosts").exists()  # the read-only image was not written
