"""The value classes a foreground `run` imports before it starts QEMU (microvmc/_value.py): what a
frozen dataclass was, and that the start imports neither dataclasses nor typing."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import pytest

from microvmc.backends.evalcache import CacheKey
from microvmc.compiler.host import HostFacts, VirtiofsdFlavour
from microvmc.compiler.hostfiles import Look, Observation
from microvmc.errors import ManifestError, Problem


def test_a_value_is_frozen_compared_hashed_shown_copied_and_replaced() -> None:
    p = Problem("a.toml", "resources.memory", "16 is below the minimum of 64 MiB")
    assert p == Problem(file="a.toml", key="resources.memory", message="16 is below the minimum of 64 MiB", hint="")
    assert p != Problem("a.toml", "resources.memory", "16 is below the minimum of 64 MiB", "a hint")
    assert p != ("a.toml", "resources.memory", "16 is below the minimum of 64 MiB", "")
    assert len({p, Problem("a.toml", "resources.memory", "16 is below the minimum of 64 MiB")}) == 1
    assert repr(p) == ("Problem(file='a.toml', key='resources.memory', message='16 is below the minimum of 64 MiB', "
                       "hint='')")
    assert str(p.replace(hint="at least 64")) == "a.toml: resources.memory: 16 is below the minimum of 64 MiB (at least 64)"
    assert copy.copy(p) == p and copy.deepcopy(p) == p and pickle.loads(pickle.dumps(p)) == p
    with pytest.raises(AttributeError):
        p.key = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.key
    with pytest.raises(AttributeError):
        p.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        p.replace(nope=1)
    assert ManifestError([p]).lines() == [str(p)]


def test_host_facts_are_keyword_only_with_their_defaults() -> None:
    facts = HostFacts()
    assert (facts.arch, facts.qemu_version, facts.virtiofsd_flavour, facts.init_cc, facts.init_libc) == (
        "x86_64", (7, 2, 0), VirtiofsdFlavour.C, None, "glibc")
    with pytest.raises(TypeError):
        HostFacts("x86_64")  # type: ignore[misc]
    with pytest.raises(TypeError):
        HostFacts(nope=1)  # type: ignore[call-arg]
    kvm = facts.replace(kvm_usable=True)
    assert kvm != facts and kvm.kvm_usable and kvm.replace(kvm_usable=False) == facts
    key = dict(manifest="/m.toml", argv=(), env=(), store="/s", facts=facts)
    assert CacheKey(**key) == CacheKey(**key) and CacheKey(**key).digest() == CacheKey(**key).digest()
    assert CacheKey(**key).digest() != CacheKey(**key, tty=True).digest()
    o = Observation(Look.IS_FILE, "/x", False)
    assert Observation.from_list(o.to_list()) == o and hash(o) == hash(Observation(Look.IS_FILE, "/x", False))


def test_the_start_of_a_run_imports_neither_dataclasses_nor_typing() -> None:
    modules = ("microvmc.cli", "microvmc.lifecycle", "microvmc.backends.runstore", "microvmc.backends.outputs",
               "microvmc.backends.qemu", "microvmc.backends.host", "microvmc.backends.evalcache",
               "microvmc.compiler.hostfiles", "microvmc.backends._signals")
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(' '.join(m for m in ('dataclasses', 'inspect', 'typing', 'threading') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == []
