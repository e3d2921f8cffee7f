"""microvmc-runtime's verbs on a bundle, driven as an engine drives them but without one: a driver
that is a child subreaper (as conmon and containerd's shim are) runs create/start/state/exec/kill/
delete and waits on the pid the pid file names. Boots real VMs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oci_engines import busybox_rootfs, microvmc_runtime, mounts_below

pytestmark = pytest.mark.boot

# The engine's side: a subreaper, so that the monitor (a daemon, double-forked) is its child to wait on.
DRIVER = r"""
import ctypes, json, os, subprocess, sys, time
runtime, root, bundle, steps = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
out = []
def call(*argv, stdin=subprocess.DEVNULL, **kw):
    r = subprocess.run([*runtime.split("\0"), "--root", root, *argv], stdin=stdin, capture_output=True, **kw)
    return {"argv": list(argv), "rc": r.returncode, "out": r.stdout.decode(errors="replace"),
            "err": r.stderr.decode(errors="replace")}
for step in steps:
    verb = step[0]
    if verb == "create":
        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()  # the program's stderr too: create's own is the container's
        os.write(w_in, step[2].encode())
        os.close(w_in)
        proc = subprocess.run([*runtime.split("\0"), "--root", root, "create", "--bundle", bundle, "--pid-file",
                               root + ".pid", step[1]], stdin=r_in, stdout=w_out, stderr=w_err)
        os.close(r_in); os.close(w_out); os.close(w_err)
        os.set_blocking(r_out, False)
        os.set_blocking(r_err, False)
        pid = int(open(root + ".pid").read()) if proc.returncode == 0 else None
        try:
            err = os.read(r_err, 65536).decode()
        except BlockingIOError:
            err = ""
        out.append({"argv": ["create", step[1]], "rc": proc.returncode, "err": err, "pid": pid})
    elif verb == "read":  # what the program wrote so far
        time.sleep(step[1])
        try:
            data = os.read(r_out, 65536)
        except BlockingIOError:
            data = b""
        out.append({"argv": ["read"], "out": data.decode()})
    elif verb == "wait":  # the monitor's status, as conmon gets it
        _, status = os.waitpid(pid, 0)
        os.set_blocking(r_out, True)
        rest = b""
        while chunk := os.read(r_out, 65536):
            rest += chunk
        out.append({"argv": ["wait"], "status": os.waitstatus_to_exitcode(status), "out": rest.decode()})
    elif verb == "kill-create":  # a create killed half-way (after its run exists)
        proc = subprocess.Popen([*runtime.split("\0"), "--root", root, "create", "--bundle", bundle, step[1]],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not os.path.exists(os.path.join(root, step[1], "record.json")):
            time.sleep(0.01)
        time.sleep(step[2])
        proc.kill()
        proc.wait()
        out.append({"argv": ["kill-create"], "rc": proc.returncode})
    else:
        out.append(call(*step))
# reap what was adopted (a monitor killed by delete --force)
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
print(json.dumps(out))
"""


def drive(boot_env, root: Path, bundle: Path, steps: list) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", DRIVER, "\0".join(microvmc_runtime()), str(root), str(bundle),
                        json.dumps(steps)], env=boot_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def bundle_with(tmp_path: Path, args: list[str], **process) -> Path:
    bundle = tmp_path / "bundle"
    busybox_rootfs(bundle / "rootfs")
    config = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "hostname": "rt",
              "process": {"args": args, "env": ["PATH=/bin", "FROM_CONFIG=1"], "cwd": "/", **process},
              "annotations": {"org.example": "yes"}}
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def no_processes(root: Path) -> list[str]:
    return subprocess.run(["pgrep", "-a", "-f", str(root)], capture_output=True, text=True).stdout.splitlines()


def test_create_holds_then_start_exec_kill_delete(boot_env, tmp_path: Path) -> None:
    bundle = bundle_with(tmp_path, ["/bin/sh", "-c", "echo started; read line; echo got $line; "
                                    "trap 'echo term; exit 7' TERM; while :; do sleep 0.1; done"])
    root = tmp_path / "state"
    process = {"args": ["/bin/sh", "-c", "echo exec [$FROM_CONFIG] $E $(pwd) $(id -u):$(id -g); exit 3"],
               "env": ["PATH=/bin", "E=x"], "cwd": "/tmp", "user": {"uid": 1000, "gid": 1000}}
    (tmp_path / "process.json").write_text(json.dumps(process))
    steps = [["create", "c1", "line-from-stdin\n"], ["state", "c1"], ["read", 1.0], ["start", "c1"],
             ["state", "c1"], ["read", 2.0],
             ["exec", "--process", str(tmp_path / "process.json"), "c1"],
             ["exec", "-e", "E=inline", "--cwd", "/root", "c1", "sh", "-c", "echo inline $FROM_CONFIG $E $(pwd)"],
             ["ps", "--format", "json", "c1"], ["start", "c1"], ["delete", "c1"],
             ["kill", "c1", "TERM"], ["wait"], ["state", "c1"], ["kill", "c1", "KILL"], ["delete", "c1"],
             ["state", "c1"]]
    created, state1, before, start, state2, after, execp, inline, ps, start2, delete1, kill, wait, state3, kill2, \
        delete2, state4 = drive(boot_env, root, bundle, steps)
    assert created["rc"] == 0 and created["pid"], created
    doc = json.loads(state1["out"])
    assert (doc["status"], doc["pid"], doc["id"], doc["bundle"], doc["annotations"]) == \
        ("created", created["pid"], "c1", str(bundle), {"org.example": "yes"})
    assert before["out"] == ""  # the VM is up, the program held
    assert start["rc"] == 0, start
    assert json.loads(state2["out"])["status"] == "running"
    assert after["out"] == "started\ngot line-from-stdin\n"  # stdin sent before start was kept
    assert (execp["rc"], execp["out"]) == (3, "exec [] x /tmp 1000:1000\n"), execp  # the file's env only
    assert (inline["rc"], inline["out"]) == (0, "inline 1 inline /root\n"), inline  # config's env, and -e
    assert json.loads(ps["out"]) == [created["pid"]]
    assert (start2["rc"], start2["err"]) == (1, "cannot start an already running container\n")
    assert (delete1["rc"], delete1["err"]) == (1, "cannot delete container c1 that is not stopped: running\n")
    assert kill["rc"] == 0, kill
    assert (wait["status"], wait["out"]) == (7, "term\n")  # the pid file's process exits with the program's status
    doc = json.loads(state3["out"])
    assert (doc["status"], doc["pid"]) == ("stopped", 0)
    assert (kill2["rc"], kill2["err"]) == (1, "container not running\n")
    assert delete2["rc"] == 0, delete2
    assert state4["err"] == "container does not exist\n"
    assert list(root.iterdir()) == [] and no_processes(root) == []


def test_delete_force_of_running_and_of_killed_create(boot_env, tmp_path: Path) -> None:
    bundle = bundle_with(tmp_path, ["/bin/sleep", "1000"])
    host = tmp_path / "hosts"
    host.write_text("127.0.0.1 localhost\n")
    config = json.loads((bundle / "config.json").read_text())
    config["mounts"] = [{"destination": "/etc/hosts", "type": "bind", "source": str(host), "options": ["rbind", "ro"]}]
    (bundle / "config.json").write_text(json.dumps(config))
    root = tmp_path / "state"
    steps = [["create", "c1", ""], ["start", "c1"], ["exec", "c1", "cat", "/etc/hosts"], ["delete", "--force", "c1"],
             ["state", "c1"], ["kill-create", "c2", 0.3], ["delete", "c2"], ["state", "c2"],
             ["delete", "--force", "c2"]]
    created, start, cat, delete, state, killed, delete2, state2, delete3 = drive(boot_env, root, bundle, steps)
    assert created["rc"] == 0 and start["rc"] == 0, (created, start)
    assert cat["out"] == "127.0.0.1 localhost\n", cat  # a single-file bind mount
    assert delete["rc"] == 0, delete
    assert state["err"] == "container does not exist\n"
    assert killed["rc"] == -9
    assert delete2["rc"] == 0, delete2  # whatever the killed create had got to
    assert state2["rc"] == 1 and delete3["rc"] == 0
    time.sleep(0.5)
    assert list(root.iterdir()) == [] and no_processes(root) == [] and mounts_below(tmp_path) == []
    assert host.read_text() == "127.0.0.1 localhost\n"


def test_run_is_create_start_wait_delete(boot_env, tmp_path: Path) -> None:
    bundle = bundle_with(tmp_path, ["/bin/sh", "-c", "echo run $(hostname); exit 4"])
    root = tmp_path / "state"
    run, state = drive(boot_env, root, bundle, [["run", "--bundle", str(bundle), "c3"], ["state", "c3"]])
    assert (run["rc"], run["out"]) == (4, "run rt\n"), run
    assert state["err"] == "container does not exist\n"
    assert list(root.iterdir()) == [] and no_processes(root) == []


def test_terminal_over_the_console_socket(boot_env, tmp_path: Path) -> None:
    """process.terminal: the pty's master comes over --console-socket; the guest's pty has
    consoleSize, follows a resize of the master, and closing the master hangs the run up (129)."""
    import socket

    from microvmc.backends.terminal import set_size

    bundle = bundle_with(tmp_path, ["/bin/sh", "-c", "stty size; read x; stty size; while :; do sleep 0.2; done"],
                         terminal=True, consoleSize={"height": 30, "width": 100})
    root, path = tmp_path / "state", tmp_path / "console.sock"
    runtime = [*microvmc_runtime(), "--root", str(root)]
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        create = subprocess.Popen([*runtime, "create", "--bundle", str(bundle), "--console-socket", str(path), "t1"],
                                  env=boot_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        conn, _ = server.accept()
        with conn:
            name, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        assert create.wait(timeout=300) == 0
    master = fds[0]
    assert name.startswith(b"/dev/pts/")

    def read_until(text: bytes) -> bytes:
        out, deadline = b"", time.monotonic() + 60
        while text not in out and time.monotonic() < deadline:
            out += os.read(master, 4096)
        return out

    try:
        assert subprocess.run([*runtime, "start", "t1"], env=boot_env).returncode == 0
        assert b"30 100" in read_until(b"30 100")
        set_size(master, 40, 120)
        time.sleep(1)
        os.write(master, b"\r")
        assert b"40 120" in read_until(b"40 120")
    finally:
        os.close(master)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = json.loads(subprocess.run([*runtime, "state", "t1"], env=boot_env, capture_output=True).stdout)
        if state["status"] == "stopped":
            break
        time.sleep(0.2)
    assert state["status"] == "stopped"
    assert json.loads((root / "t1" / "record.json").read_text())["status"] == 129  # SIGHUP
    assert subprocess.run([*runtime, "delete", "t1"], env=boot_env).returncode == 0
    assert list(root.iterdir()) == [] and no_processes(root) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace of the runtime's own needs root")
def test_hooks_around_a_run_in_a_network_namespace_of_the_runtimes_own(boot_env, tmp_path: Path) -> None:
    """config.json asks for a network namespace without a path (docker, ctr): the runtime makes it;
    prestart and createRuntime hooks see a process in it, poststart the container's pid (the monitor,
    in the same namespace), poststop the stopped state; a failing poststart hook is only a warning;
    with nothing put there but lo, the VM has no network device."""
    from test_runtime import WRITER

    # it outlives the poststart hooks, which read its monitor's namespace
    bundle = bundle_with(tmp_path, ["/bin/sh", "-c", "sleep 5; ls /sys/class/net"])
    config = json.loads((bundle / "config.json").read_text())
    config["linux"] = {"namespaces": [{"type": "network"}, {"type": "mount"}]}
    kinds = ("prestart", "createRuntime", "poststart", "poststop")
    config["hooks"] = {kind: [{"path": sys.executable, "args": ["writer", "-c", WRITER, f"{tmp_path}/{kind}.json"]}]
                       for kind in kinds}
    config["hooks"]["poststart"].insert(0, {"path": "/bin/false"})
    (bundle / "config.json").write_text(json.dumps(config))
    root = tmp_path / "state"
    created, state, start, wait, delete = drive(boot_env, root, bundle, [
        ["create", "c1", ""], ["state", "c1"], ["start", "c1"], ["wait"], ["delete", "c1"]])
    assert created["rc"] == 0 and start["rc"] == 0 and delete["rc"] == 0, (created, start, delete)
    assert json.loads(state["out"])["pid"] == created["pid"]
    seen = {kind: json.loads((tmp_path / f"{kind}.json").read_text()) for kind in kinds}
    assert [seen[k]["state"]["status"] for k in kinds] == ["creating", "creating", "running", "stopped"]
    assert seen["poststart"]["state"]["pid"] == created["pid"] and "pid" not in seen["poststop"]["state"]
    namespace = seen["prestart"]["netns"]
    assert namespace != os.readlink("/proc/self/ns/net")
    assert seen["createRuntime"]["netns"] == seen["poststart"]["netns"] == namespace
    assert {seen[k]["state"]["bundle"] for k in kinds} == {str(bundle)}
    assert (wait["status"], wait["out"]) == (0, "lo\n")
    assert list(root.iterdir()) == [] and no_processes(root) == [] and mounts_below(tmp_path) == []
