"""``POST /v1/images/edits`` against a real server process, through the real ``openai`` SDK.

Oracles: the same server's gRPC API (an HTTP edit equals the gRPC image-conditioned request for the
same inputs, pixel for pixel: the same process runs the same kernels), an RGBA mask equal to the
white-is-repaint mask it stands for, and the SDK's typed exceptions for errors.
"""

from __future__ import annotations

import base64
import io
import json

import httpx2
import numpy as np
import openai
import pytest
from deft_client import DeftClient
from deft_server.http_api.edits import openai_mask
from openai import OpenAI
from PIL import Image

TOKEN = "edit-s3cret"
FLAGS = ("--token", TOKEN, "--max-message-size", "1MiB", "--max-input-images", "2")
PARAMS = {"seed": 3, "steps": 3, "strength": 0.7}


def picture(seed: int, width: int = 48, height: int = 48, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(out, format="PNG")
    return out.getvalue()


def png_of(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def decoded(response) -> list[np.ndarray]:
    return [pixels(base64.b64decode(d.b64_json)) for d in response.data]


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start(*FLAGS)


@pytest.fixture(scope="module")
def grpc_client(server):
    with DeftClient(server.address, token=TOKEN, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(server) -> OpenAI:
    return OpenAI(base_url=f"{server.http_url}/v1", api_key=TOKEN, max_retries=0, timeout=300)


def post(server, **kwargs) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
    return httpx2.post(f"{server.http_url}/v1/images/edits", headers=headers, timeout=300, **kwargs)


# ---------------------------------------------------------------------------- the mask


def test_an_rgba_mask_is_converted_alpha_zero_to_white():
    rgba = np.zeros((8, 16, 4), dtype=np.uint8)
    rgba[..., :3] = 200  # the colour is ignored: only alpha counts
    rgba[:, :5, 3] = 0
    rgba[:, 5:, 3] = 1  # nearly transparent is kept (OpenAI edits only where alpha is 0)
    converted = Image.open(io.BytesIO(openai_mask(png_of(Image.fromarray(rgba, "RGBA")), 1 << 20)))
    assert converted.mode == "L" and converted.size == (16, 8)
    expected = np.zeros((8, 16), dtype=np.uint8)
    expected[:, :5] = 255
    assert np.array_equal(np.asarray(converted), expected)


def test_a_mask_without_alpha_and_a_non_image_are_sent_as_they_are():
    for data in (picture(0, mode="L"), picture(1, mode="RGB"), b"not an image"):
        assert openai_mask(data, 1 << 20) == data


# ---------------------------------------------------------------------------- edits


def test_img2img_edit_equals_the_grpc_request(sdk, grpc_client):
    image = picture(1)
    response = sdk.images.edit(
        image=("in.png", image, "image/png"), prompt="a red door", n=2, extra_body=PARAMS
    )
    assert response.size == "48x48" and response.output_format == "png"  # the input image's size
    got = decoded(response)
    assert len(got) == 2 and got[0].shape == (48, 48, 3) and not np.array_equal(got[0], got[1])
    want = grpc_client.generate("a red door", images=[image], num_images=2, **PARAMS)
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, np.asarray(w.convert("RGB")))
    other = sdk.images.edit(image=("in.png", picture(2), "image/png"), prompt="a red door", extra_body=PARAMS)
    assert not np.array_equal(decoded(other)[0], got[0])  # the input image is used


def test_inpainting_with_an_openai_mask_equals_grpc_with_the_white_mask(sdk, grpc_client):
    image = picture(4)
    alpha = np.full((48, 48), 255, dtype=np.uint8)
    alpha[8:40, 8:40] = 0  # transparent: edit here
    rgba = np.dstack([pixels(image), alpha])
    white = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")
    response = sdk.images.edit(
        image=("in.png", image, "image/png"),
        mask=("mask.png", png_of(Image.fromarray(rgba, "RGBA")), "image/png"),
        prompt="a cat",
        extra_body=PARAMS,
    )
    want = grpc_client.generate("a cat", images=[image], mask=white, **PARAMS)[0]
    assert np.array_equal(decoded(response)[0], np.asarray(want.convert("RGB")))
    unmasked = sdk.images.edit(image=("in.png", image, "image/png"), prompt="a cat", extra_body=PARAMS)
    assert not np.array_equal(decoded(unmasked)[0], decoded(response)[0])  # the mask is used


def test_form_extensions_reach_the_request(sdk, grpc_client):
    extras = {**PARAMS, "guidance_scale": 3.0, "negative_prompt": "blurry", "adapters": json.dumps([])}
    response = sdk.images.edit(
        image=("in.png", picture(5), "image/png"), prompt="a boat", size="64x64", extra_body=extras
    )
    want = grpc_client.generate(
        "a boat",
        images=[picture(5)],
        width=64,
        height=64,
        guidance_scale=3.0,
        negative_prompt="blurry",
        **PARAMS,
    )[0]
    assert response.size == "64x64"
    assert np.array_equal(decoded(response)[0], np.asarray(want.convert("RGB")))


# ---------------------------------------------------------------------------- refusals

IMAGE = ("image", ("in.png", picture(1), "image/png"))


@pytest.mark.parametrize(
    ("files", "data", "status", "says"),
    [
        ([], {"prompt": "x"}, 400, "no file 'image'"),
        ([("image", ("in.png", b"hello", "image/png"))], {"prompt": "x"}, 400, "not a PNG, JPEG or WebP"),
        ([IMAGE] * 3, {"prompt": "x"}, 400, "at most 2 input images"),
        ([IMAGE], {"prompt": "x", "colour": "red"}, 400, "unsupported field 'colour'"),
        ([IMAGE], {"prompt": "x", "size": "big"}, 400, "WIDTHxHEIGHT"),
        ([IMAGE], {"prompt": "x", "n": "two"}, 400, "'n': Input should be a valid integer"),
        ([IMAGE], {}, 400, "'prompt': Field required"),
        ([IMAGE], {"prompt": "x", "response_format": "url"}, 400, "b64_json"),
        ([IMAGE], {"prompt": "x", "stream": "true"}, 400, "leave 'stream'"),
        ([IMAGE], {"prompt": "x", "adapters": "[{"}, 400, "adapters must be a JSON list"),
        ([IMAGE], {"prompt": "x", "strength": "1.5"}, 400, "strength must be a number in (0, 1]"),
        ([IMAGE, ("image", ("big.png", b"\0" * (1 << 20), "image/png"))], {"prompt": "x"}, 413, "limit of"),
    ],
)
def test_bad_edits_are_refused_saying_what_to_fix(server, files, data, status, says):
    fields = [(k, (None, v.encode())) for k, v in data.items()]
    response = post(server, files=fields + files)  # multipart even without a file
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_a_body_without_content_length_is_cut_at_the_limit(server, sdk):
    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * (64 << 10)

    response = post(server, content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "limit of 1048576 bytes" in response.json()["error"]["message"]
    assert post(server, json={"prompt": "x"}).status_code == 400  # JSON is not the edit's shape
    with pytest.raises(openai.BadRequestError, match="not a PNG"):
        sdk.images.edit(image=("x.png", b"GIF", "image/png"), prompt="x")
    assert sdk.images.edit(image=("in.png", picture(1), "image/png"), prompt="x", extra_body=PARAMS).data
