"""microvmc-runtime without a VM: runc's command line, signals, the state and features documents,
errors as runc reports them (one line on stderr, a json entry in --log), and the verbs on
containers that do not exist or whose create was interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microvmc.runtime.cli import main, parser
from microvmc.runtime.state import RuntimeFailure, features_document, log_line, parse_signal, state_document


@pytest.mark.parametrize("text, number", [("9", 9), ("KILL", 9), ("SIGKILL", 9), ("kill", 9), ("TERM", 15),
                                          ("SIGTERM", 15), ("15", 15), ("HUP", 1), ("SIGUSR1", 10), ("64", 64)])
def test_signals_as_numbers_and_names(text: str, number: int) -> None:
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["0", "65", "NOPE", "SIG", "", "-9"])
def test_bad_signals(text: str) -> None:
    with pytest.raises(RuntimeFailure) as err:
        parse_signal(text)
    assert str(err.value) == f"unknown signal {text!r}: a name like KILL or SIGTERM, or a number 1-64"


def test_runc_command_lines_parse() -> None:
    p = parser()
    # docker's shim: globals first, then the verb and its options, the id last
    a = p.parse_args(["--root", "/r", "--log", "/b/log.json", "--log-format", "json", "create", "--bundle", "/b",
                      "--pid-file", "/b/init.pid", "--console-socket", "/s", "id1"])
    assert (a.root, a.log, a.log_format, a.command, a.bundle, a.pid_file, a.console_socket, a.id) == \
        ("/r", "/b/log.json", "json", "create", "/b", "/b/init.pid", "/s", "id1")
    a = p.parse_args(["--systemd-cgroup", "--debug", "create", "--bundle=/b", "--no-pivot", "--no-new-keyring",
                      "--preserve-fds", "2", "id1"])
    assert (a.systemd_cgroup, a.debug, a.bundle, a.preserve_fds) == (True, True, "/b", 2)
    assert p.parse_args(["kill", "id1", "15"]).signal == "15"
    assert p.parse_args(["kill", "--all", "id1", "KILL"]).all
    assert p.parse_args(["kill", "id1"]).signal == "SIGTERM"
    assert p.parse_args(["delete", "--force", "id1"]).force
    a = p.parse_args(["exec", "--pid-file", "/p", "--process", "/f.json", "--detach", "id1"])
    assert (a.pid_file, a.process, a.detach, a.args) == ("/p", "/f.json", True, [])
    # inline exec: what follows the id is the program's, options included
    a = p.parse_args(["exec", "-t", "-e", "A=1", "--cwd", "/tmp", "-u", "1000:1000", "id1", "sh", "-c", "echo -n x"])
    assert (a.tty, a.env, a.cwd, a.user, a.args) == (True, ["A=1"], "/tmp", "1000:1000", ["sh", "-c", "echo -n x"])
    assert p.parse_args(["ps", "--format", "json", "id1"]).format == "json"


def test_usage_errors_are_one_line_and_status_1(capsys) -> None:
    assert main(["frobnicate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("microvmc-runtime: argument COMMAND: invalid choice: 'frobnicate'")


def test_errors_go_to_the_log_as_runc_writes_them(tmp_path: Path, capsys) -> None:
    log = tmp_path / "log.json"
    assert main(["--root", str(tmp_path / "root"), "--log", str(log), "--log-format", "json", "kill", "nope", "9"]) == 1
    assert capsys.readouterr().err == "container does not exist\n"
    entry = json.loads(log.read_text())
    assert (entry["level"], entry["msg"]) == ("error", "container does not exist")
    assert entry["time"].endswith("Z") and log.read_text().startswith('{"level":"error","msg":')
    assert main(["--root", str(tmp_path / "root"), "--log", str(tmp_path / "t.log"), "state", "nope"]) == 1
    text = (tmp_path / "t.log").read_text()
    assert text.startswith('time="') and text.endswith(' level=error msg="container does not exist"\n')


def test_log_line_formats() -> None:
    assert log_line("error", 'a "b"', time="T", format="json") == '{"level":"error","msg":"a \\"b\\"","time":"T"}\n'
    assert log_line("warning", "x", time="T", format="text") == 'time="T" level=warning msg="x"\n'


@pytest.mark.parametrize("verb", ["pause", "resume"])
def test_pause_and_resume_are_refused(verb: str, tmp_path: Path, capsys) -> None:
    assert main(["--root", str(tmp_path), verb, "c"]) == 1
    assert capsys.readouterr().err == (f"{verb} is not supported by microvmc-runtime: a microVM's program cannot "
                                       "be frozen yet\n")


def test_features(capsys) -> None:
    assert main(["features"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == features_document()
    assert doc["ociVersionMin"] == "1.0.0" and "bind" in doc["mountOptions"]


def test_state_document() -> None:
    record = {"created": "x", "oci": {"ociVersion": "1.0.2-dev", "bundle": "/b", "rootfs": "/b/rootfs",
                                      "created": "2026-12-03T16:00:00.000000001Z", "annotations": {"a": "b"}}}
    assert state_document("c1", record, {"state": "running", "pid": 42}) == {
        "ociVersion": "1.0.2-dev", "id": "c1", "pid": 42, "status": "running", "bundle": "/b",
        "rootfs": "/b/rootfs", "created": "2026-12-03T16:00:00.000000001Z", "owner": "", "annotations": {"a": "b"}}
    # stopped: pid 0, as runc; a monitor not up yet: creating
    assert state_document("c1", record, {"state": "stopped", "pid": 42})["pid"] == 0
    assert state_document("c1", record, {"state": "created", "pid": None})["status"] == "creating"
    assert "annotations" not in state_document("c1", {"oci": {}}, {"state": "stopped"})


def test_verbs_on_a_missing_container(tmp_path: Path, capsys) -> None:
    root = ["--root", str(tmp_path / "root")]
    for argv in (["start", "c"], ["state", "c"], ["kill", "c", "KILL"], ["delete", "c"], ["ps", "c"],
                 ["exec", "c", "true"]):
        assert main([*root, *argv]) == 1, argv
        assert capsys.readouterr().err == "container does not exist\n", argv
    assert main([*root, "delete", "--force", "c"]) == 0  # as runc: --force of nothing is done
    assert main([*root, "state", "../etc"]) == 1


def test_delete_cleans_what_an_interrupted_create_left(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / ".new-c" / "files").mkdir(parents=True)
    (root / "c" / "files").mkdir(parents=True)
    (root / "c" / "lock").write_text("")  # no record: create died before the run was complete
    assert main(["--root", str(root), "delete", "--force", "c"]) == 0
    assert list(root.iterdir()) == []


def test_create_refuses_before_starting_anything(tmp_path: Path, capsys) -> None:
    root = tmp_path / "root"
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    assert main(["--root", str(root), "create", "--bundle", str(bundle), "c"]) == 1
    assert capsys.readouterr().err == f"{bundle}/config.json: no such file: the bundle has no config.json\n"
    config = {"ociVersion": "1.0.2", "process": {"args": ["sh"], "terminal": True}, "root": {"path": "rootfs"}}
    (bundle / "config.json").write_text(json.dumps(config))
    assert main(["--root", str(root), "create", "--bundle", str(bundle), "c"]) == 1
    assert capsys.readouterr().err == "cannot allocate tty if runc will detach without setting console socket\n"
    config["process"]["terminal"] = False
    config["linux"] = {"devices": [{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}]}
    (bundle / "config.json").write_text(json.dumps(config))
    assert main(["--root", str(root), "create", "--bundle", str(bundle), "c"]) == 1
    assert capsys.readouterr().err == ('config.json: linux.devices: ["/dev/kvm"]: host devices cannot be passed '
                                       "into the VM\n")
    assert main(["--root", str(root), "create", "--bundle", str(bundle), "bad/id"]) == 1
    assert capsys.readouterr().err == "invalid container id format: bad/id\n"
    assert not root.exists() or list(root.iterdir()) == []


def test_console_script_and_module() -> None:
    script = Path(sys.executable).with_name("microvmc-runtime")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "microvmc.runtime"]
    r = subprocess.run([*argv, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("microvmc-runtime ")
    r = subprocess.run([sys.executable, "-m", "microvmc.runtime", "state"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (1, "") and r.stderr.count("\n") == 1


# A hook that writes what it was given: the state on stdin, its argv[0], environment, directory, and
# the network namespace of the state's pid.
WRITER = ("import json, os, sys; s = json.load(sys.stdin); json.dump({'state': s, "
          "'argv0': open('/proc/self/cmdline').read().split(chr(0))[0], 'env': sorted(os.environ), "
          "'cwd': os.getcwd(), 'netns': os.readlink('/proc/%d/ns/net' % s['pid']) if 'pid' in s else ''}, "
          "open(sys.argv[1], 'w'))")


def _hooked_bundle(tmp_path: Path, hooks: dict) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    config = {"ociVersion": "1.0.2", "process": {"args": ["true"]}, "root": {"path": "rootfs"},
              "linux": {"namespaces": [{"type": "network"}]}, "annotations": {"org.example": "yes"}, "hooks": hooks}
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def _nothing_left(root: Path, below: Path) -> None:
    from oci_engines import mounts_below

    assert not root.exists() or list(root.iterdir()) == []
    assert mounts_below(below) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace of the runtime's own needs root")
def test_create_runs_the_hooks_with_the_state_and_a_failing_one_fails_it(tmp_path: Path, capsys) -> None:
    """prestart hooks in order, on the host, the state on stdin, its pid a process in the new network
    namespace; the second fails: create fails with runc's line and leaves nothing (no state, no
    namespace mount, no process)."""
    seen = tmp_path / "seen.json"
    bundle = _hooked_bundle(tmp_path, {
        "prestart": [{"path": sys.executable, "args": ["writer", "-c", WRITER, str(seen)], "env": ["HOOK_ENV=given"]},
                     {"path": "/bin/sh", "args": ["sh", "-c", "echo to-out; printf 'two\\nlines' >&2; exit 3"]}],
        "createRuntime": [{"path": "/bin/false"}]})
    root = tmp_path / "root"
    assert main(["--root", str(root), "create", "--bundle", str(bundle), "c"]) == 1
    assert capsys.readouterr().err == ("error running prestart hook #1: error running hook: exit status 3, stdout: "
                                       "to-out, stderr: two lines\n")
    got = json.loads(seen.read_text())
    pid = got["state"]["pid"]
    assert got["state"] == {"ociVersion": "1.0.2", "id": "c", "status": "creating", "pid": pid, "bundle": str(bundle),
                            "annotations": {"org.example": "yes"}}
    assert got["argv0"] == "writer" and "HOOK_ENV" in got["env"] and "PATH" not in got["env"]
    assert got["cwd"] == str(bundle)
    assert got["netns"] != os.readlink("/proc/self/ns/net")  # the container's own namespace, not the host's
    assert not os.path.exists(f"/proc/{pid}")  # the process that held it for the hooks has gone
    _nothing_left(root, tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace of the runtime's own needs root")
@pytest.mark.parametrize(("hooks", "message"), [
    ({"createRuntime": [{"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}]},
     "error running createRuntime hook #0: hook ran past specified timeout of 1.0s"),
    ({"prestart": [{"path": "/nonexistent/hook"}]},
     "error running prestart hook #0: fork/exec /nonexistent/hook: no such file or directory"),
    ({"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "kill -9 $$"]}]},
     "error running prestart hook #0: error running hook: signal: killed, stdout: , stderr: "),
    ({"prestart": [{"path": "relative"}]}, 'config.json: hooks.prestart[0].path: "relative" is not an absolute path'),
])
def test_a_failing_hook_fails_create(tmp_path: Path, capsys, hooks: dict, message: str) -> None:
    import time

    root = tmp_path / "root"
    began = time.monotonic()
    assert main(["--root", str(root), "create", "--bundle", str(_hooked_bundle(tmp_path, hooks)), "c"]) == 1
    assert capsys.readouterr().err == message + "\n"
    assert time.monotonic() - began < 15
    _nothing_left(root, tmp_path)
