"""PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``), read and write.

Read: ``peft_type`` ``DEFT`` (any ``decomposition_method``, ``para``, ``alpha``) and ``LORA`` (``r``,
``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``). Tensor keys may carry the
prefixes ``base_model.model.``, ``unet.``, ``transformer.`` or none, and optionally an adapter name
(``lora_A.default.weight``).

Write: DEFT adapters whose mode PEFT implements (``relu``, ``qr``; PaRa via ``para=True``) with one
rank and one scale, so the directory loads with ``PeftModel.from_pretrained(denoiser, dir)``. LoRA
adapters are written by :mod:`deft_runtime.export.lora` (``save_adapter(..., format="peft")``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from deft_files.text_encoder_keys import text_encoder_prefix
from deft_runtime.adapter import Adapter, AdapterKind, Decomposition, LayerParams, parse_decomposition
from deft_runtime.errors import (
    AdapterFormatError,
    AdapterTooLarge,
    UnknownTargetModule,
    UnsafeAdapterFormat,
    shorten,
)
from deft_runtime.formats.fields import flag, number, parse_json, rank, string
from deft_runtime.formats.file_modes import publish
from deft_runtime.formats.patterns import PatternTable
from deft_runtime.formats.safetensors_io import DEFAULT_LIMITS, ReadLimits, read_safetensors
from deft_runtime.validation import require_matrix, validate_structure, validate_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIXES = ("base_model.model.", "unet.", "transformer.")
_DEFT_KEY = re.compile(r"^(?P<module>.+)\.deft_(?P<role>[PR])(?:\.[A-Za-z0-9_-]+)?$")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<role>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
PEFT_WRITABLE_MODES = (Decomposition.RELU, Decomposition.QR)


def strip_prefix(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _refuse_text_encoder(keys: list[str]) -> None:
    te = [k for k in keys if text_encoder_prefix(k) is not None]  # kohya's lora_te1_ … after conversion
    if te:
        raise UnknownTargetModule(
            f"the file has {len(te)} text-encoder tensors (e.g. {shorten(te[0])}); deft applies adapters to the "
            "denoiser only. Drop them with --denoiser-only (deft convert, deft adapters register; "
            "denoiser_only=True in deft_client and load_adapter), or export the adapter without them."
        )


def lora_from_tensors(
    tensors: Mapping[str, torch.Tensor],
    alpha_for: Callable[[str], float | None] = lambda module: None,
    *,
    use_rslora: bool = False,
) -> dict[str, LayerParams]:
    """LoRA layers from PEFT-style keys ``<module>.lora_A.weight`` / ``lora_B.weight``.

    ``alpha_for(module)`` gives the layer's alpha; with none the scale is 1 (diffusers' convention
    when a file carries no alphas), else ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
    """
    keys = [strip_prefix(k) for k in tensors]
    _refuse_text_encoder(list(tensors))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for raw_key, key in zip(tensors, keys, strict=True):
        if "lora_magnitude_vector" in key:
            raise AdapterFormatError(
                "DoRA adapters (lora_magnitude_vector) are not low rank; deft cannot serve them"
            )
        m = _LORA_KEY.match(key)
        if m is None:
            raise AdapterFormatError(
                f"unexpected tensor {shorten(raw_key)} in a LoRA file; expected '<module>.lora_A.weight' and "
                "'<module>.lora_B.weight' (PEFT/diffusers) or kohya 'lora_unet_…' keys"
            )
        parts.setdefault(m["module"], {})[m["role"]] = require_matrix(raw_key, tensors[raw_key])
    layers = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(
                f"LoRA layer {shorten(module)} has only lora_{next(iter(ab))}; both A and B are needed"
            )
        r = int(ab["A"].shape[0])
        alpha = alpha_for(module)
        # r = 0 is refused by validate_structure with a RankError; do not divide by it first
        scale = 1.0 if alpha is None or r == 0 else alpha / (math.sqrt(r) if use_rslora else r)
        layers[module] = LayerParams(up=ab["B"], down=ab["A"], scale=scale)
    return layers


#: ``peft.LoraConfig().lora_alpha``
PEFT_DEFAULT_LORA_ALPHA = 8


def lora_from_config(tensors: dict[str, torch.Tensor], config: Mapping[str, object]) -> Adapter:
    """A LoRA adapter from PEFT-style tensors and a LoraConfig (every field type-checked first)."""
    if flag(config.get("use_dora"), "'use_dora'"):
        raise AdapterFormatError("DoRA adapters (use_dora=true) are not low rank; deft cannot serve them")
    r_default = rank(config.get("r", 8), "'r'")
    # absent: LoraConfig's own default (what PEFT and diffusers load such a config with), not r
    alpha_default = number(config.get("lora_alpha", PEFT_DEFAULT_LORA_ALPHA), "'lora_alpha'")
    rank_pattern = PatternTable.parse(config.get("rank_pattern"), "rank_pattern", rank)
    alpha_pattern = PatternTable.parse(config.get("alpha_pattern"), "alpha_pattern", number)
    use_rslora = flag(config.get("use_rslora"), "'use_rslora'")

    def alpha_for(module: str) -> float:
        alpha = alpha_pattern.lookup(module)
        return alpha_default if alpha is None else alpha

    layers = lora_from_tensors(tensors, alpha_for, use_rslora=use_rslora)
    for module, layer in layers.items():
        expected = rank_pattern.lookup(module) or r_default
        if layer.rank != expected:
            raise AdapterFormatError(
                f"LoRA layer {shorten(module)} has rank {layer.rank}, the config says {expected}"
            )
    return Adapter(kind=AdapterKind.LORA, layers=layers, metadata={"source_format": "peft"})


def _deft_from_config(tensors: dict[str, torch.Tensor], config: Mapping[str, object]) -> Adapter:
    para = flag(config.get("para"), "'para'")
    raw_alpha = config.get("alpha")
    alpha = None if raw_alpha is None else number(raw_alpha, "'alpha'")
    mode = string(config.get("decomposition_method", "relu"), "'decomposition_method'")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for raw_key, t in tensors.items():
        m = _DEFT_KEY.match(strip_prefix(raw_key))
        if m is None:
            raise AdapterFormatError(
                f"unexpected tensor {shorten(raw_key)} in a PEFT DEFT adapter (expected deft_P/deft_R)"
            )
        parts.setdefault(m["module"], {})[m["role"]] = require_matrix(raw_key, t)
    layers = {}
    for module, roles in parts.items():
        if "P" not in roles or (not para and "R" not in roles):
            raise AdapterFormatError(f"DEFT layer {shorten(module)} lacks deft_P or deft_R")
        r = int(roles["P"].shape[1])
        # PEFT's DEFT: scale alpha / r when alpha is set (and not 0), else 1; r = 0 is a RankError later
        scale = alpha / r if alpha and r else 1.0
        layers[module] = LayerParams(P=roles["P"], R=None if para else roles["R"], scale=scale)
    decomposition = parse_decomposition(mode)
    kind = AdapterKind.PARA if para else AdapterKind.DEFT
    return Adapter(kind=kind, layers=layers, decomposition=decomposition, metadata={"source_format": "peft"})


def load_peft_dir(
    path: str | os.PathLike[str], limits: ReadLimits = DEFAULT_LIMITS, label: str | None = None
) -> Adapter:
    """Read a PEFT adapter directory (DEFT or LoRA); messages name it ``label`` (default: ``path``)."""
    path = Path(path)
    label = label or str(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterFormatError(f"{label} has no {CONFIG_NAME}; it is not a PEFT adapter directory")
    if not weights_path.is_file():
        if (path / "adapter_model.bin").is_file():
            raise UnsafeAdapterFormat(
                f"{label} holds adapter_model.bin (pickle); deft never unpickles adapter files. Re-save it with "
                "save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors"
            )
        raise AdapterFormatError(f"{label} has no {WEIGHTS_NAME}")
    if (size := config_path.stat().st_size) > limits.max_header_bytes:
        raise AdapterTooLarge(
            f"{CONFIG_NAME} is {size} bytes, above the limit of {limits.max_header_bytes} bytes for JSON in an "
            "adapter (a LoraConfig is a few KiB)"
        )
    config = parse_json(config_path.read_bytes(), CONFIG_NAME)
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} must hold a JSON object, found {shorten(config)}")
    tensors, _ = read_safetensors(weights_path, limits, f"{label}/{WEIGHTS_NAME}")
    peft_type = string(config.get("peft_type", ""), "'peft_type'").upper()
    if peft_type == "DEFT":
        adapter = _deft_from_config(tensors, config)
    elif peft_type == "LORA":
        adapter = lora_from_config(tensors, config)
    else:
        raise AdapterFormatError(
            f"peft_type {shorten(peft_type or 'missing')} is not supported; deft reads DEFT and LORA"
        )
    validate_structure(adapter)
    validate_tensors(adapter)
    return adapter


def _peft_alpha(adapter: Adapter) -> tuple[int, float | None]:
    ranks = set(adapter.ranks.values())
    scales = {layer.scale for layer in adapter.layers.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise AdapterFormatError(
            "PEFT's DEFT config has one rank and one alpha for all layers; this adapter has ranks "
            f"{sorted(ranks)} and scales {sorted(scales)}. Save it in deft's own format instead."
        )
    (r,), (scale,) = ranks, scales
    return r, None if scale == 1.0 else scale * r


def save_peft_dir(
    adapter: Adapter, path: str | os.PathLike[str], *, base_model_name_or_path: str | None = None
) -> Path:
    """Write a PEFT DEFT directory (``relu``/``qr`` modes, DEFT or PaRa, no gate), atomically."""
    if adapter.kind is AdapterKind.LORA or adapter.decomposition not in PEFT_WRITABLE_MODES:
        mode = adapter.decomposition.value if adapter.decomposition else "lora"
        raise AdapterFormatError(
            f"PEFT's DEFT tuner implements the relu and qr modes; this is a {adapter.kind.value}/{mode} adapter. "
            "Save it in deft's own format instead."
        )
    if any(layer.gate is not None for layer in adapter.layers.values()):
        raise AdapterFormatError("PEFT's DEFT tuner has no gate; save gated adapters in deft's own format")
    r, alpha = _peft_alpha(adapter)
    para = adapter.kind is AdapterKind.PARA
    config = {
        "peft_type": "DEFT",
        "r": r,
        "alpha": alpha,
        "decomposition_method": adapter.decomposition.value,
        "para": para,
        "target_modules": sorted(adapter.layers),
        "init_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "task_type": None,
    }
    tensors = {}
    for name, layer in adapter.layers.items():
        tensors[f"base_model.model.{name}.deft_P"] = layer.P
        if not para:
            tensors[f"base_model.model.{name}.deft_R"] = layer.R
    return write_dir_atomic(Path(path), config, tensors)


def write_dir_atomic(path: Path, config: dict[str, object], tensors: dict[str, torch.Tensor | None]) -> Path:
    """Write a PEFT directory (``adapter_config.json``, ``adapter_model.safetensors``) beside ``path``
    and rename it into place: never half-written; an existing ``path`` is replaced."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items() if v is not None},
            str(tmp / WEIGHTS_NAME),
        )
        if path.exists():
            shutil.rmtree(path)
        os.replace(publish(tmp), path)  # mkdtemp makes 0700, safetensors 0600
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
