"""A read-only view of the served base model: which layers adapters may target, their weights, and
compilation against them.

It is built first, from the denoiser alone, so everything that needs to know the base (the adapter
registry compiles uploads against it; the adapter pool sizes its pages by it) depends on this view and
not on each other::

    view = BaseView(pipe.unet)                       # find the target Linears (nothing is modified)
    registry = AdapterRegistry(store, view, ...)     # compiles against view, feeds the pool
    model = MultiAdapterModel(pipe.unet, base=view, source=registry, ...)   # wraps the same layers
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cached_property

import torch
from torch import nn

from deft_runtime.adapter import Adapter
from deft_runtime.compile import CompiledAdapter, compile_adapter
from deft_runtime.errors import UnknownTargetModule
from deft_runtime.layers import DEFAULT_TARGETS, find_targets


class BaseView:
    """The target layers of one denoiser and what can be derived from them without changing them."""

    def __init__(self, denoiser: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> None:
        found = find_targets(denoiser, targets)
        if not found:
            raise UnknownTargetModule(
                f"no nn.Linear in the denoiser matches the target patterns {list(targets)}"
            )
        self.target_patterns = tuple(targets)
        self.linears: dict[str, nn.Linear] = found
        #: base weights of the target layers (the denoiser's own parameters, never modified)
        self.base_weights: dict[str, torch.Tensor] = {name: lin.weight for name, lin in found.items()}
        self._all_linears = {name for name, m in denoiser.named_modules() if isinstance(m, nn.Linear)}

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """layer → ``(d_out, d_in)``."""
        return {name: (int(w.shape[0]), int(w.shape[1])) for name, w in self.base_weights.items()}

    @cached_property
    def digest(self) -> str:
        """A hash of the target weights (names, shapes, float32 values): compiled factors depend on them."""
        h = hashlib.sha256()
        for name in sorted(self.base_weights):
            w = self.base_weights[name].detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(w.shape)}\n".encode())
            h.update(w.numpy().tobytes())
        return h.hexdigest()[:32]

    def check_targets(self, adapter: Adapter) -> None:
        """Reject adapters that touch layers outside the target set, saying which and why."""
        outside = [n for n in adapter.layers if n not in self.base_weights]
        if not outside:
            return
        name = outside[0]
        if name in self._all_linears:
            raise UnknownTargetModule(
                f"the adapter targets {name!r} ({len(outside)} layers outside the wrapped set); this server wraps "
                f"layers matching {list(self.target_patterns)}. Restart it with target patterns that include them."
            )
        compile_adapter(adapter, self.base_weights)  # raises UnknownTargetModule with the closest name

    def compile(self, adapter: Adapter, *, max_rank: int | None = None) -> CompiledAdapter:
        """Validate ``adapter`` against this base and compile it to low-rank factors (float32)."""
        self.check_targets(adapter)
        return compile_adapter(adapter, self.base_weights, max_rank=max_rank)
