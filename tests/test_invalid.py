"""Invalid manifests, each with the exact messages `microvmc validate` must print.

tests/invalid/<name>.toml sits next to <name>.err; every problem is one line naming the file, the
key path and the value. (cycle-b.toml and imported-error-base.toml are only imported.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from microvmc.cli import main

INVALID = Path(__file__).resolve().parent / "invalid"
CASES = sorted(p.stem for p in INVALID.glob("*.err"))


@pytest.mark.parametrize("name", CASES)
def test_invalid_manifest_messages(name: str, capsys, monkeypatch) -> None:
    monkeypatch.chdir(INVALID)
    status = main(["validate", f"{name}.toml"])
    out, err = capsys.readouterr()
    assert status == 125
    assert out == ""
    assert err == (INVALID / f"{name}.err").read_text()
    assert "Traceback" not in err


def test_every_invalid_manifest_has_expected_messages() -> None:
    only_imported = {"cycle-b", "imported-error-base"}
    assert sorted(p.stem for p in INVALID.glob("*.toml")) == sorted([*CASES, *only_imported])


def test_valid_manifest_exits_zero(capsys) -> None:
    examples = Path(__file__).resolve().parent.parent / "examples"
    assert main(["validate", str(examples / "hello.toml"), str(examples / "composed.toml")]) == 0
    assert capsys.readouterr().out.count(": valid") == 2


def test_run_with_an_invalid_manifest_starts_nothing(capsys, monkeypatch) -> None:
    monkeypatch.chdir(INVALID)
    assert main(["run", "unknown-key.toml"]) == 125
    assert capsys.readouterr().err == "unknown-key.toml: resources.memroy: unknown key\n"


def test_debug_shows_the_traceback(monkeypatch) -> None:
    from microvmc.errors import ManifestError

    monkeypatch.chdir(INVALID)
    with pytest.raises(ManifestError):
        main(["build", "--debug", "version.toml"])
