"""backends/netns.py without booting (root): observing a namespace's interface, the manifest's
network made from it, a tap joined to the interface by tc and the namespace left as it was."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys

import pytest

from microvmc.backends.netns import NetnsError, namespace_network, observe, tap_joined
from microvmc.compiler.manifest import NetworkMode

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="needs root and /dev/net/tun")


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def namespace():
    """A namespace as an engine makes one: eth0 (10.<a>.<b>.2/24, default via .1) is one end of a
    veth pair whose other end is on the host (.1, up). Yields its path and the subnet's first three bytes."""
    tag = secrets.token_hex(3)
    name, host_end, peer = f"mvmct{tag}", f"mvmch{tag}", f"mvmcp{tag}"
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    try:
        ip("netns", "add", name)
        ip("link", "add", host_end, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", name)
        ip("-n", name, "link", "set", peer, "name", "eth0")
        ip("-n", name, "addr", "add", f"{subnet}.2/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "route", "add", "default", "via", f"{subnet}.1")
        ip("addr", "add", f"{subnet}.1/24", "dev", host_end)
        ip("link", "set", host_end, "up")
        yield f"/run/netns/{name}", subnet
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def tc(path: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", os.path.basename(path), "tc", *args], check=True,
                          capture_output=True, text=True).stdout


def test_observe_and_the_network_made_of_it(namespace) -> None:
    path, subnet = namespace
    mac = json.loads(ip("-n", os.path.basename(path), "-j", "link", "show", "eth0"))[0]["address"]
    seen = observe(path)
    assert (seen.interface, seen.mac, seen.address, seen.gateway, seen.mtu) == ("eth0", mac, f"{subnet}.2/24",
                                                                               f"{subnet}.1", 1500)
    assert observe(path, "eth0") == seen
    network, why = namespace_network(path)
    assert (network.mode, network.namespace, network.interface, network.address, network.gateway, network.mac,
            network.dns, network.mtu, why) == (NetworkMode.NETNS, path, "eth0", f"{subnet}.2/24", f"{subnet}.1", mac,
                                               (), 1500, "")
    ip("-n", os.path.basename(path), "link", "set", "eth0", "mtu", "1400")
    assert namespace_network(path)[0].mtu == observe(path).mtu == 1400
    # IPv6 and further addresses, link-local ones left out (the guest's kernel makes its own)
    ip("-n", os.path.basename(path), "addr", "add", "fd00:5::2/64", "dev", "eth0", "nodad")
    ip("-n", os.path.basename(path), "addr", "add", f"{subnet}.9/24", "dev", "eth0")
    ip("-n", os.path.basename(path), "-6", "route", "add", "default", "via", "fd00:5::1")
    assert "fe80::" in ip("-n", os.path.basename(path), "addr", "show", "eth0")
    network = namespace_network(path)[0]
    assert (network.address, network.addresses, network.gateway, network.gateway6) == (
        f"{subnet}.2/24", (f"{subnet}.9/24", "fd00:5::2/64"), f"{subnet}.1", "fd00:5::1")
    ip("-n", os.path.basename(path), "route", "del", "default")
    assert namespace_network(path) == (None, f"the interface eth0 of network namespace {path} has no default route")
    ip("-n", os.path.basename(path), "link", "del", "eth0")
    assert namespace_network(path) == (None, f"network namespace {path} has no interface other than lo")


def test_observe_refusals(namespace) -> None:
    path, _ = namespace
    with pytest.raises(NetnsError) as err:
        observe("/run/netns/mvmct-none")
    assert str(err.value) == "network namespace /run/netns/mvmct-none does not exist"
    with pytest.raises(NetnsError) as err:
        observe(path, "eth1")
    assert str(err.value) == f"network namespace {path} has no interface 'eth1'"
    ip("-n", os.path.basename(path), "link", "add", "v1", "type", "veth", "peer", "name", "v2")
    with pytest.raises(NetnsError) as err:
        observe(path)
    assert str(err.value).startswith(f"network namespace {path} has 3 interfaces other than lo (")
    assert str(err.value).endswith("): name one in network.interface")


def test_a_tap_is_joined_both_ways_and_the_namespace_left_as_it_was(namespace) -> None:
    path, _ = namespace
    before = (ip("-n", os.path.basename(path), "-br", "link"), tc(path, "qdisc", "show"))
    with tap_joined(path) as fd:
        assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/net/tun"
        links = ip("-n", os.path.basename(path), "-br", "link")
        tap = next(line.split()[0] for line in links.splitlines() if line.startswith("mvmc"))
        shown = json.loads(ip("-n", os.path.basename(path), "-j", "link", "show", tap))[0]
        assert "UP" in shown["flags"] and shown["mtu"] == 1500
        filters = {dev: tc(path, "filter", "show", "dev", dev, "ingress") for dev in ("eth0", tap)}
        assert f"mirred (Egress Redirect to device {tap})" in filters["eth0"], filters
        assert "mirred (Egress Redirect to device eth0)" in filters[tap], filters
        with pytest.raises(NetnsError) as err:
            with tap_joined(path):
                pass
        assert str(err.value) == f"the interface eth0 of network namespace {path} is already joined to another VM (its tap {tap})"
    assert (ip("-n", os.path.basename(path), "-br", "link"), tc(path, "qdisc", "show")) == before
    with pytest.raises(OSError):
        os.fstat(fd)


def test_the_tap_has_the_guests_mtu_at_most_the_interfaces(namespace) -> None:
    path, _ = namespace
    ip("-n", os.path.basename(path), "link", "set", "eth0", "mtu", "1400")
    with tap_joined(path, "", 1280):
        links = json.loads(ip("-n", os.path.basename(path), "-j", "link", "show"))
        assert {link["ifname"][:4]: link["mtu"] for link in links if link["ifname"] != "lo"} == {"eth0": 1400, "mvmc": 1280}
    with pytest.raises(NetnsError) as err:
        with tap_joined(path, "", 1500):
            pass
    assert str(err.value) == (f"network.mtu: 1500 is larger than the MTU 1400 of the interface eth0 of network "
                              f"namespace {path}")
    assert "mvmc" not in ip("-n", os.path.basename(path), "-br", "link")


def test_an_ingress_qdisc_a_killed_run_left_is_removed_and_a_foreign_one_refused(namespace) -> None:
    path, _ = namespace
    # a run SIGKILLed while joined: its tap went with its descriptor, its filter on eth0 stayed, marked
    code = ("import os, signal, sys\nfrom microvmc.backends.netns import tap_joined\n"
            "with tap_joined(sys.argv[1]):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    shown = tc(path, "filter", "show", "dev", "eth0", "ingress")
    assert "pref 28022" in shown and "flowid 6d76:6d63" in shown, shown
    assert "mvmc" not in ip("-n", os.path.basename(path), "-br", "link")
    with tap_joined(path):  # the next run removes it and joins
        assert "mirred (Egress Redirect to device mvmc" in tc(path, "filter", "show", "dev", "eth0", "ingress")
    assert "ingress" not in tc(path, "qdisc", "show", "dev", "eth0")
    # anyone else's ingress qdisc is left alone
    tc(path, "qdisc", "add", "dev", "eth0", "ingress")
    with pytest.raises(NetnsError) as err:
        with tap_joined(path):
            pass
    assert err.value.lines() == [f"the interface eth0 of network namespace {path} already has an ingress qdisc that "
                                 "is not microvmc's (its owner must remove it)"]
    tc(path, "filter", "add", "dev", "eth0", "parent", "ffff:", "pref", "28022", "protocol", "all", "u32", "match",
       "u32", "0", "0", "flowid", "1:1", "action", "mirred", "egress", "redirect", "dev", "lo")  # our priority, not our mark
    with pytest.raises(NetnsError):
        with tap_joined(path):
            pass
    assert "pref 28022" in tc(path, "filter", "show", "dev", "eth0", "ingress")
