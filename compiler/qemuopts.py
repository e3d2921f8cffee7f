"""QEMU option strings (`-device`, `-chardev`, `-object`, `-M` values), built from values.

QEMU splits an option string at each `,`; a literal comma inside a value is written `,,`. Every value
goes through here, so a path with a comma cannot split an option or add one.
"""

from __future__ import annotations

__all__ = ["escape", "opts"]


def escape(value: str) -> str:
    return value.replace(",", ",,")


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return escape(str(value))


def opts(head: str | None, *pairs: tuple[str, object]) -> str:
    """`opts("virtserialport", ("chardev", "stdout"), ("name", "stdout"))`
    → "virtserialport,chardev=stdout,name=stdout". A None value leaves its key out."""
    parts = [escape(head)] if head is not None else []
    for key, value in pairs:
        if "," in key or "=" in key:
            raise ValueError(f"invalid QEMU option key {key!r}")
        if value is not None:
            parts.append(f"{key}={_value(value)}")
    return ",".join(parts)
