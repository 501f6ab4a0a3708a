"""Adapter validation with precise, typed errors.

Three layers of checks, cheapest first:

1. :func:`validate_tensors` — every tensor is floating point and finite, every scale finite and
   within ``±MAX_SCALE`` (no base model needed);
2. :func:`validate_structure` — each layer has exactly the roles its kind needs, with consistent ranks;
3. :func:`validate_against_base` — every target exists in the base, shapes fit ``W0``, ranks are
   possible (``r ≤ min(d_out, d_in)``) and within the configured maximum, and the adapter's recorded
   fingerprint (if any) matches the base.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping

import torch

from deft_runtime.adapter import Adapter, AdapterKind, Decomposition, LayerParams
from deft_runtime.errors import (
    AdapterDtypeError,
    AdapterFormatError,
    AdapterIncompatible,
    AdapterShapeError,
    NonFiniteAdapter,
    RankError,
    UnknownTargetModule,
    shorten,
)

#: Largest |scale| (``alpha / r``) of a layer: trained adapters sit near 1; beyond this, outputs blow up.
MAX_SCALE = 1e4
ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_REQUIRED_ROLES: dict[AdapterKind, frozenset[str]] = {
    AdapterKind.DEFT: frozenset({"P", "R"}),
    AdapterKind.PARA: frozenset({"P"}),
    AdapterKind.LORA: frozenset({"up", "down"}),
}
_ALLOWED_ROLES: dict[AdapterKind, frozenset[str]] = {
    AdapterKind.DEFT: frozenset({"P", "R", "H", "gate"}),
    AdapterKind.PARA: frozenset({"P", "H"}),
    AdapterKind.LORA: frozenset({"up", "down"}),
}


def require_matrix(key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is 2-D; else an :class:`AdapterShapeError` naming the tensor ``key``."""
    if t.dim() != 2:
        raise AdapterShapeError(
            f"{shorten(key, 120, quote=False)} must be a matrix, found shape {tuple(t.shape)}"
        )
    return t


def validate_scale(name: str, scale: float) -> None:
    """A layer's scale is finite and within ``±MAX_SCALE``."""
    if not math.isfinite(scale):
        raise NonFiniteAdapter(f"the scale of layer {shorten(name)} is {scale!r}; it must be a finite number")
    if abs(scale) > MAX_SCALE:
        raise AdapterFormatError(
            f"the scale of layer {shorten(name)} is {scale!r}, outside [{-MAX_SCALE:g}, {MAX_SCALE:g}] "
            "(alpha / r); no working adapter needs such a value"
        )


def validate_tensors(adapter: Adapter) -> None:
    """Every tensor is a floating-point tensor without NaN or Inf; every scale is bounded."""
    for name, layer in adapter.layers.items():
        validate_scale(name, layer.scale)
        for role, t in layer.tensors().items():
            if t.dtype not in ACCEPTED_DTYPES:
                raise AdapterDtypeError(
                    f"{shorten(name, quote=False)}.{role} has dtype {t.dtype}; adapter tensors must be "
                    "floating point (float32, float16, bfloat16 or float64)"
                )
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise NonFiniteAdapter(
                    f"{name}.{role} contains {bad} NaN/Inf values; the adapter is broken "
                    "(re-export it from a checkpoint taken before training diverged)"
                )


def _expect_shape(name: str, role: str, t: torch.Tensor | None, expected: tuple[int, int]) -> None:
    if t is not None and tuple(t.shape) != expected:
        raise AdapterShapeError(f"{name}.{role} has shape {tuple(t.shape)}, expected {expected}")


