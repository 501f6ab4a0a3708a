"""The OpenAI-compatible HTTP API against real server processes, through the real ``openai`` SDK.

Oracles: the same server's gRPC API (an HTTP image equals the gRPC image for the same inputs, PNG
bytes and pixels), the SDK's own typed exceptions for errors, and the registry seen over gRPC.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import threading
import time

import httpx2
import numpy as np
import openai
import pytest
from deft_client import DeftClient
from openai import OpenAI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from deft_runtime.adapter import AdapterKind
from deft_runtime.base_view import BaseView
from deft_runtime.formats import save_adapter
from deft_runtime.models import build_tiny_sdxl
from deft_runtime.testing import random_adapter

TOKEN = "http-s3cret"
BASE = "tiny-sdxl"
FLAGS = ("--token", TOKEN, "--max-upload-size", "1MiB", "--max-images", "3", "--max-adapter-weight", "4")
STEPS = 3


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> list:
    shapes = BaseView(build_tiny_sdxl(0).unet).layer_shapes
    root = tmp_path_factory.mktemp("http-adapters")
    return [
        save_adapter(
            random_adapter(AdapterKind.DEFT, shapes, rank=2, seed=s, magnitude=1.0),
            root / f"a{s}.deft.safetensors",
        )
        for s in range(2)
    ]


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start(*FLAGS)


@pytest.fixture(scope="module")
def grpc_client(server, adapter_files):
    with DeftClient(server.address, token=TOKEN, timeout=300) as c:
        c.register_adapter("style", adapter_files[0])
        yield c


@pytest.fixture(scope="module")
def sdk(server, grpc_client) -> OpenAI:
    return OpenAI(base_url=f"{server.http_url}/v1", api_key=TOKEN, max_retries=0, timeout=300)


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def b64png(b64: str | None) -> bytes:
    assert b64 is not None
    return base64.b64decode(b64)


def http(server, method: str, path: str, **kwargs) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
    timeout = kwargs.pop("timeout", 300)
    return httpx2.request(method, server.http_url + path, headers=headers, timeout=timeout, **kwargs)


# ---------------------------------------------------------------------------- images


def test_http_image_equals_grpc_image(sdk, grpc_client):
    params = dict(seed=7, steps=STEPS, guidance_scale=4.0, negative_prompt="blurry")
    response = sdk.images.generate(
        model=f"{BASE}:style",
        prompt="a red house",
        size="64x64",
        response_format="b64_json",
        extra_body=params,
    )
    assert response.created > 0 and response.output_format == "png" and response.size == "64x64"
    (image,) = response.data
    assert image.revised_prompt is None and image.url is None
    over_http = b64png(image.b64_json)
    over_grpc = grpc_client.generate_result(
        "a red house", width=64, height=64, adapters=[("style", 1.0)], **params
    ).images[0]
    assert np.array_equal(pixels(over_http), np.asarray(over_grpc.convert("RGB")))
    # the adapter is applied (else the comparison above proves nothing about it) ...
    plain = sdk.images.generate(model=BASE, prompt="a red house", size="64x64", extra_body=params)
    assert not np.array_equal(pixels(b64png(plain.data[0].b64_json)), pixels(over_http))
    # ... and `adapters` with a weight is the same request as BASE:ADAPTER at weight 1
    weighted = sdk.images.generate(
        prompt="a red house",
        size="64x64",
        extra_body={**params, "adapters": [{"name": "style", "weight": 1.0}]},
    )
    assert b64png(weighted.data[0].b64_json) == over_http


def test_n_images_match_grpc_num_images(sdk, grpc_client):
    response = sdk.images.generate(prompt="two boats", n=2, extra_body={"seed": 11, "steps": STEPS})
    assert len(response.data) == 2
    first, second = (pixels(b64png(d.b64_json)) for d in response.data)
    assert not np.array_equal(first, second)
    expected = grpc_client.generate("two boats", num_images=2, seed=11, steps=STEPS)
    for got, want in zip((first, second), expected, strict=True):
        assert np.array_equal(got, np.asarray(want.convert("RGB")))


def test_streaming_sends_partial_images_then_the_final_image(sdk):
    params = {"seed": 5, "steps": 6}
    stream = sdk.images.generate(prompt="a lighthouse", stream=True, partial_images=2, extra_body=params)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events[:2]:
        with Image.open(io.BytesIO(b64png(event.b64_json))) as preview:
            assert preview.format == "PNG" and preview.width > 0
    completed = events[-1]
    assert completed.size == "64x64" and completed.output_format == "png" and completed.created_at > 0
    whole = sdk.images.generate(prompt="a lighthouse", extra_body=params)
    assert b64png(completed.b64_json) == b64png(whole.data[0].b64_json)  # previews do not change the image


def test_jpeg_and_webp_output_are_the_png_image_reencoded(sdk):
    """output_compression is the encoder's quality; the oracle is PIL encoding the PNG's pixels."""
    params = {"seed": 3, "steps": STEPS}
    png = b64png(sdk.images.generate(prompt="a tree", extra_body=params).data[0].b64_json)
    for fmt in ("jpeg", "webp"):
        response = sdk.images.generate(
            prompt="a tree", output_format=fmt, output_compression=80, extra_body=params
        )
        assert response.output_format == fmt
        expected = io.BytesIO()
        Image.fromarray(pixels(png)).save(expected, format=fmt.upper(), quality=80)
        assert b64png(response.data[0].b64_json) == expected.getvalue(), fmt


def requests_by_status(server) -> dict[str, float]:
    text = httpx2.get(server.metrics_url, timeout=30).text
    return {
        s.labels["status"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "deft_requests_total"
    }


def wait_for_cancelled(server, before: float) -> dict[str, float]:
    for _ in range(600):
        after = requests_by_status(server)
        if after.get("cancelled", 0.0) > before:
            break
        time.sleep(0.1)
    return after


def test_a_client_that_leaves_cancels_its_generation(server, sdk):
    """Like a cancelled gRPC call: the engine drops the request instead of denoising for nobody."""
    before = requests_by_status(server).get("cancelled", 0.0)
    body = {"prompt": "a long wait", "steps": 150}
    with pytest.raises(httpx2.TimeoutException):
        http(server, "POST", "/v1/images/generations", json=body, timeout=3)
    after = wait_for_cancelled(server, before)
    assert after.get("cancelled", 0.0) == before + 1, after
    stream = sdk.images.generate(
        prompt="a long wait", stream=True, partial_images=149, extra_body={"steps": 150}
    )
    assert next(iter(stream)).type == "image_generation.partial_image"
    stream.close()  # leaves mid-stream
    after = wait_for_cancelled(server, before + 1)
    assert after.get("cancelled", 0.0) == before + 2, after
    assert sdk.images.generate(prompt="next", extra_body={"steps": 1}).data  # the server carries on


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"response_format": "url"}, "b64_json"),
        ({"quality": "high"}, "steps"),
        ({"size": "big"}, "WIDTHxHEIGHT"),
        ({"n": 4}, "between 1 and 3"),
        ({"extra_body": {"adapters": [{"name": "style", "weight": 9.0}]}}, "[-4, 4]"),
        ({"extra_body": {"steps": "many"}}, "steps"),
        ({"extra_body": {"guidance_scale": -1}}, "guidance_scale"),
    ],
)
def test_bad_requests_are_400_with_what_to_fix(sdk, kwargs, says):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="x", **kwargs)
    assert info.value.status_code == 400 and says in info.value.message
    assert info.value.body["type"] == "invalid_request_error"


def test_errors_are_the_sdks_typed_exceptions(server, sdk):
    client = OpenAI(base_url=f"{server.http_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        client.images.generate(prompt="x")
    assert auth.value.status_code == 401 and auth.value.code == "unauthenticated"
    keyless = httpx2.post(f"{server.http_url}/v1/images/generations", json={"prompt": "x"})
    assert keyless.status_code == 401 and "Authorization: Bearer KEY" in keyless.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.images.generate(model=f"{BASE}:nope", prompt="x")
    assert missing.value.code == "adapter_not_found" and "nope" in missing.value.message
    with pytest.raises(openai.NotFoundError) as other:
        sdk.images.generate(model="dall-e-3", prompt="x")
    assert other.value.code == "model_not_found" and BASE in other.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("nope")  # not a route deft serves: still OpenAI's error shape


def test_a_huge_body_is_refused_before_it_is_read(server):
    response = http(server, "POST", "/v1/images/generations", content=b"{" + b" " * (2 << 20) + b"}")
    assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"


# ---------------------------------------------------------------------------- adapters and models


def test_adapter_upload_list_get_delete_over_http(server, sdk, grpc_client, adapter_files):
    data = adapter_files[1].read_bytes()
    fields = {"name": "over-http", "format": "safetensors", "metadata": json.dumps({"owner": "http"})}
    response = http(server, "POST", "/v1/adapters", data=fields, files={"file": ("a.safetensors", data)})
    assert response.status_code == 200, response.text
    adapter = response.json()
    assert adapter["id"] == adapter["name"] == "over-http" and adapter["state"] == "ready"
    assert adapter["sha256"] == hashlib.sha256(data).hexdigest() and adapter["metadata"] == {"owner": "http"}
    assert grpc_client.get_adapter("over-http").sha256 == adapter["sha256"]  # the same registry
    assert f"{BASE}:over-http" in [m.id for m in sdk.models.list()]
    assert http(server, "GET", "/v1/adapters/over-http").json()["ranks"] == [2]
    again = http(server, "POST", "/v1/adapters", data=fields, files={"file": ("a.safetensors", data)})
    assert again.status_code == 409 and again.json()["error"]["code"] == "adapter_exists"
    assert http(server, "DELETE", "/v1/adapters/over-http").json() == {
        "id": "over-http",
        "object": "adapter",
        "deleted": True,
    }
    gone = http(server, "GET", "/v1/adapters/over-http")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
    assert f"{BASE}:over-http" not in [m.id for m in sdk.models.list()]


def test_models_list_the_base_and_its_adapters(sdk):
    ids = [m.id for m in sdk.models.list()]
    assert ids[0] == BASE and f"{BASE}:style" in ids


def test_upload_errors_map_to_statuses(server):
    too_big = http(
        server, "POST", "/v1/adapters", data={"name": "big"}, files={"file": ("x", b"\0" * (3 << 19))}
    )
    assert too_big.status_code == 413, too_big.text
    late_name = http(
        server, "POST", "/v1/adapters", files=[("file", ("x", b"abc")), ("name", (None, "late"))]
    )
    assert late_name.status_code == 400 and "before the part 'file'" in late_name.json()["error"]["message"]
    junk = http(
        server, "POST", "/v1/adapters", data={"name": "junk"}, files={"file": ("x", b"not an adapter")}
    )
    assert junk.status_code == 400, junk.text
    assert http(server, "POST", "/v1/adapters", json={"name": "x"}).status_code == 400


def test_health_ready_and_the_playground_page(server):
    assert httpx2.get(server.http_url + "/health").json() == {"status": "ok"}
    assert httpx2.get(server.http_url + "/ready").json() == {"status": "ready", "model": BASE}
    page = httpx2.get(server.http_url + "/")
    assert page.status_code == 200 and "<title>deft playground</title>" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        text = httpx2.get(server.http_url + asset).text
        assert "http://" not in text and "https://" not in text  # works offline: nothing external
    assert "http://" not in page.text and "https://" not in page.text
    assert (
        "access-control-allow-origin"
        not in httpx2.get(server.http_url + "/health", headers={"Origin": "http://a.test"}).headers
    )


# ---------------------------------------------------------------------------- drain


def test_sigterm_drains_http_too(server_factory):
    """In flight: finishes with its image; new requests: 503 with Retry-After; then exit 0."""
    server = server_factory.start("--cors-origin", "http://app.test", "--grace-period", "120")
    cors = httpx2.get(server.http_url + "/health", headers={"Origin": "http://app.test"})
    assert cors.headers["access-control-allow-origin"] == "http://app.test"
    sdk = OpenAI(base_url=f"{server.http_url}/v1", api_key="none", max_retries=0, timeout=300)
    result: dict = {}
    stream = sdk.images.generate(prompt="slow", stream=True, partial_images=10, extra_body={"steps": 12})
    first = next(iter(stream))  # denoising has started
    assert first.type == "image_generation.partial_image"

    def finish() -> None:
        result["events"] = [first, *stream]

    reader = threading.Thread(target=finish)
    reader.start()
    server.send(signal.SIGTERM)
    for _ in range(200):
        if httpx2.get(server.http_url + "/ready").status_code == 503:
            break
        time.sleep(0.05)
    refused = httpx2.get(server.http_url + "/v1/models")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "not_ready"
    reader.join(300)
    assert result["events"][-1].type == "image_generation.completed"
    assert server.wait(120) == 0
