"""``corral.api.limits.too_deep``: the JSON nesting check every request body passes (issue 12)."""

from __future__ import annotations

import json

import pytest

from corral.api.limits import too_deep


def nested(depth: int) -> bytes:
    """Objects and arrays alternating, ``depth`` levels (built as text: json.dumps recurses)."""
    opening = "".join('{"k": ' if level % 2 == 0 else "[" for level in range(depth))
    closing = "".join("}" if level % 2 == 0 else "]" for level in reversed(range(depth)))
    return f"{opening}1{closing}".encode()


@pytest.mark.parametrize("depth", [0, 1, 2, 63, 64])
def test_up_to_the_limit_passes(depth: int) -> None:
    assert too_deep(nested(depth), 64) is None


@pytest.mark.parametrize("depth", [65, 66, 1000, 100_000])
def test_past_the_limit_is_refused(depth: int) -> None:
    reason = too_deep(nested(depth), 64)
    assert reason is not None and "deeper than 64 levels" in reason


def test_brackets_in_strings_do_not_count() -> None:
    text = json.dumps({"a": "[" * 10_000, "b": ['x"]]]]{{{{\\', "}" * 500], "c": '\\"['})
    assert too_deep(text.encode(), 64) is None
    assert too_deep(json.dumps(["[[[[" * 100] * 1000).encode(), 2) is None


def test_many_siblings_are_not_depth() -> None:
    assert too_deep(json.dumps([[[1]]] * 100_000).encode(), 3) is None
    assert too_deep(json.dumps([[[1]]] * 100_000).encode(), 2) is not None


@pytest.mark.parametrize("body", [b"[" * 100_000, b"{" * 200, b"[" * 70 + b"]" * 10])
def test_unbalanced_brackets_are_refused(body: bytes) -> None:
    reason = too_deep(body, 64)
    assert reason is not None


def test_small_bodies_take_the_fast_path() -> None:
    assert too_deep(b'{"a": [1, 2, {"b": null}]}', 64) is None
    assert too_deep(b"not json at all", 64) is None  # the JSON parser reports that
