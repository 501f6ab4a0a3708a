"""Base models: the built-in tiny pipelines and the loader that resolves any model name.

``tiny-sdxl`` and ``tiny-omnigen`` are seeded, random-weight pipelines of the real diffusers
architectures, used by the test suite and as the server's embedded default model; see
``deft_runtime.models.tiny`` for the adapter-target module names of each.
"""

from deft_runtime.models.loading import (
    TINY_MODEL_VERSION,
    architecture_of,
    default_cache_dir,
    denoiser_of,
    ensure_tiny_model,
    load_pipeline,
)
from deft_runtime.models.tiny import (
    TINY_MODELS,
    build_tiny_omnigen,
    build_tiny_sdxl,
    ensure_omnigen_support,
)

__all__ = [
    "TINY_MODELS",
    "TINY_MODEL_VERSION",
    "architecture_of",
    "build_tiny_omnigen",
    "build_tiny_sdxl",
    "default_cache_dir",
    "denoiser_of",
    "ensure_omnigen_support",
    "ensure_tiny_model",
    "load_pipeline",
]
