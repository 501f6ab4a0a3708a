"""The torch backend: the reference implementation and the CPU serving path."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from deft_runtime.batch import NO_ADAPTER, AdapterBatch, Mapping
from deft_runtime.ops import AdapterOps, LayerPages


def reference_add_adapters(
    y: torch.Tensor, x: torch.Tensor, pages: LayerPages, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The op's semantics, row by row, in float32 (the oracle for kernel tests; slow on purpose).

    Pseudo-code (``x: [R, T, d_in]``, ``y: [R, T, d_out]``, ``slots``/``weights``: ``[R, K]``)::

        for i, k:  s = slots[i, k];  skip if s == NO_ADAPTER
                   p = page_table[s, :ranks[s]]
                   y[i] += weights[i, k] * (x[i] @ A[p].T) @ B[p]
    """
    out = y.float().clone()
    slots_h, weights_h = slots.cpu().tolist(), weights.cpu().tolist()
    table, ranks = pages.page_table.cpu(), pages.ranks.cpu()
    for i, row in enumerate(slots_h):
        for k, s in enumerate(row):
            if s == NO_ADAPTER or int(ranks[s]) == 0:
                continue
            p = table[s, : int(ranks[s])].long().to(x.device)
            v = x[i].float() @ pages.A[p].float().T
            out[i] += weights_h[i][k] * (v @ pages.B[p].float())
    return y.copy_(out.to(y.dtype))


@dataclass(frozen=True)
class Run:
    """Consecutive rows ``[start, stop)`` sharing one slot; ``weight`` is a float when all rows agree,
    else a float32 ``[n, 1, 1]`` view of the backend's preallocated weight buffer."""

    start: int
    stop: int
    weight: float | torch.Tensor


@dataclass(frozen=True)
class Segment:
    """All rows that use one slot in this forward (the torch backend's work unit)."""

    slot: int
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Tiling:
    """The common shape of a mixed batch: every slot has one run of ``n`` rows, and the runs tile rows
    ``[start, start + len(slots)·n)`` in slot order with scalar weights (e.g. one adapter per request,
    its CFG rows adjacent). Then a layer runs one batched matmul pair for all slots at once."""

    start: int
    n: int
    slots: tuple[int, ...]
    alpha: float  # the weight every run shares, or 1.0 when they differ
    weights: torch.Tensor | None  # float32 ``[len(slots), 1, 1]`` when they differ

    @property
    def stop(self) -> int:
        return self.start + len(self.slots) * self.n


def plan_tiling(segments: Sequence[Segment], device: torch.device) -> Tiling | None:
    """The :class:`Tiling` of ``segments``, or None when they do not tile (pure, bar one small copy)."""
    if len(segments) < 2 or any(len(seg.runs) != 1 for seg in segments):
        return None
    runs = [seg.runs[0] for seg in segments]
    n = runs[0].stop - runs[0].start
    if any(r.stop - r.start != n or isinstance(r.weight, torch.Tensor) for r in runs):
        return None
    if any(b.start != a.stop for a, b in itertools.pairwise(runs)):
        return None
    weights = [float(r.weight) for r in runs]
    if all(w == weights[0] for w in weights):
        return Tiling(runs[0].start, n, tuple(seg.slot for seg in segments), weights[0], None)
    tensor = torch.tensor(weights, dtype=torch.float32).view(-1, 1, 1).to(device)
    return Tiling(runs[0].start, n, tuple(seg.slot for seg in segments), 1.0, tensor)


def _rank(index: slice | torch.Tensor) -> int:
    return index.stop - index.start if isinstance(index, slice) else int(index.numel())


