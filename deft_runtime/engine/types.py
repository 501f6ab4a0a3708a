"""Requests, events and results of the generation engine (no tensors, no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from deft_runtime.errors import DeftError, InvalidRequest

#: Longest client label (``GenerationRequest.request_id``) accepted; it is echoed in every event.
MAX_LABEL_CHARS = 128


class QueueFull(DeftError):
    """The engine's admission queue is full (maps to RESOURCE_EXHAUSTED)."""


class EngineDraining(DeftError):
    """The engine is shutting down and accepts no new requests (maps to UNAVAILABLE)."""


class RequestCancelled(DeftError):
    """The request was cancelled by its caller (maps to CANCELLED)."""


class DeadlineExceeded(DeftError):
    """The request's deadline passed before it finished (maps to DEADLINE_EXCEEDED)."""


class GenerationFailed(DeftError):
    """The request failed while running, e.g. its adapter produced NaN/Inf (maps to INVALID_ARGUMENT
    when the adapter is at fault, INTERNAL otherwise)."""


class AdapterOutputNotFinite(GenerationFailed):
    """The denoiser produced NaN/Inf for a request that uses adapters: its adapters (or their weights)
    are at fault, not the server (maps to INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One user request. ``None`` fields take the base model's defaults (see ``ModelFamily.defaults``).

    ``adapters`` are ``(name, weight)`` pairs blended into every image of the request (CFG rows
    included). ``deadline_s`` counts from submission. ``request_id`` is the client's label, echoed in
    events and the result (at most :data:`MAX_LABEL_CHARS` characters); it is never the engine's key,
    so two requests may share it (see :class:`~deft_runtime.engine.RequestHandle`).
    """

    prompt: str
    negative_prompt: str | None = None
    adapters: tuple[tuple[str, float], ...] = ()
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    preview_every_n_steps: int = 0
    deadline_s: float | None = None
    request_id: str = ""
    tenant: str = ""  # who asked (set by the server, not the client): admission is fair across tenants
    weight: float = 1.0  # the tenant's fair-share weight (> 0)
    #: image-conditioned generation (PIL images, decoded and bounded by the caller): SDXL takes one
    #: image (img2img, or inpainting with ``mask_image``, white = repaint); OmniGen takes the images its
    #: prompt references as ``<img><|image_1|></img>``, ... in order
    input_images: tuple[Any, ...] = ()
    mask_image: Any = None
    strength: float | None = None  # SDXL img2img / inpainting, in (0, 1]
    image_guidance_scale: float | None = None  # OmniGen with input images (default 1.6)

    def validate(self) -> None:
        """Structural checks that need no model (the engine checks sizes against the model)."""
        if not isinstance(self.prompt, str):
            raise InvalidRequest("prompt must be a string")
        if not isinstance(self.request_id, str) or len(self.request_id) > MAX_LABEL_CHARS:
            raise InvalidRequest(
                f"request_id must be a string of at most {MAX_LABEL_CHARS} characters; it is only a "
                "label for your logs (the server gives every request its own id)"
            )
        if self.num_images < 1:
            raise InvalidRequest(f"num_images must be ≥ 1, got {self.num_images}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise InvalidRequest(f"num_inference_steps must be ≥ 1, got {self.num_inference_steps}")
        if self.guidance_scale is not None and not math.isfinite(self.guidance_scale):
            raise InvalidRequest("guidance_scale must be a finite number")
        if self.preview_every_n_steps < 0:
            raise InvalidRequest("preview_every_n_steps must be ≥ 0")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise InvalidRequest("deadline_s must be > 0")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise InvalidRequest(f"weight must be a finite number > 0, got {self.weight}")
        for name, weight in self.adapters:
            if not math.isfinite(weight):
                raise InvalidRequest(f"adapter {name!r}: weight must be a finite number, got {weight}")
        self._validate_images()
        names = [n for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise InvalidRequest("an adapter is listed twice; give each adapter once with its weight")

    def _validate_images(self) -> None:
        if self.mask_image is not None and not self.input_images:
            raise InvalidRequest("mask_image needs the input image it masks; send one input image with it")
        if self.strength is not None:
            if not self.input_images:
                raise InvalidRequest(
                    "strength applies to img2img and inpainting; send an input image with it"
                )
            if not (math.isfinite(self.strength) and 0 < self.strength <= 1):
                raise InvalidRequest(f"strength must be a number in (0, 1], got {self.strength}")
        if self.image_guidance_scale is not None and not math.isfinite(self.image_guidance_scale):
            raise InvalidRequest("image_guidance_scale must be a finite number")


class EventKind(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    PREVIEW = "preview"
    RESULT = "result"
    FAILED = "failed"


@dataclass(frozen=True)
class GenerationEvent:
    """What a request's ``on_event`` callback receives, in order: queued, started, progress/preview per
    step, then exactly one of result or failed."""

    kind: EventKind
    request_id: str
    step: int = 0
    total_steps: int = 0
    queue_position: int = 0
    preview: Any = None  # PIL.Image for PREVIEW
    result: GenerationResult | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    images: list[Any]  # PIL.Image.Image
    seed: int
    queue_seconds: float
    total_seconds: float
    steps: int
    guidance_scale: float | None = None  # as used (the model's default when the request left it out)
