"""Between ``deft.v1`` messages and the engine's and registry's types; request limits are checked here.

Every field of a request is bounded before anything echoes it or does work for it: names (1-128
characters), ``request_id`` (at most :data:`MAX_REQUEST_ID_CHARS`), prompts, sizes, steps, finite
weights and guidance within the server's limits, input images (:mod:`deft_server.input_images`) by
count and pixels before they are decoded. Decoding input images and the PNG encoders do CPU work:
callers run them off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Callable
from typing import Any

from deft_client.proto import adapters_pb2, generation_pb2
from deft_server.config import RequestLimits
from deft_server.input_images import decode_input_images
from deft_server.registry import AdapterState, UploadFormat
from deft_server.store import AdapterRecord
from deft_server.tenants import PUBLIC, pool_name, split_pool_name, validate_tenant_id
from deft_server.uploads import validate_name
from google.protobuf import timestamp_pb2

from deft_runtime.engine import EventKind, GenerationEvent, GenerationRequest, GenerationResult
from deft_runtime.engine.families import GenerationDefaults
from deft_runtime.errors import InvalidRequest, shorten

#: The base model's defaults (width, height, steps, guidance_scale).
Defaults = GenerationDefaults
_STATES = {
    AdapterState.READY: adapters_pb2.ADAPTER_STATE_READY,
    AdapterState.RESIDENT: adapters_pb2.ADAPTER_STATE_RESIDENT,
    AdapterState.INCOMPATIBLE: adapters_pb2.ADAPTER_STATE_INCOMPATIBLE,
}
UPLOAD_FORMATS = {
    adapters_pb2.UPLOAD_FORMAT_UNSPECIFIED: None,
    adapters_pb2.UPLOAD_FORMAT_SAFETENSORS: UploadFormat.SAFETENSORS,
    adapters_pb2.UPLOAD_FORMAT_PEFT_TAR: UploadFormat.PEFT_TAR,
}
#: the client's request_id is only a label for its own logs; it is echoed in every event
MAX_REQUEST_ID_CHARS = 128
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
#: a ListAdapters page stops growing past this many bytes (clients' default message limit is 4 MiB)
MAX_PAGE_BYTES = 1 << 20
_PAGE_TOKEN_PREFIX = b"deft.v1/adapters/after:"


def _optional(message: Any, field: str) -> Any:
    return getattr(message, field) if message.HasField(field) else None


def _in_range(name: str, value: int | None, low: int, high: int, fix: str) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}, got {value}{fix}")


def _check_prompt(name: str, text: str | None, limits: RequestLimits) -> None:
    if text is not None and len(text) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"{name} is {len(text)} characters long; this server accepts at most {limits.max_prompt_chars}"
        )


def _adapters(msg: generation_pb2.GenerateRequest, limits: RequestLimits) -> tuple[tuple[str, float], ...]:
    if len(msg.adapters) > limits.max_adapters:
        raise InvalidRequest(
            f"{len(msg.adapters)} adapters requested; this server blends at most {limits.max_adapters} per request"
        )
    pairs = []
    for ref in msg.adapters:
        weight = ref.weight if ref.HasField("weight") else 1.0
        validate_name(ref.name)
        if not (math.isfinite(weight) and abs(weight) <= limits.max_adapter_weight):
            raise InvalidRequest(
                f"adapter {ref.name!r}: weight must be a finite number in "
                f"[-{limits.max_adapter_weight:g}, {limits.max_adapter_weight:g}], got {weight}"
            )
        pairs.append((ref.name, weight))
    return tuple(pairs)


def generation_request(
    msg: generation_pb2.GenerateRequest, limits: RequestLimits, defaults: Defaults, deadline_s: float | None
) -> GenerationRequest:
    """The engine request for ``msg``; unset fields stay None (the engine fills the model's defaults)."""
    _check_prompt("prompt", msg.prompt, limits)
    negative = _optional(msg, "negative_prompt")
    _check_prompt("negative_prompt", negative, limits)
    width, height, steps = (
        _optional(msg, "width"),
        _optional(msg, "height"),
        _optional(msg, "num_inference_steps"),
    )
    images, every = _optional(msg, "num_images"), _optional(msg, "preview_every_n_steps")
    guidance = _optional(msg, "guidance_scale")
    _in_range("num_inference_steps", steps, 1, limits.max_steps, "")
    _in_range("num_images", images, 1, limits.max_images, "")
    _in_range("preview_every_n_steps", every, 0, limits.max_steps, " (0: no previews)")
    for name, side in (("width", width), ("height", height)):
        _in_range(name, side, 1, limits.max_pixels, "")
    pixels = (width or defaults.width) * (height or defaults.height)
    if pixels > limits.max_pixels:
        raise InvalidRequest(
            f"width x height is {pixels} pixels; this server allows at most {limits.max_pixels}"
        )
    if guidance is not None and not 0 <= guidance <= limits.max_guidance_scale:  # False for NaN
        raise InvalidRequest(
            f"guidance_scale must be a number in [0, {limits.max_guidance_scale:g}], got {guidance:g}"
        )
    _check_conditioning(msg, limits)
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(
            f"request_id is {len(msg.request_id)} characters long; at most {MAX_REQUEST_ID_CHARS} are "
            "accepted (it is a label echoed in every event)"
        )
    return GenerationRequest(
        prompt=msg.prompt,
        negative_prompt=negative,
        adapters=_adapters(msg, limits),
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=_optional(msg, "seed"),
        num_images=images or 1,
        preview_every_n_steps=every or 0,
        deadline_s=deadline_s,
        request_id=msg.request_id,
        **_conditioning(msg, limits),
    )


def _check_conditioning(msg: generation_pb2.GenerateRequest, limits: RequestLimits) -> None:
    """The numbers of an image-conditioned request (its images are checked as they are decoded)."""
    strength, scale = _optional(msg, "strength"), _optional(msg, "image_guidance_scale")
    if strength is not None and not 0 < strength <= 1:  # False for NaN
        raise InvalidRequest(
            f"strength must be a number in (0, 1] (how much of the input image is re-noised; 1: all of "
            f"it), got {strength:g}"
        )
    if strength is not None and not msg.input_images:
        raise InvalidRequest("strength applies to img2img and inpainting; send an input image with it")
    if scale is not None and not 0 <= scale <= limits.max_guidance_scale:
        raise InvalidRequest(
            f"image_guidance_scale must be a number in [0, {limits.max_guidance_scale:g}], got {scale:g}"
        )


def _conditioning(msg: generation_pb2.GenerateRequest, limits: RequestLimits) -> dict[str, Any]:
    """The decoded input images and mask and the numbers that go with them (blocking: decoding)."""
    images, mask = decode_input_images(
        msg.input_images,
        _optional(msg, "mask_image"),
        limits.max_input_images,
        limits.max_input_image_pixels,
    )
    return {
        "input_images": images,
        "mask_image": mask,
        "strength": _optional(msg, "strength"),
        "image_guidance_scale": _optional(msg, "image_guidance_scale"),
    }


def encode_png(image: Any) -> bytes:
    """PNG bytes of a PIL image (blocking)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def result_message(result: GenerationResult) -> generation_pb2.Result:
    """The ``Result`` of a finished request, its images PNG-encoded (blocking)."""
    images = [
        generation_pb2.Image(png=encode_png(im), width=im.width, height=im.height) for im in result.images
    ]
    return generation_pb2.Result(
        images=images,
        seed=result.seed,
        steps=result.steps,
        queue_seconds=result.queue_seconds,
        total_seconds=result.total_seconds,
        guidance_scale=result.guidance_scale,  # None (unset) when the engine did not say
    )


def event_message(event: GenerationEvent) -> generation_pb2.GenerateEvent | None:
    """The stream message of an engine event (None for FAILED, which ends the RPC with a status)."""
    msg = generation_pb2.GenerateEvent(request_id=event.request_id)
    if event.kind is EventKind.QUEUED:
        msg.queued.position = event.queue_position
    elif event.kind is EventKind.STARTED:
        msg.started.total_steps = event.total_steps
    elif event.kind is EventKind.PROGRESS:
        msg.progress.step, msg.progress.total_steps = event.step, event.total_steps
    elif event.kind is EventKind.PREVIEW:
        msg.preview.step, msg.preview.total_steps = event.step, event.total_steps
        msg.preview.png = encode_png(event.preview)
    elif event.kind is EventKind.RESULT and event.result is not None:
        msg.result.CopyFrom(result_message(event.result))
    else:
        return None
    return msg


def adapter_message(record: AdapterRecord, state: AdapterState, reason: str) -> adapters_pb2.Adapter:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(record.created_at * 1e9))
    return adapters_pb2.Adapter(
        name=record.name,
        kind=record.kind,
        decomposition=record.decomposition,
        ranks=list(record.ranks),
        target_count=record.target_count,
        size_bytes=record.size_bytes,
        sha256=record.sha256,
        created_at=created,
        state=_STATES[state],
        source_format=record.source_format,
        metadata=record.metadata,
        compiled_bytes=record.compiled_bytes,
        state_reason=reason,
        owner="" if record.owner == PUBLIC else record.owner,
    )


# ---------------------------------------------------------------------------- ListAdapters pages


def page_size(request: adapters_pb2.ListAdaptersRequest) -> int:
    """The page size asked for: 0 → the default, above the maximum → the maximum."""
    if request.page_size < 0:
        raise InvalidRequest(
            f"page_size must be ≥ 0 (0: the default, {DEFAULT_PAGE_SIZE}), got {request.page_size}"
        )
    return min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def page_token(last_name: str) -> str:
    return base64.urlsafe_b64encode(_PAGE_TOKEN_PREFIX + last_name.encode()).decode()


def page_after(token: str) -> str:
    """The adapter (pool name ``owner/name``) a ``page_token`` continues after ("" for the first page);
    refuses forged tokens."""
    if not token:
        return ""
    try:
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        if raw.startswith(_PAGE_TOKEN_PREFIX):  # after the pool name owner/name
            owner, name = split_pool_name(raw[len(_PAGE_TOKEN_PREFIX) :].decode())
            return pool_name(owner if owner == PUBLIC else validate_tenant_id(owner), validate_name(name))
    except (UnicodeError, binascii.Error, InvalidRequest):
        pass
    raise InvalidRequest(
        f"page_token {shorten(token)} is not one this server issued: pass the previous response's "
        "next_page_token unchanged, or leave it empty for the first page"
    )


def adapters_page(
    records: list[AdapterRecord], size: int, describe: Callable[[AdapterRecord], adapters_pb2.Adapter]
) -> adapters_pb2.ListAdaptersResponse:
    """A page of up to ``size`` of ``records`` (which holds one more when more follow), cut short
    at :data:`MAX_PAGE_BYTES`, with the token of the next page when it is not the last."""
    reply = adapters_pb2.ListAdaptersResponse()
    total = 0
    for record in records[:size]:
        message = describe(record)
        total += message.ByteSize()
        if reply.adapters and total > MAX_PAGE_BYTES:
            break
        reply.adapters.append(message)
    if len(reply.adapters) < len(records):
        last = reply.adapters[-1]
        reply.next_page_token = page_token(pool_name(last.owner or PUBLIC, last.name))
    return reply
