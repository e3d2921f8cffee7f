"""The machine: what a VM is made of, said without any VMM's words.

    Graph ─describe─▶ Machine ─lower─▶ one VMM's command line (compiler/qemu.py: QEMU's microvm)

The description says which CPUs, memory, kernel, initramfs and kernel command line the VM has, which
named channels connect the guest init to the host and how the host end is attached (a descriptor
the backend sets up, or a socket the host connects to), and which host directories the guest sees.
A lowering turns it into argv for one VMM and refuses, before anything runs, what that VMM cannot do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

TYPE_CHECKING = False  # (not typing's: `microvmc run` imports this while the guest boots; typing is ~2 ms of CPU)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Fd", "Link", "Port", "Filesystem", "NicKind", "Nic", "Machine", "PORTS", "CHANNEL_SOCKET"]

CHANNEL_SOCKET = "channel.sock"  # in the run directory: the exec channel's host end (init/PROTOCOL.md)


class Fd(IntEnum):
    """The descriptors the VMM is started with: the host ends of the ports, its log, the console.
    It runs in the run directory, so sockets are relative paths and no runtime path is baked in."""

    STDIN = 0  # the program's stdin (a `stdio` chardev: its EOF is the program's EOF)
    STDOUT = 1  # the program's stdout
    QEMU_LOG = 2  # QEMU's own messages
    STDERR = 3  # the program's stderr
    STATUS = 4  # init's reports (init/PROTOCOL.md)
    CONSOLE = 5  # the guest console: kernel messages, kept in the run's console log
    CONTROL = 6  # requests to init (`signal <n>`, init/PROTOCOL.md); QEMU opens it as a pipe chardev
    TAP = 7  # a Nic of kind TAP: the tap device the backend made in the network namespace (backends/netns.py)


class Link(StrEnum):
    """How the host end of a guest port is attached."""

    READ = "read"  # the guest reads what the host writes into descriptor `fd`
    WRITE = "write"  # the guest writes into descriptor `fd`
    SOCKET = "socket"  # both ways, through a socket in the run directory that the host connects to


@dataclass(frozen=True, kw_only=True, slots=True)
class Port:
    """A named byte stream between the guest init and the host (init/PROTOCOL.md)."""

    name: str  # what init looks for
    link: Link
    fd: Fd | None = None  # READ, WRITE
    socket: str = ""  # SOCKET: relative to the run directory

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "link": str(self.link), "fd": int(self.fd) if self.fd is not None else None,
                "socket": self.socket}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Port":
        return cls(name=d["name"], link=Link(d["link"]), fd=Fd(d["fd"]) if d["fd"] is not None else None,
                   socket=d["socket"])


# The ports every VM has: the program's three streams, init's reports, the host's requests, and the
# channel that carries any number of further process sessions (exec).
PORTS: tuple[Port, ...] = (
    Port(name="stdin", link=Link.READ, fd=Fd.STDIN),
    Port(name="stdout", link=Link.WRITE, fd=Fd.STDOUT),
    Port(name="stderr", link=Link.WRITE, fd=Fd.STDERR),
    Port(name="status", link=Link.WRITE, fd=Fd.STATUS),
    Port(name="control", link=Link.READ, fd=Fd.CONTROL),
    Port(name="channel", link=Link.SOCKET, socket=CHANNEL_SOCKET),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Filesystem:
    """A host directory the guest mounts by its tag."""

    tag: str
    transport: str  # "virtiofs" (through a virtiofsd) or "9p" (served by the VMM)
    host_dir: str
    read_only: bool  # enforced on the host side, whatever the guest's mount flags say
    keys: tuple[str, ...]  # the manifest keys it comes from
    # How the files' owners and modes are kept: "native" (as they are), or "mapped-xattr" (in
    # user.virtfs.* xattrs: an image an ordinary user unpacked; 9p only).
    ownership: str = "native"
    # A single host file (`run -v FILE:...`): `host_dir` is relative to the run directory, made per run
    # holding this file alone (backends/qemu.py stages it), so nothing beside it crosses into the VM.
    staged_from: str = ""
    # The directory cannot change while the VM runs (a store path, served read-only): the guest may keep
    # its data, names and attributes cached for as long as it likes, across opens (virtiofsd's
    # cache=always: an exec of a program already read reads nothing again).
    immutable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"tag": self.tag, "transport": self.transport, "host_dir": self.host_dir,
                "read_only": self.read_only, "keys": list(self.keys),
                **({"ownership": self.ownership} if self.ownership != "native" else {}),
                **({"staged_from": self.staged_from} if self.staged_from else {}),
                **({"immutable": True} if self.immutable else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Filesystem":
        return cls(tag=d["tag"], transport=d["transport"], host_dir=d["host_dir"], read_only=d["read_only"],
                   keys=tuple(d["keys"]), ownership=d.get("ownership", "native"), staged_from=d.get("staged_from", ""),
                   immutable=d.get("immutable", False))


class NicKind(StrEnum):
    USER = "user"  # a user-mode (NAT) network the VMM provides, with host ports forwarded to the guest
    TAP = "tap"  # a tap device (descriptor Fd.TAP) in a network namespace, joined to its interface


@dataclass(frozen=True, kw_only=True, slots=True)
class Nic:
    """The VM's network device: on a user-mode (NAT) network the VMM provides, with host ports
    forwarded to the guest; or on a tap device joined to a network namespace's interface."""

    outbound: bool  # False: nothing leaves the network (only the forwards reach the guest)
    network: str  # "10.0.2.0/24"
    address: str  # the guest's, "10.0.2.15/24"
    gateway: str
    dns: str
    forwards: tuple[tuple[str, str, int, int], ...]  # (protocol, host address, host port, guest port)
    keys: tuple[str, ...] = ("network.mode", "network.forwards")
    # Where each forward was written, for messages: "network.forwards[0]", or "-p 8080:80" (run -p).
    sources: tuple[str, ...] = ()
    kind: NicKind = NicKind.USER
    mac: str = ""  # TAP: the guest NIC's (the namespace interface's)
    namespace: str = ""  # TAP: where the backend makes the tap, and the interface it joins it to
    interface: str = ""  # "": the namespace's one interface other than lo
    mtu: int  # the guest NIC's (virtio-net host_mtu, network.mtu) and, for TAP, the tap's
    addresses: tuple[str, ...] = ()  # the guest's further addresses (IPv6 ones), "fd00::5/64"
    gateway6: str = ""
    network6: str = ""  # USER: the IPv6 network the VMM provides, "fec0::/64"

    def source(self, index: int) -> str:
        return self.sources[index] if index < len(self.sources) else f"network.forwards[{index}]"

    def to_dict(self) -> dict[str, Any]:
        return {"outbound": self.outbound, "network": self.network, "address": self.address, "gateway": self.gateway,
                "dns": self.dns, "forwards": [list(f) for f in self.forwards], "keys": list(self.keys), "mtu": self.mtu,
                **({"addresses": list(self.addresses)} if self.addresses else {}),
                **({"gateway6": self.gateway6} if self.gateway6 else {}),
                **({"network6": self.network6} if self.network6 else {}),
                **({"sources": list(self.sources)} if self.sources else {}),
                **({"kind": str(self.kind), "mac": self.mac, "namespace": self.namespace, "interface": self.interface}
                   if self.kind is not NicKind.USER else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Nic":
        return cls(outbound=d["outbound"], network=d["network"], address=d["address"], gateway=d["gateway"],
                   dns=d["dns"], forwards=tuple(tuple(f) for f in d["forwards"]), keys=tuple(d["keys"]),
                   sources=tuple(d.get("sources", ())), kind=NicKind(d.get("kind", "user")), mac=d.get("mac", ""),
                   namespace=d.get("namespace", ""), interface=d.get("interface", ""),
                   mtu=d.get("mtu", 1500), addresses=tuple(d.get("addresses", ())), gateway6=d.get("gateway6", ""),
                   network6=d.get("network6", ""))  # a record from before network.mtu: virtio-net's own 1500


@dataclass(frozen=True, kw_only=True, slots=True)
class Machine:
    name: str
    accel: str  # "kvm" or "tcg"
    accel_reason: str
    cpus: int
    memory_mib: int
    kernel: str  # the image the VMM boots (an ELF with a PVH note, or a bzImage)
    initrd: str
    cmdline: str
    console: Fd  # where the guest's serial console (kernel messages) goes
    ports: tuple[Port, ...]
    filesystems: tuple[Filesystem, ...]  # the root first
    acpi: bool = True  # the machine describes its devices in ACPI tables (off: on the kernel command line)
    nic: Nic | None = None  # no network device at all when None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accel": self.accel,
            "accel_reason": self.accel_reason,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "kernel": self.kernel,
            "initrd": self.initrd,
            "cmdline": self.cmdline,
            "console": int(self.console),
            "ports": [p.to_dict() for p in self.ports],
            "filesystems": [f.to_dict() for f in self.filesystems],
            **({} if self.acpi else {"acpi": False}),
            **({"nic": self.nic.to_dict()} if self.nic else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Machine":
        return cls(
            name=d["name"],
            accel=d["accel"],
            accel_reason=d["accel_reason"],
            cpus=d["cpus"],
            memory_mib=d["memory_mib"],
            kernel=d["kernel"],
            initrd=d["initrd"],
            cmdline=d["cmdline"],
            console=Fd(d["console"]),
            ports=tuple(Port.from_dict(p) for p in d["ports"]),
            filesystems=tuple(Filesystem.from_dict(f) for f in d["filesystems"]),
            acpi=d.get("acpi", True),
            nic=Nic.from_dict(d["nic"]) if d.get("nic") else None,
        )
