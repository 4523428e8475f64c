"""An in-process server with its HTTP API on a free loopback port, and tokens for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.hostile.harness import Org, new_tpm, start_org
from vcomp.server.http.app import HttpListener
from vcomp.server.http.auth import new_token, token_digest
from vcomp.server.http.settings import HttpSettings


@dataclass
class Api:
    org: Org
    listener: HttpListener
    http: aiohttp.ClientSession
    tokens: dict[str, str]

    @property
    def url(self) -> str:
        return self.listener.url

    def auth(self, scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}


async def start_api(tmp_path: Path, settings: HttpSettings) -> Api:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    tokens = {}
    for scope in ("read", "submit", "admin"):
        tokens[scope] = new_token()
        org.store.create_token(f"t-{scope}", scope, token_digest(tokens[scope]))
    listener = HttpListener(org.server, settings)
    await listener.start()
    return Api(org, listener, aiohttp.ClientSession(), tokens)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    running = await start_api(tmp_path, HttpSettings(bind="127.0.0.1:0", max_request_bytes=1 << 20))
    try:
        yield running
    finally:
        await running.http.close()
        await running.listener.stop()
        await running.org.server.stop()
