"""The command line. The only place that turns errors into messages and exit statuses.

Heavy libraries (jsonschema, networkx, elftools) are imported by the stages that need them, never
here, so `microvmc --help` and a cached build stay fast.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack, contextmanager

TYPE_CHECKING = False  # (not typing's: importing typing is ~3 ms of a `run` before QEMU starts)
if TYPE_CHECKING:
    import argparse
    from typing import NoReturn, Sequence

from microvmc import __version__
from microvmc.errors import EXIT_MEANINGS, ExitStatus, MicrovmcError

__all__ = ["main"]

EPILOG = "exit statuses:\n" + "".join(f"  {code:<10} {meaning}\n" for code, meaning in EXIT_MEANINGS)


def _global_options(*, defaults: bool) -> argparse.ArgumentParser:
    """The options taken before the command and after it (`microvmc -v run x`, `microvmc run -v x`).
    After it they have no defaults (SUPPRESS): a command's parser copies every value it has over the
    main parser's, so a default there would undo `--store D` given before the command."""
    import argparse

    options = argparse.ArgumentParser(add_help=False)
    unset = {} if defaults else {"default": argparse.SUPPRESS}
    options.add_argument("--debug", action="store_true", help="show tracebacks for errors", **unset)
    options.add_argument("-v", "--verbose", action="store_true", help="say what is decided and why", **unset)
    options.add_argument("--store", metavar="DIR", help="the store (default: $MICROVMC_STORE or ~/.cache/microvmc/store)",
                         **unset)
    options.add_argument("--state", metavar="DIR", help="where runs are kept (default: $XDG_STATE_HOME/microvmc)",
                         **unset)
    return options


class _Skipped:
    """What `_parser(only=...)` builds for the commands it leaves out: nothing."""

    def add_argument(self, *args, **kwargs) -> None:
        pass

    def add_subparsers(self, **kwargs) -> "_Skipped":
        return self

    def add_parser(self, *args, **kwargs) -> "_Skipped":
        return self


