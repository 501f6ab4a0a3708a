"""The per-forward adapter mapping shared by every wrapped layer.

One :class:`AdapterBatch` is owned by whoever runs the denoiser (the engine, a test, a benchmark).
Before each denoiser forward the owner calls :meth:`AdapterBatch.set` once; every
:class:`~deft_runtime.layers.MultiAdapterLinear` holds a reference to the same object and only reads
it. Nothing is threaded through diffusers' forward signatures, and there are no module globals.

Per row ``i`` of the denoiser batch (a sample; CFG rows of a request repeat its adapters) there are up
to ``K`` ``(slot, weight)`` pairs: ``slot`` is a device-pool slot (see :mod:`deft_runtime.pool`) and
:data:`NO_ADAPTER` marks an unused pair. The sentinel is negative and is never used as an index: kernels
skip it explicitly, so it can never alias the pool's last slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deft_runtime.errors import InvalidRequest

NO_ADAPTER = -1

#: A row's adapters: ``[(slot, weight), ...]`` with at most ``K`` entries; empty means base model only.
RowAdapters = Sequence[tuple[int, float]]


@dataclass(frozen=True)
class Run:
    """Consecutive rows ``[start, stop)`` sharing one slot; ``weight`` is a float when all rows agree,
    else a float32 ``[n, 1, 1]`` tensor (so the torch backend works on views, never on gathered copies)."""

    start: int
    stop: int
    weight: float | torch.Tensor


@dataclass(frozen=True)
class Segment:
    """All rows that use one slot in this forward (the torch backend's work unit)."""

    slot: int
    runs: tuple[Run, ...]


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


def plan_segments(rows: Sequence[RowAdapters]) -> list[tuple[int, list[int], list[float]]]:
    """Group rows by slot: ``[(slot, row indices, weights)]`` in first-appearance order (pure, no tensors)."""
    by_slot: dict[int, tuple[list[int], list[float]]] = {}
    for i, pairs in enumerate(rows):
        for slot, weight in pairs:
            entry = by_slot.setdefault(slot, ([], []))
            entry[0].append(i)
            entry[1].append(weight)
    return [(slot, r, w) for slot, (r, w) in by_slot.items()]


class AdapterBatch:
    """Preallocated per-row mapping, rewritten in place once per denoiser forward.

    Device tensors (read by the Triton kernels):

    - ``slots``: int32 ``[max_rows, K]``, :data:`NO_ADAPTER` where unused
    - ``weights``: float32 ``[max_rows, K]``, 0 where unused

    Host-side plan (read by the torch backend): ``segments``, one per distinct slot.
    """

    def __init__(
        self, max_rows: int, max_adapters_per_row: int = 4, device: torch.device | str = "cpu"
    ) -> None:
        if max_rows < 1 or max_adapters_per_row < 1:
            raise ValueError("max_rows and max_adapters_per_row must be ≥ 1")
        self.max_rows = max_rows
        self.K = max_adapters_per_row
        self.device = torch.device(device)
        self.slots = torch.full((max_rows, self.K), NO_ADAPTER, dtype=torch.int32, device=self.device)
        self.weights = torch.zeros((max_rows, self.K), dtype=torch.float32, device=self.device)
        self._host_slots = torch.full((max_rows, self.K), NO_ADAPTER, dtype=torch.int32)
        self._host_weights = torch.zeros((max_rows, self.K), dtype=torch.float32)
        self.num_rows = 0
        self.segments: list[Segment] = []

    def set(self, rows: Sequence[RowAdapters]) -> None:
        """Describe the next forward: ``rows[i]`` lists row ``i``'s ``(slot, weight)`` pairs."""
        if len(rows) > self.max_rows:
            raise InvalidRequest(f"{len(rows)} rows in one forward, above max_rows={self.max_rows}")
        self._host_slots.fill_(NO_ADAPTER)
        self._host_weights.zero_()
        for i, pairs in enumerate(rows):
            if len(pairs) > self.K:
                raise InvalidRequest(f"row {i} blends {len(pairs)} adapters; at most {self.K} per sample")
            for k, (slot, weight) in enumerate(pairs):
                if slot < 0:
                    raise ValueError(
                        f"row {i}: slot {slot} is not a pool slot (use an empty list for no adapter)"
                    )
                self._host_slots[i, k] = slot
                self._host_weights[i, k] = weight
        self.slots.copy_(self._host_slots, non_blocking=True)
        self.weights.copy_(self._host_weights, non_blocking=True)
        self.num_rows = len(rows)
        self.segments = [
            Segment(slot=slot, runs=tuple(self._run(*run) for run in plan_runs(r, w)))
            for slot, r, w in plan_segments(rows)
        ]

    def _run(self, start: int, stop: int, weights: list[float]) -> Run:
        if all(w == weights[0] for w in weights):
            return Run(start, stop, float(weights[0]))
        return Run(start, stop, torch.tensor(weights, dtype=torch.float32, device=self.device).view(-1, 1, 1))

    def clear(self) -> None:
        """No adapters at all: the wrapped layers reduce to their base layers."""
        self.set([])

    @property
    def is_empty(self) -> bool:
        return not self.segments
