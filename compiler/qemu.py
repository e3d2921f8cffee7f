"""The QEMU lowering of a Machine: the `microvm` machine's exact argv, in commented groups.

Each group names the manifest keys it comes from; launch.sh prints them as comments above its lines.
"""

from __future__ import annotations

from microvmc.compiler.host import HostFacts
from microvmc.compiler.launch import ArgGroup, Fd
from microvmc.compiler.machine import Filesystem, Link, Machine, Nic, NicKind, Port
from microvmc.compiler.qemuopts import opts

__all__ = ["lower", "CPU_MODEL"]

# TCG: no ERMS/FSRM, so the kernel's memset, clear_page and memcpy are word loops (rep stosq, unrolled
# movs), not `rep movsb/stosb`, which TCG runs one byte per iteration (bench/RESULTS.md).
CPU_MODEL = {"kvm": "host", "tcg": "max,-erms,-fsrm"}


def _chardev(port: Port) -> tuple[str, ...]:
    """The chardev for one port's host end."""
    if port.link is Link.SOCKET:
        # QEMU listens; the host connects when it needs the port, and may reconnect.
        return ("-chardev", opts("socket", ("id", port.name), ("path", port.socket), ("server", True),
                                 ("wait", False)))
    assert port.fd is not None
    if port.link is Link.WRITE:
        return ("-chardev", opts("file", ("id", port.name), ("path", f"/dev/fd/{int(port.fd)}"), ("append", True)))
    if port.fd is Fd.STDIN:
        # stdio: its end of input is the guest's (signal=off: a terminal's Ctrl-C is not QEMU's to take)
        return ("-chardev", opts("stdio", ("id", port.name), ("signal", False)))
    return ("-chardev", opts("pipe", ("id", port.name), ("path", f"/dev/fd/{int(port.fd)}")))


# 9p's security model for each way of keeping ownership: "none" serves files as they are;
# "mapped-xattr" serves the owner, group and mode that the user.virtfs.* xattrs record.
SECURITY_MODEL = {"native": "none", "mapped-xattr": "mapped-xattr"}


def _filesystem(fs: Filesystem) -> ArgGroup:
    chardev = f"fs-{fs.tag}"
    if fs.transport == "virtiofs":
        args = ("-chardev", opts("socket", ("id", chardev), ("path", f"{chardev}.sock")),
                "-device", opts("vhost-user-fs-device", ("chardev", chardev), ("tag", fs.tag)))
    else:
        args = ("-fsdev", opts("local", ("id", chardev), ("path", fs.host_dir),
                               ("security_model", SECURITY_MODEL[fs.ownership]),
                               ("readonly", fs.read_only)),
                "-device", opts("virtio-9p-device", ("fsdev", chardev), ("mount_tag", fs.tag)))
    comment = f"share {fs.tag!r}: {fs.host_dir} over {fs.transport}" + (" (read-only)" if fs.read_only else "")
    if fs.staged_from:
        comment += f", in the run directory, holding {fs.staged_from} alone (run -v)"
    return ArgGroup(keys=fs.keys, comment=comment, args=args)


