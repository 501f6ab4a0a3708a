"""LoRA adapters written for PEFT (a ``LoraConfig`` directory) and for diffusers
(``pytorch_lora_weights.safetensors``, loadable by ``pipe.load_lora_weights``).

A deft LoRA layer is ``ΔW = s·up·down``; PEFT's is
``(lora_alpha / r)·lora_B·lora_A``. So ``lora_A = down``, ``lora_B = up`` and each layer's alpha is
``s·r``. The most common rank and alpha become the config's ``r`` and ``lora_alpha``; other layers go
to ``rank_pattern`` / ``alpha_pattern``, keyed by their full module name with dots escaped (plain keys,
which deft looks up in linear time), anchored with ``^`` only where one layer's name ends with another's.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch

from deft_runtime.adapter import Adapter, AdapterKind
from deft_runtime.errors import AdapterFormatError
from deft_runtime.formats.lora_files import DIFFUSERS_METADATA_KEY
from deft_runtime.formats.peft import write_dir_atomic
from deft_runtime.formats.safetensors_io import write_safetensors_atomic

#: the file name ``pipe.load_lora_weights(folder)`` looks for
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
T = TypeVar("T")
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_", "time_", "add_")


def _require_lora(adapter: Adapter, target: str) -> None:
    if adapter.kind is not AdapterKind.LORA:
        mode = f"/{adapter.decomposition.value}" if adapter.decomposition else ""
        raise AdapterFormatError(
            f"{target} holds LoRA adapters; this is a {adapter.kind.value}{mode} adapter. Export DEFT "
            "adapters with --to peft (relu and qr modes) or keep deft's own format."
        )


def _pattern_key(name: str, names: Mapping[str, object]) -> str:
    """A key PEFT (``re.match(rf"(.*\\.)?({key})$", module)``) matches to ``name`` alone: the name with
    its dots escaped, anchored at the start only when another layer's name ends with ``.name``."""
    key = re.escape(name)
    return f"^{key}" if any(other.endswith(f".{name}") for other in names) else key


def _pattern(values: Mapping[str, T], default: T) -> dict[str, T]:
    """PEFT's rank_pattern / alpha_pattern: the layers whose value is not the default."""
    return {_pattern_key(name, values): v for name, v in sorted(values.items()) if v != default}


def lora_config(adapter: Adapter) -> dict[str, object]:
    """The ``LoraConfig`` fields that reproduce ``adapter``'s ranks and scales exactly."""
    _require_lora(adapter, "a LoraConfig")
    ranks = adapter.ranks
    alphas = {name: layer.scale * ranks[name] for name, layer in adapter.layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": _pattern(ranks, r),
        "alpha_pattern": _pattern(alphas, alpha),
        "target_modules": sorted(adapter.layers),
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
    }


def _factors(adapter: Adapter, prefix: str) -> dict[str, torch.Tensor | None]:
    tensors: dict[str, torch.Tensor | None] = {}
    for name, layer in adapter.layers.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = layer.down  # [r, d_in]
        tensors[f"{prefix}{name}.lora_B.weight"] = layer.up  # [d_out, r]
    return tensors


def save_lora_peft_dir(
    adapter: Adapter, path: str | os.PathLike[str], *, base_model_name_or_path: str | None = None
) -> Path:
    """Write a PEFT LoRA directory: ``PeftModel.from_pretrained(denoiser, path)`` loads it."""
    config = {
        **lora_config(adapter),
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
        "task_type": None,
    }
    return write_dir_atomic(Path(path), config, _factors(adapter, "base_model.model."))


def denoiser_component(adapter: Adapter) -> str:
    """``unet`` for a UNet's module names, else ``transformer`` (the key prefix diffusers expects)."""
    return "unet" if any(name.startswith(_UNET_ROOTS) for name in adapter.layers) else "transformer"


def save_diffusers_lora(adapter: Adapter, path: str | os.PathLike[str]) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` into the folder ``path`` (or to ``path`` itself when it
    ends in ``.safetensors``), with the LoraConfig diffusers reads back, so
    ``pipe.load_lora_weights(path)`` reproduces deft's ranks and scales."""
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / DIFFUSERS_WEIGHTS_NAME
    component = denoiser_component(adapter)
    config = {f"{component}.{k}": v for k, v in lora_config(adapter).items() if k != "peft_type"}
    metadata = {DIFFUSERS_METADATA_KEY: json.dumps(config, sort_keys=True)}
    tensors = {k: v for k, v in _factors(adapter, f"{component}.").items() if v is not None}
    return write_safetensors_atomic(file, tensors, {"format": "pt", **metadata})
