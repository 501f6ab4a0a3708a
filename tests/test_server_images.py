"""Image-conditioned generation through real ``deft serve`` processes over loopback gRPC: SDXL img2img
and inpainting (with registered adapters) against diffusers' pipelines (+PEFT), mixed with a
text-to-image request from client threads; an image sent as a PIL image, a path or bytes; hostile
inputs refused with INVALID_ARGUMENT while the server keeps serving; and an OmniGen edit against
diffusers' ``OmniGenPipeline``. Same inputs → the same image within 2/255."""

from __future__ import annotations

import io
import struct
import threading
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from deft_client import DeftClient, DeftError, Progress, Result
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_engine import as_array
from test_image_conditioning import (
    EDIT,
    make_adapters,
    omnigen_reference,
    picture,
    sdxl_reference,
    square_mask,
)

TOL = 2 / 255
MAX_IMAGES = 2
#: the requests of the tests below, as client keywords (steps, not num_inference_steps)
IMG2IMG = dict(prompt="a dog on a beach", strength=0.6, steps=6, guidance_scale=5.0, seed=3)
INPAINT = dict(prompt="a red ball", strength=0.8, steps=5, guidance_scale=5.0, seed=4)
MIXED_I2I = dict(prompt="a fox", strength=0.7, steps=40, guidance_scale=5.0, seed=11, num_images=2)
TEXT = dict(prompt="a cat", steps=4, guidance_scale=5.0, seed=9)


def oracle_kwargs(spec: dict) -> dict:
    """A client request's keywords as diffusers' pipeline keywords."""
    spec = dict(spec)
    spec["num_inference_steps"] = spec.pop("steps")
    spec["num_images_per_prompt"] = spec.pop("num_images", 1)
    spec.pop("guidance_scale")  # sdxl_reference passes 5.0, as every spec here asks
    return spec


def max_diff(images, ref: np.ndarray) -> float:
    got = as_array([im.convert("RGB") for im in images])
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max())


# ---------------------------------------------------------------------------- SDXL server


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("image_adapters"))


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start("--max-input-images", str(MAX_IMAGES))


@pytest.fixture(scope="module")
def client(server, peft_dirs):
    with DeftClient(server.address, timeout=300) as c:
        for name, path in peft_dirs.items():
            c.register_adapter(name, path)
        yield c


def test_img2img_and_inpainting_over_grpc_match_diffusers(client, peft_dirs):
    image, mask = picture(0), square_mask()
    i2i = client.generate(images=image, adapters=["dog"], **IMG2IMG)
    inp = client.generate(images=[image], mask=mask, **INPAINT)
    i2i_ref = sdxl_reference(
        StableDiffusionXLImg2ImgPipeline, peft_dirs["dog"], image=image, **oracle_kwargs(IMG2IMG)
    )
    inp_ref = sdxl_reference(
        StableDiffusionXLInpaintPipeline,
        None,
        image=image,
        mask_image=mask,
        height=64,
        width=64,
        **oracle_kwargs(INPAINT),
    )
    assert max_diff(i2i, i2i_ref) <= TOL, f"img2img off by {max_diff(i2i, i2i_ref) * 255:.2f}/255"
    assert max_diff(inp, inp_ref) <= TOL, f"inpaint off by {max_diff(inp, inp_ref) * 255:.2f}/255"
    # the adapter and the input image both mattered
    plain = sdxl_reference(StableDiffusionXLImg2ImgPipeline, None, image=image, **oracle_kwargs(IMG2IMG))
    assert max_diff(i2i, plain) > 10 / 255