def _validate_layer_structure(adapter: Adapter, name: str, layer: LayerParams) -> None:
    roles = set(layer.tensors())
    missing = _REQUIRED_ROLES[adapter.kind] - roles
    extra = roles - _ALLOWED_ROLES[adapter.kind]
    if missing or extra:
        raise AdapterFormatError(
            f"layer {shorten(name)} of a {adapter.kind.value} adapter has tensors {sorted(roles)}; "
            f"missing {sorted(missing)}, not allowed {sorted(extra)}"
        )
    if (adapter.decomposition is Decomposition.NMF) != (layer.H is not None):
        raise AdapterFormatError(
            f"layer {shorten(name)}: H is required by (and only by) the nmf decomposition"
        )
    for role, t in layer.tensors().items():
        if role != "gate":
            require_matrix(f"{name}.{role}", t)
        elif t.numel() != 1:
            raise AdapterShapeError(
                f"{shorten(name)}: gate must be a single number, found shape {tuple(t.shape)}"
            )
    r, d_out = layer.rank, layer.d_out
    if r < 1:
        raise RankError(f"layer {shorten(name)} has rank 0; every target layer needs rank ≥ 1")
    for role in ("R", "down"):
        t = getattr(layer, role)
        if t is not None and t.shape[0] != r:
            raise AdapterShapeError(f"{name}.{role} has {t.shape[0]} rows but the layer's rank is {r}")
    _expect_shape(name, "H", layer.H, (r, d_out))


def validate_structure(adapter: Adapter) -> None:
    """Each layer carries exactly the tensors its kind needs, with ranks that agree."""
    for name, layer in adapter.layers.items():
        _validate_layer_structure(adapter, name, layer)


def _unknown_target_message(name: str, known: Mapping[str, torch.Tensor]) -> str:
    # difflib is quadratic in the name's length: suggest only for names a person could have typed
    close = difflib.get_close_matches(name, list(known), n=1) if len(name) <= 256 else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"the base model has no adapter target {shorten(name)} ({len(known)} targetable Linear layers).{hint} "
        "Check that the adapter was trained for this base model and that its targets are among the "
        "wrapped layers."
    )


def _validate_layer_against(name: str, layer: LayerParams, W0: torch.Tensor, max_rank: int | None) -> None:
    d_out, d_in = int(W0.shape[0]), int(W0.shape[1])
    if layer.d_out != d_out or (layer.d_in is not None and layer.d_in != d_in):
        found = (layer.d_out, layer.d_in if layer.d_in is not None else "any")
        raise AdapterShapeError(
            f"layer {shorten(name)}: the adapter is for a [{found[0]} x {found[1]}] weight, the base weight is "
            f"[{d_out} x {d_in}]; the adapter was made for a different base model"
        )
    r = layer.rank
    if r > min(d_out, d_in):
        raise RankError(
            f"layer {shorten(name)}: rank {r} is impossible for a [{d_out} x {d_in}] weight (at most {min(d_out, d_in)})"
        )
    if max_rank is not None and r > max_rank:
        raise RankError(f"layer {shorten(name)}: rank {r} is above this server's maximum rank {max_rank}")


def validate_against_base(
    adapter: Adapter, base_weights: Mapping[str, torch.Tensor], *, max_rank: int | None = None
) -> None:
    """Raise a typed error unless ``adapter`` can be compiled against ``base_weights`` (name → W0)."""
    validate_structure(adapter)
    validate_tensors(adapter)
    if adapter.fingerprint is not None:
        shapes = adapter.fingerprint.shapes
        mismatched = [
            n for n, shape in shapes.items() if n not in base_weights or tuple(base_weights[n].shape) != shape
        ]
        if mismatched:
            n = mismatched[0]
            found = tuple(base_weights[n].shape) if n in base_weights else "missing"
            raise AdapterIncompatible(
                f"the adapter was made for base {adapter.fingerprint.digest} whose {shorten(n)} weight is "
                f"{shapes[n]}; in this base it is {found} ({len(mismatched)} of {len(shapes)} layers differ). "
                "Register it on the base model it was trained for."
            )
    for name, layer in adapter.layers.items():
        if name not in base_weights:
            raise UnknownTargetModule(_unknown_target_message(name, base_weights))
        _validate_layer_against(name, layer, base_weights[name], max_rank)
