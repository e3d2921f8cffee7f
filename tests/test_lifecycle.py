"""Runs that outlive the command: `run -d`, `ps`, `logs`, `inspect`, `stop`, `kill`, `wait`, `rm`,
`exec`, `run --rm`, `-t`, all against real boots (TCG), checking what the guest printed and returned."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import private_runtime

pytestmark = pytest.mark.boot

MICROVMC = [sys.executable, "-m", "microvmc"]
TIMEOUT = 180

SLEEPER = """version = 1
hostname = "sleeper"

[process]
argv = ["/bin/sh", "-c", "printf 'out\\\\000\\\\377\\\\n'; echo err >&2; trap 'echo got TERM; exit 3' TERM; while true; do sleep 1; done"]
env = { GREETING = "hi" }
"""

SHELL = """version = 1
hostname = "shell"

[process]
argv = ["/bin/sh"]
"""


@pytest.fixture(scope="module")
def env(boot_env, tmp_path_factory):
    env = private_runtime(boot_env, tmp_path_factory)
    env["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("lifecycle-state"))
    yield env
    # A test that failed half-way leaves its detached runs: none outlives the tests.
    ids = mvmc(env, "ps", "-a", "-q", "--no-trunc").stdout.decode().split()
    if ids:
        mvmc(env, "rm", "-f", *ids)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("manifests")
    (d / "sleeper.toml").write_text(SLEEPER)
    (d / "shell.toml").write_text(SHELL)
    return d


def mvmc(env, *args: str, input: bytes = b"", timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*MICROVMC, *args], env=env, input=input, capture_output=True, timeout=timeout)


def runs_dir(env) -> Path:
    return Path(env["XDG_STATE_HOME"], "microvmc", "runs")


def leftovers(env) -> list[str]:
    """Processes of this session's store (QEMU, virtiofsd, monitors) still alive."""
    store = env["MICROVMC_STORE"]
    return subprocess.run(["pgrep", "-a", "-f", store], capture_output=True, text=True).stdout.splitlines()


def no_leftovers(env, limit: float = 10) -> None:
    deadline = time.monotonic() + limit
    while leftovers(env) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers(env)
    assert not list(runs_dir(env).glob("*/control.sock")) and not list(runs_dir(env).glob("*/vm"))


