"""The run store, log rotation, the verdict and the words ps uses: no boot needed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import pytest

from microvmc.backends.runstore import NoSuchRun, RunStateError, RunStore
from microvmc.backends.supervise import LogSink
from microvmc.compiler.cmdline import GuestUser, Rlimit, encode
from microvmc.compiler.launch import ProcessSpec, program_process
from microvmc.compiler.verdict import Logs, Seen, judge
from microvmc.errors import MicrovmcError
from microvmc.lifecycle import ago, parse_signal, parse_size, status_text


def test_names_ids_and_prefixes(tmp_path) -> None:
    store = RunStore(tmp_path)
    a = store.create({}, name="web", id="ab" + "0" * 62)
    b = store.create({}, id="ac" + "0" * 62)
    assert b.name and b.name != "web"  # generated
    assert store.find("web").id == a.id and store.find("ab").id == a.id and store.find(b.id).id == b.id
    with pytest.raises(NoSuchRun, match="ambiguous"):
        store.find("a")
    with pytest.raises(NoSuchRun, match="no such run: 'zz'"):
        store.find("zz")
    with pytest.raises(MicrovmcError, match=f"taken by run {a.id[:12]}"):
        store.create({}, name="web")
    with pytest.raises(MicrovmcError, match="a name is letters"):
        store.create({}, name="../x")
    # The creator holds the lock: the run is alive, and cannot be removed.
    assert a.alive() and a.state() == "created"
    with pytest.raises(RunStateError):
        store.remove(a)
    a.release()
    assert a.state() == "dead"  # a record that says it runs, with no monitor: dead, not "Up"
    store.remove(a)
    assert [r.id for r in store.all()] == [b.id]


def test_the_lock_is_what_tells_alive(tmp_path) -> None:
    """A run is alive while any process holds its lock: here a child that got it across fork."""
    store = RunStore(tmp_path)
    run = store.create({}, name="held")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             pass_fds=(run.lock_fd,))
    run.release()
    try:
        assert RunStore(tmp_path).find("held").alive()
    finally:
        child.communicate(b"")
    assert not RunStore(tmp_path).find("held").alive()


def test_concurrent_creates_keep_names_unique(tmp_path) -> None:
    store = RunStore(tmp_path)
    made, failed = [], []

    def create() -> None:
        try:
            made.append(RunStore(tmp_path).create({}, name="same"))
        except MicrovmcError:
            failed.append(1)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(made), len(failed)) == (1, 7)
    assert [r.name for r in store.all()] == ["same"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new-")]


def test_names_of_runs_made_before_name_files(tmp_path) -> None:
    """create checks names against each run's name file; a run made before there were name files
    (its record holds its name) still holds its name, and its id."""
    store = RunStore(tmp_path)
    old = store.create({}, name="old", id="cd" + "0" * 62)
    old.release()
    (old.dir / "name").unlink()
    assert (old.dir / "record.json").exists() and store.find("old").id == old.id
    with pytest.raises(MicrovmcError, match=f"taken by run {old.id[:12]}"):
        store.create({}, name="old")
    with pytest.raises(MicrovmcError, match=f"taken by run {old.id[:12]}"):
        store.check_name("old")
    with pytest.raises(MicrovmcError, match="a run with id"):
        store.create({}, id=old.id)
    new = store.create({}, name="new")
    assert (new.dir / "name").read_text() == "new" and {r.name for r in store.all()} == {"old", "new"}
    new.release()


def test_prune_keeps_named_detached_and_alive_runs(tmp_path) -> None:
    store = RunStore(tmp_path)
    for n in range(5):
        r = store.create({}, foreground=True, named=False)
        r.update(state="exited", status=0)
        r.release()
    named = store.create({}, name="keep", foreground=True, named=True)
    named.update(state="exited")
    named.release()
    live = store.create({}, foreground=True, named=False)  # still running: its lock is held
    store.prune(keep=2)
    left = store.all()
    assert len(left) == 4 and {"keep", live.name} <= {r.name for r in left}
    live.release()


def test_record_updates_are_atomic(tmp_path) -> None:
    run = RunStore(tmp_path).create({"plan": 1}, name="x")
    run.update(state="running", pids={"monitor": 1})
    doc = json.loads((run.dir / "record.json").read_text())
    assert (doc["state"], doc["pids"], doc["plan"]) == ("running", {"monitor": 1}, {"plan": 1})
    assert not [p for p in run.dir.iterdir() if p.name.startswith(".record")]


def test_log_rotation_is_byte_exact(tmp_path) -> None:
    sink = LogSink(tmp_path / "stdout.log", max_size=10, max_files=3)
    data = bytes(range(256)) * 2
    for i in range(0, len(data), 7):
        sink.push(data[i:i + 7])
    sink.close()
    files = sorted(tmp_path.iterdir(), key=lambda p: p.name)
    assert [p.name for p in files] == ["stdout.log", "stdout.log.1", "stdout.log.2"]
    assert all(p.stat().st_size <= 10 for p in files)
    kept = b"".join((tmp_path / n).read_bytes() for n in ("stdout.log.2", "stdout.log.1", "stdout.log"))
    assert data.endswith(kept) and len(kept) > 20


def test_signals_sizes_and_durations() -> None:
    assert [parse_signal(s) for s in ("HUP", "sigterm", "9", "SIGUSR1")] == [1, 15, 9, int(signal.SIGUSR1)]
    for bad in ("NOPE", "0", "99", ""):
        with pytest.raises(MicrovmcError):
            parse_signal(bad)
    assert [parse_size(s, "--x") for s in ("0", "512k", "16m", "1g", "100")] == [0, 512 << 10, 16 << 20, 1 << 30, 100]
    with pytest.raises(MicrovmcError, match="--x 'lots'"):
        parse_size("lots", "--x")
    assert [ago(s) for s in (0.2, 1, 12, 61, 150, 3600, 7200, 3 * 86400)] == [
        "Less than a second", "1 second", "12 seconds", "About a minute", "2 minutes", "About an hour", "2 hours",
        "3 days"]
    now = 1000.0
    assert status_text("running", {"started_unix": 988}, now) == "Up 12 seconds"
    assert status_text("exited", {"status": 0, "ended_unix": 820}, now) == "Exited (0) 3 minutes ago"
    assert status_text("dead", {}, now) == "Dead (monitor lost)"


def test_the_verdict_of_a_stop_request() -> None:
    logs = Logs(console="c", qemu="q")
    seen = Seen(signal=15, forwarded=15, stop_requested=True, stop_timed_out=True)
    v = judge(seen, logs=logs, boot_timeout=30, timeout=0, stop_timeout=2)
    assert v.status == 143 and "within 2 s of a stop request" in v.message
    v = judge(Seen(report="started\nexit 3\n", started=True), logs=logs, boot_timeout=30, timeout=0, stop_timeout=2)
    assert (v.status, v.message) == (3, "")


def test_an_exec_starts_from_the_programs_configuration() -> None:
    spec = ProcessSpec(argv=("/bin/sh", "-c", "a b"), env=(("K", "v w"), ("X", "=")), cwd="/srv x",
                       user=GuestUser(uid=1000, gid=100, groups=(5, 6)), rlimits=(Rlimit(name="NOFILE", soft=10, hard=None),))
    cmdline = " ".join(["console=ttyS0", f"MVMC_CWD={encode(spec.cwd)}", "MVMC_USER=1000:100:5,6", "MVMC_R0=NOFILE:10:inf",
                        *(f"MVMC_A{i}={encode(a)}" for i, a in enumerate(spec.argv)),
                        *(f"MVMC_E{i}={encode(k)}={encode(v)}" for i, (k, v) in enumerate(spec.env))])
    assert program_process(cmdline) == spec
    assert ProcessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.payload().decode().splitlines()[:3] == ["A0=/bin/sh", "A1=-c", "A2=a%20b"]


def test_log_rotation_keys_are_validated(tmp_path) -> None:
    from microvmc.compiler.pipeline import read_manifest
    from microvmc.errors import ManifestError

    path = tmp_path / "m.toml"
    path.write_text('version = 1\n[process]\nargv = ["true"]\n[logs]\nmax_files = 0\n')
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert "logs.max_files" in str(err.value) and "0" in str(err.value)
    path.write_text('version = 1\n[process]\nargv = ["true"]\n')
    logs = read_manifest(path).logs
    assert (logs.max_size, logs.max_files) == (16 << 20, 2)  # the schema's defaults


def test_a_second_signal_is_not_blamed_on_stop_timeout() -> None:
    """TERM passed on to the program, then TERM again: the VM is stopped at once, and the message
    does not say the program outlived resources.stop_timeout (issue 6, item 9)."""
    logs = Logs(console="c", qemu="q")
    v = judge(Seen(signal=15, forwarded=15, started=True), logs=logs, boot_timeout=30, timeout=0, stop_timeout=10)
    assert (v.status, v.message) == (143, "")
    v = judge(Seen(signal=15, forwarded=15, stop_timed_out=True), logs=logs, boot_timeout=30, timeout=0,
              stop_timeout=10)
    assert v.status == 143 and "within 10 s of signal 15 (resources.stop_timeout)" in v.message


def test_prune_below_keep_reads_only_runs_with_a_runtime_directory(tmp_path) -> None:
    """With no more runs than `keep` nothing is forgotten and the records of runs without a runtime
    directory are not read; a run whose monitor was killed still loses its sockets."""
    store = RunStore(tmp_path)
    ended = store.create({}, foreground=True, named=False)
    ended.update(state="exited", status=0)
    ended.release()
    (ended.dir / "record.json").write_text("not JSON: never read")
    dead = store.create({}, foreground=True, named=False)
    dead.update(state="running")
    (dead.dir / "vm").mkdir()
    (dead.dir / "control.sock").write_text("")
    dead.release()  # its monitor was killed: the lock is free
    store.prune(keep=2)
    assert not (dead.dir / "vm").exists() and not (dead.dir / "control.sock").exists()
    assert ended.dir.exists() and dead.dir.exists()
