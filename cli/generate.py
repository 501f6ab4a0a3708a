"""``deft generate``: one request to a server, its images written as PNG (with the parameters in text
chunks, :mod:`deft_client.png_info`), JPEG or WebP; ``--from-png`` repeats the request of an image.
``--image``/``--mask`` condition it on input images (:mod:`deft_cli.input_files`).

Everything a user can get wrong (the seed, the output files, the input files) is checked before the
request is sent."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from deft_cli.connection import Connection, connect
from deft_cli.console import console, err_console, fail
from deft_cli.input_files import InputFiles, read_inputs, sha256_hex
from deft_cli.options import with_options
from rich.markup import escape

if TYPE_CHECKING:
    from deft_client import DeftClient, Result
    from deft_client.png_info import GenerationRecord

MAX_SEED = 2**64 - 1  # the protocol's seed is a uint64
RANDOM_SEED = -1  # A1111's convention
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@dataclasses.dataclass(frozen=True)
class Request:
    """The generation parameters; ``None``: the server's default (or, with ``--from-png``, the image's)."""

    prompt: Annotated[str | None, typer.Option(help="what to draw (required unless --from-png)")] = None
    negative_prompt: Annotated[str | None, typer.Option(help="what to avoid")] = None
    adapter: Annotated[list[str] | None, typer.Option(help="NAME or NAME:WEIGHT (repeatable)")] = None
    seed: Annotated[int | None, typer.Option(help="0 to 2**64-1; -1: random (default: random)")] = None
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the model's)")] = None
    width: Annotated[int | None, typer.Option(help="image width (default: the model's)")] = None
    height: Annotated[int | None, typer.Option(help="image height (default: the model's)")] = None
    guidance: Annotated[float | None, typer.Option(help="guidance scale (default: the model's)")] = None
    num_images: Annotated[int | None, typer.Option(help="images to generate (default: 1)")] = None
    image: Annotated[
        list[Path] | None,
        typer.Option(
            help="input image, PNG/JPEG/WebP (repeatable): SDXL img2img or inpainting (one), "
            "OmniGen: the prompt's <img><|image_1|></img>, ... in order"
        ),
    ] = None
    mask: Annotated[
        Path | None, typer.Option(help="SDXL inpainting: mask the size of --image, white = repaint")
    ] = None
    strength: Annotated[
        float | None, typer.Option(help="SDXL img2img/inpainting: how much of --image is re-noised, (0, 1]")
    ] = None
    image_guidance: Annotated[
        float | None, typer.Option(help="OmniGen: how strongly to follow the --image (default: 1.6)")
    ] = None


@with_options(request=Request, connection=Connection)
def generate(
    out: Annotated[
        Path,
        typer.Option(help="FILE.png, .jpg or .webp; several images: FILE_0.png, FILE_1.png, ..."),
    ],
    request: Request,
    connection: Connection,
    from_png: Annotated[
        Path | None,
        typer.Option(help="repeat the request of a PNG written by deft generate; other flags override"),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing output files")] = False,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
) -> None:
    """Generate images on a server, with a progress bar, and write them (PNGs carry the parameters)."""
    base = _read_png(from_png) if from_png is not None else None
    chosen = _merged(request, base)
    count = base.num_images if base is not None and request.num_images is None else chosen.num_images or 1
    keep = [base.image_index] if base is not None and request.num_images is None else list(range(count))
    paths = checked_outputs(out, len(keep), overwrite=overwrite)
    inputs = read_inputs(chosen, base)
    assert chosen.prompt is not None  # _merged refuses a request without one
    with connect(connection) as client:
        adapters = _adapter_uses(client, chosen, base)
        options = dataclasses.replace(_options(chosen), images=inputs.images, mask=inputs.mask)
        result = _stream_with_progress(client.generate_stream(chosen.prompt, options, timeout=timeout))
    records = [_record(chosen, result, adapters, i, count, inputs) for i in range(len(result.images))]
    for path, index in zip(paths, keep, strict=True):
        _save(result.images[index], path, records[index])
    for warning in result.warnings:  # e.g. a prompt cut to the text encoder's 77 tokens
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    console.print(f"seed {result.seed}, {result.steps} steps in {result.total_seconds:.1f}s")
    if count > 1:
        console.print(
            f"the {count} images come from one generator seeded {result.seed}: image i is reproduced by "
            f"--seed {result.seed} --num-images {count} (its i-th image), or by --from-png FILE",
            soft_wrap=True,
        )


def checked_seed(seed: int | None) -> int | None:
    """The seed to send (None: the server picks one); a clear error for one out of range."""
    if seed is None or seed == RANDOM_SEED:
        return None
    if not 0 <= seed <= MAX_SEED:
        raise fail(f"--seed {seed} is out of range: give 0 to {MAX_SEED} (2**64-1), or -1 for a random seed")
    return seed


def output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def checked_outputs(out: Path, count: int, *, overwrite: bool) -> list[Path]:
    """The files to write, checked before generating: a known format, no folder in the way, no
    existing file unless ``overwrite``, a folder that exists (created) and can be written."""
    out = out.expanduser()
    if out.is_dir():
        raise fail(f"--out {out} is a folder; give a file name in it, e.g. --out {out / 'image.png'}")
    if out.suffix.lower() not in FORMATS:
        raise fail(f"--out {out}: the file name must end in .png, .jpg, .jpeg or .webp (the format)")
    paths = output_paths(out, count)
    if taken := [p for p in paths if p.exists() and not overwrite]:
        raise fail(f"{taken[0]} exists; pass --overwrite to replace it or choose another --out")
    if folders := [p for p in paths if p.is_dir()]:
        raise fail(f"{folders[0]} is a folder; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fail(f"cannot create the folder of --out {out}: {e.strerror or e}") from e
    if not os.access(out.parent, os.W_OK):
        raise fail(f"cannot write to {out.parent} (permission denied); choose another --out")
    return paths


def _read_png(path: Path) -> GenerationRecord:
    from deft_client.png_info import read_record

    try:
        return read_record(path.expanduser())
    except ValueError as e:
        raise fail(f"--from-png: {e}") from e


def _merged(request: Request, base: GenerationRecord | None) -> Request:
    """The flags given, the rest from ``base`` (the PNG's record); the seed checked."""
    seed = checked_seed(request.seed)
    if base is None:
        if request.prompt is None:
            raise fail("give --prompt (or --from-png FILE to repeat an image's request)")
        return dataclasses.replace(request, seed=seed)
    adapters = (
        request.adapter if request.adapter is not None else [f"{a.name}:{a.weight!r}" for a in base.adapters]
    )

    def pick(given: Any, recorded: Any) -> Any:
        return recorded if given is None else given

    return Request(
        prompt=pick(request.prompt, base.prompt),
        negative_prompt=pick(request.negative_prompt, base.negative_prompt),
        adapter=adapters,
        seed=base.seed if request.seed is None else seed,
        steps=pick(request.steps, base.steps),
        width=pick(request.width, base.width),
        height=pick(request.height, base.height),
        guidance=pick(request.guidance, base.guidance_scale),
        num_images=pick(request.num_images, base.num_images),
        image=request.image,
        mask=request.mask,
        strength=pick(request.strength, base.strength),
        image_guidance=pick(request.image_guidance, base.image_guidance_scale),
    )


def parse_adapter(spec: str) -> tuple[str, float]:
    name, sep, weight = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        return name, float(weight)
    except ValueError:
        raise typer.BadParameter(f"{spec!r}: expected NAME or NAME:WEIGHT with a number as WEIGHT") from None


def _options(request: Request) -> Any:
    from deft_client import GenerateOptions

    return GenerateOptions(
        negative_prompt=request.negative_prompt,
        adapters=[parse_adapter(a) for a in request.adapter or []],
        seed=request.seed,
        steps=request.steps,
        width=request.width,
        height=request.height,
        guidance_scale=request.guidance,
        num_images=request.num_images,
        strength=request.strength,
        image_guidance_scale=request.image_guidance,
    )


def _adapter_uses(client: DeftClient, request: Request, base: GenerationRecord | None) -> list[Any]:
    """Each adapter with the registry's sha256 (warns when it differs from the PNG's)."""
    from deft_client.png_info import AdapterUse

    recorded = {a.name: a.sha256 for a in base.adapters} if base is not None else {}
    uses = []
    for name, weight in (parse_adapter(a) for a in request.adapter or []):
        sha256 = client.get_adapter(name).sha256
        if recorded.get(name, sha256) != sha256:
            err_console.print(
                f"[yellow]warning:[/] adapter {escape(name)} changed since the image was made "
                f"(sha256 {recorded[name][:12]} then, {sha256[:12]} now): the image will differ",
                soft_wrap=True,
            )
        uses.append(AdapterUse(name, weight, sha256))
    return uses


def _record(
    request: Request, result: Result, adapters: list[Any], index: int, count: int, inputs: InputFiles
) -> GenerationRecord:
    from deft_client.png_info import GenerationRecord

    from deft_runtime import __version__

    image = result.images[index]
    return GenerationRecord(
        prompt=request.prompt or "",
        seed=result.seed,
        steps=result.steps,
        width=image.width,
        height=image.height,
        negative_prompt=request.negative_prompt,
        guidance_scale=result.guidance_scale if result.guidance_scale is not None else request.guidance,
        model=result.model or None,
        adapters=adapters,
        num_images=count,
        image_index=index,
        deft_version=__version__,
        input_images=[sha256_hex(data) for data in inputs.images],
        mask_image=None if inputs.mask is None else sha256_hex(inputs.mask),
        strength=request.strength,
        image_guidance_scale=request.image_guidance,
    )


def _save(image: Any, path: Path, record: GenerationRecord) -> None:
    fmt = FORMATS[path.suffix.lower()]
    if fmt == "PNG":
        image.save(path, format="PNG", pnginfo=record.png_info())
    else:
        image.convert("RGB").save(path, format=fmt, quality=95)
    console.print(f"wrote {escape(str(path))}", soft_wrap=True)


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
            elif isinstance(event, (Started, StepDone)):
                bar.update(
                    task,
                    description="denoising",
                    total=event.total_steps,
                    completed=getattr(event, "step", 0),
                )
            elif isinstance(event, Result):
                return event
    raise fail(RuntimeError("the server ended the stream without a result"))
