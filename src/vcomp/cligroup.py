"""The click group both command lines share: one ``error: ...`` line, no tracebacks."""

from __future__ import annotations

import sys
from typing import Any

import click

from vcomp.errors import VcompError

EXIT_ERROR = 1


class VcompGroup(click.Group):
    """Turns vcomp's own errors (and OS errors) into ``error: ...`` and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (`... | head`): not an error worth a message.
            sys.stderr.close()
            ctx.exit(0)
        except (VcompError, OSError) as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_ERROR)
