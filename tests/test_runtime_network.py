"""microvmc-runtime on podman's network: podman (CNI's bridge plugin) prepares a network namespace
with eth0 and gives its path in config.json; the runtime joins the VM to that eth0 (network.mode
"netns", backends/netns.py), so a microVM container and a runc container on the same podman network
reach each other by their addresses, both ways; and `podman run -p` (CNI's portmap plugin: iptables
DNAT to eth0's address) reaches a server in the VM, iptables left as it was."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request

import pytest

from oci_engines import BUSYBOX_IMAGE, EngineUnderTest, Podman, _wrappers, leftovers, run_container

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


def _iptables() -> str:
    """Every table's rules, without the comments and the counters that change by themselves."""
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return "\n".join(re.sub(r" \[\d+:\d+\]$", "", line) for line in out.splitlines() if not line.startswith("#"))


def test_podman_p_reaches_a_server_in_the_vm_and_iptables_is_left_as_it_was(engines_root, busybox_archive,
                                                                              boot_env) -> None:
    """`podman run -d -p 127.0.0.1:PORT:80 --runtime microvm ... httpd`: portmap's DNAT (with its
    masquerade and route_localnet for a loopback host address) sends the host's connection to
    eth0's address in the namespace, whose ingress redirect hands it to the VM."""
    before = _iptables()
    root = engines_root / "podman-portmap"
    root.mkdir()
    runtimes, calls, state = _wrappers(root, boot_env, own_root=True)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    bodies, during = {}, ""
    with Podman(root / "engine", runtimes, portmap=True) as engine:
        engine.run("load", "-i", str(busybox_archive), check=True)
        container = engine.run("run", "-d", "-p", f"127.0.0.1:{ports[0]}:80", "-p", f"{ports[1]}:80", "--runtime", RT,
                               BUSYBOX_IMAGE, "sh", "-c", SERVER.format(text="through-portmap"),
                               check=True).stdout.decode().strip()
        try:
            # the loopback address (portmap's masquerade and route_localnet), and every address: the bridge's
            gateway = engine.run("inspect", "-f", "{{.NetworkSettings.Gateway}}", container,
                                 check=True).stdout.decode().strip()
            deadline = time.monotonic() + 120
            for url in (f"http://127.0.0.1:{ports[0]}/", f"http://{gateway}:{ports[1]}/"):
                while url not in bodies and time.monotonic() < deadline:
                    try:
                        bodies[url] = urllib.request.urlopen(url, timeout=5).read()
                    except OSError:
                        time.sleep(0.5)
            during = _iptables()
            logs = engine.run("logs", container).stderr.decode(errors="replace")
        finally:
            engine.run("rm", "-f", "-t", "0", container)
        assert leftovers(EngineUnderTest("podman", engine, calls, state), RT) == []
    assert list(bodies.values()) == [b"through-portmap\n"] * 2, (bodies, logs)
    assert f"--dport {ports[0]}" in during and f"--dport {ports[1]}" in during  # portmap's DNAT carried them
    assert _iptables() == before
