"""``POST /v1/images/generations``: OpenAI's request body → a ``deft.v1`` ``GenerateRequest``, and the
finished images → OpenAI's response (or its server-sent events).

The body is translated into the very message a gRPC client sends, then handed to the gRPC servicer,
so every limit and message is the one gRPC users get (``n`` is ``num_images`` there, ``steps`` is
``num_inference_steps``). The body itself is bounded here: its size, its fields (an unknown or
unsupported OpenAI field is refused, naming what to do), and each value's type.
"""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Any, Literal, TypeVar

from deft_client.proto import generation_pb2
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from deft_runtime.errors import InvalidRequest, shorten

INT32_MAX, UINT64_MAX = 2**31 - 1, 2**64 - 1
#: the largest JSON body accepted (prompts are bounded far below this by --max-prompt-chars)
MAX_BODY_BYTES = 1 << 20
_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")
#: OpenAI fields deft refuses, with what to do instead
REFUSED = {
    "quality": "deft has no quality presets; set 'steps' (and 'guidance_scale') instead",
    "style": "deft has no style presets; describe the style in the prompt or pick an adapter",
    "moderation": "deft does not moderate prompts; leave 'moderation' out",
    "complexity": "not supported by deft; leave it out",
    "frame_count": "deft generates still images; leave it out",
    "frame_duration_ms": "deft generates still images; leave it out",
    "svg": "deft generates raster images; leave it out",
    "effort": "not supported by deft; leave it out",
    "input_fidelity": "deft has no fidelity presets; set 'strength' (img2img, inpainting) instead",
}


B = TypeVar("B", bound=BaseModel)


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=128)
    weight: float = 1.0


class ImageGenerationBody(BaseModel):
    """OpenAI's ``images.generate`` body as deft reads it (``None``: left out)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=INT32_MAX)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["auto", "opaque"] | None = None
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=INT32_MAX)
    user: str | None = None
    safety_identifier: str | None = None
    # deft's extensions
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    steps: int | None = Field(None, ge=1, le=INT32_MAX)
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    adapters: list[AdapterWeight] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _no_url(self) -> ImageGenerationBody:
        if self.response_format == "url":
            raise ValueError(
                "response_format 'url' is not supported: deft does not host image files; use "
                "response_format 'b64_json' (the default) and decode the base64 PNG"
            )
        return self

    @property
    def format(self) -> str:
        return self.output_format or "png"


def _problem(error: ErrorDetails, model: type[BaseModel]) -> str:
    field = ".".join(str(p) for p in error["loc"]) or "body"
    if error["type"] == "extra_forbidden" and len(error["loc"]) > 1:
        return f"unsupported field {shorten(field)}: each of 'adapters' is {{'name': ..., 'weight': ...}}"
    if error["type"] == "extra_forbidden":
        fix = REFUSED.get(field, f"deft reads {', '.join(model.model_fields)}")
        return f"unsupported field {shorten(field)}: {fix}"
    if error["type"] == "value_error":
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return f"{shorten(field)}: {error['msg']}"


def parse_body(raw: bytes) -> ImageGenerationBody:
    """The body of ``raw`` JSON, or :class:`InvalidRequest` saying which field to fix."""
    try:
        return ImageGenerationBody.model_validate_json(raw)
    except ValidationError as e:
        raise _invalid(e, ImageGenerationBody) from None


def validate(model: type[B], data: dict[str, Any]) -> B:
    """``data`` (e.g. form fields) as ``model``, or :class:`InvalidRequest` saying which field to fix."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _invalid(e, model) from None


def _invalid(error: ValidationError, model: type[BaseModel]) -> InvalidRequest:
    return InvalidRequest("; ".join(_problem(err, model) for err in error.errors(include_url=False)[:5]))


def split_model(model: str | None, base: str) -> str | None:
    """The adapter named by ``model`` (``BASE`` → None, ``BASE:ADAPTER`` → ``ADAPTER``); None for None."""
    if model is None or model == base:
        return None
    if model.startswith(base + ":") and len(model) > len(base) + 1:
        return model[len(base) + 1 :]
    raise LookupError(
        f"model {shorten(model)} is not served here: use {base!r}, or {base + ':ADAPTER'!r} for a "
        "registered adapter at weight 1 (GET /v1/models lists them)"
    )


def _size(size: str | None) -> tuple[int, int] | None:
    if size is None or size == "auto":
        return None
    match = _SIZE.fullmatch(size)
    if match is None:
        raise InvalidRequest(f"size {shorten(size)} is not WIDTHxHEIGHT (e.g. '1024x1024') or 'auto'")
    return int(match[1]), int(match[2])


def preview_every(partial_images: int, steps: int) -> int:
    """Denoising steps between previews so that up to ``partial_images`` arrive before the end."""
    return 0 if partial_images <= 0 else max(1, steps // (partial_images + 1))


def generate_request(
    body: ImageGenerationBody, adapter: str | None, default_steps: int
) -> generation_pb2.GenerateRequest:
    """The ``GenerateRequest`` a gRPC client would send for ``body`` (``adapter``: from ``model``)."""
    msg = generation_pb2.GenerateRequest(prompt=body.prompt, num_images=body.n)
    if adapter is not None:
        msg.adapters.add(name=adapter, weight=1.0)
    for ref in body.adapters:
        msg.adapters.add(name=ref.name, weight=ref.weight)
    size = _size(body.size)
    if size is not None:
        msg.width, msg.height = size
    for field, value in (
        ("negative_prompt", body.negative_prompt),
        ("num_inference_steps", body.steps),
        ("guidance_scale", body.guidance_scale),
        ("seed", body.seed),
    ):
        if value is not None:
            setattr(msg, field, value)
    if body.stream and body.partial_images:
        msg.preview_every_n_steps = preview_every(body.partial_images, body.steps or default_steps)
    return msg


def encoded(png: bytes, body: ImageGenerationBody) -> str:
    """``png`` (the bytes gRPC sends) in the requested format, base64 (blocking: re-encodes)."""
    if body.format == "png":
        return base64.b64encode(png).decode()
    quality = 100 if body.output_compression is None else body.output_compression
    out = io.BytesIO()
    with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").save(out, format=body.format.upper(), quality=quality)
    return base64.b64encode(out.getvalue()).decode()


def warnings_field(result: generation_pb2.Result) -> dict[str, list[str]]:
    """deft's addition to OpenAI's bodies: ``warnings`` (e.g. a truncated prompt), only when there are any."""
    return {"warnings": list(result.warnings)} if result.warnings else {}


def images_response(result: generation_pb2.Result, body: ImageGenerationBody) -> dict[str, Any]:
    """OpenAI's ``ImagesResponse`` for a finished request (blocking: may re-encode)."""
    first = result.images[0]
    return {
        "created": int(time.time()),
        "data": [{"b64_json": encoded(image.png, body)} for image in result.images],
        "background": "opaque",
        "output_format": body.format,
        "size": f"{first.width}x{first.height}",
        **warnings_field(result),
    }


def stream_event(kind: str, b64: str, size: str, body: ImageGenerationBody, **extra: Any) -> dict[str, Any]:
    """One event of OpenAI's image stream (``image_generation.partial_image`` / ``.completed``)."""
    return {
        "type": f"image_generation.{kind}",
        "b64_json": b64,
        "created_at": int(time.time()),
        "size": size,
        "quality": "auto",
        "background": "opaque",
        "output_format": body.format,
        **extra,
    }
