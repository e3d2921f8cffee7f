"""Container engines for tests, on private sockets and roots: podman, dockerd, containerd.

Each engine is a context manager that starts what it needs (a daemon, a bridge), gives a way to run
its client, and on exit stops its daemon by PID and removes everything it made: containers, mounts,
bridges, state directories, and the global directories an engine creates on first use (only when they
did not exist before and are empty). No engine here touches iptables, but a podman made with
`portmap=True` (for `-p`): dockerd runs with `--iptables=false` on a bridge of its own, podman uses CNI's
bridge plugin without masquerading or a firewall plugin (netavark would leave its chains behind), and
with `portmap=True` CNI's portmap plugin, whose nat chains it removes on close; containerd has no network.

What the machine needs (NOTES-oci.md): no systemd, hybrid cgroups, root without CAP_SYS_RESOURCE, so
podman gets a containers.conf with rlimits it can set and cgroupfs; `ctr run` never closes a
container's stdin (with runc too), so its -i tests end by themselves (`head -c`).

Test images are built offline: a static busybox in a `scratch` image (buildah), and a Debian
userland (`mmdebstrap --variant=minbase bookworm`), cached as a tarball in CACHE between test
sessions on the same machine (shared with the images tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = [
    "CACHE",
    "BUSYBOX_IMAGE",
    "DEBIAN_IMAGE",
    "Calls",
    "runtime_wrapper",
    "Podman",
    "Docker",
    "Containerd",
    "busybox_rootfs",
    "debian_tarball",
    "missing_tools",
    "mounts_below",
]

CACHE = Path(os.environ.get("MICROVMC_TEST_CACHE", Path.home() / ".cache" / "microvmc-test"))
BUSYBOX_IMAGE = "localhost/mvmc-busybox:test"
DEBIAN_IMAGE = "localhost/mvmc-debian:test"
DEBIAN_TARBALL = "debian-bookworm-minbase.tar"
DAEMON_START = 60.0  # seconds a daemon gets to answer on its socket (the machine is shared)
DAEMON_STOP = 20.0  # seconds after SIGTERM before SIGKILL
CLIENT_TIMEOUT = 300.0
DOCKER_CLIENTS = ("/usr/local/bin/docker", "/usr/bin/docker")  # docker 28's client shadows Debian's


def missing_tools(*tools: str) -> list[str]:
    return [t for t in tools if not shutil.which(t) and not os.path.exists(t)]


def _deadline(seconds: float, what: str, ready) -> None:
    end = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not ready within {seconds:.0f} s")
        time.sleep(0.1)


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def mounts_below(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (so they can be unmounted in that order)."""
    prefix = str(root).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(prefix):
                points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def _unmount_below(root: Path) -> None:
    for point in mounts_below(root):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _stop_pid(pid: int, what: str) -> None:
    """SIGTERM, then SIGKILL after DAEMON_STOP; waits for it to be gone (it may not be our child)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + DAEMON_STOP
    while time.monotonic() < end:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# Global directories the engines make on first use, deepest first: the shims' sockets are always
# under /run/containerd/s (containerd 1.6), CNI keeps its cache in /var/lib/cni, podman bind-mounts
# /run/netns onto itself.
ENGINE_DIRS = ("/run/containerd/s", "/run/containerd/fifo", "/run/containerd/runc", "/run/containerd",
               "/run/docker/plugins", "/run/docker/netns", "/run/docker", "/var/lib/cni/results", "/var/lib/cni",
               "/run/netns")


class Created:
    """Of `paths`, those that do not exist yet; remove() removes them again if they are empty
    (a directory someone else made, or still uses, is left alone)."""

    def __init__(self, *paths: str):
        self.paths = [Path(p) for p in paths if not os.path.exists(p)]

    def remove(self) -> None:
        for path in self.paths:  # deepest first, as listed
            if mounts_below(path) == [str(path)] and not any(path.iterdir()):
                # /run/netns: podman and `ip netns` bind-mount it onto itself, shared.
                subprocess.run(["umount", str(path)], capture_output=True)
            with contextlib.suppress(OSError):
                path.rmdir()


@dataclass
class Calls:
    """What an engine called its runtime with: one line per call, written by the wrapper."""

    path: Path

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [shlex.split(line) for line in self.path.read_text().splitlines() if line]

    def verbs(self) -> list[str]:
        return [_verb(argv) for argv in self.lines()]

    def clear(self) -> None:
        self.path.write_text("")


# runc's global options that take a value: what comes after them is not the verb.
_GLOBAL_WITH_VALUE = {"--root", "--log", "--log-format", "--criu", "--rootless"}


def _verb(argv: Sequence[str]) -> str:
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _GLOBAL_WITH_VALUE:
            skip = True
        elif not word.startswith("-"):
            return word
    return ""


def runtime_wrapper(path: Path, target: Sequence[str], *, calls: Path, env: dict[str, str] | None = None,
                    prepend: Sequence[str] = ()) -> Path:
    """A shell script at `path` that logs its argv (quoted, one line per call) to `calls` and execs
    `target` with `prepend` and its own arguments, with `env` exported."""
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted((env or {}).items()))
    # printf %q is not POSIX: quote each word by hand, as shlex.split reads it back.
    script = (
        "#!/bin/sh\n"
        f"{exports}"
        "line=''\n"
        "for a in \"$@\"; do line=\"$line '$(printf '%s' \"$a\" | sed \"s/'/'\\\\\\\\''/g\")'\"; done\n"
        f"printf '%s\\n' \"$line\" >> {shlex.quote(str(calls))}\n"
        f"exec {shlex.join([*target, *prepend])} \"$@\"\n"
    )
    path.write_text(script)
    path.chmod(0o755)
    return path


def _bridge_name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"  # at most 15 characters: IFNAMSIZ


def _free_subnet() -> str:
    """A /24 in 10.200-250.x.0 that no interface here uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for _ in range(200):
        net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
        if f" {net}." not in used:
            return net
    raise RuntimeError("no free 10.x subnet for a test bridge")


