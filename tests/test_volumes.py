"""`run -v HOST:GUEST[:ro]`: a directory becomes a share, a single file is staged alone in a directory
of its own and bound in the guest; `/` and the store are never shared read-write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURE_SOURCES, fake_facts
from microvmc.backends.evalcache import CacheKey
from microvmc.cli import _parse
from microvmc.compiler.pipeline import compile_manifest, read_manifest
from microvmc.errors import ManifestError

MICROVMC = [sys.executable, "-m", "microvmc"]
TIMEOUT = 240
TRUE = 'version = 1\n[process]\nargv = ["true"]\n'


def compiled(tmp_path: Path, volumes: list[str], text: str = TRUE, store: str = "/s"):
    (tmp_path / "m.toml").write_text(text)
    m = read_manifest(tmp_path / "m.toml", cwd=str(tmp_path), volumes=volumes, store=store)
    return compile_manifest(m, facts=fake_facts(), store=store, sources=FIXTURE_SOURCES)


def test_v_is_a_volume_when_it_has_a_colon_else_verbose() -> None:
    args = _parse(["run", "-v", "a:/b", "-v", "c:/d:ro", "m.toml"])
    assert (args.volume, args.verbose, args.manifest) == (["a:/b", "c:/d:ro"], False, "m.toml")
    args = _parse(["run", "-v", "m.toml", "--volume", "x:/y"])
    assert (args.volume, args.verbose, args.manifest) == (["x:/y"], True, "m.toml")
    assert _parse(["-v", "build", "m.toml"]).verbose
    assert _parse(["exec", "web", "ls", "-v", "a:b"]).argv == ["ls", "-v", "a:b"]  # an exec's argv is its own


def test_a_directory_is_a_share_and_a_file_is_staged_alone(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "f.txt").write_text("x")
    c = compiled(tmp_path, ["dir:/data", "f.txt:/etc/motd:ro"])
    shares = {s.tag: s for s in c.manifest.shares}
    assert (shares["v0"].host, shares["v0"].guest, shares["v0"].read_only) == (str(tmp_path / "dir"), "/data", False)
    assert (shares["v1"].host, shares["v1"].staged_from, shares["v1"].hidden) == ("stage-v1", str(tmp_path / "f.txt"), True)
    params = c.plan.cmdline.split()
    assert "MVMC_S1=9p:v1:ro:/dev/.microvmc-v1" in params
    assert [p for p in params if p.startswith("MVMC_M")][-2:] == ["MVMC_M0=bind-ro:/dev/.microvmc-v1/f.txt:/etc/motd",
                                                                  "MVMC_M1=detach:/dev/.microvmc-v1:"]
    argv = c.plan.qemu_argv
    assert "local,id=fs-v1,path=stage-v1,security_model=none,readonly=on" in argv  # in the run directory
    launch = dict((name, content) for name, content, _ in c.output.files)["launch.sh"].decode()
    f = str(tmp_path / "f.txt")
    assert (f"mkdir stage-v1 || exit 121\nif ln -- {f} stage-v1/f.txt 2>/dev/null; then :\n"
            f'elif : > stage-v1/f.txt && mount --bind -- {f} stage-v1/f.txt 2>/dev/null; then '
            'staged_mounts="${staged_mounts:-} stage-v1/f.txt"\n'
            f"elif cp -p -- {f} stage-v1/f.txt; then :\n") in launch
    assert 'for m in ${staged_mounts:-}; do umount -- "$rundir/$m"' in launch


@pytest.mark.parametrize("volume, message", [
    ("/:/host", "-v /:/host: sharing the host's / read-write is refused (add :ro)"),
    ("{store}:/s", "-v {store}:/s: {store} is in microvmc's store, which is never shared read-write (add :ro)"),
    ("{store}/x:/s:rw", "-v {store}/x:/s:rw: {store}/x is in microvmc's store, which is never shared read-write (add :ro)"),
    ("nope:/n", "-v nope:/n: {tmp}/nope does not exist"),
    ("f:relative", "-v f:relative: 'relative' is not an absolute guest path; expected HOST:GUEST[:ro|rw]"),
    ("f:/x:z", "-v f:/x:z: 'z' is not ro or rw; expected HOST:GUEST[:ro|rw]"),
    ("f", "-v f: a host path and a guest path are both needed; expected HOST:GUEST[:ro|rw]"),
    ("f:/proc/x", "-v f:/proc/x: '/proc/x' is the guest's own /proc, where a file cannot be mounted"),
])
def test_what_a_volume_cannot_be(tmp_path: Path, volume: str, message: str) -> None:
    store = tmp_path / "store"
    (store / "x").mkdir(parents=True)
    (tmp_path / "f").write_text("")
    with pytest.raises(ManifestError) as err:
        compiled(tmp_path, [volume.format(store=store)], store=str(store))
    assert err.value.lines() == [message.format(store=store, tmp=tmp_path)]


def test_sharing_root_or_the_store_read_only_is_allowed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    c = compiled(tmp_path, ["/:/host:ro", f"{store}:/s:ro"], store=str(store))
    assert [(s.host, s.read_only) for s in c.manifest.shares] == [("/", True), (str(store), True)]


def test_a_volume_on_a_share_s_mount_point_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    with pytest.raises(ManifestError) as err:
        compiled(tmp_path, ["d:/data", "f:/data", "d:/data"])
    assert err.value.lines() == ['-v d:/data: shares.v2.guest: "/data" is already the mount point of share "v0"']


def test_the_evaluation_cache_keys_on_volumes_and_where_they_are_relative_to() -> None:
    base = dict(manifest="/m.toml", argv=(), env=(), store="/s", facts=fake_facts())
    keys = {CacheKey(**base).digest(), CacheKey(**base, volumes=("a:/b",), cwd="/x").digest(),
            CacheKey(**base, volumes=("a:/b",), cwd="/y").digest()}
    assert len(keys) == 3


@pytest.mark.boot
def test_a_single_file_read_only_and_read_write(boot_env, tmp_path: Path) -> None:
    """The program sees the one file (not its directory); a read-only one cannot be written, even by
    root; writes to a read-write one are on the host when run returns, also when the program is
    killed; nothing is left in the run's directory or mounted."""
    (tmp_path / "m.toml").write_text('version = 1\n[image]\nmode = "overlay"\n[process]\nargv = ["true"]\n')
    (tmp_path / "ro.txt").write_text("read me\n")
    (tmp_path / "rw.txt").write_text("before\n")
    (tmp_path / "secret").write_text("not shared\n")
    script = ("cat /etc/motd; echo x >> /etc/motd || echo refused; "
              "mount -o remount,rw /etc/motd 2>/dev/null; echo x >> /etc/motd 2>/dev/null || echo still refused; "
              "cat /data/rw.txt; echo written > /data/rw.txt; ls /data; ls -a /dev | grep -c microvmc; kill -KILL $$")
    r = subprocess.run([*MICROVMC, "run", "-v", "ro.txt:/etc/motd:ro", "-v", f"{tmp_path}/rw.txt:/data/rw.txt",
                        "m.toml", "--", "/bin/sh", "-c", script], env=boot_env, cwd=tmp_path, capture_output=True,
                       timeout=TIMEOUT)
    assert (r.returncode, r.stdout.decode()) == (128 + 9, "read me\nrefused\nstill refused\nbefore\nrw.txt\n0\n"), \
        r.stderr.decode()
    assert (tmp_path / "rw.txt").read_text() == "written\n"
    assert (tmp_path / "ro.txt").read_text() == "read me\n"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts


