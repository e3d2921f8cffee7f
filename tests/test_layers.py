"""Unpacking layers: whiteouts, opaque directories, links, modes, ownership, xattrs, compression,
and every kind of hostile member refused or neutralised, one by one."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
import tarfile

import pytest
import zstandard

from microvmc.backends.unpack import Layer, Ownership, read_guest_file, unpack_layers
from microvmc.compiler.layers import Kind, LayerError, classify, resolve_in_root

ROOT = os.geteuid() == 0


def member(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, uid=0, gid=0, link="", xattrs=None, size=None):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.linkname, info.mtime = kind, mode, uid, gid, link, 1_700_000_000
    info.size = len(data) if size is None else size
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info, data


def tar(*members, compression="none") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buf.getvalue()
    if compression == "gzip":
        return gzip.compress(raw)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def layers(tmp_path, *blobs, compression="none", diff_ids=None):
    out = []
    for i, blob in enumerate(blobs):
        path = tmp_path / f"layer{i}"
        path.write_bytes(blob)
        out.append(Layer(path=str(path), compression=compression, digest="sha256:" + hashlib.sha256(blob).hexdigest(),
                         diff_id=diff_ids[i] if diff_ids else None))
    return out


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "rootfs"
    r.mkdir()
    return r


def unpack(tmp_path, root, *blobs, ownership=Ownership.NATIVE, **kw):
    return unpack_layers(layers(tmp_path, *blobs, **kw), str(root), ownership)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_compressions_and_diff_id(tmp_path, root, compression):
    raw = tar(member("etc/", tarfile.DIRTYPE, mode=0o755), member("etc/hostname", data=b"box\n"))
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    blob = {"none": raw, "gzip": gzip.compress(raw), "zstd": zstandard.ZstdCompressor().compress(raw)}[compression]
    unpack(tmp_path, root, blob, compression=compression, diff_ids=[diff_id])
    assert (root / "etc/hostname").read_bytes() == b"box\n"


def test_diff_id_mismatch(tmp_path, root):
    raw = tar(member("a", data=b"x"))
    with pytest.raises(LayerError) as err:
        unpack(tmp_path, root, raw, diff_ids=["sha256:" + "0" * 64])
    assert "its uncompressed content does not match the image config's diff_id sha256:000" in str(err.value)


def test_corrupt_gzip(tmp_path, root):
    blob = gzip.compress(tar(member("a", data=b"x" * 1000)))[:-30]
    with pytest.raises(LayerError) as err:
        unpack(tmp_path, root, blob, compression="gzip")
    assert "is not a valid gzip tar archive" in str(err.value)


def test_whiteouts_and_opaque_directories(tmp_path, root):
    lower = tar(member("etc/", tarfile.DIRTYPE, mode=0o755), member("etc/a", data=b"a"), member("etc/b", data=b"b"),
                member("opt/", tarfile.DIRTYPE, mode=0o755), member("opt/old1", data=b"1"),
                member("opt/sub/", tarfile.DIRTYPE), member("opt/sub/old2", data=b"2"),
                member("gone/", tarfile.DIRTYPE), member("gone/x", data=b"x"))
    upper = tar(member("etc/.wh.a"), member("etc/b", data=b"new b"), member("etc/c", data=b"c"),
                member("etc/.wh.c"),  # a whiteout hides only the layers below, not this one's c
                member("opt/new", data=b"n"), member("opt/.wh..wh..opq"),  # opaque after new: new stays
                member(".wh.gone"), member(".wh..wh.plnk"))
    unpack(tmp_path, root, lower, upper)
    assert sorted(os.listdir(root / "etc")) == ["b", "c"]
    assert (root / "etc/b").read_bytes() == b"new b"
    assert os.listdir(root / "opt") == ["new"]
    assert not (root / "gone").exists()
    assert not any(name.startswith(".wh.") for _, dirs, files in os.walk(root) for name in dirs + files)


def test_file_replaced_by_directory_and_back(tmp_path, root):
    unpack(tmp_path, root, tar(member("x", data=b"f"), member("d/", tarfile.DIRTYPE), member("d/f", data=b"1")),
           tar(member("x/", tarfile.DIRTYPE), member("x/in", data=b"i"), member("d", data=b"now a file")))
    assert (root / "x/in").read_bytes() == b"i" and (root / "d").read_bytes() == b"now a file"


@pytest.mark.skipif(not ROOT, reason="real ownership needs root")
def test_native_links_modes_ownership_xattrs(tmp_path, root):
    unpack(tmp_path, root, tar(
        member("usr/bin/", tarfile.DIRTYPE, mode=0o755),
        member("usr/bin/passwd", data=b"#!/bin/sh\n", mode=0o4755),
        member("usr/bin/wall", data=b"w", mode=0o2755, gid=5),
        member("usr/bin/chfn", tarfile.LNKTYPE, link="usr/bin/passwd"),
        member("usr/bin/sh", tarfile.SYMTYPE, link="/bin/dash"),
        member("home/app/", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000),
        member("home/app/f", data=b"x", mode=0o600, uid=1000, gid=1000, xattrs={"user.note": "hello"}),
        member("tmp/", tarfile.DIRTYPE, mode=0o1777),
        member("run/fifo", tarfile.FIFOTYPE, mode=0o620),
    ))
    st = os.lstat(root / "usr/bin/passwd")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o4755)
    assert stat.S_IMODE(os.lstat(root / "usr/bin/wall").st_mode) == 0o2755
    assert os.lstat(root / "usr/bin/chfn").st_ino == st.st_ino
    assert os.readlink(root / "usr/bin/sh") == "/bin/dash"
    home = os.lstat(root / "home/app")
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o750)
    assert os.getxattr(root / "home/app/f", "user.note") == b"hello"
    assert stat.S_IMODE(os.lstat(root / "tmp").st_mode) == 0o1777
    assert stat.S_ISFIFO(os.lstat(root / "run/fifo").st_mode)
    assert os.lstat(root / "usr/bin/passwd").st_mtime == 1_700_000_000


def mapped(path):
    return tuple(struct.unpack("<I", os.getxattr(path, f"user.virtfs.{k}", follow_symlinks=False))[0]
                 for k in ("uid", "gid", "mode"))


def test_mapped_xattr_ownership(tmp_path, root):
    """What an ordinary user writes: QEMU's mapped-xattr representation."""
    notes = unpack(tmp_path, root, tar(
        member("usr/bin/", tarfile.DIRTYPE, mode=0o755),
        member("usr/bin/passwd", data=b"p", mode=0o4755),
        member("usr/bin/sh", tarfile.SYMTYPE, link="/bin/dash"),
        member("home/app/", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1001),
        member("etc/passwd", tarfile.SYMTYPE, link="../usr/passwd.real"),
        member("usr/passwd.real", data=b"root:x:0:0::/root:/bin/sh\n"),
    ), ownership=Ownership.MAPPED_XATTR)
    assert mapped(root / "usr/bin/passwd") == (0, 0, stat.S_IFREG | 0o4755)
    assert stat.S_IMODE(os.lstat(root / "usr/bin/passwd").st_mode) == 0o600  # the host's own bits
    assert mapped(root / "home/app") == (1000, 1001, stat.S_IFDIR | 0o750)
    link = root / "usr/bin/sh"
    assert stat.S_ISREG(os.lstat(link).st_mode) and link.read_bytes() == b"/bin/dash"
    assert mapped(link) == (0, 0, stat.S_IFLNK | 0o777)
    # A path through a mapped symbolic link resolves as the guest's would.
    assert read_guest_file(str(root), "/etc/passwd", Ownership.MAPPED_XATTR).startswith("root:x:0:0:")
    assert notes == []


def test_device_nodes_are_skipped_with_a_note(tmp_path, root):
    notes = unpack(tmp_path, root, tar(member("dev/", tarfile.DIRTYPE), member("dev/sda", tarfile.BLKTYPE),
                                       member("dev/null", tarfile.CHRTYPE)))
    assert os.listdir(root / "dev") == []
    assert notes == ["dev/sda: skipped, a device node (the guest's /dev is a devtmpfs)",
                     "dev/null: skipped, a device node (the guest's /dev is a devtmpfs)"]


# --- hostile layers, one by one ----------------------------------------------------------------

def outside(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("rootfs",) and not p.name.startswith("layer"))


@pytest.mark.parametrize("members, message", [
    ([member("/etc/passwd", data=b"x")], "'/etc/passwd': an absolute name would be written outside the root filesystem"),
    ([member("../escape", data=b"x")], "'../escape': '..' would climb out of the root filesystem"),
    ([member("a/../../escape", data=b"x")], "'a/../../escape': '..' would climb out of the root filesystem"),
    ([member("link", tarfile.LNKTYPE, link="../../etc/shadow")],
     "'link -> ../../etc/shadow': '..' would climb out of the root filesystem"),
    ([member("link", tarfile.LNKTYPE, link="missing")], "'link': the hard link's target 'missing' is not in the image"),
    ([member("d/", tarfile.DIRTYPE), member("link", tarfile.LNKTYPE, link="d")], "'link': a hard link to the directory 'd'"),
    ([member("x" * 300, data=b"x")], "a name component longer than 255 bytes"),
    ([member("a/" * 2100, data=b"x")], "longer than a path may be (4095)"),
    ([member(".wh..", data=b"")], "'.wh..': a whiteout of '.' names no file"),
    ([member("sparse", b"S")], "'sparse': GNU sparse files are not supported"),
])
def test_hostile_members_are_refused(tmp_path, root, members, message):
    with pytest.raises(LayerError) as err:
        unpack(tmp_path, root, tar(*members))
    assert message in str(err.value) and str(err.value).startswith("layer 1 (sha256:")
    assert outside(tmp_path) == []


