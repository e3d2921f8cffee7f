"""emit: a LaunchPlan → the files of a build output, as bytes (written by backends/build.py).

`launch.sh` is the runtime shell kept in compiler/launch.sh.in, with only what the plan decides filled
in: the very argv the backend runs, quoted with shlex, each group of options under a comment naming
the manifest keys it came from, so the script a person reviews is exactly what runs. Runtime-only paths (sockets, logs) live in a directory the script creates.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microvmc import __version__
from microvmc.compiler.graph import Graph
from microvmc.compiler.host import VirtiofsdFlavour
from microvmc.compiler.launch import C_VIRTIOFSD_PID_DIR, Fd, LaunchPlan
from microvmc.compiler.machine import NicKind
from microvmc.compiler.status import EXEC_ERRNO_STATUS
from microvmc.compiler.store import digest, store_path
from microvmc.errors import ExitStatus

__all__ = ["Output", "emit", "to_json"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Output:
    path: str  # the store path the files go to, derived from their contents
    files: tuple[tuple[str, bytes, int], ...]  # (name, content, mode), sorted by name


def to_json(value: Any) -> str:
    """Sorted, indented JSON. A byte that is not UTF-8 (a lone surrogate from the command line) is
    written as its \\udcXX escape, so the text stays valid UTF-8 and reads back as the same string."""
    text = json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _comment(text: str) -> str:
    """A shell comment showing `text` on one line, whatever it holds: a newline would end the comment
    and make the rest a command; other control characters could hide text from a reviewer."""
    return "# " + _printable(text)


def _printable(text: str) -> str:
    """`text` with backslashes, characters that do not print (newline, tab, escape, U+2028, ...) and
    bytes that are not UTF-8 (lone surrogates) written as Python escapes."""
    out = []
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif "\udc80" <= c <= "\udcff":  # a byte that is not UTF-8, as os.fsdecode keeps it
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c == " " or c.isprintable() and not "\ud800" <= c <= "\udfff":
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _q(args: tuple[str, ...] | list[str]) -> str:
    return shlex.join(args)


def _option_lines(args: tuple[str, ...]) -> list[str]:
    """One option and its value per line: ("-m", "256M", "-no-reboot") → ["-m 256M", "-no-reboot"]."""
    lines: list[str] = []
    i = 0
    while i < len(args):
        if args[i].startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("-"):
            lines.append(_q(args[i : i + 2]))
            i += 2
        else:
            lines.append(_q(args[i : i + 1]))
            i += 1
    return lines


# The runtime shell; only what the plan decides is filled in. Read with the code, as part of it (the
# evaluation cache's code fingerprint covers it), not as a host input of a build.
TEMPLATE = Path(__file__).with_name("launch.sh.in").read_text(encoding="utf-8")
_TOKEN = re.compile(r"@([A-Z_]+)@")


def launch_script(plan: LaunchPlan) -> str:
    """launch.sh: the template (compiler/launch.sh.in) with what the plan decides filled in. Every
    value is quoted (shlex) or shown in a comment (_comment); statuses and timeouts are numbers."""
    s = ExitStatus
    blocks = {
        "SOURCES": [_comment(f"microvmc {__version__} launch script for {plan.name!r}, compiled from:"),
                    *[_comment(f"  {src}") for src in plan.sources]],
        "PID_FILES": [f'    rm -f "{C_VIRTIOFSD_PID_DIR}/$(printf %s "$rundir/"{shlex.quote(v.socket)} | tr / .).pid"'
                      for v in plan.virtiofsd if v.flavour is VirtiofsdFlavour.C],
        "VIRTIOFSD": [line for v in plan.virtiofsd for line in (
            "",
            _comment(f"{', '.join(v.keys)}: share {v.tag!r}, {v.shared_dir}" + (" (read-only)" if v.read_only else "")),
            f'$die_with_us {_q(v.argv)} "--socket-path=$rundir/"{shlex.quote(v.socket)} '
            f'2>{shlex.quote(f"virtiofsd-{v.tag}.log")} 7>&- &',
            'pids="$pids $!"',
            f"wait_for_socket {shlex.quote(v.socket)} $! {shlex.quote(f'virtiofsd for share {v.tag}')} "
            + shlex.quote(f"virtiofsd-{v.tag}.log"),
        )],
        "QEMU": [line for i, group in enumerate(plan.qemu) for line in (
            _comment((f"{', '.join(group.keys)}: " if group.keys else "") + group.comment),
            " \\\n    ".join(["set --" if i == 0 else 'set -- "$@"', *_option_lines(group.args)]),
        )],
        "STAGE": _stage_lines(plan),
        "REFUSE": _refuse_lines(plan),
        "UNSTAGE": ['    for m in ${staged_mounts:-}; do umount -- "$rundir/$m" 2>/dev/null; done  # run -v files bound here']
        if any(fs.staged_from for fs in plan.machine.filesystems) else [],
        "EXEC_CASE": [f"                {errno}) code={int(status)} ;;"
                      for errno, status in sorted(EXEC_ERRNO_STATUS.items())],
    }
    values = {
        **{f"S_{name}": str(int(s[name])) for name in ("HOST", "INTERRUPTED", "GUEST_CRASHED", "INIT_FAILED",
                                                        "NOT_EXECUTABLE", "TIMEOUT")},
        "FDS": (f"0<&9 1>stdout.pipe {int(Fd.STDERR)}>stderr.pipe {int(Fd.STATUS)}>status {int(Fd.CONSOLE)}>console.log "
                f"{int(Fd.CONTROL)}<&8 {int(Fd.QEMU_LOG)}>qemu.log 7>&- 8<&- 9<&-"),
        "STOP_TIMEOUT": f"{plan.stop_timeout:g}", "STOP_TIMEOUT_CEIL": str(_ceil(plan.stop_timeout)),
        "BOOT_TIMEOUT": f"{plan.boot_timeout:g}", "BOOT_TIMEOUT_CEIL": str(_ceil(plan.boot_timeout)),
        "TIMEOUT": f"{plan.timeout:g}", "TIMEOUT_CEIL": str(_ceil(plan.timeout)),
    }
    conditions = {"stop_timeout": plan.stop_timeout > 0, "timeout": bool(plan.timeout)}
    return fill(TEMPLATE, blocks=blocks, values=values, conditions=conditions)


def fill(template: str, *, blocks: dict[str, list[str]], values: dict[str, str], conditions: dict[str, bool]) -> str:
    """A line `@NAME@` becomes the lines of blocks[NAME] (none: the line goes); `@NAME@` within a
    line becomes values[NAME]; `@if c@` ... [`@else@` ...] `@end@` keeps one side. A name the template
    uses and the caller does not give is an error, not an empty string."""
    out: list[str] = []
    keep: list[bool] = []  # one entry per open @if@
    for line in template.splitlines():
        word = line.strip()
        if word.startswith("@if ") and word.endswith("@"):
            keep.append(conditions[word[4:-1]])
        elif word == "@else@":
            keep[-1] = not keep[-1]
        elif word == "@end@":
            keep.pop()
        elif not all(keep):
            continue
        elif _TOKEN.fullmatch(word) and word[1:-1] in blocks:
            out += blocks[word[1:-1]]
        else:
            out.append(_TOKEN.sub(lambda m: values[m.group(1)], line))
    assert not keep, "an @if@ without its @end@"
    return "\n".join(out) + "\n"


def _stage_lines(plan: LaunchPlan) -> list[str]:
    """What backends/qemu.py does for each `run -v` file (backends/oci.py's staging): the file alone in
    a directory of its own, by a hard link, else (as root) a bind mount, else a copy if read-only."""
    lines: list[str] = []
    for fs in plan.machine.filesystems:
        if not fs.staged_from:
            continue
        src, dst = shlex.quote(fs.staged_from), shlex.quote(f"{fs.host_dir}/{os.path.basename(fs.staged_from)}")
        lines += [
            "",
            _comment(f"{', '.join(fs.keys)}: run -v of the file {fs.staged_from}, alone in {fs.host_dir}"
                     + (" (read-only)" if fs.read_only else "")),
            f"mkdir {shlex.quote(fs.host_dir)} || exit {int(ExitStatus.HOST)}",
            f"if ln -- {src} {dst} 2>/dev/null; then :",
            f'elif : > {dst} && mount --bind -- {src} {dst} 2>/dev/null; then staged_mounts="${{staged_mounts:-}} {dst}"',
            *([f"elif cp -p -- {src} {dst}; then :"] if fs.read_only else []),
            f"else echo {shlex.quote(f'microvmc: cannot share {fs.staged_from}: it cannot be linked or mounted here')}"
            f" >&2; exit {int(ExitStatus.HOST)}",
            "fi",
        ]
    return lines


def _refuse_lines(plan: LaunchPlan) -> list[str]:
    """What this script cannot do, refused before it makes anything: a tap device in a network
    namespace (network.mode = "netns") is made and joined by microvmc's backend (backends/netns.py)."""
    nic = plan.machine.nic
    if nic is None or nic.kind is not NicKind.TAP:
        return []
    message = (f"microvmc: this script cannot join the VM to the network namespace {nic.namespace} "
               "(network.mode = \"netns\"): `microvmc run` makes its tap device; run the manifest with it")
    return [_comment("network.mode: netns needs microvmc run (backends/netns.py makes the tap in the namespace)"),
            f"echo {shlex.quote(message)} >&2", f"exit {int(ExitStatus.HOST)}"]


def _ceil(seconds: float) -> int:
    """Whole seconds for sh's sleep, rounded up."""
    return int(-(-seconds // 1))


def emit(plan: LaunchPlan, graph: Graph, store: str) -> Output:
    virtiofsd = [dict(v.to_dict(), argv_script=list(v.argv_with_socket_path("<run-dir>"))) for v in plan.virtiofsd]
    files = {
        "launch.sh": (launch_script(plan).encode("utf-8", "surrogateescape"), 0o755),
        "plan.json": (to_json({"microvmc": __version__, "plan": plan.to_dict(), "graph": graph.to_dict()}).encode("utf-8"), 0o644),
        "cmdline": ((plan.cmdline + "\n").encode("utf-8"), 0o644),
        "virtiofsd.json": (to_json(virtiofsd).encode("utf-8"), 0o644),
        "graph.dot": (graph.to_dot().encode("utf-8", "surrogateescape"), 0o644),
    }
    content = {name: digest(data.decode("utf-8", "surrogateescape")) for name, (data, _) in files.items()}
    inputs = {n.id: n.digest for n in graph.nodes if n.id != "plan"}
    path = store_path(store, digest({"files": content, "inputs": inputs}), plan.name)
    return Output(path=path, files=tuple((name, data, mode) for name, (data, mode) in sorted(files.items())))