def test_the_evaluation_cache_sees_a_volume_turn_from_a_directory_into_a_file(boot_env, tmp_path: Path) -> None:
    """Whether HOST is a directory (a share) or a file (staged) is read through the recording
    HostFiles: the same `-v` text in the same directory compiles again once the answer changes."""
    import json
    import shutil

    env = dict(boot_env, MICROVMC_STORE=str(tmp_path / "store"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    (tmp_path / "m.toml").write_text(TRUE)
    (tmp_path / "x").mkdir()
    code = ("import sys; from microvmc.cli import main; status = main(['build', '--no-link', '-v', 'x:/x', 'm.toml']); "
            "print('COMPILED' if 'jsonschema' in sys.modules else 'CACHED', file=sys.stderr); sys.exit(status)")

    def build() -> tuple[dict, str]:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        plan = json.loads(Path(r.stdout.strip(), "plan.json").read_text())["plan"]
        return plan, r.stderr.splitlines()[-1]

    first, how = build()
    assert how == "COMPILED" and [p for p in first["cmdline"].split() if p.startswith("MVMC_S0=")] == \
        [f"MVMC_S0={first['cmdline'].split('MVMC_S0=')[1].split(':')[0]}:v0:rw:/x"]
    assert build() == (first, "CACHED")
    shutil.rmtree(tmp_path / "x")
    (tmp_path / "x").write_text("now a file\n")
    second, how = build()
    assert how == "COMPILED" and second != first
    assert [p for p in second["cmdline"].split() if p.startswith("MVMC_M")][-2:] == \
        ["MVMC_M0=bind-rw:/dev/.microvmc-v0/x:/x", "MVMC_M1=detach:/dev/.microvmc-v0:"]
    assert build() == (second, "CACHED")


def test_the_evaluation_cache_sees_a_volume_s_link_lead_into_the_store(boot_env, tmp_path: Path) -> None:
    """Where HOST leads (its realpath) decides the refusal of the store read-write: a link repointed
    into the store between two identical runs is refused, not answered from the cache."""
    env = dict(boot_env, MICROVMC_STORE=str(tmp_path / "store"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    (tmp_path / "m.toml").write_text(TRUE)
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to("d")
    argv = [*MICROVMC, "build", "--no-link", "-v", "link:/x", "m.toml"]
    first = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    inside = tmp_path / "store" / "inside"
    inside.mkdir()
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to(inside)
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (125, f"-v link:/x: {tmp_path}/link is in microvmc's store, "
                                             "which is never shared read-write (add :ro)\n")