def _distinct_adapter_forwards(server) -> float:
    """Forwards so far that mixed more than one adapter (from the server's histogram)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    name = "deft_batch_distinct_adapters"
    return samples[(f"{name}_count", ())] - samples[(f"{name}_bucket", (("le", "1.0"),))]


def test_concurrent_img2img_inpaint_and_text_from_threads_match_diffusers(server, client, peft_dirs):
    """img2img (style, 2 images, 28 steps: a wide window) streams; inpainting (dog) and text-to-image
    join it mid-run."""
    image, mask = picture(2), square_mask()
    started = threading.Event()

    def streamed() -> list[Image.Image]:
        for event in client.generate_stream(images=image, adapters=["style"], **MIXED_I2I):
            if isinstance(event, Progress) and event.step == 1:
                started.set()
            if isinstance(event, Result):
                return event.images
        raise AssertionError("the stream ended without a result")

    def joining(**params) -> list[Image.Image]:
        assert started.wait(300), "the streamed request never made a step"
        return client.generate(**params)

    before = _distinct_adapter_forwards(server)
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(streamed),
            pool.submit(joining, images=image, mask=mask, adapters=["dog"], **INPAINT),
            pool.submit(joining, **TEXT),
        ]
        got = [f.result(timeout=600) for f in futures]
    assert _distinct_adapter_forwards(server) > before, "the requests never shared a forward"
    refs = [
        sdxl_reference(
            StableDiffusionXLImg2ImgPipeline, peft_dirs["style"], image=image, **oracle_kwargs(MIXED_I2I)
        ),
        sdxl_reference(
            StableDiffusionXLInpaintPipeline,
            peft_dirs["dog"],
            image=image,
            mask_image=mask,
            height=64,
            width=64,
            **oracle_kwargs(INPAINT),
        ),
        sdxl_reference(StableDiffusionXLPipeline, None, **oracle_kwargs(TEXT)),
    ]
    for label, images, ref in zip(("img2img", "inpaint", "text"), got, refs, strict=True):
        assert max_diff(images, ref) <= TOL, f"{label} off by {max_diff(images, ref) * 255:.2f}/255"


def test_an_image_as_pil_path_or_bytes_gives_the_same_pixels(client, tmp_path):
    path = tmp_path / "input.jpg"
    picture(5).save(path, format="JPEG", quality=80)  # the server decodes the JPEG the client sends
    with Image.open(path) as opened:
        decoded = opened.convert("RGB")  # sent PNG-encoded: the same pixels
    params = dict(prompt="a boat", strength=0.5, steps=4, seed=21)
    outputs = [
        np.asarray(client.generate(images=source, **params)[0])
        for source in (decoded, str(path), path, path.read_bytes())
    ]
    for other in outputs[1:]:
        assert np.array_equal(outputs[0], other)
    noise = np.asarray(client.generate(images=picture(6), **params)[0])
    assert not np.array_equal(outputs[0], noise)  # the input image reaches the output


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (IHDR, CRC fixed) declares ``width`` x ``height``: a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


GOOD = dict(prompt="a dog", steps=2, seed=1)
BAD_SDXL = [
    (dict(images=b"hello, not an image"), "input_images[0] is not a PNG, JPEG or WebP image"),
    (dict(images=[picture(0)] * (MAX_IMAGES + 1)), "3 input images sent; this server accepts at most 2"),
    (dict(images=png_declaring(5000, 5000)), "input_images[0] is 5000x5000 = 25000000 pixels"),
    (dict(images=png_declaring(40000, 40000)), "declares an image far larger than this server accepts"),
    (dict(images=picture(0), mask=square_mask(32)), "mask_image is 32x32 but the input image is 64x64"),
    (dict(images=[picture(0), picture(1)]), "SDXL takes one input image"),
    (dict(strength=0.5), "strength applies to img2img and inpainting; send an input image"),
    (dict(mask=square_mask()), "mask_image needs the input image it masks"),
    (dict(images=picture(0), image_guidance_scale=2.0), "image_guidance_scale applies to OmniGen"),
]


BAD_IDS = [
    *("not-an-image", "too-many", "too-many-pixels", "bomb", "mask-size", "two-images"),
    *("strength-alone", "mask-alone", "image-guidance"),
]


@pytest.mark.parametrize(("params", "message"), BAD_SDXL, ids=BAD_IDS)
def test_bad_image_inputs_are_invalid_argument_and_the_server_keeps_serving(client, params, message):
    with pytest.raises(DeftError) as info:
        client.generate(**{**GOOD, **params})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.message, info.value.message
    assert info.value.reason  # google.rpc.ErrorInfo came through
    assert len(info.value.message) < 400
    assert client.generate(images=picture(3), strength=0.5, **GOOD)[0].size == (64, 64)


# ---------------------------------------------------------------------------- OmniGen server


@pytest.fixture(scope="module")
def omnigen_client(server_factory):
    server = server_factory.start("--model", "tiny-omnigen")
    with DeftClient(server.address, timeout=300) as c:
        yield c


def test_omnigen_edit_over_grpc_matches_the_pipeline(omnigen_client):
    image = picture(3, 32)
    spec = dict(EDIT)
    got = omnigen_client.generate(
        spec.pop("prompt"),
        images=[image],
        seed=5,
        num_images=2,
        steps=spec.pop("num_inference_steps"),
        **spec,
    )
    ref = omnigen_reference(5, input_images=[image], num_images_per_prompt=2, **EDIT)
    assert max_diff(got, ref) <= TOL, f"off by {max_diff(got, ref) * 255:.2f}/255"


def test_omnigen_placeholders_must_match_the_images(omnigen_client):
    sizes = dict(width=32, height=32, steps=2, seed=1)
    with pytest.raises(DeftError) as info:
        omnigen_client.generate("<img><|image_2|></img> in red", images=[picture(0, 32)], **sizes)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "references images <img><|image_2|></img> but 1 input image(s) were sent" in info.value.message
    assert "none skipped" in info.value.message
    edited = omnigen_client.generate("<img><|image_1|></img> in red", images=[picture(0, 32)], **sizes)
    assert edited[0].size == (32, 32)
