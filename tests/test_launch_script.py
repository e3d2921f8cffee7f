"""launch.sh is safe for every value that reaches it (issue 6, item 2): whatever a path, name, comment or
argument holds, the script parses, runs no injected command, and hands QEMU and virtiofsd exactly the
argv of the plan. Checked by running the real script with stand-ins for QEMU and virtiofsd."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURE_SOURCES, fake_facts
from microvmc.compiler.emit import launch_script
from microvmc.compiler.load import Loaded
from microvmc.compiler.manifest import validate
from microvmc.compiler.pipeline import compile_manifest

# Stand-ins: each writes its argv (NUL-separated) to $ARGV_OUT/<name>; virtiofsd also makes its socket
# and waits to be stopped, QEMU ends at once without a report (the script then exits 123).
FAKE_QEMU = f"""#!{sys.executable}
import os, sys
open(os.path.join(os.environ["ARGV_OUT"], "qemu"), "wb").write(b"\\0".join(map(os.fsencode, sys.argv[1:])))
"""
FAKE_VIRTIOFSD = f"""#!{sys.executable}
import os, signal, socket, sys
open(os.path.join(os.environ["ARGV_OUT"], "virtiofsd"), "wb").write(b"\\0".join(map(os.fsencode, sys.argv[1:])))
path = [a for a in sys.argv if a.startswith("--socket-path=")][-1].split("=", 1)[1]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.pause()
"""


def _plan(tmp_path: Path):
    doc = {"version": 1, "process": {"argv": ["true"]},
           "shares": {"d": {"host": str(tmp_path), "guest": "/d", "transport": "virtiofs"}}}
    manifest = validate(Loaded(data=doc, origins={}, files=(str(tmp_path / "m.toml"),), root="m.toml"))
    return compile_manifest(manifest, facts=fake_facts(), store="/s", sources=FIXTURE_SOURCES).plan


def _tools(folder: Path) -> tuple[str, str]:
    folder.mkdir(exist_ok=True)
    paths = []
    for name, text in (("qemu", FAKE_QEMU), ("virtiofsd", FAKE_VIRTIOFSD)):
        path = folder / name
        path.write_text(text)
        path.chmod(0o755)
        paths.append(str(path))
    return paths[0], paths[1]


PAYLOADS = ("\ntouch {m}\n", "$(touch {m})", "`touch {m}`", "'; touch {m}; '", '"; touch {m}; "', "\\\n touch {m}",
            "\r\ntouch {m}", "\u2028touch {m}", "${{x:=$(touch {m})}}", "%s\\", "\udcff\udc80", "-o", "--", " ", "")
# Any text but NUL, which no argv can hold and validation refuses, and lone surrogates, which no
# file name or argv decodes to (surrogateescape gives only U+DC80-U+DCFF, kept here).
values = st.lists(st.one_of(st.sampled_from(PAYLOADS), st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)) | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), max_size=8)),
                  min_size=1, max_size=4).map("".join)


def test_hostile_values_reach_programs_exactly_and_run_nothing(tmp_path: Path) -> None:
    qemu, virtiofsd = _tools(tmp_path / "bin")
    base = _plan(tmp_path)
    work = tmp_path / "work"
    work.mkdir()

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
    @given(name=values, source=values, comment=values, keys=values, arg=values, shared_dir=values, vargs=values)
    def check(name, source, comment, keys, arg, shared_dir, vargs) -> None:
        marker = work / "INJECTED"
        fill = lambda v: v.replace("{m}", str(marker)).replace("{{", "{").replace("}}", "}")  # noqa: E731
        name, source, comment, keys, arg, shared_dir, vargs = map(
            fill, (name, source, comment, keys, arg, shared_dir, vargs))
        groups = list(base.qemu)
        groups[0] = dataclasses.replace(groups[0], args=(qemu, *groups[0].args[1:]))
        groups[1] = dataclasses.replace(groups[1], comment=comment, keys=(keys,), args=(*groups[1].args, arg, "-x", arg))
        daemon = dataclasses.replace(base.virtiofsd[1], shared_dir=shared_dir, keys=(keys,),
                                     argv=(virtiofsd, vargs, "--", shared_dir))
        plan = dataclasses.replace(base, name=name, sources=(source, *base.sources), qemu=tuple(groups),
                                   virtiofsd=(daemon,))
        script = work / "launch.sh"
        script.write_bytes(launch_script(plan).encode("utf-8", "surrogateescape"))
        assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0
        out = work / "argv"
        out.mkdir(exist_ok=True)
        env = {**os.environ, "ARGV_OUT": str(out), "XDG_RUNTIME_DIR": str(work)}
        done = subprocess.run(["sh", str(script)], env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        assert not marker.exists(), launch_script(plan)
        assert done.returncode == 123, done.stderr
        got_qemu = (out / "qemu").read_bytes().split(b"\0")
        assert got_qemu == [os.fsencode(a) for a in plan.qemu_argv[1:]]
        got_daemon = (out / "virtiofsd").read_bytes().split(b"\0")
        assert got_daemon[:-1] == [os.fsencode(a) for a in daemon.argv[1:]]
        assert got_daemon[-1].startswith(os.fsencode(f"--socket-path={work}/microvmc-"))
        assert not [p for p in work.iterdir() if p.name.startswith("microvmc-")]  # its runtime directory is gone

    check()


def test_a_newline_in_the_manifest_s_directory_stays_in_the_comment(tmp_path: Path) -> None:
    """The issue's case: `sh launch.sh` of a manifest in a directory named "x\\ntouch /tmp/pwned"."""
    plan = dataclasses.replace(_plan(tmp_path), sources=("/home/u/x\ntouch /tmp/pwned\n/m.toml",))
    lines = launch_script(plan).splitlines()
    assert lines[2] == "#   /home/u/x\\ntouch /tmp/pwned\\n/m.toml"
    assert not [line for line in lines if line.startswith("touch")]


def test_comments_show_what_does_not_print_as_escapes() -> None:
    from microvmc.compiler.emit import _comment

    assert _comment("a\nb\tc\x1b[2Jd\\e\u202ef\udcff g  h") == "# a\\nb\\tc\\x1b[2Jd\\\\e\\u202ef\\xff g  h"


def test_the_template_is_filled_in_whole(tmp_path: Path) -> None:
    """launch.sh is compiler/launch.sh.in with what the plan decides filled in: no placeholder is
    left, each @if@ keeps exactly one side, and a name the renderer does not know is an error."""
    import re

    import pytest

    from microvmc.compiler.emit import fill

    for stop_timeout, timeout in ((0, 0), (10, 30)):
        text = launch_script(dataclasses.replace(_plan(tmp_path), stop_timeout=stop_timeout, timeout=timeout))
        assert not re.search(r"@(if [a-z_]+|else|end|[A-Z_]+)@", text)
        assert ("stop() {" in text) == bool(stop_timeout) and ("trap 'exit 143' TERM" in text) == (not stop_timeout)
        assert ("resources.timeout: the whole run" in text) == bool(timeout)
    with pytest.raises(KeyError):
        fill("a @NOPE@ b\n", blocks={}, values={}, conditions={})
    assert fill("x\n@B@\n@if c@\nyes\n@else@\nno\n@end@\n", blocks={"B": ["1", "2"]}, values={},
                conditions={"c": False}) == "x\n1\n2\nno\n"
