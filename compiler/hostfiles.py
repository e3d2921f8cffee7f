"""The host's files as resolve reads them: every look is recorded.

resolve reads the host only through a `HostFiles`: whether a path is a file or a directory (or
exists at all), a link's target, a directory's entries, a file's bytes or digest. Each look is kept as an
`Observation` (what was asked of which path, and what was seen), so that the evaluation cache
(backends/evalcache.py) can ask the same questions again (`Observation.holds`) and reuse a plan only while
every answer is still the same: a directory image that gains or loses a mount point, a module
added to the kernel's tree, an edited init source all make it compile again.

What is seen of a file's content is its fingerprint (size, mtime, ctime, inode), taken before it is
read, so that a hit need not hash the kernel again; of a directory's entries, their names and kinds,
and the directory's fingerprint, so that a hit need not list the kernel's module tree again. A
fingerprint only stands for what it was taken of when that is older than the coarsest timestamp tick
(`SETTLED`): a change in the same tick would keep it. A file or directory changed more recently is
checked by its content's digest or its entries again.
"""

from __future__ import annotations

import json
import os
import stat
import time
from enum import StrEnum

from microvmc._value import Value
from microvmc.compiler.store import file_digest, sha256

TYPE_CHECKING = False  # (not typing's: importing typing is ~3 ms of a `run` before QEMU starts)
if TYPE_CHECKING:
    from typing import Any, Iterator

__all__ = ["HostFiles", "Look", "Observation", "SETTLED", "fingerprint"]


class Look(StrEnum):
    IS_FILE = "is-file"  # os.path.isfile
    IS_DIR = "is-dir"  # os.path.isdir
    EXISTS = "exists"  # os.path.lexists
    ENTRIES = "entries"  # a directory's entries: name and kind (directory, link to one, other)
    CONTENT = "content"  # a file read or hashed
    REALPATH = "realpath"  # os.path.realpath: where a path leads, through its links
    READLINK = "readlink"  # a symbolic link's target (None: not a link, or not there)
    STAT = "stat"  # a file's fingerprint alone (what a memo of its digest was taken with)


# A timestamp older than this (ns) is trusted to change with the next change: file systems' clocks
# tick at most every 2 s (FAT's mtime; Linux's coarse clock is a jiffy).
SETTLED = 3_000_000_000