def _add_bridge(name: str, net: str) -> None:
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", f"{net}.1/24", "dev", name], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)


def _del_link(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], capture_output=True)


@dataclass
class _Engine:
    root: Path
    runtimes: dict[str, Path] = field(default_factory=dict)  # name → runtime executable
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, input: bytes | None = None, timeout: float = CLIENT_TIMEOUT,
            check: bool = False, **kw) -> subprocess.CompletedProcess:
        argv = [*self.client(), *args]
        result = subprocess.run(argv, env=self.env, input=input if input is not None else b"",
                                capture_output=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)}: status {result.returncode}: "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([*self.client(), *args], env=self.env, **kw)

    def client(self) -> list[str]:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class Podman(_Engine):
    """podman (and buildah) on a private storage root, tmp dir, events log and CNI network."""

    def __init__(self, root: Path, runtimes: dict[str, Path] | None = None, *, portmap: bool = False):
        super().__init__(root=root, runtimes=dict(runtimes or {}))
        # the nat table before portmap used it: whether it existed, and its rules
        self.nat_before = (_nat_table_exists(), _nat_rules()) if portmap else None
        for d in ("storage", "run", "tmp", "networks", "cni"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.bridge = _bridge_name("mvmc-p")
        net = _free_subnet()
        (root / "networks" / "podman.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0",
            "name": "podman",
            "plugins": [{
                "type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "routes": [{"dst": "0.0.0.0/0"}],
                         "ranges": [[{"subnet": f"{net}.0/24", "gateway": f"{net}.1"}]],
                         "dataDir": str(root / "cni")},
            }] + ([{"type": "portmap", "capabilities": {"portMappings": True}}] if portmap else []),
        }, indent=1))
        runtimes_toml = "".join(f"{name} = [{json.dumps(str(path))}]\n" for name, path in self.runtimes.items())
        (root / "containers.conf").write_text(
            "[containers]\n"
            # root lacks CAP_SYS_RESOURCE here: podman's default rlimits cannot be set.
            'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
            "[engine]\n"
            'runtime = "runc"\n'  # crun refuses hybrid cgroups
            'cgroup_manager = "cgroupfs"\n'  # no systemd
            'events_logger = "file"\n'
            f"events_logfile_path = {json.dumps(str(root / 'tmp' / 'events.log'))}\n"
            f"tmp_dir = {json.dumps(str(root / 'tmp'))}\n"
            "[engine.runtimes]\n"
            f"{runtimes_toml}"
            "[network]\n"
            'network_backend = "cni"\n'
            'cni_plugin_dirs = ["/usr/lib/cni"]\n'
            f"network_config_dir = {json.dumps(str(root / 'networks'))}\n"
        )
        (root / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f"graphroot = {json.dumps(str(root / 'storage'))}\n"
            f"runroot = {json.dumps(str(root / 'run'))}\n"
        )
        self.env = dict(os.environ, CONTAINERS_CONF=str(root / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(root / "storage.conf"),
                        CONTAINERS_REGISTRIES_CONF=str(root / "registries.conf"), TMPDIR=str(root / "tmp"))
        (root / "registries.conf").write_text("unqualified-search-registries = []\n")

    def client(self) -> list[str]:
        return ["podman"]

    def buildah(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["buildah", *args], env=self.env, capture_output=True, text=True,
                                timeout=CLIENT_TIMEOUT)
        if check and result.returncode != 0:
            raise AssertionError(f"buildah {shlex.join(args)}: {result.stderr}")
        return result.stdout.strip()

    def build_scratch_image(self, rootfs: Path, name: str, *, cmd: Sequence[str], env: Sequence[str] = ()) -> None:
        """`buildah from scratch`, the tree of `rootfs` copied in, committed as `name`."""
        container = self.buildah("from", "scratch")
        try:
            mount = Path(self.buildah("mount", container))
            subprocess.run(["cp", "-a", f"{rootfs}/.", str(mount)], check=True)
            self.buildah("umount", container)
            config = ["--cmd", json.dumps(list(cmd))]
            for item in env:
                config += ["--env", item]
            self.buildah("config", *config, container)
            self.buildah("commit", "-q", container, name)
        finally:
            self.buildah("rm", container, check=False)

    def save(self, image: str, path: Path) -> Path:
        self.run("save", "--format", "docker-archive", "-o", str(path), image, check=True)
        return path

    def close(self) -> None:
        self.run("rm", "--all", "--force", "--time", "0", timeout=120)
        self.run("system", "reset", "--force", timeout=120)
        _unmount_below(self.root)
        _del_link(self.bridge)
        if self.nat_before is not None:
            _remove_cni_chains(*self.nat_before)
        shutil.rmtree(self.root, ignore_errors=True)


def _nat_table_exists() -> bool:
    # not `iptables-save -t nat`, which shows a missing table's built-in chains as if it were there
    return "*nat" in subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout.splitlines()


def _nat_rules() -> list[str]:
    """The nat table as `iptables -t nat -S` lists it: its chains (-N, -P) and rules (-A)."""
    return subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True, check=True).stdout.splitlines()


