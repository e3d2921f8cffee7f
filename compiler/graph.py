"""resolve: a Manifest (+ host facts) → the dependency graph of everything the VM is built from.

Nodes are sources (an existing file or directory) or derivations (built into the store, named by
the hash of their builder, parameters and inputs); edges say what is built from what. The graph gives
the build order and is what `microvmc graph` prints.

    busybox ─▶ rootfs ─▶ share:root ─▶ virtiofsd:root ─┐
    kernel ─▶ boot-kernel ─────────────────────────────┤
    kernel ─▶ modules ─┐                               ├─▶ plan
    init-src ─▶ init ──┴─▶ initramfs ──────────────────┘
    share:<tag> ─▶ virtiofsd:<tag> ─────────────────────┘

The kernel is a file that exists (the Debian kernel, the host's, one by path: a source, read by
content: its config, release and module closure) or microvmc's own kernel, a node the build makes
(builder "kernel", keyed by its source, fragment and compiler; compiler/kernels.py), which QEMU boots
from its entry as it is: then there is no boot-kernel node, and nothing of the kernel is read here.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Iterator

from microvmc.compiler.builtin_image import has_directory
from microvmc.compiler.cmdline import CmdlineError, GuestConfig, GuestMount, GuestMountOp, KernelCmdline, compose
from microvmc.compiler.host import HostFacts
from microvmc.compiler.hostfiles import HostFiles, Observation
from microvmc.compiler.layers import resolve_in_root
from microvmc.compiler.ociimage import ResolvedImage
from microvmc.compiler.manifest import (
    ROOT_TAG,
    Accel,
    ImageSource,
    KernelSource,
    Manifest,
    Mount,
    MountKind,
    NetworkMode,
    RootMode,
    Transport,
    guest_path,
)
from microvmc.compiler.store import digest, store_path
from microvmc.errors import HostError, KernelError, ManifestError, Problem

__all__ = ["Builder", "Node", "Graph", "Sources", "resolve", "base_kernel_params", "init_sources", "INIT_CFLAGS",
           "with_name_resolution", "NET_FILES", "NAME_FILES"]

# Bumped when a builder's output changes for the same inputs, so old store paths are not reused.
BUILDER_VERSION = 1
INIT_CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")

# QEMU's user-mode network: its addressing, which the guest init configures statically.
USER_NETWORK = "10.0.2.0/24"
USER_ADDRESS = "10.0.2.15/24"
USER_GATEWAY = "10.0.2.2"  # also the host's loopback
USER_DNS = "10.0.2.3"
# and its IPv6 (QEMU's defaults, stated): site-local, so that RFC 6724 still prefers IPv4 for a name with both
USER_NETWORK6 = "fec0::/64"
USER_ADDRESS6 = "fec0::15/64"
USER_GATEWAY6 = "fec0::2"  # the host's ::1

# Name resolution in the guest (init/net.c): init writes hosts and resolv.conf into a tmpfs here, the
# MVMC_M<n> ops bind them onto /etc and then detach it. The image is never modified.
NET_FILES = "/dev/.microvmc-net"
NAME_FILES = ("/etc/hosts", "/etc/resolv.conf")

ROOT_MODE_FLAG = {RootMode.READ_ONLY: "ro", RootMode.OVERLAY: "overlay", RootMode.READ_WRITE: "rw"}


class Builder(StrEnum):
    SOURCE = "source"  # an existing file or directory
    BUSYBOX_ROOTFS = "busybox-rootfs"  # the built-in image
    KERNEL = "kernel"  # microvmc's own kernel, built from its source and fragment (backends/kernelbuild.py)
    BOOT_KERNEL = "boot-kernel"  # the ELF vmlinux when it has a PVH entry, else the image as is
    MODULES = "modules"  # the module closure the plan needs (a choice, not an output)
    INIT = "init"  # init/*.c compiled static
    INITRAMFS = "initramfs"  # init + modules + spilled configuration, a deterministic cpio
    IMAGE = "image"  # a container image unpacked into the store (backends/images.py, before resolve)
    VIRTIOFSD = "virtiofsd"  # a process at run time, not a store path
    PLAN = "plan"  # the build output: launch.sh, plan.json, ...


STORE_BUILDERS = frozenset({Builder.BUSYBOX_ROOTFS, Builder.BOOT_KERNEL, Builder.INIT, Builder.INITRAMFS})


@dataclass(frozen=True, kw_only=True, slots=True)
class Node:
    id: str
    builder: Builder
    digest: str
    path: str  # the source path, the store path, or "" (run-time and plan nodes)
    keys: tuple[str, ...] = ()  # the manifest keys this node comes from
    params: tuple[tuple[str, Any], ...] = ()  # what defines the output (hashed)
    locations: tuple[tuple[str, str], ...] = ()  # where a builder finds its sources (not hashed)

    def param(self, name: str) -> Any:
        return dict(self.params)[name]

    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def locations_dict(self) -> dict[str, str]:
        return dict(self.locations)

    def location(self, name: str) -> str:
        return dict(self.locations)[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "builder": str(self.builder),
            "digest": self.digest,
            "path": self.path,
            "keys": list(self.keys),
            "params": {k: v for k, v in self.params},
            "locations": {k: v for k, v in self.locations},
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Graph:
    nodes: tuple[Node, ...]  # in build order (topological, ties broken by id)
    edges: tuple[tuple[str, str], ...]  # (input, output), sorted
    cmdline: KernelCmdline
    accel: str
    accel_reason: str
    # What resolve looked at on the host and saw (compiler/hostfiles.py): while it all holds, so does the graph.
    observed: tuple[Observation, ...] = ()

    def node(self, node_id: str) -> Node:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)


    def to_dict(self, realised: dict[str, bool] | None = None) -> dict[str, Any]:
        """`realised`: which of the nodes something makes are made (backends/build.py's `realised`);
        left out of plan.json, whose bytes depend only on the inputs."""
        nodes = [n.to_dict() | ({"realised": realised[n.id]} if realised and n.id in realised else {}) for n in self.nodes]
        return {"nodes": nodes, "edges": [list(e) for e in self.edges]}

    def to_dot(self, realised: dict[str, bool] | None = None) -> str:
        lines = ["digraph microvmc {", "  rankdir=LR;", "  node [shape=box, fontname=monospace];"]
        for n in self.nodes:
            label = f"{n.id}\\n{n.builder}" + (f"\\n{os.path.basename(n.path)}" if n.path else "")
            if realised and n.id in realised:
                label += "\\n(built)" if realised[n.id] else "\\n(to build)"
            shape = ", style=dashed" if n.builder in (Builder.SOURCE, Builder.VIRTIOFSD) else ""
            lines.append(f'  "{n.id}" [label="{label}"{shape}];')
        lines += [f'  "{a}" -> "{b}";' for a, b in self.edges]
        lines.append("}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, kw_only=True, slots=True)
class Sources:
    """Where resolve finds microvmc's own sources (injectable for tests). It reads them, and every
    other file, through one HostFiles, which records each look."""

    # the guest init's sources: a directory of .c and .h files, compiled together
    init_source: str = field(default_factory=lambda: str(Path(__file__).resolve().parent.parent / "init"))
    # the Linux source microvmc's own kernel is built from; None: the one `microvmc kernel build` last
    # used, else Debian's linux-source-6.1 (compiler/kernels.py)
    kernel_source: str | None = None


def init_sources(directory: str, files: HostFiles | None = None) -> tuple[str, ...]:
    """The files of the guest init, by name: every .c and .h in its directory."""
    names = (files or HostFiles()).listdir(directory)
    return tuple(sorted(name for name in names if name.endswith((".c", ".h"))))


def base_kernel_params(accel: str, facts: HostFacts, cpus: int = 1, acpi: bool = True,
                       kernel_config: dict[str, str] | None = None) -> tuple[str, ...]:
    """The parameters microvmc itself puts on every kernel command line; `kernel_config`: the
    kernel's parsed .config (None: unknown), for the cuts that depend on what the kernel does."""
    # cryptomgr.notests: the crypto self-tests take ~0.23 s of a 1.3 s TCG boot (initcall_debug:
    # crypto_algapi_init); they are ignored anyway in FIPS mode, where they are mandatory.
    # loglevel=6 earlyprintk=serial,ttyS0 (in this order): the kernel's notices, a handful of lines,
    # reach the console from its first one on, so the host marks when the kernel started (the run's
    # timeline); measured to cost nothing against `quiet` (bench/RESULTS.md).
    params = ["console=ttyS0", "reboot=t", "panic=-1", "loglevel=6", "earlyprintk=serial,ttyS0", "cryptomgr.notests"]
    if accel == "tcg" and facts.tsc_khz:
        # A busy host can hang a TCG guest calibrating against the PIT; the TSC rate avoids it.
        params += [f"tsc_early_khz={facts.tsc_khz}", "tsc=reliable"]
    if accel == "tcg":
        # Measured under TCG (bench/RESULTS.md): patching every lock prefix away for one CPU takes
        # ~0.08 s of emulated code patching; calibrating the local APIC timer (twice 0.1 s of a
        # busy wait: TCG has no TSC-deadline timer) ~0.2 s, so one CPU ticks from the PIT instead.
        # Only on a machine without ACPI (microvmc's own kernel): the Debian kernel on microvm's
        # ACPI tables never ticks again without its APIC timer (its boot hangs).
        # no_timer_check: the IO-APIC timer check waits 4 ticks for an interrupt QEMU always routes
        # (4 ms at the own kernel's 1000 Hz, 16 ms at Debian's 250).
        params += ["noreplace-smp", "no_timer_check", *(("noapictimer",) if cpus == 1 and not acpi else ())]
        # What a distribution kernel's config makes it do at boot (kernel/cuts.py; measured under TCG,
        # where it costs ~0.2 s of the Debian kernel's boot; under KVM far less, and not measured).
        from microvmc.kernel.cuts import boot_cuts

        params += boot_cuts(kernel_config)
    return tuple(params)


def choose_accel(manifest: Manifest, facts: HostFacts) -> tuple[str, str]:
    wanted = manifest.resources.accel
    if wanted is Accel.TCG:
        return "tcg", "resources.accel is \"tcg\""
    if wanted is Accel.KVM:
        if not facts.kvm_usable:
            raise HostError(
                f"{manifest.name}: resources.accel: \"kvm\" is not usable here: {facts.kvm_reason}",
                hint="use \"auto\" or \"tcg\"",
            )
        return "kvm", "resources.accel is \"kvm\""
    if facts.kvm_usable:
        return "kvm", f"auto: {facts.kvm_reason}"
    return "tcg", f"auto: KVM is not usable ({facts.kvm_reason})"


def choose_transports(manifest: Manifest, facts: HostFacts, resolved: ResolvedImage | None = None) -> Manifest:
    """The manifest with every `transport = "auto"` made concrete: virtiofs where virtiofsd can run
    here, else 9p. An explicit virtiofs that cannot work is refused now, not when the VM boots. An
    image whose ownership is kept in xattrs (unpacked by an ordinary user) is served by 9p."""
    if resolved is not None and resolved.ownership == "mapped-xattr":
        if manifest.image.transport is Transport.VIRTIOFS:
            raise HostError(f"{manifest.name}: image.transport: \"virtiofs\" cannot serve an image unpacked by an "
                            "ordinary user (its owners are in user.virtfs xattrs, which only 9p reads)",
                            hint="use \"auto\" or \"9p\"")
        manifest = replace(manifest, image=replace(manifest.image, transport=Transport.NINEP))

    def choose(wanted: Transport, key: str) -> Transport:
        if wanted is Transport.AUTO:
            return Transport.VIRTIOFS if facts.virtiofs_ready else Transport.NINEP
        if wanted is Transport.VIRTIOFS and not facts.virtiofs_ready:
            why = facts.virtiofsd_reason if facts.virtiofsd else "virtiofsd is not installed"
            raise HostError(f"{manifest.name}: {key}: \"virtiofs\" is not usable here: {why}",
                            hint="use \"auto\" or \"9p\"")
        return wanted

    image = replace(manifest.image, transport=choose(manifest.image.transport, "image.transport"))
    shares = tuple(replace(s, transport=choose(s.transport, f"shares.{s.tag}.transport")) for s in manifest.shares)
    return replace(manifest, image=image, shares=shares)


# Mounted by init, writable, before the shares (init/PROTOCOL.md): a mount point below them can be made.
WRITABLE_BEFORE_SHARES = ("/tmp", "/run", "/dev")


# What init mounts on every root (init/PROTOCOL.md); a container image often lacks them.
REQUIRED_MOUNT_POINTS = ("/proc", "/sys", "/dev")


def missing_mount_points(manifest: Manifest, rootfs: str | None = None, files: HostFiles | None = None) -> tuple[str, ...]:
    """The mount points init could not make on the read-only root (/proc, /sys, /dev, the shares',
    and the targets of `mounts`): not in the image, and not below a writable filesystem mounted
    before them (a tmpfs, /dev, a writable share) nor present in the read-only share above them. A
    share's or tmpfs's mount point must be a directory; a bind's may be a file. `rootfs`: where an
    image's root filesystem is (for the sources that have no image.path). `files`: what records the looks."""
    if manifest.image.mode is not RootMode.READ_ONLY:
        return ()
    files = files or HostFiles()
    image = manifest.image
    rootfs = rootfs or image.path

    def in_image(path: str, exists: Callable[[str], bool]) -> bool:
        if image.source is ImageSource.BUILTIN:
            return has_directory(path)
        return rootfs is not None and exists(os.path.join(rootfs, path.lstrip("/")))

    required = tuple(p for p in REQUIRED_MOUNT_POINTS if not in_image(p, files.is_dir))

    mounted = {guest_path(s.guest): s for s in manifest.shares}

    def possible(path: str, exists: Callable[[str], bool]) -> bool:
        parts = path.strip("/").split("/")
        for parent in ("/" + "/".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)):  # nearest first
            share = mounted.get(parent)
            # /tmp and /run are mounted only where the image has them (a read-only root cannot make them)
            if (parent in WRITABLE_BEFORE_SHARES and in_image(parent, files.is_dir)) or (share is not None and not share.read_only):
                return True
            if share is not None:
                return exists(os.path.join(share.host, os.path.relpath(path, parent)))
        return in_image(path, exists)

    def landing(path: str) -> str:
        """Where a bind onto `path` lands: init follows the image's links on the way (init/boot.c:
        resolve_in_root), as runc does; a dangling /etc/resolv.conf -> ../run/... lands in /run."""
        if image.source is ImageSource.BUILTIN or rootfs is None:
            return path
        def readlink(parts: tuple[str, ...]) -> str | None:
            return files.readlink(os.path.join(rootfs, *parts))
        return "/" + "/".join(resolve_in_root(tuple(path.strip("/").split("/")), readlink, follow_last=True))

    points = [(s.guest, guest_path(s.guest), files.is_dir) for s in manifest.shares]
    points += [(m.target, landing(guest_path(m.target)), files.exists) if m.kind is MountKind.BIND
               else (m.target, guest_path(m.target), files.is_dir) for m in manifest.mounts]
    return required + tuple(target for target, path, exists in points if not possible(path, exists))


