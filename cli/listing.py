"""How listing commands print (``inspect``, ``adapters list | show``, ``keys list``): a table that
never cuts a name (laid out as wide as it needs when piped or with ``--wide``, folded otherwise), or
with ``--json`` one JSON document on stdout for scripts."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Annotated, Any

import typer
from deft_cli.console import console
from rich.console import Console
from rich.table import Table

WIDE = Annotated[
    bool, typer.Option("--wide", help="never wrap a cell (the default when the output is not a terminal)")
]
JSON = Annotated[bool, typer.Option("--json", help="print JSON instead of a table (for scripts)")]
UNLIMITED_WIDTH = 10_000  # rich lays a table out at most this wide: in practice, as wide as it needs


def table(*columns: str, folded: tuple[str, ...] = ()) -> Table:
    """A table whose ``folded`` columns wrap long values instead of cutting them, and whose other
    columns (dates, numbers, states) never wrap."""
    t = Table()
    for name in columns:
        t.add_column(name, overflow="fold", no_wrap=name not in folded)
    return t


def print_table(t: Table, *, wide: bool) -> None:
    """``t`` at the terminal's width, or as wide as it needs (``--wide``, or a pipe/file)."""
    if wide or not console.is_terminal:
        Console(width=UNLIMITED_WIDTH, color_system="auto" if console.color_system else None).print(t)
    else:
        console.print(t)


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (dataclasses as objects, datetimes ISO 8601)."""
    print(json.dumps(plain(value), indent=2, ensure_ascii=False))


def plain(value: Any) -> Any:
    """``value`` with dataclasses, tuples and datetimes turned into JSON's types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value
