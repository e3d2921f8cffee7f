"""microvmc-runtime driven by the real engines, unchanged: podman (--runtime), docker (a private
dockerd with --add-runtime) and containerd (`ctr run --runc-binary`), each container a microVM.
After every test nothing is left: no container, no state file, no process naming the state root.

Each test boots one VM per engine (~3-5 s under TCG, more on a loaded machine)."""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from oci_engines import BUSYBOX_IMAGE, ENGINES, Bind, container_argv, engine_param, leftovers, run_container

pytestmark = [pytest.mark.engine, pytest.mark.boot]

RT = "microvm"


@pytest.fixture(params=ENGINES)
def eut(request):
    eut = engine_param(request)
    yield eut
    _no_leftovers(eut)


def _no_leftovers(eut) -> None:
    # the engine's own clean-up (conmon's, the shim's delete) may finish just after the client returned
    deadline = time.monotonic() + 20
    while (found := leftovers(eut, RT)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert found == [], (found, eut.calls[RT].lines())


def _calls(eut) -> str:
    return "\n".join(" ".join(argv) for argv in eut.calls[RT].lines())


def test_plain_run_and_exit_status(eut) -> None:
    r = run_container(eut, RT, BUSYBOX_IMAGE, ["sh", "-c", "echo hello from $(uname -r); exit 7"])
    assert r.returncode == 7, (r.stdout, r.stderr, _calls(eut))
    out = r.stdout.decode()
    assert out.startswith("hello from "), (out, r.stderr)
    # the guest's kernel is not the host's: the program really ran in the VM
    assert out.split()[-1] != os.uname().release
    assert "create" in eut.calls[RT].verbs() and "start" in eut.calls[RT].verbs()


def test_stdin_reaches_the_program_and_its_end(eut) -> None:
    if eut.name == "containerd":
        # ctr never closes the container's stdin, with runc too: a program that ends by itself.
        r = run_container(eut, RT, BUSYBOX_IMAGE, ["head", "-c", "3"], input=b"abcdef", timeout=120)
        assert (r.returncode, r.stdout) == (0, b"abc"), (r.stderr, _calls(eut))
        return
    data = b"x" * 100_000 + b"\n"
    r = run_container(eut, RT, BUSYBOX_IMAGE, ["wc", "-c"], input=data, interactive=True)
    assert (r.returncode, r.stdout.strip()) == (0, str(len(data)).encode()), (r.stderr, _calls(eut))


def _in_pty(argv: list[str], env: dict[str, str], steps, *, size=(30, 100), timeout: float = 180) -> tuple[int, bytes]:
    """Run `argv` with a pty of `size` as its controlling terminal, as a person at a terminal would;
    `steps` are (bytes to wait for, what to do then with the master) in order. Its status and output."""
    import fcntl
    import termios

    from microvmc.backends.terminal import set_size

    master, slave = os.openpty()
    set_size(slave, *size)
    proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    pending = list(steps)
    try:
        while time.monotonic() < deadline:
            while pending and pending[0][0] in out:
                _, act = pending.pop(0)
                act(master)
                out += b"\x00"  # what was waited for is not waited for again
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every slave closed
                    break
                if not data:
                    break
                out += data
        status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return status, out.replace(b"\x00", b"")


def _type(text: bytes, pause: float = 1.0):
    def act(master: int) -> None:
        time.sleep(pause)  # the engine's resize, or the program's read, gets there first
        os.write(master, text)
    return act


def _resize(rows: int, cols: int):
    def act(master: int) -> None:
        from microvmc.backends.terminal import set_size

        set_size(master, rows, cols)
    return act


def test_terminal_size_and_resize(eut) -> None:
    script = "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; echo ready; read x; stty size; read y; stty size; exit 5"
    argv = [*eut.engine.client(), *container_argv(eut, RT, BUSYBOX_IMAGE, ["sh", "-c", script], interactive=True,
                                                  tty=True)]
    status, out = _in_pty(argv, eut.engine.env, [
        (b"ready", _type(b"\r")),
        (b"30 100", _resize(40, 120)),
        (b"30 100", _type(b"\r", pause=3.0)),
    ])
    text = out.decode(errors="replace")
    assert "is-a-tty" in text, (text, _calls(eut))
    lines = [line.strip() for line in text.splitlines()]
    assert "30 100" in lines and "40 120" in lines, (text, _calls(eut))
    assert lines.index("30 100") < lines.index("40 120")
    assert status == 5, (status, text)


def test_user_and_no_network(eut) -> None:
    if eut.name == "containerd":
        pytest.skip("ctr run has no --user")
    r = run_container(eut, RT, BUSYBOX_IMAGE, ["sh", "-c", "id; ulimit -n; ls /sys/class/net"], user="1000:1000",
                      network="none")
    assert r.returncode == 0, (r.stderr, _calls(eut))
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith("uid=1000(user) gid=1000(user)"), r.stdout
    assert lines[-1] == "lo", r.stdout  # the namespace has only lo: the VM has no network device
    if eut.name == "podman":  # its containers.conf's default_ulimits, through config.json's rlimits
        assert lines[1] == "20000", r.stdout


def test_what_a_vm_cannot_do_is_refused_through_the_engine(eut) -> None:
    """A host device cannot enter the VM: create fails before anything starts, and the engine shows
    the runtime's one line."""
    if eut.name == "containerd":
        pytest.skip("ctr run --device is not in containerd 1.6's ctr")
    r = eut.engine.run("run", "--rm", "--runtime", RT, "--device", "/dev/zero", BUSYBOX_IMAGE, "true", timeout=120)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert b"host devices cannot be passed into the VM" in r.stderr, (r.stderr, _calls(eut))


def test_bind_mounted_files_and_directories(eut, tmp_path: Path) -> None:
    ro_dir, rw_dir = tmp_path / "ro", tmp_path / "rw"
    ro_dir.mkdir()
    rw_dir.mkdir()
    (ro_dir / "a.txt").write_text("in a read-only directory\n")
    ro_file, rw_file = tmp_path / "ro.txt", tmp_path / "rw.txt"
    ro_file.write_text("a read-only file\n")
    rw_file.write_text("a writable file\n")
    rw_file.chmod(0o666)
    script = ("cat /ro/a.txt /etc/ro.txt /rw.txt; "
              "echo x 2>/dev/null > /ro/new || echo ro-dir-refused; "
              "echo x 2>/dev/null > /etc/ro.txt || echo ro-file-refused; "
              "echo written > /rw/new && echo changed > /rw.txt && echo ok")
    binds = [Bind(ro_dir, "/ro", read_only=True), Bind(rw_dir, "/rw"), Bind(ro_file, "/etc/ro.txt", read_only=True),
             Bind(rw_file, "/rw.txt")]
    r = run_container(eut, RT, BUSYBOX_IMAGE, ["sh", "-c", script], binds=binds)
    assert r.returncode == 0, (r.stdout, r.stderr, _calls(eut))
    assert r.stdout.decode().splitlines() == ["in a read-only directory", "a read-only file", "a writable file",
                                              "ro-dir-refused", "ro-file-refused", "ok"], r.stderr
    assert (rw_dir / "new").read_text() == "written\n"
    assert rw_file.read_text() == "changed\n"
    assert ro_file.read_text() == "a read-only file\n" and not (ro_dir / "new").exists()


def _exec(eut, name: str, argv: list[str], *, input: bytes | None = None, env=(), workdir=None, user=None,
          interactive: bool = False):
    if eut.name == "containerd":
        args = ["task", "exec", "--exec-id", f"e{time.monotonic_ns()}"]
        args += [f"--cwd={workdir}"] if workdir else []
        args += [f"--user={user}"] if user else []
        assert not env, "ctr task exec has no --env"
        return eut.engine.run(*args, name, *argv, input=input, timeout=120)
    args = ["exec"]
    args += ["--interactive"] if interactive else []
    args += [f"--env={e}" for e in env]
    args += [f"--workdir={workdir}"] if workdir else []
    args += [f"--user={user}"] if user else []
    return eut.engine.run(*args, name, *argv, input=input, timeout=120)


# The engine sizes the exec's pty after the process starts (docker resizes it from its client's
# SIGWINCH handling), so under load the first `stty size` can still read the pty's initial 24x80:
# wait up to 3 s for the client's size to arrive before printing it. A size that never arrives
# still fails the assertion below.
_WAIT_FOR_SIZE = ('i=0; while [ "$(stty size)" != "33 99" ] && [ $i -lt 30 ]; do '
                  'sleep 0.1 2>/dev/null || sleep 1; i=$((i+1)); done; ')


def test_exec_into_a_running_container_then_stop_and_rm(eut) -> None:
    name = f"x{time.monotonic_ns()}"
    r = run_container(eut, RT, BUSYBOX_IMAGE, ["sleep", "1000"], name=name, detach=True, rm=False)
    assert r.returncode == 0, (r.stderr, _calls(eut))
    try:
        r = _exec(eut, name, ["sh", "-c", "echo in $(uname -r); exit 3"])
        assert r.returncode == 3, (r.stdout, r.stderr, _calls(eut))
        assert r.stdout.startswith(b"in ") and r.stdout.split()[-1].decode() != os.uname().release
        if eut.name != "containerd":  # ctr task exec never closes stdin, nor takes --env
            r = _exec(eut, name, ["wc", "-c"], input=b"0123456789", interactive=True)
            assert (r.returncode, r.stdout.strip()) == (0, b"10"), r.stderr
            r = _exec(eut, name, ["sh", "-c", "echo $A $(pwd) $(id -u):$(id -g)"], env=["A=1"], workdir="/tmp",
                      user="1000:1000")
            assert (r.returncode, r.stdout) == (0, b"1 /tmp 1000:1000\n"), r.stderr
        else:
            r = _exec(eut, name, ["sh", "-c", "echo $(pwd) $(id -u)"], workdir="/tmp", user="1000")
            assert (r.returncode, r.stdout) == (0, b"/tmp 1000\n"), r.stderr
        # a terminal for the exec: a pty over the console socket, the size the client's
        tty_args = ["task", "exec", "--tty", "--exec-id", f"t{time.monotonic_ns()}"] if eut.name == "containerd" \
            else ["exec", "--interactive", "--tty"]
        status, out = _in_pty([*eut.engine.client(), *tty_args, name, "sh", "-c",
                               "[ -t 0 ] && [ -t 1 ] && echo exec-tty; " + _WAIT_FOR_SIZE + "stty size; exit 6"], eut.engine.env, [],
                              size=(33, 99), timeout=120)
        assert b"exec-tty" in out and b"33 99" in out, (out, _calls(eut))
        assert status == 6, (status, out)
        # the container's program is still the one that runs: the execs were processes of their own
        r = _exec(eut, name, ["sh", "-c", "ps | grep -c 'sleep 1000'"])
        assert r.stdout.strip() != b"0", r.stdout
    finally:
        _stop_and_rm(eut, name)
    assert "exec" in eut.calls[RT].verbs()


def _stop_and_rm(eut, name: str) -> None:
    if eut.name == "containerd":
        eut.engine.run("task", "kill", name, timeout=60, check=True)
        deadline = time.monotonic() + 60
        while b"RUNNING" in eut.engine.run("task", "ls").stdout and time.monotonic() < deadline:
            time.sleep(0.2)
        eut.engine.run("task", "rm", name, timeout=60, check=True)
        eut.engine.run("containers", "rm", name, timeout=60, check=True)
        return
    r = eut.engine.run("stop", "--time", "5", name, timeout=120, check=True)
    r = eut.engine.run("inspect", "--format", "{{.State.ExitCode}}", name, check=True)
    assert r.stdout.strip() == b"143", r.stdout  # sleep got the SIGTERM, in the VM
    eut.engine.run("rm", name, timeout=120, check=True)


def test_rm_force_of_a_running_container(eut) -> None:
    name = f"f{time.monotonic_ns()}"
    r = run_container(eut, RT, BUSYBOX_IMAGE, ["sleep", "1000"], name=name, detach=True, rm=False)
    assert r.returncode == 0, (r.stderr, _calls(eut))
    if eut.name == "containerd":
        eut.engine.run("task", "rm", "--force", name, timeout=120, check=True)
        eut.engine.run("containers", "rm", name, timeout=60, check=True)
    else:
        eut.engine.run("rm", "--force", name, timeout=120, check=True)


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_the_seed_pipeline(request, engine: str) -> None:
    """echo hello | ENGINE run -i --rm IMG cat | ENGINE run -i --rm --runtime RT IMG head -n 7"""
    eut = engine_param(request, engine)
    client = eut.engine.client()[0]
    line = (f"echo hello | {client} run -i --rm {BUSYBOX_IMAGE} cat | "
            f"{client} run -i --rm --runtime {RT} {BUSYBOX_IMAGE} head -n 7")
    r = subprocess.run(["sh", "-c", line], env=eut.engine.env, capture_output=True, timeout=300)
    assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
    _no_leftovers(eut)


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_a_debian_userland(request, engine: str) -> None:
    """A real distribution's image (Debian 12 minbase with python3, made offline with mmdebstrap and
    imported): its dynamic binaries, its users, its python run in the VM."""
    import imagekit

    from oci_engines import DEBIAN_IMAGE

    eut = engine_param(request, engine)
    if eut.engine.run("image", "inspect", DEBIAN_IMAGE).returncode != 0:
        eut.engine.run("import", str(imagekit.debian_tar()), DEBIAN_IMAGE, timeout=600, check=True)
    r = run_container(eut, RT, DEBIAN_IMAGE, ["sh", "-c", "cat /etc/debian_version; python3 -c 'print(6 * 7)'; "
                                              "id -un; ls -ld /usr/bin/passwd | cut -c1-10"])
    assert r.returncode == 0, (r.stdout, r.stderr, _calls(eut))
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith("12.") and lines[1:] == ["42", "root", "-rwsr-xr-x"], r.stdout
    _no_leftovers(eut)
