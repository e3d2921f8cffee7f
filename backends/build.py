"""Realize a compiled graph: build each missing store path, in graph order, aside and atomically.

Each output is built in a temporary directory inside the store and renamed into place; if another
build got there first, its output is kept and ours discarded. A failed build removes its temporary
directory, so the store never holds half an output; so does a build stopped by SIGTERM or SIGHUP
(which would otherwise end the process without removing anything).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from microvmc.compiler.builtin_image import DIRECTORIES, GROUP, PASSWD
from microvmc.compiler.cmdline import SPILL_PATH
from microvmc.compiler.cpio import Entry, EntryKind, gzip_deterministic, write_newc
from microvmc.compiler.graph import INIT_CFLAGS, Builder, Graph, Node, init_sources
from microvmc.compiler.pipeline import Compiled
from microvmc.errors import BuildError, KernelError

__all__ = ["realize", "realised", "BUILDERS", "staging"]


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _temporary_directory(prefix: str, parent: str | None = None) -> Iterator[Path]:
    """A new directory, removed on the way out whatever happens. Made with the stop signals held, so
    that one (an exception, see _stoppable) cannot land between its making and the `try` that removes it."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    path = None
    try:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # one that came meanwhile is raised here
        yield path
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging(out: str) -> Iterator[Path]:
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with _temporary_directory(f".tmp-{os.path.basename(out)}-", parent) as tmp:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp made it private; store paths are readable by all
        try:
            os.rename(tmp, out)
        except OSError:
            if not os.path.isdir(out):
                raise
            # A concurrent build of the same inputs won; its output is identical.


def _busybox_rootfs(node: Node, graph: Graph, out: Path) -> None:
    busybox = graph.node("busybox").path
    (out / "bin").mkdir()
    shutil.copyfile(busybox, out / "bin" / "busybox")
    os.chmod(out / "bin" / "busybox", 0o755)
    listed = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in sorted(set(listed)):
        target = out / applet
        if applet == "bin/busybox" or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", target)
    for d, mode in DIRECTORIES:
        (out / d).mkdir(parents=True, exist_ok=True)
        os.chmod(out / d, mode)
    (out / "etc" / "passwd").write_text(PASSWD)
    (out / "etc" / "group").write_text(GROUP)


def _boot_kernel(node: Node, graph: Graph, out: Path) -> None:
    from microvmc.kernel.image import extract_vmlinux, inspect_kernel, pvh_entry

    source = graph.node("kernel").path
    data = Path(source).read_bytes()
    info = inspect_kernel(data, path=source)
    elf = extract_vmlinux(data, path=source)
    if pvh_entry(elf, path=source) is not None:
        # QEMU boots an ELF with a PVH entry directly: no decompression in the guest (2.3 s vs 6 s under TCG).
        (out / "kernel").write_bytes(elf)
    elif info.format == "bzimage":
        shutil.copyfile(source, out / "kernel")
    else:
        raise KernelError(f"{source}: the ELF kernel has no PVH entry note, so QEMU cannot boot it",
                          hint="use the bzImage, or a kernel built with CONFIG_PVH=y")


def _init(node: Node, graph: Graph, out: Path) -> None:
    source = graph.node("init-src").path
    cc = node.param("cc")
    names = init_sources(source)
    with _temporary_directory("microvmc-init-") as work_path:
        work = str(work_path)
        for name in names:
            shutil.copyfile(os.path.join(source, name), os.path.join(work, name))
        units = [name for name in names if name.endswith(".c")]
        headers = _kernel_headers(work_path) if node.param("libc") == "musl" else []
        try:
            returncode, stderr = _compile([cc, *INIT_CFLAGS, *headers, "-o", "init", *units], work)
        except FileNotFoundError:
            raise BuildError(f"cannot compile the guest init: the C compiler {cc!r} is not installed",
                             hint="run scripts/setup") from None
        if returncode != 0:
            first = next((l for l in stderr.splitlines() if l.strip()), "no output")
            raise BuildError(f"cannot compile the guest init with {cc}: {first}",
                             hint="a static libc is needed (Debian: musl-tools, or libc6-dev for glibc)")
        shutil.copyfile(os.path.join(work, "init"), out / "init")
    os.chmod(out / "init", 0o755)


# The Linux UAPI headers the init's netlink code includes (Debian: linux-libc-dev). musl ships none, and
# its musl-gcc searches only musl's own include directory: these alone, not glibc's headers, are added.
KERNEL_HEADERS = {"linux": ("/usr/include/linux",), "asm-generic": ("/usr/include/asm-generic",),
                  "asm": ("/usr/include/x86_64-linux-gnu/asm", "/usr/include/asm")}


