"""The run store: one directory per run under the state directory, what `ps`, `logs`, `inspect`,
`stop`, `rm` and `exec` find runs by.

    <state>/runs/<id>/record.json     what the run is and how it went (replaced atomically, never edited)
                      name            the run's name, alone (what `create` checks names against)
                      lock            flock'ed by the run's monitor for as long as it lives
                      control.sock    the monitor's socket (backends/monitor.py), while it lives
                      stdout.log ...  the program's output of a detached run, then the console, QEMU,
                                      virtiofsd and monitor logs, status, timeline.json
                      vm/             the VM's runtime directory (sockets), while it lives

A run directory appears complete or not at all: it is made as `.new-<id>` and renamed once its
record and lock are in place; `rm` renames it to `.rm-<id>` before deleting it. Names and ids are
unique under the store's own lock; `create` reads each run's `name` file for them, not every record
(~11 KB each, the plan in it: 7 ms with 50 runs; a run made before there were name files is read
from its record). A run whose record says it runs but whose lock is free lost its
monitor (SIGKILL): `state()` says "dead" and its sockets are removed (QEMU and the virtiofsds died
with the monitor: they get SIGKILL when it dies).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

TYPE_CHECKING = False  # (not typing's: importing typing is ~3 ms of a `run` before QEMU starts)
if TYPE_CHECKING:
    from typing import Any

from microvmc.errors import ExitStatus, MicrovmcError

__all__ = ["RunStore", "Run", "NoSuchRun", "RunStateError", "state_root", "utc_now", "KEEP"]

KEEP = 50  # foreground runs without a name beyond this many are pruned, oldest first
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
RECORD = "record.json"
NAME_FILE = "name"
LOCK = "lock"
SOCKET = "control.sock"
_ADJECTIVES = ("brave", "calm", "eager", "fond", "gentle", "happy", "jolly", "keen", "lucid", "merry", "nifty",
               "proud", "quiet", "sharp", "tender", "vivid", "wise", "zealous")
_NOUNS = ("babbage", "curie", "darwin", "euler", "fermat", "galois", "hopper", "kepler", "lovelace", "noether",
          "pascal", "ritchie", "shannon", "thompson", "turing", "wirth")


def _rmtree(path) -> None:
    import shutil  # (with zlib, bz2 and lzma: ~2.5 ms of a `run` before QEMU starts; the supervision imports it)

    shutil.rmtree(path, ignore_errors=True)


def _below(n: int) -> int:
    """A random number in [0, n) from the kernel's generator (`secrets` would import `random`,
    `hmac` and `base64` into every run's start; a names' bias of n / 2**64 does not matter)."""
    return int.from_bytes(os.urandom(8), "big") % n


def _pick(words: tuple[str, ...]) -> str:
    return words[_below(len(words))]


class NoSuchRun(MicrovmcError):
    status = ExitStatus.NO_SUCH_RUN


class RunStateError(MicrovmcError):
    """A request the run's state does not allow (rm of a running run, exec into an ended one)."""

    status = ExitStatus.NO_SUCH_RUN


