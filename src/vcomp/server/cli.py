"""``vcomp-server``: the organisation's command line."""

from __future__ import annotations

import click

from vcomp import __version__


@click.group()
@click.version_option(__version__, prog_name="vcomp-server")
def main() -> None:
    """Run a vcomp organisation server and manage its jobs."""
