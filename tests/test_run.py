"""`microvmc run` end to end: real kernel, real QEMU (TCG), real virtiofsd; asserts what the guest
printed and returned. Boots are grouped where one boot can honestly check several things."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, KERNELS, on_kernel, private_runtime

pytestmark = pytest.mark.boot

MICROVMC = [sys.executable, "-m", "microvmc"]
TIMEOUT = 180


@pytest.fixture(scope="module")
def env(boot_env, tmp_path_factory) -> dict[str, str]:
    return private_runtime(boot_env, tmp_path_factory)


def run(env, *args: str, input: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MICROVMC, "run", *args], env=env, input=input if input is not None else b"",
                          capture_output=True, timeout=TIMEOUT, cwd=cwd)


def pid_files(env) -> list[str]:
    """Pid files the C virtiofsd left in /run/virtiofsd for sockets in this session's runtime directory."""
    prefix = env["XDG_RUNTIME_DIR"].replace("/", ".")
    folder = Path("/run/virtiofsd")
    return [p.name for p in folder.iterdir() if p.name.startswith(prefix)] if folder.is_dir() else []


def leftovers(env) -> list[str]:
    """Processes started for this test session's store, and runtime directories left behind."""
    store = env["MICROVMC_STORE"]
    procs = subprocess.run(["pgrep", "-a", "-f", store], capture_output=True, text=True).stdout.splitlines()
    dirs = [str(p) for p in Path(env["XDG_RUNTIME_DIR"]).iterdir()]
    return procs + dirs


@pytest.mark.parametrize("kernel", KERNELS)
def test_hello(env, tmp_path: Path, kernel: str) -> None:
    import json

    manifest = on_kernel(EXAMPLES / "hello.toml", kernel, tmp_path)
    r = run(env, str(manifest))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"hello from a microVM\n", b"")
    # The run left its record and logs (not its sockets or runtime directory).
    runs = sorted((p for p in Path(env["XDG_STATE_HOME"], "microvmc", "runs").iterdir() if p.is_dir()),
                  key=lambda p: p.stat().st_mtime_ns)
    record = json.loads((runs[-1] / "record.json").read_text())
    assert (record["plan"]["name"], record["state"], record["status"], record["manifest"]) == (
        "hello", "exited", 0, str(manifest))
    graph = json.loads(Path(record["output"], "plan.json").read_text())["graph"]
    chosen = next(n for n in graph["nodes"] if n["id"] == "kernel")["locations"]["chosen"]
    assert chosen.startswith({"microvmc": "microvmc's own kernel", "debian": "the Debian kernel"}[kernel]), chosen
    assert not (runs[-1] / "vm").exists() and not (runs[-1] / "control.sock").exists()
    report = (runs[-1] / "status").read_text().splitlines()
    assert [line for line in report if not line.startswith("time ")] == ["started", "sent stdout 21", "exit 0"]
    assert (runs[-1] / "console.log").stat().st_size > 0
    # The boot timeline: init's stages in order, on the guest's clock, and the host's marks.
    timeline = json.loads((runs[-1] / "timeline.json").read_text())
    guest = timeline["guest_ms"]
    assert list(guest) == ["init", "modules", "ports", "mounts", "exec", "exit"]
    assert list(guest.values()) == sorted(guest.values()) and guest["init"] > 0
    host = timeline["host_seconds"]
    assert list(host) == ["qemu", "kernel", "init", "started", "reported", "qemu-exited", "ended"]
    assert list(host.values()) == sorted(host.values())
    # The kernel's phases, from the host's marks of console lines: ordered, none empty but the
    # shutdown's, and together QEMU's whole life.
    phases = timeline["phases_seconds"]
    assert list(phases) == ["qemu → kernel", "kernel → init", "init → started", "started → reported",
                            "reported → qemu-exited"]
    assert all(seconds > 0 for seconds in list(phases.values())[:-1]) and phases["reported → qemu-exited"] >= 0
    assert abs(sum(phases.values()) - (host["qemu-exited"] - host["qemu"])) < 0.002
    # The kernel ran from its first message to init: longer than init's own set-up, by the host's clock.
    assert phases["kernel → init"] > phases["init → started"]
    console = (runs[-1] / "console.log").read_bytes()
    assert console.count(b"microvmc-init: started") == 1 and console.index(b"microvmc-init: started") > 0


