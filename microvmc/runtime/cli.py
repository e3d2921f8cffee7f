"""`microvmc-runtime`: runc's command line, so that podman, docker (containerd's runc shim) and
containerd drive microVMs unchanged.

    microvmc-runtime [--root DIR] [--log FILE] [--log-format text|json] [--debug] [--systemd-cgroup]
                     COMMAND [OPTIONS] ID [ARGS]

Global options come before the command, the command's options before the container id, as with
runc. A failure is one line on stderr and, with --log, a `"level":"error"` entry in the log file
(what engines read back), exit status 1. Nothing else is ever written to stderr or stdout: for
`create`, they are the container's own streams.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import NoReturn, Sequence

from microvmc import __version__
from microvmc.runtime.state import RuntimeFailure, features_document, log_line, parse_signal, rfc3339

__all__ = ["main", "entry", "parser"]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that fails as runc does (one line, status 1) instead of printing usage, status 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="microvmc-runtime", description="An OCI runtime (runc's command line) that runs each "
                "container in a microVM.")
    p.add_argument("--version", "-v", action="version", version=f"microvmc-runtime {__version__}\nspec: 1.0.2")
    p.add_argument("--root", help="where containers' state is kept (default: /run/microvmc-runtime as root)")
    p.add_argument("--log", help="write errors and notes to this file (default: stderr, errors only)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--debug", action="store_true", help="log notes (what config.json asked that has no effect)")
    p.add_argument("--systemd-cgroup", action="store_true", help="accepted; the VM is its own resource boundary")
    for value in ("--criu", "--rootless"):
        p.add_argument(value, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, *, id: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        if id:
            c.add_argument("id", metavar="ID", help="the container id")
        return c

    def creating(c: argparse.ArgumentParser) -> None:
        c.add_argument("--bundle", "-b", help="the bundle directory (default: the current one)")
        c.add_argument("--pid-file", help="write the pid the engine waits on (the container's monitor) here")
        c.add_argument("--console-socket", help="with process.terminal: send the pty's master to this socket")
        c.add_argument("--preserve-fds", type=int, default=0, help="accepted; extra descriptors are not passed on")
        c.add_argument("--pidfd-socket", help=argparse.SUPPRESS)
        for flag in ("--no-pivot", "--no-new-keyring"):
            c.add_argument(flag, action="store_true", help="accepted; the VM has its own root and keyring")

    c = command("create", "boot the container's VM, its program held until `start`")
    creating(c)
    c = command("run", "create and start a container; without --detach, wait for it and delete it")
    creating(c)
    c.add_argument("--detach", "-d", action="store_true")
    c.add_argument("--keep", action="store_true", help="do not delete the container once it ended")
    command("start", "run the program of a created container")
    c = command("state", "print the container's state (JSON)")
    c = command("kill", "send a signal to the container's program (default SIGTERM)")
    c.add_argument("--all", "-a", action="store_true", help="accepted: the program's is the VM's only process tree")
    c.add_argument("signal", nargs="?", default="SIGTERM")
    c = command("delete", "stop the VM if need be and remove everything of the container")
    c.add_argument("--force", "-f", action="store_true", help="also a running container")
    c = command("ps", "list the container's host processes")
    c.add_argument("--format", "-f", choices=("table", "json"), default="table")
    c.add_argument("ps_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    c = command("exec", "run a further process in the container's VM")
    c.add_argument("--process", "-p", help="the process as JSON (config.json's `process`)")
    c.add_argument("--detach", "-d", action="store_true")
    c.add_argument("--pid-file")
    c.add_argument("--console-socket")
    c.add_argument("--tty", "-t", action="store_true")
    c.add_argument("--env", "-e", action="append", default=[])
    c.add_argument("--cwd")
    c.add_argument("--user", "-u")
    c.add_argument("--additional-gids", "-g", action="append", default=[])
    c.add_argument("--preserve-fds", type=int, default=0)
    c.add_argument("--process-label", help=argparse.SUPPRESS)
    c.add_argument("--apparmor", help=argparse.SUPPRESS)
    c.add_argument("--no-new-privs", action="store_true", help=argparse.SUPPRESS)
    c.add_argument("--cap", "-c", action="append", default=[], help=argparse.SUPPRESS)
    c.add_argument("--cgroup", action="append", default=[], help=argparse.SUPPRESS)
    c.add_argument("--ignore-paused", action="store_true", help=argparse.SUPPRESS)
    c.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGV")
    for name in ("pause", "resume"):
        command(name, f"refused: {name} is not supported")
    command("features", "print what this runtime supports (JSON)", id=False)
    return p


class _Log:
    """runc's logger: --log FILE in --log-format; without --log, stderr (errors only go there anyway)."""

    def __init__(self, path: str | None, format: str, debug: bool):
        self.path = path
        self.format = format
        self.debug = debug

    def __call__(self, level: str, message: str) -> None:
        if level in ("debug", "info", "warning") and not (self.debug or self.path):
            return  # stderr is the container's own: notes only where asked for
        line = log_line(level, message, time=rfc3339(time.time()), format=self.format)
        if self.path:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
            except OSError:
                pass
        elif level == "error":
            pass  # the caller prints the one-line message itself
        else:
            sys.stderr.write(line)


