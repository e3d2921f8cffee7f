"""Networks, booted: mode "none" has only lo; "user" reaches the host at 10.0.2.2 and a forward
reaches a server in the guest."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

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
    import json

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


def test_user_network_reaches_a_server_on_the_host(env, tmp_path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("from the host\n")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        m = write(tmp_path, 'mode = "user"',
                  f"ls /sys/class/net; cat /etc/resolv.conf; wget -q -O - http://10.0.2.2:{port}/hello.txt")
        r = subprocess.run([*MICROVMC, "run", str(m)], env=env, capture_output=True, timeout=TIMEOUT)
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == "eth0\nlo\nnameserver 10.0.2.3\nfrom the host\n"


def test_a_forward_reaches_a_server_in_the_guest(env, tmp_path) -> None:
    port = free_port()
    script = "mkdir /tmp/w && echo from the guest > /tmp/w/index.html && httpd -p 80 -h /tmp/w && read line && echo done"
    m = write(tmp_path, f'mode = "user"\nforwards = [{{ host = {port}, guest = 80 }}]', script)
    vm = subprocess.Popen([*MICROVMC, "run", str(m)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    try:
        body, deadline = None, time.monotonic() + TIMEOUT
        while body is None and time.monotonic() < deadline and vm.poll() is None:
            try:  # slirp accepts before the guest listens, then drops the connection: ask again
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
            except OSError:
                time.sleep(0.5)
        out, err = vm.communicate(b"\n", timeout=TIMEOUT)
    finally:
        vm.kill()
        vm.wait()
    assert body == b"from the guest\n", err.decode()
    assert vm.returncode == 0 and out == b"done\n", err.decode()
