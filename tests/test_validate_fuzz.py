"""Property: whatever the document, validation returns a Manifest or raises ManifestError, one
line per problem, never anything else (no traceback for any user input)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvmc.compiler.load import Loaded
from microvmc.compiler.manifest import Manifest, schema, validate
from microvmc.errors import ManifestError


def _keys(node: dict, out: set[str]) -> set[str]:
    for name, child in node.get("properties", {}).items():
        out.add(name)
        _keys(child, out)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        _keys(extra, out)
    return out


KEYS = sorted(_keys(schema(), set()) | {"data", "x", "", "a.b", "A=B"})
scalars = st.one_of(
    st.none().map(lambda _: "builtin"),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["builtin", "directory", "overlay", "9p", "kvm", "tcg", "path", "/", "/tmp", "user", "none"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=5)),
    max_leaves=25,
)
documents = st.fixed_dictionaries(
    {"version": st.one_of(st.just(1), scalars)},
    optional={key: values for key in ("hostname", "image", "process", "kernel", "resources", "shares", "network", "extra")},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_validation_never_fails_otherwise(doc: dict) -> None:
    loaded = Loaded(data=doc, origins={}, files=("/m.toml",), root="m.toml")
    try:
        result = validate(loaded)
    except ManifestError as err:
        lines = err.lines()
        assert lines and all(line.startswith("m.toml: ") and "\n" not in line for line in lines)
    else:
        assert isinstance(result, Manifest)


@given(st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=6), st.lists(st.text(max_size=20), min_size=1, max_size=5))
def test_any_process_env_and_argv_are_accepted_or_explained(env: dict[str, str], argv: list[str]) -> None:
    doc = {"version": 1, "process": {"argv": argv, "env": env}}
    try:
        manifest = validate(Loaded(data=doc, origins={}, files=("/m.toml",), root="m.toml"))
    except ManifestError as err:
        assert all(line.startswith("m.toml: process.") for line in err.lines())
    else:
        assert manifest.process.argv == tuple(argv)
        assert {k: v for k, v in manifest.process.env if k in env} == env


def test_non_finite_numbers_are_refused() -> None:
    import math

    import pytest

    for value in (math.nan, math.inf, -math.inf):
        doc = {"version": 1, "process": {"argv": ["true"]}, "resources": {"boot_timeout": value, "timeout": value}}
        with pytest.raises(ManifestError) as err:
            validate(Loaded(data=doc, origins={}, files=("/m.toml",), root="m.toml"))
        assert err.value.lines() == [f"m.toml: resources.boot_timeout: {value} is not a finite number",
                                     f"m.toml: resources.timeout: {value} is not a finite number"]


text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=40)
shaped = st.fixed_dictionaries(
    {"version": st.just(1), "process": st.fixed_dictionaries(
        {"argv": st.lists(text, min_size=1, max_size=40).filter(lambda a: a[0] != "")},
        optional={"env": st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True), text, max_size=45),
                  "cwd": st.sampled_from(["/", "/tmp", "/a b/ü"])})},
    optional={
        "hostname": st.sampled_from(["a", "vm-1", "x" * 63, "a.b.c"]),
        "image": st.fixed_dictionaries({}, optional={"mode": st.sampled_from(["read-only", "overlay"]),
                                                     "transport": st.sampled_from(["virtiofs", "9p"])}),
        "resources": st.fixed_dictionaries({}, optional={
            "cpus": st.integers(1, 64), "memory": st.integers(64, 1 << 20), "accel": st.sampled_from(["auto", "tcg"]),
            "boot_timeout": st.one_of(st.integers(1, 3600), st.floats(1, 3600)),
            "timeout": st.one_of(st.integers(0, 10**5), st.floats(0, 10**5))}),
        "kernel": st.fixed_dictionaries({}, optional={"cmdline": st.lists(st.from_regex(r"[a-z_]{1,10}(=[a-z0-9,]{0,8})?", fullmatch=True) | st.text("ab=", min_size=900, max_size=1100), max_size=40)}),
        "shares": st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda t: t != "root"),
                                  st.fixed_dictionaries({"host": st.just("/tmp"), "guest": st.sampled_from(["/mnt/a", "/data", "/x y"])},
                                                        optional={"read_only": st.booleans(), "transport": st.sampled_from(["virtiofs", "9p"])}),
                                  max_size=2),
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(documents, shaped))
def test_every_valid_document_compiles(doc: dict) -> None:
    """What validation accepts, the rest of the compiler can plan (no crash after validation)."""
    from conftest import FIXTURE_SOURCES, fake_facts
    from microvmc.compiler.pipeline import compile_manifest
    from microvmc.errors import MicrovmcError

    try:
        manifest = validate(Loaded(data=doc, origins={}, files=("/m.toml",), root="m.toml"))
    except ManifestError:
        return
    try:
        compile_manifest(manifest, facts=fake_facts(), store="/s", sources=FIXTURE_SOURCES)
    except ManifestError as err:  # validate must refuse what plan refuses (issue 6, item 9)
        raise AssertionError(f"valid, but plan refuses it: {err}") from None
    except MicrovmcError as err:
        assert err.lines()


def test_kernel_parameters_plan_refuses_are_refused_by_validate() -> None:
    """Issue 6, item 9: a 2204-byte kernel.cmdline item was valid, and plan refused it."""
    from conftest import FIXTURE_SOURCES, fake_facts
    from microvmc.compiler.pipeline import compile_manifest

    doc = {"version": 1, "process": {"argv": ["true"]}, "kernel": {"cmdline": ["x=" + "y" * 2202]}}
    try:
        validate(Loaded(data=doc, origins={}, files=("/m.toml",), root="m.toml"))
    except ManifestError as err:
        assert err.lines() == ["m.toml: kernel.cmdline: takes 2204 bytes; the kernel's command line holds 2047, "
                               "of which microvmc leaves 1023 to the manifest"]
    else:
        raise AssertionError("validate accepted it")
    doc["kernel"]["cmdline"] = ["x=" + "y" * 1021]  # the most it takes: plan takes it too
    manifest = validate(Loaded(data=doc, origins={}, files=("/m.toml",), root="m.toml"))
    assert compile_manifest(manifest, facts=fake_facts(), store="/s", sources=FIXTURE_SOURCES).plan.cmdline
