"""Pyflakes-level checks (undefined names, unused imports) over the whole tree, with ruff."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_no_undefined_names_or_unused_imports() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    r = subprocess.run([ruff, "check", "--select", "F,E9", "--line-length", "120", "microvmc", "compiler",
                        "backends", "kernel", "tests", "bench"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