def root_mode_flag(manifest: Manifest, rootfs: str | None = None, files: HostFiles | None = None) -> str:
    """How init mounts the root (MVMC_ROOT): a read-only root that lacks a mount point is an
    overlay whose tmpfs gets the mount points, made read-only once the shares are mounted."""
    if missing_mount_points(manifest, rootfs, files):
        return "overlay-ro"
    return ROOT_MODE_FLAG[manifest.image.mode]


def guest_config(manifest: Manifest, root_mode: str, *, hold: bool = False) -> GuestConfig:
    return GuestConfig(
        argv=manifest.process.argv,
        env=manifest.process.env,
        cwd=manifest.process.cwd,
        user=manifest.process.user,
        rlimits=manifest.process.rlimits,
        tty=manifest.process.tty,
        hold=hold,
        hostname=manifest.hostname,
        net=_guest_net(manifest),
        root=GuestMount(fs=str(manifest.image.transport), tag=ROOT_TAG, mode=root_mode),
        # Mounted in this order: a share before any share mounted inside it.
        shares=tuple(
            GuestMount(fs=str(s.transport), tag=s.tag, mode="ro" if s.read_only else "rw", path=s.guest)
            for s in sorted(manifest.shares, key=lambda s: (s.guest.rstrip("/").count("/"), s.guest))
        ),
        # Then the mounts, in order, and the hidden shares they bound from are detached.
        mounts=tuple(_mount_op(m) for m in manifest.mounts)
        + tuple(GuestMountOp(kind="detach", a=s.guest) for s in manifest.shares if s.hidden)
        + ((GuestMountOp(kind="detach", a=NET_FILES),) if manifest.network.mode is not NetworkMode.NONE else ()),
    )


