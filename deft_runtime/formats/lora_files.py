"""Single-file LoRA checkpoints: diffusers (``pytorch_lora_weights.safetensors``) and kohya (``lora_unet_…``).

Conversion of the many community layouts (kohya/A1111, SGM block names, the old attention-processor
keys) is delegated to diffusers' own ``lora_state_dict`` and ``convert_unet_state_dict_to_peft``, so
deft accepts exactly what diffusers accepts; the result is PEFT-style keys which
:func:`deft_runtime.formats.peft.lora_from_tensors` turns into layers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from deft_files.text_encoder_keys import describe_dropped, dropped_layers, text_encoder_prefix
from deft_runtime.adapter import Adapter, AdapterKind
from deft_runtime.errors import AdapterFormatError, AdapterShapeError, shorten
from deft_runtime.formats.fields import MAX_ALPHA, finite, parse_json
from deft_runtime.formats.peft import lora_from_config, lora_from_tensors, strip_prefix
from deft_runtime.formats.safetensors_io import DEFAULT_LIMITS, ReadLimits, read_safetensors
from deft_runtime.validation import validate_structure, validate_tensors

#: diffusers stores the LoraConfig of each component under this safetensors metadata key.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
#: ``Adapter.metadata`` key recording what ``denoiser_only`` dropped (kept in a converted file)
DROPPED_METADATA_KEY = "dropped_text_encoder_layers"


def _to_peft_keys(
    tensors: dict[str, torch.Tensor], unet_config: Mapping[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """PEFT-style tensors and module → alpha, from any layout diffusers understands."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    _check_alphas(tensors)
    try:
        state, network_alphas = StableDiffusionXLPipeline.lora_state_dict(
            dict(tensors), unet_config=unet_config
        )
        state = convert_unet_state_dict_to_peft(state)
        # network alphas are keyed like their `down` tensor + ".alpha"; convert the key the same way.
        alpha_keys = {k.removesuffix(".alpha"): torch.tensor(v) for k, v in (network_alphas or {}).items()}
        converted_alphas = convert_unet_state_dict_to_peft(alpha_keys) if alpha_keys else {}
    except (ValueError, KeyError, RuntimeError, IndexError) as e:
        raise AdapterFormatError(
            f"not a LoRA layout diffusers can read: {shorten(str(e), 300, quote=False)}"
        ) from e
    alphas = {strip_prefix(k).removesuffix(".lora_A.weight"): float(v) for k, v in converted_alphas.items()}
    return state, alphas


def _check_alphas(tensors: Mapping[str, torch.Tensor]) -> None:
    """kohya ``<module>.alpha`` tensors: one finite number each, within ``±MAX_ALPHA``."""
    for key, t in tensors.items():
        if key.endswith(".alpha"):
            if t.numel() != 1:
                raise AdapterShapeError(
                    f"{shorten(key)}: alpha must be a single number, found shape {tuple(t.shape)}"
                )
            finite(float(t.reshape(()).float()), f"alpha {shorten(key)}", MAX_ALPHA)


def lora_from_single_file(
    tensors: dict[str, torch.Tensor],
    metadata: Mapping[str, str],
    unet_config: Mapping[str, Any] | None = None,
    *,
    denoiser_only: bool = False,
) -> Adapter:
    """A LoRA :class:`Adapter` from the tensors and metadata of a diffusers or kohya file.

    Text-encoder layers are refused, or with ``denoiser_only`` left out: the adapter's metadata then
    says which (:data:`DROPPED_METADATA_KEY`), and the caller warns about them.
    """
    source_format = "kohya" if any(k.startswith("lora_unet_") for k in tensors) else "diffusers"
    dropped: dict[str, int] = {}
    if denoiser_only:
        dropped = dropped_layers(tensors)
        tensors = {k: t for k, t in tensors.items() if text_encoder_prefix(k) is None}
        if dropped and not tensors:
            raise AdapterFormatError(
                f"the file holds only {describe_dropped(dropped)}; deft applies adapters to the denoiser"
            )
    config = _diffusers_lora_config(metadata)
    if config is not None:
        adapter = lora_from_config(tensors, config)
    else:
        state, alphas = _to_peft_keys(tensors, unet_config)
        layers = lora_from_tensors(state, alphas.get)
        adapter = Adapter(kind=AdapterKind.LORA, layers=layers)
    adapter.metadata["source_format"] = source_format
    if dropped:
        adapter.metadata[DROPPED_METADATA_KEY] = describe_dropped(dropped)
    validate_structure(adapter)
    validate_tensors(adapter)
    return adapter


def _diffusers_lora_config(metadata: Mapping[str, str]) -> dict[str, object] | None:
    """The denoiser's LoraConfig that diffusers stored in the file, if any (keys ``unet.r`` …)."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    packed = parse_json(raw, f"{DIFFUSERS_METADATA_KEY} metadata")
    if not isinstance(packed, dict):
        raise AdapterFormatError(f"{DIFFUSERS_METADATA_KEY} must be a JSON object, found {shorten(packed)}")
    for prefix in ("unet.", "transformer."):
        config = {k[len(prefix) :]: v for k, v in packed.items() if k.startswith(prefix)}
        if config:
            return config
    return packed if "r" in packed else None


def load_lora_file(
    path: str | os.PathLike[str],
    limits: ReadLimits = DEFAULT_LIMITS,
    unet_config: Mapping[str, Any] | None = None,
) -> Adapter:
    """Read a diffusers or kohya LoRA ``.safetensors`` file (``unet_config`` maps SGM block names)."""
    tensors, metadata = read_safetensors(path, limits)
    return lora_from_single_file(tensors, metadata, unet_config)
