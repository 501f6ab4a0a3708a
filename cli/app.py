"""The ``deft`` command: local adapter files (``inspect``, ``convert``), training (``train``), ONNX
export (``export-onnx``), and the server and its clients (``serve``, ``adapters``, ``generate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from deft_cli import remote
from deft_cli.console import console, err_console, fail
from deft_cli.export import export_onnx_command
from deft_cli.generate import generate
from deft_cli.help_format import help_width, tidy
from deft_cli.keys import keys_app
from deft_cli.listing import JSON, WIDE, print_json, print_table, table
from deft_cli.train import train_command
from rich.markup import escape

from deft_runtime import __version__
from deft_runtime.errors import DeftError


class DeftApp(typer.Typer):
    """The ``deft`` command: typer's, with the help conventions of :mod:`deft_cli.help_format`, and a
    file error (a path that does not exist, a folder that cannot be written) reported as a message."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import typer.rich_utils

        typer.rich_utils.MAX_WIDTH = help_width()
        try:
            return tidy(typer.main.get_command(self))(*args, **kwargs)
        except OSError as e:
            raise SystemExit(fail(e).exit_code) from e


app = DeftApp(
    name="deft",
    help="Serve many DEFT / PaRa / LoRA adapters per batch on one diffusion base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(given: bool) -> None:
    if given:
        console.print(__version__)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the deft version and exit."
        ),
    ] = False,
) -> None:
    pass


@app.command()
def version() -> None:
    """Print the deft version."""
    console.print(__version__)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="PEFT directory, deft file, or diffusers/kohya LoRA file")],
    wide: WIDE = False,
    as_json: JSON = False,
) -> None:
    """Read an adapter in any supported format and print what it is."""
    from deft_runtime.formats import load_adapter

    try:
        adapter = load_adapter(path)
    except DeftError as e:
        raise fail(e) from e
    layers: dict[str, dict[str, Any]] = {
        name: {
            "rank": layer.rank,
            "scale": layer.scale,
            "tensors": {r: list(t.shape) for r, t in layer.tensors().items()},
        }
        for name, layer in sorted(adapter.layers.items())
    }
    if as_json:
        return print_json({"path": str(path), "description": adapter.describe(), "layers": layers})
    console.print(f"[bold]{escape(str(path))}[/]: {adapter.describe()}", soft_wrap=True)  # never cut a path
    rows = table("layer", "rank", "scale", "tensors", folded=("layer", "tensors"))
    for name, layer in layers.items():
        shapes = ", ".join(f"{role}{shape}" for role, shape in layer["tensors"].items())
        rows.add_row(name, str(layer["rank"]), f"{layer['scale']:g}", shapes)
    print_table(rows, wide=wide)


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="adapter in any supported format")],
    destination: Annotated[
        Path, typer.Argument(help="output file (deft), directory (peft), or directory or file (diffusers)")
    ],
    to: Annotated[str, typer.Option(help="output format: deft | peft | diffusers (LoRA only)")] = "deft",
    denoiser_only: Annotated[
        bool, typer.Option("--denoiser-only", help="leave a LoRA file's text-encoder layers out (warns)")
    ] = False,
) -> None:
    """Convert an adapter to deft's own format, a PEFT directory (DEFT, PaRa or LoRA), or diffusers'
    pytorch_lora_weights.safetensors (LoRA: pipe.load_lora_weights(DESTINATION))."""
    from deft_runtime.formats import load_adapter, save_adapter

    formats: dict[str, Literal["deft", "peft", "diffusers"]] = {
        "deft": "deft",
        "peft": "peft",
        "diffusers": "diffusers",
    }
    if to not in formats:
        raise fail(ValueError(f"--to must be 'deft', 'peft' or 'diffusers', got {to!r}"))
    fmt = formats[to]
    try:
        adapter = load_adapter(source, denoiser_only=denoiser_only)
        if dropped := adapter.metadata.get("dropped_text_encoder_layers"):
            err_console.print(f"[yellow]warning:[/] left out {escape(dropped)}", soft_wrap=True)
        written = save_adapter(adapter, destination, format=fmt)
    except DeftError as e:
        raise fail(e) from e
    console.print(f"wrote {escape(str(written))}")


app.command("train")(train_command)
app.command("export-onnx")(export_onnx_command)


@app.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False
)
def serve(ctx: typer.Context) -> None:
    """Start the gRPC server (health, reflection, Prometheus metrics); SIGTERM drains it and exits 0.

    Every setting of the server is a flag (and a DEFT_* environment variable): deft serve --help.
    """
    # the options are generated from deft_server's settings model, which loads only when serving
    try:
        from deft_server.cli import serve_app
    except ImportError as e:
        raise fail(f"deft serve needs the server extra: pip install 'deft[server]' ({e})") from e
    command = tidy(typer.main.get_command(serve_app()), defaults=False)
    command(ctx.args, prog_name="deft serve")


app.add_typer(remote.adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.command()(generate)
