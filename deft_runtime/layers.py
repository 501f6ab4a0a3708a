"""Per-sample adapters inside one denoiser forward, with the base weights never modified.

:func:`inject_adapters` swaps each target ``nn.Linear`` of a diffusers denoiser (SDXL / SD 1.5 UNets,
OmniGen / SD3 / FLUX transformers: any module tree) for a :class:`MultiAdapterLinear`. Each wrapper
keeps the original Linear as ``base``, its own :class:`~deft_runtime.ops.LayerPages` from the pool, and a
reference to the one shared :class:`~deft_runtime.batch.AdapterBatch`; it decides nothing itself::

    y = base(x)                                # W0·x + b, untouched
    y[i] += Σ_k w_ik · B_k · (A_k · x[i])      # ops backend, chosen once at construction

Under ``torch.compile`` the second line is one opaque custom op, ``deft::layer_adapters(y, x, handle)``:
``handle`` (an int fixed at construction) names the wrapper, and everything that changes between
forwards (the batch mapping, the backend's metadata, the pool's page tables) is read inside the op, so
the compiled graph never depends on it and changing adapters or their mix never recompiles.
"""

from __future__ import annotations

import itertools
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from deft_runtime.batch import AdapterBatch
from deft_runtime.errors import InvalidRequest, UnknownTargetModule
from deft_runtime.ops import AdapterOps, LayerPages

#: Attention projections of diffusers' ``Attention`` (SDXL, SD 1.5, OmniGen, SD3, FLUX) and of fused
#: ``qkv`` blocks in other transformers. Patterns match the end of a module path.
DEFAULT_TARGETS: tuple[str, ...] = (r"to_q", r"to_k", r"to_v", r"to_out\.0", r"qkv", r"to_qkv", r"proj_qkv")


def _compile_patterns(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile(r"(?:^|\.)(?:" + "|".join(f"(?:{p})" for p in patterns) + r")$")


def find_targets(model: nn.Module, patterns: Sequence[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose path ends with one of ``patterns`` (regexes), by path."""
    rx = _compile_patterns(patterns)
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and rx.search(name)}


#: every live wrapper by its handle: what ``deft::layer_adapters`` calls back into
_LAYERS: weakref.WeakValueDictionary[int, MultiAdapterLinear] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("deft::layer_adapters", mutates_args=("y",))
def layer_adapters(y: torch.Tensor, x: torch.Tensor, handle: int) -> None:
    """``y += `` the adapters of wrapper ``handle`` for the current batch mapping (opaque to compile)."""
    _LAYERS[handle].add_adapters(y, x)


@layer_adapters.register_fake
def _layer_adapters_fake(y: torch.Tensor, x: torch.Tensor, handle: int) -> None:
    """Shapes only: ``y`` is written in place."""


class MultiAdapterLinear(nn.Module):
    """A Linear plus per-row low-rank adapters read from the shared batch mapping."""

    def __init__(
        self, base: nn.Linear, pages: LayerPages, batch: AdapterBatch, ops: AdapterOps, name: str
    ) -> None:
        super().__init__()
        self.base = base
        self.pages = pages
        self.batch = batch
        self.ops = ops
        self.layer_name = name
        self.handle = next(_HANDLES)
        _LAYERS[self.handle] = self

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # diffusers code sometimes reads `.weight.dtype` of projections
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if torch.compiler.is_compiling():
            layer_adapters(y, x, self.handle)
            return y
        return self.add_adapters(y, x)

    def add_adapters(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` (the base output, ``[R, d_out]`` or ``[R, T, d_out]``) plus this layer's adapters for
        the batch's current mapping, in place; returns ``y``."""
        batch = self.batch
        if batch.is_empty:
            return y
        if x.shape[0] != batch.num_rows:
            raise InvalidRequest(
                f"{self.layer_name}: input has {x.shape[0]} rows but the adapter batch describes {batch.num_rows}"
            )
        squeeze = x.dim() == 2  # [R, d] inputs are one token per row
        x3, y3 = (x.unsqueeze(1), y.unsqueeze(1)) if squeeze else (x, y)
        self.ops.add_adapters(y3, x3, self.pages, batch)
        return y

    def extra_repr(self) -> str:
        return f"{self.layer_name}, backend={self.ops.name}"


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def inject_adapters(
    model: nn.Module,
    layer_pages: Mapping[str, LayerPages],
    batch: AdapterBatch,
    ops: AdapterOps,
) -> dict[str, MultiAdapterLinear]:
    """Replace each Linear named in ``layer_pages`` by a :class:`MultiAdapterLinear`, in place."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    wrapped = {}
    for name, pages in layer_pages.items():
        base = linears.get(name)
        if base is None:
            raise UnknownTargetModule(f"the model has no nn.Linear named {name!r} to wrap")
        wrapper = MultiAdapterLinear(base, pages, batch, ops, name)
        _set_submodule(model, name, wrapper)
        wrapped[name] = wrapper
    return wrapped


def remove_adapters(model: nn.Module, names: Iterable[str]) -> None:
    """Undo :func:`inject_adapters`: put the original Linear modules back."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, MultiAdapterLinear):
            _set_submodule(model, name, module.base)