class StackCache:
    """Each layer's stacked ``A`` and ``B`` of a :class:`Tiling`'s slots, kept between forwards.

    Consecutive steps of the same requests reuse one tiling, and stacking its slots' pages (two copies
    per layer) would otherwise be redone in every layer of every forward. An entry is valid while the
    layer's ``page_index`` entries for those slots are the very objects it was stacked from: the pool
    publishes a new index object whenever it writes a slot's pages, clears it on eviction, and never
    rewrites the pages of a published slot. So an adapter reloaded into the same slot and pages (equal
    slices, new objects) misses. Entries hold references to their index objects, so identity cannot be
    confused by a recycled ``id``. One entry per layer, within ``budget_bytes`` in all (a stack that
    would exceed it is used once and not kept: large layers' stacks are cheap next to their matmuls).
    """

    def __init__(self, budget_bytes: int = 64 << 20) -> None:
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: dict[
            int, tuple[LayerPages, tuple[slice | torch.Tensor, ...], torch.Tensor, torch.Tensor]
        ] = {}

    def get(
        self, pages: LayerPages, indices: tuple[slice | torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`stack_pages` of ``indices`` (one page index per slot), from the cache when valid."""
        entry = self._entries.get(id(pages))
        if (
            entry is not None
            and entry[0] is pages
            and len(entry[1]) == len(indices)
            and all(a is b for a, b in zip(entry[1], indices, strict=True))
        ):
            self.hits += 1
            return entry[2], entry[3]
        self.misses += 1
        A, B = stack_pages(pages, indices)
        if entry is not None:
            del self._entries[id(pages)]
            self.nbytes -= _nbytes(entry[2], entry[3])
        size = _nbytes(A, B)
        if self.nbytes + size <= self.budget_bytes:
            self._entries[id(pages)] = (pages, indices, A, B)
            self.nbytes += size
        return A, B

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


def stack_pages(
    pages: LayerPages, indices: Sequence[slice | torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stack(A[p_u]), stack(B[p_u]))``: ``[U, r, d_in]`` and ``[U, r, d_out]`` (equal ranks)."""
    return torch.stack([pages.A[i] for i in indices]), torch.stack([pages.B[i] for i in indices])


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def tiled_add_adapters(
    y: torch.Tensor, x: torch.Tensor, pages: LayerPages, tiling: Tiling, stacks: StackCache | None = None
) -> bool:
    """:func:`segmented_add_adapters` for a :class:`Tiling`, as two batched matmuls; False (nothing
    done) when this layer's pages do not allow it (a slot untargeted here, ranks that differ).

    Pseudo-code (``U`` slots of ``n`` rows, ``T`` tokens)::

        A, B = stack(pages.A[p_u]), stack(pages.B[p_u])          # [U, r, d_in], [U, r, d_out]
        v = x[rows].view(U, n·T, d_in) @ A.T * weights              # [U, n·T, r]
        y[rows].view(U, n·T, d_out) += v @ B

    With ``stacks`` the two stacks come from (and go to) a :class:`StackCache`.
    """
    if x.dim() != 3 or not (x.is_contiguous() and y.is_contiguous()):
        return False
    found = [pages.page_index[slot] for slot in tiling.slots]
    indices = tuple(index for index in found if index is not None)
    if len(indices) != len(found) or len({_rank(index) for index in indices}) != 1:
        return False
    A, B = stacks.get(pages, indices) if stacks is not None else stack_pages(pages, indices)
    u, tokens = len(tiling.slots), tiling.n * x.shape[1]
    v = torch.bmm(x[tiling.start : tiling.stop].view(u, tokens, -1), A.transpose(1, 2))
    if tiling.weights is not None:
        v = v * tiling.weights.to(v.dtype)
    y[tiling.start : tiling.stop].view(u, tokens, -1).baddbmm_(v, B, alpha=tiling.alpha)
    return True


def plan_runs(rows: list[int], weights: list[float]) -> list[tuple[int, int, list[float]]]:
    """Split sorted row indices into maximal consecutive runs: ``[(start, stop, weights)]`` (pure)."""
    runs: list[tuple[int, int, list[float]]] = []
    for row, weight in zip(rows, weights, strict=True):
        if runs and runs[-1][1] == row:
            start, _, ws = runs[-1]
            runs[-1] = (start, row + 1, [*ws, weight])
        else:
            runs.append((row, row + 1, [weight]))
    return runs


def plan_segments(rows: Mapping) -> list[tuple[int, list[int], list[float]]]:
    """Group rows by slot: ``[(slot, row indices, weights)]`` in first-appearance order (pure, no tensors)."""
    by_slot: dict[int, tuple[list[int], list[float]]] = {}
    for i, pairs in enumerate(rows):
        for slot, weight in pairs:
            entry = by_slot.setdefault(slot, ([], []))
            entry[0].append(i)
            entry[1].append(weight)
    return [(slot, r, w) for slot, (r, w) in by_slot.items()]


def segmented_add_adapters(
    y: torch.Tensor, x: torch.Tensor, pages: LayerPages, segments: Sequence[Segment]
) -> torch.Tensor:
    """Gathered-matmul form of the same op, one run of consecutive rows per slot at a time.

    Pseudo-code::

        for seg in segments:                              # one per distinct slot
            p = page_index[seg.slot]                      # [r] page ids; skip if untargeted
            A, B = pages.A[p], pages.B[p]                 # [r, d_in], [r, d_out]
            for run in seg.runs:                          # rows [start, stop), views only
                v = (x[start:stop] @ A.T) * run.weight    # [n, T, r]
                y[start:stop] += v @ B                    # fused: addmm_ into y
    """
    d_out = y.shape[-1]
    for seg in segments:
        index = pages.page_index[seg.slot]
        if index is None:
            continue
        A, B = pages.A[index], pages.B[index]
        r = A.shape[0]
        for run in seg.runs:
            v = torch.matmul(x[run.start : run.stop], A.T)  # [n, T, r]
            alpha = 1.0
            if isinstance(run.weight, torch.Tensor):  # rows of the run blend with different weights
                v = v * run.weight.to(v.dtype)
            else:
                alpha = run.weight  # folded into addmm_: one op fewer per run
            target = y[run.start : run.stop]
            if target.is_contiguous():
                target.view(-1, d_out).addmm_(v.reshape(-1, r), B, alpha=alpha)
            else:
                target.add_(torch.matmul(v, B), alpha=alpha)
    return y


class TorchOps(AdapterOps):
    """``prepare`` plans one segment per distinct slot (runs of consecutive rows) once per forward; each
    layer then runs two matmuls per run, so a rank-4 adapter never pays for rank 64 and rows without
    adapters cost nothing. Runs that blend different weights read views of one preallocated buffer.

    When the segments tile a block of rows (:class:`Tiling`: the usual one-adapter-per-request batch),
    a layer whose slots share one rank runs two batched matmuls for all of them instead of two per slot:
    the per-op overhead of many small matmuls is what the adapter layers cost on a CPU. Each layer's
    stacked pages are kept (:class:`StackCache`) while its slots stay published, so the next steps of
    the same requests skip the stacking."""

    name: ClassVar[str] = "torch"

    def __init__(self) -> None:
        super().__init__()
        self.segments: list[Segment] = []
        self.tiling: Tiling | None = None
        self._weights = torch.empty(0)
        self._host_weights = torch.empty(0)
        #: tiled layers' stacked pages, reused across the forwards of one tiling
        self.stacks = StackCache()

    def allocate(self, batch: AdapterBatch) -> None:
        # every (row, pair) lands in exactly one run, so max_rows·K weights always fit
        self._weights = torch.zeros(batch.max_rows * batch.K, dtype=torch.float32, device=batch.device)
        self._host_weights = torch.zeros(batch.max_rows * batch.K, dtype=torch.float32)

    def update(self, rows: Mapping) -> None:
        used = 0
        segments = []
        for slot, row_ids, weights in plan_segments(rows):
            runs = []
            for start, stop, ws in plan_runs(row_ids, weights):
                if all(w == ws[0] for w in ws):
                    runs.append(Run(start, stop, ws[0]))
                    continue
                self._host_weights[used : used + len(ws)] = torch.tensor(ws)
                runs.append(Run(start, stop, self._weights[used : used + len(ws)].view(-1, 1, 1)))
                used += len(ws)
            segments.append(Segment(slot, tuple(runs)))
        if used:
            self._weights[:used].copy_(self._host_weights[:used])
        self.segments = segments
        self.tiling = plan_tiling(segments, self._weights.device)

    def add_adapters(
        self, y: torch.Tensor, x: torch.Tensor, pages: LayerPages, batch: AdapterBatch
    ) -> torch.Tensor:
        self.check_prepared(batch)
        if self.tiling is not None and tiled_add_adapters(y, x, pages, self.tiling, self.stacks):
            return y
        return segmented_add_adapters(y, x, pages, self.segments)


def factored_deft_delta(
    x: torch.Tensor, base_no_bias: torch.Tensor, Q: torch.Tensor, right: torch.Tensor, sR: torch.Tensor
) -> torch.Tensor:
    """DEFT's update in factored form, for comparison with the compiled ``B·(A·x)``.

    Pseudo-code (``x: [.., d_in]``, ``base_no_bias = x @ W0.T: [.., d_out]``, ``Q, right: [d_out, r]``,
    ``sR = s·g·R: [r, d_in]``)::

        return (x @ sR.T − base_no_bias @ right) @ Q.T        # = x @ (Q·(sR − rightᵀ·W0))ᵀ

    It costs ``r·(d_in + 2·d_out)`` multiply-adds per token against ``r·(d_in + d_out)`` for the
    compiled form, and needs the base output without bias; benchmarks/ measures both.
    """
    return (x @ sR.T - base_no_bias @ right) @ Q.T
