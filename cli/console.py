"""The two consoles every command prints to, and the one way a command fails with a message."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def fail(error: object) -> typer.Exit:
    """Print ``error:`` and the message on stderr; the caller raises the returned ``typer.Exit(1)``."""
    err_console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True, highlight=False)
    return typer.Exit(code=1)
