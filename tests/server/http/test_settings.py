"""``[http]``: what may listen where, and TLS that really works."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest

from tests.server.http.conftest import start_api
from tests.tlscert import self_signed
from vcomp.errors import ConfigError
from vcomp.server.config import load_server_config
from vcomp.server.http.settings import HttpSettings


def test_a_public_bind_without_tls_is_refused() -> None:
    with pytest.raises(ConfigError, match="not loopback and has no TLS"):
        HttpSettings(bind="0.0.0.0:7462")
    assert HttpSettings(bind="0.0.0.0:7462", allow_plaintext=True).enabled
    assert HttpSettings(bind="127.0.0.1:7462").loopback
    assert HttpSettings(bind="[::1]:7462").loopback


def test_open_metrics_only_on_loopback_and_cert_needs_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="open_metrics"):
        HttpSettings(bind="10.0.0.1:7462", allow_plaintext=True, open_metrics=True)
    with pytest.raises(ConfigError, match="cert and key go together"):
        HttpSettings(bind="127.0.0.1:7462", cert=tmp_path / "c.pem")


def test_server_toml_http_section(tmp_path: Path) -> None:
    from vcomp.server.config import init_server_home

    init_server_home(tmp_path / "srv")
    config = load_server_config(tmp_path / "srv")
    assert config.http.bind == "127.0.0.1:7462" and not config.http.open_metrics
    toml = tmp_path / "srv" / "server.toml"
    toml.write_text(toml.read_text().replace('bind = "127.0.0.1:7462"', 'bind = "0.0.0.0:7462"'))
    with pytest.raises(ConfigError, match=r"server.toml: \[http\] bind"):
        load_server_config(tmp_path / "srv")
    toml.write_text(toml.read_text() + "\n[http]\ncolour = 1\n")
    with pytest.raises(ConfigError):
        load_server_config(tmp_path / "srv")


async def test_tls_serves_the_api_and_plain_http_gets_nothing(tmp_path: Path) -> None:
    cert, key = self_signed().write(tmp_path)
    api = await start_api(tmp_path, HttpSettings(bind="127.0.0.1:0", cert=cert, key=key))
    try:
        assert api.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(cert))
        port = api.listener.address[1] if api.listener.address else 0
        url = f"https://localhost:{port}/api/v1/apps"
        async with api.http.get(url, headers=api.auth("read"), ssl=trust) as r:
            assert r.status == 200 and "apps" in await r.json()
        with pytest.raises(aiohttp.ClientError):
            async with api.http.get(f"http://127.0.0.1:{port}/api/v1/apps") as r:
                await r.read()
    finally:
        await api.http.close()
        await api.listener.stop()
        await api.org.server.stop()