def _kernel_headers(work: Path) -> list[str]:
    """`-isystem DIR`: a directory in `work` linking to the host's kernel headers."""
    include = work / "kernel-headers"
    include.mkdir()
    for name, candidates in KERNEL_HEADERS.items():
        found = next((c for c in candidates if os.path.isdir(c)), None)
        if found is None:
            raise BuildError(f"cannot compile the guest init with musl: no kernel headers at {candidates[0]}",
                             hint="Debian: apt-get install linux-libc-dev")
        os.symlink(found, include / name)
    return ["-isystem", str(include)]


def _compile(argv: list[str], work: str) -> tuple[int, str]:
    """Run the compiler in `work`, its temporary files there too (TMPDIR), in its own process group:
    a build stopped midway stops cc1, as and ld with it, and removing `work` removes all they wrote."""
    proc = subprocess.Popen(argv, cwd=work, env=dict(os.environ, TMPDIR=work), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, stderr


def _initramfs(node: Node, graph: Graph, out: Path) -> None:
    from microvmc.kernel.modules import decompress_module, strip_signature

    entries = [Entry(path="init", kind=EntryKind.FILE, mode=0o755, data=(Path(graph.node("init").path) / "init").read_bytes())]
    order = []
    modules = graph.node("modules")
    strip = modules.param("strip_signatures")
    for module in modules.param("modules"):
        name = f"lib/modules/{module['name']}.ko"
        source = os.path.join(modules.location("modules_dir"), module["path"])
        data = decompress_module(Path(source).read_bytes(), path=source)
        entries.append(Entry(path=name, kind=EntryKind.FILE, mode=0o644,
                             data=strip_signature(data, path=source) if strip else data))
        order.append("/" + name)
    entries.append(Entry(path="microvmc/modules", kind=EntryKind.FILE, mode=0o644, data="".join(p + "\n" for p in order).encode()))
    spill = node.param("spill")
    if spill is not None:
        entries.append(Entry(path=SPILL_PATH.lstrip("/"), kind=EntryKind.FILE, mode=0o644, data=spill.encode("ascii")))
    for d in ("dev", "proc", "sys", "mnt"):
        entries.append(Entry(path=d, kind=EntryKind.DIR, mode=0o755))
    (out / "initramfs.cpio.gz").write_bytes(gzip_deterministic(write_newc(entries), level=1))


BUILDERS: dict[Builder, Callable[[Node, Graph, Path], None]] = {
    Builder.BUSYBOX_ROOTFS: _busybox_rootfs,
    Builder.BOOT_KERNEL: _boot_kernel,
    Builder.INIT: _init,
    Builder.INITRAMFS: _initramfs,
}


@contextlib.contextmanager
def _stoppable() -> Iterator[None]:
    """SIGTERM and SIGHUP end a build as SIGINT does, by an exception, so that every temporary
    directory is removed and the compiler is stopped; a signal during that clean-up is ignored.
    A caller's own handlers are left alone."""
    signals = _STOP_SIGNALS
    if threading.current_thread() is not threading.main_thread() or any(
            signal.getsignal(s) is not signal.SIG_DFL for s in signals):
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise BuildError(f"the build was stopped by {signal.Signals(signum).name}", status=128 + signum)

    for s in signals:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s in signals:
            signal.signal(s, signal.SIG_DFL)


def realize(compiled: Compiled) -> str:
    """Build whatever of the graph is missing from the store, then the output; return its path."""
    with _stoppable():
        return _realize(compiled)


def realised(graph: Graph) -> dict[str, bool]:
    """Which of the nodes that something makes are made: the store paths, and the own kernel's entry."""
    made = {n.id: os.path.isdir(n.path) for n in graph.nodes if n.builder in BUILDERS}
    made.update({n.id: os.path.isfile(os.path.join(n.path, "build.json")) for n in graph.nodes
                 if n.builder is Builder.KERNEL})
    return made


def _own_kernel(node: Node, progress: Callable[[str], None] | None) -> None:
    """Build microvmc's own kernel for the plan (its progress on stderr, as `microvmc kernel build`
    shows it); the entry it makes must be the one the plan was compiled for."""
    from microvmc.backends.kernelbuild import build_kernel

    if os.path.isfile(os.path.join(node.path, "build.json")):
        return
    built = build_kernel(Path(os.path.dirname(node.path)), Path(node.location("source")), cc=node.location("cc"),
                         say=progress)
    if str(built.path) != node.path:
        raise BuildError(f"the kernel built from {node.location('source')} is {built.path}, not the {node.path} "
                         "the plan was compiled for (its source or compiler changed meanwhile)",
                         hint="run the command again")


def _realize(compiled: Compiled) -> str:
    for node in compiled.graph.nodes:
        if node.builder is Builder.KERNEL:
            _own_kernel(node, None)
            continue
        build = BUILDERS.get(node.builder)
        if build is None or os.path.isdir(node.path):
            continue
        with staging(node.path) as tmp:
            build(node, compiled.graph, tmp)
    output = compiled.output
    if not os.path.isdir(output.path):
        with staging(output.path) as tmp:
            for name, data, mode in output.files:
                (tmp / name).write_bytes(data)
                os.chmod(tmp / name, mode)
    return output.path
