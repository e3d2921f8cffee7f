"""network.mode = "netns", booted, without a container engine: a namespace made the way an engine
makes one (a veth pair, one end in it as eth0 with an address and a default route), the manifest
filled in from backends/netns.observe, and the VM joined to eth0 by a tap and tc mirred redirects.
The guest reaches a server on the host end of the veth, the host reaches a server in the guest at
eth0's address, and afterwards the namespace is as it was and nothing of the run is left."""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from microvmc.backends.netns import observe
import test_netns

pytestmark = [pytest.mark.boot,
              pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                 reason="needs root and /dev/net/tun")]

MICROVMC = [sys.executable, "-m", "microvmc"]
TIMEOUT = 240


namespace = test_netns.namespace  # the fixture: eth0 on a veth pair, as an engine makes it


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def netns_manifest(path: Path, script: str, network: str) -> Path:
    """A manifest at `path` running `script` on the namespace network whose keys `network` gives."""
    path.write_text(f'version = 1\n[image]\nmode = "overlay"\n[process]\nargv = ["/bin/sh", "-c", {json.dumps(script)}]\n'
                    f'[network]\nmode = "netns"\n{network}')
    return path


def answers(env: dict[str, str], manifest: Path, urls: list[str]) -> tuple[int, dict[str, bytes], bytes, bytes]:
    """`microvmc run manifest`: what the guest's server answers at each url once it listens, then
    (after a line to its stdin) the run's status, stdout and stderr; the VM is gone afterwards."""
    vm = subprocess.Popen([*MICROVMC, "run", str(manifest)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    bodies = {}
    try:
        deadline = time.monotonic() + TIMEOUT
        for url in urls:
            while url not in bodies and time.monotonic() < deadline and vm.poll() is None:
                try:
                    bodies[url] = urllib.request.urlopen(url, timeout=5).read()
                except OSError:
                    time.sleep(0.5)
        out, err = vm.communicate(b"\n", timeout=TIMEOUT)
    finally:
        vm.kill()
        vm.wait()
    return vm.returncode, bodies, out, err


def test_a_vm_on_a_network_namespace_reaches_and_is_reached(boot_env, tmp_path, namespace) -> None:
    path, subnet = namespace
    name = path.rsplit("/", 1)[1]
    ip("-n", name, "link", "set", "eth0", "mtu", "1400")  # an engine's smaller MTU (a tunnel's): the guest takes it
    seen = observe(path)
    assert (seen.interface, seen.address, seen.gateway, seen.mtu) == ("eth0", f"{subnet}.2/24", f"{subnet}.1", 1400)
    before = ip("-n", name, "-br", "link")

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("from the host\n")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = http.server.ThreadingHTTPServer((f"{subnet}.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    env = dict(boot_env, XDG_RUNTIME_DIR=str(runtime), TMPDIR=str(runtime))
    script = (f"cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu /etc/resolv.conf; wget -q -O - http://{subnet}.1:{server.server_address[1]}"
              "/hello.txt; mkdir /tmp/w && echo from the guest > /tmp/w/index.html && httpd -p 80 -h /tmp/w && "
              "read line && echo done")
    manifest = netns_manifest(tmp_path / "netns.toml", script,
                              f'namespace = "{path}"\naddress = "{seen.address}"\ngateway = "{seen.gateway}"\n'
                              f'mac = "{seen.mac}"\ndns = ["{subnet}.1"]\nmtu = {seen.mtu}\n')
    try:
        status, bodies, out, err = answers(env, manifest, [f"http://{subnet}.2/"])
    finally:
        server.shutdown()
        server.server_close()
    assert list(bodies.values()) == [b"from the guest\n"], err.decode()
    assert status == 0, err.decode()
    assert out.decode() == f"{seen.mac}\n1400\nnameserver {subnet}.1\nfrom the host\ndone\n"

    # The namespace is as it was: no tap, eth0 without an ingress qdisc; nothing of the run is left.
    assert ip("-n", name, "-br", "link") == before
    qdiscs = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "show"], capture_output=True, text=True).stdout
    assert "ingress" not in qdiscs and "mvmc" not in qdiscs, qdiscs
    assert list(runtime.iterdir()) == []
    ps = subprocess.run(["pgrep", "-a", "-f", seen.mac], capture_output=True, text=True).stdout
    assert [line for line in ps.splitlines() if "qemu" in line] == []


class V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def test_a_vm_on_a_namespace_with_ipv6_and_two_addresses(boot_env, tmp_path, namespace) -> None:
    """The interface has a second IPv4 address and an IPv6 one, with an IPv6 default route: the
    guest gets them all (init, over rtnetlink) and reaches the host end of the veth over IPv6;
    the host reaches the guest's server on each address."""
    path, subnet = namespace
    name = path.rsplit("/", 1)[1]
    host_end, v6 = f"mvmch{name[5:]}", f"fd00:{int(subnet.split('.')[1])}:{int(subnet.split('.')[2])}"
    ip("addr", "add", f"{v6}::1/64", "dev", host_end, "nodad")  # no DAD: usable at once, as the engine's are
    ip("-n", name, "addr", "add", f"{subnet}.3/24", "dev", "eth0")
    ip("-n", name, "addr", "add", f"{v6}::2/64", "dev", "eth0", "nodad")
    ip("-n", name, "-6", "route", "add", "default", "via", f"{v6}::1")
    seen = observe(path)
    assert (seen.address, seen.addresses, seen.gateway, seen.gateway6) == (
        f"{subnet}.2/24", (f"{subnet}.3/24", f"{v6}::2/64"), f"{subnet}.1", f"{v6}::1")

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("over IPv6\n")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = V6Server((f"{v6}::1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    env = dict(boot_env, XDG_RUNTIME_DIR=str(runtime), TMPDIR=str(runtime))
    script = (f"ip -6 route | grep default; grep -v -e '^fe80' -e 'lo$' /proc/net/if_inet6 | cut -c1-32; "
              f"wget -q -O - http://[{v6}::1]:{server.server_address[1]}/hello.txt; "
              "mkdir /tmp/w && echo from the guest > /tmp/w/index.html && httpd -p 80 -h /tmp/w && read line && echo done")
    addresses = ", ".join(f'"{a}"' for a in seen.addresses)
    manifest = netns_manifest(tmp_path / "netns6.toml", script,
                              f'namespace = "{path}"\naddress = "{seen.address}"\naddresses = [{addresses}]\n'
                              f'gateway = "{seen.gateway}"\ngateway6 = "{seen.gateway6}"\nmac = "{seen.mac}"\n')
    try:
        status, bodies, out, err = answers(env, manifest, [f"http://{subnet}.3/", f"http://[{v6}::2]/"])
    finally:
        server.shutdown()
        server.server_close()
    assert status == 0, err.decode()
    assert list(bodies.values()) == [b"from the guest\n"] * 2, err.decode()
    full = ipaddress.IPv6Address(f"{v6}::2").exploded.replace(":", "")
    assert out.decode() == f"default via {v6}::1 dev eth0  metric 1024 \n{full}\nover IPv6\ndone\n"
    assert list(runtime.iterdir()) == []


def test_a_run_after_one_that_was_sigkilled_on_the_same_interface(boot_env, tmp_path, namespace) -> None:
    """A SIGKILLed microvmc leaves its (marked) ingress qdisc on the interface; its tap went with
    QEMU. The next run on that interface removes it and runs; then the namespace is clean."""
    path, subnet = namespace
    name = path.rsplit("/", 1)[1]
    seen = observe(path)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    env = dict(boot_env, XDG_RUNTIME_DIR=str(runtime), TMPDIR=str(runtime))

    def manifest(script: str) -> str:
        return str(netns_manifest(tmp_path / f"m{len(list(tmp_path.iterdir()))}.toml", script,
                                  f'namespace = "{path}"\naddress = "{seen.address}"\ngateway = "{seen.gateway}"\n'
                                  f'mac = "{seen.mac}"\n'))

    first = subprocess.Popen([*MICROVMC, "run", manifest("echo up; read line")], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert first.stdout.readline() == b"up\n", first.stderr.read1().decode()
        first.kill()
        first.wait()
    finally:
        first.kill()
        first.wait()
    deadline = time.monotonic() + 30
    while "mvmc" in ip("-n", name, "-br", "link") and time.monotonic() < deadline:  # the tap goes with QEMU
        time.sleep(0.2)
    qdiscs = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "show", "dev", "eth0"], capture_output=True,
                            text=True).stdout
    assert "ingress" in qdiscs, qdiscs
    r = subprocess.run([*MICROVMC, "run", manifest("cat /sys/class/net/eth0/address")], env=env, capture_output=True,
                       timeout=TIMEOUT)
    assert (r.returncode, r.stdout.decode()) == (0, f"{seen.mac}\n"), r.stderr.decode()
    qdiscs = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "show"], capture_output=True, text=True).stdout
    assert "ingress" not in qdiscs and "mvmc" not in ip("-n", name, "-br", "link"), qdiscs
