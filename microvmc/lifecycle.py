"""The verbs on runs that outlive the command: ps, logs, inspect, stop, kill, wait, rm, exec.

Each finds its run in the run store (backends/runstore.py) and talks to the run's monitor
(backends/monitor.py) over its control socket; when the monitor is gone, the record answers.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

TYPE_CHECKING = False  # (not typing's: importing typing is ~3 ms of a `run` before QEMU starts)
if TYPE_CHECKING:
    import argparse
    from typing import Any

from microvmc.errors import ExitStatus, MicrovmcError

__all__ = ["store_of", "cmd_ps", "cmd_logs", "cmd_inspect", "cmd_stop", "cmd_kill", "cmd_wait", "cmd_rm",
           "cmd_exec", "parse_signal", "parse_size", "ago", "status_text"]

FOLLOW_POLL = 0.1  # seconds between looks at a followed log


def store_of(args: argparse.Namespace):
    from microvmc.backends.runstore import RunStore, state_root

    return RunStore(state_root(override=getattr(args, "state", None)) / "runs")


def parse_signal(text: str) -> int:
    """HUP, SIGHUP, hup or 1."""
    value = text.strip()
    if value.isdigit():
        number = int(value)
        if 0 < number < 65:
            return number
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        number = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if number is not None:
            return int(number)
    raise MicrovmcError(f"-s {text!r}: not a signal (a name like HUP or TERM, or a number 1-64)",
                        status=ExitStatus.USAGE)


def parse_size(text: str, option: str) -> int:
    """1024, 10k, 16m, 1g (powers of 1024); 0: no limit."""
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}
    value = text.strip().lower()
    digits = value.rstrip("bkmg")
    try:
        number = int(digits)
        size = number * units[value[len(digits):]]
    except (ValueError, KeyError):
        raise MicrovmcError(f"{option} {text!r}: expected a size like 1048576, 512k, 16m or 1g",
                            status=ExitStatus.USAGE) from None
    if number < 0:
        raise MicrovmcError(f"{option} {text!r}: a size is not negative", status=ExitStatus.USAGE)
    return size


def check_bounds(value: int | None, key: tuple[str, ...], what: str) -> None:
    """An option that overrides a manifest key keeps to that key's bounds in the schema."""
    if value is None:
        return
    from microvmc.compiler.manifest import schema_node

    node = schema_node(key)
    unit = f" {node['x-unit']}" if "x-unit" in node else ""
    for bound, wrong in (("minimum", value < node.get("minimum", value)), ("maximum", value > node.get("maximum", value))):
        if wrong:
            raise MicrovmcError(f"{what}: {value} is {'below' if bound == 'minimum' else 'above'} the {bound} of "
                                f"{node[bound]}{unit} ({'.'.join(key)})", status=ExitStatus.USAGE)


# --- ps ------------------------------------------------------------------------------------------


