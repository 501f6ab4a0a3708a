"""Input images of image-conditioned requests, decoded by the server (deft_server.input_images through
convert.generation_request): every bad input is an InvalidRequest naming the image and the problem,
refused before its pixels are decoded; the client's three kinds of source arrive as the same image."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from deft_client.wire import generate_request
from deft_server.config import ServerSettings
from deft_server.convert import generation_request
from PIL import Image

from deft_runtime.engine.families import GenerationDefaults
from deft_runtime.errors import InvalidRequest

LIMITS = ServerSettings().request_limits()
DEFAULTS = GenerationDefaults(64, 64, 50, 5.0)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes whose header declares ``width`` x ``height`` (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))


def convert(**params):
    return generation_request(generate_request("a", **params), LIMITS, DEFAULTS, None)


RED = Image.new("RGB", (16, 8), (255, 0, 0))
PNG = encoded(RED)
NOISE = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"images": [b"hello world"]}, r"input_images\[0\] is not a PNG, JPEG or WebP image"),
        ({"images": [PNG, encoded(RED, "GIF")]}, r"input_images\[1\] is a GIF image"),
        ({"images": [NOISE[: len(NOISE) // 2]]}, r"input_images\[0\] is a corrupt or truncated PNG"),
        ({"images": [PNG[:40]]}, r"input_images\[0\] starts like a PNG file but its header cannot be read"),
        ({"images": [encoded(RED, "JPEG")[:200]]}, r"corrupt or truncated JPEG"),
        ({"images": [PNG] * 5}, r"5 input images sent; this server accepts at most 4"),
        ({"images": [png_declaring(3000, 2000)]}, r"3000x2000 = 6000000 pixels; .* at most 4194304"),
        ({"images": [png_declaring(100000, 100000)]}, r"far larger than this server accepts"),
        ({"images": [PNG], "strength": 0.0}, r"strength must be a number in \(0, 1\]"),
        ({"images": [PNG], "strength": 1.5}, r"strength must be a number in \(0, 1\]"),
        ({"images": [PNG], "strength": float("nan")}, r"strength must be a number in \(0, 1\]"),
        ({"strength": 0.5}, r"strength applies to img2img and inpainting"),
        ({"mask": PNG}, r"mask_image needs the input image"),
        ({"images": [PNG], "mask": b""}, r"mask_image is empty"),
        ({"images": [PNG], "image_guidance_scale": float("inf")}, r"image_guidance_scale must be"),
    ],
)
def test_bad_input_images_are_refused_naming_the_problem(params, message):
    with pytest.raises(InvalidRequest, match=message):
        convert(**params)


def test_pil_path_and_bytes_arrive_as_the_same_image(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(PNG)
    requests = [convert(images=[source], strength=0.8) for source in (RED, path, str(path), PNG)]
    for request in requests:
        (image,) = request.input_images
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(RED))
        assert request.strength == 0.8 and request.mask_image is None
    masked = convert(images=[RED], mask=Image.new("RGBA", (16, 8), (255, 255, 255, 255)))
    assert masked.mask_image.mode == "L" and np.asarray(masked.mask_image).min() == 255
    assert convert().input_images == () and convert().strength is None
