"""README.md's manifest reference is the one generated from the schema; examples use only the schema."""

from __future__ import annotations

from pathlib import Path

from microvmc.compiler.reference import BEGIN, END, reference

REPO = Path(__file__).resolve().parent.parent


def test_readme_reference_matches_the_schema() -> None:
    body = (REPO / "README.md").read_text()
    generated = body[body.index(BEGIN) + len(BEGIN) : body.index(END)]
    assert generated == "\n" + reference(), "run: python3 -m microvmc.compiler.reference --write"


def test_schema_is_strict_and_identified() -> None:
    from microvmc.compiler.manifest import schema

    s = schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["$id"].endswith("manifest.schema.json")

    def tables(node):
        if node.get("type") == "object" and "properties" in node:
            yield node
        for child in node.get("properties", {}).values():
            yield from tables(child)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            yield from tables(extra)
        if isinstance(node.get("items"), dict):
            yield from tables(node["items"])

    assert all(t.get("additionalProperties") is False for t in tables(s))
