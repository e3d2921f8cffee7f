"""microvmc-runtime driven by the real engines, unchanged: podman (--runtime), docker (a private
dockerd with --add-runtime) and containerd (`ctr run --runc-binary`), each container a microVM.
After every test nothing is left: no container, no state file, no process naming the state root.

Each test boots one VM per engine (~3-5 s under TCG, more on a loaded machine)."""

from __future__ import annotations

import os
import time

import pytest

from oci_engines import BUSYBOX_IMAGE, leftovers, run_container

pytestmark = [pytest.mark.engine, pytest.mark.boot]

RT = "microvm"
ENGINES = ["podman", "docker", "containerd"]


@pytest.fixture(params=ENGINES)
def eut(request):
    eut = request.getfixturevalue(request.param)
    for calls in eut.calls.values():
        calls.clear()
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
