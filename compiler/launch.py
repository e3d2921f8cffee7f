"""The launch plan: everything a backend needs to run one VM, as frozen data.

The same plan renders as `launch.sh` (compiler/emit.py) and runs in the QEMU backend
(backends/qemu.py); both give QEMU the identical argv and the identical file descriptors.
"""

from __future__ import annotations

from dataclasses import dataclass

from microvmc.compiler.cmdline import GuestUser, Rlimit, encode
from microvmc.compiler.host import VirtiofsdFlavour
from microvmc.compiler.machine import Fd, Machine, NicKind

__all__ = ["Fd", "ArgGroup", "VirtiofsdPlan", "LaunchPlan", "C_VIRTIOFSD_PID_DIR", "c_virtiofsd_pid_file", "ProcessSpec",
           "program_process"]

# The C virtiofsd started with --socket-path locks a pid file named after that path (every / turned
# into .) here, and never removes it: launch.sh does, and so does the sweep of a killed script's runs.
C_VIRTIOFSD_PID_DIR = "/var/run/virtiofsd"


def c_virtiofsd_pid_file(socket_path: str) -> str:
    return f"{C_VIRTIOFSD_PID_DIR}/{socket_path.replace('/', '.')}.pid"


@dataclass(frozen=True, kw_only=True, slots=True)
class ArgGroup:
    """A group of QEMU options and the manifest keys it came from (a comment in launch.sh)."""

    keys: tuple[str, ...]
    comment: str
    args: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"keys": list(self.keys), "comment": self.comment, "args": list(self.args)}


