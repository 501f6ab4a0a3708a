"""deft's own single-file adapter format (``*.deft.safetensors``).

One safetensors file. Tensors are named ``<module path>.<role>`` with role in ``P, R, H, gate, up,
down`` (see :class:`deft_runtime.adapter.LayerParams`). ``__metadata__`` (all strings):

=================  ===============================================================
key                value
=================  ===============================================================
format             ``deft.adapter``
format_version     ``1``
kind               ``deft`` | ``para`` | ``lora``
decomposition      projector mode (``plain relu qr svd tsvd lrmf nmf eig``), empty for lora
ranks              JSON ``{module: r}`` (checked against the tensors on read)
scales             JSON ``{module: s}`` (``alpha / r``, or 1)
fingerprint        JSON ``{module: [d_out, d_in]}`` of the base it was made for (optional)
user               JSON ``{str: str}`` free metadata (name, training parameters, ...)
=================  ===============================================================
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from deft_runtime.adapter import Adapter, BaseFingerprint, LayerParams, parse_decomposition, parse_kind
from deft_runtime.errors import AdapterFormatError, shorten
from deft_runtime.formats.fields import field_name, mapping, number, parse_json
from deft_runtime.formats.safetensors_io import (
    DEFAULT_LIMITS,
    ReadLimits,
    read_safetensors,
    write_safetensors_atomic,
)
from deft_runtime.validation import MAX_SCALE, validate_structure, validate_tensors

FORMAT_NAME = "deft.adapter"
FORMAT_VERSION = "1"
SUFFIX = ".deft.safetensors"
_ROLES = ("P", "R", "H", "gate", "up", "down")


def is_native(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == FORMAT_NAME


def to_native(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and ``__metadata__`` of ``adapter`` in this format."""
    tensors = {
        f"{name}.{role}": t for name, layer in adapter.layers.items() for role, t in layer.tensors().items()
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": adapter.kind.value,
        "decomposition": adapter.decomposition.value if adapter.decomposition else "",
        "ranks": json.dumps(adapter.ranks, sort_keys=True),
        "scales": json.dumps({n: layer.scale for n, layer in adapter.layers.items()}, sort_keys=True),
        "user": json.dumps(adapter.metadata, sort_keys=True),
    }
    if adapter.fingerprint is not None:
        metadata["fingerprint"] = adapter.fingerprint.to_json()
    return tensors, metadata


def save_native(adapter: Adapter, path: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` atomically to ``path`` (conventionally ``*.deft.safetensors``)."""
    tensors, metadata = to_native(adapter)
    return write_safetensors_atomic(path, tensors, metadata)


def _json_field(metadata: dict[str, str], key: str, default: str) -> dict[str, object]:
    value = parse_json(metadata.get(key, default), f"metadata field {key!r}")
    return mapping(value, f"metadata field {key!r}")


def _user_metadata(metadata: dict[str, str]) -> dict[str, str]:
    user = _json_field(metadata, "user", "{}")
    for key, value in user.items():
        if isinstance(value, dict | list):
            raise AdapterFormatError(f"{field_name(key, 'user')} must be a string, found {shorten(value)}")
    return {str(k): str(v) for k, v in user.items()}


def _group_layers(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, role = key.rpartition(".")
        if not name or role not in _ROLES:
            raise AdapterFormatError(
                f"tensor {shorten(key)} is not '<module>.<role>' with role in {list(_ROLES)}"
            )
        layers.setdefault(name, {})[role] = t
    return layers


def from_native(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Adapter:
    """Build an :class:`Adapter` from this format's tensors and metadata (validated)."""
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFormatError(
            f"deft adapter format version {version!r} is not supported by this deft (reads {FORMAT_VERSION!r}); "
            "upgrade deft or re-export the adapter"
        )
    kind = parse_kind(metadata.get("kind", ""))
    decomposition = parse_decomposition(metadata["decomposition"]) if metadata.get("decomposition") else None
    scales = _json_field(metadata, "scales", "{}")
    layers = {}
    for name, roles in _group_layers(tensors).items():
        scale = number(scales.get(name, 1.0), field_name(name, "scales"), bound=MAX_SCALE)
        layers[name] = LayerParams(**roles, scale=scale)
    fingerprint = BaseFingerprint.from_json(metadata["fingerprint"]) if "fingerprint" in metadata else None
    user = _user_metadata(metadata)
    adapter = Adapter(
        kind=kind, layers=layers, decomposition=decomposition, fingerprint=fingerprint, metadata=user
    )
    validate_structure(adapter)
    validate_tensors(adapter)
    ranks = _json_field(metadata, "ranks", "{}")
    if ranks and ranks != adapter.ranks:
        raise AdapterFormatError(
            "metadata 'ranks' disagrees with the tensors' shapes; the file is inconsistent"
        )
    return adapter


def load_native(path: str | os.PathLike[str], limits: ReadLimits = DEFAULT_LIMITS) -> Adapter:
    tensors, metadata = read_safetensors(path, limits)
    if not is_native(metadata):
        raise AdapterFormatError(
            f"{Path(path).name} is not a deft adapter file (no format={FORMAT_NAME!r} metadata)"
        )
    return from_native(tensors, metadata)
