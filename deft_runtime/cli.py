"""The ``deft`` command line. Later issues add ``serve``, ``adapters``, ``generate``, ``train`` and
``export-onnx``; this module holds the commands that work on local files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from deft_runtime import __version__
from deft_runtime.errors import DeftError
from deft_runtime.train.cli import train_command

app = typer.Typer(
    name="deft",
    help="Serve many DEFT / PaRa / LoRA adapters per batch on one diffusion base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _fail(error: Exception) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {error}")
    return typer.Exit(code=1)


@app.command()
def version() -> None:
    """Print the deft version."""
    console.print(__version__)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="PEFT directory, deft file, or diffusers/kohya LoRA file")],
) -> None:
    """Read an adapter in any supported format and print what it is."""
    from deft_runtime.formats import load_adapter

    try:
        adapter = load_adapter(path)
    except DeftError as e:
        raise _fail(e) from e
    console.print(f"[bold]{path}[/]: {adapter.describe()}")
    table = Table("layer", "rank", "scale", "tensors")
    for name, layer in sorted(adapter.layers.items()):
        shapes = ", ".join(f"{role}{list(t.shape)}" for role, t in layer.tensors().items())
        table.add_row(name, str(layer.rank), f"{layer.scale:g}", shapes)
    console.print(table)


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="adapter in any supported format")],
    destination: Annotated[Path, typer.Argument(help="output file (deft) or directory (peft)")],
    to: Annotated[str, typer.Option(help="output format: deft | peft")] = "deft",
) -> None:
    """Convert an adapter to deft's own format or to a PEFT DEFT directory."""
    from deft_runtime.formats import load_adapter, save_adapter

    if to not in ("deft", "peft"):
        raise _fail(ValueError(f"--to must be 'deft' or 'peft', got {to!r}"))
    fmt: Literal["deft", "peft"] = "deft" if to == "deft" else "peft"
    try:
        written = save_adapter(load_adapter(source), destination, format=fmt)
    except DeftError as e:
        raise _fail(e) from e
    console.print(f"wrote {written}")


@app.command()
def serve() -> None:
    """Start the gRPC server (arrives with the server issue; not available in this version)."""
    raise _fail(RuntimeError("the gRPC server is not part of this version of deft yet"))


app.command("train")(train_command)


if __name__ == "__main__":
    app()
