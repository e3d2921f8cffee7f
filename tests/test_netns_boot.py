"""network.mode = "netns", booted, without a container engine: a namespace made the way an engine
makes one (a veth pair, one end in it as eth0 with an address and a default route), the manifest
filled in from backends/netns.observe, and the VM joined to eth0 by a tap and tc mirred redirects.
The guest reaches a server on the host end of the veth, the host reaches a server in the guest at
eth0's address, and afterwards the namespace is as it was and nothing of the run is left."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

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
    manifest = tmp_path / "netns.toml"
    manifest.write_text(
        f'version = 1\n[image]\nmode = "overlay"\n[process]\nargv = ["/bin/sh", "-c", {json.dumps(script)}]\n'
        f'[network]\nmode = "netns"\nnamespace = "{path}"\naddress = "{seen.address}"\ngateway = "{seen.gateway}"\n'
        f'mac = "{seen.mac}"\ndns = ["{subnet}.1"]\nmtu = {seen.mtu}\n')
    vm = subprocess.Popen([*MICROVMC, "run", str(manifest)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    body = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while body is None and time.monotonic() < deadline and vm.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://{subnet}.2/", timeout=5).read()
            except OSError:
                time.sleep(0.5)
        out, err = vm.communicate(b"\n", timeout=TIMEOUT)
    finally:
        vm.kill()
        vm.wait()
        server.shutdown()
        server.server_close()
    assert body == b"from the guest\n", err.decode()
    assert vm.returncode == 0, err.decode()
    assert out.decode() == f"{seen.mac}\n1400\nnameserver {subnet}.1\nfrom the host\ndone\n"

    # The namespace is as it was: no tap, eth0 without an ingress qdisc; nothing of the run is left.
    assert ip("-n", name, "-br", "link") == before
    qdiscs = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "show"], capture_output=True, text=True).stdout
    assert "ingress" not in qdiscs and "mvmc" not in qdiscs, qdiscs
    assert list(runtime.iterdir()) == []
    ps = subprocess.run(["pgrep", "-a", "-f", seen.mac], capture_output=True, text=True).stdout
    assert [line for line in ps.splitlines() if "qemu" in line] == []