def _guest_net(manifest: Manifest) -> tuple[str, ...]:
    """MVMC_NET's fields: the addresses with their prefixes (the first is the hostname's in
    /etc/hosts), the default gateways (one per family), the DNS servers (none: empty); () without a network."""
    network = manifest.network
    if network.mode is NetworkMode.NONE:
        return ()
    if network.mode is NetworkMode.NETNS:
        return (",".join((network.address, *network.addresses)),
                ",".join(gw for gw in (network.gateway, network.gateway6) if gw), ",".join(network.dns))
    # isolated: slirp's DNS does not answer (restrict=on), so the guest is given none (a lookup then
    # fails at once instead of timing out)
    return (f"{USER_ADDRESS},{USER_ADDRESS6}", f"{USER_GATEWAY},{USER_GATEWAY6}",
            USER_DNS if network.mode is NetworkMode.USER else "")


def with_name_resolution(manifest: Manifest) -> Manifest:
    """With a network, the guest's /etc/hosts (its hostname on its address) and /etc/resolv.conf are
    init's, bound over whatever the image has, first of the mounts (a target the manifest binds
    itself is left to it). A read-only image that lacks them gets an overlay-ro root for their
    mount points (missing_mount_points), as for any bind."""
    if manifest.network.mode is NetworkMode.NONE:
        return manifest
    bound = {guest_path(m.target) for m in manifest.mounts if m.kind is MountKind.BIND}
    ours = tuple(Mount(kind=MountKind.BIND, target=path, source=f"{NET_FILES}/{os.path.basename(path)}")
                 for path in NAME_FILES if path not in bound)
    return replace(manifest, mounts=ours + manifest.mounts)


