"""The CLI's read-only commands: plan, graph, --help, --version (no boot)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES

MICROVMC = [sys.executable, "-m", "microvmc"]


def cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MICROVMC, *args], env=env, capture_output=True, text=True, timeout=120)


def test_plan_prints_the_argv_the_build_writes(boot_env, tmp_path: Path) -> None:
    env = dict(boot_env, MICROVMC_STORE=str(tmp_path / "store"))
    plan = json.loads(cli(env, "plan", "--json", str(EXAMPLES / "shares.toml")).stdout)
    out = cli(env, "build", "--no-link", str(EXAMPLES / "shares.toml")).stdout.strip()
    written = json.loads(Path(out, "plan.json").read_text())["plan"]
    assert plan == written
    assert plan["qemu_argv"][plan["qemu_argv"].index("-append") + 1] == plan["cmdline"]
    assert [v["tag"] for v in plan["virtiofsd"]] == ["root", "data"]
    text = cli(env, "plan", str(EXAMPLES / "shares.toml")).stdout
    assert text.startswith("# virtiofsd\n") and "# qemu\n" in text
    assert text.rstrip("\n").endswith(plan["cmdline"])
    # The printed QEMU command is the plan's argv, shell-quoted.
    qemu_text = text.split("# qemu\n")[1].split("\n# kernel command line")[0]
    assert shlex.split(qemu_text.replace("\\\n", " ")) == plan["qemu_argv"]


def test_graph_as_dot_and_json(boot_env, tmp_path: Path) -> None:
    env = dict(boot_env, MICROVMC_STORE=str(tmp_path / "store"))
    graph = json.loads(cli(env, "graph", "--json", str(EXAMPLES / "ninep.toml")).stdout)
    ids = [n["id"] for n in graph["nodes"]]
    assert ids[-1] == "plan" and "virtiofsd:root" not in ids  # 9p: QEMU serves the root itself
    assert ["share:root", "plan"] in graph["edges"]
    dot = cli(env, "graph", str(EXAMPLES / "ninep.toml")).stdout
    assert dot.startswith("digraph microvmc {") and '"initramfs" -> "plan";' in dot


def test_help_and_version(boot_env) -> None:
    r = cli(boot_env, "--help")
    assert r.returncode == 0 and "124        boot or run timeout" in r.stdout
    for command in ("validate", "build", "plan", "graph", "run"):
        assert command in r.stdout
    from microvmc import __version__

    assert cli(boot_env, "--version").stdout == f"microvmc {__version__}\n"
    bad = cli(boot_env, "run")
    assert bad.returncode == 2 and "the following arguments are required: manifest" in bad.stderr


def test_options_between_the_manifest_and_the_program_argv(boot_env, tmp_path: Path) -> None:
    """Everything after `--` is the program's, wherever the options are; bytes that are not UTF-8
    (as a shell passes them) are percent-encoded like any other."""
    hello = str(EXAMPLES / "hello.toml")
    r = subprocess.run([*MICROVMC, "plan", hello, "-e", "K=v", "--", "/bin/echo", "-x", b"\xff\xfe"], env=boot_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cmdline = r.stdout.splitlines()[-1].split()
    assert ["MVMC_A0=/bin/echo", "MVMC_A1=-x", "MVMC_A2=%FF%FE"] == [p for p in cmdline if p.startswith("MVMC_A")]
    assert "MVMC_E0=K=v" in cmdline
    as_json = subprocess.run([*MICROVMC, "plan", "--json", hello, "--", b"\xff"], env=boot_env, capture_output=True,
                             timeout=120)
    assert as_json.returncode == 0 and "MVMC_A0=%FF" in json.loads(as_json.stdout)["cmdline"]
    for argv, message in ((["graph", hello, "--", "x"], "graph takes no program argv ('--')"),
                          (["run", hello, "a", "--", "b"], "the program's argv is both before and after '--': 'a'")):
        r = subprocess.run([*MICROVMC, *argv], env=boot_env, capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stderr.splitlines()[-1]) == (2, f"microvmc: error: {message}")


def test_global_options_before_or_after_the_command() -> None:
    """Issue 6, item 6: `microvmc --store D build`, `microvmc -v run` and `--debug` before the command
    were parsed, then silently reset by the command's own defaults."""
    from microvmc.cli import _parse

    for words in (["--store", "D", "-v", "--debug", "build", "m.toml"], ["build", "--store", "D", "-v", "--debug", "m.toml"],
                  ["-v", "build", "m.toml", "--store", "D", "--debug"]):
        args = _parse(words)
        assert (args.command, args.store, args.verbose, args.debug, args.manifest) == ("build", "D", True, True, "m.toml")
    args = _parse(["run", "m.toml"])
    assert (args.store, args.verbose, args.debug) == (None, False, False)
    assert _parse(["--store", "A", "validate", "--store", "B", "x.toml"]).store == "B"  # the later one wins


@pytest.mark.parametrize("words", [
    ["run", "m.toml"], ["run", "m.toml", "--", "prog", "-x"], ["run", "-d", "m.toml"], ["--store", "D", "run", "m.toml"],
    ["-v", "--state=S", "build", "m.toml"], ["--store", "run", "ps", "-a"], ["kernel", "fragment"], ["run", "-v", "m.toml"],
    ["run", "m.toml", "-v", "a:/b"], ["exec", "r", "--", "sh"],
])
def test_the_short_ways_parse_as_the_whole_parser(words, monkeypatch) -> None:
    """`run MANIFEST` without any parser, and a parser with the one command the line names, give
    what the whole parser gives: the same namespace (a new option of `run` must be added there too)."""
    from microvmc import cli

    short = vars(cli._parse(words))
    monkeypatch.setattr(cli, "_simple_run", lambda words: None)
    monkeypatch.setattr(cli, "_command_at", lambda words: None)
    assert short == vars(cli._parse(words))


def test_the_command_word_is_found_only_where_the_parser_finds_it() -> None:
    from microvmc.cli import _command_at

    assert _command_at(["run", "m.toml"]) == 0
    assert _command_at(["--store", "run", "ps"]) == 2  # "run" is the store here
    assert _command_at(["--debug", "-v", "--state=S", "ps"]) == 3
    assert _command_at(["--sto", "run", "ps"]) is None  # an abbreviation: the whole parser decides
    assert _command_at(["-h", "run"]) is None  # the main help lists every command
    assert _command_at(["--version"]) is None


def test_store_before_the_command_is_the_store_used(boot_env, tmp_path: Path) -> None:
    store = tmp_path / "elsewhere"
    out = cli(boot_env, "--store", str(store), "build", "--no-link", str(EXAMPLES / "hello.toml"))
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == store
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 2\n")
    debug = cli(boot_env, "--debug", "build", str(bad))
    assert "Traceback" in debug.stderr and "ManifestError" in debug.stderr


def test_a_reader_that_went_away_is_not_an_error(boot_env, tmp_path: Path) -> None:
    """Issue 6, item 9: `microvmc plan x.toml | head -c 10` said "microvmc: Broken pipe" and exited 125."""
    import os

    for command in (["plan", str(EXAMPLES / "hello.toml")], ["graph", "--json", str(EXAMPLES / "hello.toml")]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # gone before anything is written: every write is EPIPE
        try:
            r = subprocess.run([*MICROVMC, *command], stdout=write_end, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path, env=boot_env)
        finally:
            os.close(write_end)
        assert (r.returncode, r.stderr) == (0, ""), command


@pytest.mark.parametrize("option, message", [
    (["--log-max-files", "0"], "--log-max-files 0: 0 is below the minimum of 1 (logs.max_files)"),
    (["--log-max-files", "101"], "--log-max-files 101: 101 is above the maximum of 100 (logs.max_files)"),
    (["--log-max-size", "2000g"],
     "--log-max-size 2000g: 2147483648000 is above the maximum of 1099511627776 bytes (logs.max_size)"),
])
def test_log_options_keep_to_the_schema_s_bounds_of_the_keys_they_override(tmp_path: Path, option, message) -> None:
    (tmp_path / "m.toml").write_text('version = 1\n[process]\nargv = ["true"]\n')
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "microvmc", "run", "-d", *option, "m.toml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (2, f"microvmc: {message}\n")
    assert not (tmp_path / "state").exists()