@dataclass(frozen=True, kw_only=True, slots=True)
class VirtiofsdPlan:
    """One virtiofsd serving one share. `argv` lacks only the socket option, which differs:
    the backend binds the socket itself and passes it as a file descriptor (no start-up race),
    launch.sh names a path and waits for it."""

    tag: str
    keys: tuple[str, ...]
    shared_dir: str
    socket: str  # relative to the run directory
    read_only: bool
    flavour: VirtiofsdFlavour
    argv: tuple[str, ...]

    def argv_with_socket_path(self, run_dir: str) -> tuple[str, ...]:
        # An absolute path: the C virtiofsd derives its pid-file name from it, so two runs naming
        # the same relative path would lock each other out ("Cannot lock pid file").
        return (*self.argv, f"--socket-path={run_dir}/{self.socket}")

    def argv_with_fd(self, fd: int) -> tuple[str, ...]:
        return (*self.argv, f"--fd={fd}")

    def to_dict(self) -> dict:
        return {
            "tag": self.tag,
            "keys": list(self.keys),
            "shared_dir": self.shared_dir,
            "socket": self.socket,
            "read_only": self.read_only,
            "flavour": str(self.flavour),
            "argv": list(self.argv),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchPlan:
    name: str  # a short name for the VM (the hostname)
    accel: str  # "kvm" or "tcg", decided at plan time
    accel_reason: str  # why, for --verbose
    machine: Machine  # what the VM is, in no VMM's words; `qemu` is its lowering
    qemu: tuple[ArgGroup, ...]
    virtiofsd: tuple[VirtiofsdPlan, ...]
    cmdline: str  # the kernel command line, exactly as passed to -append
    spilled: bool  # the guest configuration is in the initramfs, not the command line
    kernel: str  # store path of the kernel QEMU boots
    initramfs: str  # store path of the initramfs
    boot_timeout: float  # seconds until init must report `started`
    timeout: float  # seconds the whole run may take, 0 for no limit
    stop_timeout: float  # seconds the program gets after a signal passed on to it; 0: stop at once
    log_max_size: int  # a detached run's stdout.log/stderr.log: bytes before rotation (0: never)
    log_max_files: int  # ... and files kept of each
    transports: tuple[tuple[str, str], ...]  # (share tag, "virtiofs" or "9p"), the root first
    sources: tuple[str, ...]  # the manifest files it was compiled from

    @property
    def qemu_argv(self) -> tuple[str, ...]:
        return tuple(arg for group in self.qemu for arg in group.args)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "accel": self.accel,
            "accel_reason": self.accel_reason,
            "machine": self.machine.to_dict(),
            "qemu": [g.to_dict() for g in self.qemu],
            "qemu_argv": list(self.qemu_argv),
            "virtiofsd": [v.to_dict() for v in self.virtiofsd],
            "cmdline": self.cmdline,
            "spilled": self.spilled,
            "kernel": self.kernel,
            "initramfs": self.initramfs,
            "boot_timeout": self.boot_timeout,
            "timeout": self.timeout,
            "stop_timeout": self.stop_timeout,
            "log_max_size": self.log_max_size,
            "log_max_files": self.log_max_files,
            "transports": [list(t) for t in self.transports],
            "sources": list(self.sources),
            # the descriptors QEMU is started with: the tap's only for a Nic on one
            "fds": {fd.name.lower(): int(fd) for fd in Fd
                    if fd is not Fd.TAP or (self.machine.nic is not None and self.machine.nic.kind is NicKind.TAP)},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LaunchPlan":
        return cls(
            name=d["name"],
            accel=d["accel"],
            accel_reason=d["accel_reason"],
            machine=Machine.from_dict(d["machine"]),
            qemu=tuple(
                ArgGroup(keys=tuple(g["keys"]), comment=g["comment"], args=tuple(g["args"]))
                for g in d["qemu"]
            ),
            virtiofsd=tuple(
                VirtiofsdPlan(
                    tag=v["tag"],
                    keys=tuple(v["keys"]),
                    shared_dir=v["shared_dir"],
                    socket=v["socket"],
                    read_only=v["read_only"],
                    flavour=VirtiofsdFlavour(v["flavour"]),
                    argv=tuple(v["argv"]),
                )
                for v in d["virtiofsd"]
            ),
            cmdline=d["cmdline"],
            spilled=d["spilled"],
            kernel=d["kernel"],
            initramfs=d["initramfs"],
            boot_timeout=d["boot_timeout"],
            timeout=d["timeout"],
            stop_timeout=d["stop_timeout"],
            log_max_size=d["log_max_size"],
            log_max_files=d["log_max_files"],
            transports=tuple((tag, transport) for tag, transport in d["transports"]),
            sources=tuple(d["sources"]),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ProcessSpec:
    """A further process in a running VM (exec): what init/PROTOCOL.md's EXEC frame carries."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str = "/"
    user: GuestUser | None = None
    rlimits: tuple[Rlimit, ...] = ()
    tty: tuple[int, int] | None = None  # (rows, cols): a pty of that size

    def payload(self) -> bytes:
        lines = [f"A{i}={encode(a)}" for i, a in enumerate(self.argv)]
        lines += [f"E{i}={encode(k)}={encode(v)}" for i, (k, v) in enumerate(self.env)]
        lines.append(f"CWD={encode(self.cwd)}")
        if self.user is not None:
            lines.append(f"USER={self.user.uid}:{self.user.gid}:{','.join(map(str, self.user.groups))}")
        lines += [f"R{i}={r.name}:{'inf' if r.soft is None else r.soft}:{'inf' if r.hard is None else r.hard}"
                  for i, r in enumerate(self.rlimits)]
        if self.tty is not None:
            lines.append(f"TTY={self.tty[0]}:{self.tty[1]}")
        return ("\n".join(lines) + "\n").encode("ascii")

    def to_dict(self) -> dict:
        return {"argv": list(self.argv), "env": [list(e) for e in self.env], "cwd": self.cwd,
                "user": None if self.user is None else [self.user.uid, self.user.gid, list(self.user.groups)],
                "rlimits": [[r.name, r.soft, r.hard] for r in self.rlimits],
                "tty": None if self.tty is None else list(self.tty)}

    @classmethod
    def from_dict(cls, d: dict) -> "ProcessSpec":
        user = d.get("user")
        return cls(argv=tuple(d["argv"]), env=tuple((k, v) for k, v in d.get("env", ())), cwd=d.get("cwd") or "/",
                   user=None if user is None else GuestUser(uid=user[0], gid=user[1], groups=tuple(user[2])),
                   rlimits=tuple(Rlimit(name=n, soft=s, hard=h) for n, s, h in d.get("rlimits", ())),
                   tty=None if d.get("tty") is None else (int(d["tty"][0]), int(d["tty"][1])))


def program_process(cmdline: str) -> ProcessSpec:
    """The run's own program as the kernel command line gives it to init: what an exec starts from
    (its environment, working directory, user and limits). A configuration that spilled into the
    initramfs is not on the command line: then only the argv-free defaults are known."""
    from microvmc.compiler.cmdline import decode

    params = dict(word.split("=", 1) for word in cmdline.split() if word.startswith("MVMC_") and "=" in word)
    argv, env, rlimits = [], [], []
    for i in range(len(params)):
        if f"MVMC_A{i}" not in params:
            break
        argv.append(decode(params[f"MVMC_A{i}"]))
    for i in range(len(params)):
        if f"MVMC_E{i}" not in params:
            break
        name, _, value = params[f"MVMC_E{i}"].partition("=")
        env.append((decode(name), decode(value)))
    for i in range(len(params)):
        if f"MVMC_R{i}" not in params:
            break
        name, soft, hard = params[f"MVMC_R{i}"].split(":")
        rlimits.append(Rlimit(name=name, soft=None if soft == "inf" else int(soft), hard=None if hard == "inf" else int(hard)))
    user = None
    if "MVMC_USER" in params:
        uid, gid, groups = params["MVMC_USER"].split(":")
        user = GuestUser(uid=int(uid), gid=int(gid), groups=tuple(int(g) for g in groups.split(",") if g))
    if not env:
        env = [("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")]
    return ProcessSpec(argv=tuple(argv), env=tuple(env), cwd=decode(params.get("MVMC_CWD", "/")), user=user,
                       rlimits=tuple(rlimits))
