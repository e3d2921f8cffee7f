"""`microvmc kernel build`: microvmc's own guest kernel, from a Linux source tarball or tree.

The configuration is `make allnoconfig` with kernel/requirements.py's fragment applied
(KCONFIG_ALLCONFIG), and every option of the fragment is checked in the resulting .config before
anything is compiled. The build is reproducible (fixed KBUILD_BUILD_TIMESTAMP, USER, HOST and
VERSION, a fresh tree), and its result is an entry keyed by the source's digest, the fragment's
digest and the compiler's version:

    <kernels>/microvmc-<key>/   vmlinux (the PVH ELF QEMU boots), bzImage (lz4), config, release,
                                fragment.config, build.log, build.json
    <kernels>/microvmc -> microvmc-<key>     the one `kernel.source = "default"` picks

It is made in a temporary directory beside it and renamed into place when complete, so an
interrupted build leaves nothing half-made (the next build sweeps what a killed one left). The key
is compiler/kernels.py's, which resolve computes from the same inputs without the kernel being
there (the own kernel is a node the build makes); <kernels>/sources.json remembers the source's
digest by its fingerprint and which source was used last (the own kernel's source from then on).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from microvmc.compiler.hostfiles import HostFiles, fingerprint
from microvmc.compiler.kernels import ARCH, DEFAULT_SOURCE, OWN_KERNEL, SOURCE_MEMO, build_key, read_memo, source_digest
from microvmc.errors import BuildError, KernelError

__all__ = ["DEFAULT_SOURCE", "KernelBuild", "build_key", "build_kernel", "own_kernel_link", "BUILD_ENV"]

OWN_LINK = OWN_KERNEL
# Reproducible: nothing of the build machine or the time goes into the image.
BUILD_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "microvmc",
    "KBUILD_BUILD_HOST": "microvmc",
    "KBUILD_BUILD_VERSION": "1",
    "LC_ALL": "C",
    "TZ": "UTC",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelBuild:
    path: Path  # the entry: vmlinux, bzImage, config, ...
    release: str
    key: str
    cached: bool  # it was there already


def own_kernel_link(kernels: Path) -> Path:
    return kernels / OWN_LINK


def _cc_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        raise BuildError(f"cannot build the kernel: the C compiler {cc!r} is not installed",
                         hint="run scripts/setup") from None
    return out.splitlines()[0] if out else ""


def _source_digest(source: Path, kernels: Path) -> str:
    """The source's digest as resolve computes it (compiler/kernels.py), remembered in the memo with
    the fingerprint it was taken with (when that is settled)."""
    memo = read_memo(str(kernels), HostFiles())
    before = fingerprint(str(source))
    digest = source_digest(str(source), HostFiles(), memo)
    assert digest is not None, "build_kernel checks that the source exists"
    if source.is_file() and before is not None and fingerprint(str(source)) == before:
        digests = memo.get("digests") if isinstance(memo.get("digests"), dict) else {}
        _write_memo(kernels, dict(memo, digests={**digests, str(source): [before, digest]}))
    return digest


def _remember_source(kernels: Path, source: Path) -> None:
    """The source of the own kernel from now on: the one built from last."""
    _write_memo(kernels, dict(read_memo(str(kernels), HostFiles()), source=str(source)))


def _write_memo(kernels: Path, memo: dict) -> None:
    tmp = kernels / f".{SOURCE_MEMO}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(memo, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, kernels / SOURCE_MEMO)
    except OSError:
        tmp.unlink(missing_ok=True)  # a memo only saves time


def build_kernel(kernels: Path, source: Path = Path(DEFAULT_SOURCE), *, jobs: int = 2, niceness: int = 15,
                 cc: str = "gcc", say: Callable[[str], None] | None = None, force: bool = False) -> KernelBuild:
    """Build (or find) microvmc's kernel under `kernels`, and point `kernels`/microvmc at it."""
    from microvmc.kernel.patches import edits_digest
    from microvmc.kernel.requirements import fragment, fragment_digest

    say = say or (lambda line: print(f"microvmc: {line}", file=sys.stderr, flush=True))
    if not source.exists():
        raise BuildError(f"{source}: no Linux source tarball or tree there",
                         hint="Debian: apt-get install linux-source-6.1, or pass --source")
    if shutil.which("make") is None:
        raise BuildError("cannot build the kernel: make is not installed", hint="run scripts/setup")
    source = source.absolute()  # remembered as the own kernel's source: the same from any directory
    kernels.mkdir(parents=True, exist_ok=True)
    key = build_key(_source_digest(source, kernels), fragment_digest(), edits_digest(), _cc_version(cc))
    entry = kernels / f"microvmc-{key}"
    with open(kernels / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; and what a killed one left is ours to sweep
        for stale in kernels.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if entry.is_dir() and (entry / "build.json").is_file() and not force:
            _link(kernels, entry)
            _remember_source(kernels, source)
            return KernelBuild(path=entry, release=(entry / "release").read_text().strip(), key=key, cached=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=kernels))
        try:
            return _build(work, entry, kernels, source, key, fragment(), fragment_digest(), jobs=jobs,
                          niceness=niceness, cc=cc, say=say)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _build(work: Path, entry: Path, kernels: Path, source: Path, key: str, fragment_text: str, fragment_hash: str,
           *, jobs: int, niceness: int, cc: str, say: Callable[[str], None]) -> KernelBuild:
    from microvmc.kernel.patches import EDITS, edits_digest
    from microvmc.kernel.requirements import missing_options, parse_config

    out = work / "out"
    out.mkdir()
    log_path = out / "build.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        def step(what: str, argv: list[str], cwd: Path, progress: bool = False) -> None:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            _run(argv, cwd, log, what=what, log_path=entry.with_name(entry.name + ".failed.log"), progress=progress, say=say,
                 started=started)

        if source.is_file():
            say(f"kernel: unpacking {source}")
            tree = work / "src"
            tree.mkdir()
            step("unpack", ["tar", "-xf", str(source.resolve()), "--strip-components=1", "-C", str(tree)], work)
        else:
            tree = work / "src"
            say(f"kernel: copying {source}")
            shutil.copytree(source, tree, symlinks=True)
        _edit(tree, source, EDITS, log)
        (out / "fragment.config").write_text(fragment_text)
        make = ["nice", "-n", str(niceness), "make", f"ARCH={ARCH}", f"CC={cc}", f"HOSTCC={cc}"]
        step("configure", [*make, f"KCONFIG_ALLCONFIG={out / 'fragment.config'}", "allnoconfig"], tree)
        config = (tree / ".config").read_text()
        missing = missing_options(parse_config(config))
        if missing:
            raise KernelError(f"{source}: the kernel config lost options of kernel/requirements.py: "
                              + ", ".join(missing), hint="their dependencies are missing from the fragment")
        say(f"kernel: compiling with make -j{jobs} (nice {niceness}); this takes minutes")
        step("compile", [*make, f"-j{jobs}", "bzImage"], tree, progress=True)
        release = subprocess.run([*make[3:], "-s", "kernelrelease"], cwd=tree, capture_output=True, text=True,
                                 env=_env()).stdout.strip()
        shutil.copyfile(tree / "vmlinux", out / "vmlinux")
        shutil.copyfile(tree / "arch/x86/boot/bzImage", out / "bzImage")
    (out / "config").write_text(config)
    (out / "release").write_text(release + "\n")
    (out / "build.json").write_text(json.dumps({
        "key": key, "release": release, "source": str(source), "source_digest": _source_digest(source, kernels),
        "fragment_digest": fragment_hash, "edits": [e.name for e in EDITS], "edits_digest": edits_digest(),
        "config_digest": hashlib.sha256(config.encode()).hexdigest(),
        "cc_version": _cc_version(cc), "arch": ARCH, "env": BUILD_ENV,
    }, indent=2, sort_keys=True) + "\n")
    if entry.exists():
        shutil.rmtree(entry)
    os.rename(out, entry)
    _link(kernels, entry)
    _remember_source(kernels, source)
    say(f"kernel: built {release} in {time.monotonic() - started:.0f} s: {entry}")
    return KernelBuild(path=entry, release=release, key=key, cached=False)


