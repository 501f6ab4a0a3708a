"""One denoiser, many adapters: wrapping, pool, shared batch mapping and backend, wired once.

:class:`MultiAdapterModel` is what the engine (and tests and benchmarks) hold::

    mam = MultiAdapterModel(pipe.unet, pool_config=PoolConfig(device_bytes=..., host_bytes=...))
    mam.register("dog", load_adapter("dog_peft_dir"))     # validate + compile once (float32)
    with mam.rows([[], [("dog", 1.0)], [("dog", 0.5), ("style", 0.5)]]):
        out = pipe.unet(latents, t, encoder_hidden_states=...)  # row i uses its own adapters
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from deft_runtime.adapter import Adapter
from deft_runtime.batch import AdapterBatch
from deft_runtime.compile import CompiledAdapter, compile_adapter
from deft_runtime.errors import AdapterNotFound, InvalidRequest, UnknownTargetModule
from deft_runtime.layers import DEFAULT_TARGETS, MultiAdapterLinear, find_targets, inject_adapters
from deft_runtime.ops import BackendName, make_ops
from deft_runtime.pool import AdapterPool, PoolConfig

#: A row's adapters by name: ``[(name, weight), ...]``.
NamedRow = Sequence[tuple[str, float]]


class MultiAdapterModel:
    """Wraps a denoiser's target Linears in place and serves per-row adapters through one pool."""

    def __init__(
        self,
        denoiser: nn.Module,
        *,
        pool_config: PoolConfig,
        targets: Sequence[str] = DEFAULT_TARGETS,
        backend: BackendName = "auto",
        max_rows: int = 64,
        max_adapters_per_row: int = 4,
        source: Callable[[str], CompiledAdapter] | None = None,
        exists: Callable[[str], bool] | None = None,
    ) -> None:
        self.denoiser = denoiser
        found = find_targets(denoiser, targets)
        if not found:
            raise UnknownTargetModule(
                f"no nn.Linear in the denoiser matches the target patterns {list(targets)}"
            )
        self.target_patterns = tuple(targets)
        #: base weights of the wrapped layers (views of the denoiser's own parameters, never modified)
        self.base_weights = {name: lin.weight for name, lin in found.items()}
        self._all_linears = {name for name, m in denoiser.named_modules() if isinstance(m, nn.Linear)}
        self._compiled: dict[str, CompiledAdapter] = {}
        self._exists = exists if exists is not None else self._compiled.__contains__
        self.pool = AdapterPool(
            {name: (int(w.shape[0]), int(w.shape[1])) for name, w in self.base_weights.items()},
            pool_config,
            source or self._compiled_source,
        )
        self.batch = AdapterBatch(max_rows, max_adapters_per_row, device=pool_config.device)
        self.ops = make_ops(backend, pool_config.device)
        self.layers: dict[str, MultiAdapterLinear] = inject_adapters(
            denoiser, self.pool.layers, self.batch, self.ops
        )

    # ------------------------------------------------------------------ adapters

    def check_targets(self, adapter: Adapter) -> None:
        """Reject adapters that touch layers outside the wrapped set, saying which and why."""
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
        self.check_targets(adapter)
        return compile_adapter(adapter, self.base_weights, max_rank=max_rank)

    def register(
        self, name: str, adapter: Adapter | CompiledAdapter, *, max_rank: int | None = None
    ) -> CompiledAdapter:
        """Compile (if needed) and keep ``adapter`` in memory under ``name`` (the default pool source)."""
        compiled = (
            adapter if isinstance(adapter, CompiledAdapter) else self.compile(adapter, max_rank=max_rank)
        )
        if name in self._compiled:
            self.pool.evict(name)
        self._compiled[name] = compiled
        return compiled

    def unregister(self, name: str) -> None:
        self.pool.evict(name)
        self._compiled.pop(name, None)

    def has_adapter(self, name: str) -> bool:
        """Whether ``name`` can be served (registered here, or known to the external source)."""
        return self._exists(name)

    def _compiled_source(self, name: str) -> CompiledAdapter:
        try:
            return self._compiled[name]
        except KeyError:
            raise AdapterNotFound(f"no adapter named {name!r} is registered") from None

    # ------------------------------------------------------------------ per-forward mapping

    def set_rows(self, rows: Sequence[NamedRow]) -> None:
        """Describe the next forward by adapter name; every named adapter must be acquired (pinned)."""
        slot_rows = []
        for i, pairs in enumerate(rows):
            mapped = []
            for name, weight in pairs:
                if not self.pool.is_resident(name):
                    raise InvalidRequest(f"row {i}: adapter {name!r} is not resident; acquire it first")
                mapped.append((self.pool.slot_of(name), float(weight)))
            slot_rows.append(mapped)
        self.batch.set(slot_rows)

    @contextlib.contextmanager
    def rows(self, rows: Sequence[NamedRow]) -> Iterator[None]:
        """Acquire the named adapters, map them for the forwards inside the block, then release."""
        names = [name for pairs in rows for name, _ in pairs]
        self.pool.acquire(names)
        try:
            self._wait_ready(names)
            self.set_rows(rows)
            yield
        finally:
            self.batch.clear()
            self.pool.release(names)

    def _wait_ready(self, names: Sequence[str]) -> None:
        if not self.pool.ready(names) and torch.cuda.is_available():
            torch.cuda.synchronize(self.pool.config.device)
