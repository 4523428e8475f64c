"""``server/openapi.json`` describes exactly the routes the server serves."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from tests.hostile.harness import APP
from tests.server.http.test_api import ROUTES
from vcomp.server.http.app import build_app
from vcomp.server.http.context import HttpContext
from vcomp.server.http.settings import HttpSettings

DOCUMENT = Path(__file__).resolve().parents[3] / "server" / "openapi.json"
METHODS = {"get", "post", "put", "patch", "delete"}


def served() -> set[tuple[str, str]]:
    # Building the app registers routes only; nothing here talks to a server.
    ctx = HttpContext(server=SimpleNamespace(), settings=HttpSettings(bind="127.0.0.1:0"))  # type: ignore[arg-type]
    routes = set()
    for route in build_app(ctx).router.routes():
        if route.method == "HEAD":
            continue  # aiohttp adds one per GET
        info = route.resource.get_info() if route.resource is not None else {}
        routes.add((route.method, str(info.get("path") or info.get("formatter"))))
    return routes


def described() -> dict[tuple[str, str], dict[str, object]]:
    doc = json.loads(DOCUMENT.read_text())
    assert doc["openapi"].startswith("3.1")
    return {
        (method.upper(), path): operation
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def test_the_document_and_the_routes_match_both_ways() -> None:
    missing = served() - described().keys()
    stale = described().keys() - served()
    assert not missing, f"served but not in server/openapi.json: {sorted(missing)}"
    assert not stale, f"in server/openapi.json but not served: {sorted(stale)}"


def test_every_operation_names_the_scope_the_server_checks() -> None:
    operations = described()
    for method, path, scope in ROUTES:
        template = path.split("?")[0].replace("/1", "/{batch}").replace("/0", "/{index}")
        template = template.replace("/apps/extra/", "/apps/{name}/")
        template = template.replace("/agents/AGENT/", "/agents/{agent}/")
        retire = f"/apps/{APP}/versions/{{batch}}/"
        template = template.replace(retire, "/apps/{name}/versions/{version}/")
        assert operations[(method, template)]["x-scope"] == scope, (method, path)
    for operation in operations.values():
        assert operation["x-scope"] in {"none", "read", "submit", "admin", "monitoring"}
        assert "responses" in operation