def test_a_detached_run_through_every_verb(env, manifests) -> None:
    r = mvmc(env, "run", "-d", "--name", "web", str(manifests / "sleeper.toml"))
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.decode().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", run_id)

    ps = mvmc(env, "ps")
    lines = ps.stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "NAME", "COMMAND", "CREATED", "STATUS", "MANIFEST"]
    row = next(line for line in lines if line.startswith(run_id[:12]))
    assert " web " in row and "Up " in row and str(manifests / "sleeper.toml") in row
    assert mvmc(env, "ps", "-q").stdout.decode().split() == [run_id[:12]]
    [doc] = json.loads(mvmc(env, "ps", "--json").stdout)
    assert (doc["id"], doc["name"], doc["state"]) == (run_id, "web", "running")

    # The name clashes; an unknown reference is a one-line error.
    clash = mvmc(env, "run", "-d", "--name", "web", str(manifests / "sleeper.toml"))
    assert clash.returncode == 2 and f"taken by run {run_id[:12]}" in clash.stderr.decode()
    missing = mvmc(env, "logs", "nosuch")
    assert (missing.returncode, missing.stderr.decode().count("\n")) == (1, 1)
    assert "no such run: 'nosuch'" in missing.stderr.decode()

    # Logs: binary-exact, stdout and stderr apart; by an ID prefix too.
    deadline = time.monotonic() + 30
    while b"err" not in mvmc(env, "logs", "web").stderr and time.monotonic() < deadline:
        time.sleep(0.2)
    logs = mvmc(env, "logs", run_id[:8])
    assert (logs.returncode, logs.stdout, logs.stderr) == (0, b"out\0\xff\n", b"err\n")
    assert mvmc(env, "logs", "--stderr", "web").stdout == b""

    # exec: own stdio and status, the program's environment plus -e, -w; stdin with -i.
    ex = mvmc(env, "exec", "-e", "EXTRA=x y", "-w", "/tmp", "web", "--", "/bin/sh", "-c",
              'echo "$GREETING $EXTRA $(pwd)"; echo to-err >&2; exit 7')
    assert (ex.returncode, ex.stdout, ex.stderr) == (7, b"hi x y /tmp\n", b"to-err\n")
    ex = mvmc(env, "exec", "-i", "web", "/bin/cat", input=b"piped\0in\n")
    assert (ex.returncode, ex.stdout) == (0, b"piped\0in\n")
    assert mvmc(env, "exec", "web", "/bin/sh", "-c", "kill -9 $$").returncode == 137
    # -u as docker exec takes it: a name from the run's /etc/passwd, a bare uid gets group 0.
    ex = mvmc(env, "exec", "-u", "nobody", "web", "/bin/sh", "-c", "id -u; id -g")
    assert (ex.returncode, ex.stdout) == (0, b"65534\n65534\n"), ex.stderr
    ex = mvmc(env, "exec", "-u", "1234:nogroup", "web", "/bin/sh", "-c", "id -u; id -g")
    assert (ex.returncode, ex.stdout) == (0, b"1234\n65534\n"), ex.stderr
    ex = mvmc(env, "exec", "-u", "nosuch", "web", "/bin/true")
    assert (ex.returncode, ex.stderr) == (2, b"microvmc: -u nosuch: user 'nosuch' is not in the image's /etc/passwd\n")
    notfound = mvmc(env, "exec", "web", "/no/such/program")
    assert notfound.returncode == 127 and b"/no/such/program" in notfound.stderr

    # rm refuses a running run; stop sends SIGTERM to the program, which ends in its own way.
    rm = mvmc(env, "rm", "web")
    assert rm.returncode == 1 and b"is running" in rm.stderr
    assert mvmc(env, "stop", "web").stdout == b"web\n"
    wait = mvmc(env, "wait", "web")
    assert (wait.returncode, wait.stdout) == (3, b"3\n")
    assert mvmc(env, "logs", "--stdout", "web").stdout == b"out\0\xff\ngot TERM\n"
    ps = mvmc(env, "ps", "-a").stdout.decode()
    assert re.search(rf"{run_id[:12]} .*Exited \(3\) .* ago", ps) and run_id[:12] not in mvmc(env, "ps").stdout.decode()
    doc = json.loads(mvmc(env, "inspect", "web").stdout)
    assert (doc["state"], doc["status"], doc["manifest"]) == ("exited", 3, str(manifests / "sleeper.toml"))
    assert doc["plan"]["name"] == "sleeper" and doc["pids"]["qemu"] > 0
    assert set(doc["timeline"]["guest_ms"]) >= {"init", "exec", "exit"}
    assert Path(doc["paths"]["console"]).is_file()
    late = mvmc(env, "exec", "web", "/bin/true")
    assert late.returncode == 1 and b"it is exited" in late.stderr
    assert mvmc(env, "kill", "web").returncode == 1
    assert mvmc(env, "rm", "web").stdout == b"web\n"
    assert mvmc(env, "logs", "web").returncode == 1
    no_leftovers(env)


def test_kill_sends_a_signal_and_rm_force_stops(env, manifests) -> None:
    run_id = mvmc(env, "run", "-d", str(manifests / "sleeper.toml")).stdout.decode().strip()
    assert mvmc(env, "kill", "-s", "nosuch", run_id).returncode == 2
    assert mvmc(env, "kill", "-s", "SIGHUP", run_id[:6]).returncode == 0
    assert mvmc(env, "wait", run_id).stdout == b"129\n"  # the shell died of SIGHUP (no trap for it)
    second = mvmc(env, "run", "-d", str(manifests / "sleeper.toml")).stdout.decode().strip()
    assert mvmc(env, "rm", "-f", second, run_id).returncode == 0
    assert mvmc(env, "ps", "-a", "-q").stdout == b""
    no_leftovers(env)


def test_run_rm_keeps_nothing(env, manifests, tmp_path) -> None:
    before = set(runs_dir(env).iterdir()) if runs_dir(env).is_dir() else set()
    hello = mvmc(env, "run", "--rm", str(manifests / "sleeper.toml"), "--", "/bin/echo", "gone")
    assert (hello.returncode, hello.stdout) == (0, b"gone\n")
    run_id = mvmc(env, "run", "-d", "--rm", str(manifests / "sleeper.toml"), "--", "/bin/sh", "-c", "sleep 1; exit 4")
    run_id = run_id.stdout.decode().strip()
    deadline = time.monotonic() + 60
    while (runs_dir(env) / run_id).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (runs_dir(env) / run_id).exists()
    assert set(runs_dir(env).iterdir()) - before <= {runs_dir(env) / ".lock"}
    logs = mvmc(env, "logs", run_id)
    assert logs.returncode == 1 and b"no such run" in logs.stderr
    no_leftovers(env)


