"""compiler/hostfiles.py: resolve reads the host only through one reader that records every look."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from microvmc.compiler.hostfiles import HostFiles, Look, Observation

TESTS = Path(__file__).resolve().parent

# In a fresh interpreter (an audit hook cannot be removed): compile once so that every module is
# imported, then again with a hook that notes every file opened and directory listed.
AUDIT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[2])
from conftest import FIXTURE_SOURCES, fake_facts
from microvmc.compiler.pipeline import compile_manifest, read_manifest

manifest = read_manifest(sys.argv[1])
compile_manifest(manifest, facts=fake_facts(), store="/s", sources=FIXTURE_SOURCES)
touched, active = [], [False]

def hook(event, args):
    if active[0] and event in ("open", "os.listdir", "os.scandir") and isinstance(args[0], (str, bytes)):
        touched.append([event, os.path.abspath(os.fsdecode(args[0]))])

sys.addaudithook(hook)
active[0] = True
compiled = compile_manifest(manifest, facts=fake_facts(), store="/s", sources=FIXTURE_SOURCES)
active[0] = False
print(json.dumps({"touched": touched, "observed": [o.to_list() for o in compiled.graph.observed]}))
"""


def test_resolve_opens_and_lists_only_what_it_records(tmp_path: Path) -> None:
    for d in ("image/proc", "image/sys", "image/dev", "data"):
        (tmp_path / d).mkdir(parents=True)
    manifest = tmp_path / "m.toml"
    manifest.write_text('version = 1\n[image]\nsource = "directory"\npath = "image"\nmode = "read-only"\n'
                        '[process]\nargv = ["true"]\n[shares.data]\nhost = "data"\nguest = "/data"\nread_only = true\n')
    r = subprocess.run([sys.executable, "-c", AUDIT, str(manifest), str(TESTS)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    observed = {(look, path) for look, path, _ in result["observed"]}
    wanted = {"open": Look.CONTENT, "os.listdir": Look.ENTRIES, "os.scandir": Look.ENTRIES}
    touched = {(str(wanted[event]), path) for event, path in result["touched"]}
    assert touched and touched <= observed  # the kernel, its modules and config, the init sources, ...
    image = str(tmp_path / "image")
    # and what no file was opened for: the image, the share, the mount points looked for in the image
    assert {("is-dir", image), ("is-dir", str(tmp_path / "data")), ("is-dir", f"{image}/proc"),
            ("is-dir", f"{image}/data")} <= observed


def test_a_look_holds_while_the_host_answers_the_same(tmp_path: Path) -> None:
    files = HostFiles()
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"one")
    assert files.is_dir(str(tmp_path / "d")) and not files.is_file(str(tmp_path / "d"))
    assert not files.exists(str(tmp_path / "gone"))
    assert files.read(str(tmp_path / "f")) == b"one"
    assert files.listdir(str(tmp_path)) == ["d", "f"]
    assert [(top, dirs, names) for top, dirs, names in files.walk(str(tmp_path))] == [
        (str(tmp_path), ["d"], ["f"]), (str(tmp_path / "d"), [], [])]
    seen = files.observations()
    assert len(seen) == len({(o.look, o.path) for o in seen})  # each look once
    assert all(Observation.from_list(json.loads(json.dumps(o.to_list()))).holds() for o in seen)

    def broken() -> set[tuple[str, str]]:
        return {(str(o.look), os.path.relpath(o.path, tmp_path)) for o in seen if not o.holds()}

    (tmp_path / "f").write_bytes(b"two")
    assert broken() == {("content", "f")}
    (tmp_path / "gone").mkdir()
    assert broken() == {("content", "f"), ("exists", "gone"), ("entries", ".")}
    (tmp_path / "gone").rmdir()
    (tmp_path / "d" / "x").write_bytes(b"")
    assert broken() == {("content", "f"), ("entries", "d")}


def test_an_old_fingerprint_stands_for_the_content(tmp_path: Path, monkeypatch) -> None:
    """A hit does not hash the kernel or list its module tree again: their timestamps are settled."""
    import microvmc.compiler.hostfiles as hostfiles

    (tmp_path / "f").write_bytes(b"one")
    monkeypatch.setattr(hostfiles, "SETTLED", -1)  # everything is old enough
    files = HostFiles()
    files.read(str(tmp_path / "f"))
    files.listdir(str(tmp_path))
    (content, _, (fingerprint, sha)), (entries, _, (dir_fingerprint, names)) = [o.to_list() for o in files.observed]
    assert (content, entries, sha) == ("content", "entries", None) and fingerprint and dir_fingerprint and names
    assert all(o.holds() for o in files.observed)
    (tmp_path / "f").write_bytes(b"three")
    assert [o.holds() for o in files.observed] == [False, True]


def test_a_links_target_holds_while_it_is_the_same(tmp_path: Path) -> None:
    files = HostFiles()
    os.symlink("../run/x", tmp_path / "l")
    (tmp_path / "f").write_bytes(b"")
    assert (files.readlink(str(tmp_path / "l")), files.readlink(str(tmp_path / "f"))) == ("../run/x", None)
    seen = files.observations()
    assert all(o.holds() for o in seen)
    (tmp_path / "l").unlink()
    os.symlink("/run/x", tmp_path / "l")
    assert [os.path.basename(o.path) for o in seen if not o.holds()] == ["l"]


def test_sha256_small_and_large_is_hashlibs(tmp_path) -> None:
    """store.sha256 hashes small data without OpenSSL, large data with it: the same digests."""
    import hashlib

    from microvmc.compiler import store

    for size in (0, 1, store.SMALL - 1, store.SMALL, 3 * store.SMALL + 5):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        (tmp_path / "f").write_bytes(data)
        want = hashlib.sha256(data).hexdigest()
        assert store.sha256(data).hexdigest() == want and store.file_digest(tmp_path / "f") == want
        h = store.sha256(size=size)
        h.update(data)
        assert h.hexdigest() == want
