"""plan: a resolved Graph → the Machine it describes → the LaunchPlan (exact QEMU argv, virtiofsd argv,
kernel command line). The Machine is VMM-neutral; compiler/qemu.py lowers it to QEMU's argv."""

from __future__ import annotations

from microvmc.compiler.graph import ROOT_TAG, Graph
from microvmc.compiler.host import HostFacts, VirtiofsdFlavour
from microvmc.compiler import qemu
from microvmc.compiler.launch import Fd, LaunchPlan, VirtiofsdPlan
from microvmc.compiler.machine import PORTS, Filesystem, Machine
from microvmc.compiler.manifest import Manifest, RootMode, Transport
from microvmc.errors import HostError

__all__ = ["plan", "describe", "fuse_escape", "virtiofsd_argv"]


def fuse_escape(value: str) -> str:
    """The C virtiofsd parses `-o` with fuse_opt: `,` separates options and `\\` escapes."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def virtiofsd_argv(binary: str, flavour: VirtiofsdFlavour, shared_dir: str, read_only: bool) -> tuple[str, ...]:
    """virtiofsd's argv without its socket option. The C virtiofsd (QEMU <= 7.2) has no read-only
    mode: the guest mounts such a share read-only instead."""
    if flavour is VirtiofsdFlavour.RUST:
        argv = [binary, "--shared-dir", shared_dir, "--cache", "auto", "--sandbox", "chroot"]
        return tuple(argv + (["--readonly"] if read_only else []))
    return (binary, "-o", f"source={fuse_escape(shared_dir)}", "-o", "cache=auto", "-o", "sandbox=chroot")


def describe(manifest: Manifest, graph: Graph) -> Machine:
    """The VM the graph builds, in no VMM's words."""
    filesystems = [Filesystem(tag=ROOT_TAG, transport=str(manifest.image.transport), host_dir=graph.node("share:root").path,
                              read_only=manifest.image.mode is not RootMode.READ_WRITE,
                              keys=("image.path", "image.transport", "image.mode"))]
    filesystems += [Filesystem(tag=s.tag, transport=str(s.transport), host_dir=s.host, read_only=s.read_only,
                               keys=(f"shares.{s.tag}",)) for s in manifest.shares]
    return Machine(
        name=manifest.hostname,
        accel=graph.accel,
        accel_reason=graph.accel_reason,
        cpus=manifest.resources.cpus,
        memory_mib=manifest.resources.memory,
        kernel=graph.node("boot-kernel").path + "/kernel",
        initrd=graph.node("initramfs").path + "/initramfs.cpio.gz",
        cmdline=str(graph.cmdline),
        console=Fd.CONSOLE,
        ports=PORTS,
        filesystems=tuple(filesystems),
    )


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
                                                           fs.read_only)))
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
        transports=tuple((fs.tag, fs.transport) for fs in machine.filesystems),
        sources=manifest.files,
    )

