"""What microvmc needs of a guest kernel, as data: one table drives three things.

- the config fragment of microvmc's own kernel (`fragment()`: applied on top of `allnoconfig`,
  every option built in, no modules), and the check that each option survived (`missing_options`);
- the pre-flight check of any kernel a plan boots (`check_features`: from the kernel's .config,
  its modules.builtin and the modules present), before anything starts;
- the modules a kernel with loadable modules must load for a plan (`FEATURES[...].modules`).

A *feature* is something a plan can need (the ports, virtiofs, 9p, overlay, ...); each names the
config options that provide it and the module names that provide it on a modular kernel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "Option",
    "Feature",
    "OPTIONS",
    "FEATURES",
    "fragment",
    "fragment_digest",
    "parse_config",
    "missing_options",
    "feature_support",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Option:
    name: str  # without CONFIG_
    value: str  # "y", "n", or a literal as .config writes it ("\"-microvmc\"", "1")
    reason: str


def _y(name: str, reason: str) -> Option:
    return Option(name=name, value="y", reason=reason)


def _n(name: str, reason: str) -> Option:
    return Option(name=name, value="n", reason=reason)


# The config fragment of microvmc's own kernel, on top of `make allnoconfig` (which turns off
# everything that can be turned off, so whatever a program needs is listed here). With EXPERT on, that
# includes the options only an expert may turn off: the ones a program can use are listed back.
OPTIONS: tuple[Option, ...] = (
    # The kernel itself.
    _y("EXPERT", "so allnoconfig also turns off what only an expert may (virtual terminals, the PC speaker, DMI, "
                 "firmware loading, SLUB debugging: none is in a microVM); what programs use is listed back below"),
    _n("VT", "no virtual terminals: their 63 ttys are devices made at boot (~10 ms of tty_init under TCG); the "
             "console is ttyS0 and programs' terminals are ptys"),
    _n("SLUB_DEBUG", "no slab debugging code in every allocation, nor its sysfs files per cache at boot"),
    _y("IO_DELAY_NONE", "no write to port 0x80 after each legacy PIC/PIT access (a VM exit each, for hardware "
                        "that needs none)"),
    _y("EARLY_PRINTK", "earlyprintk=serial,ttyS0: the kernel's first message reaches the console (the run's timeline)"),
    _y("KALLSYMS", "symbol names in a kernel oops"),
    _y("UNWINDER_GUESS", "stack traces in an oops by scanning the stack, not ORC: no 1.6 MB of ORC tables to load "
                         "and sort at boot (`unwind_init`), for traces with some stale `?` entries"),
    _y("DEBUG_BUGVERBOSE", "file and line in a BUG report"),
    _y("COREDUMP", "core dumps at all (ELF_CORE needs it)"),
    _y("VM_EVENT_COUNTERS", "/proc/vmstat's counters (free, vmstat, monitoring agents)"),
    _y("PROC_PAGE_MONITOR", "/proc/PID/smaps, pagemap and clear_refs"),
    _y("SYSFS_SYSCALL", "the sysfs(2) system call"),
    _y("SGETMASK_SYSCALL", "sgetmask(2) and ssetmask(2)"),
    _y("MODIFY_LDT_SYSCALL", "modify_ldt(2) (Wine, old language runtimes)"),
    _y("X86_16BIT", "16-bit segments for programs that set them up (Wine, DOSEMU)"),
    _y("X86_VSYSCALL_EMULATION", "the vsyscall page that old static binaries call"),
    _y("X86_UMIP", "user-mode instruction prevention, as on Debian's kernel"),
    _y("MTRR", "memory type ranges (PAT needs them)"),
    _y("X86_PAT", "page attribute tables: write-combining and uncached mappings as the kernel asks"),
    _y("64BIT", "an x86_64 kernel (allnoconfig with ARCH=x86 would build a 32-bit one)"),
    Option(name="LOCALVERSION", value='"-microvmc"', reason="the release says whose kernel it is"),
    _n("LOCALVERSION_AUTO", "no git revision in the release: it is reproducible from a tarball"),
    _y("KERNEL_LZ4", "the bzImage decompresses fastest (QEMU boots the PVH vmlinux anyway)"),
    _n("MODULES", "everything is built in: no module to find, copy or load at boot"),
    _y("PRINTK", "kernel messages on the console log, for a run that fails"),
    _y("BUG", "a kernel bug is reported, not silently ignored"),
    _y("MAGIC_SYSRQ", "/proc/sysrq-trigger (the tests crash a guest with it)"),
    _y("IKCONFIG", "the config is embedded in the kernel: pre-flight checks read it from the image"),
    _y("IKCONFIG_PROC", "and the guest sees it at /proc/config.gz"),
    _y("BLK_DEV_INITRD", "microvmc's init and configuration come in an initramfs"),
    _y("RD_GZIP", "the initramfs is a gzip'd cpio (compiler/cpio.py)"),
    _y("BINFMT_ELF", "programs are ELF executables"),
    _y("BINFMT_SCRIPT", "and #! scripts"),
    _y("MULTIUSER", "process.user: uids, gids, setuid programs"),
    _y("SMP", "resources.cpus above 1"),
    _y("NO_HZ_IDLE", "an idle guest does not tick"),
    _y("HIGH_RES_TIMERS", "programs' timers are precise"),
    _y("HZ_1000", "a 1 ms tick: the boot's waits counted in ticks end 4x sooner (the IO-APIC timer check alone "
                  "waits 4 ticks: 16 ms at the default 250 Hz, 4 ms); measured under TCG, bench/RESULTS.md"),
    # Booting on QEMU's microvm machine.
    _y("HYPERVISOR_GUEST", "the guest knows it runs on a hypervisor (needed by the next three)"),
    _y("PARAVIRT", "paravirtual clock and spinlocks"),
    _y("KVM_GUEST", "kvmclock and paravirtual features under KVM"),
    _y("PVH", "the PVH entry point: QEMU boots the ELF vmlinux directly, no decompression in the guest"),
    _n("ACPI", "6.1 with ACPI but without PCI fails to load microvm's ACPI tables (AE_BAD_PARAMETER), and a "
               "microVM has no PCI: the machine runs with acpi=off, QEMU names the devices on the command line "
               "and the MP table the CPUs, so ACPI would be dead code probed at every boot"),
    _y("VIRTIO_MENU", "the virtio drivers' menu"),
    _y("VIRTIO_MMIO", "microvm's devices are virtio-mmio"),
    _y("X86_MPPARSE", "the CPUs from the MP table when ACPI is off (microvm with acpi=off)"),
    _y("VIRTIO_MMIO_CMDLINE_DEVICES", "virtio-mmio devices named on the command line (microvm with acpi=off)"),
    _y("TTY", "terminals at all"),
    _y("SERIAL_8250", "the console is microvm's ISA serial port (console=ttyS0)"),
    _y("SERIAL_8250_CONSOLE", "kernel messages on it"),
    Option(name="SERIAL_8250_NR_UARTS", value="1", reason="microvm has one ISA serial port, the console"),
    Option(name="SERIAL_8250_RUNTIME_UARTS", value="1", reason="so three ports that are not there are not probed"),
    _y("VIRTIO_CONSOLE", "the program's stdin, stdout, stderr and init's status and control are virtio-serial ports"),
    _y("UNIX98_PTYS", "ptys: devpts, a terminal for process.tty and for programs that make their own"),
    _n("LEGACY_PTYS", "only /dev/pts"),
    _y("HW_RANDOM", "entropy from the host"),
    _y("HW_RANDOM_VIRTIO", "through virtio-rng when a plan adds one"),
    _y("CRYPTO_MANAGER_DISABLE_TESTS", "no crypto self-tests at boot (cryptomgr.notests covers the crypto manager's; "
                                       "this the library's, e.g. blake2s, 4 ms under TCG)"),
    # File systems.
    _y("PROC_FS", "/proc"),
    _y("PROC_SYSCTL", "/proc/sys"),
    _y("SYSFS", "/sys: init finds the virtio ports under /sys/class/virtio-ports"),
    _y("DEVTMPFS", "/dev without udev"),
    _y("SHMEM", "tmpfs is shared memory, not ramfs"),
    _y("TMPFS", "/tmp, /run, mounts of kind tmpfs, an overlay root's upper layer"),
    _y("TMPFS_XATTR", "xattrs on tmpfs: an overlay upper layer keeps its whiteouts and opaque dirs"),
    _y("TMPFS_POSIX_ACL", "ACLs on tmpfs"),
    _y("OVERLAY_FS", "image.mode = \"overlay\": a writable root whose changes are discarded"),
    _y("FUSE_FS", "FUSE, which virtio-fs is built on"),
    _y("VIRTIO_FS", "the root and shares over virtiofs"),
    _y("NETWORK_FILESYSTEMS", "the menu 9p is in"),
    _y("NET_9P", "9p"),
    _y("NET_9P_VIRTIO", "9p over virtio"),
    _y("9P_FS", "the root and shares over 9p"),
    _y("9P_FS_POSIX_ACL", "ACLs over 9p"),
    _y("BLOCK", "block devices"),
    _y("BLK_DEV", "block device drivers"),
    _y("VIRTIO_BLK", "virtio-blk disks"),
    _y("EXT4_FS", "a file system for those disks"),
    _y("FILE_LOCKING", "flock and fcntl locks (package managers, databases)"),
    _y("FHANDLE", "name_to_handle_at (systemd, container tools)"),
    _y("INOTIFY_USER", "inotify"),
    # What programs call.
    _y("SYSVIPC", "System V shared memory, semaphores and message queues"),
    _y("POSIX_MQUEUE", "POSIX message queues"),
    _y("FUTEX", "futexes: every threaded program"),
    _y("EPOLL", "epoll"),
    _y("SIGNALFD", "signalfd (init uses it too)"),
    _y("TIMERFD", "timerfd"),
    _y("EVENTFD", "eventfd"),
    _y("AIO", "POSIX asynchronous I/O"),
    _y("IO_URING", "io_uring"),
    _y("ADVISE_SYSCALLS", "madvise and fadvise"),
    _y("MEMBARRIER", "membarrier (language runtimes)"),
    _y("POSIX_TIMERS", "timer_create and clock_nanosleep"),
    _y("RSEQ", "restartable sequences (glibc registers one per thread)"),
    _y("ELF_CORE", "core dumps"),
    _y("BASE_FULL", "full-size kernel data structures, not the shrunken ones"),
    _y("NAMESPACES", "namespaces, which programs (and container tools) make themselves"),
    _y("UTS_NS", "UTS namespaces"),
    _y("IPC_NS", "IPC namespaces"),
    _y("USER_NS", "user namespaces"),
    _y("PID_NS", "PID namespaces"),
    _y("NET_NS", "network namespaces"),
    _y("SECCOMP", "seccomp"),
    _y("SECCOMP_FILTER", "seccomp filters (sandboxes, container runtimes)"),
    _y("CGROUPS", "control groups"),
    _y("MEMCG", "the memory controller"),
    _y("CGROUP_PIDS", "the pids controller"),
    _y("CGROUP_SCHED", "the cpu controller"),
    # Networking.
    _y("NET", "networking"),
    _y("UNIX", "unix sockets"),
    _y("INET", "IPv4"),
    _y("IPV6", "IPv6"),
    _y("PACKET", "packet sockets (DHCP clients)"),
    _y("NETDEVICES", "network devices"),
    _y("NET_CORE", "network device support"),
    _y("VIRTIO_NET", "virtio-net"),
    _y("VSOCKETS", "vsock: host <-> guest sockets"),
    _y("VIRTIO_VSOCKETS", "vsock over virtio"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Feature:
    name: str  # what error messages call it
    options: tuple[str, ...]  # every one of these, built in (=y) or as a module (=m)
    modules: tuple[str, ...]  # the modules that provide it on a modular kernel, dependencies after


# What a plan can need of a kernel. `modules` is what a modular kernel loads, in the order init
# loads what resolve_modules does not order itself (each module's dependencies come first anyway).
FEATURES: Mapping[str, Feature] = {
    "ports": Feature(name="virtio-mmio and virtio-console (the program's ports)",
                     options=("VIRTIO_MMIO", "VIRTIO_CONSOLE"), modules=("virtio_mmio", "virtio_console")),
    "virtiofs": Feature(name="virtio-fs", options=("FUSE_FS", "VIRTIO_FS"), modules=("virtiofs",)),
    "9p": Feature(name="9p over virtio", options=("NET_9P", "NET_9P_VIRTIO", "9P_FS"),
                  modules=("9pnet_virtio", "9p")),
    "overlay": Feature(name="overlayfs", options=("OVERLAY_FS",), modules=("overlay",)),
    "network": Feature(name="virtio-net", options=("VIRTIO_NET",), modules=("virtio_net",)),
    "ipv6": Feature(name="IPv6", options=("IPV6",), modules=("ipv6",)),
    "tmpfs": Feature(name="tmpfs", options=("TMPFS",), modules=()),
    "devtmpfs": Feature(name="devtmpfs", options=("DEVTMPFS",), modules=()),
    "initramfs": Feature(name="initramfs (gzip)", options=("BLK_DEV_INITRD", "RD_GZIP"), modules=()),
}


def fragment() -> str:
    """The config fragment as `.config` lines, each with its reason above it."""
    lines = ["# microvmc's guest kernel: on top of `make allnoconfig` (kernel/requirements.py)."]
    for option in OPTIONS:
        lines.append(f"# {option.reason}")
        lines.append(_line(option.name, option.value))
    return "\n".join(lines) + "\n"


def fragment_digest() -> str:
    return hashlib.sha256(fragment().encode()).hexdigest()


def _line(name: str, value: str) -> str:
    return f"# CONFIG_{name} is not set" if value == "n" else f"CONFIG_{name}={value}"


def parse_config(text: str) -> dict[str, str]:
    """A .config as {name without CONFIG_: value}; an option that is "not set" has value "n"."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line[len("CONFIG_"):].partition("=")
            values[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            values[line[len("# CONFIG_"):-len(" is not set")]] = "n"
    return values


def missing_options(config: Mapping[str, str], options: Iterable[Option] = OPTIONS) -> tuple[str, ...]:
    """The fragment's options that the final .config does not have as asked, as `NAME=wanted (got)`."""
    out = []
    for option in options:
        got = config.get(option.name, "n")
        if got != option.value:
            out.append(f"CONFIG_{option.name}={option.value} (got {got})")
    return tuple(out)


def feature_support(feature: Feature, config: Mapping[str, str] | None, builtin: Iterable[str] = (),
                    modules: Iterable[str] | None = None) -> str | None:
    """How a kernel provides a feature: "built in", "modules", "unknown", or None when it does not.

    `config`: its .config (None when unknown: then modules.builtin and the modules present decide);
    `builtin`: the names in modules.builtin; `modules`: the module names present (None: the kernel
    has no modules directory, so only what is built in counts). "unknown": nothing can tell (no
    config, and the feature is not something a module provides).
    """
    builtin, present = set(builtin), set(modules or ())
    if config is not None:
        values = [config.get(name, "n") for name in feature.options]
        if all(v == "y" for v in values):
            return "built in"
        if all(v in ("y", "m") for v in values) and feature.modules:
            wanted = [m for m in feature.modules if m not in builtin]
            return "modules" if all(m in present for m in wanted) else None
        return None
    if not feature.modules:
        return "unknown"
    if all(m in builtin for m in feature.modules):
        return "built in"
    if all(m in builtin or m in present for m in feature.modules):
        return "modules"
    return None
