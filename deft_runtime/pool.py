"""Adapter memory: device pages ◄ host LRU cache ◄ source (registry / compile).

**Device tier.** Every wrapped layer ``l`` owns ``N`` pages of ``A`` rows (``[N, d_in_l]``) and ``B``
columns (``[N, d_out_l]``); ``N`` follows from the byte budget. An adapter of rank ``r_l`` in layer ``l``
takes exactly ``r_l`` free pages there (any pages: one page per rank vector, S-LoRA's unified paging),
so adapters of different ranks share the pool with no padding to a maximum rank and resident bytes
equal the factor bytes in the serving dtype. A *slot* names a resident adapter in the page tables.

**Host tier.** Compiled factors in the serving dtype (pinned memory on CUDA), LRU under its own byte
budget, filled from ``source(name) -> CompiledAdapter``.

**Pins.** :meth:`AdapterPool.acquire` pins adapters for an in-flight request (reference counts) and
starts their host→device copies on a side CUDA stream; :meth:`ready` says whether the copies are done, so
a batch that does not need them never waits. Only unpinned adapters are evicted (least recently used
first); a request whose adapters cannot fit gets :class:`~deft_runtime.errors.PoolExhausted`.

**Versions.** The source names the version (e.g. the sha256 of the registered bytes) an adapter has now;
each cached copy remembers the version it was loaded at, and :meth:`acquire` reuses a copy only while
the source still names that version. So a name deleted, or re-registered with other bytes (here or by
another replica sharing the registry), is reloaded or refused at its next use, and nobody has to evict
copies from outside to keep the pool correct.

**One-read cold loads.** A source may also offer ``direct_load(name) -> DirectLoad | None``: the
adapter's ranks and a function that reads its factors straight into given tensors (the server's
registry reads its compiled file with ``preadv``). On a float32 CPU pool, a cold acquire then reserves
the slot and contiguous pages, reads the file into the page rows with no lock held, and publishes the
page tables: one read, no host copy and no second copy. Anything else (scattered pages, a short read,
a source without it, CUDA) takes the copying path above. With :class:`ReadSpans` (the file's tensors in
file order as arrays) the whole load is vectorised: free pages are numpy stacks (one row per layer),
the page tables of every layer are one stacked array, and the read is one ``preadv`` per 1024 tensors
of an iovec array computed in one pass, so no Python work runs per layer but the page-index mirror.

**Locking.** ``_lock`` guards this pool's bookkeeping only and is a leaf: it is never held while calling
the source (registry look-ups, disk reads, compilation) or any other component, so a slow or blocked
source never stalls the engine thread, which takes the lock for :meth:`ready` and :meth:`release`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from deft_runtime.compile import CompiledAdapter
from deft_runtime.errors import AdapterIncompatible, AdapterNotFound, PoolExhausted, UnknownTargetModule
from deft_runtime.ops import LayerPages

log = logging.getLogger(__name__)


@runtime_checkable
class AdapterSource(Protocol):
    """Where the pool gets compiled adapters (the server's registry, an in-memory table, a benchmark).

    Both methods may block (database, disk, compilation); the pool calls them with no lock held.
    """

    def version(self, name: str) -> str | None:
        """The version ``name`` has now (any string that changes when its bytes change), or None when
        no adapter of that name exists. A look-up only: no side effects."""

    def load(self, name: str) -> tuple[str, CompiledAdapter]:
        """``name``'s compiled factors and the version they are; raises AdapterNotFound when gone."""


@dataclass(frozen=True)
class DirectLoad:
    """A source's offer to read ``version`` of an adapter straight into the pool's pages.

    ``ranks``/``shapes`` (``(d_out, d_in)``) per layer come from the file's header; ``read_into`` fills
    ``{layer: (A [r, d_in], Bᵀ [r, d_out])}`` (float32 numpy views of the CPU pool's pages) and returns
    False when it could not (the pool then loads the copying way); ``on_loaded(seconds)`` reports a
    completed read.
    """

    version: str
    ranks: Mapping[str, int]
    shapes: Mapping[str, tuple[int, int]]
    nbytes: int
    read_into: Callable[[dict[str, tuple[Any, Any]]], bool]
    on_loaded: Callable[[float], None] = lambda seconds: None
    #: the vectorised form of the same read (the pool prefers it): see :class:`ReadSpans`
    spans: ReadSpans | None = None


@dataclass(frozen=True, eq=False)
class ReadSpans:
    """A compiled file's tensors as arrays, so the pool plans a whole load with no per-layer Python.

    ``layers`` (with their ``ranks``, ``d_out`` and ``d_in``, int64 arrays aligned with it) are the
    adapter's layers; span ``k`` of the file (in file order, back to back) is the ``A`` (``span_is_a``)
    or ``Bᵀ`` of ``layers[span_layer[k]]`` and holds ``span_bytes[k]`` bytes. ``read(iov)`` fills an
    iovec array (uint64 ``[k, 2]``: address, length; one row per span, lengths equal to ``span_bytes``)
    from the file and returns False when it could not (changed file, short read, I/O error).
    """

    layers: tuple[str, ...]
    ranks: np.ndarray
    d_out: np.ndarray
    d_in: np.ndarray
    span_layer: np.ndarray
    span_is_a: np.ndarray
    span_bytes: np.ndarray
    read: Callable[[np.ndarray], bool]


class StaticSource:
    """A source whose adapters never change: ``load(name)`` is ``fn(name)`` and every version is ``"static"``."""

    def __init__(self, fn: Callable[[str], CompiledAdapter]) -> None:
        self.fn = fn

    def version(self, name: str) -> str | None:
        return "static"

    def load(self, name: str) -> tuple[str, CompiledAdapter]:
        return "static", self.fn(name)


@dataclass(frozen=True)
class PoolConfig:
    """Budgets fixed at start-up. ``max_slots`` bounds the adapters resident at once."""

    device_bytes: int
    host_bytes: int
    max_slots: int = 256
    max_rank: int = 64
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class PoolStats:
    """Counters for the metrics layer (read, never reset, by the server)."""

    loads: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    evictions: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0})
    hits: int = 0
    misses: int = 0


