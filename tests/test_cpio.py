"""compiler/cpio.py: GNU cpio is the oracle for the archives, gzip(1) for the compression."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microvmc.compiler.cpio import Entry, EntryKind, gzip_deterministic, write_newc

FILE, DIR, SYMLINK = EntryKind.FILE, EntryKind.DIR, EntryKind.SYMLINK

SAMPLE = (
    Entry(path="usr/bin/hello", kind=FILE, mode=0o4755, data=b"hi\n"),
    Entry(path="lib", kind=SYMLINK, target="usr/lib"),
    Entry(path="empty", kind=FILE, mode=0o000),
    Entry(path="d0", kind=DIR, mode=0o700),
    Entry(path="d0/f", kind=FILE, data=b"abcde"),
    Entry(path="d0/sub", kind=DIR, mode=0o1777),
)


def extract(archive: bytes, into: Path) -> None:
    # umask 0: modes on disk come from the archive alone.
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames"],
        input=archive,
        cwd=into,
        check=True,
        umask=0,
    )


def on_disk(root: Path) -> dict[str, tuple]:
    """path -> (kind, permission bits, contents or target), as the file system has it."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            info = full.lstat()
            path = full.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                found[path] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(info.st_mode):
                found[path] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                assert stat.S_ISREG(info.st_mode), path
                found[path] = ("file", stat.S_IMODE(info.st_mode), full.read_bytes())
    return found


def expected(entries, implicit_dirs: tuple[str, ...] = ()) -> dict[str, tuple]:
    defaults = {FILE: 0o644, DIR: 0o755}
    result: dict[str, tuple] = {path: ("dir", 0o755) for path in implicit_dirs}
    for entry in entries:
        mode = entry.mode if entry.mode is not None else defaults.get(entry.kind)
        result[entry.path] = {
            FILE: ("file", mode, entry.data),
            DIR: ("dir", mode),
            SYMLINK: ("symlink", entry.target),
        }[entry.kind]
    return result


def parse_newc(archive: bytes) -> list[dict]:
    """A small independent reader, to check the header fields GNU cpio does not show."""
    records = []
    offset = 0
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
             "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
    while True:
        assert archive[offset : offset + 6] == b"070701"
        fields = {
            key: int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i, key in enumerate(names)
        }
        name_start = offset + 110
        fields["name"] = archive[name_start : name_start + fields["namesize"] - 1].decode()
        assert archive[name_start + fields["namesize"] - 1] == 0
        data_start = (name_start + fields["namesize"] + 3) & ~3
        fields["data"] = archive[data_start : data_start + fields["filesize"]]
        offset = (data_start + fields["filesize"] + 3) & ~3
        records.append(fields)
        if fields["name"] == "TRAILER!!!":
            assert offset == len(archive)
            return records


def test_one_file_archive_exact_bytes():
    archive = write_newc([Entry(path="a", kind=FILE, mode=0o644, data=b"xy")])
    assert archive == (
        b"070701" + b"00000001" + b"000081A4" + b"00000000" * 2 + b"00000001" + b"00000000"
        + b"00000002" + b"00000000" * 4 + b"00000002" + b"00000000" + b"a\0"
        + b"xy\0\0"
        + b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B" + b"00000000"
        + b"TRAILER!!!\0" + b"\0\0\0"
    )


def test_gnu_cpio_lists_the_sample(tmp_path):
    listing = subprocess.run(
        ["cpio", "-tv", "--quiet"],
        input=write_newc(SAMPLE),
        capture_output=True,
        check=True,
        env={**os.environ, "TZ": "UTC", "LC_ALL": "C"},
    ).stdout.decode()
    assert listing.splitlines() == [
        "drwx------   2 root     root            0 Jan  1  1970 d0",
        "-rw-r--r--   1 root     root            5 Jan  1  1970 d0/f",
        "drwxrwxrwt   2 root     root            0 Jan  1  1970 d0/sub",
        "----------   1 root     root            0 Jan  1  1970 empty",
        "lrwxrwxrwx   1 root     root            7 Jan  1  1970 lib -> usr/lib",
        "drwxr-xr-x   2 root     root            0 Jan  1  1970 usr",
        "drwxr-xr-x   2 root     root            0 Jan  1  1970 usr/bin",
        "-rwsr-xr-x   1 root     root            3 Jan  1  1970 usr/bin/hello",
    ]


def test_gnu_cpio_extracts_the_sample(tmp_path):
    extract(write_newc(SAMPLE), tmp_path)
    assert on_disk(tmp_path) == expected(SAMPLE, implicit_dirs=("usr", "usr/bin"))


def test_header_fields_are_fixed_and_inodes_sequential():
    records = parse_newc(write_newc(SAMPLE))
    assert [(r["ino"], r["name"], r["nlink"]) for r in records] == [
        (1, "d0", 2),
        (2, "d0/f", 1),
        (3, "d0/sub", 2),
        (4, "empty", 1),
        (5, "lib", 1),
        (6, "usr", 2),
        (7, "usr/bin", 2),
        (8, "usr/bin/hello", 1),
        (0, "TRAILER!!!", 1),
    ]
    for record in records:
        assert (record["uid"], record["gid"], record["mtime"], record["check"]) == (0, 0, 0, 0)
        devices = (record["devmajor"], record["devminor"], record["rdevmajor"], record["rdevminor"])
        assert devices == (0, 0, 0, 0)
    assert [oct(r["mode"]) for r in records[:-1]] == [
        "0o40700", "0o100644", "0o41777", "0o100000", "0o120777", "0o40755", "0o40755", "0o104755",
    ]
    assert records[4]["data"] == b"usr/lib"


