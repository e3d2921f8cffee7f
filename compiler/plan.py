"""plan: a resolved Graph → the Machine it describes → the LaunchPlan (exact QEMU argv, virtiofsd argv,
kernel command line). The Machine is VMM-neutral; compiler/qemu.py lowers it to QEMU's argv."""

from __future__ import annotations

import ipaddress

from microvmc.compiler.graph import (ROOT_TAG, USER_ADDRESS, USER_ADDRESS6, USER_DNS, USER_GATEWAY, USER_GATEWAY6,
                                    USER_NETWORK, USER_NETWORK6, Builder, Graph)
from microvmc.compiler.host import HostFacts, VirtiofsdFlavour
from microvmc.compiler import qemu
from microvmc.compiler.launch import Fd, LaunchPlan, VirtiofsdPlan
from microvmc.compiler.machine import PORTS, Filesystem, Machine, Nic, NicKind
from microvmc.compiler.manifest import Manifest, NetworkMode, RootMode, Transport
from microvmc.errors import HostError

__all__ = ["plan", "describe", "fuse_escape", "virtiofsd_argv", "read_only_jail"]


def fuse_escape(value: str) -> str:
    """The C virtiofsd parses `-o` with fuse_opt: `,` separates options and `\\` escapes."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


# The C virtiofsd (QEMU <= 7.2) has no read-only mode, and the guest's mount flags protect nothing (a
# guest can remount). So a read-only share is served from a read-only bind mount of itself, made in a
# private mount namespace (util-linux unshare) that only this virtiofsd lives in: the host's mount
# table is untouched, and every write the guest sends fails on the host with EROFS. The bind is not
# recursive, so no writable mount below the directory shows through. The script is fixed text; the
# directory and virtiofsd's argv (to which the socket option is appended) are its arguments.
READ_ONLY_JAIL = ('dir=$1; shift; mount --bind -- "$dir" "$dir" && mount -o remount,bind,ro -- "$dir" && '
                  'exec "$@"')


def read_only_jail(shared_dir: str) -> tuple[str, ...]:
    """The argv prefix that runs the rest of an argv with `shared_dir` read-only, for it alone."""
    return ("unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", READ_ONLY_JAIL, "microvmc-read-only", shared_dir)


def virtiofsd_argv(binary: str, flavour: VirtiofsdFlavour, shared_dir: str, read_only: bool,
                   immutable: bool = False) -> tuple[str, ...]:
    """virtiofsd's argv without its socket option (appended last). A read-only share is refused
    writes on the host: by the Rust virtiofsd's --readonly, or by a read-only bind mount that the C
    virtiofsd is confined to (read_only_jail). An immutable directory is cached by the guest without
    revalidation ("always"); any other is revalidated on open ("auto"), as a live host directory needs:
    under "auto" every open drops the file's cached pages, so each exec of a program reads it whole again
    (an exec of busybox over virtio-fs under TCG: 43 ms warm with "auto", 3 ms with "always")."""
    cache = "always" if immutable else "auto"
    if flavour is VirtiofsdFlavour.RUST:
        argv = [binary, "--shared-dir", shared_dir, "--cache", cache, "--sandbox", "chroot"]
        return tuple(argv + (["--readonly"] if read_only else []))
    argv = (binary, "-o", f"source={fuse_escape(shared_dir)}", "-o", f"cache={cache}", "-o", "sandbox=chroot")
    return (*read_only_jail(shared_dir), *argv) if read_only else argv


# Root file systems that are store paths, never written once made: the built-in image and unpacked images
# (a directory image or an OCI bundle's rootfs is the host's, live, and may change under the VM).
IMMUTABLE_ROOTS = frozenset({Builder.BUSYBOX_ROOTFS, Builder.IMAGE})


def boot_kernel(graph: Graph) -> tuple[str, bool]:
    """What QEMU boots, and whether the machine has ACPI: the own kernel's vmlinux from its entry
    (compiler/kernels.py), else the boot-kernel the store holds."""
    kernel = graph.node("kernel")
    if kernel.builder is Builder.KERNEL:
        return kernel.path + "/vmlinux", kernel.locations_dict().get("acpi") != "off"
    boot = graph.node("boot-kernel")
    return boot.path + "/kernel", boot.locations_dict().get("acpi") != "off"


def describe(manifest: Manifest, graph: Graph) -> Machine:
    """The VM the graph builds, in no VMM's words."""
    read_only = manifest.image.mode is not RootMode.READ_WRITE
    filesystems = [Filesystem(tag=ROOT_TAG, transport=str(manifest.image.transport), host_dir=graph.node("share:root").path,
                              read_only=read_only, immutable=read_only and graph.node("rootfs").builder in IMMUTABLE_ROOTS,
                              keys=("image.path", "image.transport", "image.mode"),
                              ownership=graph.node("rootfs").params_dict().get("ownership", "native"))]
    kernel, acpi = boot_kernel(graph)
    filesystems += [Filesystem(tag=s.tag, transport=str(s.transport), host_dir=s.host, read_only=s.read_only,
                               keys=(f"shares.{s.tag}",), staged_from=s.staged_from) for s in manifest.shares]
    return Machine(
        name=manifest.hostname,
        accel=graph.accel,
        accel_reason=graph.accel_reason,
        cpus=manifest.resources.cpus,
        memory_mib=manifest.resources.memory,
        kernel=kernel,
        initrd=graph.node("initramfs").path + "/initramfs.cpio.gz",
        cmdline=str(graph.cmdline),
        console=Fd.CONSOLE,
        ports=PORTS,
        filesystems=tuple(filesystems),
        acpi=acpi,
        nic=_nic(manifest),
    )