@dataclass
class _HostFactors:
    """One adapter's factors on the host: per layer ``A [r, d_in]`` and ``Bᵀ [r, d_out]``."""

    A: dict[str, torch.Tensor]
    Bt: dict[str, torch.Tensor]
    nbytes: int
    version: str


@dataclass
class _Pages:
    """One adapter's pages: in the layers at pool positions ``layers``, ``ranks[i]`` pages each, listed
    ascending in ``ids[i, :ranks[i]]`` (``valid`` marks those entries; the rest is padding)."""

    layers: np.ndarray  # int64 [n]
    ranks: np.ndarray  # int64 [n]
    ids: np.ndarray  # int64 [n, max rank]
    valid: np.ndarray  # bool [n, max rank]

    def run_starts(self) -> np.ndarray | None:
        """The first page of every layer when each layer's pages are one ascending run, else None."""
        steps = (self.ids[:, 1:] - self.ids[:, :-1] == 1) | ~self.valid[:, 1:]
        return self.ids[:, 0] if bool(steps.all()) else None

    def row(self, i: int) -> list[int]:
        return self.ids[i, : self.ranks[i]].tolist()


@dataclass(frozen=True)
class _Fit:
    """Where a direct load's factors go: pool positions and ranks of its layers; with a
    :class:`ReadSpans`, per span of the file (``at``: its row in ``layers``) the address of its layer's
    page row 0 (``base``), the bytes of one page row and the span's length."""

    layers: np.ndarray
    ranks: np.ndarray
    at: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    base: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    row_bytes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    lengths: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


@dataclass
class _Resident:
    slot: int
    pages: _Pages
    nbytes: int
    version: str
    pins: int = 0
    ready: torch.cuda.Event | None = None


