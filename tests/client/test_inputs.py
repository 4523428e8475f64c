"""Job inputs as a streamed NDJSON body (vcomp.client.inputs)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import pytest

from tests.client.conftest import ContractServer
from vcomp.client import Client
from vcomp.client.inputs import header_line, input_line
from vcomp.errors import ConfigError


def test_bytes_go_as_base64_and_everything_else_as_json() -> None:
    raw = b"\x00\xffraw"
    assert json.loads(input_line(raw)) == {"b64": base64.b64encode(raw).decode()}
    assert json.loads(input_line(bytearray(b"ab"))) == {"b64": "YWI="}
    assert input_line({"points": 10, "seed": 1}) == b'{"json":{"points":10,"seed":1}}\n'
    assert input_line("text") == b'{"json":"text"}\n'
    assert input_line([1, None, 2.5]) == b'{"json":[1,null,2.5]}\n'


@pytest.mark.parametrize("value", [object(), {1, 2}, float("nan"), {"x": float("inf")}])
def test_an_input_that_is_neither_bytes_nor_json_is_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="must be bytes or JSON-able"):
        input_line(value)


def test_the_header_carries_the_app_and_options_with_none_for_defaults() -> None:
    line = header_line("pi", {"version": None, "replicas": 2})
    assert json.loads(line) == {"app": "pi", "version": None, "replicas": 2}
    assert line.endswith(b"\n") and line.count(b"\n") == 1


async def test_the_server_receives_exactly_the_inputs_in_order(contract: ContractServer) -> None:
    inputs: list[object] = [b"\x01\x02", {"seed": 1}, "s", 3, None]
    async with Client.connect(contract.url, token="submit-tok") as client:
        batch = await client.map("pi", inputs, replicas=2, cpu_seconds=1.5)
    stored = contract.batches[batch.id]
    assert batch.jobs == 5
    assert stored.header == {
        "app": "pi",
        "version": None,
        "replicas": 2,
        "memory": None,
        "wall_seconds": None,
        "cpu_seconds": 1.5,
    }
    assert stored.inputs == [
        {"b64": "AQI="},
        {"json": {"seed": 1}},
        {"json": "s"},
        {"json": 3},
        {"json": None},
    ]


async def test_inputs_stream_while_they_are_made(contract: ContractServer) -> None:
    """Each input is only made once the server has received the one before it: a client
    that built the whole body first would never finish (the wait_for below fails)."""
    received = [asyncio.Event() for _ in range(8)]
    contract.on_input_line = lambda i: received[i].set()

    async def inputs() -> AsyncIterator[bytes]:
        for i in range(8):
            if i > 0:
                await received[i - 1].wait()
            yield bytes([i]) * (100 << 10)  # a line over CHUNK_BYTES, so it goes out at once

    async with Client.connect(contract.url, token="submit-tok") as client:
        batch = await asyncio.wait_for(client.map("pi", inputs()), 60)
    assert batch.jobs == 8
    stored = contract.batches[batch.id].inputs
    assert [base64.b64decode(x["b64"])[:1] for x in stored] == [bytes([i]) for i in range(8)]


async def test_a_bad_input_fails_the_call_and_creates_no_batch(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token="submit-tok") as client:
        with pytest.raises(ConfigError) as caught:
            await client.map("pi", [1, object()])
    assert "must be bytes or JSON-able" in str(caught.value)
    assert contract.batches == {}
