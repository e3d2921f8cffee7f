"""Run records: one directory per run under the state directory, holding its logs.

The console log, QEMU's log and the status report of a run outlive it (they are what a failure
message points at, and what `ps`/`logs`/`inspect` will read); the runtime directory with its sockets
does not. Only the newest KEEP records are kept.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Mapping

__all__ = ["runs_root", "new_run_dir", "prune_runs", "write_record"]

KEEP = 50


def runs_root(environ: Mapping[str, str] = os.environ) -> Path:
    state = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state, "microvmc", "runs")


def new_run_dir(name: str, environ: Mapping[str, str] = os.environ) -> Path:
    root = runs_root(environ)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = root / f"{stamp}-{os.getpid()}-{name}"
    path.mkdir()
    return path


def prune_runs(environ: Mapping[str, str] = os.environ) -> None:
    """Remove all but the newest KEEP run records."""
    root = runs_root(environ)
    records = sorted(p for p in root.iterdir() if p.is_dir())
    for old in records[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def write_record(run_dir: Path, **fields: object) -> None:
    """Merge `fields` into the run's run.json (what a later `ps`/`inspect` reads), atomically."""
    import json

    path = run_dir / "run.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    record.update(fields)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True, indent=2) + "\n")
    os.replace(tmp, path)
