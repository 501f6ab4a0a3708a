"""The request rules that need the model: one home, applied once at submission.

Structural checks (types, finiteness of weights and guidance, label length) are
:meth:`GenerationRequest.validate`; here the model's defaults are filled in and the request is checked
against the model: image size, input images (:meth:`ModelFamily.check_conditioning`), rows per forward (through :meth:`ModelFamily.rows_for`, the same rule the
scheduler plans with) and adapters per sample (:func:`deft_runtime.batch.check_blend`, the same rule the
batch mapping enforces).
"""

from __future__ import annotations

import dataclasses
import random

from deft_runtime.batch import check_blend
from deft_runtime.engine.families import ModelFamily
from deft_runtime.engine.types import GenerationRequest
from deft_runtime.errors import InvalidRequest


def resolve_request(
    request: GenerationRequest, family: ModelFamily, *, max_rows: int, max_adapters: int
) -> GenerationRequest:
    """``request`` validated, with every ``None`` field replaced by the model's default and a seed."""
    request.validate()
    defaults = family.defaults()
    default_width, default_height = family.default_size(request)
    width, height = request.width or default_width, request.height or default_height
    family.check_size(width, height)
    # an explicit 0.0 is a real value (no CFG), not "unset"
    guidance = request.guidance_scale if request.guidance_scale is not None else defaults.guidance_scale
    resolved = dataclasses.replace(
        request,
        width=width,
        height=height,
        num_inference_steps=request.num_inference_steps or defaults.steps,
        guidance_scale=guidance,
        seed=request.seed if request.seed is not None else random.randrange(2**63),
    )
    family.check_conditioning(resolved)
    rows = family.rows_for(resolved)
    if rows > max_rows:
        raise InvalidRequest(
            f"{request.num_images} images need {rows} rows per step, above this server's "
            f"max batch of {max_rows} rows; ask for fewer images"
        )
    check_blend(len(request.adapters), max_adapters, "the request")
    return resolved