def test_a_killed_monitor_takes_its_vm_along_and_ps_says_so(env, manifests) -> None:
    run_id = mvmc(env, "run", "-d", str(manifests / "sleeper.toml")).stdout.decode().strip()
    pids = json.loads(mvmc(env, "inspect", run_id).stdout)["pids"]
    os.kill(pids["monitor"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pids['qemu']}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pids['qemu']}")
    assert "Dead (monitor lost)" in mvmc(env, "ps", "-a").stdout.decode()
    assert json.loads(mvmc(env, "inspect", run_id).stdout)["state"] == "dead"
    assert mvmc(env, "exec", run_id, "/bin/true").returncode == 1
    assert mvmc(env, "rm", run_id).returncode == 0
    no_leftovers(env)


def test_four_detached_runs_at_once_while_ps_and_rm_race_them(env, manifests) -> None:
    starts = [subprocess.Popen([*MICROVMC, "run", "-d", "--name", f"four{n}", str(manifests / "sleeper.toml"), "--",
                                "/bin/sh", "-c", f"echo run {n}; exit {10 + n}"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE) for n in range(4)]
    seen = set()
    while any(p.poll() is None for p in starts):  # ps never sees a run half-written
        for doc in json.loads(mvmc(env, "ps", "-a", "--json").stdout):
            assert re.fullmatch(r"[0-9a-f]{64}", doc["id"]) and doc["name"].startswith("four")
            seen.add(doc["name"])
        assert mvmc(env, "rm", "four0").returncode in (0, 1)  # running: refused; ended: removed
    for n, p in enumerate(starts):
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
    for n in range(1, 4):
        assert mvmc(env, "wait", f"four{n}").stdout == f"{10 + n}\n".encode()
        assert mvmc(env, "logs", f"four{n}").stdout == f"run {n}\n".encode()
    rm = mvmc(env, "rm", "-f", "four0", "four1", "four2", "four3")  # four0 may be gone: the others still go
    assert rm.stdout.split()[-3:] == [b"four1", b"four2", b"four3"] and rm.returncode in (0, 1)
    assert mvmc(env, "ps", "-a", "-q").stdout == b""
    no_leftovers(env)


def test_logs_rotate_and_follow(env, manifests) -> None:
    """The manifest's [logs] sets the rotation (here; --log-max-size/--log-max-files override it)."""
    program = "i=0; while [ $i -lt 200 ]; do echo line-$i-..........................; i=$((i+1)); done; sleep 2; echo end"
    (manifests / "rotated.toml").write_text(SLEEPER + "\n[logs]\nmax_size = 1024\nmax_files = 3\n")
    run_id = mvmc(env, "run", "-d", str(manifests / "rotated.toml"), "--", "/bin/sh", "-c", program)
    run_id = run_id.stdout.decode().strip()
    follow = mvmc(env, "logs", "-f", run_id)  # returns once the run has ended
    assert follow.returncode == 0 and follow.stdout.endswith(b"end\n")
    files = sorted(p.name for p in (runs_dir(env) / run_id).glob("stdout.log*"))
    assert files == ["stdout.log", "stdout.log.1", "stdout.log.2"]
    assert all((runs_dir(env) / run_id / f).stat().st_size <= 1024 for f in files)
    kept = mvmc(env, "logs", run_id).stdout
    assert kept.endswith(b"line-199-..........................\nend\n") and b"line-0-" not in kept
    assert mvmc(env, "logs", "--tail", "2", run_id).stdout == b"line-199-..........................\nend\n"
    assert mvmc(env, "run", "-d", "--log-max-size", "lots", str(manifests / "sleeper.toml")).returncode == 2
    mvmc(env, "rm", run_id)
    no_leftovers(env)


# --- a terminal ----------------------------------------------------------------------------------


def _controlling_tty() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _read_until(master: int, pattern: bytes, limit: float = 90) -> bytes:
    got = b""
    deadline = time.monotonic() + limit
    while pattern not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"waited for {pattern!r}; got {got!r}"
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"the terminal closed before {pattern!r}; got {got!r}"
            got += chunk
    return got


def _terminal(rows: int, cols: int) -> tuple[int, int]:
    from microvmc.backends.terminal import set_size

    master, slave = os.openpty()
    set_size(slave, rows, cols)
    return master, slave


def test_run_t_gives_a_real_terminal(env, manifests) -> None:
    from microvmc.backends.terminal import set_size

    master, slave = _terminal(30, 100)
    before = termios.tcgetattr(slave)
    p = subprocess.Popen([*MICROVMC, "run", "-it", str(manifests / "shell.toml")], env=env, stdin=slave, stdout=slave,
                         stderr=slave, preexec_fn=_controlling_tty)
    try:
        os.write(master, b"stty size; tty; echo mark-$((6*7))\n")
        out = _read_until(master, b"mark-42")
        assert b"30 100" in out and b"/dev/pts/" in out
        set_size(slave, 40, 120)  # the kernel sends SIGWINCH to microvmc, the foreground group here
        time.sleep(0.5)
        os.write(master, b"stty size; echo mark-$((6*8))\n")
        assert b"40 120" in _read_until(master, b"mark-48")
        os.write(master, b"sleep 600; echo after-$((1+1))\n")
        time.sleep(2)
        os.write(master, b"\x03")  # Ctrl-C: the guest's foreground job, not the shell
        os.write(master, b"echo alive-$((2+3))\n")
        out = _read_until(master, b"alive-5")
        assert b"after-2" not in out or out.index(b"after-2") < out.index(b"alive-5")
        os.write(master, b"exit 5\n")
        assert p.wait(timeout=TIMEOUT) == 5
    finally:
        p.kill()
        p.wait()
    assert termios.tcgetattr(slave) == before  # raw mode undone
    os.close(master)
    os.close(slave)
    no_leftovers(env)


def test_exec_it_into_a_running_run(env, manifests) -> None:
    run_id = mvmc(env, "run", "-d", str(manifests / "sleeper.toml")).stdout.decode().strip()
    master, slave = _terminal(20, 70)
    before = termios.tcgetattr(slave)
    p = subprocess.Popen([*MICROVMC, "exec", "-it", run_id, "/bin/sh"], env=env, stdin=slave, stdout=slave,
                         stderr=slave, preexec_fn=_controlling_tty)
    try:
        os.write(master, b"stty size; tty; echo $GREETING-$((3*3))\n")
        out = _read_until(master, b"hi-9")
        assert b"20 70" in out and b"/dev/pts/" in out
        os.write(master, b"exit 4\n")
        assert p.wait(timeout=TIMEOUT) == 4
    finally:
        p.kill()
        p.wait()
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)
    # The run's own program was not disturbed.
    assert json.loads(mvmc(env, "inspect", run_id).stdout)["state"] == "running"
    mvmc(env, "rm", "-f", run_id)
    no_leftovers(env)


