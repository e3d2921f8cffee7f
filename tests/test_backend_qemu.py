"""backends/qemu.py: running a LaunchPlan.

Most tests run the backend against a fake QEMU (a script that uses the descriptors of `Fd` the
way QEMU does): they check the descriptor layout, the relays, timeouts, signals and cleanup in
milliseconds. The tests marked `boot` run a real kernel under QEMU with a busybox init that
speaks init/PROTOCOL.md, to check the real argv shape end to end.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import pty
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import termios
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import KERNELS
from microvmc.backends import qemu as qemu_backend
from microvmc.backends import supervise
from microvmc.backends.host import tsc_khz
from microvmc.backends.monitor import run_plan
from microvmc.compiler.host import VirtiofsdFlavour
from microvmc.compiler.launch import ArgGroup, LaunchPlan, VirtiofsdPlan
from microvmc.compiler.machine import PORTS, Fd, Machine
from microvmc.errors import ExitStatus, HostError

# --- helpers shared by both kinds of test ------------------------------------------------------


def make_plan(
    qemu_argv: list[str],
    *,
    shares: tuple[tuple[str, str, tuple[str, ...]], ...] = (),  # (tag, dir, virtiofsd argv)
    boot_timeout: float = 30,
    timeout: float = 0,
    stop_timeout: float = 10,
) -> LaunchPlan:
    return LaunchPlan(
        name="test",
        accel="tcg",
        accel_reason="a test",
        machine=Machine(name="test", accel="tcg", accel_reason="a test", cpus=1, memory_mib=256, kernel="", initrd="",
                        cmdline="", console=Fd.CONSOLE, ports=PORTS, filesystems=()),
        qemu=(ArgGroup(keys=(), comment="", args=tuple(qemu_argv)),),
        virtiofsd=tuple(
            VirtiofsdPlan(
                tag=tag,
                keys=(),
                shared_dir=directory,
                socket=f"fs-{tag}.sock",
                read_only=False,
                flavour=VirtiofsdFlavour.C,
                argv=argv,
            )
            for tag, directory, argv in shares
        ),
        cmdline="",
        spilled=False,
        kernel="",
        initramfs="",
        boot_timeout=boot_timeout,
        timeout=timeout,
        stop_timeout=stop_timeout,
        log_max_size=0,
        log_max_files=1,
        transports=tuple((tag, "virtiofs") for tag, _, _ in shares),
        sources=(),
    )


class Run:
    """Runs a plan with files for the caller's descriptors and a private runtime directory."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        self.tmp = tmp_path
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.runtime = tmp_path / "runtime"
        self.runtime.mkdir()
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(self.runtime))

    def __call__(self, plan: LaunchPlan, input: bytes = b"", **kwargs) -> tuple[int, bytes, bytes]:
        """Status, stdout and stderr; kwargs (stdin=, stdout=, ...) go to run_plan."""
        (self.tmp / "stdin").write_bytes(input)
        with (
            open(self.tmp / "stdin", "rb") as i,
            open(self.tmp / "stdout", "wb") as o,
            open(self.tmp / "stderr", "wb") as e,
        ):
            kwargs = dict(stdin=i.fileno(), stdout=o.fileno(), stderr=e.fileno()) | kwargs
            status = run_plan(plan, log_dir=self.logs, **kwargs)
        return status, (self.tmp / "stdout").read_bytes(), (self.tmp / "stderr").read_bytes()

    def log(self, name: str) -> str:
        return (self.logs / name).read_text(errors="replace")

    def assert_clean(self, marker: str) -> None:
        assert list(self.runtime.iterdir()) == []
        assert leftovers(marker) == []


def leftovers(marker: str) -> list[str]:
    done = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
    return done.stdout.splitlines()


def executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    """Read from a pipe until `needle` shows up, or fail after `timeout` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} within {timeout} s; got {data!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"EOF before {needle!r}; got {data!r}"
            data += chunk
    return data


HELPER = """
import json, sys
from pathlib import Path
from microvmc.backends.monitor import run_plan
from microvmc.compiler.launch import LaunchPlan
plan = LaunchPlan.from_dict(json.loads(Path(sys.argv[1]).read_text()))
sys.exit(run_plan(plan, log_dir=Path(sys.argv[2]), stdin=0, stdout=1, stderr=2))
"""


def run_in_helper(plan: LaunchPlan, run: Run) -> subprocess.Popen:
    """run_plan in its own process (so it can be signalled), stdout on a pipe."""
    (run.tmp / "plan.json").write_text(json.dumps(plan.to_dict()))
    return subprocess.Popen(
        [sys.executable, "-c", HELPER, str(run.tmp / "plan.json"), str(run.logs)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=open(run.tmp / "stderr", "wb"),
        env=dict(os.environ, XDG_RUNTIME_DIR=str(run.runtime)),
    )


@pytest.fixture
def run(tmp_path, monkeypatch) -> Run:
    return Run(tmp_path, monkeypatch)


@pytest.fixture
def marker() -> str:
    """A sleep duration no other process uses: `pgrep -f` finds what a test left behind."""
    return f"1000.{uuid.uuid4().int % 10**9:09d}"


# --- a fake QEMU -------------------------------------------------------------------------------

LAYOUT_QEMU = """#!{python}
import os, sys, time
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
os.write(5, f"cwd {{os.getcwd()}}\\nfds {{fds}}\\nls {{sorted(os.listdir('.'))}}\\n".encode())
os.write(2, b"a qemu message\\n")
os.write(4, b"started\\n")
data = sys.stdin.buffer.read()
os.write(1, data)
os.write(3, b"to stderr\\n")
# as a real QEMU waits for the vhost-user handshake: virtiofsd has run (it was given a bound socket,
# so nothing else orders it before this QEMU's end, which stops it)
deadline = time.monotonic() + 30
while not os.path.exists({done!r}) and time.monotonic() < deadline:
    time.sleep(0.01)