def _nic(manifest: Manifest) -> Nic | None:
    network = manifest.network
    if network.mode is NetworkMode.NONE:
        return None
    if network.mode is NetworkMode.NETNS:
        keys = ("network.mode", "network.namespace", "network.interface", "network.address", "network.addresses",
                "network.gateway", "network.gateway6", "network.mac", "network.mtu")
        return Nic(kind=NicKind.TAP, outbound=True, network=str(ipaddress.IPv4Interface(network.address).network),
                   address=network.address, gateway=network.gateway, dns=",".join(network.dns), forwards=(),
                   keys=keys, mac=network.mac, namespace=network.namespace, interface=network.interface,
                   mtu=network.mtu, addresses=network.addresses, gateway6=network.gateway6)
    return Nic(outbound=network.mode is NetworkMode.USER, network=USER_NETWORK, address=USER_ADDRESS,
               gateway=USER_GATEWAY, dns=USER_DNS,
               forwards=tuple((str(f.protocol), f.host_address, f.host, f.guest) for f in network.forwards),
               keys=("network.mode", "network.forwards", "network.mtu"),
               sources=tuple(f.shown for f in network.forwards), mtu=network.mtu,
               network6=USER_NETWORK6, addresses=(USER_ADDRESS6,), gateway6=USER_GATEWAY6)


def plan(manifest: Manifest, graph: Graph, facts: HostFacts) -> LaunchPlan:
    if not facts.qemu:
        raise HostError("QEMU is not installed: no qemu-system-x86_64 found", hint="run scripts/setup")
    machine = describe(manifest, graph)
    virtiofsd: list[VirtiofsdPlan] = []
    for fs in machine.filesystems:
        if fs.transport != str(Transport.VIRTIOFS):
            continue
        assert facts.virtiofsd and facts.virtiofsd_flavour, "choose_transports refuses virtiofs without it"
        virtiofsd.append(VirtiofsdPlan(tag=fs.tag, keys=fs.keys, shared_dir=fs.host_dir, socket=f"fs-{fs.tag}.sock",
                                       read_only=fs.read_only, flavour=facts.virtiofsd_flavour,
                                       argv=virtiofsd_argv(facts.virtiofsd, facts.virtiofsd_flavour, fs.host_dir,
                                                           fs.read_only, fs.immutable)))
    return LaunchPlan(
        name=manifest.hostname,
        accel=machine.accel,
        accel_reason=machine.accel_reason,
        machine=machine,
        qemu=qemu.lower(machine, facts),
        virtiofsd=tuple(virtiofsd),
        cmdline=str(graph.cmdline),
        spilled=graph.cmdline.spilled,
        kernel=machine.kernel,
        initramfs=machine.initrd,
        boot_timeout=manifest.resources.boot_timeout,
        timeout=manifest.resources.timeout,
        stop_timeout=manifest.resources.stop_timeout,
        log_max_size=manifest.logs.max_size,
        log_max_files=manifest.logs.max_files,
        transports=tuple((fs.tag, fs.transport) for fs in machine.filesystems),
        sources=manifest.files,
    )