ARGS = ["plain", "with space", "", 'double"quote', "single'quote", "a=b", "dotted.name=x", "--flag=v", "tab\there",
        "new\nline", "ünïcödé ✓", "%41", "$HOME", "back\\slash"]


def test_argv_env_hostname_stderr_and_exit_status(env, tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text('version = 1\nhostname = "exact-host"\n[process]\nargv = ["true"]\ncwd = "/tmp"\n'
                        '[process.env]\nFROM_MANIFEST = "a b\\"c"\n')
    script = 'for a in "$@"; do printf "[%s]" "$a"; done; echo; hostname; pwd; printf "%s|%s" "$FROM_MANIFEST" "$FROM_CLI"; echo err >&2; exit 42'
    r = run(env, "-e", "FROM_CLI=x=y z", str(manifest), "--", "/bin/sh", "-c", script, "sh", *ARGS)
    assert r.stderr == b"err\n"
    assert r.returncode == 42
    assert r.stdout.decode() == "".join(f"[{a}]" for a in ARGS) + '\nexact-host\n/tmp\na b"c|x=y z'


def test_environment_spills_and_arrives_exactly_then_exit_1(env, tmp_path: Path) -> None:
    values = {f"V{i:02d}": f"value {i}" for i in range(34)}
    values.update({
        "SPACES": "  leading and trailing  ",
        "QUOTES": "'single' \"double\" `back`",
        "NEWLINES": "one\ntwo\n\nthree\n",
        "UNICODE": "héllo wörld ✓ 日本 \u00a0nbsp",
        "KIB": "k" * 1024,
        "EQUALS": "a=b=c",
        "LARGEST": "L" * (131071 - len("LARGEST=")),  # the longest entry execve takes (validation's limit)
    })
    body = "".join(f"{name} = {toml_string(value)}\n" for name, value in values.items())
    manifest = tmp_path / "env.toml"
    manifest.write_text(f'version = 1\n[process]\nargv = ["cat", "/proc/self/environ", "/no/such/file"]\n[process.env]\n{body}')
    r = run(env, str(manifest))
    got = dict(entry.split("=", 1) for entry in r.stdout.decode().split("\0") if entry)
    expected = dict(values, PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    assert got == expected
    assert r.returncode == 1
    assert b"/no/such/file" in r.stderr


def toml_string(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


@pytest.mark.parametrize("kernel", KERNELS)
def test_binary_stdin_to_stdout_and_eof(env, tmp_path: Path, kernel: str) -> None:
    data = os.urandom(1 << 20)
    r = run(env, str(on_kernel(EXAMPLES / "cat.toml", kernel, tmp_path)), "--", "/bin/sh", "-c", "tee /tmp/copy | wc -c >&2; cat /tmp/copy", input=data)
    assert r.returncode == 0
    assert r.stderr.strip() == b"1048576"
    assert r.stdout == data


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("how", ["run", "launch.sh"])
def test_all_output_reaches_a_reader_that_starts_late(env, tmp_path: Path, how: str, kernel: str) -> None:
    """3 MiB to a reader that waits 3 s first: more than `run` buffers (1 MiB) and the pipes hold, so
    the rest waits in the guest's port queue, which QEMU drops when the VM ends. init ends the VM only
    once told that all of it was read (`sent` / `drained`); before that, the output arrived cut short
    (1 MiB and a bit) every time on the own kernel."""
    line = b"0123456789abcde\n"
    manifest = tmp_path / "big.toml"
    manifest.write_text(f'version = 1\n[kernel]\nsource = "{kernel}"\n[process]\n'
                        'argv = ["/bin/sh", "-c", "yes 0123456789abcde | head -c 3145728; echo done >&2"]\n')
    if how == "run":
        cmd = [*MICROVMC, "run", str(manifest)]
    else:
        subprocess.run([*MICROVMC, "build", "-o", str(tmp_path / "out"), str(manifest)], env=env, check=True,
                       capture_output=True, timeout=TIMEOUT)
        cmd = ["sh", str(tmp_path / "out" / "launch.sh")]
    for attempt in range(2):
        received = tmp_path / f"received-{attempt}"
        vm = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader = subprocess.Popen(["sh", "-c", 'sleep 3; exec cat > "$0"', str(received)], stdin=vm.stdout)
        vm.stdout.close()
        err = vm.stderr.read()
        assert (vm.wait(timeout=TIMEOUT), reader.wait(timeout=TIMEOUT), err) == (0, 0, b"done\n")
        data = received.read_bytes()
        assert (len(data), data == line * (3 << 16)) == (3 << 20, True), attempt
    assert leftovers(env) == []


def test_killed_by_a_signal_and_verbose_says_which_accelerator(env) -> None:
    import re

    r = run(env, "-v", str(EXAMPLES / "hello.toml"), "--", "/bin/sh", "-c", "kill -KILL $$")
    assert (r.returncode, r.stdout) == (128 + 9, b"")
    assert re.fullmatch(rb"microvmc: build output \S+\nmicrovmc: accel (tcg|kvm) \((auto|resources)[^\n]*\); root over virtiofs; logs in \S+\n"
                        rb"microvmc: timeline: kernel [0-9.]+ s, modules [0-9.]+ s, .*program [0-9.]+ s; host: qemu at .*\n",
                        r.stderr), r.stderr


def test_program_not_found(env) -> None:
    r = run(env, str(EXAMPLES / "hello.toml"), "--", "/no/such/program")
    assert r.returncode == 127
    assert b"/no/such/program" in r.stderr and b"Traceback" not in r.stderr


def test_closed_stdin_and_stdout(env) -> None:
    """Started with fds 0 and 1 closed: they act as /dev/null (cat sees EOF at once), and nothing
    microvmc opens takes their place."""
    r = subprocess.run(["sh", "-c", 'exec "$@" <&- >&-', "sh", *MICROVMC, "run", str(EXAMPLES / "cat.toml")],
                       env=env, capture_output=True, timeout=TIMEOUT)
    assert (r.returncode, r.stderr) == (0, b"")
    assert not leftovers(env)


def test_bytes_that_are_not_utf8_arrive_exactly(env) -> None:
    """A shell can pass any bytes as arguments and in -e values: the guest gets them unchanged."""
    r = run(env, "-e", b"K=\xc3(\xff", str(EXAMPLES / "hello.toml"), "--", "/bin/sh", "-c", 'printf "%s|%s" "$1" "$K"',
            "sh", b"\xff\xfe\x80")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"\xff\xfe\x80|\xc3(\xff", b"")


def test_pipeline_of_two_vms(env) -> None:
    cmd = [*MICROVMC, "run", str(EXAMPLES / "source.toml")]
    second = [*MICROVMC, "run", str(EXAMPLES / "head.toml")]
    a = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    b = subprocess.Popen(second, env=env, stdin=a.stdout, stdout=subprocess.PIPE)
    a.stdout.close()
    a.stdin.write(b"hello\n")
    a.stdin.close()
    out, _ = b.communicate(timeout=TIMEOUT)
    a.wait(timeout=TIMEOUT)
    assert out == b"hello\n" + b"".join(b"line %d\n" % i for i in range(1, 7))
    assert b.returncode == 0


@pytest.mark.parametrize("how", ["run", "launch.sh"])
def test_a_reader_that_goes_away_ends_the_program_as_locally(env, tmp_path: Path, how: str) -> None:
    """`yes | head -n 1`: the program sees its stdout closed (SIGPIPE), as it would locally, and the
    run ends; with SIGPIPE ignored it gets EPIPE and ends its own way."""
    manifest = tmp_path / "yes.toml"
    manifest.write_text('version = 1\n[process]\nargv = ["/bin/sh", "-c", "yes; echo status $? >&2"]\n')
    ignoring = tmp_path / "ignoring.toml"
    ignoring.write_text('version = 1\n[process]\nargv = ["/bin/sh", "-c", "trap \'\' PIPE; yes; echo status $? >&2"]\n')
    results = []
    for m in (manifest, ignoring):
        if how == "run":
            cmd = [*MICROVMC, "run", str(m)]
        else:
            out = tmp_path / f"out-{m.stem}"
            subprocess.run([*MICROVMC, "build", "-o", str(out), str(m)], env=env, check=True, capture_output=True,
                           timeout=TIMEOUT)
            cmd = ["sh", str(out / "launch.sh")]
        vm = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        head = subprocess.run(["head", "-n", "1"], stdin=vm.stdout, capture_output=True, timeout=TIMEOUT)
        vm.stdout.close()
        err = vm.stderr.read()
        results.append((head.stdout, vm.wait(timeout=TIMEOUT), err))
    # the shell's `yes` was killed by SIGPIPE (141 as $?); sh then exits 0 after its echo
    assert results[0] == (b"y\n", 0, b"status 141\n")
    assert results[1][:2] == (b"y\n", 0) and results[1][2].endswith(b"status 1\n")
    assert leftovers(env) == []


@pytest.mark.parametrize("kernel", KERNELS)
def test_shares_overlay_and_9p(env, tmp_path: Path, kernel: str) -> None:
    r = run(env, str(on_kernel(EXAMPLES / "shares.toml", kernel, tmp_path)))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"shared from the host\nscratch\n", b"")
    r = run(env, str(on_kernel(EXAMPLES / "ninep.toml", kernel, tmp_path)))
    assert (r.returncode, r.stdout) == (0, b"9p\n")


def test_what_the_guest_writes_is_on_the_host_when_run_returns(env, tmp_path: Path) -> None:
    """A directory image mounted read-write, and writable shares over virtiofs and over 9p: what the
    program wrote (it does not sync) is on the host, byte for byte, by the time microvmc exits."""
    import hashlib
    import shutil

    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    for name in ("v", "p"):
        (tmp_path / name).mkdir()
    program = ("b=/bin/busybox; for d in /v /p; do $b dd if=/dev/urandom of=$d/rand bs=65536 count=16 2>/dev/null; "
               "done; $b sha256sum /v/rand /p/rand; echo in-root > /written-in-root")
    manifest = tmp_path / "rw.toml"
    manifest.write_text(
        'version = 1\n[image]\nsource = "directory"\npath = "root"\nmode = "read-write"\n'
        f'[process]\nargv = ["/bin/sh", "-c", {json.dumps(program)}]\n'
        '[shares.v]\nhost = "v"\nguest = "/v"\ntransport = "virtiofs"\n'
        '[shares.p]\nhost = "p"\nguest = "/p"\ntransport = "9p"\n')
    r = run(env, str(manifest))
    assert (r.returncode, r.stderr) == (0, b"")
    sums = dict(reversed(line.split()) for line in r.stdout.decode().splitlines())
    for name in ("v", "p"):
        data = (tmp_path / name / "rand").read_bytes()
        assert len(data) == 1 << 20 and hashlib.sha256(data).hexdigest() == sums[f"/{name}/rand"]
    assert (root / "written-in-root").read_text() == "in-root\n"


def test_shares_where_the_read_only_image_has_no_directory(env, tmp_path: Path) -> None:
    """The built-in image has no /data or /srv/in/9p: init makes them in an overlay, mounts the
    shares, then the root is read-only again for the program."""
    for name in ("data", "p9"):
        (tmp_path / name).mkdir()
    program = ("echo x > /data/f && echo y > /srv/in/9p/g && cat /data/f /srv/in/9p/g; "
               "if touch /z 2>/dev/null; then echo root-writable; else echo root-read-only; fi")
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'version = 1\n[process]\nargv = ["/bin/sh", "-c", {json.dumps(program)}]\n'
                        '[shares.data]\nhost = "data"\nguest = "/data"\n'
                        '[shares.p9]\nhost = "p9"\nguest = "/srv/in/9p"\ntransport = "9p"\n')
    r = run(env, str(manifest))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"x\ny\nroot-read-only\n", b"")
    assert (tmp_path / "data" / "f").read_text() == "x\n" and (tmp_path / "p9" / "g").read_text() == "y\n"