os.write(4, b"exit 7\\n")
"""

FAKE_VIRTIOFSD = """#!/bin/sh
echo "$@" > "$(dirname "$0")/virtiofsd-args"
readlink /proc/$$/fd/3 > "$(dirname "$0")/virtiofsd-fd3"
{body}
"""


def test_descriptor_layout_cwd_and_relay(run, tmp_path):
    qemu = executable(tmp_path / "qemu", LAYOUT_QEMU.format(python=sys.executable,
                                                            done=str(tmp_path / "virtiofsd-fd3")))
    vfsd = executable(tmp_path / "virtiofsd", FAKE_VIRTIOFSD.format(body="sleep 30"))
    plan = make_plan([qemu], shares=(("root", "/srv", (vfsd, "-o", "source=/srv")),))
    status, out, err = run(plan, input=b"\x00binary\xff" * 1000)
    assert status == 7
    assert out == b"\x00binary\xff" * 1000
    assert err == b"to stderr\n"
    console = run.log("console.log").splitlines()
    assert console[0].startswith(f"cwd {run.runtime}/microvmc-")
    assert console[1] == "fds [0, 1, 2, 3, 4, 5, 6, 7]"  # 7: the listing's own descriptor
    assert console[2] == "ls ['.lock', 'fs-root.sock']"  # the run's lock (sweep_runtime_dirs)
    assert run.log("qemu.log") == "a qemu message\n"
    assert run.log("status") == "started\nexit 7\n"
    assert (tmp_path / "virtiofsd-args").read_text() == "-o source=/srv --fd=3\n"
    assert (tmp_path / "virtiofsd-fd3").read_text().startswith("socket:[")
    run.assert_clean(str(tmp_path / "virtiofsd"))


def run_started(run: Run, plan: LaunchPlan, *, input: bytes = b"", before=None) -> tuple[int, bytes, bytes]:
    """As `run`, but the way `microvmc run` runs a cached build: the VM started from the plan's JSON
    form first (qemu.start), with the signals caught from before, then adopted by run_plan;
    `before()` is called in between."""
    (run.tmp / "stdin").write_bytes(input)
    with (
        open(run.tmp / "stdin", "rb") as i,
        open(run.tmp / "stdout", "wb") as o,
        open(run.tmp / "stderr", "wb") as e,
        supervise.signals_caught() as signals,
        qemu_backend.runtime_dir() as rundir,
    ):
        began = time.monotonic()
        assert qemu_backend.startable(plan.to_dict())
        started = qemu_backend.start(plan.to_dict(), logs=qemu_backend.RunLogs(run.logs), stdin=i.fileno(),
                                     rundir=rundir)
        try:
            if before is not None:
                before(started)
            status = run_plan(plan, log_dir=run.logs, stdin=i.fileno(), stdout=o.fileno(), stderr=e.fileno(),
                              started=started, signals=signals, began=began)
        finally:
            started.close()  # (a no-op once run_plan has stopped it)
    return status, (run.tmp / "stdout").read_bytes(), (run.tmp / "stderr").read_bytes()


def test_a_vm_started_from_the_plans_json_is_adopted(run, tmp_path):
    """The same descriptors, directory, streams, status and cleanup as a VM that run_plan launches."""
    qemu = executable(tmp_path / "qemu", LAYOUT_QEMU.format(python=sys.executable,
                                                            done=str(tmp_path / "virtiofsd-fd3")))
    vfsd = executable(tmp_path / "virtiofsd", FAKE_VIRTIOFSD.format(body="sleep 30"))
    plan = make_plan([qemu], shares=(("root", "/srv", (vfsd, "-o", "source=/srv")),))
    status, out, err = run_started(run, plan, input=b"\x00binary\xff" * 1000)
    assert (status, out, err) == (7, b"\x00binary\xff" * 1000, b"to stderr\n")
    console = run.log("console.log").splitlines()
    assert console[0].startswith(f"cwd {run.runtime}/microvmc-")
    assert console[1:3] == ["fds [0, 1, 2, 3, 4, 5, 6, 7]", "ls ['.lock', 'fs-root.sock']"]
    assert (run.log("qemu.log"), run.log("status")) == ("a qemu message\n", "started\nexit 7\n")
    assert (tmp_path / "virtiofsd-args").read_text() == "-o source=/srv --fd=3\n"
    assert 0 <= json.loads(run.log("timeline.json"))["host_seconds"]["qemu"] < 10
    run.assert_clean(str(tmp_path / "virtiofsd"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_between_start_and_supervision_stops_the_vm(run, tmp_path, marker, signum):
    """The window of `microvmc run` after QEMU started, before supervision began (its modules are
    imported meanwhile): the signal is caught, and stops the VM as one during the boot does."""
    qemu = sh_qemu(tmp_path, f"echo ready; sleep {marker}")  # never reports "started"
    vfsd = executable(tmp_path / "virtiofsd", FAKE_VIRTIOFSD.format(body=f"sleep {marker}"))
    plan = make_plan([qemu], shares=(("root", "/srv", (vfsd,)),), stop_timeout=60)
    status, _, _ = run_started(run, plan, before=lambda _: os.kill(os.getpid(), signum))
    assert status == 128 + signum
    run.assert_clean(marker)


def test_a_started_vm_that_is_never_adopted_is_stopped_by_close(run, tmp_path, marker):
    qemu = sh_qemu(tmp_path, f"sleep {marker}")
    vfsd = executable(tmp_path / "virtiofsd", FAKE_VIRTIOFSD.format(body=f"sleep {marker}"))
    plan = make_plan([qemu], shares=(("root", "/srv", (vfsd,)),))

    def fail(started):
        deadline = time.monotonic() + 10
        while len(leftovers(marker)) < 2 and time.monotonic() < deadline:  # QEMU's sleep and virtiofsd's
            time.sleep(0.01)
        assert len(leftovers(marker)) == 2
        raise RuntimeError("an error before run_plan")

    with pytest.raises(RuntimeError, match="an error before run_plan"):
        run_started(run, plan, before=fail)
    run.assert_clean(marker)


def test_what_only_launch_does_is_not_started_early():
    """A file staged for `run -v`, a network device: qemu.start leaves them to launch()."""
    plan = {"machine": {"filesystems": [{"tag": "root"}]}}
    assert qemu_backend.startable(plan)
    assert not qemu_backend.startable({"machine": {"filesystems": [{"staged_from": "/etc/hosts"}]}})
    assert not qemu_backend.startable({"machine": {"filesystems": [], "nic": {"kind": "user"}}})


def sh_qemu(tmp_path: Path, body: str) -> str:
    return executable(tmp_path / "qemu", f"#!/bin/sh\n{body}\n")


@pytest.mark.parametrize(
    "body, expected_status, expected_message",
    [
        (
            "echo 'qemu-system-x86_64: warning: TCG does not support x' >&2\n"
            "echo 'qemu-system-x86_64: -device foo: no such device' >&2; exit 1",
            ExitStatus.HOST,
            "QEMU failed: qemu-system-x86_64: -device foo: no such device; QEMU log: {logs}/qemu.log",
        ),
        (
            "exit 0",
            ExitStatus.GUEST_CRASHED,
            "the VM stopped without reporting the program's status; console log: {logs}/console.log",
        ),
        (
            "printf 'error mount 19 no such device\\n' >&4",
            ExitStatus.INIT_FAILED,
            "guest init failed at mount: no such device; console log: {logs}/console.log",
        ),
        ("printf 'started\\nsignal 9\\n' >&4", 137, ""),
        ("printf 'started\\nexit 0\\n' >&4; exit 1", 0, ""),
    ],
)
def test_outcomes(run, tmp_path, body, expected_status, expected_message):
    status, _, err = run(make_plan([sh_qemu(tmp_path, body)]))
    assert status == expected_status
    message = expected_message.format(logs=run.logs)
    assert err.decode() == (f"microvmc: {message}\n" if message else "")


def test_boot_timeout(run, tmp_path, marker):
    plan = make_plan([sh_qemu(tmp_path, f"sleep {marker}")], boot_timeout=0.5)
    start = time.monotonic()
    status, _, err = run(plan)
    assert time.monotonic() - start < 5
    assert status == ExitStatus.TIMEOUT
    assert err.decode() == (
        "microvmc: the guest did not start the program within 0.5 s; "
        f"console log: {run.logs}/console.log\n"
    )
    run.assert_clean(marker)


def test_run_timeout(run, tmp_path, marker):
    plan = make_plan([sh_qemu(tmp_path, f"echo started >&4; sleep {marker}")], timeout=1)
    status, _, err = run(plan)
    assert status == ExitStatus.TIMEOUT
    assert err.decode() == (
        f"microvmc: the program did not finish within 1 s; console log: {run.logs}/console.log\n"
    )
    run.assert_clean(marker)


def test_closed_stdout_pipe_is_drained(run, tmp_path):
    """EPIPE on the caller's stdout: the run goes on and the program's status comes back."""
    qemu = sh_qemu(
        tmp_path, "echo started >&4; head -c 1000000 /dev/zero; echo ok >&3; echo 'exit 5' >&4"
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        status, _, err = run(make_plan([qemu]), stdout=write_end)
    finally:
        os.close(write_end)
    assert (status, err) == (5, b"ok\n")


def test_slow_reader_gets_everything(run, tmp_path):
    """A reader slower than the guest: the relay holds back, loses nothing, and blocks no one."""
    qemu = sh_qemu(
        tmp_path,
        "echo started >&4; head -c 3000000 /dev/urandom | tee /dev/fd/5; echo 'exit 0' >&4",
    )
    read_end, write_end = os.pipe()
    received = bytearray()

    def slow_reader():
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)
            time.sleep(0.001)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    try:
        status, _, _ = run(make_plan([qemu]), stdout=write_end)
    finally:
        os.close(write_end)
        reader.join(10)
        os.close(read_end)
    assert status == 0
    assert bytes(received) == (run.logs / "console.log").read_bytes()
    assert len(received) == 3000000


@pytest.mark.parametrize("code, status", [(0, 119), (3, 3)])
def test_output_that_cannot_be_written_is_reported(run, tmp_path, code, status):
    """A full disk loses the program's output: that is an error (119, or the program's own failure),
    with one line saying so. A reader that went away (EPIPE, as with `| head`) is not."""
    qemu = sh_qemu(tmp_path, f"echo started >&4; echo out; echo 'exit {code}' >&4")
    with open("/dev/full", "wb") as full:
        got, _, err = run(make_plan([qemu]), stdout=full.fileno())
    assert got == status
    assert err.decode().endswith("the program's output could not be written (stdout: No space left on device)\n")
    assert err.decode().count("\n") == 1
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        got, _, err = run(make_plan([qemu]), stdout=write_end)
    finally:
        os.close(write_end)
    assert (got, err) == (code, b"")


def test_same_descriptor_for_stdout_and_stderr(run, tmp_path):
    qemu = sh_qemu(tmp_path, "echo started >&4; echo one; echo two >&3; echo 'exit 0' >&4")
    with open(tmp_path / "both", "wb") as both:
        status, _, _ = run(make_plan([qemu]), stdout=both.fileno(), stderr=both.fileno())
    assert status == 0
    assert sorted((tmp_path / "both").read_text().splitlines()) == ["one", "two"]


def test_virtiofsd_dies(run, tmp_path, marker):
    qemu = sh_qemu(tmp_path, f"echo started >&4; sleep {marker}")
    vfsd = executable(tmp_path / "virtiofsd", FAKE_VIRTIOFSD.format(body="sleep 0.3; kill -9 $$"))
    plan = make_plan([qemu], shares=(("data", "/srv", (vfsd,)),))
    status, _, err = run(plan)
    assert status == ExitStatus.VIRTIOFSD_DIED
    assert err.decode() == (
        "microvmc: virtiofsd for share 'data' died while the VM ran (killed by signal 9); "
        f"log: {run.logs}/virtiofsd-data.log\n"
    )
    run.assert_clean(marker)


def test_virtiofsd_cannot_start(run, tmp_path, marker):
    """QEMU cannot connect to a virtiofsd that failed: the daemon's reason is the message."""
    qemu = sh_qemu(
        tmp_path, "sleep 0.5; echo \"qemu: Failed to connect to 'fs-root.sock'\" >&2; exit 1"
    )
    vfsd = executable(
        tmp_path / "virtiofsd",
        FAKE_VIRTIOFSD.format(body="echo 'failed to stat source' >&2; exit 1"),
    )
    status, _, err = run(make_plan([qemu], shares=(("root", "/nowhere", (vfsd,)),)))
    assert status == ExitStatus.HOST
    assert err.decode() == (
        "microvmc: virtiofsd for share 'root' could not start: failed to stat source; "
        f"log: {run.logs}/virtiofsd-root.log\n"
    )


