"""Error mapping of the client's HTTP session (vcomp.client.api), over real sockets."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from tests.client.conftest import ContractServer, serve_app
from vcomp.client import ApiError, ApiUnreachable, AuthError, Client, NotFound
from vcomp.errors import ConfigError


async def test_no_token_is_an_auth_error_with_the_servers_code(contract: ContractServer) -> None:
    async with Client.connect(contract.url) as client:
        with pytest.raises(AuthError) as caught:
            await client.agents()
    assert (caught.value.status, caught.value.code) == (401, "missing_token")
    assert "this endpoint needs a bearer token" in str(caught.value)


async def test_an_unknown_token_is_an_auth_error(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token="guessed") as client:
        with pytest.raises(AuthError) as caught:
            await client.apps()
    assert (caught.value.status, caught.value.code) == (401, "bad_token")
    assert "guessed" not in str(caught.value)


async def test_a_read_token_cannot_submit(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token="read-tok") as client:
        with pytest.raises(AuthError) as caught:
            await client.map("pi", [1, 2])
    assert (caught.value.status, caught.value.code) == (403, "wrong_scope")
    assert contract.batches == {}  # nothing was created


async def test_unknown_things_are_not_found(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token="submit-tok") as client:
        with pytest.raises(NotFound) as batch:
            await client.batch(99)
        with pytest.raises(NotFound) as app:
            await client.map("no-such-app", [1])
    assert (batch.value.code, app.value.code) == ("unknown_batch", "unknown_app")
    assert "no app 'no-such-app'" in app.value.message


async def agents_error(status: int, body: bytes, content_type: str) -> ApiError:
    """What ``client.agents()`` raises when the server answers it with ``body``."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/api/v1/agents", handler)
    runner, url = await serve_app(app)
    try:
        async with Client.connect(url, token="read-tok") as client:
            with pytest.raises(ApiError) as caught:
                await client.agents()
    finally:
        await runner.cleanup()
    return caught.value


@pytest.mark.parametrize(
    ("status", "body", "code", "says"),
    [
        (502, b"<html>Bad Gateway</html>", "http_502", "<html>Bad Gateway</html>"),
        (413, b'{"error": "too_large", "message": "over 1 MiB"}', "too_large", "over 1 MiB"),
        (500, b'{"error": "internal", "message": "see the server log"}', "internal", "server log"),
        (200, b"<html>a captive portal</html>", "bad_response", "is not JSON"),
        (200, b'["not", "an", "object"]', "bad_response", "is not a JSON object"),
        (200, b'{"agents": [{"id": 7}]}', "bad_response", "'id' is int, expected str"),
    ],
)
async def test_answers_that_are_errors_or_not_the_apis_become_api_errors(
    status: int, body: bytes, code: str, says: str
) -> None:
    error = await agents_error(status, body, "text/html")
    assert error.code == code
    assert says in str(error)


async def test_a_huge_error_body_is_cut_not_read_whole() -> None:
    body = b'{"error": "bad_request", "message": "' + b"x" * (8 << 20) + b'"}'
    error = await agents_error(400, body, "application/json")
    # only the first 64 KiB were read: not the server's JSON any more, so its start is shown
    assert error.code == "http_400"
    assert len(str(error)) < 1000


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_server_that_is_not_there_is_a_clear_unreachable_error() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    async with Client.connect(url, token="secret-token-123") as client:
        with pytest.raises(ApiUnreachable) as caught:
            await client.agents()
    message = str(caught.value)
    assert message.startswith(f"cannot reach the vcomp HTTP API at {url}")
    assert "secret-token-123" not in message


@pytest.mark.parametrize(
    "url", ["127.0.0.1:7462", "ftp://host:1", "http://", "http://user:pw@host:7462"]
)
def test_a_bad_url_is_refused_at_once(url: str) -> None:
    with pytest.raises(ConfigError):
        Client.connect(url, token="t")


async def test_a_closed_client_says_so() -> None:
    client = Client.connect("http://127.0.0.1:1", token="t")
    with pytest.raises(ConfigError, match="not open"):
        await client.agents()


async def test_a_server_that_stays_silent_is_given_up_on_with_a_clear_error() -> None:
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/api/v1/agents", silent)
    runner, url = await serve_app(app)
    try:
        async with Client.connect(url, token="read-tok", timeout=0.3) as client:
            with pytest.raises(ApiUnreachable, match=r"no answer within 0\.3 s"):
                await client.agents()
    finally:
        await runner.cleanup()