def test_order_of_input_does_not_matter():
    assert write_newc(reversed(SAMPLE)) == write_newc(SAMPLE)
    assert write_newc(sorted(SAMPLE, key=lambda e: e.data)) == write_newc(SAMPLE)


def test_sorting_is_by_bytes_and_parents_precede_children():
    archive = write_newc([
        Entry(path="a/b", kind=FILE),
        Entry(path="a.b", kind=FILE),
        Entry(path="a-", kind=FILE),
        Entry(path="é", kind=FILE),
        Entry(path="z", kind=FILE),
    ])
    assert [r["name"] for r in parse_newc(archive)] == ["a", "a-", "a.b", "a/b", "z", "é", "TRAILER!!!"]


def test_duplicate_paths_are_refused():
    with pytest.raises(ValueError) as err:
        write_newc([Entry(path="etc", kind=DIR), Entry(path="etc", kind=FILE)])
    assert str(err.value) == "duplicate cpio entry path 'etc'"


def test_a_file_cannot_be_a_parent():
    with pytest.raises(ValueError) as err:
        write_newc([Entry(path="etc", kind=FILE), Entry(path="etc/hosts", kind=FILE)])
    assert str(err.value) == "etc/hosts: parent 'etc' is a file, not a dir"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "/etc", "kind": FILE}, "cpio entry path '/etc' is not a normalized relative path"),
        ({"path": "a//b", "kind": FILE}, "cpio entry path 'a//b' is not a normalized relative path"),
        ({"path": "a/../b", "kind": FILE}, "cpio entry path 'a/../b' is not a normalized relative path"),
        ({"path": "a/", "kind": DIR}, "cpio entry path 'a/' is not a normalized relative path"),
        ({"path": "", "kind": DIR}, "cpio entry path '' is not a normalized relative path"),
        (
            {"path": "a", "kind": FILE, "mode": 0o10644},
            "a: mode 0o10644 has bits beyond the permission bits 0o7777",
        ),
        ({"path": "a", "kind": DIR, "data": b"x"}, "a: a dir entry cannot have data"),
        ({"path": "a", "kind": SYMLINK}, "a: symlink target '' is empty or contains NUL"),
        ({"path": "a", "kind": FILE, "target": "b"}, "a: a file entry cannot have a symlink target"),
    ],
)
def test_invalid_entries(kwargs, message):
    with pytest.raises(ValueError) as err:
        Entry(**kwargs)
    assert str(err.value) == message


def test_gzip_is_deterministic_and_gzip_reads_it():
    data = write_newc(SAMPLE) * 50
    first = gzip_deterministic(data)
    assert gzip_deterministic(data) == first
    # magic, deflate, no flags (no name), mtime 0, XFL 0, OS unknown
    assert first[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    assert gzip.decompress(first) == data
    assert subprocess.run(["gzip", "-dc"], input=first, capture_output=True, check=True).stdout == data
    assert gzip_deterministic(data, level=9)[8] == 2
    assert gzip_deterministic(data, level=1)[8] == 4
    assert len(gzip_deterministic(data, level=9)) < len(gzip_deterministic(b"", level=9)) + len(data)


# Random trees: names may hold any character but "/" and NUL (spaces, newlines, UTF-8).
_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=8
).filter(lambda name: name not in (".", ".."))
_file = st.tuples(st.just("file"), st.integers(0, 0o7777), st.binary(max_size=70))
_link = st.tuples(st.just("symlink"), st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
                                             min_size=1, max_size=40))
# Directories keep owner rwx so that a non-root GNU cpio can fill and clean them up.
_dir_mode = st.integers(0, 0o7777).map(lambda mode: mode | 0o700)
_tree = st.recursive(
    _file | _link,
    # (kind, explicit entry or implied by its children, mode, children)
    lambda children: st.tuples(st.just("dir"), st.booleans(), _dir_mode,
                               st.dictionaries(_names, children, max_size=4)),
    max_leaves=15,
)


def _flatten(prefix: str, children: dict) -> tuple[list[Entry], list[str]]:
    entries: list[Entry] = []
    implicit: list[str] = []
    for name, node in children.items():
        path = f"{prefix}{name}"
        if node[0] == "file":
            entries.append(Entry(path=path, kind=FILE, mode=node[1], data=node[2]))
        elif node[0] == "symlink":
            entries.append(Entry(path=path, kind=SYMLINK, target=node[1]))
        else:
            _, explicit, mode, grandchildren = node
            sub_entries, sub_implicit = _flatten(path + "/", grandchildren)
            if explicit or not sub_entries:
                entries.append(Entry(path=path, kind=DIR, mode=mode))
            else:
                implicit.append(path)
            entries += sub_entries
            implicit += sub_implicit
    return entries, implicit


# No example database: it would write .hypothesis/ into the checkout.
@settings(max_examples=60, deadline=None, database=None)
@given(st.dictionaries(_names, _tree, min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_random_trees_round_trip_through_gnu_cpio(tree, random):
    entries, implicit = _flatten("", tree)
    archive = write_newc(entries)
    shuffled = list(entries)
    random.shuffle(shuffled)
    assert write_newc(shuffled) == archive
    with tempfile.TemporaryDirectory() as tmp:
        extract(archive, Path(tmp))
        assert on_disk(Path(tmp)) == expected(entries, tuple(implicit))