def test_missing_qemu_raises_before_starting_anything(run):
    with pytest.raises(HostError, match="QEMU not found: 'no-such-qemu-binary'"):
        run(make_plan(["no-such-qemu-binary"]))
    assert list(run.runtime.iterdir()) == []


def test_unexecutable_virtiofsd_raises_and_cleans_up(run, tmp_path):
    qemu = sh_qemu(tmp_path, "exit 0")
    plan = make_plan([qemu], shares=(("root", "/srv", (str(tmp_path / "missing"),)),))
    with pytest.raises(HostError, match="cannot run virtiofsd"):
        run(plan)
    assert list(run.runtime.iterdir()) == []


def test_verbose_lines(run, tmp_path):
    qemu = sh_qemu(tmp_path, "printf 'time init 1000\\ntime modules 1250\\ntime exec 1300\\nstarted\\n"
                             "time exit 1800\\nexit 0\\n' >&4")
    status, _, err = run(make_plan([qemu]), verbose=True)
    first, second = err.decode().splitlines()
    assert first == f"microvmc: accel tcg (a test); no shares; logs in {run.logs}"
    assert second.startswith("microvmc: timeline: kernel 1.00 s, modules 0.25 s, exec 0.05 s, program 0.50 s; "
                             "host: qemu at ")
    timeline = json.loads((run.logs / "timeline.json").read_text())
    assert timeline["guest_ms"] == {"init": 1000, "modules": 1250, "exec": 1300, "exit": 1800}
    host = timeline["host_seconds"]
    assert set(host) == {"qemu", "started", "reported", "qemu-exited", "ended"}
    assert list(host.values()) == sorted(host.values())  # written in the order they happened
    assert list(host)[0] == "qemu" and list(host)[-1] == "ended"
    assert host["started"] <= host["reported"]