def _remove_cni_chains(existed: bool, before: list[str]) -> None:
    """What CNI's portmap plugin added to the nat table since `before`: on a container's DEL it
    removes that container's chain, but keeps its CNI-HOSTPORT-* chains and the jumps to them; and
    the table itself (iptables-nft made it) when there was none and nothing is left in it."""
    now = _nat_rules()
    chains = [line.split()[1] for line in now if line.startswith("-N CNI-") and line not in before]
    for line in now:
        rule = shlex.split(line)
        if rule[0] == "-A" and line not in before and (rule[1] in chains or any(c in rule for c in chains)):
            subprocess.run(["iptables", "-t", "nat", "-D", *rule[1:]], check=True)
    for flag in ("-F", "-X"):  # emptied first: the chains jump to each other
        for chain in chains:
            subprocess.run(["iptables", "-t", "nat", flag, chain], check=True)
    if not existed:
        from pyroute2.nftables.main import NFTables  # iptables cannot delete a table, nor has nft been installed

        with contextlib.closing(NFTables(nfgen_family=socket.AF_INET)) as nft:
            if not [r for r in nft.get_rules() if r.get_attr("NFTA_RULE_TABLE") == "nat"]:
                nft.table("del", name="nat")


class Docker(_Engine):
    """dockerd on its own socket, data root, exec root and bridge; no iptables."""

    def __init__(self, root: Path, runtimes: dict[str, Path] | None = None):
        super().__init__(root=root, runtimes=dict(runtimes or {}))
        self.socket = root / "docker.sock"
        self.bridge = _bridge_name("mvmc-d")
        self.process: subprocess.Popen | None = None
        (root / "client").mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.socket}", DOCKER_CONFIG=str(root / "client"))
        self.client_path = next((c for c in DOCKER_CLIENTS if os.path.exists(c)), "docker")

    def client(self) -> list[str]:
        return [self.client_path]

    def start(self) -> Docker:
        _add_bridge(self.bridge, _free_subnet())
        (self.root / "daemon.json").write_text("{}\n")  # not /etc/docker/daemon.json
        argv = [
            "dockerd",
            "--config-file", str(self.root / "daemon.json"),
            "--host", f"unix://{self.socket}",
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "docker.pid"),
            "--bridge", self.bridge,
            "--iptables=false", "--ip-masq=false", "--ip-forward=false",
        ]
        for name, path in self.runtimes.items():
            argv += ["--add-runtime", f"{name}={path}"]
        log = open(self.root / "dockerd.log", "wb")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
        log.close()
        try:
            _deadline(DAEMON_START, "dockerd", lambda: self.process.poll() is None and _socket_answers(self.socket)
                      and self.run("version", timeout=30).returncode == 0 or self._died("dockerd"))
        except BaseException:
            self.close()
            raise
        return self

    def _died(self, what: str) -> bool:
        if self.process is not None and self.process.poll() is not None:
            tail = (self.root / "dockerd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited with status {self.process.returncode}: {tail}")
        return False

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            ids = self.run("ps", "-aq", timeout=60).stdout.split()
            if ids:
                self.run("rm", "-f", *[i.decode() for i in ids], timeout=120)
            _stop_pid(self.process.pid, "dockerd")
        _unmount_below(self.root)
        _del_link(self.bridge)
        shutil.rmtree(self.root, ignore_errors=True)


