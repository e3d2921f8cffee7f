"""The kernel command line as a typed value.

It carries the guest init's configuration (init/PROTOCOL.md) as `MVMC_*=value` parameters, which the
kernel hands to init as environment variables. It respects what the kernel really does:

- the x86 command line holds 2047 bytes (COMMAND_LINE_SIZE 2048 with the NUL);
- init receives at most 32 environment entries (MAX_INIT_ENVS; "HOME=/" and "TERM=linux" are the
  kernel's own) and 32 arguments (MAX_INIT_ARGS; argv[0] is "init"): one more and the kernel panics;
- a parameter with a `.` before `=` is a module parameter and never reaches init, bare words and known
  parameters are consumed by the kernel, and a `"` cannot be quoted;
- the kernel splits on any space, including byte 0xA0 (its ctype calls it one), so UTF-8 cannot be
  passed raw either.

So every value is percent-encoded over a small safe alphabet, which also means no manifest value can
add a kernel parameter; and when the configuration does not fit the budget it moves, whole, to
`/microvmc/config` in the initramfs (the spill channel), leaving `MVMC_SPILL=1` on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

TYPE_CHECKING = False  # (not typing's: `microvmc run` imports this while the guest boots; typing is ~2 ms of CPU)
if TYPE_CHECKING:
    from typing import Sequence

__all__ = [
    "COMMAND_LINE_MAX",
    "INIT_ENV_BUDGET",
    "INIT_ARG_BUDGET",
    "GuestConfig",
    "GuestMount",
    "GuestMountOp",
    "GuestUser",
    "Rlimit",
    "KernelCmdline",
    "CmdlineError",
    "encode",
    "decode",
    "guest_params",
    "compose",
    "SPILL_PATH",
    "extra_problem",
]

COMMAND_LINE_MAX = 2047  # bytes; COMMAND_LINE_SIZE is 2048 on x86, including the NUL
INIT_ENV_BUDGET = 32 - 2  # MAX_INIT_ENVS minus HOME=/ and TERM=linux
INIT_ARG_BUDGET = 32 - 1  # MAX_INIT_ARGS minus argv[0]
SPILL_PATH = "/microvmc/config"  # where the initramfs carries a spilled configuration
# What the manifest's kernel.cmdline may take, on any host: the rest is kept for microvmc's own
# parameters (they vary with the host: tsc_early_khz=) and what QEMU may append, so that validation
# refuses exactly what compose would.
EXTRA_BYTES_MAX = COMMAND_LINE_MAX - 1024
EXTRA_ARGS_MAX = INIT_ARG_BUDGET - 8
EXTRA_ENVS_MAX = INIT_ENV_BUDGET - 4

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_./,@+")


class CmdlineError(ValueError):
    """The parameters the manifest itself adds do not fit on the kernel command line."""


def encode(value: str) -> str:
    """Percent-encode every UTF-8 byte outside the safe alphabet (init/PROTOCOL.md)."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in value.encode("utf-8", "surrogateescape"))


def decode(text: str) -> str:
    """The inverse of encode, as the guest init does it."""
    out = bytearray()
    raw = text.encode("ascii")
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


@dataclass(frozen=True, kw_only=True, slots=True)
class GuestMount:
    fs: str  # "virtiofs" | "9p"
    tag: str
    mode: str  # root: "ro" | "rw" | "overlay"; shares: "ro" | "rw"
    path: str = "/"  # mount point in the guest (shares)


@dataclass(frozen=True, kw_only=True, slots=True)
class GuestMountOp:
    """A mount init makes after the shares (MVMC_M<n>): bind-ro/bind-rw a → b, tmpfs/tmpfs-ro at a
    with data options b, detach a (a hidden share: unmounted, its directory removed)."""

    kind: str
    a: str
    b: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class GuestUser:
    """Who the program runs as: numbers, resolved by the compiler (init knows no names)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups


@dataclass(frozen=True, kw_only=True, slots=True)
class Rlimit:
    """A resource limit for the program: RLIMIT_<name>, None for unlimited."""

    name: str  # "NOFILE", "NPROC", ... (RLIMIT_* without the prefix)
    soft: int | None
    hard: int | None


@dataclass(frozen=True, kw_only=True, slots=True)
class GuestConfig:
    """What the guest init needs to know; PROTOCOL.md says how each field is written."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    hostname: str
    root: GuestMount
    shares: tuple[GuestMount, ...] = ()
    mounts: tuple[GuestMountOp, ...] = ()
    user: GuestUser | None = None  # root with no supplementary groups when None
    rlimits: tuple[Rlimit, ...] = ()
    tty: bool = False  # a pty as the program's terminal; its size comes over the control port
    hold: bool = False  # run the program only when the host says `start`
    # MVMC_NET: (addresses with prefixes, gateways, dns servers), each comma-separated; () without a network device
    net: tuple[str, ...] = ()
    debug: bool = False


