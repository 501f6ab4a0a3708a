"""Commands that talk to a server: ``adapters register | list | show | delete`` and ``generate``.
Each takes the shared :class:`~deft_cli.connection.Connection` options."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from deft_cli.connection import Connection, connect
from deft_cli.console import console, err_console, fail
from deft_cli.options import with_options
from rich.markup import escape
from rich.table import Table

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
    console.print(f"registered [bold]{escape(info.name)}[/]: {escape(_describe(info))}")


@adapters_app.command("list")
@with_options(connection=Connection)
def adapters_list(connection: Connection) -> None:
    """List the registered adapters."""
    with connect(connection) as client:
        infos = client.list_adapters()
    table = Table("name", "owner", "kind", "ranks", "layers", "size", "state", "registered")
    for info in infos:
        kind = f"{info.kind} ({info.decomposition})" if info.decomposition else info.kind
        created = info.created_at.strftime("%Y-%m-%d %H:%M")
        ranks = ",".join(map(str, info.ranks))
        table.add_row(
            info.name,
            info.owner or "public",
            kind,
            ranks,
            str(info.target_count),
            _size(info.size_bytes),
            info.state,
            created,
        )
    console.print(table)


@adapters_app.command("show")
@with_options(connection=Connection)
def adapters_show(name: Annotated[str, typer.Argument(help="registry name")], connection: Connection) -> None:
    """Show everything the server knows about one adapter."""
    with connect(connection) as client:
        info = client.get_adapter(name)
    for field, value in vars(info).items():  # plain lines: nothing truncated, easy to copy
        console.print(f"{field}: {value}", markup=False, highlight=False)


@adapters_app.command("delete")
@with_options(connection=Connection)
def adapters_delete(
    name: Annotated[str, typer.Argument(help="registry name")], connection: Connection
) -> None:
    """Delete an adapter (refused while running requests use it)."""
    with connect(connection) as client:
        client.delete_adapter(name)
    console.print(f"deleted {escape(name)}")


def _parse_adapter(spec: str) -> tuple[str, float]:
    name, sep, weight = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        return name, float(weight)
    except ValueError:
        raise typer.BadParameter(f"{spec!r}: expected NAME or NAME:WEIGHT with a number as WEIGHT") from None


def _outputs(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(count)]


@with_options(connection=Connection)
def generate(
    prompt: Annotated[str, typer.Option(help="what to draw")],
    out: Annotated[Path, typer.Option(help="FILE.png; with several images FILE_0.png, FILE_1.png, ...")],
    connection: Connection,
    negative_prompt: Annotated[str | None, typer.Option(help="what to avoid")] = None,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME or NAME:WEIGHT (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: random)")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the model's)")] = None,
    width: Annotated[int | None, typer.Option(help="image width (default: the model's)")] = None,
    height: Annotated[int | None, typer.Option(help="image height (default: the model's)")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (default: the model's)")] = None,
    num_images: Annotated[int | None, typer.Option(help="images to generate (default: 1)")] = None,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
) -> None:
    """Generate images on a server, with a progress bar, and write them as PNG files."""
    from deft_client import GenerateOptions

    options = GenerateOptions(
        negative_prompt=negative_prompt,
        adapters=[_parse_adapter(a) for a in adapter or []],
        seed=seed,
        steps=steps,
        width=width,
        height=height,
        guidance_scale=guidance,
        num_images=num_images,
    )
    with connect(connection) as client:
        result = _stream_with_progress(client.generate_stream(prompt, options, timeout=timeout))
    for path, image in zip(_outputs(out, len(result.images)), result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
        console.print(f"wrote {escape(str(path))}")
    console.print(f"seed {result.seed}, {result.steps} steps in {result.total_seconds:.1f}s")


def _stream_with_progress(events: Iterable[Any]) -> Any:
    """Drive a progress bar from a generation event stream; returns the final result."""
    from deft_client import Progress as StepDone
    from deft_client import Queued, Result, Started
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("queued", total=None)
        for event in events:
            if isinstance(event, Queued):
                bar.update(task, description=f"queued (position {event.position})")
            elif isinstance(event, Started):
                bar.update(task, description="denoising", total=event.total_steps, completed=0)
            elif isinstance(event, StepDone):
                bar.update(task, description="denoising", total=event.total_steps, completed=event.step)
            elif isinstance(event, Result):
                return event
    raise fail(RuntimeError("the server ended the stream without a result"))