def _mount_op(mount: Mount) -> GuestMountOp:
    suffix = "-ro" if mount.read_only else ""
    if mount.kind is MountKind.BIND:
        return GuestMountOp(kind="bind" + (suffix or "-rw"), a=mount.source, b=mount.target)
    return GuestMountOp(kind="tmpfs" + suffix, a=mount.target, b=mount.options)


def resolve(manifest: Manifest, facts: HostFacts, store: str, sources: Sources = Sources(), *,
            hold: bool = False, image: ResolvedImage | None = None, files: HostFiles | None = None) -> Graph:
    """The dependency graph of a manifest. Reads source files (to hash them and to read kernel
    module metadata) but builds nothing; every look at the host goes through one HostFiles, and the
    graph keeps what it saw (`observed`). `image`: the container image backends/images.py found
    and unpacked for it (registry, OCI layout, docker archive, OCI bundle). `files`: the HostFiles
    that read the manifest (its looks are kept with resolve's)."""
    assert Transport.AUTO not in {manifest.image.transport, *(s.transport for s in manifest.shares)}, \
        "choose_transports first"
    from microvmc.compiler.kernels import OWN_KERNEL, check_features, choose_kernel, required_features
    from microvmc.kernel.requirements import parse_config

    files = files if files is not None else HostFiles()
    nodes: dict[str, Node] = {}
    edges: list[tuple[str, str]] = []

    def add(node: Node, *inputs: str) -> Node:
        nodes[node.id] = node
        edges.extend((i, node.id) for i in inputs)
        return node

    def derive(node_id: str, builder: Builder, name: str, inputs: tuple[str, ...], params: dict[str, Any],
               keys: tuple[str, ...], locations: dict[str, str] | None = None) -> Node:
        d = digest({"builder": str(builder), "version": BUILDER_VERSION, "params": params,
                    "inputs": {i: nodes[i].digest for i in inputs}})
        path = store_path(store, d, name) if builder in STORE_BUILDERS else ""
        return add(Node(id=node_id, builder=builder, digest=d, path=path, keys=keys,
                        params=tuple(sorted(params.items())),
                        locations=tuple(sorted((locations or {}).items()))), *inputs)

    def source(node_id: str, path: str, keys: tuple[str, ...], *, content: bool, data: bytes | None = None,
               locations: dict[str, str] | None = None) -> Node:
        # Files are identified by their content; shared directories by their path, because the
        # guest sees them live, not a copy.
        if data is not None:
            d = hashlib.sha256(data).hexdigest()
        else:
            d = files.digest(path) if content else digest({"directory": path})
        if not content:
            files.is_dir(path)  # identified by path; while it is a directory
        return add(Node(id=node_id, builder=Builder.SOURCE, digest=d, path=path, keys=keys,
                        locations=tuple(sorted((locations or {}).items()))))

    accel, accel_reason = choose_accel(manifest, facts)

    # The root filesystem.
    image, resolved = manifest.image, image
    if image.source is ImageSource.BUILTIN:
        if not facts.busybox or not files.is_file(facts.busybox):
            raise ManifestError([Problem(manifest.name, "image.source", "the built-in image needs a static busybox, which is not installed",
                                         "run scripts/setup (Debian: apt-get install busybox-static)")])
        source("busybox", facts.busybox, ("image.name",), content=True)
        derive("rootfs", Builder.BUSYBOX_ROOTFS, f"{image.name}-rootfs", ("busybox",), {"name": image.name}, ("image.source", "image.name"))
    elif resolved is not None and resolved.manifest_digest:
        # Unpacked once per image digest and ownership representation; read-only from then on.
        keys = ("image.reference",) if image.source is ImageSource.REGISTRY else ("image.path", "image.tag")
        add(Node(id="rootfs", builder=Builder.IMAGE, path=resolved.rootfs, keys=("image.source", *keys),
                 digest=digest({"image": resolved.manifest_digest, "ownership": resolved.ownership}),
                 params=tuple(sorted({"source": resolved.source, "digest": resolved.digest,
                                      "manifest": resolved.manifest_digest, "platform": resolved.platform,
                                      "ownership": resolved.ownership}.items()))))
    elif image.source is ImageSource.OCI_BUNDLE:
        assert resolved is not None, "an OCI bundle is read by backends/images.py first"
        source("rootfs", resolved.rootfs, ("image.path",), content=False)  # the bundle's rootfs, live
    else:
        assert image.path
        source("rootfs", image.path, ("image.path",), content=False)

    # The kernel, what QEMU boots of it, and the modules the plan needs (compiler/kernels.py).
    choice = choose_kernel(manifest, facts, files, own_source=sources.kernel_source)
    kernel_keys = ("kernel.source", "kernel.image") if manifest.kernel.source is KernelSource.PATH else ("kernel.source",)
    locations = {"chosen": choice.what}
    root_mode = root_mode_flag(manifest, resolved.rootfs if resolved else None, files)  # looks at the image's directories: once
    wanted_features = required_features(manifest, root_mode)
    if choice.own is not None:
        # A node the build makes (backends/kernelbuild.py), keyed by its inputs, and booted from its
        # entry (<kernels>/microvmc-<key>/vmlinux, a PVH ELF): nothing of it is read now. What it has
        # is what its fragment says (the build refuses a config that lost any of it).
        from microvmc.kernel.requirements import fragment

        own = choice.own
        config = kernel_config = parse_config(fragment())
        _acpi(config, locations)
        add(Node(id="kernel", builder=Builder.KERNEL, digest=digest({"kernel-build": own.key}), path=own.entry,
                 keys=kernel_keys, params=(("arch", "x86_64"), ("cc_version", own.cc_version),
                                           ("edits", own.edits_digest), ("fragment", own.fragment_digest),
                                           ("key", own.key),
                                           ("source", own.source_digest)),
                 locations=tuple(sorted({**locations, "cc": own.cc, "source": own.source}.items()))))
        check_features(wanted_features, image=own.image, release=f"{OWN_KERNEL}-{own.key}", config=config,
                       modules=frozenset())
        derive("modules", Builder.MODULES, "modules", ("kernel",), {"release": "", "modules": [], "strip_signatures": False},
               ("kernel.source",), {"modules_dir": ""})
    else:
        kernel_config = _source_kernel(choice, manifest, files, source, derive, kernel_keys, locations, wanted_features)

    # The guest's configuration travels on the kernel command line, or spills into the initramfs.
    config = guest_config(manifest, root_mode, hold=hold)
    try:
        cmdline = compose(base_kernel_params(accel, facts, manifest.resources.cpus, locations.get("acpi") != "off",
                                             kernel_config), manifest.kernel.cmdline, config)
    except CmdlineError as err:
        raise ManifestError([Problem(manifest.name, "kernel.cmdline", str(err))]) from None

    init_files = init_sources(sources.init_source, files)
    add(Node(id="init-src", builder=Builder.SOURCE, digest=digest({"files": [[n, files.digest(os.path.join(sources.init_source, n))] for n in init_files]}),
             path=sources.init_source))
    derive("init", Builder.INIT, "init", ("init-src",), {"cc": facts.init_cc or facts.cc or "cc",
                                                     "cc_version": facts.init_cc_version or facts.cc_version,
                                                     "libc": facts.init_libc, "cflags": list(INIT_CFLAGS)}, ())
    spill = cmdline.spill.decode("ascii") if cmdline.spill else None
    derive("initramfs", Builder.INITRAMFS, "initramfs", ("init", "modules"), {"spill": spill},
           ("process", "hostname") if spill else ())

    # One virtiofsd per virtiofs share, the root filesystem first.
    add(Node(id="share:root", builder=Builder.SOURCE, digest=nodes["rootfs"].digest, path=nodes["rootfs"].path,
             keys=("image",)), "rootfs")
    for share in manifest.shares:  # (a staged file: identified by the file's path; its directory is made per run)
        source(f"share:{share.tag}", share.staged_from or share.host, (f"shares.{share.tag}",), content=False)
    shares = [(ROOT_TAG, image.transport, image.mode is not RootMode.READ_WRITE)] + [
        (s.tag, s.transport, s.read_only) for s in manifest.shares
    ]
    # The plan runs the boot kernel with the initramfs, and each share through its virtiofsd, or
    # directly (QEMU serves 9p itself).
    plan_inputs = ["kernel" if choice.own is not None else "boot-kernel", "initramfs"]
    for tag, transport, read_only in shares:
        if transport is Transport.VIRTIOFS:
            derive(f"virtiofsd:{tag}", Builder.VIRTIOFSD, f"virtiofsd-{tag}", (f"share:{tag}",),
                   {"read_only": read_only}, ("image.transport",) if tag == ROOT_TAG else (f"shares.{tag}",))
            plan_inputs.append(f"virtiofsd:{tag}")
        else:
            plan_inputs.append(f"share:{tag}")
    derive("plan", Builder.PLAN, "plan", tuple(sorted(plan_inputs)), {"manifest": manifest.to_dict(), "accel": accel, **({"hold": True} if hold else {}),
                                                         "cmdline": str(cmdline), "host": facts.to_dict()}, ())
    return Graph(nodes=tuple(_build_order(nodes, edges)), edges=tuple(sorted(set(edges))), cmdline=cmdline,
                 accel=accel, accel_reason=accel_reason, observed=files.observations())


