"""Networks, booted: mode "none" has only lo; "user" reaches the host at 10.0.2.2 and a forward
reaches a server in the guest; "isolated" lets the forwards in and nothing out; two VMs forward at
once, one of them with `run -p`; the guest's /etc/hosts and /etc/resolv.conf on a read-only root."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.boot

MICROVMC = [sys.executable, "-m", "microvmc"]
TIMEOUT = 240


@pytest.fixture(scope="module")
def env(boot_env, tmp_path_factory) -> dict[str, str]:
    env = dict(boot_env)
    runtime = tmp_path_factory.mktemp("runtime")
    env["XDG_RUNTIME_DIR"] = str(runtime)
    env["TMPDIR"] = str(runtime)
    return env


def write(tmp_path: Path, network: str, script: str) -> Path:
    path = tmp_path / "net.toml"
    path.write_text(f'version = 1\n[image]\nmode = "overlay"\n[process]\nargv = ["/bin/sh", "-c", {json.dumps(script)}]\n'
                    f"[network]\n{network}\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mode_none_has_only_lo(env, tmp_path) -> None:
    m = write(tmp_path, 'mode = "none"', "ls /sys/class/net; cat /sys/class/net/lo/operstate")
    r = subprocess.run([*MICROVMC, "run", str(m)], env=env, capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split() == ["lo", "unknown"]  # lo is up (its operstate is always "unknown")


def test_the_guest_nic_has_the_manifests_mtu(env, tmp_path) -> None:
    m = write(tmp_path, 'mode = "user"\nmtu = 1280', "cat /sys/class/net/eth0/mtu")
    r = subprocess.run([*MICROVMC, "run", str(m)], env=env, capture_output=True, timeout=TIMEOUT)
    assert (r.returncode, r.stdout) == (0, b"1280\n"), r.stderr.decode()


class V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def host_server(tmp_path: Path, text: str, address: str = "127.0.0.1") -> Iterator[int]:
    """A server on the host serving `text` as /hello.txt while the block runs; yields its port."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text(text)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = (V6Server if ":" in address else http.server.ThreadingHTTPServer)((address, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_user_network_reaches_a_server_on_the_host(env, tmp_path) -> None:
    with host_server(tmp_path, "from the host\n") as port:
        m = write(tmp_path, 'mode = "user"',
                  f"ls /sys/class/net; cat /etc/resolv.conf; wget -q -O - http://10.0.2.2:{port}/hello.txt")
        r = subprocess.run([*MICROVMC, "run", str(m)], env=env, capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == "eth0\nlo\nnameserver 10.0.2.3\nfrom the host\n"


def test_user_network_reaches_the_hosts_ipv6_loopback(env, tmp_path) -> None:
    """slirp's IPv6, stated: the guest is fec0::15/64, routed via fec0::2, which is the host's ::1;
    no address of the guest's but the stated ones (router advertisements are ignored)."""
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("the host has no IPv6 loopback")
    with host_server(tmp_path, "from the host's ::1\n", "::1") as port:
        m = write(tmp_path, 'mode = "user"', "sleep 3; grep eth0 /proc/net/if_inet6 | grep -v ^fe80 | cut -c1-32; "
                  f"ip -6 route | grep default; wget -q -O - http://[fec0::2]:{port}/hello.txt")
        r = subprocess.run([*MICROVMC, "run", str(m)], env=env, capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == ("fec00000000000000000000000000015\ndefault via fec0::2 dev eth0  metric 1024 \n"
                                 "from the host's ::1\n")


GUEST_SERVER = "mkdir /tmp/w && echo {text} > /tmp/w/index.html && httpd -p 80 -h /tmp/w && read line && echo done"


def start(env, manifest: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*MICROVMC, "run", *args, str(manifest)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def fetch(vm: subprocess.Popen, port: int) -> bytes | None:
    """What the guest's server answers on the host's `port`, once it listens (None if the VM ended)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and vm.poll() is None:
        try:  # slirp accepts before the guest listens, then drops the connection: ask again
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        except OSError:
            time.sleep(0.5)
    return None


def finish(vm: subprocess.Popen) -> tuple[bytes, bytes]:
    try:
        return vm.communicate(b"\n", timeout=TIMEOUT)
    finally:
        vm.kill()
        vm.wait()


def test_a_forward_reaches_a_server_in_the_guest(env, tmp_path) -> None:
    port = free_port()
    m = write(tmp_path, f'mode = "user"\nforwards = [{{ host = {port}, guest = 80 }}]', GUEST_SERVER.format(text="from the guest"))
    vm = start(env, m)
    try:
        body = fetch(vm, port)
    finally:
        out, err = finish(vm)
    assert body == b"from the guest\n", err.decode()
    assert vm.returncode == 0 and out == b"done\n", err.decode()


def test_isolated_lets_the_forwards_in_and_nothing_out(env, tmp_path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    script = (f"cat /etc/resolv.conf; wget -q -O - http://10.0.2.2:{server.server_address[1]}/ >/dev/null 2>&1; echo wget $?; "
              + GUEST_SERVER.format(text="isolated"))
    m = write(tmp_path, f'mode = "isolated"\nforwards = [{{ host = {port}, guest = 80 }}]', script)
    vm = start(env, m)
    try:
        body = fetch(vm, port)
    finally:
        out, err = finish(vm)
        server.shutdown()
        server.server_close()
    assert body == b"isolated\n", err.decode()
    assert vm.returncode == 0 and out == b"wget 1\ndone\n", err.decode()


def test_two_vms_forward_at_once_one_with_run_p(env, tmp_path) -> None:
    """Issue 11: two VMs forwarding different ports at once; `-p` from the command line."""
    ports = free_port(), free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write(tmp_path / "a", f'mode = "user"\nforwards = [{{ host = {ports[0]}, guest = 80 }}]',
              GUEST_SERVER.format(text="first"))
    b = write(tmp_path / "b", 'mode = "user"', GUEST_SERVER.format(text="second"))
    vms = [start(env, a), start(env, b, "-p", f"{ports[1]}:80")]
    try:
        bodies = [fetch(vm, port) for vm, port in zip(vms, ports)]
    finally:
        ends = [finish(vm) for vm in vms]
    assert bodies == [b"first\n", b"second\n"], [e.decode() for _, e in ends]
    assert [(vm.returncode, out) for vm, (out, _) in zip(vms, ends)] == [(0, b"done\n")] * 2


def test_a_host_port_in_use_is_one_line_before_boot(env, tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = write(tmp_path, 'mode = "user"', "echo booted")
        r = subprocess.run([*MICROVMC, "run", "-p", f"{port}:80", str(m)], env=env, capture_output=True,
                           timeout=TIMEOUT)
    assert (r.returncode, r.stdout) == (121, b"")
    assert r.stderr.decode() == f"microvmc: -p {port}:80: 127.0.0.1:{port}/tcp is already in use on the host\n"


def test_hosts_and_resolv_conf_on_a_read_only_root_leave_the_image_alone(env, tmp_path) -> None:
    """The guest's /etc/hosts names it, /etc/resolv.conf has slirp's DNS, on a read-only image that has
    its own files, which stay as they are; no tool of the image's is needed."""
    root = tmp_path / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "cat", "ping", "hostname", "grep", "ls"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "hosts").write_text("192.0.2.9 image\n")
    (root / "etc" / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    script = ("cat /etc/hosts /etc/resolv.conf; ping -c1 -W5 $(hostname) | grep -c '^64 bytes from 10.0.2.15'; "
              "ls -a /dev | grep -c microvmc; echo x > /etc/hosts.new 2>/dev/null || echo read-only")
    m = tmp_path / "ro.toml"
    m.write_text(f'version = 1\nhostname = "webby"\n[image]\nsource = "directory"\npath = "rootfs"\nmode = "read-only"\n'
                 f"[process]\nargv = [\"/bin/sh\", \"-c\", {json.dumps(script)}]\n[network]\nmode = \"user\"\n")
    plan = subprocess.run([*MICROVMC, "plan", str(m)], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert "MVMC_ROOT=virtiofs:root:ro " in plan.stdout or "MVMC_ROOT=9p:root:ro " in plan.stdout, plan.stdout
    r = subprocess.run([*MICROVMC, "run", str(m)], env=env, capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.0.2.15\twebby\nfec0::15\twebby\n"
                                 "nameserver 10.0.2.3\n1\n0\nread-only\n")
    assert (root / "etc" / "hosts").read_text() == "192.0.2.9 image\n"
    assert (root / "etc" / "resolv.conf").read_text() == "nameserver 192.0.2.53\n"
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["hosts", "resolv.conf"]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with what it is: a link's target, a file's content, "dir"."""
    seen = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        seen[rel] = (f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir()
                     else path.read_bytes().decode(errors="replace"))
    return seen


# Debian and systemd images link /etc/resolv.conf into /run (dangling until resolved runs), and some
# link /etc/hosts elsewhere: relative or absolute, dangling or not. The program reads microvmc's files
# through the image's links (as under docker: runc binds onto the link's target inside the root).
NAME_FILE_LINKS = {
    "dangling": {"etc/resolv.conf": "../run/systemd/resolve/stub-resolv.conf", "etc/hosts": "/var/lib/net/hosts"},
    "present": {"etc/resolv.conf": "../usr/share/net/resolv.conf", "etc/hosts": "/usr/share/net/hosts"},
}


@pytest.mark.parametrize("mode, links", [("read-only", "dangling"), ("read-only", "present"),
                                         ("overlay", "dangling"), ("overlay", "present"),
                                         ("read-write", "present")])
def test_hosts_and_resolv_conf_that_are_links_in_the_image(env, tmp_path, mode, links) -> None:
    root = tmp_path / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "etc", "tmp", "run", "var/lib", "usr/share/net"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "cat", "readlink"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "usr/share/net/hosts").write_text("192.0.2.9 image\n")
    (root / "usr/share/net/resolv.conf").write_text("nameserver 192.0.2.53\n")
    for path, target in NAME_FILE_LINKS[links].items():
        os.symlink(target, root / path)
    before = snapshot(root)
    script = "cat /etc/hosts /etc/resolv.conf; readlink /etc/hosts; readlink /etc/resolv.conf"
    m = tmp_path / "links.toml"
    m.write_text(f'version = 1\nhostname = "webby"\n[image]\nsource = "directory"\npath = "rootfs"\nmode = "{mode}"\n'
                 f"[process]\nargv = [\"/bin/sh\", \"-c\", {json.dumps(script)}]\n[network]\nmode = \"user\"\n")
    r = subprocess.run([*MICROVMC, "run", str(m)], env=env, capture_output=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.0.2.15\twebby\nfec0::15\twebby\n"
                                 "nameserver 10.0.2.3\n"
                                 f"{NAME_FILE_LINKS[links]['etc/hosts']}\n{NAME_FILE_LINKS[links]['etc/resolv.conf']}\n")
    assert snapshot(root) == before