class AdapterPool:
    """Device pages and host cache for compiled adapters, shared by every wrapped layer."""

    def __init__(
        self,
        layer_shapes: Mapping[str, tuple[int, int]],
        config: PoolConfig,
        source: AdapterSource | Callable[[str], CompiledAdapter],
    ) -> None:
        self.config = config
        #: a plain callable is a source whose adapters never change (tests, benchmarks)
        self.source: AdapterSource = source if isinstance(source, AdapterSource) else StaticSource(source)
        self.layer_shapes = dict(layer_shapes)
        elem = torch.empty((), dtype=config.dtype).element_size()
        self.page_bytes = sum(d_out + d_in for d_out, d_in in layer_shapes.values()) * elem
        self.num_pages = config.device_bytes // self.page_bytes if self.page_bytes else 0
        if self.num_pages < 1:
            raise ValueError(
                f"device budget {config.device_bytes} B is below one rank-1 page across all layers ({self.page_bytes} B)"
            )
        self._names = tuple(layer_shapes)
        self._position = {name: i for i, name in enumerate(self._names)}
        self._dims = np.array([layer_shapes[n] for n in self._names], dtype=np.int64).reshape(-1, 2)
        # every layer's page table and ranks are rows of one stacked tensor: vectorised publishing
        n_layers, slots, max_rank = len(self._names), config.max_slots, config.max_rank
        self._tables = torch.zeros(n_layers, slots, max_rank, dtype=torch.int32, device=config.device)
        self._ranks = torch.zeros(n_layers, slots, dtype=torch.int32, device=config.device)
        self.layers = {
            name: LayerPages(
                A=torch.zeros(self.num_pages, d_in, dtype=config.dtype, device=config.device),
                B=torch.zeros(self.num_pages, d_out, dtype=config.dtype, device=config.device),
                page_table=self._tables[i],
                ranks=self._ranks[i],
                page_index=[None] * slots,
            )
            for i, (name, (d_out, d_in)) in enumerate(layer_shapes.items())
        }
        self._page_index = [lp.page_index for lp in self.layers.values()]
        # free pages per layer: a stack in each row (top at ``_free_count``), popped in ascending order
        self._free = np.tile(np.arange(self.num_pages - 1, -1, -1, dtype=np.int64), (n_layers, 1))
        self._free_count = np.full(n_layers, self.num_pages, dtype=np.int64)
        self._free_slots = list(range(config.max_slots - 1, -1, -1))
        #: 0, 1, … num_pages-1 on the device: page-table rows of a contiguous run are a view of it
        self._page_numbers = torch.arange(self.num_pages, dtype=torch.int32, device=config.device)
        self._fits: dict[int, tuple[ReadSpans, _Fit | None]] = {}  # per ReadSpans (held: ids stay unique)
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order, oldest first
        self._host: OrderedDict[str, _HostFactors] = OrderedDict()
        self._host_bytes = 0
        self._lock = threading.Lock()  # a leaf: see the module docstring
        self._stream = torch.cuda.Stream(device=config.device) if config.device.type == "cuda" else None
        self.stats = PoolStats()
        #: one-read cold loads: the source offers them and the pages are float32 host memory
        self._direct = (
            callable(getattr(self.source, "direct_load", None))
            and config.device.type == "cpu"
            and config.dtype == torch.float32
        )
        # numpy views of the CPU pool's pages and tables, for the one-read path: no op dispatch per layer
        self._host_pages = (
            {n: (lp.A.numpy(), lp.B.numpy()) for n, lp in self.layers.items()} if self._direct else {}
        )
        self._tables_np: Any = self._tables.numpy() if self._direct else None
        self._ranks_np: Any = self._ranks.numpy() if self._direct else None
        if self._direct:  # where each layer's page rows start, and their bytes, for iovec arrays
            pages = list(self.layers.values())
            self._row_ptr = np.array([[lp.A.data_ptr(), lp.B.data_ptr()] for lp in pages], dtype=np.int64)
            self._row_bytes = self._dims[:, ::-1] * 4  # (d_in, d_out) × float32

    # ------------------------------------------------------------------ public API

    def acquire(self, names: Iterable[str]) -> dict[str, int]:
        """Pin ``names`` for one request and make them resident; returns name → slot.

        All-or-nothing: on any error (:class:`PoolExhausted`, :class:`AdapterNotFound`, …) no pin is
        left behind. Blocks on the source for adapters not cached at their current version.
        """
        acquired: list[str] = []
        try:
            for name in dict.fromkeys(names):
                self._pin(name)
                acquired.append(name)
        except BaseException:
            self.release(acquired)
            raise
        with self._lock:  # pinned adapters are never evicted, so their slots are stable
            return {name: self._resident[name].slot for name in acquired}

    def release(self, names: Iterable[str]) -> None:
        """Drop one pin from each adapter; unpinned adapters stay cached until space is needed."""
        with self._lock:
            for name in dict.fromkeys(names):
                res = self._resident.get(name)
                if res is not None and res.pins > 0:
                    res.pins -= 1

    def ready(self, names: Iterable[str]) -> bool:
        """Whether the host→device copies of these (acquired) adapters have finished."""
        with self._lock:
            for name in names:
                res = self._resident.get(name)
                if res is None:
                    return False
                if res.ready is not None:
                    if not res.ready.query():
                        return False
                    res.ready = None
            return True

    def evict(self, name: str) -> None:
        """Drop ``name`` from both tiers (e.g. deleted from the registry); refuses while it is pinned."""
        with self._lock:
            res = self._resident.get(name)
            if res is not None:
                if res.pins:
                    raise PoolExhausted(
                        f"adapter {name!r} is in use by {res.pins} request(s) and cannot be evicted"
                    )
                self._evict_device(name)
            self._drop_host(name)

    def slot_of(self, name: str) -> int:
        return self._resident[name].slot

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def pins(self, name: str) -> int:
        res = self._resident.get(name)
        return 0 if res is None else res.pins

    @property
    def resident_bytes(self) -> dict[str, int]:
        """Bytes held per tier, for metrics and the memory benchmark."""
        return {"device": sum(r.nbytes for r in self._resident.values()), "host": self._host_bytes}

    def resident_count(self) -> dict[str, int]:
        return {"device": len(self._resident), "host": len(self._host)}

    def resident_nbytes(self, name: str) -> int:
        return self._resident[name].nbytes

    def free_pages(self) -> dict[str, int]:
        """Free pages per layer."""
        with self._lock:
            return dict(zip(self._names, self._free_count.tolist(), strict=True))

    # ------------------------------------------------------------------ tiers

    def _pin(self, name: str) -> None:
        """Pin one adapter at the version the source names now (loading it, with no lock held, if needed)."""
        version = self.source.version(name)
        if version is None:
            self.source.load(name)  # raises the source's own AdapterNotFound (it knows the user's name)
            raise AdapterNotFound(f"no adapter named {name!r} is registered")
        with self._lock:
            if self._pin_resident(name, version):
                return
            host = self._host_hit(name, version)
        if host is None:
            if self._direct and self._pin_direct(name):
                return
            loaded_version, compiled = self.source.load(name)
            host = self._to_host(name, compiled, loaded_version)
        with self._lock:
            self._remember_host(name, host)
            if self._pin_resident(name, host.version, count=False):  # made resident by another thread
                return
            layers = np.array([self._position[layer] for layer in host.A], dtype=np.int64)
            ranks = np.array([a.shape[0] for a in host.A.values()], dtype=np.int64)
            self._make_room(name, layers, ranks)
            self._copy_to_device(name, host, layers, ranks).pins += 1

    def _pin_direct(self, name: str) -> bool:
        """The one-read cold load (module docstring); False when the copying path must run instead."""
        offer: DirectLoad | None = self.source.direct_load(name)  # type: ignore[attr-defined]
        fit = None if offer is None else self._fit(offer)
        if offer is None or fit is None:
            return False
        with self._lock:
            if self._pin_resident(name, offer.version, count=False):
                return True
            self._make_room(name, fit.layers, fit.ranks)
            slot, pages = self._reserve(fit.layers, fit.ranks)
        starts = pages.run_starts()
        done = False
        try:
            if starts is not None:  # every layer's pages are one ascending run
                begin = time.perf_counter()
                done = self._read_direct(offer, fit, starts)
                if done:
                    offer.on_loaded(time.perf_counter() - begin)
        finally:
            with self._lock:
                if not done or self._pin_resident(name, offer.version, count=False):  # lost a race: theirs
                    self._unreserve(slot, pages)
                else:
                    assert starts is not None
                    self._publish(name, offer, slot, pages, starts)
        return done

    def _read_direct(self, offer: DirectLoad, fit: _Fit, starts: np.ndarray) -> bool:
        """Read the offer's file into the reserved page runs (no lock held)."""
        spans = offer.spans
        if spans is None:  # a source without the vectorised plan: one numpy view per tensor
            host, names = self._host_pages, self._names
            dests = {}
            for i, start, r in zip(fit.layers.tolist(), starts.tolist(), fit.ranks.tolist(), strict=True):
                a, bt = host[names[i]]
                dests[names[i]] = (a[start : start + r], bt[start : start + r])
            return offer.read_into(dests)
        iov = np.empty((len(fit.at), 2), dtype=np.uint64)
        iov[:, 0] = fit.base + starts[fit.at] * fit.row_bytes
        iov[:, 1] = fit.lengths
        return spans.read(iov)

    def _fit(self, offer: DirectLoad) -> _Fit | None:
        """Where the offer's factors go, when every layer of it is wrapped here with the same shape and a
        rank within bounds (else None: the copying path raises the precise error). Worked out once per
        :class:`ReadSpans` (sources cache their plans), so a load does no per-layer work for it."""
        spans = offer.spans
        if spans is None:
            names = tuple(offer.ranks)
            ranks = np.array(list(offer.ranks.values()), dtype=np.int64)
            shapes = np.array([offer.shapes[n] for n in names], dtype=np.int64).reshape(-1, 2)
            return self._fit_layers(names, ranks, shapes)
        hit = self._fits.get(id(spans))
        if hit is not None and hit[0] is spans:
            return hit[1]
        fit = self._fit_layers(spans.layers, spans.ranks, np.stack([spans.d_out, spans.d_in], axis=1))
        if fit is not None:
            at = spans.span_layer
            if len(at) != len(spans.span_bytes) or bool(((at < 0) | (at >= len(fit.layers))).any()):
                fit = None
            else:  # span k of the file goes to the page rows of its layer and role (0: A, 1: Bᵀ)
                layer, role = fit.layers[at], np.where(spans.span_is_a, 0, 1)
                row_bytes = self._row_bytes[layer, role]
                lengths = fit.ranks[at] * row_bytes
                covered = np.zeros((len(fit.layers), 2), dtype=np.int64)
                np.add.at(covered, (at, role), 1)
                if np.array_equal(lengths, spans.span_bytes) and bool((covered == 1).all()):
                    fit = _Fit(fit.layers, fit.ranks, at, self._row_ptr[layer, role], row_bytes, lengths)
                else:
                    fit = None
        if len(self._fits) >= 256:
            self._fits.clear()
        self._fits[id(spans)] = (spans, fit)
        return fit

    def _fit_layers(self, names: tuple[str, ...], ranks: np.ndarray, shapes: np.ndarray) -> _Fit | None:
        layers = np.array([self._position.get(layer, -1) for layer in names], dtype=np.int64)
        if not len(layers) or bool((layers < 0).any()) or len(set(names)) != len(names):
            return None
        if not np.array_equal(self._dims[layers], shapes):
            return None
        if bool((ranks <= 0).any()) or bool((ranks > self.config.max_rank).any()):
            return None
        return _Fit(layers, ranks)

    def _reserve(self, layers: np.ndarray, ranks: np.ndarray) -> tuple[int, _Pages]:
        """Take a free slot and ``ranks[i]`` free pages in layer ``layers[i]`` (caller holds the lock)."""
        slot = self._free_slots.pop()
        depth = np.arange(int(ranks.max()) if len(ranks) else 0)
        top = self._free_count[layers][:, None] - 1 - depth  # stack positions, top first: ascending pages
        valid = depth < ranks[:, None]
        ids = np.where(valid, self._free[layers[:, None], np.maximum(top, 0)], -1)
        self._free_count[layers] -= ranks
        return slot, _Pages(layers, ranks, ids, valid)

    def _unreserve(self, slot: int, pages: _Pages) -> None:
        """Give ``pages`` back (popped again in ascending order) and ``slot`` (caller holds the lock)."""
        row, depth = np.nonzero(pages.valid)
        layer = pages.layers[row]
        self._free[layer, self._free_count[layer] + pages.ranks[row] - 1 - depth] = pages.ids[row, depth]
        self._free_count[pages.layers] += pages.ranks
        self._free_slots.append(slot)

    def _publish(self, name: str, offer: DirectLoad, slot: int, pages: _Pages, starts: np.ndarray) -> None:
        """Make reserved, filled pages the resident copy of ``name``, pinned once (caller holds the lock)."""
        layers, ranks = pages.layers, pages.ranks
        self._tables_np[layers, slot, : pages.ids.shape[1]] = np.maximum(pages.ids, 0)
        self._ranks_np[layers, slot] = ranks
        index = self._page_index
        for i, start, r in zip(layers.tolist(), starts.tolist(), ranks.tolist(), strict=True):
            index[i][slot] = slice(start, start + r)
        self._resident[name] = _Resident(slot=slot, pages=pages, nbytes=offer.nbytes, version=offer.version)
        self._resident[name].pins += 1
        self.stats.loads["device"] += 1

    def _pin_resident(self, name: str, version: str, *, count: bool = True) -> bool:
        """Pin the resident copy of ``name`` if it is that version (or pinned: in-flight requests keep the
        bytes they started with); drop an unpinned copy of another version. Caller holds the lock."""
        res = self._resident.get(name)
        if res is not None and res.version != version and res.pins == 0:
            self._evict_device(name)
            res = None
        if res is None:
            self.stats.misses += count
            return False
        if res.version != version:
            log.warning(
                "adapter %r changed while requests use it; they keep the copy they started with", name
            )
        self._resident.move_to_end(name)
        self.stats.hits += count
        res.pins += 1
        return True

    def _host_hit(self, name: str, version: str) -> _HostFactors | None:
        host = self._host.get(name)
        if host is None:
            return None
        if host.version != version:
            self._drop_host(name)
            return None
        self._host.move_to_end(name)
        return host

    def _remember_host(self, name: str, host: _HostFactors) -> None:
        """Put ``host`` in the host LRU (replacing another version of ``name``) and keep its budget."""
        if self._host.get(name) is host:
            return
        self._drop_host(name)
        self._host[name] = host
        self._host_bytes += host.nbytes
        self.stats.loads["host"] += 1
        while self._host_bytes > self.config.host_bytes and len(self._host) > 1:
            oldest = next(iter(self._host))
            if oldest == name:
                break
            self._drop_host(oldest)
            self.stats.evictions["host"] += 1

    def _drop_host(self, name: str) -> None:
        host = self._host.pop(name, None)
        if host is not None:
            self._host_bytes -= host.nbytes

    def _to_host(self, name: str, compiled: CompiledAdapter, version: str) -> _HostFactors:
        pin = self.config.device.type == "cuda"
        A, Bt = {}, {}
        for layer, f in compiled.factors.items():
            if layer not in self.layer_shapes:
                raise UnknownTargetModule(f"adapter {name!r} targets {layer!r}, which is not a wrapped layer")
            if (f.B.shape[0], f.A.shape[1]) != self.layer_shapes[layer]:
                raise AdapterIncompatible(
                    f"adapter {name!r}: factors of {layer!r} do not fit the wrapped layer"
                )
            if f.rank > self.config.max_rank:
                raise PoolExhausted(
                    f"adapter {name!r} has rank {f.rank} in {layer!r}, above the pool's max_rank {self.config.max_rank}"
                )
            # the compiled cache's views are already A and Bᵀ, contiguous: no copy unless the dtype differs
            a = f.A.to(self.config.dtype).contiguous()
            bt = f.B.T.to(self.config.dtype).contiguous()
            A[layer], Bt[layer] = (_pinned(a), _pinned(bt)) if pin else (a, bt)
        nbytes = sum(t.numel() * t.element_size() for t in (*A.values(), *Bt.values()))
        return _HostFactors(A=A, Bt=Bt, nbytes=nbytes, version=version)

    def _make_room(self, name: str, layers: np.ndarray, ranks: np.ndarray) -> None:
        def fits() -> bool:
            return bool(self._free_slots) and bool((self._free_count[layers] >= ranks).all())

        while not fits():
            victim = next((n for n, r in self._resident.items() if r.pins == 0), None)
            if victim is None:
                pinned = sum(1 for r in self._resident.values() if r.pins)
                raise PoolExhausted(
                    f"adapter {name!r} does not fit in the device pool: {pinned} pinned adapter(s) hold the space "
                    f"({self.num_pages} pages per layer, {self.config.max_slots} slots). Retry when requests finish, "
                    "or start the server with a larger adapter memory budget."
                )
            self._evict_device(victim)

    def _evict_device(self, name: str) -> None:
        res = self._resident.pop(name)
        layers = res.pages.layers
        for i in layers.tolist():
            self._page_index[i][res.slot] = None
        if self._direct:  # numpy views of the CPU tables (see _publish)
            self._ranks_np[layers, res.slot] = 0
        else:
            self._ranks[torch.from_numpy(layers).to(self._ranks.device), res.slot] = 0
        self._unreserve(res.slot, res.pages)
        self.stats.evictions["device"] += 1

    def _copy_to_device(
        self, name: str, host: _HostFactors, layers: np.ndarray, ranks: np.ndarray
    ) -> _Resident:
        slot, pages = self._reserve(layers, ranks)
        stream = self._stream
        if stream is not None:
            # pages may have just been freed by an eviction: kernels already queued on the compute
            # stream must finish reading them before the side stream overwrites them
            stream.wait_stream(torch.cuda.current_stream(self.config.device))
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for i, layer in enumerate(host.A):
                self._write_pages(self.layers[layer], slot, pages.row(i), host.A[layer], host.Bt[layer])
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        res = _Resident(slot=slot, pages=pages, nbytes=host.nbytes, version=host.version, ready=event)
        self._resident[name] = res
        self.stats.loads["device"] += 1
        return res

    def _write_pages(
        self, lp: LayerPages, slot: int, ids: list[int], A: torch.Tensor, Bt: torch.Tensor
    ) -> None:
        """One layer's factors into its pages ``ids``: a contiguous run (the usual case: pages are handed
        out in order) is two slice copies and a view of the page numbers; scattered pages index-copy."""
        r = len(ids)
        run = _as_slice(ids)
        if run is not None:
            lp.A[run].copy_(A, non_blocking=True)
            lp.B[run].copy_(Bt, non_blocking=True)
            lp.page_table[slot, :r].copy_(self._page_numbers[run], non_blocking=True)
            lp.page_index[slot] = run
        else:
            dev_ids = torch.tensor(ids, dtype=torch.int64).to(lp.A.device, non_blocking=True)
            lp.A.index_copy_(0, dev_ids, A.to(lp.A.device, non_blocking=True))
            lp.B.index_copy_(0, dev_ids, Bt.to(lp.B.device, non_blocking=True))
            lp.page_table[slot, :r] = dev_ids.to(torch.int32)
            lp.page_index[slot] = dev_ids
        lp.ranks[slot] = r


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_pinned() else t.pin_memory()


def _as_slice(ids: list[int]) -> slice | None:
    """``slice(a, b)`` when ``ids`` is exactly ``a, a+1, …, b-1`` (then pages are read as a view)."""
    if not ids:
        return None
    start = ids[0]
    if ids == list(range(start, start + len(ids))):
        return slice(start, start + len(ids))
    return None
