"""``POST /v1/images/edits``: OpenAI's ``multipart/form-data`` edit request → a ``deft.v1``
``GenerateRequest`` with input images, answered like ``/v1/images/generations``.

The parts: ``image`` (one file; several as ``image[]`` or a repeated ``image``, in order), ``mask``
(optional) and text fields read as the generations body (:class:`ImageEditBody`: OpenAI's fields plus
deft's ``seed``, ``steps``, ``guidance_scale``, ``negative_prompt``, ``adapters`` as a JSON string,
``strength`` and ``image_guidance_scale``). The body is parsed as it arrives and kept in memory only up
to this server's ``--max-message-size`` (the gRPC limit on the very message it becomes); more image
files than ``--max-input-images``, a repeated field, an unknown field or a value of the wrong type is
refused before anything is generated. The images themselves are decoded and bounded by the gRPC servicer.

OpenAI's mask marks the area to edit with fully transparent pixels; deft's gRPC mask is white where
to repaint. A mask with an alpha channel is converted (alpha 0 → white, else black); a mask without
one (L or RGB) is sent as it is, white = repaint.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from deft_client.proto import generation_pb2
from deft_server.http_api import images
from deft_server.input_images import decode_image, image_format
from PIL import Image
from pydantic import field_validator, model_validator
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from deft_runtime.errors import InvalidRequest, shorten

IMAGE_PARTS, MASK_PART = ("image", "image[]"), "mask"
MAX_FIELD_BYTES = 64 << 10
MAX_TEXT_FIELDS = 32
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
USAGE = (
    "POST /v1/images/edits takes multipart/form-data: the file 'image' (several: 'image[]'), optionally "
    "the file 'mask', and text fields ('prompt', ...), e.g. curl -F image=@in.png -F prompt='a red door'"
)


class ImageEditBody(images.ImageGenerationBody):
    """The text fields of an edit, as strings from the form (converted like JSON values)."""

    strength: float | None = None
    image_guidance_scale: float | None = None

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters_json(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(
                f'adapters must be a JSON list like [{{"name": "style", "weight": 0.8}}], got {shorten(value)}'
            ) from None

    @model_validator(mode="after")
    def _no_stream(self) -> ImageEditBody:
        if self.stream or self.partial_images:
            raise ValueError("streaming edits is not supported: leave 'stream' and 'partial_images' out")
        return self


class EditForm:
    """Push parser state of one edit form: its text fields, image files and mask, bounded."""

    def __init__(self, boundary: bytes, max_images: int) -> None:
        self.fields: dict[str, str] = {}
        self.images: list[bytes] = []
        self.mask: bytes | None = None
        self.max_images = max_images
        self._header_name = self._header_value = self._disposition = b""
        self._part = ""
        self._value = bytearray()
        callbacks = {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._add("_header_name", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def _add(self, attribute: str, data: bytes) -> None:
        setattr(self, attribute, getattr(self, attribute) + data)

    def _begin(self) -> None:
        self._disposition, self._part, self._value = b"", "", bytearray()

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in IMAGE_PARTS and len(self.images) >= self.max_images:
            raise InvalidRequest(
                f"more than {self.max_images} image files: this server takes at most {self.max_images} "
                "input images per request (--max-input-images)"
            )
        if name == MASK_PART and self.mask is not None:
            raise InvalidRequest("the file 'mask' is sent twice; send one mask")
        if name not in (*IMAGE_PARTS, MASK_PART) and (
            name in self.fields or len(self.fields) >= MAX_TEXT_FIELDS
        ):
            raise InvalidRequest(f"form field {shorten(name)} is sent twice or there are too many fields")
        self._part = name

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        if self._part not in (*IMAGE_PARTS, MASK_PART) and len(self._value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"form field {shorten(self._part)} is longer than {MAX_FIELD_BYTES} bytes")

    def _end(self) -> None:
        if self._part in IMAGE_PARTS:
            self.images.append(bytes(self._value))
        elif self._part == MASK_PART:
            self.mask = bytes(self._value)
        else:
            self.fields[self._part] = self._value.decode("utf-8", "replace")
        self._value = bytearray()


async def read_form(content_type: str, body: AsyncIterator[bytes], max_images: int) -> EditForm:
    """The edit form of a request with ``content_type``, parsed as its ``body`` (bounded by the caller)
    arrives."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequest(USAGE)
    form = EditForm(options[b"boundary"], max_images)
    try:
        async for chunk in body:
            form.parser.write(chunk)
        form.parser.finalize()
    except MultipartParseError as e:
        raise InvalidRequest(f"the multipart body is malformed: {shorten(str(e))}") from None
    if not form.images:
        raise InvalidRequest("the edit has no file 'image': send the image to edit as the part 'image'")
    return form


def parse_fields(fields: dict[str, str]) -> ImageEditBody:
    """The text fields as an :class:`ImageEditBody`, or :class:`InvalidRequest` saying what to fix."""
    return images.validate(ImageEditBody, fields)


def openai_mask(data: bytes, max_pixels: int) -> bytes:
    """An OpenAI mask as deft's (blocking): with alpha, alpha 0 → white (repaint), else black, as a
    PNG; without alpha (or not a readable image, which the servicer then refuses), ``data`` itself."""
    fmt = image_format(data)
    if fmt is None:
        return data
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as probe:  # the header only
            has_alpha = probe.mode in _ALPHA_MODES or "transparency" in probe.info
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return data
    if not has_alpha:
        return data
    alpha = np.asarray(decode_image(data, "mask", max_pixels, mode="RGBA").getchannel("A"))
    out = io.BytesIO()
    Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L").save(out, format="PNG")
    return out.getvalue()


def edit_request(
    form: EditForm, body: ImageEditBody, adapter: str | None, max_pixels: int
) -> generation_pb2.GenerateRequest:
    """The ``GenerateRequest`` a gRPC client would send for the edit (blocking: may convert the mask)."""
    msg = images.generate_request(body, adapter, default_steps=0)
    msg.input_images.extend(form.images)
    if form.mask is not None:
        msg.mask_image = openai_mask(form.mask, max_pixels)
    for field, value in (("strength", body.strength), ("image_guidance_scale", body.image_guidance_scale)):
        if value is not None:
            setattr(msg, field, value)
    return msg