def guest_params(config: GuestConfig) -> tuple[tuple[str, str], ...]:
    """The MVMC_* parameters (name, encoded value) for a guest configuration, in a fixed order."""
    params: list[tuple[str, str]] = [
        ("MVMC_ROOT", f"{config.root.fs}:{config.root.tag}:{config.root.mode}"),
        ("MVMC_HOSTNAME", encode(config.hostname)),
        ("MVMC_CWD", encode(config.cwd)),
    ]
    params += [(f"MVMC_S{i}", f"{s.fs}:{s.tag}:{s.mode}:{encode(s.path)}") for i, s in enumerate(config.shares)]
    params += [(f"MVMC_M{i}", f"{m.kind}:{encode(m.a)}:{encode(m.b)}") for i, m in enumerate(config.mounts)]
    if config.user is not None:
        u = config.user
        params.append(("MVMC_USER", f"{u.uid}:{u.gid}:{','.join(map(str, u.groups))}"))
    params += [(f"MVMC_R{i}", f"{r.name}:{_limit(r.soft)}:{_limit(r.hard)}") for i, r in enumerate(config.rlimits)]
    if config.tty:
        params.append(("MVMC_TTY", "1"))
    if config.hold:
        params.append(("MVMC_HOLD", "1"))
    if config.net:
        params.append(("MVMC_NET", ":".join(encode(part) for part in config.net)))
    params += [(f"MVMC_A{i}", encode(arg)) for i, arg in enumerate(config.argv)]
    params += [(f"MVMC_E{i}", f"{encode(name)}={encode(value)}") for i, (name, value) in enumerate(config.env)]
    return tuple(params)


def _limit(value: int | None) -> str:
    return "inf" if value is None else str(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelCmdline:
    params: tuple[str, ...]  # one token per parameter, in order
    spill: bytes | None  # the contents of /microvmc/config, when the configuration spilled

    def __str__(self) -> str:
        return " ".join(self.params)

    @property
    def spilled(self) -> bool:
        return self.spill is not None


def _init_envs(params: Sequence[str]) -> int:
    """How many of `params` may reach init as environment entries (any name=value without a dot
    in the name; known kernel parameters are counted too, to stay on the safe side)."""
    return sum(1 for p in params if "=" in p and "." not in p.split("=", 1)[0])


def _init_args(params: Sequence[str]) -> int:
    return sum(1 for p in params if "=" not in p)


def extra_problem(extra: Sequence[str]) -> str | None:
    """Why the manifest's own kernel parameters cannot be carried on any host, or None."""
    size = len(" ".join(extra))
    if size > EXTRA_BYTES_MAX:
        return (f"takes {size} bytes; the kernel's command line holds {COMMAND_LINE_MAX}, of which microvmc "
                f"leaves {EXTRA_BYTES_MAX} to the manifest")
    if _init_args(extra) > EXTRA_ARGS_MAX:
        return (f"has {_init_args(extra)} bare words, which reach init as arguments; at most {EXTRA_ARGS_MAX} "
                "are left to the manifest")
    if _init_envs(extra) > EXTRA_ENVS_MAX:
        return (f"has {_init_envs(extra)} name=value parameters, which reach init as environment entries; "
                f"at most {EXTRA_ENVS_MAX} are left to the manifest")
    return None


def compose(base: Sequence[str], extra: Sequence[str], config: GuestConfig, *, reserve: int = 0) -> KernelCmdline:
    """The command line: microvmc's `base` parameters, the manifest's `extra` ones, then the guest
    configuration, spilled to the initramfs when it does not fit. `reserve` bytes are kept free for
    what QEMU appends itself."""
    problem = extra_problem(extra)
    if problem:
        raise CmdlineError(problem)
    fixed = (*base, *extra)
    limit = COMMAND_LINE_MAX - reserve
    marker = ("MVMC_DEBUG=1",) if config.debug else ()
    if _init_args(fixed) > INIT_ARG_BUDGET:
        raise CmdlineError(f"{_init_args(fixed)} bare words would reach init, which takes at most {INIT_ARG_BUDGET}")
    ours = tuple(f"{name}={value}" for name, value in guest_params(config))
    # `base` holds only parameters the kernel consumes (console=, reboot=, ...); the manifest's
    # extra ones might reach init, so they count against its budget.
    inline = (*fixed, *ours, *marker)
    if len(" ".join(inline)) <= limit and _init_envs((*extra, *ours, *marker)) <= INIT_ENV_BUDGET:
        return KernelCmdline(params=inline, spill=None)
    spilled = (*fixed, "MVMC_SPILL=1", *marker)
    if len(" ".join(spilled)) > limit:
        raise CmdlineError(f"{len(' '.join(spilled))} bytes exceed the kernel's {limit}-byte command line")
    if _init_envs((*extra, "MVMC_SPILL=1", *marker)) > INIT_ENV_BUDGET:
        count = _init_envs((*extra, "MVMC_SPILL=1", *marker))
        raise CmdlineError(f"{count} parameters would reach init, which takes at most {INIT_ENV_BUDGET}")
    return KernelCmdline(params=spilled, spill="".join(p + "\n" for p in ours).encode("ascii"))
