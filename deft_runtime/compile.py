"""Compile any adapter into exact low-rank factors ``ΔW = B·A`` against the loaded base weights.

For every kind the update is exactly rank ≤ r (``../shared/DESIGN.md`` §1)::

    deft:  ΔW = Q·(s·g·R − rightᵀ·W0)    →  B = Q,   A = s·g·R − rightᵀ·W0
    para:  ΔW = −Q·rightᵀ·W0             →  B = Q,   A = −rightᵀ·W0
    lora:  ΔW = s·up·down                →  B = up,  A = s·down

with ``B: [d_out, r]``, ``A: [r, d_in]``. This runs once per adapter, in float32, at registration;
serving then only ever sees ``(B, A)``, whatever the kind: ``y = W0·x + b + B·(A·x)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from deft_runtime.adapter import Adapter, AdapterKind, BaseFingerprint, LayerParams
from deft_runtime.errors import AdapterFormatError, NonFiniteAdapter, UnknownTargetModule, shorten
from deft_runtime.projectors import project
from deft_runtime.validation import validate_against_base


@dataclass(frozen=True)
class LowRankFactors:
    """``ΔW = B·A`` for one layer. ``B: [d_out, r]``, ``A: [r, d_in]``, float32 unless cast."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.B.shape[1])

    @property
    def nbytes(self) -> int:
        return self.B.numel() * self.B.element_size() + self.A.numel() * self.A.element_size()

    def delta(self) -> torch.Tensor:
        """Dense ``ΔW = B·A`` ``[d_out, d_in]`` (for merging and tests)."""
        return self.B @ self.A


@dataclass(frozen=True)
class CompiledAdapter:
    """An adapter as the serving path sees it: per target layer, ``(B, A)``."""

    kind: AdapterKind
    factors: dict[str, LowRankFactors]
    fingerprint: BaseFingerprint

    @property
    def ranks(self) -> dict[str, int]:
        return {name: f.rank for name, f in self.factors.items()}

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.factors.values())


def injection_scale(layer: LayerParams) -> torch.Tensor:
    """``s·sigmoid(gate)`` when gated, else ``s`` (a float32 scalar tensor)."""
    scale = torch.tensor(layer.scale, dtype=torch.float32)
    if layer.gate is not None:
        scale = scale * torch.sigmoid(layer.gate.to(torch.float32).reshape(()))
    return scale


def compile_layer(adapter: Adapter, layer: LayerParams, W0: torch.Tensor) -> LowRankFactors:
    """Exact ``(B, A)`` of one layer; ``W0: [d_out, d_in]`` is read in float32 and never modified."""
    if adapter.kind is AdapterKind.LORA:
        assert layer.up is not None and layer.down is not None
        # clone: `.float()` of a float32 tensor is the tensor itself, and factors must never alias
        # the adapter's parameters (a trainer updating them in place would change served factors)
        return LowRankFactors(B=layer.up.float().clone(), A=layer.scale * layer.down.float())
    assert adapter.decomposition is not None and layer.P is not None
    Q, right = project(adapter.decomposition, layer.P, layer.H)
    if Q.data_ptr() == layer.P.data_ptr():  # plain/relu: Q is P itself
        Q = Q.clone()
    removal = right.T @ W0.to(device=Q.device, dtype=torch.float32)  # [r, d_in]
    if adapter.kind is AdapterKind.PARA:
        return LowRankFactors(B=Q, A=-removal)
    assert layer.R is not None
    return LowRankFactors(B=Q, A=injection_scale(layer) * layer.R.float() - removal)


def _checked_layer(adapter: Adapter, name: str, layer: LayerParams, W0: torch.Tensor) -> LowRankFactors:
    """:func:`compile_layer`, refusing factors that overflow float32 (finite but absurd tensors)."""
    try:
        f = compile_layer(adapter, layer, W0)
    except torch.linalg.LinAlgError as e:  # QR/SVD of a degenerate or overflowing P
        raise AdapterFormatError(f"layer {shorten(name)}: the projector decomposition failed ({e})") from e
    if not (bool(torch.isfinite(f.B).all()) and bool(torch.isfinite(f.A).all())):
        raise NonFiniteAdapter(
            f"layer {shorten(name)}: compiling it against the base weight overflows float32 (its values "
            "are far too large); the adapter is broken"
        )
    return f


def compile_adapter(
    adapter: Adapter, base_weights: Mapping[str, torch.Tensor], *, max_rank: int | None = None
) -> CompiledAdapter:
    """Validate ``adapter`` against the base weights (name → ``W0 [d_out, d_in]``) and compile it.

    Only the adapter's own target layers are read from ``base_weights``; the returned fingerprint
    records their shapes so a later registration can check the base it is served on.
    """
    validate_against_base(adapter, base_weights, max_rank=max_rank)
    with torch.no_grad():
        factors = {
            name: _checked_layer(adapter, name, layer, base_weights[name])
            for name, layer in adapter.layers.items()
        }
    fingerprint = BaseFingerprint.of_weights({name: base_weights[name] for name in adapter.layers})
    return CompiledAdapter(kind=adapter.kind, factors=factors, fingerprint=fingerprint)


def linear_weights(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Weights of the ``nn.Linear`` modules of ``model`` by module path (all of them, or ``names``)."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if names is None:
        return {name: m.weight for name, m in linears.items()}
    missing = [n for n in names if n not in linears]
    if missing:
        raise UnknownTargetModule(f"the model has no nn.Linear named {missing[0]!r} ({len(missing)} missing)")
    return {name: linears[name].weight for name in names}


def merged_weights(
    compiled: CompiledAdapter, base_weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """New tensors ``W0 + B·A`` for the adapter's layers, in each base weight's dtype (inputs untouched)."""
    merged = {}
    for name, f in compiled.factors.items():
        W0 = base_weights[name]
        merged[name] = (W0.float() + f.delta().to(W0.device)).to(W0.dtype)
    return merged


def merge_into(model: nn.Module, compiled: CompiledAdapter, weight: float = 1.0) -> nn.Module:
    """Add ``weight·B·A`` to the matching Linear weights of ``model`` in place and return it.

    Callers that need the base afterwards pass a copy (``copy.deepcopy(denoiser)``); export and the
    merged-weight test oracle do exactly that.
    """
    weights = linear_weights(model, list(compiled.factors))
    with torch.no_grad():
        for name, W in weights.items():
            delta = compiled.factors[name].delta().to(device=W.device)
            W.copy_((W.float() + weight * delta).to(W.dtype))
    return model
