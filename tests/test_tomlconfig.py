"""The TOML reading and value checks server.toml and agent.toml share."""

from __future__ import annotations

import pytest

from vcomp.errors import ConfigError
from vcomp.tomlconfig import check_int, parse_host_port


def test_parse_host_port() -> None:
    assert parse_host_port("example.org:7461", what="x") == ("example.org", 7461)
    assert parse_host_port("[2001:db8::1]:9", what="x") == ("2001:db8::1", 9)
    with pytest.raises(ConfigError):
        parse_host_port("example.org:0", what="x")
    with pytest.raises(ConfigError):
        parse_host_port(":7461", what="x")


def test_check_int_takes_the_bounds_themselves() -> None:
    check_int("n", 1, 1, 3)
    check_int("n", 3, 1, 3)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "n must be between 1 and 3, got 0"),
        (4, "n must be between 1 and 3, got 4"),
        (True, "n must be an integer, got True"),  # a TOML true is not 1
        (2.0, "n must be an integer, got 2.0"),
        ("2", "n must be an integer, got '2'"),
    ],
)
def test_check_int_names_the_setting(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_int("n", value, 1, 3)
    assert str(caught.value) == message