def ago(seconds: float) -> str:
    """Docker's words for a duration: "Less than a second", "12 seconds", "About a minute", ..."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    m = s // 60
    if m == 1:
        return "About a minute"
    if m < 60:
        return f"{m} minutes"
    h = round(s / 3600)
    if h == 1:
        return "About an hour"
    if h < 48:
        return f"{h} hours"
    d = s // 86400
    if d < 14:
        return f"{d} days"
    if d < 60:
        return f"{d // 7} weeks"
    return f"{d // 30} months"


def status_text(state: str, record: dict[str, Any], now: float) -> str:
    if state == "running":
        return f"Up {ago(now - record.get('started_unix', record.get('created_unix', now)))}"
    if state == "exited":
        return f"Exited ({record.get('status')}) {ago(now - record.get('ended_unix', now))} ago"
    if state == "dead":
        return "Dead (monitor lost)"
    return "Created"


def _summary(run, now: float) -> dict[str, Any]:
    record = run.record()
    state = run.state()
    record = run.record(fresh=True) if state != record.get("state") else record
    return {"id": run.id, "name": run.name, "command": record.get("command", []), "created": record.get("created"),
            "created_unix": record.get("created_unix"),
            "state": state, "status": record.get("status"), "status_text": status_text(state, record, now),
            "manifest": record.get("manifest"), "detached": not record.get("foreground", False)}


def cmd_ps(args: argparse.Namespace) -> int:
    now = time.time()
    runs = [_summary(run, now) for run in store_of(args).all()]
    if not args.all:
        runs = [r for r in runs if r["state"] in ("created", "running")]
    runs.reverse()  # newest first, as docker ps
    if args.quiet:
        for r in runs:
            print(r["id"] if args.no_trunc else r["id"][:12])
        return 0
    if args.json:
        sys.stdout.write(json.dumps(runs, indent=2, sort_keys=True) + "\n")
        return 0
    rows = [("ID", "NAME", "COMMAND", "CREATED", "STATUS", "MANIFEST")]
    for r in runs:
        command = shlex.join(r["command"])
        if len(command) > 30 and not args.no_trunc:
            command = command[:29] + "…"
        created = f"{ago(now - r['created_unix'])} ago" if r.get("created_unix") else ""
        rows.append((r["id"] if args.no_trunc else r["id"][:12], r["name"], command, created, r["status_text"],
                     _display(r["manifest"] or "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _display(path: str) -> str:
    from microvmc.compiler.load import display_path

    return display_path(path) if path else ""


# --- logs --------------------------------------------------------------------------------------


def _log_files(run, name: str) -> list[Path]:
    """The log and its rotations, oldest first."""
    files = sorted((p for p in run.dir.glob(f"{name}.*") if p.suffix[1:].isdigit()),
                   key=lambda p: -int(p.suffix[1:]))
    return [*files, run.dir / name]


def _tail(data: bytes, lines: int) -> bytes:
    if lines < 0:
        return data
    if lines == 0:
        return b""
    end = len(data) - (1 if data.endswith(b"\n") else 0)
    cut = end
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1:]


def cmd_logs(args: argparse.Namespace) -> int:
    run = store_of(args).find(args.run)
    record = run.record()
    if record.get("foreground"):
        raise MicrovmcError(f"run {run.name!r} ran in the foreground: its output went to the terminal, not to logs",
                            status=ExitStatus.NO_SUCH_RUN, hint=f"its console log: {run.dir / 'console.log'}")
    streams = [("stdout.log", 1), ("stderr.log", 2)]
    if args.stdout and not args.stderr:
        streams = streams[:1]
    elif args.stderr and not args.stdout:
        streams = streams[1:]
    followed = []
    for name, fd in streams:
        data = b"".join(_read(p) for p in _log_files(run, name))
        _write(fd, _tail(data, args.tail))
        path = run.dir / name
        followed.append([name, fd, _open(path), _size(path)])
    if not args.follow:
        for f in followed:
            if f[2] is not None:
                os.close(f[2])
        return 0
    try:
        while True:
            alive = run.alive()  # before reading: what it wrote before it ended is read after
            for f in followed:
                name, fd, handle, offset = f
                path = run.dir / name
                if handle is None:
                    handle = f[2] = _open(path)
                    if handle is None:
                        continue
                    f[3] = offset = 0
                chunk = _read_from(handle, offset)
                if chunk:
                    _write(fd, chunk)
                    f[3] += len(chunk)
                try:
                    rotated = os.stat(path).st_ino != os.fstat(handle).st_ino
                except OSError:
                    rotated = True
                if rotated:  # the rest of the old file was just read; the new one starts at 0
                    os.close(handle)
                    f[2], f[3] = _open(path), 0
            if not alive:
                return 0
            time.sleep(FOLLOW_POLL)
    finally:
        for f in followed:
            if f[2] is not None:
                os.close(f[2])


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(fd: int, offset: int) -> bytes:
    chunks = []
    while True:
        chunk = os.pread(fd, 1 << 16, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- inspect, stop, kill, wait, rm ------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from microvmc.backends.monitor import Client

    store = store_of(args)
    out = []
    for ref in args.runs:
        run = store.find(ref)
        state = run.state()
        record = run.record(fresh=True)
        doc = {**record, "state": state,
               "paths": {"dir": str(run.dir), "socket": str(run.socket), "console": str(run.dir / "console.log"),
                         "qemu_log": str(run.dir / "qemu.log"), "stdout": str(run.dir / "stdout.log"),
                         "stderr": str(run.dir / "stderr.log"), "timeline": str(run.dir / "timeline.json")}}
        if state in ("created", "running"):
            live = Client(run).request({"op": "state"})
            if live is not None:
                doc["monitor"] = live
        out.append(doc)
    sys.stdout.write(json.dumps(out if len(out) != 1 else out[0], indent=2, sort_keys=True) + "\n")
    return 0


def _ended(run, timeout: float | None = None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    while run.alive():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def cmd_stop(args: argparse.Namespace) -> int:
    from microvmc.backends.monitor import Client

    store = store_of(args)
    runs = [store.find(ref) for ref in args.runs]
    for run in runs:
        if run.alive():
            timeout = args.time if args.time is not None else run.record().get("plan", {}).get("stop_timeout")
            if timeout is None:  # a record from before plans had it: the schema's default
                from microvmc.compiler.manifest import schema_node

                timeout = schema_node(("resources", "stop_timeout"))["default"]
            try:
                Client(run).stop(float(timeout))
            except MicrovmcError:
                pass  # it ended meanwhile
    for run in runs:
        _ended(run)
        print(run.name)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    from microvmc.backends.monitor import Client
    from microvmc.backends.runstore import RunStateError

    number = parse_signal(args.signal)
    store = store_of(args)
    for ref in args.runs:
        run = store.find(ref)
        if not Client(run).signal(number):
            raise RunStateError(f"run {run.name!r}: its program does not run (it is {run.state()})")
        print(run.name)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from microvmc.backends.monitor import Client

    store = store_of(args)
    status = 0
    for ref in args.runs:
        status, _ = Client(store.find(ref)).wait()
        print(status)
    return status


def cmd_rm(args: argparse.Namespace) -> int:
    from microvmc.backends.monitor import Client

    store = store_of(args)
    status = 0
    for ref in args.runs:  # as docker rm: each one it can, and one line for each it cannot
        try:
            run = store.find(ref)
            if run.alive() and args.force:
                try:
                    Client(run).stop(0)
                except MicrovmcError:
                    pass
                _ended(run)
            store.remove(run)
        except MicrovmcError as err:
            for line in err.lines():
                print(f"microvmc: {line}", file=sys.stderr)
            status = int(err.status)
            continue
        print(run.name)
    return status


# --- exec ----------------------------------------------------------------------------------------


def cmd_attach(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from microvmc.backends import terminal
    from microvmc.backends.monitor import Client
    from microvmc.backends.runstore import RunStateError
    from microvmc.backends.supervise import signals_caught

    run = store_of(args).find(args.run)
    state = run.state()
    if state not in ("created", "running"):
        raise RunStateError(f"cannot attach to run {run.name!r}: it is {state}",
                            hint=f"its output: microvmc logs {run.name}")
    record = run.record()
    tty = bool(record.get("tty"))
    stdin = 0 if record.get("stdin_open") and not args.no_stdin and not record.get("foreground") else None
    numbers = (signal.SIGWINCH,) if tty else ()
    if args.sig_proxy == "true" and not tty:
        numbers += (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    with ExitStack() as stack:
        signals = stack.enter_context(signals_caught(numbers))
        tty_fd = next((fd for fd in (0, 1) if os.isatty(fd)), None) if tty else None

        def attached(program_tty: bool) -> None:
            if program_tty and stdin is not None and os.isatty(0):
                stack.enter_context(terminal.raw(0))  # put back on every way out of the block

        result = Client(run).attach(1, 2, stdin=stdin, signals=signals, terminal=tty_fd, on_attached=attached)
    if result is None:
        if tty_fd is not None:
            os.write(2, b"\r\n")
        print(f"microvmc: detached from run {run.name}; it goes on (microvmc attach {run.name})", file=sys.stderr)
        return 0
    status, message = result
    if message:
        print(f"microvmc: {message}", file=sys.stderr)
    return status


def _user(text: str, plan: dict[str, Any]):
    """`-u NAME|UID[:GROUP|GID]` as docker exec takes it: names resolved against the run's root
    filesystem's /etc/passwd and /etc/group (read inside the root, links resolved as the guest
    would); a uid without a group gets its passwd entry's group, or 0."""
    from microvmc.backends.unpack import Ownership, read_guest_file
    from microvmc.compiler.cmdline import GuestUser
    from microvmc.compiler.ociimage import ImageError, parse_user, resolve_user

    root = next((fs for fs in (plan.get("machine") or {}).get("filesystems", ()) if fs.get("tag") == "root"), None)
    passwd = group = ""
    if root is not None:
        ownership = Ownership(root.get("ownership", "native"))
        passwd = read_guest_file(root["host_dir"], "/etc/passwd", ownership)
        group = read_guest_file(root["host_dir"], "/etc/group", ownership)
    try:
        uid, gid, groups, _ = resolve_user(parse_user(text), passwd, group, what=f"-u {text}")
    except ImageError as err:
        raise MicrovmcError(str(err), status=ExitStatus.USAGE) from None
    return GuestUser(uid=uid, gid=gid, groups=groups)


