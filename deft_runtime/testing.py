"""Seeded random adapters for tests and benchmarks (no file, no training needed)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from deft_runtime.adapter import Adapter, AdapterKind, BaseFingerprint, Decomposition, LayerParams


def random_layer(
    kind: AdapterKind,
    decomposition: Decomposition | None,
    d_out: int,
    d_in: int,
    rank: int,
    generator: torch.Generator,
    *,
    scale: float = 1.0,
    gated: bool = False,
    magnitude: float = 0.3,
) -> LayerParams:
    """One layer with entries ~ N(0, magnitude²) (``H`` for nmf is non-negative-ish noise as well)."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * magnitude

    if kind is AdapterKind.LORA:
        return LayerParams(up=rand(d_out, rank), down=rand(rank, d_in), scale=scale)
    H = rand(rank, d_out).abs() if decomposition is Decomposition.NMF else None
    P = rand(d_out, rank).abs() if decomposition is Decomposition.NMF else rand(d_out, rank)
    R = rand(rank, d_in) if kind is AdapterKind.DEFT else None
    gate = torch.randn((), generator=generator) if gated and kind is AdapterKind.DEFT else None
    return LayerParams(P=P, R=R, H=H, gate=gate, scale=scale)


def random_adapter(
    kind: AdapterKind,
    shapes: Mapping[str, tuple[int, int]],
    *,
    rank: int | Mapping[str, int] = 4,
    decomposition: Decomposition | None = None,
    seed: int = 0,
    scale: float = 1.0,
    gated: bool = False,
    magnitude: float = 0.3,
    with_fingerprint: bool = False,
) -> Adapter:
    """A seeded adapter over ``shapes`` (module → ``(d_out, d_in)``); ``rank`` may vary per module."""
    if kind is not AdapterKind.LORA and decomposition is None:
        decomposition = Decomposition.RELU
    g = torch.Generator().manual_seed(seed)
    layers = {
        name: random_layer(
            kind,
            decomposition,
            d_out,
            d_in,
            rank if isinstance(rank, int) else rank[name],
            g,
            scale=scale,
            gated=gated,
            magnitude=magnitude,
        )
        for name, (d_out, d_in) in shapes.items()
    }
    fingerprint = BaseFingerprint(dict(shapes)) if with_fingerprint else None
    return Adapter(kind=kind, layers=layers, decomposition=decomposition, fingerprint=fingerprint)