def test_a_foreground_run_is_listed_and_takes_exec(env, manifests) -> None:
    p = subprocess.Popen([*MICROVMC, "run", "--name", "fg", str(manifests / "sleeper.toml"), "--", "/bin/sh", "-c",
                          "echo started; read line; echo got $line"], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"started\n"
    assert "Up " in mvmc(env, "ps").stdout.decode()
    ex = mvmc(env, "exec", "fg", "/bin/echo", "beside")
    assert (ex.returncode, ex.stdout) == (0, b"beside\n")
    logs = mvmc(env, "logs", "fg")
    assert logs.returncode == 1 and b"foreground" in logs.stderr
    out, _ = p.communicate(b"input\n", timeout=TIMEOUT)
    assert (p.returncode, out) == (0, b"got input\n")
    assert json.loads(mvmc(env, "inspect", "fg").stdout)["status"] == 0
    mvmc(env, "rm", "fg")
    no_leftovers(env)


def test_killing_qemu_or_a_virtiofsd_of_a_detached_run_ends_it_truthfully(env, manifests) -> None:
    for victim, status in (("qemu", 123), ("virtiofsd", 122)):
        run_id = mvmc(env, "run", "-d", str(manifests / "sleeper.toml")).stdout.decode().strip()
        pids = json.loads(mvmc(env, "inspect", run_id).stdout)["pids"]
        if victim == "virtiofsd" and not pids["virtiofsd"]:
            continue  # the root went over 9p (an ordinary user): no daemon to kill
        pid = pids["qemu"] if victim == "qemu" else next(iter(pids["virtiofsd"].values()))
        os.kill(pid, signal.SIGKILL)
        wait = mvmc(env, "wait", run_id)
        assert wait.stdout == f"{status}\n".encode(), (victim, wait)
        assert re.search(rf"{run_id[:12]} .*Exited \({status}\)", mvmc(env, "ps", "-a").stdout.decode())
        mvmc(env, "rm", run_id)
    no_leftovers(env)


# --- attach --------------------------------------------------------------------------------------


def _logs_until(env, ref: str, needle: bytes, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while needle not in mvmc(env, "logs", ref).stdout:
        assert time.monotonic() < deadline, f"{needle!r} never reached the logs of {ref}"
        time.sleep(0.2)


def test_attach_gives_a_detached_run_its_input_and_takes_its_output(env, tmp_path) -> None:
    reader = tmp_path / "reader.toml"
    reader.write_text('version = 1\n[process]\nargv = ["/bin/sh", "-c", "echo before; wc -c; echo after >&2; exit 3"]\n')
    assert mvmc(env, "run", "-d", "-i", "--name", "reader", str(reader)).returncode == 0
    _logs_until(env, "reader", b"before\n")
    data = bytes(range(256)) * 400
    a = mvmc(env, "attach", "reader", input=data)  # its end of input is the program's
    assert (a.returncode, a.stdout, a.stderr) == (3, b"102400\n", b"after\n")
    logs = mvmc(env, "logs", "reader")  # the logs have it all, before and during the attach
    assert (logs.stdout, logs.stderr) == (b"before\n102400\n", b"after\n")
    ended = mvmc(env, "attach", "reader")
    assert (ended.returncode, ended.stderr.decode().count("\n")) == (1, 1)
    assert "cannot attach to run 'reader': it is exited" in ended.stderr.decode()
    mvmc(env, "rm", "reader")
    no_leftovers(env)


def test_attach_follows_output_and_passes_ctrl_c_on(env, tmp_path) -> None:
    ticker = tmp_path / "ticker.toml"
    ticker.write_text('version = 1\n[process]\nargv = ["/bin/sh", "-c", "trap \'echo got INT; exit 9\' INT; '
                      'i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.3; done"]\n')
    run_id = mvmc(env, "run", "-d", str(ticker)).stdout.decode().strip()
    p = subprocess.Popen([*MICROVMC, "attach", run_id[:10]], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = p.stdout.readline()
        assert re.fullmatch(rb"tick \d+\n", first), first
        second = p.stdout.readline()
        assert int(second.split()[1]) == int(first.split()[1]) + 1  # live, in order, nothing lost
        p.send_signal(signal.SIGINT)  # passed on to the program, as docker attach's --sig-proxy
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 9 and out.endswith(b"got INT\n"), (out, err)
    logs = mvmc(env, "logs", run_id).stdout
    assert logs.endswith(first + second + out)
    mvmc(env, "rm", run_id)
    no_leftovers(env)


def test_attach_to_a_detached_terminal_detach_and_attach_again(env, manifests) -> None:
    assert mvmc(env, "run", "-d", "-it", "--name", "tsh", str(manifests / "shell.toml")).returncode == 0

    def attach(rows: int, cols: int):
        master, slave = _terminal(rows, cols)
        p = subprocess.Popen([*MICROVMC, "attach", "tsh"], env=env, stdin=slave, stdout=slave, stderr=slave,
                             preexec_fn=_controlling_tty)
        return master, slave, p

    master, slave, p = attach(25, 90)
    before = termios.tcgetattr(slave)
    try:
        os.write(master, b"stty size; tty; echo mark-$((6*7))\n")
        out = _read_until(master, b"mark-42")
        assert b"25 90" in out and b"/dev/pts/" in out
        os.write(master, b"\x10\x11")  # Ctrl-P Ctrl-Q: detach, the shell goes on
        assert p.wait(timeout=TIMEOUT) == 0
        assert b"detached from run tsh" in _read_until(master, b"detached")
    finally:
        p.kill()
        p.wait()
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)
    assert json.loads(mvmc(env, "inspect", "tsh").stdout)["state"] == "running"

    master, slave, p = attach(30, 100)
    try:
        os.write(master, b"stty size; echo mark-$((6*8))\n")
        assert b"30 100" in _read_until(master, b"mark-48")
        os.write(master, b"exit 5\n")
        assert p.wait(timeout=TIMEOUT) == 5
    finally:
        p.kill()
        p.wait()
    os.close(master)
    os.close(slave)
    mvmc(env, "rm", "tsh")
    no_leftovers(env)
