"""config.json → Manifest (compiler/oci.py), over config.json files captured from podman, docker and
ctr on this kind of machine (tests/fixtures/oci/README.md says how), and invalid ones."""

from __future__ import annotations

import copy
import json
import os

import pytest

from conftest import FIXTURES
from microvmc.compiler.cmdline import GuestUser as User, Rlimit
from microvmc.compiler.manifest import ImageSource, Mount, MountKind, NetworkMode, RootMode, Share, Transport
from microvmc.compiler.oci import (
    STAGING_GUEST,
    STAGING_TAG,
    ContainerNetwork,
    Hook,
    Hooks,
    PathKind,
    container_manifest,
    exec_process,
    valid_container_id,
)
from microvmc.errors import ManifestError

CAPTURED = FIXTURES / "oci"
ID = "89852b46d2ebc80edb28c328c70008cb9586d8699d86e93aa22168148fd0de55"
BUNDLE = "/srv/bundle"
STAGING = "/srv/state/files"
FILES = ("hosts", "hostname", "resolv.conf", ".containerenv", "f.txt")


def kind(path: str) -> PathKind:
    """The engines' hosts, as the captured files describe them."""
    if path.endswith(("/merged", "/rootfs", "/shm")) or path == "/srv/engines/data":
        return PathKind.DIRECTORY
    if os.path.basename(path) in FILES:
        return PathKind.FILE
    if path.endswith(".sock"):
        return PathKind.SOCKET
    return PathKind.MISSING


def load(name: str) -> dict:
    return json.loads((CAPTURED / f"{name}.json").read_text())


def translate(config: dict, **kw):
    return container_manifest(config, bundle=BUNDLE, container_id=ID, staging=STAGING, kind=kind, **kw)


def share(**kw) -> Share:
    return Share(**{"read_only": False, "transport": Transport.AUTO, **kw})


def staged_binds(*pairs: tuple[str, bool]) -> tuple[Mount, ...]:
    return tuple(Mount(kind=MountKind.BIND, target=dst, source=f"{STAGING_GUEST}/{i}", read_only=ro)
                 for i, (dst, ro) in enumerate(pairs))


def test_podman_default() -> None:
    c = translate(load("podman-plain-config"))
    m = c.manifest
    assert m.process.argv == ("true",)
    assert dict(m.process.env) == {"PATH": "/bin", "TERM": "xterm", "container": "podman", "HOME": "/root",
                                   "HOSTNAME": "89852b46d2eb"}
    assert (m.hostname, m.process.cwd, m.process.user) == ("89852b46d2eb", "/", User(uid=0, gid=0))
    assert m.process.rlimits == (Rlimit(name="NOFILE", soft=20000, hard=20000), Rlimit(name="NPROC", soft=32768, hard=32768))
    assert (m.image.source, m.image.mode) == (ImageSource.DIRECTORY, RootMode.READ_WRITE)
    assert m.image.path.startswith("/srv/engines/podman/storage/overlay/") and m.image.path.endswith("/merged")
    # The four single files podman binds, staged; /dev/shm is the guest's own tmpfs.
    assert m.mounts == staged_binds(("/run/.containerenv", False), ("/etc/hostname", False),
                                    ("/etc/resolv.conf", False), ("/etc/hosts", False))
    assert [(f.name, f.destination, os.path.basename(f.source)) for f in c.staged] == [
        ("0", "/run/.containerenv", ".containerenv"), ("1", "/etc/hostname", "hostname"),
        ("2", "/etc/resolv.conf", "resolv.conf"), ("3", "/etc/hosts", "hosts")]
    assert m.shares == (share(tag=STAGING_TAG, host=STAGING, guest=STAGING_GUEST, read_only=False, hidden=True),)
    assert c.network_namespace == "/run/netns/netns-67f862ea-7c3f-bd03-de33-cff2dae56772"
    assert c.network is ContainerNetwork.NAMESPACE and c.hooks == Hooks()
    assert not c.process.terminal
    notes = "\n".join(c.notes)
    for expected in ("linux.seccomp: a VM is its own sandbox", "cgroup on /sys/fs/cgroup",
                     "mqueue on /dev/mqueue: not mounted in the guest", "is the VM's network: the VM takes over its interface",
                     "process.capabilities: capabilities are not dropped",
                     "/dev/shm is the guest's own tmpfs"):
        assert expected in notes, notes
    assert (m.resources.cpus, m.resources.memory) == (1, 256)


