"""``vcomp-agent``: the volunteer's command line."""

from __future__ import annotations

import click

from vcomp import __version__


@click.group()
@click.version_option(__version__, prog_name="vcomp-agent")
def main() -> None:
    """Run a vcomp volunteer agent on this machine."""
