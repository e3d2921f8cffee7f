"""emit: a LaunchPlan → the files of a build output, as bytes (written by backends/build.py).

`launch.sh` is rendered from the very argv the backend runs, quoted with shlex, each group of
options under a comment naming the manifest keys it came from, so the script a person reviews is
exactly what runs. Runtime-only paths (sockets, logs) live in a directory the script creates.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

from microvmc import __version__
from microvmc.compiler.graph import Graph
from microvmc.compiler.host import VirtiofsdFlavour
from microvmc.compiler.launch import C_VIRTIOFSD_PID_DIR, Fd, LaunchPlan
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


def launch_script(plan: LaunchPlan) -> str:
    s = ExitStatus
    lines = [
        "#!/bin/sh",
        _comment(f"microvmc {__version__} launch script for {plan.name!r}, compiled from:"),
        *[_comment(f"  {src}") for src in plan.sources],
        "# Runs the VM on its own: starts virtiofsd, boots QEMU, connects the program's stdin, stdout",
        "# and stderr to this script's, and exits with the program's exit status. Generated: rebuild, don't edit.",
        "set -u",
        "",
        "# The runtime directory, where microvmc's own runs keep theirs, locked while this script lives:",
        "# if it is SIGKILLed, the next `microvmc run` removes it (backends/qemu.py: sweep_runtime_dirs).",
        'base=${XDG_RUNTIME_DIR:-}',
        '[ -n "$base" ] && [ -d "$base" ] || base=${TMPDIR:-/tmp}',
        'rundir=$(mktemp -d "$base/microvmc-XXXXXX") || exit ' + str(int(s.HOST)),
        "if command -v flock >/dev/null 2>&1; then  # (without a lock, a sweep leaves the directory alone)",
        '    exec 7>"$rundir/.lock" && flock -n 7',
        "fi",
        'pids=""',
        "cleanup() {",
        '    for pid in $pids; do kill "$pid" 2>/dev/null; done',
        "    wait 2>/dev/null",
        *[f'    rm -f "{C_VIRTIOFSD_PID_DIR}/$(printf %s "$rundir/"{shlex.quote(v.socket)} | tr / .).pid"'
          for v in plan.virtiofsd if v.flavour is VirtiofsdFlavour.C],
        '    rm -rf "$rundir"',
        "}",
        "trap cleanup EXIT",
    ]
    if plan.stop_timeout > 0:
        lines += [
            "# resources.stop_timeout: a signal is passed on to the program once it runs, which then has",
            f"# {plan.stop_timeout:g} s to end; a second signal, or one before the program runs, stops the VM",
            'stop_signal=""',
            "stop() {",
            '    if [ -n "$stop_signal" ] || [ -z "${qemu:-}" ] || ! grep -q \'^started\' status 2>/dev/null; then',
            "        exit $((128 + $1))",
            "    fi",
            "    stop_signal=$1",
            "    printf 'signal %s\\n' \"$1\" >&8  # to init's control port (init/PROTOCOL.md)",
            f"    ( watch {_ceil(plan.stop_timeout)} stop-timed-out '' ) 7>&- &",
            '    pids="$pids $!"',
            "}",
            "trap 'stop 1' HUP",
            "trap 'stop 2' INT",
            "trap 'stop 15' TERM",
        ]
    else:
        lines += [
            "trap 'exit 129' HUP",
            f"trap 'exit {int(s.INTERRUPTED)}' INT",
            "trap 'exit 143' TERM",
        ]
    lines += [
        "watch() {  # seconds, file, pattern: unless status matches the pattern first, mark the file, stop QEMU",
        "    trap 'kill \"$nap\" 2>/dev/null; exit 0' TERM  # (its sleep runs in the background: cleanup stops it at once)",
        "    left=$1",
        '    while [ "$left" -gt 0 ]; do',
        "        kill -0 $$ 2>/dev/null || exit 0  # this script is gone (SIGKILL): so is QEMU",
        '        [ -n "$3" ] && grep -q "$3" status 2>/dev/null && exit 0',
        '        sleep 1 & nap=$!; wait "$nap"; left=$((left - 1))',
        "    done",
        '    : > "$2"; kill "$qemu" 2>/dev/null',
        "}",
        "# QEMU and virtiofsd die with this script, even when it is SIGKILLed (util-linux setpriv)",
        'die_with_us=""',
        'command -v setpriv >/dev/null 2>&1 && die_with_us="setpriv --pdeathsig KILL --"',
        'exec 9<&0  # the program\'s stdin, kept for QEMU (a background job would get /dev/null)',
        'cd "$rundir" || exit ' + str(int(s.HOST)),
        "",
        "wait_for_socket() {  # socket, pid, description, log: wait at most 10 s",
        "    tries=0",
        '    until [ -S "$1" ]; do',
        "        tries=$((tries + 1))",
        '        if [ "$tries" -gt 1000 ] || ! kill -0 "$2" 2>/dev/null; then',
        f'            echo "microvmc: $3 did not start: $(tail -n 1 "$4")" >&2; exit {int(s.HOST)}',
        "        fi",
        "        sleep 0.01",
        "    done",
        "}",
    ]
    for v in plan.virtiofsd:
        lines += [
            "",
            _comment(f"{', '.join(v.keys)}: share {v.tag!r}, {v.shared_dir}" + (" (read-only)" if v.read_only else "")),
            f'$die_with_us {_q(v.argv)} "--socket-path=$rundir/"{shlex.quote(v.socket)} '
            f'2>{shlex.quote(f"virtiofsd-{v.tag}.log")} 7>&- &',
            'pids="$pids $!"',
            f"wait_for_socket {shlex.quote(v.socket)} $! {shlex.quote(f'virtiofsd for share {v.tag}')} "
            + shlex.quote(f"virtiofsd-{v.tag}.log"),
        ]
    lines.append("")
    for i, group in enumerate(plan.qemu):
        keys = f"{', '.join(group.keys)}: " if group.keys else ""
        lines.append(_comment(keys + group.comment))
        options = _option_lines(group.args)
        head = "set --" if i == 0 else 'set -- "$@"'
        lines.append(" \\\n    ".join([head, *options]))
    fds = (f"0<&9 1>stdout.pipe {int(Fd.STDERR)}>stderr.pipe {int(Fd.STATUS)}>status {int(Fd.CONSOLE)}>console.log "
           f"{int(Fd.CONTROL)}<&8 {int(Fd.QEMU_LOG)}>qemu.log 7>&- 8<&- 9<&-")
    exec_case = "\n".join(
        f"                {errno}) code={int(status)} ;;" for errno, status in sorted(EXEC_ERRNO_STATUS.items())
    )
    lines += [
        "",
        "# The program's output goes through pipes, so that a regular file as this script's stdout keeps",
        "# one shared offset (QEMU reopening /dev/fd/1 would write at its own).",
        "mkfifo stdout.pipe stderr.pipe control.pipe || exit " + str(int(s.HOST)),
        "exec 8<>control.pipe  # requests to init; opened read-write, so neither side waits for the other",
        "if [ -t 9 ]; then  # a terminal keeps its line mode (QEMU would make it raw): cat relays it",
        "    mkfifo stdin.pipe || exit " + str(int(s.HOST)),
        "    cat <&9 >stdin.pipe 7>&- &",
        '    pids="$pids $!"',
        "    exec 9<stdin.pipe",
        "fi",
        "# A reader that goes away (`| head`) is told to init, which closes the program's end: it gets EPIPE.",
        "{ cat <&3 || { printf 'close stdout\\n' >&8; cat <&3 >/dev/null; }; } 3<stdout.pipe 7>&- &",  # (7: the lock)
        'relays="$!"',
        "{ cat <&3 >&2 || { printf 'close stderr\\n' >&8; cat <&3 >/dev/null; }; } 3<stderr.pipe 7>&- &",
        'relays="$relays $!"',
        f'$die_with_us "$@" {fds} &',
        "qemu=$!",
        'pids="$pids $qemu"',
        f"# resources.boot_timeout: the program must start within {plan.boot_timeout:g} s",
        f"( watch {_ceil(plan.boot_timeout)} timed-out '^started' ) 7>&- &",
        'pids="$pids $!"',
    ]
    if plan.timeout:
        lines += [
            f"# resources.timeout: the whole run may take {plan.timeout:g} s",
            f"( watch {_ceil(plan.timeout)} timed-out '' ) 7>&- &",
            'pids="$pids $!"',
        ]
    lines += [
        "while :; do",
        '    wait "$qemu"',
        "    qemu_status=$?",
        '    kill -0 "$qemu" 2>/dev/null || break  # still there: a signal interrupted the wait',
        "done",
        'wait $relays  # all output is delivered before the status',
        "",
        "# init's report on the status port (init/PROTOCOL.md) → the exit status",
        f"code={int(s.GUEST_CRASHED)}",
        "message=\"the VM stopped without reporting the program's status\"",
        "while read -r kind a b; do",
        '    case "$kind" in',
        '        exit) code=$a; message=""; break ;;',
        '        signal) code=$((128 + a)); message=""; break ;;',
        "        error)",
        f'            code={int(s.INIT_FAILED)}; message="guest init failed at $a: ${{b#* }}"',
        '            if [ "$a" = exec ]; then',
        '                message="cannot run the program in the guest: ${b#* }"',
        f"                code={int(s.NOT_EXECUTABLE)}",
        '                case "${b%% *}" in',
        exec_case,
        "                esac",
        "            fi",
        "            break ;;",
        "    esac",
        "done < status",
        "if [ -e stop-timed-out ]; then",
        '    code=$((128 + stop_signal))',
        f'    message="the program did not end within {plan.stop_timeout:g} s of signal $stop_signal (resources.stop_timeout); the VM was stopped"',
        "elif [ -e timed-out ]; then",
        f"    code={int(s.TIMEOUT)}; message=\"the program did not start or finish in time\"",
        f'elif [ "$code" = {int(s.GUEST_CRASHED)} ] && [ "$qemu_status" != 0 ] && [ -s qemu.log ]; then',
        f'    code={int(s.HOST)}; message="QEMU failed: $(head -n 1 qemu.log)"',
        "fi",
        'if [ -n "$message" ]; then',
        '    echo "microvmc: $message" >&2',
        "    tail -n 20 console.log >&2",
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


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
