"""Which tensors of a LoRA file belong to a text encoder, and how a warning names those left out.

Pure Python (no torch), so the client can use it on a file's safetensors header before uploading it
(``register_adapter(..., denoiser_only=True)``) exactly as ``deft_runtime.formats.lora_files`` does
when it reads one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: Key prefixes of text-encoder layers: kohya/A1111 (SD 1.x, SDXL's two encoders), diffusers and PEFT.
TEXT_ENCODER_PREFIXES = (
    *("lora_te_", "lora_te1_", "lora_te2_"),
    *("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2."),
)


def text_encoder_prefix(key: str) -> str | None:
    """The text-encoder prefix ``key`` starts with, or None for a denoiser tensor."""
    return next((p for p in TEXT_ENCODER_PREFIXES if key.startswith(p)), None)


def _layer_of(key: str) -> str:
    """The layer a LoRA tensor belongs to: its key without ``.lora_down.weight``, ``.lora_A.weight``,
    ``.lora.up.weight``, ``.alpha`` …"""
    return key.removesuffix(".alpha").rsplit(".lora", 1)[0]


def dropped_layers(keys: Iterable[str]) -> dict[str, int]:
    """How many text-encoder layers ``keys`` hold, by prefix (sorted; empty when none)."""
    layers: dict[str, set[str]] = {}
    for key in keys:
        if (prefix := text_encoder_prefix(key)) is not None:
            layers.setdefault(prefix, set()).add(_layer_of(key))
    return {prefix: len(names) for prefix, names in sorted(layers.items())}


def describe_dropped(dropped: Mapping[str, int]) -> str:
    """``36 text-encoder layers (lora_te1_: 24, lora_te2_: 12)``."""
    parts = ", ".join(f"{prefix}: {count}" for prefix, count in dropped.items())
    return f"{sum(dropped.values())} text-encoder layers ({parts})"
