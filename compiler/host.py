"""Facts about the host, as a value.

They are probed in one place (`microvmc.backends.host.probe_host`) and passed to the planner, so a
plan can be computed and tested for any host without touching this one.
"""

from __future__ import annotations

from enum import StrEnum

from microvmc._value import Value

__all__ = ["HostFacts", "VirtiofsdFlavour"]


class VirtiofsdFlavour(StrEnum):
    C = "c"  # QEMU's C virtiofsd (Debian 12: /usr/lib/qemu/virtiofsd), -o options
    RUST = "rust"  # the Rust virtiofsd, --long-options


class HostFacts(Value):
    """(Not a dataclass: `microvmc run` imports this before it starts QEMU, microvmc/_value.py.)"""

    __slots__ = ("arch", "qemu", "qemu_version", "virtiofsd", "virtiofsd_flavour", "virtiofsd_usable",
                 "virtiofsd_reason", "kvm_usable", "kvm_reason", "tsc_khz", "default_kernel_dir", "host_kernel_release",
                 "busybox", "cc", "cc_version", "init_cc", "init_cc_version", "init_libc")
    arch: str
    qemu: str
    qemu_version: tuple[int, int, int]
    virtiofsd: str | None
    virtiofsd_flavour: VirtiofsdFlavour | None
    virtiofsd_usable: bool
    virtiofsd_reason: str
    kvm_usable: bool
    kvm_reason: str
    tsc_khz: int | None
    default_kernel_dir: str
    host_kernel_release: str
    busybox: str | None
    cc: str | None
    cc_version: str
    init_cc: str | None
    init_cc_version: str
    init_libc: str

    def __init__(
        self, *,
        arch: str = "x86_64",
        qemu: str = "qemu-system-x86_64",
        qemu_version: tuple[int, int, int] = (7, 2, 0),
        virtiofsd: str | None = "/usr/lib/qemu/virtiofsd",
        virtiofsd_flavour: VirtiofsdFlavour | None = VirtiofsdFlavour.C,
        virtiofsd_usable: bool = True,  # it can serve a share here (both flavours need root to sandbox themselves)
        virtiofsd_reason: str = "not probed",  # why it is or is not usable, for errors and `transport = "auto"`
        kvm_usable: bool = False,
        kvm_reason: str = "not probed",  # why KVM is or is not usable, for --verbose and errors
        tsc_khz: int | None = None,  # host TSC frequency; helps a TCG guest skip PIT calibration
        default_kernel_dir: str = "",  # where the set-up command put the default kernel
        host_kernel_release: str = "",  # uname -r, for kernel.source = "host"
        busybox: str | None = "/bin/busybox",  # static busybox for the built-in image
        cc: str | None = "gcc",  # compiles the guest init
        cc_version: str = "",  # the first line of `cc --version`: the own kernel is keyed by it
        # The guest init's compiler: musl-gcc when installed (a static init of ~80 KB, not glibc's ~750 KB, which
        # the kernel unpacks and the guest execs at every boot), else `cc`; the init is cached by source and
        # init_cc_version, which names the C library too.
        init_cc: str | None = None,
        init_cc_version: str = "",
        init_libc: str = "glibc",  # "musl" with musl-gcc: its kernel headers are the host's, given to it apart
    ) -> None:
        self._init(locals())

    @property
    def virtiofs_ready(self) -> bool:
        """A virtiofsd is installed, answers, and can run here."""
        return bool(self.virtiofsd and self.virtiofsd_flavour and self.virtiofsd_usable)

    def to_dict(self) -> dict:
        return {
            "arch": self.arch,
            "qemu": self.qemu,
            "qemu_version": ".".join(map(str, self.qemu_version)),
            "virtiofsd": self.virtiofsd,
            "virtiofsd_flavour": str(self.virtiofsd_flavour) if self.virtiofsd_flavour else None,
            "virtiofsd_usable": self.virtiofsd_usable,
            "virtiofsd_reason": self.virtiofsd_reason,
            "kvm_usable": self.kvm_usable,
            "kvm_reason": self.kvm_reason,
            "tsc_khz": self.tsc_khz,
            "default_kernel_dir": self.default_kernel_dir,
            "host_kernel_release": self.host_kernel_release,
            "busybox": self.busybox,
            "cc": self.cc,
            "cc_version": self.cc_version,
            "init_cc": self.init_cc,
            "init_cc_version": self.init_cc_version,
            "init_libc": self.init_libc,
        }
