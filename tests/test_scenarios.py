"""The same fake-QEMU scenarios against both runners of a plan: the backend (`microvmc run`) and the
generated `launch.sh`. Each scenario's status is the same from both, except where the README
("launch.sh and the backend") says launch.sh cannot tell: 119 (output that could not be
written: its relays do not tell that from a reader that went away) and 122 (a virtiofsd that
died: it does not watch its daemons)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from microvmc.backends.monitor import run_plan
from microvmc.compiler.emit import launch_script
from microvmc.errors import ExitStatus
from test_backend_qemu import make_plan, sh_qemu

SCENARIOS = {
    # name: (fake QEMU's body, stdin, status, stdout, plan options)
    "program exits 7, streams apart": (
        "printf 'started\\n' >&4; cat; echo to-stderr >&3; printf 'exit 7\\n' >&4",
        b"\x00in\xff\n", 7, b"\x00in\xff\n", {}),
    "program killed by a signal": ("printf 'started\\nsignal 9\\n' >&4", b"", 137, b"", {}),
    "QEMU's own exit status does not matter after a report": ("printf 'started\\nexit 0\\n' >&4; exit 1", b"", 0, b"", {}),
    "QEMU fails": ("echo 'qemu: -device foo: no such device' >&2; exit 1", b"", int(ExitStatus.HOST), b"", {}),
    "VM stops without a report": ("exit 0", b"", int(ExitStatus.GUEST_CRASHED), b"", {}),
    "init fails at mount": ("printf 'error mount 19 no such device\\n' >&4", b"", int(ExitStatus.INIT_FAILED), b"", {}),
    "program not found": ("printf 'error exec 2 /x: not found\\n' >&4", b"", int(ExitStatus.NOT_FOUND), b"", {}),
    "program not executable": ("printf 'error exec 13 /x: denied\\n' >&4", b"", int(ExitStatus.NOT_EXECUTABLE), b"",
                               {}),
    # init ends the VM only once told that every byte it `sent` was read: the host must not end the run
    # at the report, and must say `drained` (here the output comes after the report, as from QEMU's queue)
    "output after the report, until `drained`": (
        "printf 'started\\nsent stdout 5\\nexit 0\\n' >&4; sleep 0.5; printf hello; read -r ack <&6; printf \" $ack\"",
        b"", 0, b"hello drained stdout", {}),
    "boot timeout": ("sleep 30", b"", int(ExitStatus.TIMEOUT), b"", {"boot_timeout": 1}),
    "run timeout": ("printf 'started\\n' >&4; sleep 30", b"", int(ExitStatus.TIMEOUT), b"",
                    {"boot_timeout": 10, "timeout": 1}),
}


def _by_backend(tmp_path: Path, plan, stdin: bytes) -> tuple[int, bytes]:
    (tmp_path / "in").write_bytes(stdin)
    logs = tmp_path / "logs"
    logs.mkdir()
    with open(tmp_path / "in", "rb") as i, open(tmp_path / "out", "wb") as o, open(tmp_path / "err", "wb") as e:
        status = run_plan(plan, log_dir=logs, stdin=i.fileno(), stdout=o.fileno(), stderr=e.fileno())
    return status, (tmp_path / "out").read_bytes()


def _by_script(tmp_path: Path, plan, stdin: bytes) -> tuple[int, bytes]:
    script = tmp_path / "launch.sh"
    script.write_text(launch_script(plan))
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    done = subprocess.run(["sh", str(script)], input=stdin, capture_output=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(runtime)})
    assert list(runtime.iterdir()) == []  # it cleaned up after itself
    return done.returncode, done.stdout


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_backend_and_launch_sh_agree(tmp_path, name, monkeypatch) -> None:
    body, stdin, status, stdout, options = SCENARIOS[name]
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    plan = make_plan([sh_qemu(tmp_path, body)], **options)
    (tmp_path / "b").mkdir()
    (tmp_path / "s").mkdir()
    assert _by_backend(tmp_path / "b", plan, stdin) == (status, stdout)
    assert _by_script(tmp_path / "s", plan, stdin) == (status, stdout)


def test_output_that_cannot_be_written_only_the_backend_tells(tmp_path, monkeypatch) -> None:
    """119 is the backend's: launch.sh's relays do not tell a full disk from a reader
    that went away, so the program's own status stands (documented in the README)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    plan = make_plan([sh_qemu(tmp_path, "printf 'started\\n' >&4; echo output; printf 'exit 0\\n' >&4")])
    logs = tmp_path / "logs"
    logs.mkdir()
    with open("/dev/full", "wb") as full, open("/dev/null", "rb") as null:
        assert run_plan(plan, log_dir=logs, stdin=null.fileno(), stdout=full.fileno(), stderr=2) == 119
    script = tmp_path / "launch.sh"
    script.write_text(launch_script(plan))
    with open("/dev/full", "wb") as full:
        done = subprocess.run(["sh", str(script)], stdin=subprocess.DEVNULL, stdout=full, stderr=subprocess.PIPE,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(tmp_path)})
    assert done.returncode == 0
