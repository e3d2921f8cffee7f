"""The runtime's verbs on one container, on top of microvmc's run store and monitor.

    engine ──runc's CLI──▶ microvmc-runtime create ──▶ config.json → Manifest (compiler/oci.py)
                                                   ──▶ compile, build, stage single files
                                                   ──▶ a monitor (backends/monitor.py), VM held
           ◀── pid file: the monitor, which exits with the program's status
           start / state / kill / exec / delete ──▶ the monitor's control socket

A container is a run (backends/runstore.py) under the runtime's --root, its id the engine's
container id verbatim. Its directory also holds `files/`, where single-file bind mounts are staged
(backends/oci.py), and `netns`, the network namespace the runtime made when config.json asked for a
new one (docker, ctr; backends/netns.py). Nothing else is kept anywhere: `delete` removes the lot, whatever state the
container is in, and a call that was itself killed leaves nothing a later `delete` cannot remove.

Terminals: with `process.terminal` the runtime makes a pty, sends its master to the engine over
--console-socket and gives the slave (raw: the guest's own pty does the line discipline) to the
monitor as the program's stdio. The slave becomes the monitor's controlling terminal, so the
engine's resize of the master reaches the monitor as SIGWINCH, and the guest's pty follows.

The network: the monitor (the container's pid) lives in the container's network namespace, so
/proc/<pid>/ns/net is it. create runs the prestart and createRuntime hooks (backends/hooks.py) with
a process in that namespace as the state's pid (docker's libnetwork-setkey moves the veth into
/proc/<pid>/ns/net), then observes the interface they left there; start runs poststart hooks,
delete poststop hooks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from microvmc.backends.runstore import Run, RunStore
from microvmc.errors import MicrovmcError
from microvmc.runtime.state import NOT_EXIST, NOT_RUNNING, RuntimeFailure, hook_state, rfc3339, state_document

__all__ = ["Runtime", "DEFAULT_ROOT"]

DEFAULT_ROOT = "/run/microvmc-runtime"  # runc's is /run/runc
STOP_WAIT = 30.0  # seconds delete waits for a stopped VM's monitor to end before SIGKILL
START_WAIT = 60.0  # seconds start waits for the program to be reported running
DEFAULT_SIZE = (24, 80)
FILES = "files"  # the run directory's staging directory
NETNS = "netns"  # the run directory's network namespace, when the runtime made it
EXEC_EXIT_GRACE = 1.0  # seconds a detached exec's process lives at least, once its pid file is written


def default_root() -> str:
    if os.geteuid() == 0:
        return DEFAULT_ROOT
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/microvmc-runtime-{os.getuid()}"
    return os.path.join(base, "microvmc-runtime")


class Runtime:
    """The verbs, over the containers under one --root. `log(level, message)` writes the --log file."""

    def __init__(self, root: str | None, log: Callable[[str, str], None]):
        self.store = RunStore(Path(os.path.abspath(root or default_root())))
        self.log = log

    # --- finding containers ---

    def _run(self, container_id: str) -> Run:
        path = self.store.root / container_id
        if "/" in container_id or container_id in ("", ".", "..") or not (path / "record.json").is_file():
            raise RuntimeFailure(NOT_EXIST)
        return Run(path)

    def _live(self, run: Run) -> dict[str, Any]:
        from microvmc.backends.monitor import Client

        return Client(run).state()

    # --- create, start ---

    def create(self, container_id: str, *, bundle: str | None, pid_file: str | None, console_socket: str | None,
               stdio: tuple[int, int, int] = (0, 1, 2)) -> int:
        """The VM boots with the program held; returns the monitor's pid (also in `pid_file`)."""
        from microvmc.backends.oci import stage_files, write_pid_file
        from microvmc.compiler.oci import container_manifest, valid_container_id

        if not valid_container_id(container_id):
            raise RuntimeFailure(f"invalid container id format: {container_id}")
        bundle = os.path.abspath(bundle or os.getcwd())
        config = _read_config(bundle)
        if (self.store.root / container_id).exists():
            raise RuntimeFailure("container with given ID already exists")
        staging = self.store.root / container_id / FILES
        try:
            container = container_manifest(config, bundle=bundle, container_id=container_id, staging=str(staging))
        except MicrovmcError as err:
            raise RuntimeFailure("; ".join(err.lines())) from None
        for note in container.notes:
            self.log("warning", note)
        process = container.process
        if process.terminal and not console_socket:
            raise RuntimeFailure("cannot allocate tty if runc will detach without setting console socket")
        oci = {"ociVersion": config.get("ociVersion"), "bundle": bundle, "rootfs": container.manifest.image.path,
               "created": rfc3339(time.time()), "annotations": config.get("annotations") or {},
               "process": config.get("process"), "notes": list(container.notes),
               "hooks": container.hooks.to_dict()}
        try:
            run = self.store.create({}, name=container_id, id=container_id, command=process.argv,
                                    manifest=os.path.join(bundle, "config.json"), oci=oci)
        except MicrovmcError:
            raise RuntimeFailure("container with given ID already exists") from None
        with ExitStack() as stack:
            stack.callback(run.release)
            try:
                container, namespace = self._network_namespace(container, run)
                self._create_hooks(container, run, oci, namespace)
                if namespace:
                    container = self._on_namespace_network(container, namespace)
                for note in stage_files(container.staged, staging):
                    self.log("info", note)
                plan = _build(container.manifest)
                run.update(plan=plan.to_dict(), accel=plan.accel)
                terminal = None
                if process.terminal:
                    terminal = stack.enter_context(_console(console_socket, process.console_size))
                    stdio = (terminal, terminal, terminal)
                pid = _start_monitor(plan, run, stdio=stdio, terminal=terminal, netns=namespace)
                if pid_file:
                    write_pid_file(pid_file, pid)
            except BaseException:
                run.release()
                self._destroy(run)
                raise
        return pid

    def _network_namespace(self, container, run: Run):
        """The container's network namespace: the engine's (a path in config.json), or one made now
        in the run directory (no path), or none (the host's network: the VM's is user-mode, as the
        compiler made it). A path that is the host's own namespace (docker's `--network host`
        names it) is the host's network too: its interfaces are never taken over."""
        from microvmc.backends.netns import NetnsError, new_namespace, same_namespace
        from microvmc.compiler.manifest import Network, NetworkMode
        from microvmc.compiler.oci import ContainerNetwork

        if container.network is ContainerNetwork.HOST:
            return container, None
        if container.network is ContainerNetwork.NAMESPACE:
            path = container.network_namespace
            if not same_namespace(path, "/proc/self/ns/net"):
                return container, path
            self.log("info", f"the network namespace {path} is the host's: the VM gets QEMU's user-mode network")
            user = replace(container.manifest, network=Network(mode=NetworkMode.USER))
            return replace(container, manifest=user), None
        path = str(run.dir / NETNS)
        try:
            new_namespace(path)
        except NetnsError as err:
            raise RuntimeFailure(f"the container's network: {err.message}") from None
        return container, path

    def _create_hooks(self, container, run: Run, oci: dict[str, Any], namespace: str | None) -> None:
        """prestart then createRuntime hooks (runc's order), on the host; the state's pid is a process
        in the container's network namespace (there is no container process before the VM)."""
        from microvmc.backends.hooks import HookFailure, run_hooks
        from microvmc.backends.netns import holder

        hooks = container.hooks
        if not hooks.prestart and not hooks.create_runtime:
            return
        with ExitStack() as stack:
            pid = stack.enter_context(holder(namespace)) if namespace else os.getpid()
            state = hook_state(run.id, oci, "creating", pid)
            try:
                run_hooks("prestart", hooks.prestart, state, cwd=oci["bundle"])
                run_hooks("createRuntime", hooks.create_runtime, state, cwd=oci["bundle"])
            except HookFailure as failure:
                raise RuntimeFailure(failure.message) from None

    def _on_namespace_network(self, container, namespace: str):
        """The container's network namespace (podman's, CNI: config.json gives its path; or the
        runtime's own, which docker's hook has wired): the VM takes over its interface, observed now
        (backends/netns.py); without an IPv4 address and a default route (`--network none`: only
        lo) the VM has no network device."""
        from microvmc.backends.netns import namespace_network

        try:
            network, why = namespace_network(namespace)
        except MicrovmcError as err:
            raise RuntimeFailure(f"the container's network: {err.message}") from None
        if network is None:
            self.log("info", f"{why}: the VM has no network device")
            return container
        return replace(container, manifest=replace(container.manifest, network=network))

    def start(self, container_id: str) -> None:
        from microvmc.backends.monitor import Client

        run = self._run(container_id)
        state = self._live(run)["state"]
        if state == "stopped":
            raise RuntimeFailure("cannot start a container that has stopped")
        if state == "running":
            raise RuntimeFailure("cannot start an already running container")
        try:
            started = Client(run).start()
        except MicrovmcError as err:
            raise RuntimeFailure(f"cannot start container {container_id}: {err.message}") from None
        if not started:
            raise RuntimeFailure(f"cannot start container {container_id}: it is {self._live(run)['state']}")
        deadline = time.monotonic() + START_WAIT
        while (live := self._live(run))["state"] == "created" and time.monotonic() < deadline:
            time.sleep(0.02)  # the guest says when the program runs: then `state` says running
        self._hooks(run, "poststart", "running", live.get("pid") or 0)

    def _hooks(self, run: Run, kind: str, status: str, pid: int, record: dict[str, Any] | None = None) -> None:
        """poststart, poststop: a failure is a warning, the rest still run (runtime spec)."""
        from microvmc.backends.hooks import run_hooks
        from microvmc.compiler.oci import Hooks

        oci = (record or run.record(fresh=True)).get("oci") or {}
        hooks = Hooks.from_dict(oci.get("hooks") or {}).of(kind)
        if hooks:
            run_hooks(kind, hooks, hook_state(run.id, oci, status, pid), cwd=oci.get("bundle") or "/",
                      warn=lambda message: self.log("warning", message))

    def wait(self, container_id: str) -> int:
        from microvmc.backends.monitor import Client

        try:
            return Client(self._run(container_id)).wait()[0]
        except MicrovmcError as err:
            raise RuntimeFailure(err.message) from None

    # --- state, ps ---

    def state(self, container_id: str) -> dict[str, Any]:
        run = self._run(container_id)
        live = self._live(run)
        return state_document(container_id, run.record(fresh=True), live)

    def pids(self, container_id: str) -> list[int]:
        """The host processes of the container: its monitor (the guest's are the VM's own)."""
        live = self._live(self._run(container_id))
        return [live["pid"]] if live["state"] != "stopped" and live.get("pid") else []

    # --- kill, delete ---

    def kill(self, container_id: str, number: int) -> None:
        """To the program; a held program has not run, so its VM is stopped (as runc kills its init)."""
        from microvmc.backends.monitor import Client

        run = self._run(container_id)
        state = self._live(run)["state"]
        if state == "stopped":
            raise RuntimeFailure(NOT_RUNNING)
        try:
            if state == "created":
                Client(run).stop(0)
            elif not Client(run).signal(number):
                raise RuntimeFailure(NOT_RUNNING)
        except MicrovmcError:
            raise RuntimeFailure(NOT_RUNNING) from None

    def delete(self, container_id: str, *, force: bool) -> None:
        path = self.store.root / container_id
        try:
            run = self._run(container_id)
        except RuntimeFailure:
            # an interrupted create or delete: whatever of it is there goes
            for leftover in (path, self.store.root / f".new-{container_id}", self.store.root / f".rm-{container_id}"):
                if "/" not in container_id and container_id not in ("", ".", "..") and leftover.exists():
                    self._remove_namespace(leftover)
                    _remove_tree(leftover)
            if force:
                return
            raise
        if not force and self._live(run)["state"] == "running":
            raise RuntimeFailure(f"cannot delete container {container_id} that is not stopped: running")
        self._destroy(run)

    def _destroy(self, run: Run) -> None:
        """Stop the VM if it runs, then remove everything of the container; then its poststop hooks."""
        from microvmc.backends.monitor import Client
        from microvmc.backends.oci import unstage

        record = run.record(fresh=True)

        if run.alive():
            try:
                Client(run).stop(0)
            except MicrovmcError:
                pass  # it ended meanwhile
            deadline = time.monotonic() + STOP_WAIT
            while run.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if run.alive():
                pid = (run.record(fresh=True).get("pids") or {}).get("monitor")
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)  # QEMU and the virtiofsds die with it
                    except ProcessLookupError:
                        pass
                while run.alive() and time.monotonic() < deadline + STOP_WAIT:
                    time.sleep(0.02)
        unstage(run.dir / FILES)
        self._remove_namespace(run.dir)
        self.store.remove(run)
        self._hooks(run, "poststop", "stopped", 0, record)

    def _remove_namespace(self, directory: Path) -> None:
        from microvmc.backends.netns import NetnsError, remove_namespace

        try:
            remove_namespace(str(directory / NETNS))
        except NetnsError as err:  # reported, and the rest still goes
            self.log("error", err.message)

    # --- exec ---

    def exec(self, container_id: str, process: dict[str, Any] | None, *, inline: dict[str, Any] | None = None,
             detach: bool, pid_file: str | None, console_socket: str | None,
             stdio: tuple[int, int, int] = (0, 1, 2)) -> int:
        """A further process in the VM: its status (0 when detached: the pid file's process has it)."""
        from microvmc.compiler.oci import exec_process

        run = self._run(container_id)
        state = self._live(run)["state"]
        if state == "stopped":
            raise RuntimeFailure("cannot exec in a stopped container")
        if process is None:
            process = _inline_process(run.record().get("oci", {}).get("process") or {}, inline or {})
        try:
            spec = exec_process(process, file="process.json")
        except MicrovmcError as err:
            raise RuntimeFailure("; ".join(err.lines())) from None
        if spec.terminal and not console_socket and (detach or not os.isatty(0)):
            raise RuntimeFailure("cannot allocate tty if runc will detach without setting console socket")
        from microvmc.compiler.launch import ProcessSpec

        request = ProcessSpec(argv=spec.argv, env=spec.env, cwd=spec.cwd, user=spec.user, rlimits=spec.rlimits,
                              tty=(spec.console_size or DEFAULT_SIZE) if spec.terminal else None)
        with ExitStack() as stack:
            terminal = None
            if spec.terminal and console_socket:
                terminal = stack.enter_context(_console(console_socket, spec.console_size))
                stdio = (terminal, terminal, terminal)
            elif spec.terminal:
                from microvmc.backends import terminal as host_terminal

                terminal = 0
                request = replace(request, tty=host_terminal.size(0))
                stack.enter_context(host_terminal.raw(0))
            if detach:
                pid = _exec_detached(run, request, stdio, terminal)
                if pid_file:
                    from microvmc.backends.oci import write_pid_file

                    write_pid_file(pid_file, pid)
                return 0
            return _exec_here(run, request, stdio, terminal)


