"""The ``deft`` command line: local adapter files (``inspect``, ``convert``), training (``train``), and
the server and its clients (``serve``, ``adapters``, ``generate``).

The server and client commands import ``deft_server`` / ``deft_client`` inside the command, so
``import deft_runtime`` (and this module) works without the ``server`` extra installed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
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
    err_console.print(f"[bold red]error:[/] {escape(str(error))}")
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


app.command("train")(train_command)


@app.command("export-onnx")
def export_onnx_command(
    model: Annotated[str, typer.Option(help="tiny-sdxl | tiny-omnigen | diffusers DIR | hub id")],
    out: Annotated[
        Path, typer.Option(help="output folder (created; files of an earlier export are replaced)")
    ],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME_OR_PATH or NAME_OR_PATH:WEIGHT, merged into the denoiser (repeatable). A path "
            "(PEFT dir, deft or LoRA .safetensors) if it exists, else a name in the registry"
        ),
    ] = None,
    text_encoders: Annotated[
        bool, typer.Option("--text-encoders", help="also export both CLIP text encoders (SDXL)")
    ] = False,
    vae_decoder: Annotated[bool, typer.Option("--vae-decoder", help="also export the VAE decoder")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset, 17 to 20")] = 17,
    validate: Annotated[
        bool,
        typer.Option(help="compare onnxruntime with torch at batch sizes 1 and 3; fail beyond tolerance"),
    ] = True,
    tolerance: Annotated[
        float, typer.Option(help="pass if max|onnx - torch| <= TOLERANCE * max(1, max|torch|)")
    ] = 1e-4,
    data_dir: Annotated[
        Path | None,
        typer.Option(envvar="DEFT_DATA_DIR", help="registry folder for adapter names [~/.local/share/deft]"),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            envvar="DEFT_REGISTRY", help="shared registry URL for adapter names [SQLite in --data-dir]"
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(envvar="DEFT_CACHE_DIR", help="tiny-model cache [~/.cache/deft/models]")
    ] = None,
) -> None:
    """Export the denoiser with adapters merged into its weights to ONNX, with a manifest.json.

    Float32, CPU. Batch, latent height/width and text length are dynamic axes (height/width must be
    multiples of the UNet's up-sampling factor: see the manifest). Every file is checked with
    onnxruntime against torch unless --no-validate; a file beyond --tolerance exits 1.

    Example: deft export-onnx --model tiny-sdxl --adapter ./dog-peft --adapter style:0.5 --out onnx/
    """
    from deft_runtime.onnx_export import MIN_OPSET, export_onnx

    if opset < MIN_OPSET:
        raise typer.BadParameter(
            f"opset {opset} is below {MIN_OPSET}, the lowest supported", param_hint="--opset"
        )
    with err_console.status("exporting") as status:

        def progress(message: str) -> None:
            status.update(escape(message))
            err_console.print(f"[dim]·[/] {escape(message)}")

        try:
            result = export_onnx(
                model,
                out,
                adapters=adapter or [],
                text_encoders=text_encoders,
                vae_decoder=vae_decoder,
                opset=opset,
                validate=validate,
                tolerance=tolerance,
                data_dir=data_dir,
                registry=registry,
                cache_dir=cache_dir,
                progress=progress,
            )
        except DeftError as e:
            raise _fail(e) from e
    manifest = result.manifest
    for entry in manifest["adapters"]:
        console.print(
            f"merged [bold]{escape(entry['source'])}[/] x{entry['weight']:g}: {entry['kind']}, "
            f"{entry['layers']} layers, sha256 {entry['sha256'][:12]}"
        )

    def shapes(rows: list[dict[str, Any]]) -> str:
        return "\n".join(f"{r['name']} {r['shape']}" for r in rows)

    table = Table("file", "inputs", "outputs", "max abs error")
    for entry in manifest["files"].values():
        error = entry.get("validation", {}).get("max_abs_error")
        table.add_row(
            escape(entry["path"]),
            escape(shapes(entry["inputs"])),
            escape(shapes(entry["outputs"])),
            "not checked" if error is None else f"{error:.2e}",
        )
    console.print(table)
    check = manifest["validation"]
    summary = (
        f"validated with onnxruntime at batch sizes {check['batch_sizes']}: max abs error "
        f"{check['max_abs_error']:.2e} (tolerance {check['tolerance']:g} x max(1, |output|))"
        if check
        else "not validated (--no-validate)"
    )
    console.print(f"opset {manifest['opset']}, {summary}")
    console.print(f"wrote {escape(str(result.manifest_path))}")


# ---------------------------------------------------------------------------- server and clients
# Help texts name the environment variable of each flag; defaults live in deft_server.config.


def _opt(help: str, *names: str) -> Any:
    return typer.Option(*names, help=help, show_default=False)


@app.command()
def serve(
    model: Annotated[
        str | None, _opt("tiny-sdxl | tiny-omnigen | diffusers DIR | hub id [DEFT_MODEL; tiny-sdxl]")
    ] = None,
    host: Annotated[str | None, _opt("listen address for gRPC and metrics [DEFT_HOST; 127.0.0.1]")] = None,
    port: Annotated[int | None, _opt("gRPC port [DEFT_PORT; 50051]")] = None,
    metrics_port: Annotated[
        int | None, _opt("Prometheus /metrics port, 0 = off [DEFT_METRICS_PORT; 9400]")
    ] = None,
    data_dir: Annotated[
        Path | None, _opt("adapter registry folder [DEFT_DATA_DIR; ~/.local/share/deft]")
    ] = None,
    registry: Annotated[
        str | None,
        _opt("shared registry: postgresql://USER:PASS@HOST/DB [DEFT_REGISTRY; SQLite in --data-dir]"),
    ] = None,
    cache_dir: Annotated[Path | None, _opt("tiny-model cache [DEFT_CACHE_DIR; ~/.cache/deft/models]")] = None,
    device: Annotated[str | None, _opt("auto | cpu | cuda | cuda:N [DEFT_DEVICE; auto]")] = None,
    dtype: Annotated[str | None, _opt("auto | float32 | float16 | bfloat16 [DEFT_DTYPE; auto]")] = None,
    backend: Annotated[
        str | None, _opt("adapter kernels: auto | torch | triton [DEFT_BACKEND; auto]")
    ] = None,
    token: Annotated[str | None, _opt("require 'authorization: Bearer TOKEN' [DEFT_TOKEN; none]")] = None,
    tls_cert: Annotated[Path | None, _opt("PEM certificate chain; enables TLS [DEFT_TLS_CERT]")] = None,
    tls_key: Annotated[Path | None, _opt("PEM private key of --tls-cert [DEFT_TLS_KEY]")] = None,
    adapter_memory: Annotated[
        str | None, _opt("device memory for adapter factors [DEFT_ADAPTER_MEMORY; 512MiB]")
    ] = None,
    adapter_host_memory: Annotated[
        str | None, _opt("host cache of adapter factors [DEFT_ADAPTER_HOST_MEMORY; 2GiB]")
    ] = None,
    max_rank: Annotated[int | None, _opt("largest adapter rank accepted [DEFT_MAX_RANK; 64]")] = None,
    max_resident_adapters: Annotated[
        int | None, _opt("adapters on the device at once [DEFT_MAX_RESIDENT_ADAPTERS; 64]")
    ] = None,
    max_batch_rows: Annotated[int | None, _opt("rows per denoiser forward [DEFT_MAX_BATCH_ROWS; 16]")] = None,
    max_active: Annotated[int | None, _opt("requests denoising at once [DEFT_MAX_ACTIVE; 32]")] = None,
    max_queue: Annotated[
        int | None, _opt("waiting requests before RESOURCE_EXHAUSTED [DEFT_MAX_QUEUE; 256]")
    ] = None,
    grace_period: Annotated[
        float | None, _opt("seconds in-flight requests get on SIGTERM [DEFT_GRACE_PERIOD; 30]")
    ] = None,
    max_pixels: Annotated[int | None, _opt("largest width x height [DEFT_MAX_PIXELS; 4194304]")] = None,
    max_steps: Annotated[int | None, _opt("most denoising steps [DEFT_MAX_STEPS; 150]")] = None,
    max_images: Annotated[int | None, _opt("most images per request [DEFT_MAX_IMAGES; 8]")] = None,
    max_prompt_chars: Annotated[int | None, _opt("longest prompt [DEFT_MAX_PROMPT_CHARS; 4000]")] = None,
    max_adapters_per_request: Annotated[
        int | None, _opt("most adapters per request [DEFT_MAX_ADAPTERS_PER_REQUEST; 4]")
    ] = None,
    max_adapter_weight: Annotated[
        float | None, _opt("weights must lie in [-W, W] [DEFT_MAX_ADAPTER_WEIGHT; 10]")
    ] = None,
    max_upload_size: Annotated[
        str | None, _opt("largest adapter upload [DEFT_MAX_UPLOAD_SIZE; 1GiB]")
    ] = None,
    max_message_size: Annotated[
        str | None, _opt("largest gRPC message received [DEFT_MAX_MESSAGE_SIZE; 16MiB]")
    ] = None,
    log_level: Annotated[str | None, _opt("DEBUG | INFO | WARNING | ERROR [DEFT_LOG_LEVEL; INFO]")] = None,
) -> None:
    """Start the gRPC server (health, reflection, Prometheus metrics); SIGTERM drains it and exits 0.

    Sizes accept units (512MiB, 2GiB) or plain bytes. Flags override DEFT_* environment variables.
    """
    overrides = {name: value for name, value in locals().items() if value is not None}  # the flags given
    from deft_server.app import main

    raise typer.Exit(main(overrides))


adapters_app = typer.Typer(help="Manage the adapters registered on a server.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

ServerOption = Annotated[
    str | None, typer.Option("--server", envvar="DEFT_SERVER", help="HOST:PORT (default: 127.0.0.1:50051)")
]
TokenOption = Annotated[str | None, typer.Option("--token", envvar="DEFT_TOKEN", help="the server's --token")]
TlsOption = Annotated[
    Path | None, typer.Option("--tls-ca", envvar="DEFT_TLS_CA", help="PEM root certificates (TLS)")
]


@contextlib.contextmanager
def _client(server: str | None, token: str | None, tls_ca: Path | None) -> Iterator[Any]:
    """A connected ``DeftClient``; a ``DeftError`` inside the block exits 1 with the server's message."""
    from deft_client import DeftClient, DeftError

    try:
        with DeftClient(server, token=token, root_certificates=tls_ca) as client:
            yield client
    except DeftError as e:
        raise _fail(e) from e


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
def adapters_register(
    name: Annotated[str, typer.Argument(help="registry name: letters, digits, '.', '_', '-'")],
    path: Annotated[
        Path, typer.Argument(help="PEFT directory, .safetensors LoRA file, or *.deft.safetensors")
    ],
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: TlsOption = None,
) -> None:
    """Upload an adapter; the server validates and compiles it against its base model."""
    with _client(server, token, tls_ca) as client:
        info = client.register_adapter(name, path)
    console.print(f"registered [bold]{escape(info.name)}[/]: {escape(_describe(info))}")


@adapters_app.command("list")
def adapters_list(server: ServerOption = None, token: TokenOption = None, tls_ca: TlsOption = None) -> None:
    """List the registered adapters."""
    with _client(server, token, tls_ca) as client:
        infos = client.list_adapters()
    table = Table("name", "kind", "ranks", "layers", "size", "state", "registered")
    for info in infos:
        kind = f"{info.kind} ({info.decomposition})" if info.decomposition else info.kind
        created = info.created_at.strftime("%Y-%m-%d %H:%M")
        ranks = ",".join(map(str, info.ranks))
        table.add_row(
            info.name, kind, ranks, str(info.target_count), _size(info.size_bytes), info.state, created
        )
    console.print(table)


@adapters_app.command("show")
def adapters_show(
    name: Annotated[str, typer.Argument(help="registry name")],
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: TlsOption = None,
) -> None:
    """Show everything the server knows about one adapter."""
    with _client(server, token, tls_ca) as client:
        info = client.get_adapter(name)
    for field, value in vars(info).items():  # plain lines: nothing truncated, easy to copy
        console.print(f"{field}: {value}", markup=False, highlight=False)


@adapters_app.command("delete")
def adapters_delete(
    name: Annotated[str, typer.Argument(help="registry name")],
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: TlsOption = None,
) -> None:
    """Delete an adapter (refused while running requests use it)."""
    with _client(server, token, tls_ca) as client:
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


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="what to draw")],
    out: Annotated[Path, typer.Option(help="FILE.png; with several images FILE_0.png, FILE_1.png, ...")],
    negative_prompt: Annotated[str | None, typer.Option(help="what to avoid")] = None,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME or NAME:WEIGHT (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: random)")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the model's)")] = None,
    width: Annotated[int | None, typer.Option(help="image width (default: the model's)")] = None,
    height: Annotated[int | None, typer.Option(help="image height (default: the model's)")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (default: the model's)")] = None,
    num_images: Annotated[int | None, typer.Option(help="images to generate (default: 1)")] = None,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: TlsOption = None,
) -> None:
    """Generate images on a server, with a progress bar, and write them as PNG files."""
    params = dict(
        negative_prompt=negative_prompt,
        adapters=[_parse_adapter(a) for a in adapter or []],
        seed=seed,
        steps=steps,
        width=width,
        height=height,
        guidance_scale=guidance,
        num_images=num_images,
    )
    with _client(server, token, tls_ca) as client:
        result = _stream_with_progress(client.generate_stream(prompt, timeout=timeout, **params))
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
    raise _fail(RuntimeError("the server ended the stream without a result"))


if __name__ == "__main__":
    app()
