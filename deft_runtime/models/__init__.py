"""Base models: the trained ``shapes-sdxl``, the built-in tiny pipelines, and the loader of any name.

``shapes-sdxl`` is a small SDXL-architecture model trained from scratch on the scene language of
``deft_runtime.scenes`` (weights committed under ``deft_runtime/models/shapes_sdxl/``); it is the
server's default model. ``tiny-sdxl`` and ``tiny-omnigen`` are seeded, random-weight pipelines of the real diffusers
architectures, used by tests that need random architectures; see
``deft_runtime.models.tiny`` for the adapter-target module names of each.
"""

from deft_runtime.models.loading import (
    TINY_MODEL_VERSION,
    architecture_of,
    builtin_model_names,
    default_cache_dir,
    denoiser_of,
    ensure_tiny_model,
    load_pipeline,
)
from deft_runtime.models.shapes import SHAPES_MODEL_DIR, SHAPES_MODEL_NAME, build_shapes_sdxl, shapes_defaults
from deft_runtime.models.tiny import (
    TINY_MODELS,
    build_tiny_omnigen,
    build_tiny_sdxl,
    ensure_omnigen_support,
)

__all__ = [
    "SHAPES_MODEL_DIR",
    "SHAPES_MODEL_NAME",
    "TINY_MODELS",
    "TINY_MODEL_VERSION",
    "architecture_of",
    "build_shapes_sdxl",
    "build_tiny_omnigen",
    "build_tiny_sdxl",
    "builtin_model_names",
    "default_cache_dir",
    "denoiser_of",
    "ensure_omnigen_support",
    "ensure_tiny_model",
    "load_pipeline",
    "shapes_defaults",
]