# --- helpers ----------------------------------------------------------------------------------


def _read_config(bundle: str) -> dict[str, Any]:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RuntimeFailure(f"{path}: no such file: the bundle has no config.json") from None
    except OSError as err:
        raise RuntimeFailure(f"{path}: {err.strerror}") from None
    except ValueError as err:
        raise RuntimeFailure(f"{path}: not JSON: {err}") from None
    if not isinstance(data, dict):
        raise RuntimeFailure(f"{path}: not a JSON object")
    return data


def _build(manifest):
    """The container's plan, the program held until `start`; what it needs built into the store."""
    from microvmc.backends.build import realize
    from microvmc.backends.host import probe_host
    from microvmc.compiler.pipeline import compile_manifest
    from microvmc.compiler.store import default_store_root

    compiled = compile_manifest(manifest, facts=probe_host(), store=str(default_store_root()), hold=True)
    realize(compiled)
    return compiled.plan


def _start_monitor(plan, run: Run, *, stdio: tuple[int, int, int], terminal: int | None, netns: str | None) -> int:
    from microvmc.backends.monitor import start_detached

    return start_detached(plan, run, hold=True, stdio=stdio, terminal=terminal, netns=netns)


class _console:
    """A pty whose master goes to the engine over its console socket (SCM_RIGHTS, the name as the
    message, as runc sends it); yields the slave, raw and of the size asked for, closed on exit."""

    def __init__(self, path: str, size: tuple[int, int] | None):
        self.path = path
        self.size = size or DEFAULT_SIZE

    def __enter__(self) -> int:
        import tty

        from microvmc.backends.terminal import set_size

        master, slave = os.openpty()
        try:
            os.set_inheritable(slave, False)
            tty.setraw(slave)
            set_size(slave, *self.size)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.path)
                socket.send_fds(sock, [os.ttyname(slave).encode()], [master])
        except OSError as err:
            os.close(slave)
            raise RuntimeFailure(f"console socket {self.path}: {err.strerror or err}") from None
        finally:
            os.close(master)
        self.slave = slave
        return slave

    def __exit__(self, *exc) -> None:
        os.close(self.slave)