def test_podman_binds_read_only_root_and_limits() -> None:
    m = translate(load("podman-binds-config")).manifest
    assert m.image.mode is RootMode.READ_ONLY
    assert (m.hostname, m.process.cwd, dict(m.process.env)["A"]) == ("box", "/tmp", "b c")
    assert m.process.rlimits == (Rlimit(name="NOFILE", soft=1024, hard=2048),
                                 Rlimit(name="NPROC", soft=1048576, hard=1048576))
    # --read-only: /tmp and /run are the guest's tmpfs already, /var/tmp is made; every staged
    # file is read-only, so is the staging share.
    assert m.shares == (share(tag="m0", host="/srv/engines/data", guest="/data"),
                        share(tag=STAGING_TAG, host=STAGING, guest=STAGING_GUEST, read_only=True, hidden=True))
    assert m.mounts == (
        Mount(kind=MountKind.BIND, target="/etc/f.txt", source=f"{STAGING_GUEST}/0", read_only=True),
        Mount(kind=MountKind.TMPFS, target="/var/tmp"),
        Mount(kind=MountKind.BIND, target="/etc/hosts", source=f"{STAGING_GUEST}/1", read_only=True),
        Mount(kind=MountKind.BIND, target="/etc/hostname", source=f"{STAGING_GUEST}/2", read_only=True),
    )


def test_docker_binds_tmpfs_and_hooks() -> None:
    c = translate(load("docker-binds-config"))
    m = c.manifest
    assert m.image.mode is RootMode.READ_ONLY and m.hostname == "box"
    assert Mount(kind=MountKind.TMPFS, target="/scratch") in m.mounts
    assert [x.target for x in m.mounts if x.kind is MountKind.BIND] == ["/etc/f.txt", "/etc/resolv.conf",
                                                                       "/etc/hostname", "/etc/hosts"]
    assert all(x.read_only for x in m.mounts if x.kind is MountKind.BIND)
    # All staged files read-only: the staging share itself is too.
    assert m.shares[-1] == share(tag=STAGING_TAG, host=STAGING, guest=STAGING_GUEST, read_only=True, hidden=True)
    notes = "\n".join(c.notes)
    assert "linux.sysctl: sysctls are not set" in notes and "config.json: hooks" not in notes
    # docker's network arrives through its prestart hook, in a namespace the runtime makes
    assert (c.network, c.network_namespace, c.manifest.network.mode) == (ContainerNetwork.NEW, None, NetworkMode.NONE)
    assert c.hooks == Hooks(prestart=(Hook(path="/proc/5858/exe", args=(
        "libnetwork-setkey", "-exec-root=/srv/engines/docker/exec",
        "1e96a9205363c99b45040256f2e266db52d780b8f3769510ff508f34c3145e4c", "7ba0e66877df"), env=None, timeout=None),))
    assert Hooks.from_dict(c.hooks.to_dict()) == c.hooks  # kept in the run's record for start and delete


def test_network_host_is_user_mode_and_ctr_asks_for_a_namespace() -> None:
    config = load("docker-plain-config")
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"]
    c = translate(config)
    assert (c.network, c.manifest.network.mode, c.manifest.network.forwards) == (ContainerNetwork.HOST,
                                                                                NetworkMode.USER, ())
    assert any("no network namespace (the host's network): the VM gets QEMU's user-mode network" in n for n in c.notes)
    assert translate(load("ctr-plain-config")).network is ContainerNetwork.NEW  # no hooks: only lo, no device


def test_hooks_are_read_by_kind() -> None:
    config = load("ctr-plain-config")
    config["hooks"] = {
        "createRuntime": [{"path": "/bin/a", "args": ["a", "1"], "env": ["X=1"], "timeout": 5}],
        "poststart": [{"path": "/bin/b"}], "poststop": [{"path": "/bin/c", "env": []}],
        "createContainer": [{"path": "/bin/in-guest"}], "startContainer": [{"path": "/bin/in-guest"}],
    }
    c = translate(config)
    assert c.hooks == Hooks(create_runtime=(Hook(path="/bin/a", args=("a", "1"), env=("X=1",), timeout=5),),
                            poststart=(Hook(path="/bin/b", args=(), env=None, timeout=None),),
                            poststop=(Hook(path="/bin/c", args=(), env=(), timeout=None),))
    notes = "\n".join(c.notes)
    assert ("config.json: hooks.createContainer: createContainer hooks are not run: they run in the container's "
            "namespaces, which are the guest's") in notes
    assert "config.json: hooks.startContainer: startContainer hooks are not run" in notes


