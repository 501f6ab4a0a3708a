"""The per-forward adapter mapping shared by every wrapped layer.

One :class:`AdapterBatch` is owned by whoever runs the denoiser (the engine, a test, a benchmark).
Before each denoiser forward the owner calls :meth:`AdapterBatch.set` once; every
:class:`~deft_runtime.layers.MultiAdapterLinear` holds a reference to the same object and only reads
it. Nothing is threaded through diffusers' forward signatures, and there are no module globals.

The batch keeps only the neutral mapping: per row ``i`` of the denoiser batch (a sample; CFG rows of a
request repeat its adapters) up to ``K`` ``(slot, weight)`` pairs, ``slot`` a device-pool slot (see
:mod:`deft_runtime.pool`). Each backend turns it into its own metadata (runs of rows for torch, slot and
weight tensors for Triton) in :meth:`~deft_runtime.ops.AdapterOps.prepare`, called by :meth:`set`, once
per forward and outside any compiled region or CUDA graph. :data:`NO_ADAPTER` marks an unused pair in
backend tensors; it is negative and never used as an index, so it can never alias the pool's last slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from deft_runtime.errors import InvalidRequest

NO_ADAPTER = -1

#: A row's adapters: ``[(slot, weight), ...]`` with at most ``K`` entries; empty means base model only.
RowAdapters = Sequence[tuple[int, float]]
#: The normalised mapping of one forward (hashable, compared to skip unchanged forwards).
Mapping = tuple[tuple[tuple[int, float], ...], ...]


class MappingBackend(Protocol):
    """What :class:`AdapterBatch` tells about a new mapping (an :class:`~deft_runtime.ops.AdapterOps`)."""

    def prepare(self, batch: AdapterBatch) -> None: ...


class AdapterBatch:
    """The next forward's ``(slot, weight)`` rows, plus the one backend that reads them.

    ``backend.prepare(batch)`` runs on every :meth:`set` with at least one adapter; the backend skips the
    work when ``batch.rows`` equals the mapping it prepared last (consecutive diffusion steps of the same
    requests repeat it). :meth:`clear` prepares nothing: layers skip an empty batch without asking the
    backend, so its buffers keep the last real mapping.
    """

    def __init__(
        self,
        max_rows: int,
        max_adapters_per_row: int = 4,
        device: torch.device | str = "cpu",
        *,
        backend: MappingBackend | None = None,
    ) -> None:
        if max_rows < 1 or max_adapters_per_row < 1:
            raise ValueError("max_rows and max_adapters_per_row must be ≥ 1")
        self.max_rows = max_rows
        self.K = max_adapters_per_row
        self.device = torch.device(device)
        self.backend = backend
        self.rows: Mapping = ()
        self.is_empty = True

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def set(self, rows: Sequence[RowAdapters]) -> None:
        """Describe the next forward: ``rows[i]`` lists row ``i``'s ``(slot, weight)`` pairs.

        Too many rows or a negative slot are programming errors (``ValueError``); a row blending more
        than ``K`` adapters is the caller's request error (:func:`check_blend`).
        """
        self.rows = normalise(rows, self.max_rows, self.K)
        self.is_empty = not any(self.rows)
        if not self.is_empty and self.backend is not None:
            self.backend.prepare(self)

    def clear(self) -> None:
        """No adapters at all: the wrapped layers reduce to their base layers."""
        self.rows = ()
        self.is_empty = True


def check_blend(count: int, K: int, what: str) -> None:
    """The one rule on how many adapters one sample blends (the engine applies it at submission)."""
    if count > K:
        raise InvalidRequest(f"{what} blends {count} adapters; at most {K} per sample")


def normalise(rows: Sequence[RowAdapters], max_rows: int, K: int) -> Mapping:
    """``rows`` as nested tuples of ``(int slot, float weight)``, checked against the batch's limits."""
    if len(rows) > max_rows:
        raise ValueError(f"{len(rows)} rows in one forward, above max_rows={max_rows}")
    out = []
    for i, pairs in enumerate(rows):
        check_blend(len(pairs), K, f"row {i}")
        for slot, _ in pairs:
            if slot < 0:
                raise ValueError(
                    f"row {i}: slot {slot} is not a pool slot (use an empty list for no adapter)"
                )
        out.append(tuple((int(slot), float(weight)) for slot, weight in pairs))
    return tuple(out)