def test_console_lines_mark_the_kernel_and_init_and_reach_the_console_log(run, tmp_path):
    # The console is a pipe microvmc reads: its first bytes are the kernel's mark, init's start line
    # (split over two writes here) init's; every byte lands in the console log.
    qemu = sh_qemu(tmp_path, "printf 'Linux version x\\n' >&5; sleep 0.2; printf 'microvmc-init: sta' >&5; "
                             "printf 'rted\\r\\n' >&5; sleep 0.1; printf 'started\\n' >&4; sleep 0.1; "
                             "printf 'exit 0\\n' >&4; sleep 0.1")
    status, _, err = run(make_plan([qemu]), verbose=True)
    assert status == 0
    assert (run.logs / "console.log").read_bytes() == b"Linux version x\nmicrovmc-init: started\r\n"
    timeline = json.loads((run.logs / "timeline.json").read_text())
    host, phases = timeline["host_seconds"], timeline["phases_seconds"]
    assert list(host) == ["qemu", "kernel", "init", "started", "reported", "qemu-exited", "ended"]
    assert list(phases) == ["qemu → kernel", "kernel → init", "init → started", "started → reported",
                            "reported → qemu-exited"]
    assert phases["kernel → init"] >= 0.2 and phases["init → started"] >= 0.1
    assert abs(sum(phases.values()) - (host["qemu-exited"] - host["qemu"])) < 0.002
    assert "; phases: qemu → kernel " in err.decode()


def test_runs_outside_the_main_thread(run, tmp_path):
    """Without signal handling (only the main thread may catch signals), but it runs."""
    qemu = sh_qemu(tmp_path, "printf 'started\\nexit 4\\n' >&4")
    result = []
    thread = threading.Thread(target=lambda: result.append(run(make_plan([qemu]))[0]))
    thread.start()
    thread.join(20)
    assert result == [4]


