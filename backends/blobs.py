"""The blob store: every manifest, config and layer, once, by digest, shared by every image.

`<store>/blobs/sha256/<hex>` is only ever a complete, verified blob: a download goes to
`<hex>.partial` (held with a lock while it is written), is checked against its digest and size, and
is renamed into place. A partial file is kept only when the transfer was interrupted, so the next
pull resumes it with a ranged request; one that fails verification is deleted.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from microvmc.compiler.ociimage import check_digest
from microvmc.errors import MicrovmcError

__all__ = ["BlobStore", "BlobError"]


class BlobError(MicrovmcError):
    """A blob does not match its digest or size; nothing of it was kept."""


class BlobStore:
    def __init__(self, store: str):
        self.root = Path(store, "blobs", "sha256")

    def path(self, digest: str) -> Path:
        return self.root / check_digest(digest, "blob").split(":", 1)[1]

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def put(self, data: bytes, digest: str, *, what: str) -> Path:
        """Store `data`, which must have `digest`."""
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BlobError(f"{what}: the content's digest is {actual}, not {digest}; it was not used")
        target = self.path(digest)
        if target.exists():
            return target
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            _unlink(tmp)
            raise
        return target

    def put_file(self, source: BinaryIO, digest: str, size: int | None, *, what: str) -> Path:
        """Copy a verified blob from an open file (an OCI layout's, an archive member)."""
        return self.download(lambda offset: (iter(lambda: source.read(1 << 20), b""), False), digest, size,
                             what=what, resume=False)

    def download(self, fetch: Callable[[int], tuple[Iterable[bytes], bool]], digest: str, size: int | None, *,
                 what: str, resume: bool = True, progress: Callable[[int], None] | None = None) -> Path:
        """Store the blob that `fetch(offset)` streams: (chunks, whether they start at `offset`
        rather than at 0). Verified against digest and size before it is renamed into place."""
        target = self.path(digest)
        if target.exists():
            return target
        self.root.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with _locked(partial):
            if target.exists():  # another pull finished it while we waited
                return target
            sha = hashlib.sha256()
            offset = 0
            if resume and partial.exists():
                with open(partial, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        sha.update(chunk)
                        offset += len(chunk)
            if size is not None and offset > size:
                partial.unlink()
                sha, offset = hashlib.sha256(), 0
            complete = False
            try:
                chunks, ranged = fetch(offset)
                if not ranged and offset:
                    sha, offset = hashlib.sha256(), 0
                with open(partial, "ab" if offset else "wb") as out:
                    if not offset:
                        out.truncate(0)
                    if progress and offset:
                        progress(offset)
                    for chunk in chunks:
                        offset += len(chunk)
                        if size is not None and offset > size:
                            raise BlobError(f"{what}: more than the {size} bytes its descriptor gives; it was not used")
                        sha.update(chunk)
                        out.write(chunk)
                        if progress:
                            progress(len(chunk))
                complete = True
            except BlobError:
                _unlink(partial)
                raise
            except BaseException:
                if not resume:
                    _unlink(partial)
                raise  # interrupted: the partial file is resumed next time
            finally:
                if not complete and not resume:
                    _unlink(partial)
            actual = "sha256:" + sha.hexdigest()
            if (size is not None and offset != size) or actual != digest:
                _unlink(partial)
                got = f"{offset} bytes" if size is not None and offset != size else f"digest {actual}"
                raise BlobError(f"{what}: the download has {got}, not {size} bytes with digest {digest}; "
                                "it was not used")
            os.chmod(partial, 0o644)
            os.replace(partial, target)
        return target

    def digests(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for entry in os.scandir(self.root):
            if len(entry.name) == 64 and not entry.name.startswith("."):
                yield "sha256:" + entry.name

    def leftovers(self) -> Iterator[Path]:
        """Partial downloads and temporary files (for gc)."""
        if not self.root.is_dir():
            return
        for entry in os.scandir(self.root):
            if entry.name.endswith((".partial", ".lock")) or entry.name.startswith(".tmp-"):
                yield Path(entry.path)


@contextmanager
def _locked(partial: Path) -> Iterator[None]:
    lock = partial.with_name(partial.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # the lock file stays (removing it would race a waiter); gc sweeps it


def _unlink(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
