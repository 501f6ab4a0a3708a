"""Between ``deft.v1`` messages and the engine's and registry's types; request limits are checked here.

The PNG encoders do CPU work: callers run them off the event loop.
"""

from __future__ import annotations

import io
import math
from typing import Any

from deft_client.proto import adapters_pb2, generation_pb2
from deft_server.config import RequestLimits
from deft_server.registry import AdapterState, UploadFormat
from deft_server.store import AdapterRecord
from google.protobuf import timestamp_pb2

from deft_runtime.engine import EventKind, GenerationEvent, GenerationRequest, GenerationResult
from deft_runtime.errors import InvalidRequest

#: The base model's defaults: (width, height, steps, guidance_scale).
Defaults = tuple[int, int, int, float]
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
        if not ref.name:
            raise InvalidRequest("an adapter reference has an empty name")
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
    pixels = (width or defaults[0]) * (height or defaults[1])
    if pixels > limits.max_pixels:
        raise InvalidRequest(
            f"width x height is {pixels} pixels; this server allows at most {limits.max_pixels}"
        )
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise InvalidRequest(f"guidance_scale must be a finite number ≥ 0, got {guidance}")
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
    )


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
    )