def test_signal_handlers_are_restored(run, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    run(make_plan([sh_qemu(tmp_path, "exit 0")]))
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1


def test_nonblocking_stdin_flag_is_restored(run, tmp_path):
    """QEMU's stdio chardev sets O_NONBLOCK on the open file it shares with the caller."""
    qemu = executable(
        tmp_path / "qemu",
        f"#!{sys.executable}\nimport os\nos.set_blocking(0, False)\nos.write(4, b'started\\nexit 0\\n')\n",
    )
    (tmp_path / "in").write_bytes(b"")
    with open(tmp_path / "in", "rb") as stdin:
        run(make_plan([qemu]), stdin=stdin.fileno())
        assert os.get_blocking(stdin.fileno())


def signal_helper(run: Run, plan: LaunchPlan, *signums: int, pause: float = 0) -> tuple[int, bytes, float]:
    """Run `plan` in a helper, send it `signums` once it printed "ready": (status, stdout, seconds
    from the first signal to the end)."""
    helper = run_in_helper(plan, run)
    try:
        output = read_until(helper.stdout.fileno(), b"ready\n", 20)
        start = time.monotonic()
        for signum in signums:
            helper.send_signal(signum)
            time.sleep(pause)
        status = helper.wait(20)
        return status, output + helper.stdout.read(), time.monotonic() - start
    finally:
        helper.kill()
        helper.wait()
        helper.stdout.close()


# A QEMU that acts as init does with the control port: it takes one request, shows it, and reports
# that the program exited 7.
OBLIGING_QEMU = "echo started >&4; echo ready; read request <&6; echo \"got $request\"; echo 'exit 7' >&4; exit 0"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_goes_to_the_program_which_ends_its_own_way(run, tmp_path, marker, signum):
    vfsd = executable(tmp_path / "virtiofsd", FAKE_VIRTIOFSD.format(body=f"sleep {marker}"))
    plan = make_plan([sh_qemu(tmp_path, OBLIGING_QEMU)], shares=(("root", "/srv", (vfsd,)),))
    status, output, _ = signal_helper(run, plan, signum)
    assert (status, output) == (7, f"ready\ngot signal {int(signum)}\n".encode())
    assert (run.tmp / "stderr").read_bytes() == b""
    assert "signal-sent" in json.loads(run.log("timeline.json"))["host_seconds"]
    run.assert_clean(marker)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_program_that_does_not_end_is_stopped_after_stop_timeout(run, tmp_path, marker, signum):
    qemu = sh_qemu(tmp_path, f"echo started >&4; echo ready; sleep {marker}")
    vfsd = executable(tmp_path / "virtiofsd", FAKE_VIRTIOFSD.format(body=f"sleep {marker}"))
    plan = make_plan([qemu], shares=(("root", "/srv", (vfsd,)),), stop_timeout=0.5)
    status, _, seconds = signal_helper(run, plan, signum)
    assert status == 128 + signum and 0.5 <= seconds < 10
    assert (run.tmp / "stderr").read_text() == (
        f"microvmc: the program did not end within 0.5 s of signal {int(signum)} (resources.stop_timeout); "
        "the VM was stopped\n")
    run.assert_clean(marker)


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once(run, tmp_path, marker, second):
    """Also when it is the same signal again: nothing then blames resources.stop_timeout."""
    qemu = sh_qemu(tmp_path, f"echo started >&4; echo ready; sleep {marker}")
    status, _, seconds = signal_helper(run, make_plan([qemu], stop_timeout=60), signal.SIGTERM, second,
                                       pause=0.2)
    assert status == 128 + second and seconds < 10
    assert (run.tmp / "stderr").read_bytes() == b""
    run.assert_clean(marker)


def test_stop_timeout_0_stops_at_once_and_sends_nothing(run, tmp_path, marker):
    qemu = sh_qemu(tmp_path, f"echo started >&4; echo ready; sleep {marker}")
    status, _, _ = signal_helper(run, make_plan([qemu], stop_timeout=0), signal.SIGTERM)
    assert status == 143
    assert "signal-sent" not in json.loads(run.log("timeline.json"))["host_seconds"]
    run.assert_clean(marker)


def test_a_signal_during_boot_stops_at_once(run, tmp_path, marker):
    qemu = sh_qemu(tmp_path, f"echo ready; sleep {marker}")  # never reports "started"
    status, _, seconds = signal_helper(run, make_plan([qemu], stop_timeout=60), signal.SIGTERM)
    assert status == 143 and seconds < 10
    run.assert_clean(marker)


def test_sweep_removes_only_what_dead_runs_left(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    old = time.time() - 60

    def run_dir(name: str, *, lock: bool = True, age: float = old) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "fs-root.sock").write_text("")
        if lock:
            (d / ".lock").write_text("")
            os.utime(d / ".lock", (age, age))
        return d

    dead = run_dir("microvmc-dead")
    alive = run_dir("microvmc-alive")
    young = run_dir("microvmc-young", age=time.time())
    unlocked = run_dir("microvmc-nolock", lock=False)
    other = run_dir("someone-else")
    held = os.open(alive / ".lock", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # a live run holds its lock
    try:
        assert qemu_backend.sweep_runtime_dirs() == [str(dead)]
    finally:
        os.close(held)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "microvmc-alive", "microvmc-nolock", "microvmc-young", "someone-else"]
    assert unlocked.exists() and young.exists() and other.exists()


SPAWNER = """
import sys, time
from microvmc.backends._procs import spawn
child = spawn(["sleep", sys.argv[1]], fds={0: 0, 1: 1, 2: 2}, name="sleep")
print(child.pid, flush=True)
time.sleep(600)
"""


def test_children_die_with_a_killed_parent(marker):
    """Even SIGKILL, which leaves no chance to clean up: the kernel kills what we started."""
    parent = subprocess.Popen([sys.executable, "-c", SPAWNER, marker], stdout=subprocess.PIPE)
    try:
        pid = int(parent.stdout.readline())
        assert leftovers(marker) != []
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while leftovers(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftovers(marker) == [], f"pid {pid} outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        subprocess.run(["pkill", "-f", marker])


def test_qemu_and_virtiofsd_seen_ending_at_once(run, tmp_path, marker):
    """Issue 6, item 4: a guest that powers off with a virtiofs share: QEMU's and virtiofsd's ends
    arrive in one poll, and QEMU's handler had already unregistered the daemon (KeyError, exit 1)."""
    qemu = sh_qemu(tmp_path, "exit 0")
    vfsd = executable(tmp_path / "virtiofsd", FAKE_VIRTIOFSD.format(body="exit 0"))
    plan = make_plan([qemu], shares=(("root", "/srv", (vfsd, marker)),))
    # Both have ended before the loop first polls: their pidfds are ready together, QEMU's first.
    status, _, err = run(plan, booting=lambda: time.sleep(1))
    assert status == ExitStatus.GUEST_CRASHED
    assert err.decode() == ("microvmc: the VM stopped without reporting the program's status; "
                            f"console log: {run.logs}/console.log\n")
    run.assert_clean(marker)


def test_virtiofsd_ending_cleanly_as_qemu_shuts_down(run, tmp_path, marker):
    """QEMU's shutdown closes virtiofsd's connection, so virtiofsd ends first, with status 0; on a
    busy host QEMU can take a while longer to end. Not a dead virtiofsd (122): the guest powered off."""
    qemu = sh_qemu(tmp_path, f"touch {tmp_path}/go; sleep 1.5")
    vfsd = executable(tmp_path / "virtiofsd", FAKE_VIRTIOFSD.format(
        body=f"while [ ! -e {tmp_path}/go ]; do sleep 0.05; done; exit 0 # {marker}"))
    status, _, err = run(make_plan([qemu], shares=(("root", "/srv", (vfsd,)),)))
    assert status == ExitStatus.GUEST_CRASHED, err
    run.assert_clean(marker)


def test_qemu_failure_beside_a_healthy_virtiofsd(run, tmp_path, marker):
    qemu = sh_qemu(tmp_path, "echo 'qemu-system-x86_64: -device foo: no such device' >&2; exit 1")
    vfsd = executable(tmp_path / "virtiofsd", FAKE_VIRTIOFSD.format(body=f"sleep {marker}"))
    status, _, err = run(make_plan([qemu], shares=(("root", "/srv", (vfsd,)),)))
    assert status == ExitStatus.HOST
    assert err.decode().startswith("microvmc: QEMU failed: qemu-system-x86_64: -device foo")
    run.assert_clean(marker)


def test_qemu_that_does_not_end_after_the_report(run, tmp_path, marker, monkeypatch):
    monkeypatch.setattr(supervise, "SHUTDOWN_GRACE", 0.5)
    qemu = sh_qemu(tmp_path, f"printf 'started\\nexit 3\\n' >&4; sleep {marker}")
    assert run(make_plan([qemu]))[0] == 3
    run.assert_clean(marker)


def test_pipes_held_open_after_qemu_ended(run, tmp_path, marker, monkeypatch):
    """A process QEMU left behind keeps the pipes open: the run still ends, and it is killed."""
    monkeypatch.setattr(supervise, "EOF_GRACE", 0.5)
    qemu = sh_qemu(tmp_path, f"printf 'started\\nexit 0\\n' >&4; sleep {marker} & exit 0")
    assert run(make_plan([qemu]))[0] == 0
    run.assert_clean(marker)


def test_a_terminal_is_relayed_not_handed_to_qemu(run, tmp_path):
    """QEMU gets a pipe fed from the terminal, so it can never put the terminal in raw mode; a
    line typed arrives, Ctrl-D ends the input, and the terminal is as it was."""
    qemu = executable(
        tmp_path / "qemu",
        f"#!{sys.executable}\nimport os, sys\nassert not os.isatty(0)\n"
        "data = sys.stdin.buffer.read()\nos.write(1, data)\nos.write(4, b'started\\nexit 0\\n')\n",
    )
    main, terminal = pty.openpty()
    try:
        before = termios.tcgetattr(terminal)
        os.write(main, b"one line\n\x04")
        status, out, _ = run(make_plan([qemu]), stdin=terminal)
        assert (status, out) == (0, b"one line\n")
        assert termios.tcgetattr(terminal) == before
        assert os.get_blocking(terminal)
    finally:
        os.close(main)
        os.close(terminal)


# --- real boots --------------------------------------------------------------------------------

KERNEL_DIR = Path(
    os.environ.get("MICROVMC_KERNEL_DIR")
    or Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share")
    / "microvmc/kernel/default"
)
QEMU = shutil.which("qemu-system-x86_64")
VIRTIOFSD = next(
    (p for p in ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd") if os.path.exists(p)), None
)
BUSYBOX = shutil.which("busybox")
# Dependencies first (virtio needs virtio_ring).
MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/char/virtio_console.ko",
    "fs/fuse/fuse.ko",
    "fs/fuse/virtiofs.ko",
)

boot = pytest.mark.skipif(
    not (QEMU and BUSYBOX and (KERNEL_DIR / "vmlinuz").exists()),
    reason="needs qemu-system-x86_64, busybox and a kernel in " + str(KERNEL_DIR),
)

# PID 1: finds the named ports, reports as init/PROTOCOL.md says, runs /prog with the ports as
# its stdio (through tee | wc -c: how many bytes it sent), reports its status, waits until the host
# says it read all of each stream (`drained`), reboots (QEMU's -no-reboot then ends QEMU).
INIT = """#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp
for m in /lib/modules/*.ko; do insmod "$m"; done
i=0
while [ $i -lt 200 ]; do
  n=0
  for p in /sys/class/virtio-ports/*; do [ -s "$p/name" ] && n=$((n+1)); done
  [ $n -ge 5 ] && break
  sleep 0.05; i=$((i+1))
done
for p in /sys/class/virtio-ports/*; do ln -s "/dev/${p##*/}" "/dev/port-$(cat "$p/name")"; done
echo started > /dev/port-status
mkfifo /tmp/err
tee /dev/port-stderr < /tmp/err | wc -c > /tmp/sent-stderr &
{ sh /prog < /dev/port-stdin 2> /tmp/err; echo $? > /tmp/code; } | tee /dev/port-stdout | wc -c > /tmp/sent-stdout
wait
acks=0
for s in stdout stderr; do
  n=$(cat /tmp/sent-$s)
  [ "$n" -gt 0 ] && echo "sent $s $n" > /dev/port-status && acks=$((acks+1))
done
echo "exit $(cat /tmp/code)" > /dev/port-status
sync
while [ $acks -gt 0 ] && read -r word stream; do [ "$word" = drained ] && acks=$((acks-1)); done < /dev/port-control
reboot -f
"""

SILENT_INIT = """#!/bin/sh
exec /bin/busybox sleep 1000
"""


def cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A gzip'd newc archive of (name, mode, data)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return gzip.compress(bytes(out), compresslevel=1)


def initramfs(path: Path, init: str, prog: str = "") -> str:
    entries = [
        (d, stat.S_IFDIR | 0o755, b"")
        for d in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules")
    ]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes()))
    entries.append(("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    for i, module in enumerate(MODULES):  # (on the own kernel, insmod fails: everything is built in)
        data = (KERNEL_DIR / "modules/kernel" / module).read_bytes()
        entries.append((f"lib/modules/{i}-{Path(module).name}", stat.S_IFREG | 0o644, data))
    entries.append(("init", stat.S_IFREG | 0o755, init.encode()))
    entries.append(("prog", stat.S_IFREG | 0o644, prog.encode()))
    path.write_bytes(cpio(entries))
    return str(path)


OWN_KERNEL = KERNEL_DIR.parent / "microvmc" / "vmlinux"


@pytest.fixture(scope="session", params=KERNELS)
def vmlinux(request, tmp_path_factory) -> str:
    """microvmc's own kernel (everything built in; no ACPI without PCI, so QEMU names the devices on
    the command line), or the ELF kernel inside Debian's xz bzImage, with its modules: booted
    directly (PVH) it skips decompression."""
    if request.param == "microvmc":
        assert OWN_KERNEL.is_file(), f"no own kernel at {OWN_KERNEL}: run scripts/setup (or microvmc kernel build)"
        return str(OWN_KERNEL)
    image = (KERNEL_DIR / "vmlinuz").read_bytes()
    path = tmp_path_factory.mktemp("kernel") / "vmlinux"
    path.write_bytes(lzma.LZMADecompressor().decompress(image[image.index(b"\xfd7zXZ\x00") :]))
    return str(path)


def qemu_argv(kernel: str, initrd: str, shares: tuple[str, ...] = ()) -> list[str]:
    tsc = tsc_khz()
    append = "console=ttyS0 reboot=t panic=-1 quiet" + (
        f" tsc_early_khz={tsc} tsc=reliable" if tsc else ""
    )
    acpi = "" if kernel != str(OWN_KERNEL) else ",acpi=off"
    argv = [
        QEMU,
        *("-M", f"microvm,accel=tcg,memory-backend=mem{acpi}"),
        *("-cpu", "max"),
        *("-smp", "1"),
        *("-m", "256M"),
        *("-object", "memory-backend-memfd,id=mem,size=256M,share=on"),
        *("-global", "virtio-mmio.force-legacy=false"),
        "-nodefaults",
        "-no-user-config",
        *("-display", "none"),
        "-no-reboot",
        *("-kernel", kernel),
        *("-initrd", initrd),
        *("-append", append),
        *("-serial", "chardev:console"),
        *("-chardev", "file,id=console,path=/dev/fd/5,append=on"),
        *("-device", "virtio-serial-device,max_ports=8"),
        *("-chardev", "stdio,id=stdin,signal=off"),
        *("-device", "virtserialport,chardev=stdin,name=stdin"),
    ]
    for name, fd in (("stdout", 1), ("stderr", 3), ("status", 4)):
        argv += ["-chardev", f"file,id={name},path=/dev/fd/{fd},append=on"]
        argv += ["-device", f"virtserialport,chardev={name},name={name}"]
    argv += ["-chardev", "pipe,id=control,path=/dev/fd/6", "-device", "virtserialport,chardev=control,name=control"]
    for tag in shares:
        argv += ["-chardev", f"socket,id=fs-{tag},path=fs-{tag}.sock"]
        argv += ["-device", f"vhost-user-fs-device,chardev=fs-{tag},tag={tag}"]
    return argv


def virtiofsd_argv(directory: Path) -> tuple[str, ...]:
    return (VIRTIOFSD, "-o", f"source={directory}", "-o", "cache=auto", "-o", "sandbox=chroot")


@pytest.mark.boot
@boot
def test_boot_status_streams_and_stdin_eof(run, tmp_path, vmlinux):
    prog = "cat; echo out; echo err >&2; exit 7"
    plan = make_plan(qemu_argv(vmlinux, initramfs(tmp_path / "initrd", INIT, prog)))
    status, out, err = run(plan, input=b"line one\nline two\n")
    assert (status, out, err) == (7, b"line one\nline two\nout\n", b"err\n")
    assert run.log("status") == "started\nsent stdout 22\nsent stderr 4\nexit 7\n"
    run.assert_clean(str(tmp_path))


@pytest.mark.boot
@boot
def test_boot_binary_round_trip(run, tmp_path, vmlinux):
    data = os.urandom(1 << 20)
    plan = make_plan(qemu_argv(vmlinux, initramfs(tmp_path / "initrd", INIT, "cat")))
    status, out, err = run(plan, input=data)
    assert (status, err) == (0, b"")
    assert out == data


@pytest.mark.boot
@boot
def test_boot_timeout_real(run, tmp_path, vmlinux):
    plan = make_plan(
        qemu_argv(vmlinux, initramfs(tmp_path / "initrd", SILENT_INIT)), boot_timeout=3
    )
    start = time.monotonic()
    status, _, err = run(plan)
    assert status == ExitStatus.TIMEOUT
    assert time.monotonic() - start < 3 + 5
    assert err.decode().startswith("microvmc: the guest did not start the program within 3 s")
    run.assert_clean(str(tmp_path))


needs_virtiofsd = pytest.mark.skipif(
    VIRTIOFSD is None or os.geteuid() != 0, reason="needs virtiofsd, run as root"
)


@pytest.mark.boot
@boot
@needs_virtiofsd
def test_boot_sigterm_mid_run(run, tmp_path, vmlinux):
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("from the host\n")
    prog = "mount -t virtiofs root /mnt && cat /mnt/hello && echo ready && sleep 1000"
    plan = make_plan(
        qemu_argv(vmlinux, initramfs(tmp_path / "initrd", INIT, prog), shares=("root",)),
        shares=(("root", str(share), virtiofsd_argv(share)),),
        stop_timeout=0,  # this init passes no signals on: the signal stops the VM
    )
    helper = run_in_helper(plan, run)
    try:
        output = read_until(helper.stdout.fileno(), b"ready", 60)
        assert output.startswith(b"from the host\n")
        assert leftovers(str(share)) != []  # virtiofsd runs: the check below means something
        helper.send_signal(signal.SIGTERM)
        assert helper.wait(20) == 143
    finally:
        helper.kill()
        helper.wait()
        helper.stdout.close()
    run.assert_clean(str(tmp_path))


@pytest.mark.boot
@boot
@needs_virtiofsd
def test_boot_virtiofsd_killed(run, tmp_path, vmlinux):
    share = tmp_path / "share"
    share.mkdir()
    prog = "mount -t virtiofs root /mnt && echo ready && sleep 1000"
    plan = make_plan(
        qemu_argv(vmlinux, initramfs(tmp_path / "initrd", INIT, prog), shares=("root",)),
        shares=(("root", str(share), virtiofsd_argv(share)),),
    )
    read_end, write_end = os.pipe()

    def kill_virtiofsd():
        try:
            read_until(read_end, b"ready", 60)
        finally:
            subprocess.run(["pkill", "-KILL", "-f", f"virtiofsd.*source={share}"])

    killer = threading.Thread(target=kill_virtiofsd)
    killer.start()
    try:
        status, _, err = run(plan, stdout=write_end)
    finally:
        os.close(write_end)
        killer.join(60)
        os.close(read_end)
    assert status == ExitStatus.VIRTIOFSD_DIED
    assert err.decode() == (
        "microvmc: virtiofsd for share 'root' died while the VM ran (killed by signal 9); "
        f"log: {run.logs}/virtiofsd-root.log\n"
    )
    run.assert_clean(str(tmp_path))


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace needs root, as virtiofsd does")
def test_the_read_only_jail_refuses_writes_and_leaves_the_host_mounts_alone(tmp_path):
    from microvmc.compiler.plan import read_only_jail

    share = tmp_path / "a dir, with\nodd name"
    share.mkdir()
    (share / "f").write_text("original\n")
    before = Path("/proc/self/mountinfo").read_text()
    probe = f"echo pwned > {shlex.quote(str(share / 'f'))}; echo $?"
    done = subprocess.run([*read_only_jail(str(share)), "sh", "-c", probe], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2\n" and done.stderr.endswith(": Read-only file system\n")
    assert (share / "f").read_text() == "original\n"
    (share / "g").write_text("the host still writes\n")
    assert Path("/proc/self/mountinfo").read_text() == before


def test_a_child_started_in_a_directory_leaves_ours_alone(tmp_path, marker):
    """spawn(cwd=) changes this process's directory around posix_spawn (no exec of env -C): the
    child runs there, argv[0] is found from there, and this process is back where it was, also when
    the spawn fails."""
    from microvmc.backends._procs import spawn

    there = tmp_path / "there"
    there.mkdir()
    executable(there / "prog", f"#!/bin/sh\npwd > {tmp_path}/cwd # {marker}\n")
    before = os.getcwd()
    child = spawn(["./prog"], fds={0: 0, 1: 1, 2: 2}, name="prog", cwd=there, die_with_us=False)
    assert child.wait(5) == 0 and child.stop(5) == 0
    assert (tmp_path / "cwd").read_text() == f"{there}\n" and os.getcwd() == before
    with pytest.raises(FileNotFoundError):
        spawn(["./prog"], fds={0: 0, 1: 1, 2: 2}, name="prog", cwd=tmp_path)
    assert os.getcwd() == before


def test_which_answers_as_shutil_does(tmp_path, monkeypatch):
    from microvmc.backends._procs import which

    for name in ("a", "b", "dir"):
        (tmp_path / name).mkdir() if name == "dir" else (tmp_path / name).write_text("")
    (tmp_path / "a").chmod(0o755)
    path = os.pathsep.join([str(tmp_path / "missing"), str(tmp_path), str(tmp_path)])
    for name in ("a", "b", "dir", "nothing", str(tmp_path / "a"), str(tmp_path / "b"), "sh"):
        for mode in (os.F_OK | os.X_OK, os.F_OK):
            assert which(name, mode=mode, path=path) == shutil.which(name, mode=mode, path=path), (name, mode)
        assert which(name) == shutil.which(name)
    assert which("sh", path="") is None and shutil.which("sh", path="") is None
    monkeypatch.delenv("PATH")
    assert which("sh") == shutil.which("sh")


def test_runtime_directories_go_where_tempfile_would_put_them(tmp_path, monkeypatch):
    """Without XDG_RUNTIME_DIR, tempfile.gettempdir()'s choice, told without importing tempfile."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    writable = tmp_path / "tmp"
    writable.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    monkeypatch.setenv("TEMP", str(writable))
    assert qemu_backend._runtime_base() == str(writable)
    with qemu_backend.runtime_dir() as rundir:
        assert rundir.parent == writable
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert qemu_backend._runtime_base() == str(tmp_path)
