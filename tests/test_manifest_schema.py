"""Defaults and bounds live in the schema only: the built Manifest takes its defaults from it, and
its `minimum`/`maximum` are the bound checks, with messages in the manifest's terms."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from microvmc.compiler.load import KeyPath, Loaded
from microvmc.compiler.manifest import schema, schema_node, validate, with_defaults
from microvmc.errors import ManifestError

MINIMAL = {"version": 1, "process": {"argv": ["true"]}}


def check(doc: dict) -> list[str]:
    try:
        validate(Loaded(data=doc, origins={}, files=("/m.toml",), root="m.toml"))
    except ManifestError as err:
        return err.lines()
    return []


def _defaults(node: dict[str, Any], path: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    for name, child in node.get("properties", {}).items():
        if "default" in child:
            yield (*path, name), child["default"]
        yield from _defaults(child, (*path, name))


def test_every_schema_default_is_the_built_manifest_value() -> None:
    built = validate(Loaded(data={**MINIMAL, "shares": {"s": {"host": "/tmp", "guest": "/s"}}},
                            origins={}, files=("/m.toml",), root="m.toml")).to_dict()
    found = list(_defaults(schema()))
    assert (("resources", "memory"), 256) in found and len(found) >= 13  # process.cwd: the image's WorkingDir, else /
    for path, default in found:
        if path[0] == "network" and path[1] == "forwards":
            continue  # a list of tables, absent by default
        if path == ("network", "mtu"):
            continue  # a NIC's: absent with mode "none" (below, with a network)
        value: Any = built
        for part in path:
            value = value[part]
        assert value == default, path
    networked = validate(Loaded(data={**MINIMAL, "network": {"mode": "user"}}, origins={}, files=("/m.toml",),
                                root="m.toml")).to_dict()
    assert networked["network"]["mtu"] == schema()["properties"]["network"]["properties"]["mtu"]["default"]
    share = schema()["properties"]["shares"]["additionalProperties"]["properties"]
    assert built["shares"]["s"] == {"host": "/tmp", "guest": "/s", "read_only": share["read_only"]["default"],
                                    "transport": share["transport"]["default"]}


def test_with_defaults_fills_absent_tables_and_keeps_what_was_written() -> None:
    doc = {"version": 1, "process": {"argv": ["x"]}, "resources": {"cpus": 3}, "image": "wrong"}
    filled = with_defaults(doc)
    assert filled["resources"] == {"cpus": 3, "memory": 256, "accel": "auto", "boot_timeout": 60,
                                   "stop_timeout": 10, "timeout": 0}
    assert filled["image"] == "wrong" and filled["kernel"]["source"] == "default"
    assert doc == {"version": 1, "process": {"argv": ["x"]}, "resources": {"cpus": 3}, "image": "wrong"}


def _bounded(node: dict[str, Any], path: KeyPath = ()) -> Iterator[tuple[KeyPath, dict[str, Any]]]:
    for name, child in node.get("properties", {}).items():
        if "minimum" in child or "maximum" in child:
            yield (*path, name), child
        yield from _bounded(child, (*path, name))


BOUNDED = list(_bounded(schema()))


def test_the_bounds_are_in_the_schema() -> None:
    assert {".".join(p) for p, _ in BOUNDED} == {"resources.cpus", "resources.memory", "resources.boot_timeout",
                                                 "resources.stop_timeout", "resources.timeout", "logs.max_size",
                                                 "logs.max_files", "network.mtu"}
    assert schema_node(("resources", "memory"))["minimum"] == 128
    assert schema_node(("shares", "any", "guest"))["type"] == "string"
    assert schema_node(("kernel", "cmdline", 3)) == {"type": "string", "minLength": 1}
    assert schema_node(("nothing", "here")) == {}


@pytest.mark.parametrize("path,node", BOUNDED, ids=[".".join(p) for p, _ in BOUNDED])
def test_each_bound_is_checked_with_its_unit(path: KeyPath, node: dict[str, Any]) -> None:
    unit = f" {node['x-unit']}" if "x-unit" in node else ""
    low, high = node["minimum"], node["maximum"]
    step = 1 if node["type"] == "integer" else 0.05
    for value, want in ((low - step, f"below the minimum of {low}{unit}"), (high + step, f"above the maximum of {high}{unit}")):
        value = round(value, 2) if step != 1 else value
        assert check({**MINIMAL, path[0]: {path[1]: value}}) == [f"m.toml: {'.'.join(path)}: {value} is {want}"]
    assert check({**MINIMAL, path[0]: {path[1]: low}}) == check({**MINIMAL, path[0]: {path[1]: high}}) == []


def test_exact_bound_messages() -> None:
    assert check({**MINIMAL, "resources": {"memory": 16, "boot_timeout": 0, "timeout": 10**6}}) == [
        "m.toml: resources.memory: 16 is below the minimum of 128 MiB",
        "m.toml: resources.boot_timeout: 0 is below the minimum of 0.1 seconds",
        "m.toml: resources.timeout: 1000000 is above the maximum of 604800 seconds",
    ]


def test_an_integer_written_as_a_float_is_refused() -> None:
    # jsonschema takes 2.0 as an integer; QEMU would get "-smp 2.0".
    assert check({**MINIMAL, "resources": {"cpus": 2.0, "memory": 256.0}}) == [
        "m.toml: resources.cpus: 2.0 is not an integer",
        "m.toml: resources.memory: 256.0 is not an integer",
    ]


def test_problems_are_listed_in_key_order_whichever_check_found_them() -> None:
    doc = {"version": 1, "hostname": "-x-", "resources": {"accel": "fast", "cpus": 0},
           "process": {"cwd": "rel", "argv": "notalist"}}
    assert check(doc) == [
        'm.toml: hostname: "-x-" is not a valid hostname (letters, digits and \'-\', at most 63 per dot-separated label)',
        'm.toml: process.argv: "notalist" is not a list',
        'm.toml: process.cwd: "rel" is not an absolute path',
        "m.toml: resources.cpus: 0 is below the minimum of 1",
        'm.toml: resources.accel: "fast" is not one of "auto", "kvm", "tcg"',
    ]