def cmd_exec(args: argparse.Namespace) -> int:
    from contextlib import ExitStack
    from dataclasses import replace

    from microvmc.backends import terminal
    from microvmc.backends.monitor import Client
    from microvmc.backends.runstore import RunStateError
    from microvmc.backends.supervise import signals_caught
    from microvmc.compiler.launch import program_process

    if not args.argv:
        raise MicrovmcError("exec: no command (microvmc exec RUN -- ARGV...)", status=ExitStatus.USAGE)
    run = store_of(args).find(args.run)
    state = run.state()
    if state not in ("created", "running"):
        raise RunStateError(f"cannot exec in run {run.name!r}: it is {state}")
    plan_doc = run.record().get("plan") or {}
    base = program_process(plan_doc.get("cmdline", ""))
    env = dict(base.env)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise MicrovmcError(f"-e {item!r}: expected KEY=VALUE", status=ExitStatus.USAGE)
        env[name] = value
    spec = replace(base, argv=tuple(args.argv), env=tuple(env.items()))
    if args.workdir:
        spec = replace(spec, cwd=args.workdir)
    if args.user:
        spec = replace(spec, user=_user(args.user, plan_doc))
    with ExitStack() as stack:
        stdin = 0
        if not args.interactive:
            stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            stack.callback(os.close, stdin)
        tty_fd = None
        if args.tty:
            tty_fd = next((fd for fd in (0, 1) if os.isatty(fd)), None)
            rows, cols = terminal.size(tty_fd) if tty_fd is not None else (0, 0)
            spec = replace(spec, tty=(rows or 24, cols or 80))
        signals = stack.enter_context(signals_caught((signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                                                     + ((signal.SIGWINCH,) if args.tty else ())))
        if args.tty and args.interactive and os.isatty(0):
            stack.enter_context(terminal.raw(0))
        status, message = Client(run).exec(spec, stdin, 1, 2, signals=signals, terminal=tty_fd)
    if message:
        print(f"microvmc: {message}", file=sys.stderr)
    return status