def _edit(tree: Path, source: Path, edits, log) -> None:
    """Make kernel/patches.py's edits in the unpacked tree, each found exactly once, or stop."""
    from microvmc.kernel.patches import apply_edit

    for edit in edits:
        path = tree / edit.path
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise KernelError(f"{source}: kernel/patches.py's edit {edit.name!r} cannot read {edit.path}: "
                              f"{getattr(e, 'strerror', None) or e}", hint="is it a Linux source of another version?") from None
        edited = apply_edit(edit, text)
        if edited is None:
            raise KernelError(f"{source}: kernel/patches.py's edit {edit.name!r} does not apply: {edit.path} has not "
                              "its text exactly once", hint="is it a Linux source of another version?")
        path.unlink()  # (a copied tree's file may be a link to the user's: never write through it)
        path.write_text(edited)
        log.write(f"edited {edit.path}: {edit.name}\n")


def _link(kernels: Path, entry: Path) -> None:
    tmp = kernels / f".{OWN_LINK}.{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(entry.name)
    os.replace(tmp, own_kernel_link(kernels))


def _env() -> dict[str, str]:
    return {**os.environ, **BUILD_ENV}


def _run(argv: list[str], cwd: Path, log, *, what: str, log_path: Path, progress: bool,
         say: Callable[[str], None], started: float) -> None:
    """Run one step with its output in the log; on a terminal, a line that says how far it got."""
    tty = progress and sys.stderr.isatty()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
                            start_new_session=True, text=True, errors="replace")
    last = ""
    try:
        assert proc.stdout is not None
        count = 0
        for line in proc.stdout:
            log.write(line)
            last = line.strip() or last
            if tty and line.startswith("  "):
                count += 1
                elapsed = time.monotonic() - started
                sys.stderr.write(f"\r\x1b[Kkernel: {count} steps, {elapsed:.0f} s: {line.strip()[:60]}")
        status = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        if tty:
            sys.stderr.write("\r\x1b[K")
        log.flush()
    if status != 0:
        # The log goes with the failure: keep it where the message says, beside (not in) the entry.
        shutil.copyfile(log.name, log_path)
        raise BuildError(f"kernel build failed at {what} (exit status {status}): {last[:200]}",
                         hint=f"the whole log is in {log_path}")


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue
