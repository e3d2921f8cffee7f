"""The CLI's read-only commands: plan, graph, --help, --version (no boot)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

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
