"""Adapter file formats. :func:`load_adapter` accepts every supported input and picks the reader.

=========================================  ===========================================================
input                                      reader
=========================================  ===========================================================
directory with ``adapter_config.json``     PEFT (``peft_type`` DEFT or LORA): :mod:`.peft`
other directory                            the one adapter inside it (:mod:`deft_files.folders`)
``*.safetensors`` with deft metadata       deft's own format: :mod:`.native`
other ``*.safetensors``                    diffusers / kohya LoRA single file: :mod:`.lora_files`
``.bin`` ``.pt`` ``.pth`` ``.ckpt`` pickle  refused, never unpickled (:class:`UnsafeAdapterFormat`)
=========================================  ===========================================================

:func:`save_adapter` writes deft's format, PEFT directories, and diffusers LoRA files
(:mod:`deft_runtime.export.lora`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from deft_files.folders import AdapterFolderError, adapter_in_folder
from deft_runtime.adapter import Adapter, AdapterKind
from deft_runtime.errors import AdapterFormatError
from deft_runtime.formats.lora_files import load_lora_file, lora_from_single_file
from deft_runtime.formats.native import from_native, is_native, load_native, save_native
from deft_runtime.formats.peft import load_peft_dir, save_peft_dir
from deft_runtime.formats.safetensors_io import DEFAULT_LIMITS, ReadLimits, read_safetensors

__all__ = [
    "DEFAULT_LIMITS",
    "ReadLimits",
    "load_adapter",
    "load_lora_file",
    "load_native",
    "load_peft_dir",
    "save_adapter",
    "save_native",
    "save_peft_dir",
]


def load_adapter(
    path: str | os.PathLike[str],
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
    unet_config: Mapping[str, Any] | None = None,
    label: str | None = None,
    denoiser_only: bool = False,
) -> Adapter:
    """Read an adapter from a PEFT directory, deft's own file, a diffusers/kohya LoRA file, or a folder
    holding one of them (:mod:`deft_files.folders`: a ``deft train`` output folder).

    ``unet_config`` (the base UNet's config) lets kohya files with SGM block names map onto diffusers
    module names. The result is validated on its own (dtypes, finiteness, structure); validation
    against a base happens when it is compiled. Messages name the input ``label`` (default: the
    path as given; a server passes the name of the user's file, never its temporary copy's).
    ``denoiser_only`` leaves a LoRA file's text-encoder layers out instead of refusing the file; the
    adapter's ``metadata["dropped_text_encoder_layers"]`` then says which.
    """
    path = Path(path)
    if path.is_dir():
        try:  # a training output folder: its adapter.deft.safetensors
            inner = adapter_in_folder(path, label)
        except AdapterFolderError as e:
            raise AdapterFormatError(str(e)) from None
        if inner == path:
            return load_peft_dir(path, limits, label)
        inner_label = f"{label or path}/{inner.name}"
        return load_adapter(
            inner, limits=limits, unet_config=unet_config, label=inner_label, denoiser_only=denoiser_only
        )
    if not path.exists():
        raise AdapterFormatError(f"{label or path} does not exist")
    tensors, metadata = read_safetensors(path, limits, label)
    if is_native(metadata):
        return from_native(tensors, metadata)
    if any(".deft_P" in k for k in tensors):
        raise AdapterFormatError(
            f"{label or path.name} holds PEFT DEFT weights without their adapter_config.json; pass the PEFT "
            "directory"
        )
    return lora_from_single_file(tensors, metadata, unet_config, denoiser_only=denoiser_only)


def save_adapter(
    adapter: Adapter,
    path: str | os.PathLike[str],
    *,
    format: Literal["deft", "peft", "diffusers"] = "deft",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``adapter`` in deft's own single-file format, as a PEFT directory (DEFT/PaRa: PEFT's DEFT
    tuner; LoRA: a LoraConfig directory), or as diffusers' ``pytorch_lora_weights.safetensors`` (LoRA)."""
    if format == "deft":
        return save_native(adapter, path)
    if format == "peft" and adapter.kind is not AdapterKind.LORA:
        return save_peft_dir(adapter, path, base_model_name_or_path=base_model_name_or_path)
    from deft_runtime.export.lora import save_diffusers_lora, save_lora_peft_dir  # imports formats

    if format == "peft":
        return save_lora_peft_dir(adapter, path, base_model_name_or_path=base_model_name_or_path)
    if format == "diffusers":
        return save_diffusers_lora(adapter, path)
    raise ValueError(f"unknown adapter format {format!r}; expected 'deft', 'peft' or 'diffusers'")
