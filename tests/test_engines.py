"""The engine harness, proved with runc: each engine runs containers with its normal runtime (behind
the logging wrapper the microvm tests use too), and what it calls the runtime with is recorded here as
NOTES-oci.md describes it. No VM boots; needs root and the engines (scripts/setup --test)."""

from __future__ import annotations

import pytest

from oci_engines import BUSYBOX_IMAGE, ENGINES, engine_param, leftovers, run_container

# Slow (daemons, ~1.5 min): kept out of the fast suite (-m "not boot") with the boots.
pytestmark = [pytest.mark.engine, pytest.mark.boot]


@pytest.fixture(params=ENGINES)
def eut(request):
    eut = engine_param(request)
    yield eut
    assert leftovers(eut, "runclog") == []


def test_plain_run_and_exit_status(eut) -> None:
    r = run_container(eut, "runclog", BUSYBOX_IMAGE, ["echo", "hello"])
    assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
    r = run_container(eut, "runclog", BUSYBOX_IMAGE, ["sh", "-c", "exit 7"])
    assert r.returncode == 7, r.stderr


def test_stdin(eut) -> None:
    if eut.name == "containerd":
        # ctr never closes the container's stdin, with runc too: a program that ends by itself.
        r = run_container(eut, "runclog", BUSYBOX_IMAGE, ["head", "-c", "3"], input=b"abcdef", timeout=60)
        assert (r.returncode, r.stdout) == (0, b"abc"), r.stderr
    else:
        r = run_container(eut, "runclog", BUSYBOX_IMAGE, ["wc", "-c"], input=b"abcdef", interactive=True)
        assert (r.returncode, r.stdout.strip()) == (0, b"6"), r.stderr


def test_what_the_engine_calls(eut) -> None:
    run_container(eut, "runclog", BUSYBOX_IMAGE, ["true"])
    calls = eut.calls["runclog"].lines()
    verbs = eut.calls["runclog"].verbs()
    if eut.name == "podman":
        # conmon: no global flags; create with --bundle and --pid-file, start, delete --force.
        assert verbs == ["create", "start", "delete"], calls
        assert calls[0][:2] == ["create", "--bundle"] and "--pid-file" in calls[0]
        assert calls[2][:2] == ["delete", "--force"]
    else:
        # the shim: every call prefixed with --root, --log and --log-format json.
        assert verbs[:2] == ["create", "start"] and set(verbs[2:]) == {"delete"}, calls
        for argv in calls:
            assert argv[0] == "--root" and argv[2] == "--log" and argv[4:6] == ["--log-format", "json"], argv
        assert "--pid-file" in calls[0] and calls[0][calls[0].index("--pid-file") + 1].endswith("/init.pid")
