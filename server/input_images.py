"""The input images of an image-conditioned request: PNG, JPEG or WebP bytes decoded into PIL images,
bounded before a pixel is decoded.

The format is recognised from the first bytes and only that decoder is tried (no other Pillow plugin
sees the data); the size comes from the file's header (``Image.open`` reads no pixels) and is refused
past the server's ``max_input_image_pixels``, so a small file declaring a huge image (a decompression
bomb) costs nothing. Then the pixels are decoded, EXIF-rotated as diffusers' ``load_image`` does, and
converted: input images to RGB, the mask to "L". Decoding is CPU work: callers run it off the event
loop. Every problem is an :class:`InvalidRequest` that names the image, what is wrong and what to do.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from PIL import Image, ImageOps

from deft_runtime.errors import InvalidRequest, shorten

#: the first bytes of each accepted format → Pillow's format name
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
#: formats recognised only to say that they are refused
_REFUSED = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_ACCEPTED = "PNG, JPEG or WebP"
#: what Pillow raises for bad or truncated data (its parsers are not strict about which)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error)


def image_format(data: bytes) -> str | None:
    """The accepted format of ``data`` from its signature, or None."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _not_accepted(data: bytes, label: str) -> InvalidRequest:
    for signature, name in _REFUSED:
        if data.startswith(signature):
            return InvalidRequest(
                f"{label} is a {name} image; this server reads {_ACCEPTED}: convert it to PNG"
            )
    return InvalidRequest(
        f"{label} is not a {_ACCEPTED} image (its first bytes are {data[:8].hex(' ') or 'none'}); "
        "send the image file's bytes"
    )


def decode_image(data: bytes, label: str, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """``data`` (PNG, JPEG or WebP bytes) as a PIL image in ``mode``; ``label`` names it in errors
    (``input_images[1]``). At most ``max_pixels`` pixels, checked from the header before decoding."""
    if not data:
        raise InvalidRequest(f"{label} is empty; send the bytes of a {_ACCEPTED} file")
    fmt = image_format(data)
    if fmt is None:
        raise _not_accepted(data, label)
    with _decoding(label, fmt, max_pixels):
        image = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
    with image:
        _check_size(image.width, image.height, label, max_pixels)
        with _decoding(label, fmt, max_pixels):
            image.load()
            return ImageOps.exif_transpose(image).convert(mode)


@contextmanager
def _decoding(label: str, fmt: str, max_pixels: int) -> Iterator[None]:
    """Pillow's errors of bad data as :class:`InvalidRequest` naming the image."""
    try:
        yield
    except Image.DecompressionBombError:  # Pillow's own ceiling, met before ours is checked
        raise InvalidRequest(
            f"{label} declares an image far larger than this server accepts (at most {max_pixels} "
            "pixels, --max-input-image-pixels); resize it"
        ) from None
    except Image.UnidentifiedImageError:
        raise InvalidRequest(
            f"{label} starts like a {fmt} file but its header cannot be read (corrupt or cut short); "
            "send the complete file"
        ) from None
    except _DECODE_ERRORS as e:
        reason = shorten(str(e) or type(e).__name__, quote=False)
        raise InvalidRequest(
            f"{label} is a corrupt or truncated {fmt} file ({reason}); send the complete file"
        ) from None


def _check_size(width: int, height: int, label: str, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise InvalidRequest(f"{label} is {width}x{height}: an image needs at least one pixel")
    if width * height > max_pixels:
        raise InvalidRequest(
            f"{label} is {width}x{height} = {width * height} pixels; this server accepts at most "
            f"{max_pixels} (--max-input-image-pixels): resize it"
        )


def decode_input_images(
    images: Sequence[bytes], mask: bytes | None, max_images: int, max_pixels: int
) -> tuple[tuple[Image.Image, ...], Image.Image | None]:
    """The RGB input images and the "L" mask (None when not sent) of a request, the count checked
    before anything is decoded."""
    if len(images) > max_images:
        raise InvalidRequest(
            f"{len(images)} input images sent; this server accepts at most {max_images} per request "
            "(--max-input-images)"
        )
    if mask is not None and not images:
        raise InvalidRequest("mask_image needs the input image it masks; send one input image with it")
    decoded = tuple(decode_image(data, f"input_images[{i}]", max_pixels) for i, data in enumerate(images))
    return decoded, None if mask is None else decode_image(mask, "mask_image", max_pixels, "L")
