"""Commands that talk to a server about adapters: ``adapters register | list | show | delete``
(``generate`` is :mod:`deft_cli.generate`). Each takes the shared :class:`~deft_cli.connection.Connection` options."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from deft_cli.connection import Connection, connect
from deft_cli.console import console, err_console
from deft_cli.listing import JSON, WIDE, print_json, print_table, table
from deft_cli.options import with_options
from rich.markup import escape

adapters_app = typer.Typer(help="Manage the adapters registered on a server.", no_args_is_help=True)


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _describe(info: Any) -> str:
    mode = f" ({info.decomposition})" if info.decomposition else ""
    return (
        f"{info.kind}{mode}, {info.target_count} layers, ranks {list(info.ranks)}, {_size(info.size_bytes)} "
        f"{info.source_format} upload, {info.state}"
    )


@adapters_app.command("register")
@with_options(connection=Connection)
def adapters_register(
    name: Annotated[str, typer.Argument(help="registry name: letters, digits, '.', '_', '-'")],
    path: Annotated[
        Path, typer.Argument(help="PEFT directory, .safetensors LoRA file, or *.deft.safetensors")
    ],
    connection: Connection,
    public: Annotated[
        bool, typer.Option("--public", help="usable by every tenant (needs an admin key)")
    ] = False,
    denoiser_only: Annotated[
        bool,
        typer.Option("--denoiser-only", help="upload a LoRA file without its text-encoder layers (warns)"),
    ] = False,
) -> None:
    """Upload an adapter (a file, a PEFT directory, or a folder holding one, e.g. a `deft train` output);
    the server validates and compiles it against its base model."""
    import warnings

    from deft_client import DroppedLayersWarning

    with connect(connection) as client, warnings.catch_warnings(record=True) as dropped:
        warnings.simplefilter("always", DroppedLayersWarning)
        info = client.register_adapter(name, path, public=public, denoiser_only=denoiser_only)
    for warning in dropped:
        err_console.print(f"[yellow]warning:[/] {escape(str(warning.message))}", soft_wrap=True)
    console.print(f"registered [bold]{escape(info.name)}[/]: {escape(_describe(info))}", soft_wrap=True)
    console.print(f"sha256 {info.sha256} (of the uploaded bytes)", highlight=False)


@adapters_app.command("list")
@with_options(connection=Connection)
def adapters_list(connection: Connection, wide: WIDE = False, as_json: JSON = False) -> None:
    """List the registered adapters (state: ready, resident or incompatible; see the README)."""
    with connect(connection) as client:
        infos = client.list_adapters()
    if as_json:
        return print_json(infos)
    rows = table("name", "owner", "kind", "ranks", "layers", "size", "state", "registered", folded=("name",))
    for info in infos:
        rows.add_row(
            info.name,
            info.owner or "public",
            f"{info.kind} ({info.decomposition})" if info.decomposition else info.kind,
            _ranks(info.ranks),
            str(info.target_count),
            _size(info.size_bytes),
            info.state,
            info.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    print_table(rows, wide=wide)


@adapters_app.command("show")
@with_options(connection=Connection)
def adapters_show(
    name: Annotated[str, typer.Argument(help="registry name")], connection: Connection, as_json: JSON = False
) -> None:
    """Show everything the server knows about one adapter."""
    with connect(connection) as client:
        info = client.get_adapter(name)
    if as_json:
        return print_json(info)
    for field, value in _shown_fields(info):  # plain lines: nothing truncated, easy to copy
        console.print(f"{field}: {value}", markup=False, highlight=False, soft_wrap=True)


def _ranks(ranks: Iterable[int]) -> str:
    return ", ".join(map(str, ranks)) or "-"


def _shown_fields(info: Any) -> Iterator[tuple[str, str]]:
    """``adapters show``'s lines: each field in words; an empty reason or metadata is left out."""
    for field, value in vars(info).items():
        if field == "ranks":
            yield field, _ranks(value)
        elif field in ("size_bytes", "compiled_bytes"):
            yield field, f"{value} ({_size(value)})"
        elif field == "created_at":
            yield field, value.isoformat(timespec="seconds")
        elif field == "metadata":
            yield from ((f"metadata.{k}", v) for k, v in sorted(value.items()))
        elif field == "owner":
            yield field, value or "public"
        elif value != "":
            yield field, str(value)


@adapters_app.command("delete")
@with_options(connection=Connection)
def adapters_delete(
    name: Annotated[str, typer.Argument(help="registry name")], connection: Connection
) -> None:
    """Delete an adapter (refused while running requests use it)."""
    with connect(connection) as client:
        client.delete_adapter(name)
    console.print(f"deleted {escape(name)}")
