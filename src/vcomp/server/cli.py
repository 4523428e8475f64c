"""``vcomp-server``: the organisation's command line.

Every command but ``init`` works on a server home (``--config``, else
``$VCOMP_SERVER_HOME``, else the current directory). Store commands talk to the SQLite
job store directly (the store named by ``[store] url`` or ``$VCOMP_STORE_URL``), so they
work whether or not ``serve`` is running: the server picks up new batches, allowlist
entries and reset requests from the store. Every command but ``init`` and ``migrate``
refuses a store whose schema is not this vcomp's, naming ``migrate``.

This module holds the group and what every command shares (``--config``, opening the
store); the commands live in the ``cli_*`` modules beside it, one purpose each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from vcomp import __version__
from vcomp.cligroup import VcompGroup
from vcomp.server.config import ServerConfig, load_server_config
from vcomp.server.store import Store
from vcomp.server.store import open_store as open_store_url

_F = TypeVar("_F", bound=Callable[..., Any])


def config_option(f: _F) -> _F:
    """The ``--config`` option every command but ``init`` takes."""
    option = click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        envvar="VCOMP_SERVER_HOME",
        default=".",
        help="Server home directory or its server.toml "
        "[default: $VCOMP_SERVER_HOME, else the current directory].",
    )
    return option(f)


@contextlib.contextmanager
def open_store(config_path: Path) -> Iterator[tuple[ServerConfig, Store]]:
    """The home's configuration and its job store, closed on the way out."""
    config = load_server_config(config_path)
    store = open_store_url(config.store_url)
    try:
        yield config, store
    finally:
        store.close()


@click.group(cls=VcompGroup)
@click.version_option(__version__, prog_name="vcomp-server")
def main() -> None:
    """Run a vcomp organisation server and manage its jobs.

    Start with `vcomp-server init DIR`, then run the other commands with
    --config DIR (or from DIR, or with VCOMP_SERVER_HOME=DIR).
    """


from vcomp.server import (  # noqa: E402,F401  register their commands on main
    cli_agents,
    cli_apps,
    cli_batches,
    cli_home,
    cli_results,
    cli_status,
    cli_tokens,
    cli_trust,
)

if __name__ == "__main__":  # pragma: no cover
    main()