class Containerd(_Engine):
    """containerd on its own socket, root and state (no CRI plugin); `ctr` as the client, with
    --runc-root and --fifo-dir private too (the shim's default is /run/containerd/runc/<ns>)."""

    def __init__(self, root: Path, runtimes: dict[str, Path] | None = None):
        super().__init__(root=root, runtimes=dict(runtimes or {}))
        self.socket = root / "containerd.sock"
        self.runc_root = root / "runc"
        self.fifo_dir = root / "fifo"
        self.process: subprocess.Popen | None = None
        self.env = dict(os.environ)
        root.mkdir(parents=True, exist_ok=True)

    def client(self) -> list[str]:
        return ["ctr", "--address", str(self.socket)]

    def start(self) -> Containerd:
        (self.root / "config.toml").write_text(
            "version = 2\n"
            f"root = {json.dumps(str(self.root / 'root'))}\n"
            f"state = {json.dumps(str(self.root / 'state'))}\n"
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f"  address = {json.dumps(str(self.socket))}\n"
            "[ttrpc]\n"
            f"  address = {json.dumps(str(self.socket) + '.ttrpc')}\n"
            "[debug]\n"
            '  address = ""\n'
        )
        log = open(self.root / "containerd.log", "wb")
        self.process = subprocess.Popen(["containerd", "--config", str(self.root / "config.toml")],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        try:
            _deadline(DAEMON_START, "containerd", lambda: _socket_answers(self.socket) or self._died())
        except BaseException:
            self.close()
            raise
        return self

    def _died(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            tail = (self.root / "containerd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"containerd exited with status {self.process.returncode}: {tail}")
        return False

    def run_args(self, runtime: str) -> list[str]:
        """`ctr run` options for one of our runtimes: its wrapper, and a private root for it."""
        return ["--runtime", "io.containerd.runc.v2", "--runc-binary", str(self.runtimes[runtime]),
                "--runc-root", str(self.runc_root / runtime), "--fifo-dir", str(self.fifo_dir)]

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for line in self.run("task", "ls", "-q", timeout=60).stdout.split():
                self.run("task", "kill", "-s", "KILL", line.decode(), timeout=60)
            time.sleep(0.5)
            for line in self.run("task", "ls", "-q", timeout=60).stdout.split():
                self.run("task", "rm", "-f", line.decode(), timeout=60)
            for line in self.run("containers", "ls", "-q", timeout=60).stdout.split():
                self.run("containers", "rm", line.decode(), timeout=60)
            _stop_pid(self.process.pid, "containerd")
        _unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def busybox_rootfs(target: Path) -> Path:
    """A root filesystem of the host's static busybox with its applet links, a passwd with root and
    a user 1000, and the directories a container expects."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    (target / "bin").mkdir(parents=True)
    shutil.copy2(busybox, target / "bin" / "busybox")
    listing = subprocess.run([str(target / "bin" / "busybox"), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in listing:
        if applet != "busybox":  # else the link replaces the binary
            (target / "bin" / applet).symlink_to("busybox")
    for d in ("etc", "tmp", "proc", "sys", "dev", "run", "root", "home/user", "data"):
        (target / d).mkdir(parents=True, exist_ok=True)
    (target / "tmp").chmod(0o1777)
    (target / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (target / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    os.chown(target / "home" / "user", 1000, 1000)
    return target


def debian_tarball() -> Path:
    """A Debian 12 minbase root filesystem as a tarball, made once per machine with mmdebstrap
    (a few minutes, needs the Debian mirror) and kept in CACHE; written atomically, so concurrent
    sessions at worst both make it."""
    path = CACHE / DEBIAN_TARBALL
    if path.is_file() and path.stat().st_size > 0:
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".debian-", suffix=".tar", dir=CACHE)
    os.close(fd)
    try:
        subprocess.run(["nice", "-n", "10", "mmdebstrap", "--quiet", "--variant=minbase", "bookworm", partial],
                       check=True, capture_output=True, timeout=1800)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return path


@contextlib.contextmanager
def started(engine):
    """Start (if it has a daemon) and always close."""
    try:
        yield engine.start() if hasattr(engine, "start") else engine
    finally:
        engine.close()



# Fixtures (imported by conftest.py): one daemon of each engine per test session.

RUNC = shutil.which("runc") or "/usr/sbin/runc"


def microvmc_runtime() -> list[str]:
    """How to run this checkout's microvmc-runtime: the console script next to the interpreter."""
    script = Path(sys.executable).with_name("microvmc-runtime")
    return [str(script)] if script.exists() else [sys.executable, "-m", "microvmc.runtime"]


@dataclass
class EngineUnderTest:
    """An engine with two runtimes: `runclog` (runc, the reference; not named `runc`, which podman
    and dockerd treat specially) and `microvm` (ours), each behind a logging wrapper, and the state roots the runtimes keep their containers in."""

    name: str
    engine: _Engine
    calls: dict[str, Calls]
    state: dict[str, Path]  # runtime name → its --root (what must be empty after each test)


def _wrappers(root: Path, boot_env: dict[str, str], *, own_root: bool) -> tuple[dict[str, Path], dict[str, Calls], dict[str, Path]]:
    """The two runtime wrappers of one engine. With `own_root`, the wrapper passes --root (podman
    gives none; dockerd and ctr give theirs, which comes later on the command line and wins)."""
    env = {k: boot_env[k] for k in ("MICROVMC_STORE", "XDG_CACHE_HOME") if k in boot_env}
    paths, calls, state = {}, {}, {}
    for name, target in (("runclog", [RUNC]), ("microvm", microvmc_runtime())):
        state[name] = root / f"{name}-state"
        calls[name] = Calls(root / f"{name}-calls.log")
        prepend = ["--root", str(state[name])] if own_root else []
        paths[name] = runtime_wrapper(root / f"{name}-runtime", target, calls=calls[name].path,
                                      env=env if name == "microvm" else {}, prepend=prepend)
    return paths, calls, state


def _need(*tools: str) -> None:
    missing = missing_tools(*tools)
    if missing:
        pytest.fail(f"engine tests need {missing}: run scripts/setup --test")
    if os.geteuid() != 0:
        pytest.skip("the engine tests run the engines as root")


@pytest.fixture(scope="session")
def engines_root(tmp_path_factory) -> Iterator[Path]:
    created = Created(*ENGINE_DIRS)
    yield tmp_path_factory.mktemp("engines")
    created.remove()  # the engines themselves were stopped before this


@pytest.fixture(scope="session")
def busybox_tree(engines_root) -> Path:
    return busybox_rootfs(engines_root / "busybox-rootfs")


@pytest.fixture(scope="session")
def podman(engines_root, busybox_tree, boot_env) -> Iterator[EngineUnderTest]:
    _need("podman", "buildah", "conmon", RUNC)
    root = engines_root / "podman"
    root.mkdir()
    runtimes, calls, state = _wrappers(root, boot_env, own_root=True)
    with Podman(root / "engine", runtimes) as engine:
        engine.build_scratch_image(busybox_tree, BUSYBOX_IMAGE, cmd=["/bin/sh"], env=["PATH=/bin"])
        engine.save(BUSYBOX_IMAGE, engines_root / "busybox.tar")
        yield EngineUnderTest("podman", engine, calls, state)


@pytest.fixture(scope="session")
def busybox_archive(podman, engines_root) -> Path:
    return engines_root / "busybox.tar"


@pytest.fixture(scope="session")
def docker(engines_root, busybox_archive, boot_env) -> Iterator[EngineUnderTest]:
    _need("dockerd", RUNC)
    root = engines_root / "docker"
    root.mkdir()
    runtimes, calls, _ = _wrappers(root, boot_env, own_root=False)
    engine = Docker(root / "engine", runtimes)
    with started(engine):
        engine.run("load", "-i", str(busybox_archive), check=True)
        # dockerd 20.10 gives every runtime it runs through the runc shim the same --root,
        # <exec-root>/runtime-runc/moby (seen in the calls log), whatever its --add-runtime name.
        state = {name: engine.root / "exec" / "runtime-runc" / "moby" for name in runtimes}
        yield EngineUnderTest("docker", engine, calls, state)


@pytest.fixture(scope="session")
def containerd(engines_root, busybox_archive, boot_env) -> Iterator[EngineUnderTest]:
    _need("containerd", "ctr", RUNC)
    root = engines_root / "containerd"
    root.mkdir()
    runtimes, calls, _ = _wrappers(root, boot_env, own_root=False)
    engine = Containerd(root / "engine", runtimes)
    with started(engine):
        engine.run("images", "import", "--base-name", BUSYBOX_IMAGE.rsplit(":", 1)[0], str(busybox_archive),
                   check=True)
        yield EngineUnderTest("containerd", engine, calls, {name: engine.runc_root / name for name in runtimes})


ENGINES = ("podman", "docker", "containerd")


def engine_param(request, name: str | None = None) -> EngineUnderTest:
    """The engine `name`, else the one a test is parametrized with (request.param, one of ENGINES),
    its runtimes' call logs cleared."""
    eut = request.getfixturevalue(name or request.param)
    for calls in eut.calls.values():
        calls.clear()
    return eut


@dataclass(frozen=True)
class Bind:
    source: Path
    destination: str
    read_only: bool = False


def container_argv(eut: EngineUnderTest, runtime: str, image: str, argv: Sequence[str], *, interactive: bool = False,
                   tty: bool = False, user: str | None = None, binds: Sequence[Bind] = (), network: str | None = None,
                   env: Sequence[str] = (), workdir: str | None = None, name: str | None = None,
                   rm: bool = True, detach: bool = False) -> list[str]:
    """The client's argv that runs `argv` in a container of `image` with `runtime`, the same
    request for each engine in its own words."""
    if eut.name == "containerd":
        args = ["run", *eut.engine.run_args(runtime)]
        args += ["--rm"] if rm else []
        args += ["--detach"] if detach else []
        args += ["--tty"] if tty else []
        args += [f"--env={e}" for e in env]
        args += [f"--cwd={workdir}"] if workdir else []
        for b in binds:
            args += ["--mount", f"type=bind,src={b.source},dst={b.destination},options=rbind:{'ro' if b.read_only else 'rw'}"]
        assert user is None, "ctr run has no --user"
        return [*args, image, name or f"t{secrets.token_hex(6)}", *argv]
    args = ["run", "--runtime", runtime]
    args += ["--rm"] if rm else []
    args += ["--detach"] if detach else []
    args += ["--interactive"] if interactive else []
    args += ["--tty"] if tty else []
    args += ["--user", user] if user else []
    args += [f"--network={network}"] if network else []
    args += [f"--env={e}" for e in env]
    args += [f"--workdir={workdir}"] if workdir else []
    args += ["--name", name] if name else []
    for b in binds:
        args += ["--volume", f"{b.source}:{b.destination}" + (":ro" if b.read_only else "")]
    return [*args, image, *argv]


def run_container(eut: EngineUnderTest, runtime: str, image: str, argv: Sequence[str], *, input: bytes | None = None,
                  timeout: float = CLIENT_TIMEOUT, **options) -> subprocess.CompletedProcess:
    return eut.engine.run(*container_argv(eut, runtime, image, argv, **options), input=input, timeout=timeout)


def leftovers(eut: EngineUnderTest, runtime: str) -> list[str]:
    """What a test left behind: containers the engine still lists, files in the runtime's state
    root, and processes (VMs, virtiofsd, monitors) that name the state root."""
    found = []
    if eut.name == "containerd":
        found += [f"container {c}" for c in eut.engine.run("containers", "ls", "-q").stdout.decode().split()]
    else:
        found += [f"container {c}" for c in eut.engine.run("ps", "-aq").stdout.decode().split()]
    state = eut.state[runtime]
    if state.exists():
        found += [f"state {p}" for p in state.rglob("*") if not p.is_dir()]
    procs = subprocess.run(["pgrep", "-a", "-f", str(state)], capture_output=True, text=True).stdout.splitlines()
    found += [f"process {p}" for p in procs]
    return found
