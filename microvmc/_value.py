"""Frozen value classes for what a foreground `run` imports before it starts QEMU.

`dataclasses` imports `inspect` (with `ast`, `dis`, `tokenize`, `copy`): ~7 ms of every `run`
before QEMU starts (bench/run_true.py). The few value classes on that path (errors.Problem,
compiler/host.py's HostFacts, compiler/hostfiles.py's Observation, the evaluation cache's key,
backends/qemu.py's RunLogs and Vm) are `Value`s instead: `__slots__` and an explicit `__init__`
(setting each field with `_init`), with what a frozen dataclass has (==, hash, repr, no
assignment, copy and pickle) here once. `replace` is `dataclasses.replace`.
"""

from __future__ import annotations

__all__ = ["Value"]


class Value:
    """A frozen value: its fields are its `__slots__`, compared, hashed and shown in that order."""

    __slots__ = ()

    def _init(self, fields: dict) -> None:
        """Each field from `fields` (an `__init__`'s `locals()`)."""
        for name in type(self).__slots__:
            object.__setattr__(self, name, fields[name])

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in type(self).__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in type(self).__slots__)
        return f"{type(self).__qualname__}({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")

    def __getstate__(self) -> tuple:
        return self._values()

    def __setstate__(self, state: tuple) -> None:
        for name, value in zip(type(self).__slots__, state):
            object.__setattr__(self, name, value)

    def replace(self, **changes: object):
        """A copy with `changes` (as `dataclasses.replace`)."""
        fields = {name: getattr(self, name) for name in type(self).__slots__}
        unknown = changes.keys() - fields.keys()
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        return type(self)(**{**fields, **changes})