_SKIPPED = _Skipped()


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; `only`: with only that command's parser under it (the others'
    options are ~10 ms of argparse, which `run` pays before it starts QEMU)."""
    import argparse

    common = _global_options(defaults=False)  # the parent of every command's parser
    parser = argparse.ArgumentParser(
        prog="microvmc",
        description="Compile a TOML manifest into a QEMU microVM, and run a program in it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"microvmc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_parser(name: str, **kwargs):
        return sub.add_parser(name, **kwargs) if only is None or name == only else _SKIPPED

    def manifest_cmd(name: str, help: str, *, overrides: bool = False) -> argparse.ArgumentParser:
        p = add_parser(name, help=help, description=help, parents=[common], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("manifest", help="the manifest (TOML)")
        if overrides:
            p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                           help="set an environment variable of the program (repeatable)")
            p.add_argument("-p", "--publish", action="append", default=[], metavar="[ADDR:]HOSTPORT:GUESTPORT[/PROTO]",
                           help="forward a host port to the guest (repeatable; as docker's -p, but on 127.0.0.1 "
                                "unless ADDR is given); added to network.forwards")
            p.add_argument("--volume", action="append", default=[], metavar="HOST:GUEST[:ro]",
                           help="share a host directory or a single file at GUEST (repeatable; `-v` when its value "
                                "has a ':'; otherwise -v is --verbose)")
            p.add_argument("argv", nargs="*", metavar="-- ARGV", help="run this argv instead of process.argv")
        return p

    p = add_parser("validate", help="check manifests; report every problem, one per line", parents=[common])
    p.add_argument("manifests", nargs="+", metavar="manifest")
    p = manifest_cmd("build", "validate, resolve and write the launch script and plan into the store", overrides=True)
    p.add_argument("-o", "--out-link", default="result", metavar="PATH", help="symlink to the output (default: ./result)")
    p.add_argument("--no-link", action="store_true", help="do not create the symlink")
    p.add_argument("--locked", action="store_true", help="fail unless the lockfile exists and matches")
    p = manifest_cmd("plan", "print the QEMU argv, virtiofsd argv and kernel command line", overrides=True)
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p = manifest_cmd("graph", "print the resolved dependency graph (Graphviz dot)")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p = manifest_cmd("run", "build, boot the VM, run the program; exit with its status", overrides=True)
    p.add_argument("--locked", action="store_true", help="fail unless the lockfile exists and matches")
    p.add_argument("-d", "--detach", action="store_true",
                   help="run in the background: print the run's ID once the program has started")
    p.add_argument("--name", help="name the run (unique; default: a generated one)")
    p.add_argument("--rm", action="store_true", help="keep nothing of the run once it ends")
    p.add_argument("-t", "--tty", action="store_true", help="give the program a terminal (a pty in the guest)")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="keep stdin open (the default in the foreground; with -d: for `microvmc attach`)")
    p.add_argument("--log-max-size", metavar="SIZE",
                   help="-d: rotate stdout.log/stderr.log at this size (e.g. 512k, 16m; 0: never; default: logs.max_size)")
    p.add_argument("--log-max-files", metavar="N", type=int,
                   help="-d: keep this many files of each log, the current one included (default: logs.max_files)")

    def run_cmd(name: str, help: str, *, many: bool = True) -> argparse.ArgumentParser:
        p = add_parser(name, help=help, description=help, parents=[common], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
        if many:
            p.add_argument("runs", nargs="+", metavar="RUN", help="a run's name, ID or unique ID prefix")
        return p

    p = run_cmd("ps", "list runs (running ones; -a: all)", many=False)
    p.add_argument("-a", "--all", action="store_true", help="ended runs too")
    p.add_argument("-q", "--quiet", action="store_true", help="only IDs")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.add_argument("--no-trunc", action="store_true", help="full IDs and commands")
    p = run_cmd("logs", "print what a detached run's program wrote", many=False)
    p.add_argument("run", metavar="RUN")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the run ends")
    p.add_argument("--tail", type=int, default=-1, metavar="N", help="only the last N lines of each stream")
    p.add_argument("--stdout", action="store_true", help="only stdout")
    p.add_argument("--stderr", action="store_true", help="only stderr")
    run_cmd("inspect", "print runs as JSON: manifest, plan, state, status, timeline, pids, paths")
    p = run_cmd("stop", "stop runs: SIGTERM to the program, then (after -t seconds) the VM is stopped")
    p.add_argument("-t", "--time", type=float, metavar="SECS",
                   help="seconds the program gets (default: its resources.stop_timeout)")
    p = run_cmd("kill", "send a signal to a run's program")
    p.add_argument("-s", "--signal", default="KILL", metavar="SIG", help="a name (HUP, SIGTERM) or number (default KILL)")
    run_cmd("wait", "wait until runs end; print each one's status and exit with the last")
    p = run_cmd("rm", "remove runs that ended")
    p.add_argument("-f", "--force", action="store_true", help="stop a running one first")
    p = run_cmd("attach", "connect to a running run: its output from now on, its input (-i/-t runs), its "
                "terminal; exit with its status (Ctrl-P Ctrl-Q detaches from a terminal)", many=False)
    p.add_argument("--no-stdin", action="store_true", help="do not pass stdin on")
    p.add_argument("--sig-proxy", choices=("true", "false"), default="true",
                   help="pass SIGINT, SIGTERM and SIGHUP on to the program (default: true; never with a terminal)")
    p.add_argument("run", metavar="RUN")
    p = run_cmd("exec", "run a further process in a running run: own stdio and exit status", many=False)
    p.add_argument("-i", "--interactive", action="store_true", help="pass stdin (default: empty)")
    p.add_argument("-t", "--tty", action="store_true", help="give it a terminal (a pty in the guest)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set an environment variable (on top of the program's)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the guest")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]",
                   help="run as this user: a name or uid, and a group name or gid (from the run's /etc/passwd, /etc/group)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- ARGV")
    p = add_parser("pull", help="fetch an image from a registry into the store; print its digest", parents=[common])
    p.add_argument("reference", help="e.g. docker.io/library/alpine:3.20, 127.0.0.1:5000/tools/bbox@sha256:...")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="from a multi-platform image (default: linux/<host>)")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a registry that is not on loopback")
    p = add_parser("images", help="list the images the store holds", parents=[common])
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p = manifest_cmd("lock", "write the lockfile beside the manifest (app.toml -> app.lock): every input pinned")
    p.add_argument("--update", action="store_true", help="ask the registry again what each tag names")
    p = add_parser("gc", help="remove what no result link, lockfile or live run uses", parents=[common])
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p = add_parser("doctor", help="what this host can run (QEMU, virtiofsd, KVM, limits, cgroup) and what each "
                   "kernel here can and cannot do", parents=[common])
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p = add_parser("kernel", help="microvmc's own guest kernel: build it, show its config fragment",
                   parents=[common])
    ksub = p.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")
    k = ksub.add_parser("build", help="build the kernel (allnoconfig + kernel/requirements.py), print its directory",
                        parents=[common])
    k.add_argument("--source", metavar="PATH", help="a Linux source tarball or tree (default: "
                   "/usr/src/linux-source-6.1.tar.xz, Debian's linux-source-6.1)")
    k.add_argument("-j", "--jobs", type=int, default=2, metavar="N", help="parallel make jobs (default: 2)")
    k.add_argument("--force", action="store_true", help="build again even when the same build is there")
    ksub.add_parser("fragment", help="print the config fragment, each option with its reason", parents=[common])
    return parser


def _env_overrides(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise MicrovmcError(f"-e {item!r}: expected KEY=VALUE", status=ExitStatus.USAGE)
        env[name] = value
    return env


def _compile(args: argparse.Namespace, *, overrides: bool = True):
    """plan and graph: compiled, with the manifest's image fetched and unpacked as a build would."""
    from microvmc.backends.host import probe_host
    from microvmc.backends.outputs import compile_with_image
    from microvmc.backends.progress import terminal_progress

    compiled, _, _ = compile_with_image(
        args.manifest,
        argv=getattr(args, "argv", None) if overrides else None,
        env=_env_overrides(getattr(args, "env", [])) if overrides else None,
        publish=getattr(args, "publish", []) if overrides else (),
        volumes=getattr(args, "volume", []) if overrides else (),
        store=_store(args), facts=probe_host(), progress=terminal_progress(),
    )
    return compiled