def test_bad_hooks_name_their_keys() -> None:
    config = load("ctr-plain-config")
    config["hooks"] = {"prestart": [{"path": "setkey"}, {"args": ["x"]}, {"path": "/x", "args": "a", "env": ["NOVALUE"],
                                                                          "timeout": 0}],
                       "poststop": {"path": "/x"}}
    with pytest.raises(ManifestError) as err:
        translate(config)
    assert err.value.lines() == [
        'config.json: hooks.prestart[0].path: "setkey" is not an absolute path',
        "config.json: hooks.prestart[1].path: is required",
        'config.json: hooks.prestart[2].args: "a" is not a list',
        'config.json: hooks.prestart[2].env[0]: "NOVALUE" is not NAME=VALUE',
        "config.json: hooks.prestart[2].timeout: 0 is out of range (1 to 4294967295)",
        'config.json: hooks.poststop: {"path": "/x"} is not a list',
    ]


def test_ctr_relative_root_and_no_hostname() -> None:
    m = translate(load("ctr-binds-config")).manifest
    assert m.image.path == f"{BUNDLE}/rootfs" and m.image.mode is RootMode.READ_ONLY
    assert m.hostname == ID[:12]
    assert m.process.user == User(uid=0, gid=0, groups=(0,))
    assert m.shares[0] == share(tag="m0", host="/srv/engines/data", guest="/data", read_only=False)
    assert m.mounts == (Mount(kind=MountKind.BIND, target="/etc/f.txt", source=f"{STAGING_GUEST}/0", read_only=True),)
    plain = translate(load("ctr-plain-config")).manifest
    assert (plain.shares, plain.mounts, plain.image.mode) == ((), (), RootMode.READ_WRITE)


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_user_and_terminal(engine: str) -> None:
    user = translate(load(f"{engine}-user-config"))
    assert user.manifest.process.user == User(uid=1000, gid=1000, groups=(1000, 10))
    assert user.manifest.process.argv == ("id",)
    tty = translate(load(f"{engine}-tty-config"))
    assert tty.process.terminal and dict(tty.manifest.process.env)["TERM"] == "xterm"
    assert not user.process.terminal


def test_exec_processes() -> None:
    podman = exec_process(load("podman-exec-process"), file="p.json")
    assert (podman.argv, podman.cwd, podman.user, podman.terminal) == (("id",), "/tmp", User(uid=1000, gid=1000), False)
    assert dict(podman.env)["X"] == "1"
    docker = exec_process(load("docker-exec-process"), file="p.json")
    assert docker.user == User(uid=1000, gid=1000, groups=(1000,))
    assert exec_process(load("podman-exec-tty-process"), file="p.json").terminal


def test_resources_become_the_vm() -> None:
    config = load("docker-plain-config")
    config["linux"]["resources"]["memory"] = {"limit": 512 << 20}
    config["linux"]["resources"]["cpu"] = {"quota": 150000, "period": 100000}
    m = translate(config).manifest
    assert (m.resources.cpus, m.resources.memory) == (2, 512)
    config["linux"]["resources"]["memory"] = {"limit": 6 << 20}
    c = translate(config)
    assert c.manifest.resources.memory == 128
    assert any("the VM gets 128 MiB" in n for n in c.notes)


def test_environment_last_one_wins_and_consolesize() -> None:
    config = load("docker-tty-config")
    config["process"]["env"] += ["TERM=vt100"]
    config["process"]["consoleSize"] = {"height": 40, "width": 120}
    c = translate(config)
    assert dict(c.manifest.process.env)["TERM"] == "vt100"
    assert c.process.console_size == (40, 120)


def test_unlimited_rlimit() -> None:
    config = load("ctr-plain-config")
    config["process"]["rlimits"] = [{"type": "RLIMIT_CORE", "soft": 0, "hard": (1 << 64) - 1}]
    assert translate(config).manifest.process.rlimits == (Rlimit(name="CORE", soft=0, hard=None),)


def broken(**changes) -> dict:
    config = copy.deepcopy(load("podman-plain-config"))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = config
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        if value is KeyError:
            del target[leaf]
        else:
            target[int(leaf) if leaf.isdigit() else leaf] = value
    return config


def problems(config: dict) -> list[str]:
    with pytest.raises(ManifestError) as err:
        translate(config)
    return list(err.value.lines())