def test_symlink_escape_is_resolved_inside_the_root(tmp_path, root):
    """A directory symlink to a host path, then a file below it: written inside the root."""
    target = tmp_path / "host-dir"
    target.mkdir()
    unpack(tmp_path, root, tar(member("evil", tarfile.SYMTYPE, link=str(target)),
                               member("up", tarfile.SYMTYPE, link="../../.."),
                               member("evil/planted", data=b"x"), member("up/also", data=b"y")))
    assert list(target.iterdir()) == []
    assert (root / str(target).lstrip("/") / "planted").read_bytes() == b"x"
    assert (root / "also").read_bytes() == b"y"
    assert os.readlink(root / "evil") == str(target)  # the link itself is kept as the guest's


def test_hard_link_through_a_symlink_stays_inside(tmp_path, root):
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    with pytest.raises(LayerError) as err:
        unpack(tmp_path, root, tar(member("s", tarfile.SYMTYPE, link=str(tmp_path)),
                                   member("stolen", tarfile.LNKTYPE, link="s/secret")))
    assert "the hard link's target 's/secret' is not in the image" in str(err.value)
    assert secret.stat().st_nlink == 1


def test_whiteout_through_a_symlink_stays_inside(tmp_path, root):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    unpack(tmp_path, root, tar(member("s", tarfile.SYMTYPE, link=str(tmp_path))), tar(member("s/.wh.victim")))
    assert victim.read_text() == "keep me"


def test_oversized_pax_header(tmp_path, root):
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 2 << 20
    blob = header.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * (2 << 20)
    with pytest.raises(LayerError) as err:
        unpack(tmp_path, root, blob)
    assert "a tar extended header of 2097152 bytes (at most 1048576 are accepted)" in str(err.value)


def test_symlink_loop(tmp_path, root):
    with pytest.raises(LayerError) as err:
        unpack(tmp_path, root, tar(member("a", tarfile.SYMTYPE, link="b"), member("b", tarfile.SYMTYPE, link="a"),
                                   member("a/x", data=b"")))
    assert "more than 40 symbolic links on the way" in str(err.value)


@pytest.mark.parametrize("name, type_, link, kind", [
    ("etc/.wh.passwd", tarfile.REGTYPE, "", Kind.WHITEOUT),
    ("etc/.wh..wh..opq", tarfile.REGTYPE, "", Kind.OPAQUE),
    ("./etc/", tarfile.DIRTYPE, "", Kind.DIRECTORY),
    ("x", tarfile.LNKTYPE, "/usr/bin/y", Kind.HARDLINK),
    ("x", tarfile.CHRTYPE, "", Kind.SKIP),
])
def test_classify(name, type_, link, kind):
    assert classify(name, type_, link).kind is kind


def test_resolve_in_root():
    links = {("a",): "/b/c", ("b", "c", "d"): "../../e", ("up",): "../../../x"}
    assert resolve_in_root(("a", "d", "f"), links.get) == ("e", "f")
    assert resolve_in_root(("up", "y"), links.get) == ("x", "y")
    assert resolve_in_root(("a",), links.get) == ("a",)
    assert resolve_in_root(("a",), links.get, follow_last=True) == ("b", "c")
