"""Composition: imports, merge rules, relative paths, cycles, and where values came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvmc.compiler.load import load
from microvmc.compiler.manifest import validate
from microvmc.errors import ManifestError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_tables_merge_key_by_key_and_later_files_win(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", 'version = 1\nhostname = "a"\n[process]\nargv = ["a"]\nenv = { X = "1", Y = "a" }\n[resources]\nmemory = 128\ncpus = 2\n')
    write(tmp_path / "b.toml", 'version = 1\n[process]\nenv = { Y = "b", Z = "b" }\n[resources]\nmemory = 512\n')
    top = write(tmp_path / "top.toml", 'version = 1\nimports = ["a.toml", "b.toml"]\n[process]\nargv = ["top", "x"]\n')
    m = validate(load(top, cwd=str(tmp_path)))
    assert m.hostname == "a"
    assert m.process.argv == ("top", "x")  # arrays are replaced whole
    assert dict(m.process.env) == {"X": "1", "Y": "b", "Z": "b", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    assert (m.resources.memory, m.resources.cpus) == (512, 2)
    assert m.files == (str(tmp_path / "a.toml"), str(tmp_path / "b.toml"), str(top))


def test_paths_are_relative_to_the_file_that_wrote_them(tmp_path: Path) -> None:
    (tmp_path / "lib" / "data").mkdir(parents=True)
    write(tmp_path / "lib" / "base.toml", 'version = 1\n[shares.data]\nhost = "data"\nguest = "/mnt"\n')
    top = write(tmp_path / "app" / "app.toml", 'version = 1\nimports = ["../lib/base.toml"]\n[process]\nargv = ["true"]\n')
    m = validate(load(top, cwd="/"))
    assert m.shares[0].host == str(tmp_path / "lib" / "data")


def test_an_import_cycle_shows_the_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", 'version = 1\nimports = ["b.toml"]\n')
    write(tmp_path / "b.toml", 'version = 1\nimports = ["c.toml"]\n')
    write(tmp_path / "c.toml", 'version = 1\nimports = ["a.toml"]\n')
    with pytest.raises(ManifestError) as err:
        load(tmp_path / "a.toml", cwd=str(tmp_path))
    assert str(err.value) == "c.toml: imports[0]: import cycle: a.toml → b.toml → c.toml → a.toml"


def test_a_file_imported_twice_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "common.toml", 'version = 1\n[resources]\ncpus = 2\n')
    write(tmp_path / "x.toml", 'version = 1\nimports = ["common.toml"]\n')
    top = write(tmp_path / "top.toml", 'version = 1\nimports = ["common.toml", "x.toml"]\n[process]\nargv = ["true"]\n')
    assert validate(load(top, cwd=str(tmp_path))).resources.cpus == 2


def test_problems_name_the_file_that_set_the_value(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", 'version = 1\nhostname = "bad_name"\n[resources]\nmemory = 32\n')
    top = write(tmp_path / "top.toml", 'version = 1\nimports = ["base.toml"]\n[process]\nargv = ["true"]\n[resources]\ncpus = 0\n')
    with pytest.raises(ManifestError) as err:
        validate(load(top, cwd=str(tmp_path)))
    assert err.value.lines() == [
        'base.toml: hostname: "bad_name" is not a valid hostname (letters, digits and \'-\', at most 63 per dot-separated label)',
        "top.toml: resources.cpus: 0 is below the minimum of 1",
        "base.toml: resources.memory: 32 is below the minimum of 128 MiB",
    ]


def test_an_override_of_a_bad_value_fixes_it(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", 'version = 1\n[resources]\nmemory = 32\n')
    top = write(tmp_path / "top.toml", 'version = 1\nimports = ["base.toml"]\n[process]\nargv = ["true"]\n[resources]\nmemory = 128\n')
    assert validate(load(top, cwd=str(tmp_path))).resources.memory == 128


def test_overrides_from_the_command_line(tmp_path: Path) -> None:
    top = write(tmp_path / "m.toml", 'version = 1\n[process]\nargv = ["a"]\nenv = { K = "v" }\n')
    m = validate(load(top, cwd=str(tmp_path)).overridden(argv=("/bin/sh", "-c", "exit 42"), env={"K": "w", "N": "1"}))
    assert m.process.argv == ("/bin/sh", "-c", "exit 42")
    assert dict(m.process.env)["K"] == "w" and dict(m.process.env)["N"] == "1"
    # Overrides are validated like the file, and their problems are the command line's.
    with pytest.raises(ManifestError) as err:
        validate(load(top, cwd=str(tmp_path)).overridden(argv=("",), env={"": "x"}))
    assert err.value.lines() == [
        'command line: process.argv[0]: "" is not a program',
        'command line: process.env."": "" is not a valid environment variable name '
        "(a name must be non-empty and contain neither '=' nor NUL)",
    ]


def test_any_file_content_loads_or_is_explained(tmp_path_factory) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    folder = tmp_path_factory.mktemp("fuzz")
    toml_like = st.text(st.sampled_from(list('version=1[]{}"\',.\n #imports/-_ab0é\\\x00\t')), max_size=80)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.binary(max_size=80), toml_like.map(lambda t: t.encode("utf-8", "surrogatepass"))))
    def check(raw: bytes) -> None:
        path = folder / "m.toml"
        path.write_bytes(raw)
        try:
            validate(load(path, cwd=str(folder)))
        except ManifestError as err:
            assert all(line.startswith(("m.toml: ", "m.toml:")) for line in err.lines()), err.lines()

    check()


@pytest.mark.parametrize("name, text, message", [
    ("deep-lists", "version = 1\nx = " + "[" * 5000 + "]" * 5000 + "\n", "nests tables or lists more than 32 deep"),
    ("deep-tables", "version = 1\n[" + ".".join(["a"] * 1000) + "]\nb = 1\n", "nests tables or lists more than 32 deep"),
    ("deep-inline", "version = 1\nx = " + "{a = " * 600 + "1" + "}" * 600 + "\n", "nests tables or lists more than 32 deep"),
    ("huge", "version = 1\n# " + "x" * (4 << 20) + "\n", "is larger than 4 MiB, which no manifest needs"),
])
def test_hostile_documents_are_one_line_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    """Issue 6, item 7: these were RecursionError tracebacks (and /dev/zero a MemoryError)."""
    path = write(tmp_path / f"{name}.toml", text)
    with pytest.raises(ManifestError) as err:
        validate(load(path, cwd=str(tmp_path)))
    assert err.value.lines() == [f"{name}.toml: {message}"]


def test_what_is_not_a_manifest_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    for path, line in (("/dev/zero", "/dev/zero: is larger than 4 MiB, which no manifest needs"),
                       ("dir", "dir: is a directory, not a manifest")):
        with pytest.raises(ManifestError) as err:
            load(path, cwd=str(tmp_path))
        assert err.value.lines() == [line]
    top = write(tmp_path / "top.toml", 'version = 1\nimports = ["dir"]\n')
    with pytest.raises(ManifestError) as err:  # issue 6, item 9: it said "does not exist"
        load(top, cwd=str(tmp_path))
    assert err.value.lines() == ['top.toml: imports[0]: "dir" is a directory, not a manifest']


def test_long_values_and_keys_are_shown_cut_short(tmp_path: Path) -> None:
    top = write(tmp_path / "m.toml", f'version = 1\nhostname = "{"h" * 100_000}"\n"{"k" * 100_000}" = 1\n'
                '[process]\nargv = ["true"]\n')
    with pytest.raises(ManifestError) as err:
        validate(load(top, cwd=str(tmp_path)))
    assert err.value.lines() == [
        f'm.toml: hostname: "{"h" * 96}... is not a valid hostname (letters, digits and \'-\', at most 63 per dot-separated label)',
        f"m.toml: {'k' * 97}...: unknown key",
    ]
