"""Golden files: each example's QEMU argv, kernel command line and plan, on a fixed fake host.

Refresh after an intended change with: MICROVMC_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES, FIXTURES, REPO, fake_facts
from microvmc.compiler.emit import to_json
from microvmc.compiler.graph import Sources
from microvmc.compiler.pipeline import compile_manifest, read_manifest

GOLDEN = REPO / "tests" / "golden"
STORE = "/microvmc/store"
UPDATE = os.environ.get("MICROVMC_UPDATE_GOLDEN") == "1"
# Host paths are part of what a plan is (shared directories are identified by path), so the
# examples are compiled from a copy at a fixed place: the golden files hold the same paths and
# digests wherever the checkout is.
PLACE = Path("/tmp/microvmc-golden")


@pytest.fixture(scope="module", autouse=True)
def placed() -> None:
    shutil.rmtree(PLACE, ignore_errors=True)
    shutil.copytree(EXAMPLES, PLACE / "examples", ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    shutil.copytree(FIXTURES, PLACE / "fixtures")
    yield
    shutil.rmtree(PLACE, ignore_errors=True)


def _rendered(name: str) -> dict[str, str]:
    manifest = read_manifest(PLACE / "examples" / f"{name}.toml", cwd=str(PLACE))
    facts = fake_facts(default_kernel_dir=str(PLACE / "fixtures" / "kernel"), busybox=str(PLACE / "fixtures" / "busybox"))
    sources = Sources(init_source=str(PLACE / "fixtures" / "init"))
    compiled = compile_manifest(manifest, facts=facts, store=STORE, sources=sources)
    files = dict((n, d.decode()) for n, d, _ in compiled.output.files)
    return {
        "qemu-argv.txt": "\n".join(compiled.plan.qemu_argv) + "\n",
        "cmdline.txt": compiled.plan.cmdline + "\n",
        "plan.json": to_json(json.loads(files["plan.json"])),
        "launch.sh": files["launch.sh"],
    }


EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.toml"))


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_matches_golden(name: str) -> None:
    rendered = _rendered(name)
    folder = GOLDEN / name
    if UPDATE:
        folder.mkdir(parents=True, exist_ok=True)
        for file, text in rendered.items():
            (folder / file).write_text(text)
    for file, text in rendered.items():
        assert (folder / file).read_text() == text, f"{name}/{file} differs; see the module docstring"


def test_every_example_has_golden_files() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir()) == EXAMPLE_NAMES
