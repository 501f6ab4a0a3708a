"""The in-memory adapter: one definition shared by the loaders, the compiler, the trainer and the server.

An :class:`Adapter` maps target module names (paths inside the denoiser, e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``) to the trainable tensors of that
layer (:class:`LayerParams`). Every kind updates a frozen ``W0`` of shape ``[d_out, d_in]``:

=======  ==========================================================================
kind     adapted weight
=======  ==========================================================================
deft     ``W' = (I - Q·rightᵀ)·W0 + s·g·Q·R``   (remove a subspace, inject new directions)
para     ``W' = (I - Q·rightᵀ)·W0``             (removal only, ``R = 0``)
lora     ``W' = W0 + s·up·down``                (injection only)
=======  ==========================================================================

``Q`` and ``right`` come from the trainable ``P`` (and ``H`` for ``nmf``) by the projector
decomposition (:mod:`deft_runtime.projectors`); ``s`` is the per-layer scale (``alpha / r`` or 1)
and ``g = sigmoid(gate)`` when a gate is present, else 1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from deft_runtime.errors import AdapterFormatError, shorten


class AdapterKind(StrEnum):
    DEFT = "deft"
    PARA = "para"
    LORA = "lora"


class Decomposition(StrEnum):
    """How the projector ``Π = Q·rightᵀ`` is derived from ``P`` (see :mod:`deft_runtime.projectors`)."""

    PLAIN = "plain"
    RELU = "relu"
    QR = "qr"
    SVD = "svd"
    TSVD = "tsvd"
    LRMF = "lrmf"
    NMF = "nmf"
    EIG = "eig"


#: Projector modes of DEFT in the paper and PEFT; the PaRa decompositions of the reference code.
DEFT_MODES = (Decomposition.PLAIN, Decomposition.RELU, Decomposition.QR, Decomposition.SVD)
PARA_DECOMPOSITIONS = (
    Decomposition.QR,
    Decomposition.TSVD,
    Decomposition.LRMF,
    Decomposition.NMF,
    Decomposition.EIG,
)


def parse_kind(value: str) -> AdapterKind:
    try:
        return AdapterKind(value.lower())
    except ValueError as e:
        choices = ", ".join(k.value for k in AdapterKind)
        raise AdapterFormatError(f"unknown adapter kind {shorten(value)}; expected one of: {choices}") from e


def parse_decomposition(value: str) -> Decomposition:
    aliases = {"eigen": Decomposition.EIG}
    try:
        return aliases.get(value.lower()) or Decomposition(value.lower())
    except ValueError as e:
        choices = ", ".join(d.value for d in Decomposition)
        raise AdapterFormatError(
            f"unknown projector decomposition {shorten(value)}; expected one of: {choices}"
        ) from e


@dataclass(frozen=True)
class LayerParams:
    """Trainable tensors of one target layer.

    Shapes (``r`` is this layer's rank):

    - ``P``: ``[d_out, r]`` projection direction (deft, para)
    - ``R``: ``[r, d_in]`` injection (deft)
    - ``H``: ``[r, d_out]`` second non-negative factor (``nmf`` only)
    - ``gate``: scalar, injection multiplied by ``sigmoid(gate)`` (deft, optional)
    - ``up``: ``[d_out, r]`` and ``down``: ``[r, d_in]`` (lora: ``ΔW = scale·up·down``)
    - ``scale``: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA), 1.0 when unscaled
    """

    P: torch.Tensor | None = None
    R: torch.Tensor | None = None
    H: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    scale: float = 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that are set, by role name (``P``, ``R``, ``H``, ``gate``, ``up``, ``down``)."""
        roles = ("P", "R", "H", "gate", "up", "down")
        return {role: t for role in roles if (t := getattr(self, role)) is not None}

    @property
    def rank(self) -> int:
        if self.P is not None:
            return int(self.P.shape[1])
        if self.up is not None:
            return int(self.up.shape[1])
        raise AdapterFormatError("layer has neither P nor up: its rank is undefined")

    @property
    def d_out(self) -> int:
        source = self.P if self.P is not None else self.up
        if source is None:
            raise AdapterFormatError("layer has neither P nor up: its output size is undefined")
        return int(source.shape[0])

    @property
    def d_in(self) -> int | None:
        """Input size when the adapter itself fixes it (PaRa does not: it is read from the base)."""
        source = self.R if self.R is not None else self.down
        return None if source is None else int(source.shape[1])


@dataclass(frozen=True)
class BaseFingerprint:
    """What an adapter was made for: the target modules of the base and their weight shapes.

    Two bases with the same fingerprint accept the same adapters. ``digest`` is a short,
    order-independent hash of the shapes, stored in adapter files and compared at registration.
    """

    shapes: Mapping[str, tuple[int, int]]

    @property
    def digest(self) -> str:
        lines = "\n".join(f"{name}:{o}x{i}" for name, (o, i) in sorted(self.shapes.items()))
        return hashlib.sha256(lines.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({name: list(shape) for name, shape in sorted(self.shapes.items())})

    @classmethod
    def from_json(cls, text: str) -> BaseFingerprint:
        try:
            raw = json.loads(text)
            shapes = {str(k): (int(v[0]), int(v[1])) for k, v in raw.items()}
        except RecursionError as e:  # raised by the C decoder on arrays nested thousands deep
            raise AdapterFormatError("adapter fingerprint is nested too deeply to be JSON of shapes") from e
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
            raise AdapterFormatError(
                f"adapter fingerprint is not JSON of shapes {{module: [d_out, d_in]}}: {shorten(str(e), quote=False)}"
            ) from e
        return cls(shapes)

    @classmethod
    def of_weights(cls, weights: Mapping[str, torch.Tensor]) -> BaseFingerprint:
        return cls({name: (int(w.shape[0]), int(w.shape[1])) for name, w in weights.items()})


@dataclass
class Adapter:
    """A DEFT, PaRa or LoRA adapter before compilation: per target module, its parameters."""

    kind: AdapterKind
    layers: dict[str, LayerParams]
    decomposition: Decomposition | None = None
    fingerprint: BaseFingerprint | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind is AdapterKind.LORA:
            if self.decomposition is not None:
                raise AdapterFormatError("a LoRA adapter has no projector decomposition")
        elif self.decomposition is None:
            raise AdapterFormatError(f"a {self.kind.value} adapter needs a projector decomposition")
        if not self.layers:
            raise AdapterFormatError("the adapter has no target layers")

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    def num_parameters(self) -> int:
        return sum(t.numel() for layer in self.layers.values() for t in layer.tensors().values())

    def describe(self) -> str:
        mode = f" ({self.decomposition.value})" if self.decomposition else ""
        ranks = sorted(set(self.ranks.values()))
        return f"{self.kind.value}{mode} adapter on {len(self.layers)} layers, ranks {ranks}"
