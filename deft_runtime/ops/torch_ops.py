"""The torch backend: the reference implementation and the CPU serving path."""

from __future__ import annotations

from typing import ClassVar

import torch

from deft_runtime.batch import NO_ADAPTER, AdapterBatch
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


def segmented_add_adapters(
    y: torch.Tensor, x: torch.Tensor, pages: LayerPages, batch: AdapterBatch
) -> torch.Tensor:
    """Gathered-matmul form of the same op, one run of consecutive rows per slot at a time.

    Pseudo-code::

        for seg in batch.segments:                        # one per distinct slot
            p = page_index[seg.slot]                      # [r] page ids; skip if untargeted
            A, B = pages.A[p], pages.B[p]                 # [r, d_in], [r, d_out]
            for run in seg.runs:                          # rows [start, stop), views only
                v = (x[start:stop] @ A.T) * run.weight    # [n, T, r]
                y[start:stop] += v @ B                    # fused: addmm_ into y
    """
    d_out = y.shape[-1]
    for seg in batch.segments:
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
    """Segments are planned once per forward by :class:`AdapterBatch`; each layer runs two matmuls per
    distinct adapter, so a rank-4 adapter never pays for rank 64 and rows without adapters cost nothing."""

    name: ClassVar[str] = "torch"

    def add_adapters(
        self, y: torch.Tensor, x: torch.Tensor, pages: LayerPages, batch: AdapterBatch
    ) -> torch.Tensor:
        return segmented_add_adapters(y, x, pages, batch)


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
