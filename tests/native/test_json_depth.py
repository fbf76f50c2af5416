"""_C.json_depth: nesting of a JSON text counted without parsing it (brackets inside strings ignored)."""

from __future__ import annotations

import json

import pytest

from tensorlink import _C


@pytest.mark.parametrize(
    "value",
    [1, "x", [], {}, [[1, [2]], {"a": {"b": [3]}}], {"s": "[[[{{{", "t": '\\"[', "u": '"]]]"'}, [[[[[[]]]]]]],
)
def test_depth_matches_the_parsed_structure(value: object) -> None:
    def depth(v: object) -> int:
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 0

    assert _C.json_depth(json.dumps(value).encode(), 100) == depth(value)


def test_stops_past_the_limit_on_huge_nesting() -> None:
    assert _C.json_depth(b"[" * 10_000_000, 64) == 65
    assert _C.json_depth(b"[" * 64 + b"]" * 64, 64) == 64


def test_escaped_quote_does_not_end_a_string() -> None:
    assert _C.json_depth(b'["\\"[[[[" , 1]', 100) == 1
