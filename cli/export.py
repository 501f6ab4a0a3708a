"""``deft export-onnx``: the exporter (:mod:`deft_runtime.export.onnx`) with the server's registry
injected as the source of adapters given by name."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from deft_cli.console import console, err_console, fail
from deft_cli.options import DEFAULT_MODEL, model_option, with_options
from rich.markup import escape
from rich.table import Table

from deft_runtime.errors import AdapterNotFound, DeftError

if TYPE_CHECKING:
    from deft_runtime.adapter import Adapter
    from deft_runtime.export.onnx import ExportResult
    from deft_runtime.export.onnx.manifest import AdapterEntry

MIN_OPSET = 17  # deft_runtime.export.onnx.MIN_OPSET (not imported: --help stays fast)


@dataclass(frozen=True)
class RegistryAdapters:
    """Adapters by name from a deft registry: a shared one (``registry`` URL) or the SQLite registry
    in ``data_dir`` (default: the server's data folder). Needs the ``server`` extra."""

    data_dir: Path | None = None
    registry: str | None = None

    def _folder(self) -> Path:
        from deft_server.config import default_data_dir

        return Path(self.data_dir).expanduser() if self.data_dir is not None else default_data_dir()

    @property
    def location(self) -> str:
        if self.registry:
            return f"registry {self.registry}"
        try:
            return f"the registry in {self._folder()}"
        except ImportError:
            return "the registry"

    def __call__(self, name: str, unet_config: Mapping[str, Any] | None) -> Adapter:
        try:
            from deft_server.store import read_registered_adapter
        except ImportError as e:
            raise AdapterNotFound(
                f"the registry is not available here ({e}); install deft[server] or pass the adapter's path"
            ) from e
        folder = self._folder()
        if self.registry is None and not folder.is_dir():
            raise AdapterNotFound(f"{self.location} does not exist")
        return read_registered_adapter(name, data_dir=folder, registry=self.registry, unet_config=unet_config)


@dataclass(frozen=True)
class ExportFlags:
    """The options of ``deft export-onnx`` (an option group: see :mod:`deft_cli.options`)."""

    out: Annotated[
        Path, typer.Option(help="output folder (created; files of an earlier export are replaced)")
    ]
    model: Annotated[str, model_option()] = DEFAULT_MODEL
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME_OR_PATH or NAME_OR_PATH:WEIGHT, merged into the denoiser (repeatable). A path "
            "(PEFT dir, deft or LoRA .safetensors) if it exists, else a name in the registry"
        ),
    ] = None
    text_encoders: Annotated[
        bool, typer.Option("--text-encoders", help="also export both CLIP text encoders (SDXL)")
    ] = False
    vae_decoder: Annotated[bool, typer.Option("--vae-decoder", help="also export the VAE decoder")] = False
    opset: Annotated[int, typer.Option(help="ONNX opset, 17 to 20")] = MIN_OPSET
    validate: Annotated[
        bool,
        typer.Option(help="compare onnxruntime with torch at batch sizes 1 and 3; fail beyond tolerance"),
    ] = True
    tolerance: Annotated[
        float, typer.Option(help="pass if max|onnx - torch| <= TOLERANCE * max(1, max|torch|)")
    ] = 1e-4
    data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="DEFT_DATA_DIR", help="registry folder for adapter names (default: ~/.local/share/deft)"
        ),
    ] = None
    registry: Annotated[
        str | None,
        typer.Option(
            envvar="DEFT_REGISTRY",
            help="shared registry URL for adapter names (default: SQLite in --data-dir)",
        ),
    ] = None
    cache_dir: Annotated[
        Path | None,
        typer.Option(envvar="DEFT_CACHE_DIR", help="tiny-model cache (default: ~/.cache/deft/models)"),
    ] = None


@with_options(flags=ExportFlags)
def export_onnx_command(flags: ExportFlags) -> None:
    """Export the denoiser with adapters merged into its weights to ONNX, with a manifest.json.

    Float32, CPU. Batch, latent height/width and text length are dynamic axes (height/width must be
    multiples of the UNet's up-sampling factor: see the manifest). Every file is checked with
    onnxruntime against torch unless --no-validate; a file beyond --tolerance exits 1.

    Example: deft export-onnx --model tiny-sdxl --adapter ./dog-peft --adapter style:0.5 --out onnx/
    """
    f = flags
    if f.opset < MIN_OPSET:
        raise typer.BadParameter(
            f"opset {f.opset} is below {MIN_OPSET}, the lowest supported", param_hint="--opset"
        )
    from deft_runtime.export.onnx import ExportOptions, export_onnx

    with err_console.status("exporting") as status:

        def progress(message: str) -> None:
            status.update(escape(message))
            err_console.print(f"[dim]·[/] {escape(message)}")

        try:
            options = ExportOptions(
                text_encoders=f.text_encoders,
                vae_decoder=f.vae_decoder,
                opset=f.opset,
                validate=f.validate,
                tolerance=f.tolerance,
            )
            result = export_onnx(
                f.model,
                f.out,
                adapters=f.adapter or [],
                options=options,
                adapter_source=RegistryAdapters(f.data_dir, f.registry),
                cache_dir=f.cache_dir,
                progress=progress,
            )
        except DeftError as e:
            raise fail(e) from e
    _print_summary(result)


def _identity(adapter: AdapterEntry) -> str:
    """The sha256 the registry knows an adapter by: of the bytes uploaded (``deft adapters show``
    prints it; for a folder, the file in it that ``deft adapters register`` uploads). The manifest
    records it as ``source_sha256``, beside ``sha256``, a digest of the tensors."""
    from deft_files.folders import AdapterFolderError, adapter_in_folder
    from deft_runtime.export.onnx.adapters import file_sha256

    if adapter.origin == "registry":
        return f"sha256 {adapter.source_sha256} (of the registered bytes)"
    path = Path(adapter.location)
    with contextlib.suppress(AdapterFolderError, OSError):
        path = adapter_in_folder(path) if path.is_dir() else path
    if path.is_file():
        return f"sha256 {file_sha256(path)} (of the bytes of {path.name}, as a registry records it)"
    return (
        f"sha256 {adapter.source_sha256} (of its files' sha256 list; a registry hashes the tar it receives)"
    )


def _print_summary(result: ExportResult) -> None:
    manifest = result.manifest
    for a in manifest.adapters:
        console.print(
            f"merged [bold]{escape(a.source)}[/] x{a.weight:g}: {a.kind}, {a.layers} layers, "
            f"{escape(_identity(a))}",
            soft_wrap=True,
        )
    table = Table("file", "inputs", "outputs", "max abs error")
    for entry in manifest.files.values():
        error = entry.validation.max_abs_error if entry.validation else None
        table.add_row(
            escape(entry.path),
            escape("\n".join(f"{t.name} {t.shape}" for t in entry.inputs)),
            escape("\n".join(f"{t.name} {t.shape}" for t in entry.outputs)),
            "not checked" if error is None else f"{error:.2e}",
        )
    console.print(table)
    check = manifest.validation
    summary = (
        f"validated with onnxruntime at batch sizes {check.batch_sizes}: max abs error "
        f"{check.max_abs_error:.2e} (tolerance {check.tolerance:g} x max(1, |output|))"
        if check
        else "not validated (--no-validate)"
    )
    console.print(f"opset {manifest.opset}, {summary}")
    console.print(f"wrote {escape(str(result.manifest_path))}")
