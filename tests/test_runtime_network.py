"""microvmc-runtime on podman's network: podman (CNI's bridge plugin) prepares a network namespace
with eth0 and gives its path in config.json; the runtime joins the VM to that eth0 (network.mode
"netns", backends/netns.py), so a microVM container and a runc container on the same podman network
reach each other by their addresses, both ways."""

from __future__ import annotations

import time

import pytest

from oci_engines import BUSYBOX_IMAGE, leftovers, run_container

pytestmark = [pytest.mark.engine, pytest.mark.boot]

RT, RUNC = "microvm", "runclog"
SERVER = "mkdir /tmp/w && echo {text} > /tmp/w/index.html && exec httpd -f -p 80 -h /tmp/w"


def _address(podman, container: str) -> str:
    return podman.engine.run("inspect", "-f", "{{.NetworkSettings.IPAddress}}", container,
                             check=True).stdout.decode().strip()


def _detached(podman, runtime: str, text: str) -> str:
    r = podman.engine.run("run", "-d", "--runtime", runtime, BUSYBOX_IMAGE, "sh", "-c", SERVER.format(text=text),
                          check=True)
    return r.stdout.decode().strip()


def _gone(podman) -> None:
    deadline = time.monotonic() + 20
    while (found := leftovers(podman, RT)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert found == []


def test_a_microvm_container_reaches_a_runc_container_by_its_address(podman) -> None:
    server = _detached(podman, RUNC, "from-runc")
    try:
        address = _address(podman, server)
        r = run_container(podman, RT, BUSYBOX_IMAGE, [
            "sh", "-c", f"ls /sys/class/net; for i in 1 2 3 4 5; do timeout 10 wget -q -O - http://{address}/ && exit; "
                        "sleep 1; done; exit 1"])
    finally:
        podman.engine.run("rm", "-f", "-t", "0", server)
    assert r.returncode == 0, (r.stdout, r.stderr.decode())
    assert r.stdout.decode() == "eth0\nlo\nfrom-runc\n"
    _gone(podman)


def test_a_runc_container_reaches_a_microvm_container_by_its_address(podman) -> None:
    server = _detached(podman, RT, "from-the-vm")
    try:
        address = _address(podman, server)
        r = run_container(podman, RUNC, BUSYBOX_IMAGE, [
            "sh", "-c", f"for i in $(seq 60); do timeout 10 wget -q -O - http://{address}/ && exit; sleep 1; done; exit 1"])
    finally:
        podman.engine.run("rm", "-f", "-t", "0", server)
    assert r.returncode == 0, (r.stdout, r.stderr.decode())
    assert r.stdout.decode() == "from-the-vm\n"
    _gone(podman)
