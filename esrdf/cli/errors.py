"""click commands whose user errors, usage errors included, print as one ``Error: ...`` line.

Shared by every console script (``esrdf-train``, ``esrdf-export``, ``esrdf-bench``); imports only click, so
the runtime's CLI may use it too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click


class _OneLineErrors:
    """Runs click in non-standalone mode and turns its exceptions into one line and an exit status."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        run = super().main  # type: ignore[misc]
        if not standalone_mode:
            return run(args, prog_name, complete_var, False, **extra)
        try:
            result = run(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            hint = " (see --help)" if isinstance(exc, click.UsageError) else ""
            message = " ".join(exc.format_message().split())  # click wraps some messages over lines
            click.echo(f"Error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


class OneLineErrorCommand(_OneLineErrors, click.Command):
    """A click command with one-line errors."""


class OneLineErrorGroup(_OneLineErrors, click.Group):
    """A click group with one-line errors."""
