"""The guest init on real boots, for what the manifest cannot say yet: the program's user and limits
(set by the images work and the OCI runtime). Compiled and realized as `run` does, run by the backend."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from microvmc.backends.build import realize
from microvmc.backends.host import init_compiler, probe_host
from microvmc.backends.monitor import run_plan
from microvmc.compiler.cmdline import GuestUser, Rlimit
from microvmc.compiler.pipeline import compile_manifest, read_manifest

pytestmark = pytest.mark.boot


def glibc(facts):
    """The host without musl-gcc: the init compiled with `cc` and glibc, as before musl."""
    return facts.replace(**init_compiler(facts.cc, facts.cc_version, None, ""))


def boot(boot_env, tmp_path: Path, monkeypatch, script: str, libc: str = "", **process) -> tuple[int, bytes, bytes]:
    for key in ("MICROVMC_STORE", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(key, boot_env[key])
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    manifest_file = tmp_path / "m.toml"
    manifest_file.write_text('version = 1\n[process]\nargv = ["/bin/sh", "-c", "true"]\n')
    manifest = read_manifest(manifest_file, argv=["/bin/sh", "-c", script])
    manifest = replace(manifest, process=replace(manifest.process, **process))
    facts = glibc(probe_host()) if libc == "glibc" else probe_host()
    compiled = compile_manifest(manifest, facts=facts, store=boot_env["MICROVMC_STORE"])
    assert compiled.graph.node("init").param("libc") == (libc or facts.init_libc)
    realize(compiled)
    logs = tmp_path / "logs"
    logs.mkdir()
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err, open(os.devnull) as null:
        status = run_plan(compiled.plan, log_dir=logs, stdin=null.fileno(), stdout=out.fileno(), stderr=err.fileno())
    return status, (tmp_path / "out").read_bytes(), (tmp_path / "err").read_bytes()


# The init as setup compiles it (with musl), and with glibc where musl-gcc is not installed.
@pytest.mark.parametrize("libc", ["musl", "glibc"])
def test_the_program_runs_as_its_user_with_its_groups_and_limits(boot_env, tmp_path, monkeypatch, libc) -> None:
    status, out, err = boot(
        boot_env, tmp_path, monkeypatch,
        "id -u; id -g; id -G; ulimit -n; ulimit -Hn; ulimit -u; touch /tmp/f && stat -c %u:%g /tmp/f; exit 3", libc=libc,
        user=GuestUser(uid=1000, gid=1001, groups=(1001, 20, 30)),
        rlimits=(Rlimit(name="NOFILE", soft=123, hard=456), Rlimit(name="NPROC", soft=None, hard=None)))
    assert (status, err) == (3, b"")
    assert out.decode().split("\n") == ["1000", "1001", "1001 20 30", "123", "456", "unlimited", "1000:1001", ""]


def test_without_a_user_the_program_is_root_with_no_supplementary_groups(boot_env, tmp_path, monkeypatch) -> None:
    status, out, _ = boot(boot_env, tmp_path, monkeypatch, "id -u; id -G")
    assert (status, out) == (0, b"0\n0\n")


def test_a_user_init_cannot_switch_to_is_reported(boot_env, tmp_path, monkeypatch) -> None:
    # A huge limit the guest kernel refuses to raise: init says which step failed.
    status, _, err = boot(boot_env, tmp_path, monkeypatch, "true",
                          rlimits=(Rlimit(name="NOFILE", soft=1 << 40, hard=1 << 40),))
    assert status == 120
    assert b"guest init failed at rlimit" in err
