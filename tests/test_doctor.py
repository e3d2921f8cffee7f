"""`microvmc doctor`: the host and each kernel here, on one screen and as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import own_kernel_dir, real_kernel_dir
from microvmc.backends.doctor import render
from microvmc.kernel.requirements import FEATURES

MICROVMC = [sys.executable, "-m", "microvmc"]

REPORT = {
    "default_kernel": "debian",
    "host": {
        "arch": "x86_64", "euid": 0, "tsc_khz": 2000000,
        "qemu": {"path": "/usr/bin/qemu-system-x86_64", "version": "7.2.0", "microvm": True},
        "virtiofsd": {"path": "", "flavour": "", "usable": False, "reason": "no virtiofsd found"},
        "kvm": {"usable": False, "reason": "/dev/kvm is missing"},
        "limits": {"open files": {"soft": 1024, "hard": None}, "locked memory": {"soft": 65536, "hard": 65536},
                   "processes": {"soft": None, "hard": None},
                   "notes": ["open files soft limit 1024 < 4096: virtiofsd may run out on a big share (ulimit -n)"]},
        "cgroup": {"version": 2, "path": "/ci", "memory.max": "1073741824", "pids.max": "max",
                   "notes": ["memory.max 1073741824 applies to every VM started from here"]},
    },
    "kernels": [
        {"name": "microvmc", "image": "/k/microvmc/vmlinux", "present": False},
        {"name": "debian", "image": "/k/default/vmlinuz", "present": True, "format": "bzimage", "compression": "lz4",
         "release": "6.1.0-x", "pvh": True, "config": "/k/default/config", "modules": "/k/default/modules",
         "features": {"ports": "modules", "virtiofs": "missing", "tmpfs": "built in"}},
    ],
}


def test_render_is_one_screen_and_says_what_each_kernel_cannot_do() -> None:
    assert render(REPORT) == """\
host
  qemu       /usr/bin/qemu-system-x86_64 7.2.0; microvm machine: yes
  virtiofsd  not found: not usable, no virtiofsd found
  kvm        not usable: /dev/kvm is missing
  limits     open files 1024/unlimited; locked memory 65536/65536; processes unlimited/unlimited
  cgroup     v2 /ci; memory.max 1073741824; pids.max max
  note       open files soft limit 1024 < 4096: virtiofsd may run out on a big share (ulimit -n)
  note       memory.max 1073741824 applies to every VM started from here
kernels (the default: debian)
  microvmc  not installed (/k/microvmc/vmlinux)
  debian    6.1.0-x /k/default/vmlinuz (bzimage lz4, PVH; config: /k/default/config)
            modules: ports; missing: virtiofs; built in: tmpfs
"""


@pytest.mark.skipif(not (own_kernel_dir() / "vmlinux").is_file() or not (real_kernel_dir() / "vmlinuz").is_file(),
                    reason="needs both kernels: run scripts/setup")
def test_doctor_on_this_host() -> None:
    """The kernels as the pre-flight check sees them: the own one has everything built in, the Debian
    one loads the ports, virtio-fs, 9p, overlayfs and virtio-net as modules; both boot through PVH."""
    r = subprocess.run([*MICROVMC, "doctor", "--json"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    report = json.loads(r.stdout)
    assert report["host"]["qemu"]["microvm"] is True
    assert report["default_kernel"] == "microvmc"
    kernels = {k["name"]: k for k in report["kernels"]}
    own, debian = kernels["microvmc"], kernels["debian"]
    assert (own["pvh"], own["release"].endswith("-microvmc")) == (True, True)
    assert own["features"] == {key: "built in" for key in FEATURES}
    assert (debian["pvh"], debian["compression"]) == (True, "xz")
    assert {k: v for k, v in debian["features"].items() if v != "built in"} == {
        key: "modules" for key in ("ports", "virtiofs", "9p", "overlay", "network")}
    text = subprocess.run([*MICROVMC, "doctor"], capture_output=True, timeout=120, text=True).stdout
    assert len(text.splitlines()) <= 24