def _cmd_validate(args: argparse.Namespace) -> int:
    from microvmc.compiler.load import load
    from microvmc.compiler.manifest import validate
    from microvmc.errors import ManifestError

    status = 0
    for path in args.manifests:
        try:
            validate(load(path))
        except ManifestError as err:
            for line in err.lines():
                print(line, file=sys.stderr)
            status = int(ExitStatus.INVALID)
        else:
            print(f"{path}: valid")
    return status


def _built(args: argparse.Namespace):
    """(output path, plan) of the manifest: from the evaluation cache, or compiled and built."""
    from microvmc.backends.outputs import build
    from microvmc.backends.progress import terminal_progress

    return build(args.manifest, **_build_options(args), progress=terminal_progress())


def _build_options(args: argparse.Namespace) -> dict:
    """What `build` and the evaluation cache take from a build's or a run's command line."""
    from microvmc.backends.host import probe_host

    return dict(argv=args.argv, env=_env_overrides(args.env), store=_store(args), facts=probe_host(),
                locked=args.locked, tty=getattr(args, "tty", False), publish=args.publish, volumes=args.volume)


def _store(args: argparse.Namespace) -> str:
    from microvmc.compiler.store import default_store_root

    return os.path.abspath(args.store) if args.store else str(default_store_root())


