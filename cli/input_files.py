"""The input images of ``deft generate --image FILE [--image FILE2 ...] [--mask FILE]``: read and
checked before connecting (the file exists, can be read, is a PNG, JPEG or WebP image), one line
naming the flag for each problem. The server decodes and bounds them again (it trusts no client).

With ``--from-png`` of an image-conditioned PNG, the record holds the sha256 of each input image, not
the image: the inputs must be given again, and a different one is a warning (the image will differ).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deft_cli.console import err_console, fail
from rich.markup import escape

if TYPE_CHECKING:
    from deft_client.png_info import GenerationRecord

#: what the server decodes (Pillow's format names)
ACCEPTED = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}


@dataclasses.dataclass(frozen=True)
class InputFiles:
    """The bytes of the ``--image`` files, in order, and of the ``--mask`` file."""

    images: tuple[bytes, ...] = ()
    mask: bytes | None = None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_image_file(path: Path, flag: str) -> bytes:
    """The bytes of ``path``, a PNG, JPEG or WebP file; a one-line error naming ``flag`` otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = path.expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise fail(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise fail(f"{flag} {path} is a folder; give an image file") from None
    except OSError as e:
        raise fail(f"cannot read {flag} {path}: {e.strerror or e}") from None
    try:
        with Image.open(path) as image:  # the header only
            fmt = image.format or "?"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise fail(f"{flag} {path} is not an image; give a PNG, JPEG or WebP file") from None
    if fmt not in ACCEPTED:
        raise fail(f"{flag} {path} is a {fmt} image; the server reads PNG, JPEG or WebP: convert it")
    return data


def read_inputs(request: Any, base: GenerationRecord | None) -> InputFiles:
    """The files of ``request.image`` and ``request.mask``; with ``base`` (a ``--from-png`` record of
    an image-conditioned request), the inputs it needs must be given again."""
    images = tuple(read_image_file(p, "--image") for p in request.image or [])
    mask = read_image_file(request.mask, "--mask") if request.mask is not None else None
    inputs = InputFiles(images, mask)
    if base is not None:
        _check_against(inputs, base)
    if not images:
        given = (
            ("--mask", mask),
            ("--strength", request.strength),
            ("--image-guidance", request.image_guidance),
        )
        for flag, value in given:
            if value is not None:
                raise fail(f"{flag} needs --image FILE: it applies to an input image")
    if request.strength is not None and not 0 < request.strength <= 1:  # False for NaN
        raise fail(
            f"--strength {request.strength:g} is out of range: give a number in (0, 1] (how much of --image "
            "is re-noised; 1: all of it)"
        )
    return inputs


def _check_against(inputs: InputFiles, base: GenerationRecord) -> None:
    """Refuse a ``--from-png`` repeat without the recorded inputs; warn when they differ."""
    if base.input_images and not inputs.images:
        raise fail(
            f"--from-png: the image was generated from {len(base.input_images)} input image(s) (sha256 "
            f"{', '.join(d[:12] for d in base.input_images)}); give them again with --image FILE"
        )
    if base.mask_image is not None and inputs.mask is None:
        raise fail(
            f"--from-png: the image was inpainted with a mask (sha256 {base.mask_image[:12]}); give it "
            "again with --mask FILE"
        )
    given = [sha256_hex(d) for d in inputs.images]
    mask = sha256_hex(inputs.mask) if inputs.mask is not None else None
    if base.input_images and (given != base.input_images or mask != base.mask_image):
        err_console.print(
            "[yellow]warning:[/] the input images differ from those the image was made from (sha256 "
            f"{escape(', '.join(d[:12] for d in base.input_images))} then, "
            f"{escape(', '.join(d[:12] for d in given))} now): the image will differ",
            soft_wrap=True,
        )
