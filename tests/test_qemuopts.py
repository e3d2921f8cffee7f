"""QEMU option strings: a value can never split an option or add one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microvmc.compiler.qemuopts import escape, opts


def qemu_split(option: str) -> list[str]:
    """How QEMU's option parser splits a string (qemu_opts_parse: ',,' is a literal comma)."""
    parts, current, i = [], "", 0
    while i < len(option):
        if option[i] == ",":
            if option[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += option[i]
        i += 1
    parts.append(current)
    return parts


@given(st.text(max_size=50), st.text(max_size=50))
def test_values_survive_qemu_splitting(path: str, tag: str) -> None:
    built = opts("vhost-user-fs-device", ("chardev", path), ("tag", tag))
    assert qemu_split(built) == ["vhost-user-fs-device", f"chardev={path}", f"tag={tag}"]


def test_examples() -> None:
    assert escape("/a,b") == "/a,,b"
    assert opts("file", ("id", "x"), ("path", "/tmp/a,b"), ("append", True)) == "file,id=x,path=/tmp/a,,b,append=on"
    assert opts(None, ("share", False)) == "share=off"
    assert opts("x", ("skip", None)) == "x"


def test_keys_are_checked() -> None:
    with pytest.raises(ValueError):
        opts("x", ("a,b", 1))
