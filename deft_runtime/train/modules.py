"""Trainable adapter layers that compute exactly the served math, with gradients.

:meth:`TrainableAdapter.attach` swaps each target ``nn.Linear`` of a denoiser for an
:class:`AdaptedLinear` that keeps the frozen Linear as ``base`` and owns this layer's trainable
tensors as ``nn.Parameter``. Every forward recompiles the layer with the function registration uses
(:func:`deft_runtime.compile.compile_layer`), so what is trained is what is served::

    (B, A) = compile_layer(adapter, LayerParams(P, R, H, gate | up, down), W0)   # float32, with grad
    y      = base(x) + (x · Aᵀ) · Bᵀ                                             # [..., d_out]

    deft:  B = Q(P),  A = s·g·R − right(P)ᵀ·W0        para: B = Q(P), A = −right(P)ᵀ·W0
    lora:  B = up,    A = s·down

The projector ``(Q, right)`` is recomputed from ``P`` each forward (QR/SVD with autograd), so P
trains. ``cache_projector`` (DEFT only) freezes P instead: ``B₀ = Q`` and ``A₀ = −rightᵀ·W0`` are
compiled once without gradient, and each forward uses ``B = B₀``, ``A = s·g·R + A₀`` — exact, since
compile's ``A`` is affine in ``R``. Only R (and the gate) train then, and a forward saves the
decomposition and the ``r × d_out × d_in`` product.

Initialization (``init="identity"``, the default) makes DEFT and LoRA a no-op at step 0:

- deft: ``P ~ N(0, 0.02²)``, then ``R = −A₀ / (s·g)`` where ``A₀`` is compile's ``A`` with ``R = 0``,
  i.e. ``R = rightᵀ·W0 / (s·g)`` as PEFT's ``DeftConfig(init_weights=True)``; bit-exact zero update
  when ``s = 1`` and there is no gate (``gate = 0``, so ``g = ½``, otherwise: ~1e-7 relative);
- lora: ``down`` Kaiming-uniform (``±1/√d_in``), ``up = 0``;
- para: cannot be a no-op (``R = 0`` always removes ``Π·W0``); ``P ~ N(0, 0.02²)`` (``nmf``:
  ``P, H ~ |N(0, 0.02²)|`` so every entry starts in relu's active region).

``init="random"`` is the reference code's start (PEFT ``init_weights=False``): ``R ~ N(0, 0.02²)``
for DEFT (a subspace of W0 is replaced from step 0), ``up ~ N(0, 0.02²)`` for LoRA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deft_runtime.adapter import Adapter, AdapterKind, BaseFingerprint, Decomposition, LayerParams
from deft_runtime.compile import LowRankFactors, compile_layer, injection_scale
from deft_runtime.errors import RankError, UnknownTargetModule
from deft_runtime.layers import find_targets

INIT_STD = 0.02
_ROLES = ("P", "R", "H", "gate", "up", "down")
#: Optimizer groups by role: R-like tensors at --lr, projector tensors at --lr × --p-lr-scale.
ROLE_GROUP = {"R": "R", "up": "R", "down": "R", "P": "P", "H": "P", "gate": "gate"}


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one trainable adapter layer (see the module docstring)."""

    def __init__(
        self, base: nn.Linear, spec: Adapter, params: LayerParams, name: str, *, cache_projector: bool = False
    ) -> None:
        super().__init__()
        self.base = base
        self.spec = spec  # kind and decomposition for compile_layer; its layers are the initial values
        self.layer_name = name
        self.scale = params.scale
        for role, tensor in params.tensors().items():
            self.register_parameter(role, nn.Parameter(tensor.detach().clone()))
        self.cache_projector = cache_projector
        if cache_projector:
            self.refresh_cache()

    def refresh_cache(self) -> None:
        """Freeze P (and H); keep ``B₀ = Q``, ``A₀ = −rightᵀ·W0`` as non-persistent buffers."""
        P = self.get_parameter("P")
        P.requires_grad_(False)
        with torch.no_grad():
            fixed = compile_layer(
                self.spec, LayerParams(P=P, R=torch.zeros_like(self.get_parameter("R"))), self.W0
            )
        self.register_buffer("cached_B", fixed.B.detach().clone(), persistent=False)  # may alias P otherwise
        self.register_buffer("cached_A", fixed.A.detach().clone(), persistent=False)

    @property
    def W0(self) -> torch.Tensor:
        return self.base.weight

    @property
    def weight(self) -> torch.Tensor:  # diffusers code sometimes reads `.weight.dtype` of projections
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def layer_params(self) -> LayerParams:
        """This layer's tensors (the live parameters, not copies) as the adapter core sees them."""
        roles = {role: p for role, p in self.named_parameters(recurse=False) if role in _ROLES}
        return LayerParams(**roles, scale=self.scale)

    def factors(self) -> LowRankFactors:
        """``(B, A)`` of the current parameters, float32, differentiable."""
        layer = self.layer_params()
        if self.cache_projector:
            assert layer.R is not None
            return LowRankFactors(
                B=self.get_buffer("cached_B"),
                A=injection_scale(layer).to(layer.R) * layer.R + self.get_buffer("cached_A"),
            )
        return compile_layer(self.spec, layer, self.W0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., d_out]
        f = self.factors()
        delta = F.linear(F.linear(x.to(f.A.dtype), f.A), f.B)  # [..., r] then [..., d_out], float32
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        kind = self.spec.kind.value
        mode = f"/{self.spec.decomposition.value}" if self.spec.decomposition else ""
        return f"{self.layer_name}, {kind}{mode}, rank={self.layer_params().rank}"


def check_rank(shapes: Mapping[str, tuple[int, int]], rank: int) -> None:
    """Raise :class:`RankError` unless ``rank ≤ min(d_out, d_in)`` for every target."""
    for name, (d_out, d_in) in shapes.items():
        if rank > min(d_out, d_in):
            smallest = min(min(s) for s in shapes.values())
            raise RankError(
                f"--rank {rank} is impossible for layer {name!r} with a [{d_out} x {d_in}] weight (at most "
                f"{min(d_out, d_in)}); use --rank ≤ {smallest} or narrow --target"
            )


def initial_layer(
    kind: AdapterKind,
    decomposition: Decomposition | None,
    W0: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    *,
    random_init: bool = False,
    scale: float = 1.0,
    gated: bool = False,
) -> LayerParams:
    """Seeded initial tensors of one layer (float32, on W0's device); identity DEFT gets ``R = 0`` here
    and its exact value from :func:`identity_injection` once the adapter exists."""
    d_out, d_in = int(W0.shape[0]), int(W0.shape[1])

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * INIT_STD).to(W0.device)

    if kind is AdapterKind.LORA:
        down = ((torch.rand(rank, d_in, generator=generator) * 2 - 1) / math.sqrt(d_in)).to(W0.device)
        up = normal(d_out, rank) if random_init else torch.zeros(d_out, rank, device=W0.device)
        return LayerParams(up=up, down=down, scale=scale)
    nmf = decomposition is Decomposition.NMF
    P = normal(d_out, rank).abs() if nmf else normal(d_out, rank)
    H = normal(rank, d_out).abs() if nmf else None
    if kind is AdapterKind.PARA:
        return LayerParams(P=P, H=H)
    gate = torch.zeros((), device=W0.device) if gated else None
    R = normal(rank, d_in) if random_init else torch.zeros(rank, d_in, device=W0.device)
    return LayerParams(P=P, R=R, H=H, gate=gate, scale=scale)


def identity_injection(spec: Adapter, layer: LayerParams, W0: torch.Tensor) -> LayerParams:
    """``layer`` with ``R = −A₀ / (s·g)``, ``A₀`` being compile's ``A`` at ``R = 0`` (``= −rightᵀ·W0``).

    Then compile gives ``A = s·g·R − rightᵀ·W0 = 0``: the adapter starts as a no-op.
    """
    assert layer.R is not None
    zero_R = LayerParams(
        P=layer.P, R=torch.zeros_like(layer.R), H=layer.H, gate=layer.gate, scale=layer.scale
    )
    with torch.no_grad():
        A0 = compile_layer(spec, zero_R, W0).A
        R = -A0 / injection_scale(zero_R).to(A0.device)
    return LayerParams(P=layer.P, R=R, H=layer.H, gate=layer.gate, scale=layer.scale)


class TrainableAdapter:
    """The adapted layers of one denoiser and the adapter they train; attach in place, detach to undo."""

    def __init__(self, denoiser: nn.Module, spec: Adapter, layers: dict[str, AdaptedLinear]) -> None:
        self.denoiser = denoiser
        self.spec = spec
        self.layers = layers

    @classmethod
    def attach(
        cls,
        denoiser: nn.Module,
        *,
        kind: AdapterKind,
        decomposition: Decomposition | None,
        rank: int,
        targets: Sequence[str],
        seed: int = 0,
        random_init: bool = False,
        scale: float = 1.0,
        gated: bool = False,
        cache_projector: bool = False,
    ) -> TrainableAdapter:
        """Freeze ``denoiser``, initialize one layer per target (seeded) and swap them in."""
        found = find_targets(denoiser, targets)
        if not found:
            raise UnknownTargetModule(
                f"no nn.Linear of the denoiser matches the target patterns {list(targets)}"
            )
        check_rank({n: (m.out_features, m.in_features) for n, m in found.items()}, rank)
        denoiser.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        initial = {
            name: initial_layer(
                kind,
                decomposition,
                lin.weight,
                rank,
                generator,
                random_init=random_init,
                scale=scale,
                gated=gated,
            )
            for name, lin in found.items()
        }
        spec = Adapter(kind=kind, layers=initial, decomposition=decomposition)
        if kind is AdapterKind.DEFT and not random_init:
            initial = {
                name: identity_injection(spec, layer, found[name].weight) for name, layer in initial.items()
            }
            spec = Adapter(kind=kind, layers=initial, decomposition=decomposition)
        layers = {
            name: AdaptedLinear(lin, spec, initial[name], name, cache_projector=cache_projector)
            for name, lin in found.items()
        }
        adapter = cls(denoiser, spec, layers)
        adapter.reattach()
        return adapter

    # ------------------------------------------------------------------ module swap

    def reattach(self) -> None:
        for name, layer in self.layers.items():
            self.denoiser.set_submodule(name, layer)

    def detach(self) -> None:
        """Put the original Linears back (the adapter keeps its parameters)."""
        for name, layer in self.layers.items():
            self.denoiser.set_submodule(name, layer.base)

    @contextlib.contextmanager
    def detached(self) -> Iterator[nn.Module]:
        """The denoiser with its original Linears for the duration of the block (e.g. to copy it)."""
        self.detach()
        try:
            yield self.denoiser
        finally:
            self.reattach()

    # ------------------------------------------------------------------ parameters

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by ``<module path>.<role>`` (the keys of deft's own format)."""
        return {
            f"{name}.{role}": p
            for name, layer in self.layers.items()
            for role, p in layer.named_parameters(recurse=False)
            if p.requires_grad
        }

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: ``R`` (R, up, down), ``P`` (P, H), ``gate``."""
        groups: dict[str, list[nn.Parameter]] = {}
        for key, p in self.named_parameters().items():
            groups.setdefault(ROLE_GROUP[key.rpartition(".")[2]], []).append(p)
        return groups

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (frozen ones included) by ``<module path>.<role>``: the live parameters."""
        return {
            f"{name}.{role}": p
            for name, layer in self.layers.items()
            for role, p in layer.named_parameters(recurse=False)
        }

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (from :meth:`state_tensors` of the same configuration) into the parameters."""
        own = self.state_tensors()
        if set(own) != set(tensors):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise ValueError(f"adapter state does not match: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for key, p in own.items():
                p.copy_(tensors[key])
        for layer in self.layers.values():
            if layer.cache_projector:
                layer.refresh_cache()

    def base_weights(self) -> dict[str, torch.Tensor]:
        return {name: layer.W0 for name, layer in self.layers.items()}

    def fingerprint(self) -> BaseFingerprint:
        return BaseFingerprint.of_weights(self.base_weights())

    def to_adapter(self, metadata: Mapping[str, str] | None = None) -> Adapter:
        """A detached float32 CPU copy of the current adapter, with the base's fingerprint."""
        layers = {}
        for name, layer in self.layers.items():
            live = layer.layer_params()
            copies = {role: t.detach().float().cpu().clone() for role, t in live.tensors().items()}
            layers[name] = LayerParams(**copies, scale=live.scale)
        return Adapter(
            kind=self.spec.kind,
            layers=layers,
            decomposition=self.spec.decomposition,
            fingerprint=self.fingerprint(),
            metadata=dict(metadata or {}),
        )