def _inline_process(base: dict[str, Any], inline: dict[str, Any]) -> dict[str, Any]:
    """`exec ID ARGV...` with -e/--cwd/-u/-t: the container's process with those changes, as runc."""
    process = dict(base)
    process["args"] = list(inline.get("args") or ())
    process["terminal"] = bool(inline.get("tty"))
    process.pop("consoleSize", None)
    if inline.get("env"):
        process["env"] = [*(base.get("env") or ()), *inline["env"]]
    if inline.get("cwd"):
        process["cwd"] = inline["cwd"]
    if inline.get("user"):
        uid, _, gid = inline["user"].partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise RuntimeFailure(f"--user {inline['user']!r}: expected UID or UID:GID (numbers)")
        user = {"uid": int(uid), "gid": int(gid or 0)}
        if inline.get("additional_gids"):
            user["additionalGids"] = [int(g) for g in inline["additional_gids"]]
        process["user"] = user
    return process


EXEC_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _exec_here(run: Run, request, stdio: tuple[int, int, int], terminal: int | None,
               started: Callable[[], None] | None = None) -> int:
    """The process in the VM, with `stdio`; signals this process gets are passed on; its status."""
    from microvmc.backends.monitor import Client
    from microvmc.backends.supervise import signals_caught

    numbers = EXEC_SIGNALS + ((signal.SIGWINCH,) if terminal is not None else ())
    with signals_caught(numbers) as signals:
        try:
            status, message = Client(run).exec(request, *stdio, signals=signals, terminal=terminal, started=started)
        except MicrovmcError as err:
            raise RuntimeFailure(err.message) from None
    if message and status:
        print(f"microvmc-runtime: {message}", file=sys.stderr)
    return status


