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
a source without it, CUDA) takes the copying path above.

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
class _Resident:
    slot: int
    pages: dict[str, list[int]]  # layer → page ids
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
        self.layers = {
            name: LayerPages.allocate(
                d_in,
                d_out,
                self.num_pages,
                config.max_slots,
                config.max_rank,
                dtype=config.dtype,
                device=config.device,
            )
            for name, (d_out, d_in) in layer_shapes.items()
        }
        self._free_pages = {name: list(range(self.num_pages - 1, -1, -1)) for name in layer_shapes}
        self._free_slots = list(range(config.max_slots - 1, -1, -1))
        #: 0, 1, … num_pages-1 on the device: page-table rows of a contiguous run are a view of it
        self._page_numbers = torch.arange(self.num_pages, dtype=torch.int32, device=config.device)
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
        self._page_numbers_np: Any = self._page_numbers.numpy() if self._direct else None
        self._host_tables = (
            {n: (lp.page_table.numpy(), lp.ranks.numpy()) for n, lp in self.layers.items()}
            if self._direct
            else {}
        )

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
            need = {layer: int(a.shape[0]) for layer, a in host.A.items()}
            self._make_room(name, need)
            self._copy_to_device(name, host, need).pins += 1

    def _pin_direct(self, name: str) -> bool:
        """The one-read cold load (module docstring); False when the copying path must run instead."""
        offer: DirectLoad | None = self.source.direct_load(name)  # type: ignore[attr-defined]
        if offer is None or not self._fits_layers(offer):
            return False
        need = dict(offer.ranks)
        with self._lock:
            if self._pin_resident(name, offer.version, count=False):
                return True
            self._make_room(name, need)
            slot, pages = self._reserve(need)
        maybe_runs = {layer: _as_slice(ids) for layer, ids in pages.items()}
        runs = {layer: run for layer, run in maybe_runs.items() if run is not None}
        done = False
        try:
            if len(runs) == len(maybe_runs):  # every layer's pages are one ascending run
                start = time.perf_counter()
                pages_np = self._host_pages
                dests = {
                    layer: (pages_np[layer][0][run], pages_np[layer][1][run]) for layer, run in runs.items()
                }
                done = offer.read_into(dests)
                if done:
                    offer.on_loaded(time.perf_counter() - start)
        finally:
            with self._lock:
                if not done or self._pin_resident(name, offer.version, count=False):  # lost a race: theirs
                    self._unreserve(slot, pages)
                else:
                    self._publish(name, offer, slot, pages, runs)
        return done

    def _fits_layers(self, offer: DirectLoad) -> bool:
        """Whether every layer of the offer is wrapped here with the same shape and a rank within bounds
        (else the copying path raises the precise error)."""
        return all(
            self.layer_shapes.get(layer) == tuple(offer.shapes[layer]) and 0 < r <= self.config.max_rank
            for layer, r in offer.ranks.items()
        )

    def _reserve(self, need: Mapping[str, int]) -> tuple[int, dict[str, list[int]]]:
        """Take a free slot and ``need[layer]`` free pages per layer (caller holds the lock)."""
        slot = self._free_slots.pop()
        pages = {}
        for layer, r in need.items():
            free = self._free_pages[layer]  # popped from the end: ascending page numbers
            pages[layer] = free[len(free) - r :][::-1]
            del free[len(free) - r :]
        return slot, pages

    def _unreserve(self, slot: int, pages: Mapping[str, list[int]]) -> None:
        for layer, ids in pages.items():
            self._free_pages[layer].extend(reversed(ids))
        self._free_slots.append(slot)

    def _publish(
        self, name: str, offer: DirectLoad, slot: int, pages: dict[str, list[int]], runs: Mapping[str, slice]
    ) -> None:
        """Make reserved, filled pages the resident copy of ``name``, pinned once (caller holds the lock)."""
        for layer, run in runs.items():
            lp = self.layers[layer]
            table, ranks = self._host_tables[layer]  # numpy views of the CPU tables: no op dispatch
            r = run.stop - run.start
            table[slot, :r] = self._page_numbers_np[run]
            lp.page_index[slot] = run
            ranks[slot] = r
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

    def _make_room(self, name: str, need: Mapping[str, int]) -> None:
        def fits() -> bool:
            return bool(self._free_slots) and all(
                len(self._free_pages[layer]) >= r for layer, r in need.items()
            )

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
        for layer, pages in res.pages.items():
            lp = self.layers[layer]
            lp.page_index[res.slot] = None
            if self._direct:  # numpy views of the CPU tables (see _publish)
                self._host_tables[layer][1][res.slot] = 0
            else:
                lp.ranks[res.slot] = 0
            self._free_pages[layer].extend(reversed(pages))  # popped again in ascending order
        self._free_slots.append(res.slot)
        self.stats.evictions["device"] += 1

    def _copy_to_device(self, name: str, host: _HostFactors, need: Mapping[str, int]) -> _Resident:
        slot, pages = self._reserve(need)
        stream = self._stream
        if stream is not None:
            # pages may have just been freed by an eviction: kernels already queued on the compute
            # stream must finish reading them before the side stream overwrites them
            stream.wait_stream(torch.cuda.current_stream(self.config.device))
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for layer, ids in pages.items():
                self._write_pages(self.layers[layer], slot, ids, host.A[layer], host.Bt[layer])
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
