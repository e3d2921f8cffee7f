"""Networks without booting: `-p` on the command line, the forwards' validation, their lowering, the
evaluation cache's key, the host-port probe, and the guest's name-resolution files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURE_SOURCES, fake_facts
from microvmc.backends.evalcache import CacheKey
from microvmc.backends.ports import PortError, check_forwards
from microvmc.compiler.load import load, parse_publish
from microvmc.compiler.machine import Nic
from microvmc.compiler.manifest import validate
from microvmc.compiler.pipeline import compile_manifest
from microvmc.errors import ManifestError

USER = '[process]\nargv = ["true"]\n[network]\nmode = "user"\n'


def manifest(tmp_path: Path, text: str, **overrides):
    path = tmp_path / "m.toml"
    path.write_text("version = 1\n" + text)
    return validate(load(path, cwd=str(tmp_path)).overridden(**overrides))


def compiled(tmp_path: Path, text: str, **overrides):
    return compile_manifest(manifest(tmp_path, text, **overrides), facts=fake_facts(), store="/s",
                            sources=FIXTURE_SOURCES)


@pytest.mark.parametrize("text, forward", [
    ("8080:80", {"host": 8080, "guest": 80}),  # the protocol is the schema's default, which validation fills in
    ("127.0.0.1:5353:53/udp", {"host": 5353, "guest": 53, "protocol": "udp", "host_address": "127.0.0.1"}),
    ("0.0.0.0:1:2/tcp", {"host": 1, "guest": 2, "protocol": "tcp", "host_address": "0.0.0.0"}),
])
def test_publish_syntax_is_dockers(text: str, forward: dict) -> None:
    assert parse_publish(text) == forward


def test_a_published_port_without_protocol_is_the_schema_s_default(tmp_path: Path) -> None:
    from microvmc.compiler.manifest import schema_node

    m = manifest(tmp_path, '[network]\nmode = "user"\n[process]\nargv = ["true"]\n', publish=["8080:80"])
    assert [str(f.protocol) for f in m.network.forwards] == [schema_node(("network", "forwards", 0, "protocol"))["default"]]


@pytest.mark.parametrize("text, why", [
    ("80", "a host port and a guest port are both needed"),
    ("127.0.0.1::80", "a port is empty (a random host port is not supported)"),
    ("8000-8010:80", '"8000-8010": port ranges are not supported'),
    ("x:80", '"x" is not a port number'),
    ("1:2/sctp", '"sctp" is not tcp or udp'),
    ("a:b:1:2", "too many ':'"),
    (":1:2", "the host address is empty"),
])
def test_publish_syntax_errors(text: str, why: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_publish(text)
    assert err.value.lines() == [f"-p {text}: {why}; expected [HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|udp]"]


def test_publish_joins_the_manifests_forwards_and_is_validated_with_them(tmp_path: Path) -> None:
    text = USER + "forwards = [{ host = 8080, guest = 80 }]\n"
    m = manifest(tmp_path, text, publish=["9090:90", "0.0.0.0:5353:53/udp"])
    assert [(f.shown, f.host_address, f.host, f.guest, str(f.protocol)) for f in m.network.forwards] == [
        ("network.forwards[0]", "127.0.0.1", 8080, 80, "tcp"),
        ("-p 9090:90", "127.0.0.1", 9090, 90, "tcp"),
        ("-p 0.0.0.0:5353:53/udp", "0.0.0.0", 5353, 53, "udp"),
    ]
    with pytest.raises(ManifestError) as err:
        manifest(tmp_path, text, publish=["8080:81", "99999:80", "0:1", "9090:90", "0.0.0.0:9090:91", "1.2.3:1:2"])
    assert err.value.lines() == [
        "-p 8080:81: network.forwards[1].host: 8080 is already forwarded by network.forwards[0] (tcp on 127.0.0.1)",
        "-p 99999:80: network.forwards[2].host: 99999 is above the maximum of 65535",
        "-p 0:1: network.forwards[3].host: 0 is below the minimum of 1",
        "-p 0.0.0.0:9090:91: network.forwards[5].host: 9090 is already forwarded by -p 9090:90 (tcp on 127.0.0.1)",
        '-p 1.2.3:1:2: network.forwards[6].host_address: "1.2.3" is not an IPv4 address '
        "(QEMU's user-mode network listens on IPv4 only)",
    ]


def test_publish_without_a_network_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as err:
        manifest(tmp_path, '[process]\nargv = ["true"]\n', publish=["8080:80", "1:2"])
    assert err.value.lines() == ['-p 8080:80: network.forwards: need network.mode = "user" or "isolated" '
                                 '(network.mode is "none")']


def test_forwards_are_lowered_with_where_they_came_from(tmp_path: Path) -> None:
    c = compiled(tmp_path, USER.replace('"user"', '"isolated"') + "forwards = [{ host = 8080, guest = 80 }]\n",
                 publish=["5353:53/udp"])
    argv = c.plan.qemu_argv
    assert argv[argv.index("-netdev") + 1] == ("user,id=net0,net=10.0.2.0/24,ipv6-net=fec0::/64,restrict=on,"
                                                "hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:127.0.0.1:5353-:53")
    group = next(g for g in c.plan.qemu if "network.mode" in g.keys)
    assert group.comment == ("isolated user-mode network (restrict=on: no way out), guest 10.0.2.15/24, "
                             "fec0::15/64, MTU 1500; 127.0.0.1:8080->80/tcp, 127.0.0.1:5353->53/udp (-p 5353:53/udp)")
    assert c.plan.machine.nic.sources == ("network.forwards[0]", "-p 5353:53/udp")
    # isolated: no name server answers; IPv6 ':'s are encoded (the raw ones separate the fields)
    assert "MVMC_NET=10.0.2.15/24,fec0%3A%3A15/64:10.0.2.2,fec0%3A%3A2:" in c.plan.cmdline.split()
    assert Nic.from_dict(json.loads(json.dumps(c.plan.machine.nic.to_dict()))) == c.plan.machine.nic
    launch = dict((name, content) for name, content, _ in c.output.files)["launch.sh"].decode()
    assert "\n# network.mode, network.forwards, network.mtu: isolated user-mode network (restrict=on: no way out), guest " \
           "10.0.2.15/24, fec0::15/64, MTU 1500; 127.0.0.1:8080->80/tcp, 127.0.0.1:5353->53/udp (-p 5353:53/udp)\n" in launch


def test_the_evaluation_cache_keys_on_publish() -> None:
    key = CacheKey(manifest="/m.toml", argv=(), env=(), store="/s", facts=fake_facts())
    assert CacheKey(manifest="/m.toml", argv=(), env=(), store="/s", facts=fake_facts(), publish=()).digest() == key.digest()
    assert CacheKey(manifest="/m.toml", argv=(), env=(), store="/s", facts=fake_facts(),
                    publish=("8080:80",)).digest() != key.digest()


def test_name_resolution_files_are_bound_by_init_on_a_network(tmp_path: Path) -> None:
    c = compiled(tmp_path, USER)
    params = c.plan.cmdline.split()
    assert [p for p in params if p.startswith("MVMC_M")] == [
        "MVMC_M0=bind-rw:/dev/.microvmc-net/hosts:/etc/hosts",
        "MVMC_M1=bind-rw:/dev/.microvmc-net/resolv.conf:/etc/resolv.conf",
        "MVMC_M2=detach:/dev/.microvmc-net:",
    ]
    assert "MVMC_NET=10.0.2.15/24,fec0%3A%3A15/64:10.0.2.2,fec0%3A%3A2:10.0.2.3" in params
    # The built-in image has no /etc/hosts: its read-only root gets an overlay for the mount points.
    assert "MVMC_ROOT=virtiofs:root:overlay-ro" in params
    none = compiled(tmp_path, '[process]\nargv = ["true"]\n')
    assert not [p for p in none.plan.cmdline.split() if p.startswith(("MVMC_M", "MVMC_NET"))]
    assert "MVMC_ROOT=virtiofs:root:ro" in none.plan.cmdline.split()


@pytest.mark.parametrize("links, root", [
    # dangling into /run (a tmpfs init mounts): the read-only root stays read-only
    ({"etc/resolv.conf": "../run/systemd/resolve/stub-resolv.conf", "etc/hosts": "/run/hosts"}, "ro"),
    # to files the image has, absolute or not
    ({"etc/resolv.conf": "/usr/share/resolv.conf", "etc/hosts": "../usr/share/hosts"}, "ro"),
    # dangling into the read-only image: its mount point needs the overlay
    ({"etc/resolv.conf": "../run/resolv.conf", "etc/hosts": "/var/lib/hosts"}, "overlay-ro"),
])
def test_name_resolution_files_that_are_links_land_where_the_links_lead(tmp_path: Path, links, root) -> None:
    """init binds through the image's links (as runc does); whether the read-only root needs an
    overlay for the mount point depends on where the link leads inside the image, not on the host."""
    for d in ("proc", "sys", "dev", "etc", "run", "usr/share", "var"):
        (tmp_path / "rootfs" / d).mkdir(parents=True)
    for name in ("hosts", "resolv.conf"):
        (tmp_path / "rootfs/usr/share" / name).write_text("")
    for path, target in links.items():
        os.symlink(target, tmp_path / "rootfs" / path)
    c = compiled(tmp_path, '[image]\nsource = "directory"\npath = "rootfs"\n' + USER)
    assert f"MVMC_ROOT=virtiofs:root:{root}" in c.plan.cmdline.split()


def test_run_counts_as_writable_only_where_the_image_has_it(tmp_path: Path) -> None:
    for d in ("proc", "sys", "dev", "etc"):
        (tmp_path / "rootfs" / d).mkdir(parents=True)
    os.symlink("../run/resolv.conf", tmp_path / "rootfs/etc/resolv.conf")
    (tmp_path / "rootfs/etc/hosts").write_text("")
    c = compiled(tmp_path, '[image]\nsource = "directory"\npath = "rootfs"\n' + USER)
    assert "MVMC_ROOT=virtiofs:root:overlay-ro" in c.plan.cmdline.split()  # no /run: init cannot mount it


def nic(*forwards: tuple[str, str, int, int], sources: tuple[str, ...] = ()) -> Nic:
    return Nic(outbound=True, network="10.0.2.0/24", address="10.0.2.15/24", gateway="10.0.2.2", dns="10.0.2.3",
               forwards=forwards, sources=sources, mtu=1500)


def test_a_host_port_in_use_is_found_before_boot() -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        busy, busy_udp = tcp.getsockname()[1], udp.getsockname()[1]
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            free_port = free.getsockname()[1]
        check_forwards(nic(("tcp", "127.0.0.1", free_port, 80)))
        check_forwards(nic(("udp", "127.0.0.1", busy, 80)))  # another protocol: free
        with pytest.raises(PortError) as err:
            check_forwards(nic(("tcp", "127.0.0.1", free_port, 80), ("tcp", "0.0.0.0", busy, 80),
                               ("udp", "127.0.0.1", busy_udp, 53), ("tcp", "192.0.2.1", free_port, 80),
                               sources=("network.forwards[0]", "network.forwards[1]", "-p 1:2/udp")))
    assert err.value.status == 121
    assert err.value.lines() == [
        f"network.forwards[1]: 0.0.0.0:{busy}/tcp is already in use on the host",
        f"-p 1:2/udp: 127.0.0.1:{busy_udp}/udp is already in use on the host",
        f"network.forwards[3]: 192.0.2.1:{free_port}/tcp: 192.0.2.1 is not an address of this host",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to nobody")
def test_a_privileged_port_as_an_ordinary_user_is_refused_before_boot() -> None:
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        start = int(f.read())
    if start == 0:
        pytest.skip("every port is unprivileged here")
    code = ("import sys; sys.path[:0] = sys.argv[1:]\n"
            "from microvmc.backends.ports import check_forwards, PortError\n"
            "from microvmc.compiler.machine import Nic\n"
            "try:\n"
            "    check_forwards(Nic(outbound=True, network='', address='', gateway='', dns='', mtu=1500,"
            f" forwards=(('tcp', '127.0.0.1', {start - 1}, 80),), sources=('-p {start - 1}:80',)))\n"
            "except PortError as err:\n"
            "    print(err.lines())\n")
    paths = [p for p in sys.path if p]
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", code,
                        *paths], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    uid = int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout)
    assert r.stdout.strip() == repr([f"-p {start - 1}:80: 127.0.0.1:{start - 1}/tcp: ports below {start} "
                                     f"(net.ipv4.ip_unprivileged_port_start) need root, and microvmc runs as uid {uid}"])


NETNS = ('[process]\nargv = ["true"]\n[network]\nmode = "netns"\nnamespace = "/proc/self/ns/net"\n'
         'address = "10.88.0.5/16"\ngateway = "10.88.0.1"\nmac = "0A:58:0A:58:00:05"\n')


def test_netns_is_lowered_to_a_tap_with_the_interfaces_mac(tmp_path: Path) -> None:
    c = compiled(tmp_path, NETNS + 'dns = ["10.88.0.1", "192.0.2.53"]\ninterface = "eth0"\n')
    argv = c.plan.qemu_argv
    at = argv.index("-netdev")
    assert list(argv[at:at + 4]) == ["-netdev", "tap,id=net0,fd=7,vhost=off",
                               "-device", "virtio-net-device,netdev=net0,mac=0a:58:0a:58:00:05,host_mtu=1500"]
    assert "MVMC_NET=10.88.0.5/16:10.88.0.1:10.88.0.1,192.0.2.53" in c.plan.cmdline.split()
    nic = c.plan.machine.nic
    assert (str(nic.kind), nic.namespace, nic.interface, nic.network) == ("tap", "/proc/self/ns/net", "eth0", "10.88.0.0/16")
    assert Nic.from_dict(json.loads(json.dumps(nic.to_dict()))) == nic
    launch = dict((name, content) for name, content, _ in c.output.files)["launch.sh"].decode()
    assert ("\n# network.mode, network.namespace, network.interface, network.address, network.addresses, "
            "network.gateway, network.gateway6, network.mac, network.mtu: the network namespace /proc/self/ns/net's eth0, "
            "through a tap (fd 7) joined to it by tc mirred redirects; guest 10.88.0.5/16 via 10.88.0.1, "
            "MAC 0a:58:0a:58:00:05, MTU 1500\n") in launch
    # launch.sh refuses it before it makes anything: the tap is microvmc run's to make
    assert launch.split("\n")[launch.split("\n").index("set -u") + 2:][:2] == [
        "echo 'microvmc: this script cannot join the VM to the network namespace /proc/self/ns/net (network.mode = "
        "\"netns\"): `microvmc run` makes its tap device; run the manifest with it' >&2", "exit 121"]
    r = subprocess.run(["sh", "-c", launch], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (121, "")
    assert r.stderr.startswith("microvmc: this script cannot join the VM to the network namespace")


def test_netns_with_ipv6_and_more_addresses(tmp_path: Path) -> None:
    c = compiled(tmp_path, NETNS + 'addresses = ["10.89.0.5/24", "fd00:88::5/64"]\ngateway6 = "fd00:88::1"\n'
                 'dns = ["fd00:88::1"]\n')
    assert "MVMC_NET=10.88.0.5/16,10.89.0.5/24,fd00%3A88%3A%3A5/64:10.88.0.1,fd00%3A88%3A%3A1:fd00%3A88%3A%3A1" in \
        c.plan.cmdline.split()
    nic = c.plan.machine.nic
    assert (nic.addresses, nic.gateway6) == (("10.89.0.5/24", "fd00:88::5/64"), "fd00:88::1")
    assert Nic.from_dict(json.loads(json.dumps(nic.to_dict()))) == nic
    group = next(g for g in c.plan.qemu if "network.mode" in g.keys)
    assert group.comment.endswith("guest 10.88.0.5/16, 10.89.0.5/24, fd00:88::5/64 via 10.88.0.1, fd00:88::1, "
                                  "MAC 0a:58:0a:58:00:05, MTU 1500")
    link_local = compiled(tmp_path, NETNS + 'gateway6 = "fe80::1"\n')  # an RA's router: reached through eth0
    assert "MVMC_NET=10.88.0.5/16:10.88.0.1,fe80%3A%3A1:" in link_local.plan.cmdline.split()


def test_netns_without_dns_has_an_empty_list(tmp_path: Path) -> None:
    c = compiled(tmp_path, NETNS)
    assert "MVMC_NET=10.88.0.5/16:10.88.0.1:" in c.plan.cmdline.split()


@pytest.mark.parametrize("network, errors", [
    ('mode = "netns"', ['network.namespace: is required when network.mode is "netns"',
                        'network.address: is required when network.mode is "netns"',
                        'network.gateway: is required when network.mode is "netns"',
                        'network.mac: is required when network.mode is "netns"']),
    ('mode = "netns"\nnamespace = "run/netns/x"\naddress = "10.88.0.5"\ngateway = "10.99.0.1"\nmac = "01:00:5e:00:00:01"\n'
     'interface = "eth0/1"\ndns = ["::1", "1.1.1"]',
     ['network.namespace: "run/netns/x" is not an absolute path (a network namespace such as /run/netns/NAME or '
      '/proc/PID/ns/net)',
      "network.interface: \"eth0/1\" is not an interface name (at most 15 characters, without '/', ':' or spaces)",
      'network.address: "10.88.0.5" is not an IPv4 address with a prefix length (such as "10.88.0.5/16")',
      'network.mac: "01:00:5e:00:00:01" is a multicast address, not a NIC\'s',
      'network.dns[1]: "1.1.1" is not an IP address']),
    ('mode = "netns"\nnamespace = "/proc/self/ns/net"\naddress = "10.88.0.5/16"\ngateway = "10.88.0.1"\n'
     'mac = "0a:58:0a:58:00:05"\naddresses = ["fd00::5", "fe80::5/64", "10.88.0.5/16", "fd00::6/64", "fd00::6/64"]\n'
     'gateway6 = "fd01::1"',
     ['network.addresses[0]: "fd00::5" is not an IP address with a prefix length (such as "fd00:88::5/64")',
      'network.addresses[1]: "fe80::5/64" is link-local: the guest\'s kernel makes its own',
      'network.addresses[2]: "10.88.0.5/16" is already the guest\'s',
      'network.addresses[4]: "fd00::6/64" is already the guest\'s',
      'network.gateway6: "fd01::1" is neither link-local nor in the network of an IPv6 address of network.addresses']),
    ('mode = "netns"\nnamespace = "/nonexistent/ns"\naddress = "10.88.0.0/16"\ngateway = "10.88.0.1"\nmac = "0a:58"',
     ['network.namespace: "/nonexistent/ns" does not exist',
      'network.address: "10.88.0.0/16" is its network\'s network address',
      'network.mac: "0a:58" is not a MAC address (six hex bytes: "aa:bb:cc:dd:ee:ff")']),
    ('mode = "netns"\nnamespace = "/proc/self/ns/net"\naddress = "10.88.0.5/16"\ngateway = "10.89.0.1"\n'
     'mac = "0a:58:0a:58:00:05"\ndns = ["1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4"]\nforwards = [{ host = 8080, guest = 80 }]',
     ['network.gateway: "10.89.0.1" is not another address in network.address\'s network 10.88.0.0/16',
      'network.dns: ["1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4"] has more than 3 items',
      'network.forwards: need network.mode = "user" or "isolated" (network.mode is "netns": the namespace\'s own '
      'port mappings reach the guest)']),
    ('mode = "user"\nnamespace = "/proc/self/ns/net"\nmac = "0a:58:0a:58:00:05"\ngateway6 = "fec0::2"',
     ['network.namespace: is used only when network.mode is "netns"',
      'network.gateway6: is used only when network.mode is "netns"',
      'network.mac: is used only when network.mode is "netns"']),
])
def test_netns_problems_are_one_line_each(tmp_path: Path, network: str, errors: list[str]) -> None:
    with pytest.raises(ManifestError) as err:
        manifest(tmp_path, f'[process]\nargv = ["true"]\n[network]\n{network}\n')
    assert err.value.lines() == [f"m.toml: {e}" for e in errors]
