"""The ready-made validators."""

from __future__ import annotations

import json

import pytest

from vcomp.validators import DISAGREE, Disagree, json_close


def j(value: object) -> bytes:
    return json.dumps(value).encode()


def test_json_close_accepts_floats_within_the_tolerance_and_returns_the_first() -> None:
    a = j({"pi": 3.14159265358979, "n": [1, 2.0, {"s": "x"}], "ok": True})
    b = j({"pi": 3.14159265358980, "n": [1, 2.0000000000001, {"s": "x"}], "ok": True})
    assert json_close([a, b]) == a
    assert json_close([b, a]) == b
    assert json_close([a, b, a]) == a


@pytest.mark.parametrize(
    "other",
    [
        {"pi": 3.15, "n": [1, 2.0, {"s": "x"}], "ok": True},  # a float too far
        {"pi": 3.14159265358979, "n": [1, 2.0, {"s": "y"}], "ok": True},  # a string
        {"pi": 3.14159265358979, "n": [1, 2.0], "ok": True},  # a shorter list
        {"pi": 3.14159265358979, "n": [1, 2.0, {"s": "x"}], "ok": 1},  # bool is not 1
        {"pi": 3.14159265358979, "n": [1, 2.0, {"s": "x"}]},  # a missing key
        "not an object",
    ],
)
def test_json_close_disagrees(other: object) -> None:
    a = j({"pi": 3.14159265358979, "n": [1, 2.0, {"s": "x"}], "ok": True})
    assert json_close([a, j(other)]) is DISAGREE


def test_json_close_tolerance_is_an_option() -> None:
    a, b = j({"x": 1.0}), j({"x": 1.001})
    assert json_close([a, b]) is DISAGREE
    assert json_close([a, b], rel_tol=1e-2) == a
    assert json_close([j({"x": 0.0}), j({"x": 1e-12})], abs_tol=1e-9) is not DISAGREE


def test_json_close_hostile_outputs_disagree_and_never_raise() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert json_close([deep, deep]) is DISAGREE
    assert json_close([b"\xff\xfe", b"{}"]) is DISAGREE
    assert json_close([b"NaN", b"NaN"]) is DISAGREE  # NaN is close to nothing
    assert json_close([]) is DISAGREE
    assert Disagree() is DISAGREE and repr(DISAGREE) == "DISAGREE"
