"""Probe this host once into a `HostFacts` value.

Probing runs on every build, so its result is cached in $XDG_CACHE_HOME/microvmc/host-facts.json
under a key that changes whenever a fact could (a binary replaced, a reboot, an override): a
cached probe runs no subprocess.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path

from microvmc.backends._procs import which
from microvmc.compiler.host import HostFacts, VirtiofsdFlavour

__all__ = ["probe_host", "facts_from_dict", "kvm_status", "guest_runs", "virtiofsd_flavour", "qemu_version"]

CACHE_FORMAT = 5
QEMU_NAME = "qemu-system-x86_64"
VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")
BUSYBOX_CANDIDATES = ("/bin/busybox",)
MUSL_GCC = "musl-gcc"  # Debian: musl-tools
MUSL_LOADER = "/lib/ld-musl-x86_64.so.1"  # run with no program, it prints musl's version
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
VERSION_TIMEOUT = 10.0  # seconds for `--version`
GUEST_PROBE_TIMEOUT = 5.0  # seconds the tiny KVM test guest may take (it needs milliseconds)
# Environment variables a probe depends on: each is part of the cache key.
ENV_KEYS = (
    "MICROVMC_QEMU",
    "MICROVMC_VIRTIOFSD",
    "MICROVMC_KERNEL_DIR",
    "MICROVMC_BUSYBOX",
    "XDG_DATA_HOME",
    "HOME",
    "PATH",
)


def probe_host(environ: Mapping[str, str] = os.environ, *, root: str = "/") -> HostFacts:
    """The facts about this host; `root` prefixes /dev, /sys, /proc and the fixed binary
    locations (tests point it at a fake tree)."""
    qemu = environ.get("MICROVMC_QEMU") or which(
        QEMU_NAME, path=environ.get("PATH", os.defpath)
    )
    virtiofsd = (
        environ.get("MICROVMC_VIRTIOFSD")
        or _first_file([_under(root, p) for p in VIRTIOFSD_CANDIDATES])
        or which("virtiofsd", path=environ.get("PATH", os.defpath))
    )
    path = environ.get("PATH", os.defpath)
    cc = which("gcc", path=path) or which("cc", path=path)
    musl_gcc = which(MUSL_GCC, path=path)
    key = {
        "format": CACHE_FORMAT,
        "cc": _file_id(cc),
        "musl": [_file_id(musl_gcc), _file_id(_under(root, MUSL_LOADER))],
        "root": root,
        "env": {k: environ.get(k) for k in ENV_KEYS},
        "qemu": _file_id(qemu),
        "virtiofsd": _file_id(virtiofsd),
        "euid": os.geteuid(),
        "boot_id": _read(_under(root, "/proc/sys/kernel/random/boot_id")).strip(),
    }
    cache = _cache_path(environ)
    cached = _load_cache(cache, key)
    if cached is not None:
        return cached
    facts = _probe(environ, root=root, qemu=qemu, virtiofsd=virtiofsd, cc=cc, musl_gcc=musl_gcc)
    _store_cache(cache, key, facts)
    return facts


def facts_from_dict(d: Mapping) -> HostFacts:
    """The inverse of `HostFacts.to_dict`."""
    flavour = d.get("virtiofsd_flavour")
    return HostFacts(
        arch=d["arch"],
        qemu=d["qemu"],
        qemu_version=_version_tuple(d["qemu_version"]),
        virtiofsd=d["virtiofsd"],
        virtiofsd_flavour=VirtiofsdFlavour(flavour) if flavour else None,
        virtiofsd_usable=d["virtiofsd_usable"],
        virtiofsd_reason=d["virtiofsd_reason"],
        kvm_usable=d["kvm_usable"],
        kvm_reason=d["kvm_reason"],
        tsc_khz=d["tsc_khz"],
        default_kernel_dir=d["default_kernel_dir"],
        host_kernel_release=d["host_kernel_release"],
        busybox=d["busybox"],
        cc=d["cc"],
        cc_version=d.get("cc_version", ""),
        init_cc=d.get("init_cc"),
        init_cc_version=d.get("init_cc_version", ""),
        init_libc=d.get("init_libc", "glibc"),
    )


def _probe(
    environ: Mapping[str, str], *, root: str, qemu: str | None, virtiofsd: str | None, cc: str | None,
    musl_gcc: str | None = None,
) -> HostFacts:
    kvm_usable, kvm_reason = kvm_status(root, qemu)
    version = _version_output(virtiofsd) if virtiofsd else ""
    flavour = virtiofsd_flavour(version) if virtiofsd else None
    virtiofsd_usable, virtiofsd_reason = virtiofsd_status(virtiofsd, flavour, version, euid=os.geteuid())
    cc_version = _version_output(cc).partition("\n")[0].strip() if cc else ""
    busybox = environ.get("MICROVMC_BUSYBOX") or _first_file(
        [_under(root, p) for p in BUSYBOX_CANDIDATES]
    )
    return HostFacts(
        arch=os.uname().machine,
        qemu=qemu or "",
        qemu_version=qemu_version(_version_output(qemu)) if qemu else (0, 0, 0),
        virtiofsd=virtiofsd,
        virtiofsd_flavour=flavour,
        virtiofsd_usable=virtiofsd_usable,
        virtiofsd_reason=virtiofsd_reason,
        kvm_usable=kvm_usable,
        kvm_reason=kvm_reason,
        tsc_khz=tsc_khz(root),
        default_kernel_dir=default_kernel_dir(environ),
        host_kernel_release=os.uname().release,
        busybox=busybox,
        cc=cc,
        cc_version=cc_version,
        **init_compiler(cc, cc_version, musl_gcc, _version_output(_under(root, MUSL_LOADER)) if musl_gcc else ""),
    )


def init_compiler(cc: str | None, cc_version: str, musl_gcc: str | None, loader_output: str) -> dict:
    """The guest init's compiler: musl-gcc when it and musl's version can be found (its static init is
    a tenth of glibc's: less for the kernel to unpack and the guest to exec at every boot), else `cc`
    with glibc. Its version line names the C library, so the cached init is rebuilt when either changes."""
    import re

    musl = re.search(r"^Version (\S+)", loader_output, re.M)
    if musl_gcc and musl:
        version = _version_output(musl_gcc).partition("\n")[0].strip()
        return {"init_cc": musl_gcc, "init_cc_version": f"{version}; musl {musl.group(1)}", "init_libc": "musl"}
    return {"init_cc": cc, "init_cc_version": f"{cc_version}; glibc" if cc else "", "init_libc": "glibc"}


# --- single facts ------------------------------------------------------------------------------


def qemu_version(output: str) -> tuple[int, int, int]:
    """`QEMU emulator version 7.2.22 (Debian ...)` → (7, 2, 22); (0, 0, 0) if unreadable."""
    import re

    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", output)
    if not match:
        return (0, 0, 0)
    return (int(match[1]), int(match[2]), int(match[3] or 0))


def virtiofsd_flavour(output: str) -> VirtiofsdFlavour | None:
    """QEMU's C virtiofsd says `virtiofsd version 7.2.x ... using FUSE kernel interface`,
    the Rust one `virtiofsd 1.x`."""
    import re

    if "using FUSE kernel interface" in output or re.search(r"^virtiofsd version ", output, re.M):
        return VirtiofsdFlavour.C
    if re.search(r"^virtiofsd v?\d+\.\d+", output, re.M):
        return VirtiofsdFlavour.RUST
    return None


def virtiofsd_status(
    virtiofsd: str | None, flavour: VirtiofsdFlavour | None, version_output: str, *, euid: int
) -> tuple[bool, str]:
    """Whether virtiofsd can serve a share here, and why (one phrase). Both flavours, as microvmc runs
    them (sandbox=chroot), need root: as an ordinary user the C one fails at once (setgroups)."""
    if not virtiofsd:
        return False, "virtiofsd is not installed"
    if flavour is None:
        first = next((line.strip() for line in version_output.splitlines() if line.strip()), "no output")
        hint = "; it needs root" if euid != 0 else ""
        return False, f"{virtiofsd} --version failed ({first}){hint}"
    if euid != 0:
        return False, f"virtiofsd ({virtiofsd}) needs root, and microvmc runs as uid {euid}"
    return True, f"virtiofsd ({virtiofsd}, {flavour} flavour) runs as root"


def kvm_status(root: str = "/", qemu: str | None = None) -> tuple[bool, str]:
    """Whether QEMU can use KVM to run a normal kernel, and why (one phrase). With `qemu`, a tiny
    guest must also run under KVM (guest_runs)."""
    dev = _under(root, "/dev/kvm")
    if not os.path.exists(dev):
        return False, "there is no /dev/kvm"
    # Checked before opening: kvm_pvm answers the API version like real KVM does.
    if os.path.isdir(_under(root, "/sys/module/kvm_pvm")):
        return False, "/dev/kvm is kvm_pvm, a nested hypervisor that cannot run a normal guest"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"/dev/kvm cannot be opened: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return False, f"/dev/kvm does not answer KVM_GET_API_VERSION: {e.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"/dev/kvm has KVM API version {version}, not {KVM_API_VERSION}"
    if qemu:
        runs, why = guest_runs(qemu, "kvm")
        if not runs:
            return False, f"a test guest does not run under KVM: {why}"
        return True, "/dev/kvm ran a test guest"
    return True, "/dev/kvm is usable"


def guest_runs(qemu: str, accel: str, timeout: float = GUEST_PROBE_TIMEOUT) -> tuple[bool, str]:
    """Whether QEMU runs a tiny guest (kernel/tiny.py) with `accel` within `timeout` seconds."""
    import subprocess

    import tempfile

    from microvmc.kernel.tiny import DEBUG_EXIT_PORT, expected_status, tiny_pvh_guest

    with tempfile.NamedTemporaryFile(prefix="microvmc-probe-", suffix=".elf") as image:
        image.write(tiny_pvh_guest())
        image.flush()
        argv = [qemu, "-M", f"microvm,accel={accel}", "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-kernel", image.name,
                "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=4"]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"it did not finish within {timeout:g} s"
        except OSError as e:
            return False, f"QEMU could not be started: {e.strerror}"
    if done.returncode == expected_status(0x31):
        return True, "it ran"
    errors = [line for line in done.stderr.decode("utf-8", "replace").splitlines() if "warning" not in line]
    return False, errors[0] if errors else f"QEMU exited with status {done.returncode}"


def tsc_khz(root: str = "/") -> int | None:
    """The TSC frequency in kHz: the kernel's own figure, else the CPU's MHz from cpuinfo."""
    import re

    exact = _read(_under(root, "/sys/devices/system/cpu/cpu0/tsc_freq_khz")).strip()
    if exact.isdigit():
        return int(exact)
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", _read(_under(root, "/proc/cpuinfo")), re.M)
    if match:
        return round(float(match[1])) * 1000
    return None


def default_kernel_dir(environ: Mapping[str, str]) -> str:
    if environ.get("MICROVMC_KERNEL_DIR"):
        return environ["MICROVMC_KERNEL_DIR"]
    data = environ.get("XDG_DATA_HOME") or os.path.join(_home(environ), ".local", "share")
    return os.path.join(data, "microvmc", "kernel", "default")


# --- helpers -----------------------------------------------------------------------------------


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _home(environ: Mapping[str, str]) -> str:
    return environ.get("HOME") or os.path.expanduser("~")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _first_file(paths: list[str]) -> str | None:
    return next((p for p in paths if os.path.isfile(p) and os.access(p, os.X_OK)), None)


def _file_id(path: str | None) -> list | None:
    """What changes when a binary is replaced."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return [path]
    return [path, st.st_mtime_ns, st.st_size]


def _version_output(binary: str | None) -> str:
    import subprocess

    if not binary:
        return ""
    try:
        done = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=VERSION_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).decode("utf-8", "replace")


def _version_tuple(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(".")[:3] if p.isdigit()]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def _cache_path(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(_home(environ), ".cache")
    return Path(base, "microvmc", "host-facts.json")


def _load_cache(path: Path, key: dict) -> HostFacts | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("key") != key:
            return None
        return facts_from_dict(data["facts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_cache(path: Path, key: dict, facts: HostFacts) -> None:
    """Best effort: a read-only cache directory only costs the next probe its subprocesses."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"key": key, "facts": facts.to_dict()}, f, sort_keys=True, indent=1)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
