"""microvmc-runtime on the engines' networks. podman (CNI's bridge plugin) prepares a network
namespace with eth0 and gives its path in config.json; docker asks for a new namespace without a path
and wires it in its prestart hook (libnetwork-setkey moves the veth into /proc/<state pid>/ns/net):
the runtime makes that namespace, runs the hook, and joins the VM to the eth0 found there either way
(network.mode "netns", backends/netns.py). So a microVM container and a runc container on the same
network reach each other by their addresses, both ways, and docker's `-p` (its userland proxy)
reaches a server in the VM, as podman's `-p` does (CNI's portmap plugin: iptables DNAT to eth0's
address; iptables left as it was). `--network host` gives the VM QEMU's user-mode network."""

from __future__ import annotations

import http.server
import re
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from imagekit import free_port
from oci_engines import BUSYBOX_IMAGE, EngineUnderTest, Podman, _wrappers, engine_param, leftovers, run_container

pytestmark = [pytest.mark.engine, pytest.mark.boot]

RT, RUNC = "microvm", "runclog"
SERVER = "mkdir /tmp/w && echo {text} > /tmp/w/index.html && exec httpd -f -p 80 -h /tmp/w"
BOOT_WAIT = 180.0  # seconds a detached VM container gets to serve (a loaded machine, TCG)


@pytest.fixture(params=["podman", "docker"])
def eut(request):
    eut = engine_param(request)
    yield eut
    _gone(eut)


def _address(eut, container: str) -> str:
    return eut.engine.run("inspect", "-f", "{{.NetworkSettings.IPAddress}}", container,
                          check=True).stdout.decode().strip()


def _detached(eut, runtime: str, text: str, *options: str) -> str:
    r = eut.engine.run("run", "-d", *options, "--runtime", runtime, BUSYBOX_IMAGE, "sh", "-c",
                       SERVER.format(text=text), check=True)
    return r.stdout.decode().strip()


def _remove(eut, container: str) -> None:
    eut.engine.run("rm", "-f", *(["-t", "0"] if eut.name == "podman" else []), container, check=True)


def _gone(eut) -> None:
    deadline = time.monotonic() + 20
    while (found := leftovers(eut, RT)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert found == []


def _get(url: str, deadline: float) -> bytes:
    """The body of `url` once something answers there, retried until `deadline`."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return answer.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_a_microvm_container_reaches_a_runc_container_by_its_address(eut) -> None:
    server = _detached(eut, RUNC, "from-runc")
    try:
        address = _address(eut, server)
        r = run_container(eut, RT, BUSYBOX_IMAGE, [
            "sh", "-c", f"ls /sys/class/net; for i in 1 2 3 4 5; do timeout 10 wget -q -O - http://{address}/ && exit; "
                        "sleep 1; done; exit 1"])
    finally:
        _remove(eut, server)
    assert r.returncode == 0, (r.stdout, r.stderr.decode(), eut.calls[RT].lines())
    assert r.stdout.decode() == "eth0\nlo\nfrom-runc\n"


def test_a_runc_container_reaches_a_microvm_container_by_its_address(eut) -> None:
    server = _detached(eut, RT, "from-the-vm")
    try:
        address = _address(eut, server)
        r = run_container(eut, RUNC, BUSYBOX_IMAGE, [
            "sh", "-c", f"for i in $(seq 60); do timeout 10 wget -q -O - http://{address}/ && exit; sleep 1; done; exit 1"])
    finally:
        _remove(eut, server)
    assert r.returncode == 0, (r.stdout, r.stderr.decode())
    assert r.stdout.decode() == "from-the-vm\n"


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


def test_docker_publish_reaches_the_server_in_the_vm(request) -> None:
    """`docker run -p 127.0.0.1:PORT:80`: docker-proxy on the host connects to the container's
    address on docker's bridge, which is the VM's."""
    docker = engine_param(request, "docker")
    port = free_port()
    server = _detached(docker, RT, "published", "-p", f"127.0.0.1:{port}:80")
    try:
        body = _get(f"http://127.0.0.1:{port}/", time.monotonic() + BOOT_WAIT)
        # the state's pid (the monitor) lives in the namespace docker wired: where eth0 is
        pid = docker.engine.run("inspect", "-f", "{{.State.Pid}}", server, check=True).stdout.decode().strip()
        links = _links(int(pid))
    finally:
        _remove(docker, server)
    assert body == b"published\n"
    assert links == ["eth0", "lo"]
    _gone(docker)


def _links(pid: int) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute(netns=f"/proc/{pid}/ns/net") as ipr:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                      if not link.get_attr("IFLA_IFNAME").startswith("mvmc"))  # the VM's own tap


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"from-the-host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_host_network_is_user_mode(eut) -> None:
    """`--network host`: config.json has no network namespace; the VM gets QEMU's user-mode network,
    where the host's loopback is 10.0.2.2."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = run_container(eut, RT, BUSYBOX_IMAGE, [
            "sh", "-c", f"ls /sys/class/net; wget -q -O - http://10.0.2.2:{server.server_address[1]}/"],
            network="host")
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, (r.stdout, r.stderr.decode(), eut.calls[RT].lines())
    assert r.stdout.decode() == "eth0\nlo\nfrom-the-host\n"