def test_launch_script_does_the_same_on_its_own(env, tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text('version = 1\n[process]\nargv = ["/bin/sh", "-c", "read x; echo \\"got $x\\"; echo oops >&2; exit 7"]\n')
    built = subprocess.run([*MICROVMC, "build", str(manifest)], env=env, cwd=tmp_path, capture_output=True, check=True)
    script = subprocess.run(["sh", str(tmp_path / "result" / "launch.sh")], env=env, input=b"input\n",
                            capture_output=True, timeout=TIMEOUT)
    via_run = run(env, str(manifest), input=b"input\n")
    assert (script.returncode, script.stdout, script.stderr) == (7, b"got input\n", b"oops\n")
    assert (via_run.returncode, via_run.stdout, via_run.stderr) == (7, b"got input\n", b"oops\n")
    assert built.stdout.decode().strip() == str((tmp_path / "result").resolve())


def test_boot_timeout(env, tmp_path: Path) -> None:
    manifest = tmp_path / "slow.toml"
    # Under TCG no kernel reaches init in 0.1 s, however fast the machine.
    manifest.write_text('version = 1\n[process]\nargv = ["true"]\n[resources]\nboot_timeout = 0.1\naccel = "tcg"\n')
    r = run(env, str(manifest))
    assert r.returncode == 124
    assert r.stderr.startswith(b"microvmc: ") and b"console log" in r.stderr
    assert not leftovers(env)


def _start_and_wait_ready(env, manifest: str) -> subprocess.Popen:
    p = subprocess.Popen([*MICROVMC, "run", manifest, "--", "/bin/sh", "-c", "echo ready; exec sleep 600"],
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    return p


def test_sigterm_stops_everything(env) -> None:
    p = _start_and_wait_ready(env, str(EXAMPLES / "hello.toml"))
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 143
    assert not leftovers(env)


def _children(pid: int) -> list[str]:
    """The command lines of a process's children."""
    try:
        pids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in pids:
        try:
            found.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_right_after_qemu_started_stops_everything(env, tmp_path: Path, signum: int) -> None:
    """A run of a cached build starts QEMU before it imports its supervision (cli._run_started): a
    signal in that window stops QEMU and virtiofsd as one during the boot does, and leaves no
    process, socket or directory; the record says how the run ended."""
    manifest = tmp_path / "m.toml"
    manifest.write_text('version = 1\n[process]\nargv = ["/bin/sleep", "600"]\n')
    subprocess.run([*MICROVMC, "build", str(manifest)], env=env, cwd=tmp_path, capture_output=True, check=True)
    p = subprocess.Popen([*MICROVMC, "run", str(manifest)], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not any("qemu-system" in c for c in _children(p.pid)):
            assert time.monotonic() < deadline and p.poll() is None, "QEMU did not start"
            time.sleep(0.001)
        p.send_signal(signum)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
        p.wait()
    assert (p.returncode, out) == (128 + signum, b"")
    assert not leftovers(env)
    runs = Path(env["XDG_STATE_HOME"], "microvmc", "runs")
    records = [json.loads((d / "record.json").read_text()) for d in runs.iterdir() if (d / "record.json").exists()]
    [record] = [r for r in records if r["manifest"] == str(manifest)]
    assert (record["state"], record["status"], record["command"]) == ("exited", 128 + signum, ["/bin/sleep", "600"])
    run_dir = runs / record["id"]
    assert not (run_dir / "vm").exists() and not (run_dir / "control.sock").exists()


# One boot checks what init does for the program: an orphan is reaped, a signal sent to PID 1 inside
# the guest goes on to the program, and a signal sent to microvmc (or to launch.sh) reaches it too.
GRACEFUL = """trap 'echo got USR1' USR1
trap 'echo got TERM; exit 7' TERM
(sleep 0.1 &)
sleep 1
echo zombies $(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l)
kill -USR1 1
sleep 0.2
echo ready
while :; do sleep 0.1; done
"""


@pytest.mark.parametrize("how", ["run", "launch.sh"])
def test_init_reaps_orphans_and_passes_signals_on(env, tmp_path: Path, how: str) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'version = 1\n[process]\nargv = ["/bin/sh", "-c", {json.dumps(GRACEFUL)}]\n')
    if how == "run":
        argv = [*MICROVMC, "run", str(manifest)]
    else:
        subprocess.run([*MICROVMC, "build", str(manifest)], env=env, cwd=tmp_path, capture_output=True, check=True)
        argv = ["sh", str(tmp_path / "result" / "launch.sh")]
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = [p.stdout.readline() for _ in range(3)]
        assert lines == [b"zombies 0\n", b"got USR1\n", b"ready\n"]
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
        p.wait()
    assert (p.returncode, out, err) == (7, b"got TERM\n", b"")
    assert not leftovers(env)


def test_sigkill_of_microvmc_leaves_nothing_running_and_the_next_run_sweeps(env) -> None:
    """SIGKILL gives microvmc no chance to clean up: QEMU and virtiofsd die with it (the kernel's
    parent-death signal), the run is listed as dead, and the sockets it left are removed by a later run."""
    p = _start_and_wait_ready(env, str(EXAMPLES / "hello.toml"))
    runs = Path(env["XDG_STATE_HOME"], "microvmc", "runs")
    [killed] = [d for d in runs.iterdir() if (d / "record.json").exists()
                and f'"monitor": {p.pid}' in (d / "record.json").read_text()]
    p.kill()
    p.wait()
    p.stdout.close()
    p.stderr.close()
    deadline = time.monotonic() + 10
    while leftovers(env) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(env) == []  # no process
    assert (killed / "vm").is_dir() and (killed / "control.sock").exists()  # it could not remove them
    assert run(env, str(EXAMPLES / "hello.toml")).returncode == 0
    assert not (killed / "vm").exists() and not (killed / "control.sock").exists()
    ps = subprocess.run([*MICROVMC, "ps", "-a"], env=env, capture_output=True, text=True, check=True).stdout
    assert "Dead (monitor lost)" in ps and killed.name[:12] in ps
    assert not leftovers(env)


def test_sigkill_of_launch_sh_leaves_no_process(env, tmp_path: Path) -> None:
    """QEMU and virtiofsd die with a SIGKILLed launch.sh (setpriv --pdeathsig), and its watchers see
    it gone within a second. Its runtime directory, which a killed script cannot remove, is swept by
    the next `microvmc run` once its lock is free."""
    manifest = tmp_path / "m.toml"
    manifest.write_text('version = 1\n[process]\nargv = ["/bin/sh", "-c", "echo ready; exec sleep 600"]\n')
    subprocess.run([*MICROVMC, "build", str(manifest)], env=env, cwd=tmp_path, capture_output=True, check=True)
    script = str(tmp_path / "result" / "launch.sh")
    p = subprocess.Popen(["sh", script], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10

        def running() -> list[str]:
            mine = subprocess.run(["pgrep", "-af", script], capture_output=True, text=True).stdout.splitlines()
            return mine + [x for x in leftovers(env) if not x.startswith(env["XDG_RUNTIME_DIR"])]

        while running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running() == []
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
    [stale] = Path(env["XDG_RUNTIME_DIR"]).glob("microvmc-*")
    assert pid_files(env)  # its virtiofsd's, which it could not remove
    past = time.time() - 60  # as if left a minute ago (a younger one may be a run starting)
    os.utime(stale / ".lock", (past, past))
    assert run(env, str(EXAMPLES / "hello.toml")).returncode == 0
    assert not leftovers(env) and not pid_files(env)


def test_a_dead_virtiofsd_stops_the_run(env) -> None:
    p = _start_and_wait_ready(env, str(EXAMPLES / "hello.toml"))
    pids = subprocess.run(["pgrep", "-f", f"virtiofsd.*{env['MICROVMC_STORE']}"], capture_output=True, text=True).stdout.split()
    assert pids
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    assert p.wait(timeout=60) == 122
    assert b"virtiofsd" in p.stderr.read()
    deadline = time.monotonic() + 5
    while leftovers(env) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers(env)


def _wait_until_started(env, process: subprocess.Popen, limit: float = 120) -> None:
    """Until the newest run of this session has its program started (its status says so)."""
    runs = Path(env["XDG_STATE_HOME"], "microvmc", "runs")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        newest = max((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime_ns,
                     default=None) if runs.is_dir() else None
        if newest and (newest / "record.json").exists() and f'"monitor": {process.pid}' in (newest / "record.json").read_text():
            status = newest / "status"
            if status.exists() and "started" in status.read_text().splitlines():
                return
        time.sleep(0.05)
    raise AssertionError("the program did not start")


def test_a_terminal_stays_a_terminal(env) -> None:
    """On a terminal, input is line-edited as usual, Ctrl-D ends it and Ctrl-C stops the run."""
    import fcntl
    import termios

    def controlling_tty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    for keys, status, output in ((b"typed line\n\x04", 0, b"typed line\n"), (b"\x03", 130, b"")):
        master, slave = os.openpty()
        p = subprocess.Popen([*MICROVMC, "run", str(EXAMPLES / "cat.toml")], env=env, stdin=slave,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=controlling_tty)
        os.close(slave)
        before = termios.tcgetattr(master)
        try:
            _wait_until_started(env, p)
            os.write(master, keys)
            out, _ = p.communicate(timeout=TIMEOUT)
        finally:
            p.kill()
            p.wait()
        assert (p.returncode, out) == (status, output)
        assert termios.tcgetattr(master)[3] & termios.ICANON  # still in line mode
        assert termios.tcgetattr(master) == before
        os.close(master)
    assert not leftovers(env)


def test_a_guest_kernel_panic(env) -> None:
    r = run(env, str(EXAMPLES / "hello.toml"), "--", "/bin/sh", "-c", "echo c > /proc/sysrq-trigger")
    assert r.returncode == 123
    assert r.stderr.startswith(b"microvmc: the VM stopped without reporting the program's status; console log: ")
    log = Path(r.stderr.decode().rsplit("console log: ", 1)[1].strip())
    assert b"Kernel panic" in log.read_bytes() or b"sysrq" in log.read_bytes().lower()


def test_explicit_kvm_that_cannot_work_fails_fast(env, tmp_path: Path) -> None:
    from microvmc.backends.host import probe_host

    if probe_host(env).kvm_usable:
        pytest.skip("KVM works on this host")
    manifest = tmp_path / "kvm.toml"
    manifest.write_text('version = 1\n[process]\nargv = ["true"]\n[resources]\naccel = "kvm"\n')
    start = time.monotonic()
    r = run(env, str(manifest))
    assert r.returncode == 121
    assert r.stderr.decode().startswith(f'microvmc: {manifest}: resources.accel: "kvm" is not usable here: ')
    assert time.monotonic() - start < 10


def test_random_arguments_round_trip_through_the_guest(env) -> None:
    """Property: whatever the strings, the guest's program receives them exactly (one boot per example)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=60)

    @settings(max_examples=2, deadline=None, derandomize=True)
    @given(st.lists(text, min_size=10, max_size=25))
    def check(args: list[str]) -> None:
        r = run(env, str(EXAMPLES / "hello.toml"), "--", "/bin/sh", "-c", 'printf "%s\\0" "$@"', "sh", *args)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode("utf-8", "surrogateescape").split("\0")[:-1] == args

    check()


def test_a_guest_init_failure_is_reported(env, tmp_path: Path) -> None:
    """An image whose /proc is a file, not a directory: init cannot mount there, reports it, and
    microvmc exits 120 (no validation can see this; it is the image's content)."""
    import shutil

    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "proc").write_text("not a directory\n")
    manifest = tmp_path / "m.toml"
    manifest.write_text('version = 1\n[image]\nsource = "directory"\npath = "root"\n[process]\nargv = ["/bin/busybox", "true"]\n')
    r = run(env, str(manifest))
    assert r.returncode == 120
    message = r.stderr.decode()
    assert message.startswith("microvmc: guest init failed at mount: ") and "/proc" in message
    assert message.count("\n") == 1 and "console log: " in message
    assert not leftovers(env)


def _write_attempts(*paths: str) -> str:
    """Guest shell: remount each path's filesystem read-write, then try to write to it; prints
    `<path> written` or `<path> refused` for each (and the shell's reason on stderr)."""
    return "; ".join(f"mount -o remount,rw {os.path.dirname(p) or '/'} 2>/dev/null; "
                     f"if echo pwned > {p}; then echo {p} written; else echo {p} refused; fi"
                     for p in paths)


def test_read_only_is_enforced_on_the_host(env, tmp_path: Path) -> None:
    """Issue 6, item 1: the guest can remount anything read-write, so a read-only root (the store's
    shared busybox image), the image under an overlay, and read_only shares over virtiofs must refuse
    writes on the host side; 9p's readonly=on already does."""
    for name in ("v", "p"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("original\n")
    shares = ('[shares.v]\nhost = "v"\nguest = "/mnt"\nread_only = true\ntransport = "virtiofs"\n'
              '[shares.p]\nhost = "p"\nguest = "/tmp/p"\nread_only = true\ntransport = "9p"\n')
    read_only = tmp_path / "ro.toml"  # /mnt is in the image and /tmp/p on a tmpfs: the root stays plain read-only
    program = _write_attempts("/pwned", "/mnt/f", "/tmp/p/f") + "; grep ' / ' /proc/mounts | cut -d' ' -f3"
    read_only.write_text(f'version = 1\n[process]\nargv = ["/bin/sh", "-c", {json.dumps(program)}]\n' + shares)
    subprocess.run([*MICROVMC, "build", str(read_only)], env=env, cwd=tmp_path, capture_output=True, check=True)
    script = ["sh", str(tmp_path / "result" / "launch.sh")]
    for r in (run(env, str(read_only)), subprocess.run(script, env=env, capture_output=True, timeout=TIMEOUT)):
        assert (r.returncode, r.stdout.decode()) == (0, "/pwned refused\n/mnt/f refused\n/tmp/p/f refused\nvirtiofs\n")
        assert r.stderr.decode() == "".join(f"/bin/sh: can't create {p}: Read-only file system\n"
                                            for p in ("/pwned", "/mnt/f", "/tmp/p/f"))
    assert pid_files(env) == []  # issue 6, item 9: the C virtiofsd's, which launch.sh names by --socket-path
    overlay = tmp_path / "overlay.toml"  # the image below the overlay, mounted again by the guest
    program = "mkdir /r && mount -t virtiofs root /r && " + _write_attempts("/r/pwned")
    overlay.write_text(f'version = 1\n[image]\nmode = "overlay"\n'
                       f'[process]\nargv = ["/bin/sh", "-c", {json.dumps(program)}]\n')
    r = run(env, str(overlay))
    assert (r.returncode, r.stdout.decode()) == (0, "/r/pwned refused\n")
    assert r.stderr.decode() == "/bin/sh: can't create /r/pwned: Read-only file system\n"
    for name in ("v", "p"):
        assert (tmp_path / name / "f").read_text() == "original\n"
    rootfs = [p for p in Path(env["MICROVMC_STORE"]).iterdir() if p.name.endswith("-busybox-rootfs")]
    assert rootfs and not any((p / "pwned").exists() for p in rootfs)
    assert not leftovers(env)