@pytest.mark.parametrize(("changes", "expected"), [
    ({"process__args": []}, "config.json: process.args: is required: the program and its arguments"),
    ({"process__args": ["a\0b"]}, 'config.json: process.args[0]: "a\\u0000b" contains a NUL character'),
    ({"process__env": ["JUSTANAME"]}, 'config.json: process.env[0]: "JUSTANAME" is not NAME=VALUE'),
    ({"process__cwd": "tmp"}, 'config.json: process.cwd: "tmp" is not an absolute path'),
    ({"process__user__uid": -1}, "config.json: process.user.uid: -1 is out of range (0 to 4294967295)"),
    ({"process__rlimits": [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]},
     "config.json: process.rlimits[0]: the soft limit 10 is above the hard limit 5"),
    ({"process__rlimits": [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}]},
     'config.json: process.rlimits[0].type: "RLIMIT_BOGUS" is not a resource limit Linux has'),
    ({"ociVersion": "0.9"}, 'config.json: ociVersion: "0.9" is not a version of the OCI runtime spec this runtime reads (1.x)'),
    ({"hostname": "bad_name"}, 'config.json: hostname: "bad_name" is not a hostname the guest can take '
                               "(letters, digits and '-', at most 63 per dot-separated label)"),
    ({"root__path": "/srv/nowhere"}, 'config.json: root.path: "/srv/nowhere" is not a directory (/srv/nowhere)'),
    ({"linux__uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]},
     "config.json: linux.uidMappings: ID mappings are not supported: the guest would see the host's IDs on shared "
     "files (run the engine without a user namespace (userns-remap, rootless) for this runtime)"),
    ({"linux__devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]},
     'config.json: linux.devices: ["/dev/fuse"]: host devices cannot be passed into the VM'),
    ({"mounts__9__source": "/run/docker.sock"},
     'config.json: mounts[9].source: "/run/docker.sock" is a socket, which cannot cross into a VM '
     "(only directories and regular files can be shared)"),
    ({"mounts__9__source": "/srv/missing/hosts2"}, 'config.json: mounts[9].source: "/srv/missing/hosts2" does not exist'),
    ({"mounts__9__type": "nfs"}, 'config.json: mounts[9].type: "nfs" on /etc/hosts: the guest can make bind and '
                                 "tmpfs mounts only"),
    ({"mounts__5__destination": "/"}, 'config.json: mounts[5].destination: "/" with type "bind": the guest makes '
                                      "this mount itself and cannot replace it"),
])
def test_refused(changes: dict, expected: str) -> None:
    assert problems(broken(**changes)) == [expected]


def test_every_problem_at_once() -> None:
    lines = problems(broken(process__cwd="x", hostname="-x", mounts__5__type="overlay"))
    assert [line.split(":")[1].strip() for line in lines] == ["process.cwd", "hostname", "mounts[5].type"]


@pytest.mark.parametrize(("container_id", "ok"), [
    (ID, True), ("web.1_a+b-c", True), ("", False), ("..", False), (".hidden", False), ("-rf", False),
    ("a/b", False), ("a b", False), ("x" * 1025, False), ("é", False),
])
def test_container_ids(container_id: str, ok: bool) -> None:
    assert valid_container_id(container_id) is ok


def test_guest_mounts_on_the_command_line(tmp_path) -> None:
    """Manifest.mounts and the hidden share reach init as MVMC_M<n>, in order, the detach last; a
    read-only root that lacks a bind's target file becomes overlay-ro."""
    from microvmc.compiler.cmdline import GuestMountOp, guest_params
    from microvmc.compiler.graph import guest_config, missing_mount_points, root_mode_flag

    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hosts").write_text("")
    for d in ("proc", "sys", "dev"):  # what init mounts on every root (else: an overlay-ro root)
        (rootfs / d).mkdir()
    config = load("docker-binds-config")
    config["root"]["path"] = str(rootfs)
    m = translate(config).manifest
    config_ops = guest_config(m, root_mode_flag(m)).mounts
    assert config_ops == (
        GuestMountOp(kind="tmpfs", a="/scratch"),
        GuestMountOp(kind="bind-ro", a=f"{STAGING_GUEST}/0", b="/etc/f.txt"),
        GuestMountOp(kind="bind-ro", a=f"{STAGING_GUEST}/1", b="/etc/resolv.conf"),
        GuestMountOp(kind="bind-ro", a=f"{STAGING_GUEST}/2", b="/etc/hostname"),
        GuestMountOp(kind="bind-ro", a=f"{STAGING_GUEST}/3", b="/etc/hosts"),
        GuestMountOp(kind="detach", a=STAGING_GUEST),
    )
    params = dict(guest_params(guest_config(m, root_mode_flag(m))))
    assert params["MVMC_M1"] == "bind-ro:/run/.microvmc-files/0:/etc/f.txt"
    assert params["MVMC_M5"] == "detach:/run/.microvmc-files:"
    # /etc/hosts is in the image; /scratch, /data, f.txt, resolv.conf, hostname are not, nor /run
    # (so no tmpfs there for the staging share's mount point).
    assert missing_mount_points(m) == ("/data", "/run/.microvmc-files", "/scratch", "/etc/f.txt", "/etc/resolv.conf",
                                       "/etc/hostname")
    assert root_mode_flag(m) == "overlay-ro"
