"""The torch backend: the reference implementation and the CPU serving path."""

from __future__ import annotations

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
    adapters cost nothing. Runs that blend different weights read views of one preallocated buffer."""

    name: ClassVar[str] = "torch"

    def __init__(self) -> None:
        super().__init__()
        self.segments: list[Segment] = []
        self._weights = torch.empty(0)
        self._host_weights = torch.empty(0)

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

    def add_adapters(
        self, y: torch.Tensor, x: torch.Tensor, pages: LayerPages, batch: AdapterBatch
    ) -> torch.Tensor:
        self.check_prepared(batch)
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
