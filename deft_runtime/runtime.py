"""One denoiser, many adapters: wrapping, pool, shared batch mapping and backend, wired once.

:class:`MultiAdapterModel` is what the engine (and tests and benchmarks) hold::

    mam = MultiAdapterModel(pipe.unet, pool_config=PoolConfig(device_bytes=..., host_bytes=...))
    mam.register("dog", load_adapter("dog_peft_dir"))     # validate + compile once (float32)
    with mam.rows([[], [("dog", 1.0)], [("dog", 0.5), ("style", 0.5)]]):
        out = pipe.unet(latents, t, encoder_hidden_states=...)  # row i uses its own adapters
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from deft_runtime.adapter import Adapter
from deft_runtime.base_view import BaseView
from deft_runtime.batch import AdapterBatch
from deft_runtime.compile import CompiledAdapter
from deft_runtime.errors import AdapterNotFound, InvalidRequest, PoolExhausted
from deft_runtime.layers import DEFAULT_TARGETS, MultiAdapterLinear, inject_adapters
from deft_runtime.ops import BackendName, make_ops
from deft_runtime.pool import AdapterPool, AdapterSource, PoolConfig

#: A row's adapters by name: ``[(name, weight), ...]``.
NamedRow = Sequence[tuple[str, float]]


class InMemoryAdapters:
    """The default pool source: compiled adapters kept in a dict by :meth:`MultiAdapterModel.register`.

    Each registration of a name gets a new version, so the pool never serves a replaced adapter.
    """

    def __init__(self) -> None:
        self._compiled: dict[str, tuple[str, CompiledAdapter]] = {}
        self._registrations = itertools.count()

    def put(self, name: str, compiled: CompiledAdapter) -> None:
        self._compiled[name] = (str(next(self._registrations)), compiled)

    def pop(self, name: str) -> None:
        self._compiled.pop(name, None)

    def version(self, name: str) -> str | None:
        entry = self._compiled.get(name)
        return None if entry is None else entry[0]

    def load(self, name: str) -> tuple[str, CompiledAdapter]:
        try:
            return self._compiled[name]
        except KeyError:
            raise AdapterNotFound(f"no adapter named {name!r} is registered") from None


class MultiAdapterModel:
    """Wraps a denoiser's target Linears in place and serves per-row adapters through one pool.

    ``base`` is the :class:`BaseView` of the same denoiser (built here from ``targets`` when not given);
    ``source`` is where the pool loads adapters from (the server's registry), else adapters registered
    in memory with :meth:`register`.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        *,
        pool_config: PoolConfig,
        targets: Sequence[str] = DEFAULT_TARGETS,
        base: BaseView | None = None,
        backend: BackendName = "auto",
        max_rows: int = 64,
        max_adapters_per_row: int = 4,
        source: AdapterSource | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.base = base if base is not None else BaseView(denoiser, targets)
        self.target_patterns = self.base.target_patterns
        #: base weights of the wrapped layers (views of the denoiser's own parameters, never modified)
        self.base_weights = self.base.base_weights
        self._memory = InMemoryAdapters()
        self.source: AdapterSource = source if source is not None else self._memory
        self.pool = AdapterPool(self.base.layer_shapes, pool_config, self.source)
        self.ops = make_ops(backend, pool_config.device)
        self.batch = AdapterBatch(max_rows, max_adapters_per_row, device=pool_config.device, backend=self.ops)
        self.layers: dict[str, MultiAdapterLinear] = inject_adapters(
            denoiser, self.pool.layers, self.batch, self.ops
        )

    # ------------------------------------------------------------------ adapters

    def check_targets(self, adapter: Adapter) -> None:
        """Reject adapters that touch layers outside the wrapped set, saying which and why."""
        self.base.check_targets(adapter)

    def compile(self, adapter: Adapter, *, max_rank: int | None = None) -> CompiledAdapter:
        return self.base.compile(adapter, max_rank=max_rank)

    def register(
        self, name: str, adapter: Adapter | CompiledAdapter, *, max_rank: int | None = None
    ) -> CompiledAdapter:
        """Compile (if needed) and keep ``adapter`` in memory under ``name`` (the default pool source)."""
        compiled = (
            adapter if isinstance(adapter, CompiledAdapter) else self.compile(adapter, max_rank=max_rank)
        )
        self._memory.put(name, compiled)
        with contextlib.suppress(PoolExhausted):  # pinned: in-flight rows keep the old copy
            self.pool.evict(name)
        return compiled

    def unregister(self, name: str) -> None:
        self.pool.evict(name)
        self._memory.pop(name)

    def has_adapter(self, name: str) -> bool:
        """Whether ``name`` can be served (a look-up in the source; no side effects)."""
        return self.source.version(name) is not None

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