_CALLER = os.getpid()  # the process whose call an interruption undoes


def _interrupted(number: int, _frame) -> NoReturn:
    if os.getpid() != _CALLER:
        # a forked child that inherited the handler (pyroute2's netns helper, which its parent ends
        # with SIGTERM): unwinding the caller's stack there would run create's clean-up twice
        os._exit(128 + number)
    raise RuntimeFailure(f"interrupted by {signal.Signals(number).name}")


def main(argv: Sequence[str] | None = None) -> int:
    args = None
    log = _Log(None, "text", False)
    try:
        args = parser().parse_args(argv)
        log = _Log(args.log, args.log_format, args.debug)
        # an engine's timeout or Ctrl-C: the call undoes what it did (create's cleanup), then fails
        global _CALLER
        _CALLER = os.getpid()
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, _interrupted)
        return _dispatch(args, log)
    except _UsageError as err:
        return _fail(str(err), log)
    except RuntimeFailure as err:
        return _fail(err.message, log, err.status)
    except Exception as err:  # noqa: BLE001 - the engine shows this line; --debug also logs the traceback
        from microvmc.errors import MicrovmcError

        if isinstance(err, MicrovmcError):
            return _fail("; ".join(err.lines()), log)
        if args is not None and args.debug:
            import traceback

            log("debug", traceback.format_exc())
        if isinstance(err, OSError):
            where = f": {err.filename}" if err.filename else ""
            return _fail(f"{err.strerror or err}{where}", log)
        return _fail(f"internal error: {type(err).__name__}: {err}", log)


def _fail(message: str, log: _Log, status: int = 1) -> int:
    log("error", message)
    try:
        print(message, file=sys.stderr)
    except (OSError, ValueError):
        pass
    return status


def _dispatch(args: argparse.Namespace, log: _Log) -> int:
    from microvmc.runtime.container import Runtime

    if args.command == "features":
        sys.stdout.write(json.dumps(features_document(), indent=2) + "\n")
        return 0
    if args.command in ("pause", "resume"):
        raise RuntimeFailure(f"{args.command} is not supported by microvmc-runtime: a microVM's program cannot be "
                             "frozen yet")
    runtime = Runtime(args.root, log)
    if args.command == "create":
        runtime.create(args.id, bundle=args.bundle, pid_file=args.pid_file, console_socket=args.console_socket)
    elif args.command == "run":
        return _run(runtime, args)
    elif args.command == "start":
        runtime.start(args.id)
    elif args.command == "state":
        sys.stdout.write(json.dumps(runtime.state(args.id), indent=2) + "\n")
    elif args.command == "kill":
        runtime.kill(args.id, parse_signal(args.signal))
    elif args.command == "delete":
        runtime.delete(args.id, force=args.force)
    elif args.command == "ps":
        pids = runtime.pids(args.id)
        sys.stdout.write(json.dumps(pids) + "\n" if args.format == "json" else "PID\n" + "".join(f"{p}\n" for p in pids))
    elif args.command == "exec":
        return _exec(runtime, args)
    return 0


def _exec(runtime, args: argparse.Namespace) -> int:
    process = None
    if args.process:
        try:
            with open(args.process, "rb") as f:
                process = json.load(f)
        except OSError as err:
            raise RuntimeFailure(f"--process {args.process}: {err.strerror}") from None
        except ValueError as err:
            raise RuntimeFailure(f"--process {args.process}: not JSON: {err}") from None
    elif not args.args:
        raise RuntimeFailure("exec: no command: give --process FILE or ID ARGV...")
    inline = {"args": args.args, "env": args.env, "cwd": args.cwd, "user": args.user, "tty": args.tty,
              "additional_gids": args.additional_gids}
    return runtime.exec(args.id, process, inline=inline, detach=args.detach, pid_file=args.pid_file,
                        console_socket=args.console_socket)


def _run(runtime, args: argparse.Namespace) -> int:
    """create + start; in the foreground, the program's status, and the container deleted."""
    runtime.create(args.id, bundle=args.bundle, pid_file=args.pid_file, console_socket=args.console_socket)
    try:
        runtime.start(args.id)
        if args.detach:
            return 0
        status = runtime.wait(args.id)
    except BaseException:
        runtime.delete(args.id, force=True)
        raise
    if not args.keep:
        runtime.delete(args.id, force=True)
    return status


def entry() -> NoReturn:
    try:
        status = main()
    except SystemExit as exit:  # --help, --version
        status = exit.code if isinstance(exit.code, int) else 0
    from microvmc._exit import exit_now

    exit_now(status)