def state_root(environ: Mapping[str, str] = os.environ, override: str | None = None) -> Path:
    if override:
        return Path(os.path.abspath(override))
    state = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state, "microvmc")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Run:
    def __init__(self, path: Path, record: dict[str, Any] | None = None):
        self.dir = Path(path)
        self._record = record
        self.lock_fd: int | None = None  # held by whoever created it, until the monitor owns it

    @property
    def id(self) -> str:
        return self.record()["id"]

    @property
    def name(self) -> str:
        return self.record()["name"]

    @property
    def socket(self) -> Path:
        return self.dir / SOCKET

    def record(self, *, fresh: bool = False) -> dict[str, Any]:
        if self._record is None or fresh:
            self._record = json.loads((self.dir / RECORD).read_text())
        return self._record

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the record, atomically (only the run's monitor writes once it runs)."""
        record = {**self.record(fresh=True), **fields}
        tmp = self.dir / f".{RECORD}.{os.getpid()}"
        tmp.write_text(json.dumps(record, sort_keys=True, indent=2) + "\n")
        os.replace(tmp, self.dir / RECORD)
        self._record = record
        return record

    def alive(self) -> bool:
        """A monitor holds the run's lock."""
        if self.lock_fd is not None:
            return True
        try:
            fd = os.open(self.dir / LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def state(self) -> str:
        """created, running, exited, or dead (its monitor was lost); a dead run's sockets are removed."""
        record = self.record(fresh=True)
        state = record.get("state", "created")
        if state in ("created", "running") and not self.alive():
            record = self.record(fresh=True)  # it may have ended between the two reads
            state = record.get("state", "created")
            if state in ("created", "running"):
                _rmtree(self.dir / "vm")
                try:
                    os.unlink(self.socket)
                except OSError:
                    pass
                return "dead"
        return state

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


class RunStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        # The directory itself is the lock: no file is left in it (an OCI engine checks its
        # runtime's --root is empty once its containers are deleted).
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def check_name(self, name: str) -> None:
        """That `name` is a name and free now (create checks again, under the lock)."""
        if not NAME.fullmatch(name):
            raise MicrovmcError(f"--name {name!r}: a name is letters, digits, '_', '.' and '-', starting with a "
                                "letter or digit", status=ExitStatus.USAGE)
        taken = self._names().get(name)
        if taken is not None:
            raise MicrovmcError(f"the name {name!r} is taken by run {taken[:12]}",
                                hint=f"remove it first: microvmc rm {name}", status=ExitStatus.USAGE)

    def create(self, plan: dict[str, Any], *, name: str | None = None, id: str | None = None,
               manifest: str | None = None, command: tuple[str, ...] = (), **fields: Any) -> Run:
        """A new run, its lock held by the returned Run (pass it on to the monitor)."""
        if name is not None and not NAME.fullmatch(name):
            raise MicrovmcError(f"--name {name!r}: a name is letters, digits, '_', '.' and '-', starting with a "
                                "letter or digit", status=ExitStatus.USAGE)
        if id is not None and not NAME.fullmatch(id):
            raise MicrovmcError(f"run id {id!r}: an id is letters, digits, '_', '.' and '-'", status=ExitStatus.USAGE)
        with self._locked():
            names = self._names()
            if name is not None and name in names:
                raise MicrovmcError(f"the name {name!r} is taken by run {names[name][:12]}",
                                    hint=f"remove it first: microvmc rm {name}", status=ExitStatus.USAGE)
            if id is not None and os.path.lexists(self.root / id):
                raise MicrovmcError(f"a run with id {id!r} exists", status=ExitStatus.USAGE)
            run_id = id or os.urandom(32).hex()
            if name is None:
                while True:
                    name = f"{_pick(_ADJECTIVES)}_{_pick(_NOUNS)}"
                    if name not in names:
                        break
                    name = f"{name}_{_below(1000)}"
                    if name not in names:
                        break
            record = {"id": run_id, "name": name, "created": utc_now(), "created_unix": time.time(),
                      "manifest": manifest, "command": list(command), "state": "created", "plan": plan, **fields}
            new = self.root / f".new-{run_id}"
            new.mkdir(mode=0o700)
            try:
                (new / RECORD).write_text(json.dumps(record, sort_keys=True, indent=2) + "\n")
                (new / NAME_FILE).write_text(name)
                lock = os.open(new / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(lock, fcntl.LOCK_EX)
                os.rename(new, self.root / run_id)
            except BaseException:
                _rmtree(new)
                raise
            run = Run(self.root / run_id, record)
            run.lock_fd = lock
            return run

    def _names(self) -> dict[str, str]:
        """Every complete run's name, to its id: from the runs' `name` files, not their records."""
        try:
            entries = [e for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_dir()]
        except FileNotFoundError:
            return {}
        names = {}
        for entry in entries:
            try:
                fd = os.open(os.path.join(entry.path, NAME_FILE), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    name = os.read(fd, 1024).decode()  # (os.open: half the time of open() here)
                finally:
                    os.close(fd)
            except FileNotFoundError:  # a run made before there were name files
                try:
                    name = json.loads(Path(entry.path, RECORD).read_text())["name"]
                except (OSError, ValueError, KeyError):
                    continue
            except OSError:
                continue  # being removed
            names[name] = entry.name
        return names

    def all(self) -> list[Run]:
        """Every complete run, oldest first."""
        try:
            entries = [e for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_dir()]
        except FileNotFoundError:
            return []
        runs = []
        for entry in entries:
            try:
                runs.append(Run(Path(entry.path), json.loads(Path(entry.path, RECORD).read_text())))
            except (OSError, ValueError):
                continue  # being removed
        runs.sort(key=lambda r: (r.record().get("created_unix", 0), r.id))
        return runs

    def find(self, ref: str) -> Run:
        """By name, full id or unique id prefix."""
        runs = self.all()
        for run in runs:
            if run.name == ref or run.id == ref:
                return run
        matches = [r for r in runs if ref and r.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise NoSuchRun(f"{ref!r} is ambiguous: it starts {len(matches)} run ids "
                            f"({', '.join(r.id[:12] for r in matches[:4])})")
        raise NoSuchRun(f"no such run: {ref!r}", hint="microvmc ps -a lists them")

    def remove(self, run: Run) -> None:
        if run.alive():
            raise RunStateError(f"run {run.name!r} is {run.record(fresh=True).get('state', 'running')}",
                                hint=f"stop it first, or: microvmc rm -f {run.name}")
        gone = self.root / f".rm-{run.id}"
        try:
            os.rename(run.dir, gone)
        except FileNotFoundError:
            return
        _rmtree(gone)

    def prune(self, keep: int = KEEP) -> None:
        """Forget the oldest ended foreground runs that nobody named, beyond `keep` of them, and what
        a killed `rm` or `create` left half-done; remove the sockets of runs whose monitor was killed."""
        complete = []
        for entry in os.scandir(self.root):
            if entry.name.startswith((".rm-", ".new-")) and time.time() - entry.stat().st_mtime > 60:
                _rmtree(entry.path)
            elif not entry.name.startswith(".") and entry.is_dir():
                complete.append(entry.path)
        # Only beyond `keep` runs is there one to forget, and only a run with a runtime directory can
        # have lost its monitor: the other records are not read (~11 KB each: 50 are ~4 ms of a boot)
        beyond = len(complete) > keep
        runs = self.all() if beyond else [Run(Path(p)) for p in complete if os.path.isdir(os.path.join(p, "vm"))]
        for run in runs:  # a run whose monitor was killed: its sockets and runtime directory go
            try:
                if run.record().get("state") in ("created", "running") and (run.dir / "vm").exists():
                    run.state()
            except (OSError, ValueError):
                continue  # being removed
        if not beyond:
            return
        ended = [r for r in runs if r.record().get("foreground") and not r.record().get("named")
                 and r.record().get("state") == "exited"]
        for run in ended[:-keep] if keep else ended:
            try:
                self.remove(run)
            except MicrovmcError:
                pass
