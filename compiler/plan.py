"""plan: a resolved Graph → the LaunchPlan (exact QEMU argv, virtiofsd argv, kernel command line)."""

from __future__ import annotations

from microvmc.compiler.graph import ROOT_TAG, Graph
from microvmc.compiler.host import HostFacts, VirtiofsdFlavour
from microvmc.compiler.launch import ArgGroup, Fd, LaunchPlan, VirtiofsdPlan
from microvmc.compiler.manifest import Manifest, RootMode, Transport
from microvmc.compiler.qemuopts import opts
from microvmc.errors import HostError

__all__ = ["plan", "fuse_escape", "virtiofsd_argv"]

CPU_MODEL = {"kvm": "host", "tcg": "max"}


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


def _chardev_file(name: str, fd: Fd) -> tuple[str, ...]:
    return ("-chardev", opts("file", ("id", name), ("path", f"/dev/fd/{int(fd)}"), ("append", True)))


def _port(name: str) -> tuple[str, ...]:
    return ("-device", opts("virtserialport", ("chardev", name), ("name", name)))


def plan(manifest: Manifest, graph: Graph, facts: HostFacts) -> LaunchPlan:
    if not facts.qemu:
        raise HostError("QEMU is not installed: no qemu-system-x86_64 found", hint="run scripts/setup")
    accel = graph.accel
    memory = f"{manifest.resources.memory}M"
    kernel = graph.node("boot-kernel").path + "/kernel"
    initramfs = graph.node("initramfs").path + "/initramfs.cpio.gz"

    groups = [
        ArgGroup(keys=(), comment="the microvm machine: no firmware, no PCI, no default devices",
                 args=(facts.qemu, "-M", opts("microvm", ("memory-backend", "mem")),
                       "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot")),
        ArgGroup(keys=("resources.accel",), comment=f"accelerator: {graph.accel_reason}",
                 args=("-accel", accel, "-cpu", CPU_MODEL[accel])),
        ArgGroup(keys=("resources.cpus", "resources.memory"),
                 comment="CPUs and memory; a shared memfd so virtiofsd can map guest memory",
                 args=("-smp", str(manifest.resources.cpus), "-m", memory,
                       "-object", opts("memory-backend-memfd", ("id", "mem"), ("size", memory), ("share", True)))),
        ArgGroup(keys=("kernel.source", "kernel.cmdline", "process", "hostname"),
                 comment="kernel, initramfs (init + modules), and the command line that configures init",
                 args=("-kernel", kernel, "-initrd", initramfs, "-append", str(graph.cmdline))),
        ArgGroup(keys=(), comment=f"guest console (kernel messages) to fd {int(Fd.CONSOLE)}, the run's console log",
                 args=("-serial", "chardev:console", *_chardev_file("console", Fd.CONSOLE))),
        ArgGroup(keys=("process",),
                 comment="the program's stdin, stdout and stderr, init's status reports and the host's requests "
                         "(signals for the program): separate virtio-serial ports",
                 args=("-device", "virtio-serial-device",
                       "-chardev", opts("stdio", ("id", "stdin"), ("signal", False)), *_port("stdin"),
                       *_chardev_file("stdout", Fd.STDOUT), *_port("stdout"),
                       *_chardev_file("stderr", Fd.STDERR), *_port("stderr"),
                       *_chardev_file("status", Fd.STATUS), *_port("status"),
                       "-chardev", opts("pipe", ("id", "control"), ("path", f"/dev/fd/{int(Fd.CONTROL)}")),
                       *_port("control"))),
    ]

    virtiofsd: list[VirtiofsdPlan] = []
    needs_modern_mmio = False
    mounts = [(ROOT_TAG, graph.node("share:root").path, manifest.image.transport,
               manifest.image.mode is not RootMode.READ_WRITE, ("image.path", "image.transport", "image.mode"))]
    mounts += [(s.tag, s.host, s.transport, s.read_only, (f"shares.{s.tag}",)) for s in manifest.shares]
    for tag, host_dir, transport, read_only, keys in mounts:
        chardev = f"fs-{tag}"
        if transport is Transport.VIRTIOFS:
            assert facts.virtiofsd and facts.virtiofsd_flavour, "choose_transports refuses virtiofs without it"
            needs_modern_mmio = True
            socket = f"{chardev}.sock"
            virtiofsd.append(VirtiofsdPlan(tag=tag, keys=keys, shared_dir=host_dir, socket=socket, read_only=read_only,
                                           flavour=facts.virtiofsd_flavour,
                                           argv=virtiofsd_argv(facts.virtiofsd, facts.virtiofsd_flavour, host_dir, read_only)))
            args = ("-chardev", opts("socket", ("id", chardev), ("path", socket)),
                    "-device", opts("vhost-user-fs-device", ("chardev", chardev), ("tag", tag)))
            comment = f"share {tag!r}: {host_dir} over virtiofs"
        else:
            args = ("-fsdev", opts("local", ("id", chardev), ("path", host_dir), ("security_model", "none"),
                                   ("readonly", read_only)),
                    "-device", opts("virtio-9p-device", ("fsdev", chardev), ("mount_tag", tag)))
            comment = f"share {tag!r}: {host_dir} over 9p"
        groups.append(ArgGroup(keys=keys, comment=comment + (" (read-only)" if read_only else ""), args=args))
    if needs_modern_mmio:
        # The C virtiofsd (libvhost-user) refuses legacy virtio, microvm's default for virtio-mmio.
        groups.insert(3, ArgGroup(keys=(), comment="vhost-user-fs needs modern (non-legacy) virtio-mmio",
                                  args=("-global", "virtio-mmio.force-legacy=false")))

    return LaunchPlan(
        name=manifest.hostname,
        accel=accel,
        accel_reason=graph.accel_reason,
        qemu=tuple(groups),
        virtiofsd=tuple(virtiofsd),
        cmdline=str(graph.cmdline),
        spilled=graph.cmdline.spilled,
        kernel=kernel,
        initramfs=initramfs,
        boot_timeout=manifest.resources.boot_timeout,
        timeout=manifest.resources.timeout,
        stop_timeout=manifest.resources.stop_timeout,
        transports=tuple((tag, str(transport)) for tag, _, transport, _, _ in mounts),
        sources=manifest.files,
    )