def _exec_detached(run: Run, request, stdio: tuple[int, int, int], terminal: int | None) -> int:
    """A process of its own, in a session of its own (so the engine's subreaper adopts it), that
    runs the exec and exits with its status; returns its pid once the exec has started."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    first = os.fork()
    if first == 0:  # pragma: no cover - seen through the boot and engine tests
        status = 1
        try:
            os.close(read_end)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            if terminal is not None:
                from microvmc.backends.monitor import controlling_terminal

                controlling_terminal(terminal)
            null = os.open(os.devnull, os.O_RDWR)
            mine = [os.dup(fd) for fd in stdio]
            for fd in (0, 1, 2):  # the engine's pipes stay open in the VM's process only
                os.dup2(null, fd)

            began = []

            def started() -> None:
                began.append(time.monotonic())
                os.write(write_end, f"ok {os.getpid()}\n".encode())
                os.close(write_end)
                for fd in mine:
                    os.close(fd)

            status = _exec_here(run, request, (mine[0], mine[1], mine[2]), terminal, started=started)
            if began:  # containerd 1.6's shim drops an exit it sees before it has read the pid file
                time.sleep(max(0.0, began[0] + EXEC_EXIT_GRACE - time.monotonic()))
        except RuntimeFailure as err:
            try:
                os.write(write_end, f"error {err.message}\n".encode())
            except OSError:
                pass
        except BaseException:  # noqa: BLE001 - its last word goes to the monitor's log
            import traceback

            with open(run.dir / "monitor.log", "a") as log:
                traceback.print_exc(file=log)
        os._exit(status)
    os.close(write_end)
    os.waitpid(first, 0)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode("utf-8", "replace").strip()
    word, _, rest = answer.partition(" ")
    if word == "ok":
        return int(rest.split()[0])
    raise RuntimeFailure(rest if word == "error" else "the exec did not start; see the container's monitor.log")


def _remove_tree(path: Path) -> None:
    from microvmc.backends.oci import unstage

    unstage(path / FILES)
    import shutil

    shutil.rmtree(path, ignore_errors=True)