def _cmd_pull(args: argparse.Namespace) -> int:
    from microvmc.backends.images import pull
    from microvmc.backends.progress import terminal_progress
    from microvmc.compiler.ociimage import ImageError, parse_platform

    try:
        platform = parse_platform(args.platform) if args.platform else None
        pulled = pull(args.reference, store=_store(args), platform=platform, insecure=args.insecure,
                      progress=terminal_progress())
    except ImageError as err:
        raise MicrovmcError(str(err)) from None
    if args.verbose:
        print(f"microvmc: {pulled.reference} for {pulled.platform}: manifest {pulled.manifest}", file=sys.stderr)
    print(pulled.digest)
    return 0


def _cmd_images(args: argparse.Namespace) -> int:
    from microvmc.backends.images import list_images

    found = list_images(_store(args))
    if args.json:
        import json

        sys.stdout.write(json.dumps(found, indent=2, sort_keys=True) + "\n")
        return 0
    rows = [("SOURCE", "DIGEST", "PLATFORM", "SIZE", "LAST USED")]
    for image in found:
        size = f"{image['size'] / 1e6:.1f} MB" + ("" if image["present"] else " (blobs missing)")
        rows.append((image["source"], image["digest"][:19], image["platform"], size, image["last_used"] or "never"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _cmd_lock(args: argparse.Namespace) -> int:
    from microvmc.backends.gc import register_root
    from microvmc.backends.host import probe_host
    from microvmc.backends.outputs import compile_with_image, display
    from microvmc.backends.progress import terminal_progress
    from microvmc.compiler import lockfile

    facts = probe_host()
    compiled, image, path = compile_with_image(args.manifest, argv=None, env=None, store=_store(args), facts=facts,
                                               update=args.update, progress=terminal_progress())
    text = lockfile.render(lockfile.from_graph(compiled.graph, facts, image))
    try:
        old = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        old = None
    if old != text:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    register_root(_store(args), path)
    print(f"{display(path)}: {'unchanged' if old == text else 'written'}", file=sys.stderr)
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from microvmc.backends.gc import collect

    done = collect(_store(args), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    if args.verbose or args.dry_run:
        for path in done.removed_paths:
            print(f"{verb} {path}", file=sys.stderr)
        for digest in done.removed_blobs:
            print(f"{verb} blob {digest}", file=sys.stderr)
        for source in done.removed_records:
            print(f"{verb} image record {source}", file=sys.stderr)
    print(f"{verb} {len(done.removed_paths)} store paths, {len(done.removed_blobs)} blobs, "
          f"{len(done.removed_records)} image records: {done.freed / 1e6:.1f} MB; kept {len(done.kept)} store paths")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from microvmc.backends.outputs import link_result

    from microvmc.backends.gc import register_root

    out, _ = _built(args)
    if not args.no_link:
        link_result(out, args.out_link)
        register_root(_store(args), args.out_link)
    print(out)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import shlex

    from microvmc.backends.build import realised
    from microvmc.compiler.emit import to_json
    from microvmc.compiler.graph import Builder

    compiled = _compile(args)
    plan = compiled.plan
    if args.json:
        sys.stdout.write(to_json(plan.to_dict()))
        return 0
    print("# virtiofsd")
    for v in plan.virtiofsd:
        print(shlex.join(v.argv_with_socket_path("<run-dir>")))
    print("# qemu")
    print(" \\\n    ".join(shlex.join(g.args) for g in plan.qemu))
    print("# kernel command line" + (" (guest configuration spilled to /microvmc/config)" if plan.spilled else ""))
    print(plan.cmdline)
    kernel = compiled.graph.node("kernel")
    if kernel.builder is Builder.KERNEL and not realised(compiled.graph)["kernel"]:
        print(f"# the kernel {kernel.path} is not built yet: `microvmc build` builds it (minutes), "
              "or `microvmc kernel build`")
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from microvmc.compiler.emit import to_json

    from microvmc.backends.build import realised

    graph = _compile(args, overrides=False).graph
    made = realised(graph)  # what the build would still make: the own kernel too
    sys.stdout.write(to_json(graph.to_dict(made)) if args.json else graph.to_dot(made))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from microvmc import lifecycle

    if args.tty and not args.detach and not os.isatty(0):
        raise MicrovmcError("-t: stdin is not a terminal", status=ExitStatus.USAGE)
    size = None if args.log_max_size is None else lifecycle.parse_size(args.log_max_size, "--log-max-size")
    # the bounds of logs.max_size and logs.max_files, which these override: the schema's
    lifecycle.check_bounds(size, ("logs", "max_size"), f"--log-max-size {args.log_max_size}")
    lifecycle.check_bounds(args.log_max_files, ("logs", "max_files"), f"--log-max-files {args.log_max_files}")
    store = lifecycle.store_of(args)
    if args.name is not None:
        store.check_name(args.name)  # before a build that may take minutes
    hit = None
    if not args.detach and not args.tty and not os.isatty(0):
        from microvmc.backends.outputs import cached
        from microvmc.backends.qemu import startable

        hit = cached(args.manifest, **_build_options(args))
        if hit is not None and startable(hit[1]):
            return _run_started(args, store, *hit)
    if hit is not None:
        from microvmc.compiler.launch import LaunchPlan

        out, plan = hit[0], LaunchPlan.from_dict(hit[1])
    else:
        out, plan = _built(args)
    from microvmc.backends import terminal
    from microvmc.backends.monitor import LogLimits, run_plan, start_detached

    limits = LogLimits(max_size=plan.log_max_size if size is None else size,
                       max_files=plan.log_max_files if args.log_max_files is None else args.log_max_files)
    manifest = os.path.abspath(args.manifest)
    run = store.create(plan.to_dict(), name=args.name, manifest=manifest, command=_program_argv(args, plan), output=out,
                       accel=plan.accel, foreground=not args.detach, named=args.name is not None, remove=args.rm,
                       tty=args.tty, stdin_open=args.interactive or args.tty or not args.detach)
    if args.verbose:
        print(f"microvmc: build output {out}", file=sys.stderr)
    if args.detach:
        try:
            start_detached(plan, run, log_limits=limits, keep_stdin=args.interactive or args.tty, tty=args.tty)
        finally:
            run.release()
        print(run.id)
        return 0
    with _foreground(store, run, remove=args.rm) as stack:
        if args.tty:
            stack.enter_context(terminal.raw(0))
        return run_plan(plan, log_dir=run.dir, verbose=args.verbose, booting=store.prune, run=run,
                        terminal=0 if args.tty else None)


@contextmanager
def _foreground(store, run, *, remove: bool):
    """A foreground run's record around the block that runs it (given an ExitStack, for what the run
    needs undone): an error that ends the run marks it exited with the error's status and message;
    then the record is released and, with --rm, removed."""
    with ExitStack() as stack:
        if remove:  # (callbacks run last first: the lock is released, then the run removed)
            stack.callback(store.remove, run)
        stack.callback(run.release)
        try:
            yield stack
        except MicrovmcError as err:
            run.update(state="exited", status=int(err.status), message=err.message)
            raise


def _run_started(args: argparse.Namespace, store, out: str, plan_json: dict) -> int:
    """A foreground run of a cached build, stdin no terminal: QEMU is started from the plan's JSON
    form first, and what the run needs only once the guest is up (the plan's types, supervision,
    the monitor, the verdict) is imported while it boots. The signals are caught from the start:
    one that comes in between stops the VM as soon as supervision begins, as during a boot."""
    import time

    from microvmc.backends import qemu
    from microvmc.backends._signals import STOP_SIGNALS, signals_caught

    began = time.monotonic()
    with signals_caught(STOP_SIGNALS) as signals:
        # the command `ps` shows is written once the plan's types are in (_program_argv)
        run = store.create(plan_json, name=args.name, manifest=os.path.abspath(args.manifest), output=out,
                           accel=plan_json["accel"], foreground=True, named=args.name is not None, remove=args.rm,
                           tty=False, stdin_open=True)
        with _foreground(store, run, remove=args.rm) as stack:
            rundir = run.dir / "vm"
            rundir.mkdir(mode=0o700, exist_ok=True)
            stack.callback(_remove_tree, rundir)
            stdin, _ = stack.enter_context(qemu.program_stdin(0, False))
            started = qemu.start(plan_json, logs=qemu.RunLogs(run.dir), stdin=stdin, rundir=rundir)
            stack.callback(started.close)  # (serve stops it first, before the verdict)
            from microvmc.backends.monitor import run_plan
            from microvmc.compiler.launch import LaunchPlan

            plan = LaunchPlan.from_dict(plan_json)
            run.update(command=list(_program_argv(args, plan)))
            if args.verbose:
                print(f"microvmc: build output {out}", file=sys.stderr)
            return run_plan(plan, log_dir=run.dir, verbose=args.verbose, booting=store.prune, run=run,
                            started=started, signals=signals, began=began)


def _remove_tree(path) -> None:
    import shutil  # (imported by the supervision by then: ~2.5 ms of a `run` before QEMU starts)

    shutil.rmtree(path, ignore_errors=True)


def _program_argv(args: argparse.Namespace, plan) -> tuple[str, ...]:
    """What `ps` shows as the run's command: the plan's (from its kernel command line); the manifest's
    when the configuration spilled into the initramfs."""
    from microvmc.compiler.launch import program_process

    argv = program_process(plan.cmdline).argv or tuple(args.argv or ())
    if argv:
        return argv
    from microvmc.compiler.load import load

    try:
        argv = (load(args.manifest).data.get("process") or {}).get("argv") or ()
    except MicrovmcError:
        return ()
    return tuple(str(a) for a in argv) if isinstance(argv, list) else ()


def _lifecycle(name: str):
    def command(args: argparse.Namespace) -> int:
        from microvmc import lifecycle

        return getattr(lifecycle, f"cmd_{name}")(args)

    return command


def _kernels_dir() -> str:
    """Where the guest kernels are: the default kernel's directory's parent."""
    from microvmc.backends.host import default_kernel_dir

    return os.path.dirname(os.path.normpath(default_kernel_dir(os.environ)))


def _cmd_kernel(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.kernel_command == "fragment":
        from microvmc.kernel.requirements import fragment

        sys.stdout.write(fragment())
        return 0
    from microvmc.backends.kernelbuild import DEFAULT_SOURCE, build_kernel

    if args.jobs < 1:
        raise MicrovmcError(f"--jobs {args.jobs}: expected 1 or more", status=ExitStatus.USAGE)
    built = build_kernel(Path(_kernels_dir()), Path(args.source or DEFAULT_SOURCE), jobs=args.jobs, force=args.force)
    if args.verbose and built.cached:
        print(f"microvmc: kernel {built.release} was built already", file=sys.stderr)
    print(built.path)
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from microvmc.backends.doctor import diagnose, render
    from microvmc.backends.host import probe_host

    report = diagnose(probe_host())
    sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n" if args.json else render(report))
    return 0


COMMANDS = {
    "doctor": _cmd_doctor,
    "kernel": _cmd_kernel,
    "validate": _cmd_validate,
    "build": _cmd_build,
    "plan": _cmd_plan,
    "graph": _cmd_graph,
    "run": _cmd_run,
    "pull": _cmd_pull,
    "images": _cmd_images,
    "lock": _cmd_lock,
    "gc": _cmd_gc,
    **{verb: _lifecycle(verb) for verb in ("ps", "logs", "inspect", "stop", "kill", "wait", "rm", "attach", "exec")},
}


def _standard_fds_open() -> None:
    """A closed stdin, stdout or stderr becomes /dev/null: otherwise the next pipe or file microvmc
    opens would take its number, and the program's output would go into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _simple_run(words: Sequence[str]):
    """What the parser makes of `run MANIFEST` (then maybe `-- ARGV`), the commonest command line,
    without building it (~5 ms that `run` pays before it starts QEMU); None for any other.
    tests/test_cli.py holds it to the parser's answer."""
    if len(words) != 2 or words[0] != "run" or not words[1] or words[1].startswith("-"):
        return None
    from types import SimpleNamespace  # (argparse's Namespace is ~2 ms of import)

    return SimpleNamespace(debug=False, verbose=False, store=None, state=None, command="run", manifest=words[1],
                              env=[], publish=[], volume=[], argv=[], locked=False, detach=False, name=None, rm=False,
                              tty=False, interactive=False, log_max_size=None, log_max_files=None)


def _command_at(words: Sequence[str]) -> int | None:
    """Where the command is when only global options, written in full, come before it: then argparse
    takes the same word for the command, and a parser with that command alone parses alike."""
    i = 0
    while i < len(words):
        word = words[i]
        if word in COMMANDS:
            return i
        if word in ("--store", "--state"):
            i += 2
        elif word in ("--debug", "-v", "--verbose") or word.startswith(("--store=", "--state=")):
            i += 1
        else:
            return None  # -h, --version, an abbreviation, ...: the whole parser
    return None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """argparse, except that everything after the first `--` is the program's argv, wherever the
    options are (`run app.toml -e K=V -- prog -x`: argparse alone cannot take options between the
    manifest and `--`)."""
    words = list(sys.argv[1:] if argv is None else argv)
    program = None
    if "--" in words:
        cut = words.index("--")
        words, program = words[:cut], words[cut + 1:]
    simple = _simple_run(words)
    if simple is not None:
        if program is not None:
            simple.argv = program
        return simple
    at = _command_at(words)
    parser = _parser(only=None if at is None else words[at])
    # After run, build or plan, `-v HOST:GUEST` is docker's volume; any other -v stays --verbose
    # (`run -v app.toml`, `microvmc -v run ...`, an exec's own argv).
    command = next((i for i, w in enumerate(words) if w in COMMANDS), len(words))
    if words[command:command + 1] in (["run"], ["build"], ["plan"]):
        words = ["--volume" if i > command and w == "-v" and i + 1 < len(words) and ":" in words[i + 1] else w
                 for i, w in enumerate(words)]
    args = parser.parse_args(words)
    if program is not None:
        if not hasattr(args, "argv"):
            parser.error(f"{args.command} takes no program argv ('--')")
        if args.argv:
            parser.error(f"the program's argv is both before and after '--': {args.argv[0]!r}")
        args.argv = program
    return args


def main(argv: Sequence[str] | None = None) -> int:
    _standard_fds_open()
    args = _parse(argv)
    try:
        return COMMANDS[args.command](args)
    except MicrovmcError as err:
        if args.debug:
            raise
        from microvmc.errors import ManifestError

        # A manifest problem already starts with its file name; anything else is microvmc's.
        prefix = "" if isinstance(err, ManifestError) else "microvmc: "
        for line in err.lines():
            print(prefix + line, file=sys.stderr)
        return int(err.status)
    except KeyboardInterrupt:
        return int(ExitStatus.INTERRUPTED)
    except BrokenPipeError:
        # Our stdout was closed (e.g. `microvmc plan x.toml | head -1`): not an error of ours.
        # (Before OSError, of which it is one: it said "microvmc: Broken pipe", 125.)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        # The store or state directory cannot be written, a file vanished mid-build, ...
        if args.debug:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"microvmc: {err.strerror or err}{where}", file=sys.stderr)
        return int(ExitStatus.INVALID)


def entry() -> NoReturn:
    """The `microvmc` command: main(), then exit without the interpreter's teardown, which would
    add ~8 ms of garbage collection and module cleanup to every run. By then main() has stopped
    everything it started and closed its files; only the standard streams need flushing."""
    try:
        status = main()
    except SystemExit as exit:  # argparse: --help, usage errors
        if not isinstance(exit.code, (int, type(None))):
            raise
        status = exit.code or 0
    from microvmc._exit import exit_now

    exit_now(status)
