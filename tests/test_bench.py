"""The benchmarks still run against the code as it is (they measure; this only checks they work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.boot  # each boots VMs or builds on the real kernels: not in the fast suite (-m "not boot")


def test_cached_build_benchmark_runs_every_stage(boot_env, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "bench/cached_build.py", "-n", "1", "--stage-reps", "1", "--json",
                        "--store", str(tmp_path / "store")],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    stages = result["stages"]["first_median_s"]
    assert {"plan", "resolve (graph, kernel, modules, digests)", "realize (all in the store already)"} <= set(stages)
    assert result["imports"]["heavy"] == {}  # a cached build imports none of jsonschema, networkx, elftools


def test_run_true_benchmark_boots_every_column(boot_env) -> None:
    """One round: microvmc run, the hand-written baseline (which must boot the same VM, control port
    included, or init waits for it) and launch.sh all exit 0 and leave nothing behind."""
    r = subprocess.run([sys.executable, "bench/run_true.py", "-n", "1", "--warmup", "0", "--json", "-q"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["differences"] == [] and result["left_in_tmpdir"] == [] and result["left_running"] == []
    assert set(result["commands"]) == {"microvmc", "baseline", "launch", "build"}


def test_images_benchmark_runs_every_column(boot_env) -> None:
    """One round of each: microvmc pull + unpack and skopeo + umoci from the same local registry,
    then the image's boot and the directory root's; all exit 0 and leave nothing running."""
    r = subprocess.run([sys.executable, "bench/images.py", "-n", "1", "--warmup", "0", "--json", "-q"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result["pull"]) == {"microvmc", "skopeo"} and set(result["boot"]) == {"image", "directory"}
    assert result["pull_ratio"]["of_medians"] > 0 and result["boot_ratio"]["of_medians"] > 0
    assert result["left_running"] == []


def test_lifecycle_benchmark_runs_every_column(boot_env) -> None:
    """One round: ps over 1 and 100 records, a foreground run and a detached run + wait; all exit 0
    and leave nothing running."""
    r = subprocess.run([sys.executable, "bench/lifecycle.py", "-n", "1", "--warmup", "0", "--json", "-q"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result["ps"]) == {"ps1", "ps100"} and set(result["boot"]) == {"foreground", "detached"}
    assert result["ps_ratio"]["of_medians"] > 0 and result["detached_ratio"]["of_medians"] > 0
    assert result["left_running"] == []


def test_kernel_benchmark_boots_both_kernels(boot_env) -> None:
    """One round: `microvmc run` of true on the own kernel and on the Debian kernel, both exit 0."""
    r = subprocess.run([sys.executable, "bench/kernel.py", "-n", "1", "--warmup", "0", "--json", "-q"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result["commands"]) == {"own", "debian"} and result["own_vs_debian"]["of_medians"] > 0
    assert all(c["leftovers"] == [] for c in result["commands"].values())


def test_boot_phases_benchmark_sees_every_landmark_on_both_kernels(boot_env) -> None:
    """One round: both kernels booted with an early console read by the host; each stretch from QEMU's
    start to launch.sh's exit is there, in the host's order, and they add up to the whole."""
    r = subprocess.run([sys.executable, "bench/boot_phases.py", "-n", "1", "--warmup", "0", "--json", "-q"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for kernel in ("own", "debian"):
        stretches = result["traced"][kernel]
        assert "→ Run /init as init process" in stretches and "→ printk: console [" in stretches
        assert all(s["host_s"] >= 0 for s in stretches.values())
        assert 0 < result["uninstrumented"][kernel]["QEMU start → program exec (host)"] \
            < result["uninstrumented"][kernel]["QEMU start → QEMU exit (host)"]
    assert result["left_running"] == []


def test_shares_benchmark_runs_every_column(boot_env) -> None:
    """One round, a small file: boot and boot + read over virtio-fs and over 9p, all exit 0."""
    r = subprocess.run([sys.executable, "bench/shares.py", "-n", "1", "--warmup", "0", "--size", "8", "--json", "-q"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result["commands"]) == {"boot-virtiofs", "boot-9p", "read-virtiofs", "read-9p"}
    assert result["ratios"]["read"]["of_medians"] > 0 and result["left_running"] == []


def test_execs_benchmark_runs_every_column(boot_env) -> None:
    """One round of 2 execs: the root served with cache=always (as microvmc does) and with cache=auto."""
    r = subprocess.run([sys.executable, "bench/execs.py", "-n", "1", "--warmup", "0", "--execs", "2", "--json", "-q"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result["commands"]) == {"always", "auto", "boot"} and result["left_running"] == []
    assert set(result["per_exec_s"]) == {"always", "auto"}


def test_targets_table_has_a_verdict_for_each_target(boot_env) -> None:
    """The one table of issue 10's targets, from one round of the benchmarks that measure them (virtme-ng,
    the 256 MiB read and the 8 runs at once left out here: their own tests run them)."""
    r = subprocess.run([sys.executable, "bench/targets.py", "-n", "1", "-q", "--json", "--skip", "virtme",
                        "--skip", "shares", "--skip", "concurrency"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["failed"] == [] and set(result["benchmarks"]) == {"kernel", "run_true", "boot_phases"}
    verdicts = {row["measure"]: row["verdict"] for row in result["rows"]}
    assert {"run of true: own kernel / Debian kernel", "run of true / the same VM by a hand-written script",
            "QEMU start → program exec (host), own kernel, TCG", "QEMU start → QEMU exit (host), own kernel, TCG"} <= set(verdicts)
    assert set(verdicts.values()) <= {"met", "NOT met", "too noisy to tell", ""}


def test_concurrency_benchmark_runs_them_all(boot_env) -> None:
    """One round of 3 runs at once (each must exit 0, or the benchmark fails) against one."""
    r = subprocess.run([sys.executable, "bench/concurrency.py", "-n", "1", "--warmup", "0", "--runs", "3", "--json", "-q"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["many_vs_one"]["of_medians"] > 0 and result["commands"]["many"]["maxrss_median_mib"] > 10
    assert result["left_running"] == []


def test_network_benchmark_runs_every_column(boot_env) -> None:
    """One round: a transfer into the guest over a forward and the same to a host process (each
    receiver counts the bytes), and a boot with a network device and one without; all leave nothing
    running."""
    r = subprocess.run([sys.executable, "bench/network.py", "-n", "1", "--warmup", "0", "--mib", "2", "--json", "-q"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result["throughput"]["columns"]) == {"vm", "host"} and set(result["boot"]["commands"]) == {"user", "none"}
    assert result["throughput"]["vm_vs_host"]["of_medians"] > 0 and result["boot"]["user_vs_none"]["of_medians"] > 0
    assert result["left_running"] == []


def test_virtme_benchmark_compares_with_virtme_ng(boot_env) -> None:
    """One round against virtme-ng (scripts/setup --test installs it): microvmc ran the probe on both
    kernels with its output on stdout and its status kept; virtme-ng ran it on the Debian kernel (its
    status is reported as it came back, not judged); every column timed, nothing left running."""
    r = subprocess.run([sys.executable, "bench/virtme.py", "-n", "1", "--warmup", "0", "--json", "-q"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for side in ("own", "debian"):
        assert result["checks"][side] == {"ran": True, "output_on": "stdout", "status": 3, "status_kept": True,
                                          "why": ""}
    assert result["checks"]["vng"]["ran"] and result["vng"]["version"].startswith("virtme-ng")
    assert set(result["commands"]) == {"own", "debian", "vng"}
    assert all(c["leftovers"] == [] for c in result["commands"].values())
    assert result["own_vs_vng"]["of_medians"] > 0 and result["debian_vs_vng"]["of_medians"] > 0


def test_boot_ab_benchmark_boots_each_variant_and_marks_init(boot_env) -> None:
    r = subprocess.run([sys.executable, "bench/boot_ab.py", "-n", "1", "--warmup", "0", "--json", "-q",
                        "base=", "cut=append:nokaslr;drop:noreplace-smp"],
                       cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for name in ("base", "cut"):
        marks = result["medians"][name]
        assert 0 < marks["first"] < marks["init"] < marks["total"] and marks["cpu"] > 0, marks
    assert set(result["paired"]) == {"cut"} and result["left_running"] == []
    bad = subprocess.run([sys.executable, "bench/boot_ab.py", "-n", "1", "base=", "x=drop:no-such-param"],
                         cwd=REPO, env=boot_env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "changes nothing in launch.sh" in bad.stderr
