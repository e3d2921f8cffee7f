"""The benchmarks still run against the code as it is (they measure; this only checks they work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_cached_build_benchmark_runs_every_stage(boot_env, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "bench/cached_build.py", "-n", "1", "--stage-reps", "1", "--json",
                        "--store", str(tmp_path / "store")],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    stages = result["stages"]["first_median_s"]
    assert {"plan", "resolve (graph, kernel, modules, digests)", "realize (all in the store already)"} <= set(stages)
    assert result["imports"]["heavy"] == {}  # a cached build imports none of jsonschema, networkx, elftools