def _acpi(config: dict[str, str] | None, locations: dict[str, str]) -> None:
    if config is not None and not (config.get("ACPI") == "y" and config.get("PCI") == "y"):
        # Measured: 6.1 with ACPI but without PCI fails to load microvm's ACPI tables (AE_BAD_PARAMETER)
        # and finds no device; with the machine's ACPI off, QEMU names the virtio-mmio devices on the
        # kernel command line instead (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) and the MP table the CPUs.
        locations["acpi"] = "off"


def _source_kernel(choice, manifest: Manifest, files: HostFiles, source, derive, kernel_keys: tuple[str, ...],
                   locations: dict[str, str], wanted_features: tuple[str, ...]) -> dict[str, str] | None:
    """A kernel that is a file already (the Debian kernel, the host's, one by path): a source,
    identified by content; its config, release and module closure are read now, through `files`.
    Returns its parsed config (None when it has none that can be read)."""
    from microvmc.compiler.kernels import check_features
    from microvmc.kernel.image import embedded_config, inspect_kernel
    from microvmc.kernel.modules import resolve_modules, scan_modules, signatures_optional
    from microvmc.kernel.requirements import parse_config

    kernel_image, modules_dir = choice.image, choice.modules
    kernel_data = files.read(kernel_image)
    source("kernel", kernel_image, kernel_keys, content=True, data=kernel_data, locations={"chosen": locations.pop("chosen")})
    info = inspect_kernel(kernel_data, path=kernel_image)
    release = info.release or (os.path.basename(os.path.normpath(modules_dir)) if modules_dir else "")
    if not release[:1].isdigit():
        raise KernelError(f"{kernel_image}: cannot tell which kernel release this is, so its modules cannot be checked",
                          hint="name the modules directory after the release, as lib/modules/<release> is")
    module_bytes: dict[str, bytes] = {}  # read once: for .modinfo, then for the digest

    def read_module(path: Path) -> bytes:
        if str(path) not in module_bytes:
            module_bytes[str(path)] = files.read(str(path))
        return module_bytes[str(path)]

    config_path = choice.config
    config_text = files.read(config_path).decode("utf-8", "replace") if config_path else embedded_config(kernel_data)
    tree = scan_modules(Path(modules_dir), files) if modules_dir else None
    config = parse_config(config_text) if config_text is not None else None
    _acpi(config, locations)
    derive("boot-kernel", Builder.BOOT_KERNEL, "kernel", ("kernel",), {"release": release}, kernel_keys, locations)
    # Pre-flight: what the plan needs, built in or as modules, or one line saying what is missing.
    wanted = check_features(wanted_features, image=kernel_image, release=release, config=config,
                            builtin=tree.builtin if tree else frozenset(),
                            modules=frozenset(tree.modules) if tree else None)
    resolved = resolve_modules(tree, wanted, release=release, read=read_module) if tree else ()
    # Modules are identified by content, so the same modules elsewhere give the same initramfs.
    module_files = [
        {"name": m.name, "path": str(m.path),
         "digest": hashlib.sha256(read_module(Path(modules_dir) / m.path)).hexdigest()}
        for m in resolved
    ]
    if config_path:
        source("kernel-config", config_path, kernel_keys, content=True)
    strip = signatures_optional(config_text, manifest.kernel.cmdline) if tree else False
    derive("modules", Builder.MODULES, "modules", ("kernel", *(("kernel-config",) if config_path else ())),
           {"release": release, "modules": module_files, "strip_signatures": strip},
           ("kernel.source", "image.transport", "image.mode", "shares"), {"modules_dir": modules_dir or ""})
    return config


def _build_order(nodes: dict[str, Node], edges: list[tuple[str, str]]) -> Iterator[Node]:
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    g.add_edges_from(edges)
    for node_id in nx.lexicographical_topological_sort(g):
        yield nodes[node_id]