def _nic(nic: Nic) -> ArgGroup:
    if nic.kind is NicKind.TAP:
        # vhost=off: vhost-net wants /dev/vhost-net and is a kernel fast path, not a need on TCG
        args = ("-netdev", opts("tap", ("id", "net0"), ("fd", str(int(Fd.TAP))), ("vhost", False)),
                "-device", opts("virtio-net-device", ("netdev", "net0"), ("mac", nic.mac), ("host_mtu", str(nic.mtu))))
        comment = (f"the network namespace {nic.namespace}'s {nic.interface or 'interface'}, through a tap (fd "
                   f"{int(Fd.TAP)}) joined to it by tc mirred redirects; guest {', '.join((nic.address, *nic.addresses))} "
                   f"via {', '.join(gw for gw in (nic.gateway, nic.gateway6) if gw)}, MAC {nic.mac}, MTU {nic.mtu}")
        return ArgGroup(keys=nic.keys, comment=comment, args=args)
    # slirp: the guest's DHCP is unused (init sets the address), hostfwd listens on the host
    hostfwd = [("hostfwd", f"{proto}:{address}:{host}-:{guest}") for proto, address, host, guest in nic.forwards]
    args = ("-netdev", opts("user", ("id", "net0"), ("net", nic.network), ("ipv6-net", nic.network6),
                            ("restrict", not nic.outbound), *hostfwd),
            "-device", opts("virtio-net-device", ("netdev", "net0"), ("host_mtu", str(nic.mtu))))
    what = "user-mode network" if nic.outbound else "isolated user-mode network (restrict=on: no way out)"
    forwards = ", ".join(f"{a}:{h}->{g}/{p}" + (f" ({nic.source(i)})" if nic.source(i).startswith("-p ") else "")
                         for i, (p, a, h, g) in enumerate(nic.forwards)) or "no forwards"
    return ArgGroup(keys=nic.keys, comment=f"{what}, guest {', '.join((nic.address, *nic.addresses))}, MTU {nic.mtu}; {forwards}", args=args)


def lower(machine: Machine, facts: HostFacts) -> tuple[ArgGroup, ...]:
    """QEMU's argv for the machine, as groups of options."""
    memory = f"{machine.memory_mib}M"
    # max_ports: the ports there are (and port 0, which QEMU keeps for a console): the guest driver makes
    # two virtqueues for every possible port at probe, 64 for QEMU's default 31 (bench/RESULTS.md).
    ports: list[str] = ["-device", opts("virtio-serial-device", ("max_ports", str(len(machine.ports) + 1)))]
    for port in machine.ports:
        ports += [*_chardev(port), "-device", opts("virtserialport", ("chardev", port.name), ("name", port.name))]
    groups = [
        ArgGroup(keys=(), comment="the microvm machine: no firmware, no PCI, no default devices",
                 args=(facts.qemu, "-M", opts("microvm", ("memory-backend", "mem"), ("acpi", None if machine.acpi else False)),
                       "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot")),
        ArgGroup(keys=("resources.accel",), comment=f"accelerator: {machine.accel_reason}",
                 args=("-accel", machine.accel, "-cpu", CPU_MODEL[machine.accel])),
        ArgGroup(keys=("resources.cpus", "resources.memory"),
                 comment="CPUs and memory; a shared memfd so virtiofsd can map guest memory",
                 args=("-smp", str(machine.cpus), "-m", memory,
                       "-object", opts("memory-backend-memfd", ("id", "mem"), ("size", memory), ("share", True)))),
    ]
    if any(fs.transport == "virtiofs" for fs in machine.filesystems):
        # The C virtiofsd (libvhost-user) refuses legacy virtio, microvm's default for virtio-mmio.
        groups.append(ArgGroup(keys=(), comment="vhost-user-fs needs modern (non-legacy) virtio-mmio",
                               args=("-global", "virtio-mmio.force-legacy=false")))
    groups += [
        ArgGroup(keys=("kernel.source", "kernel.cmdline", "process", "hostname"),
                 comment="kernel, initramfs (init + modules), and the command line that configures init",
                 args=("-kernel", machine.kernel, "-initrd", machine.initrd, "-append", machine.cmdline)),
        ArgGroup(keys=(), comment=f"guest console (kernel messages) to fd {int(machine.console)}, the run's console log",
                 args=("-serial", "chardev:console", "-chardev",
                       opts("file", ("id", "console"), ("path", f"/dev/fd/{int(machine.console)}"), ("append", True)))),
        ArgGroup(keys=("process",),
                 comment="the program's stdin, stdout and stderr, init's status reports and the host's requests "
                         "(signals for the program): separate virtio-serial ports",
                 args=tuple(ports)),
    ]
    groups += [_filesystem(fs) for fs in machine.filesystems]
    if machine.nic is not None:
        groups.append(_nic(machine.nic))
    return tuple(groups)