class Observation(Value):
    """(Not a dataclass: `microvmc run` imports this before it starts QEMU, microvmc/_value.py.)"""

    __slots__ = ("look", "path", "seen")
    look: Look
    path: str
    seen: Any  # a JSON value: what was seen (see `holds`)

    def __init__(self, look: Look, path: str, seen: Any) -> None:
        self._init(locals())

    def to_list(self) -> list[Any]:
        return [str(self.look), self.path, self.seen]

    @classmethod
    def from_list(cls, value: list[Any]) -> "Observation":
        kind, path, seen = value
        return cls(Look(kind), path, seen)

    def holds(self) -> bool:
        """The host still answers the same."""
        return _HOLDS[self.look](self.path, self.seen)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _fingerprint(st: os.stat_result | None) -> list[int] | None:
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        return [st.st_mode]
    return [st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _settled(st: os.stat_result | None) -> bool:
    return st is None or time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED


def _kind(entry: os.DirEntry[str]) -> str:
    try:
        if not entry.is_dir():
            return "other"
        return "link" if entry.is_symlink() else "dir"  # os.walk lists a link to a directory, does not enter it
    except OSError:
        return "other"


def _scan(path: str) -> list[tuple[str, str]]:
    with os.scandir(path) as it:
        return sorted((e.name, _kind(e)) for e in it)


def _names_digest(found: list[tuple[str, str]] | None) -> str | None:
    if found is None:
        return None
    return sha256(json.dumps(found).encode("utf-8", "surrogateescape")).hexdigest()


def _scan_or_none(path: str) -> list[tuple[str, str]] | None:
    try:
        return _scan(path)
    except OSError:
        return None


def _content_digest(path: str) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None


def _entries_hold(path: str, seen: Any) -> bool:
    fingerprint, names = seen  # fingerprint: None when it was too recent to stand for the entries
    if fingerprint is not None and _fingerprint(_stat(path)) == fingerprint:
        return True
    return _names_digest(_scan_or_none(path)) == names


def _content_holds(path: str, seen: Any) -> bool:
    fingerprint, sha = seen  # sha: only when the fingerprint was too recent to stand for the content
    if _fingerprint(_stat(path)) != fingerprint:
        return False
    return sha is None or _content_digest(path) == sha


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


_HOLDS = {
    Look.IS_FILE: lambda path, seen: os.path.isfile(path) == seen,
    Look.IS_DIR: lambda path, seen: os.path.isdir(path) == seen,
    Look.EXISTS: lambda path, seen: os.path.lexists(path) == seen,
    Look.ENTRIES: _entries_hold,
    Look.CONTENT: _content_holds,
    Look.REALPATH: lambda path, seen: os.path.realpath(path) == seen,
    Look.READLINK: lambda path, seen: _readlink(path) == seen,
    Look.STAT: lambda path, seen: fingerprint(path) == seen,
}


def fingerprint(path: str) -> list[int] | None:
    """A file's fingerprint (mode, size, mtime, ctime, inode), or None when it is not there; when it
    is settled (older than SETTLED), a digest taken with it stands for the content while it holds."""
    st = _stat(path)
    return _fingerprint(st) if _settled(st) else None


class HostFiles:
    """The one way resolve reads the host; `observed` is everything it looked at, in order. (Not a
    dataclass: `microvmc run` imports this before it starts QEMU, microvmc/_value.py.)"""

    __slots__ = ("observed",)

    def __init__(self, *, observed: list[Observation] | None = None) -> None:
        self.observed = [] if observed is None else observed

    def __repr__(self) -> str:
        return f"HostFiles(observed={self.observed!r})"

    def _note(self, kind: Look, path: str, seen: Any) -> Any:
        self.observed.append(Observation(kind, os.fspath(path), seen))
        return seen

    def is_file(self, path: str) -> bool:
        return self._note(Look.IS_FILE, path, os.path.isfile(path))

    def is_dir(self, path: str) -> bool:
        return self._note(Look.IS_DIR, path, os.path.isdir(path))

    def exists(self, path: str) -> bool:
        return self._note(Look.EXISTS, path, os.path.lexists(path))

    def fingerprint(self, path: str) -> list[int] | None:
        """The file's fingerprint if it is settled, else None (see `fingerprint`)."""
        return self._note(Look.STAT, path, fingerprint(path))

    def realpath(self, path: str) -> str:
        return self._note(Look.REALPATH, path, os.path.realpath(path))

    def readlink(self, path: str) -> str | None:
        return self._note(Look.READLINK, path, _readlink(path))

    def _content(self, path: str, take: Any) -> Any:
        st = _stat(path)  # before it is read: a change in between is a later miss
        try:
            value, sha = take()
        except OSError:
            self._note(Look.CONTENT, path, [_fingerprint(st), None])
            raise
        self._note(Look.CONTENT, path, [_fingerprint(st), None if _settled(st) else sha])
        return value

    def read(self, path: str) -> bytes:
        """A file's bytes (OSError as open raises it)."""
        def take() -> tuple[bytes, str]:
            with open(path, "rb") as f:
                data = f.read()
            return data, sha256(data).hexdigest()
        return self._content(path, take)

    def digest(self, path: str) -> str:
        """A file's sha256 (OSError as open raises it)."""
        def take() -> tuple[str, str]:
            d = file_digest(path)
            return d, d
        return self._content(path, take)

    def entries(self, path: str) -> list[tuple[str, str]]:
        """A directory's entries, sorted, each with its kind: "dir", "link" (to a directory) or "other"."""
        st = _stat(path)
        found = _scan_or_none(path)
        self._note(Look.ENTRIES, path, [_fingerprint(st) if _settled(st) else None, _names_digest(found)])
        if found is None:
            return _scan(path)  # raises as os.scandir does
        return found

    def listdir(self, path: str) -> list[str]:
        return [name for name, _ in self.entries(path)]

    def walk(self, top: str) -> Iterator[tuple[str, list[str], list[str]]]:
        """os.walk(top) (top down, links to directories listed but not entered), every directory looked at."""
        top = os.fspath(top)
        try:
            entries = self.entries(top)
        except OSError:
            return
        dirs = [name for name, kind in entries if kind != "other"]
        yield top, dirs, [name for name, kind in entries if kind == "other"]
        for name, kind in entries:
            if kind == "dir":
                yield from self.walk(os.path.join(top, name))

    def observations(self) -> tuple[Observation, ...]:
        """What was looked at, each look once (a look that saw two answers is kept twice: it cannot hold)."""
        once: dict[tuple[str, str, str], Observation] = {}
        for o in self.observed:
            once.setdefault((o.look, o.path, json.dumps(o.seen)), o)
        return tuple(once.values())
