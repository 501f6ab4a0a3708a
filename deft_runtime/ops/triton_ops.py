"""The Triton backend: BGMV-style shrink/expand kernels over paged adapters.

The grid is per row (and per blended pair for the shrink), like Punica's BGMV, not per segment of rows
sharing an adapter as in SGMV: rows that use the same adapter each gather its pages themselves. Two
kernels per wrapped layer, each looping only over a row's own pages, so a rank-4 adapter never pays for
rank 64 and a row without adapters costs one load of its slots::

    # shrink, grid (R, ⌈T/BLOCK_T⌉, K)              v: fp32 scratch [R, T, K, max_rank]
    v[i, :, k, :r] = x[i] @ A[page_table[s, :r]].T       # s = slots[i, k], r = ranks[s]

    # expand, grid (R, ⌈T/BLOCK_T⌉, ⌈d_out/BLOCK_N⌉)  y: [R, T, d_out], updated in place
    y[i] += Σ_k weights[i, k] * v[i, :, k, :r] @ B[page_table[s, :r]]

A pair whose slot is :data:`~deft_runtime.batch.NO_ADAPTER` (or outside the page table, a memory-safety
guard) or whose rank in this layer is 0 contributes nothing: its rank is taken as 0 without ever
indexing with the slot, so both loops run zero times. Rows whose pairs all contribute nothing are not
read or written at all. Accumulation is in float32; half-precision tiles are multiplied in their own
dtype (tensor cores) and float32 tiles in IEEE float32 (no TF32).

The whole op is the torch custom op ``deft::add_adapters`` (a fake implementation registered), so
``torch.compile`` treats it as opaque and CUDA graphs capture the two launches; slots, weights, page
tables and ranks are tensors read on the device, so swapping adapters never recompiles or re-captures.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import triton
import triton.language as tl

from deft_runtime.batch import NO_ADAPTER, AdapterBatch, Mapping
from deft_runtime.ops import AdapterOps, LayerPages, pack_rows

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class TritonBlocks:
    """Tile caps (each ≥ 16 for ``tl.dot``, powers of two); a call shrinks a cap to the next power of
    two ≥ its dimension. ``r_block`` is the number of pages (rank vectors) gathered per step."""

    block_t: int = 64
    block_k: int = 64
    block_n: int = 64
    r_block: int = 16

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 16 or value & (value - 1):
                raise ValueError(
                    f"TritonBlocks.{name}={value}: expected a power of two ≥ 16 (tl.dot's minimum)"
                )


@triton.jit
def _slot_rank(slots_ptr, ranks_ptr, num_slots, max_rank):
    """``(s, r)`` for one ``(row, k)`` pair, with ``r = 0`` for the sentinel and untargeted slots.

    Pseudo-code::

        s = slots[i, k]
        valid = 0 <= s < num_slots                     # NO_ADAPTER (-1) is never an index
        s = s if valid else 0                          # a safe row for pointer arithmetic
        r = min(ranks[s], max_rank) if valid else 0    # loops over pages run r / R_BLOCK times
    """
    s = tl.load(slots_ptr)
    valid = (s >= 0) & (s < num_slots)
    s = tl.where(valid, s, 0)
    rank = tl.load(ranks_ptr + s, mask=valid, other=0)
    return s.to(tl.int64), tl.minimum(rank, max_rank)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, table_ptr, ranks_ptr, slots_ptr, v_ptr,
    T, d_in, num_slots, max_rank,
    sx_r, sx_t, sx_d, sa_p, sa_d, st_s, ss_r, ss_k, sv_r, sv_t, sv_k,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: row ``i``, tokens ``t = tb·BLOCK_T + [0, BLOCK_T)``, blended pair ``k``.

    Pseudo-code (``x: [R, T, d_in]``, ``A: [num_pages, d_in]``, ``v: [R, T, K, max_rank]`` fp32)::

        s, r = _slot_rank(slots[i, k])
        for r0 in range(0, r, R_BLOCK):                        # this slot's own pages only
            p = page_table[s, r0 : r0 + R_BLOCK]               # [R_BLOCK], masked beyond r
            v[i, t, k, r0 : r0 + R_BLOCK] = Σ_d0 x[i, t, d0 : d0 + BLOCK_K] @ A[p, d0 : d0 + BLOCK_K].T
    """
    i = tl.program_id(0).to(tl.int64)
    k = tl.program_id(2)
    s, rank = _slot_rank(slots_ptr + i * ss_r + k * ss_k, ranks_ptr, num_slots, max_rank)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, R_BLOCK)
    offs_d = tl.arange(0, BLOCK_K)
    t_mask = offs_t < T
    x_rows = x_ptr + i * sx_r + offs_t[:, None] * sx_t  # [BLOCK_T, 1]
    for r0 in range(0, rank, R_BLOCK):
        r_mask = r0 + offs_r < rank
        page = tl.load(table_ptr + s * st_s + r0 + offs_r, mask=r_mask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_T, R_BLOCK), dtype=tl.float32)
        for d0 in range(0, d_in, BLOCK_K):
            d_mask = d0 + offs_d < d_in
            xt = tl.load(
                x_rows + (d0 + offs_d)[None, :] * sx_d, mask=t_mask[:, None] & d_mask[None, :], other=0.0
            )
            at = tl.load(
                a_ptr + page[:, None] * sa_p + (d0 + offs_d)[None, :] * sa_d,
                mask=r_mask[:, None] & d_mask[None, :],
                other=0.0,
            )  # [R_BLOCK, BLOCK_K]: gathered page rows
            acc = tl.dot(xt.to(DOT_DTYPE), tl.trans(at.to(DOT_DTYPE)), acc, input_precision=PRECISION)
        v_out = v_ptr + i * sv_r + offs_t[:, None] * sv_t + k * sv_k + (r0 + offs_r)[None, :]
        tl.store(v_out, acc, mask=t_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
    v_ptr, b_ptr, table_ptr, ranks_ptr, slots_ptr, weights_ptr, y_ptr,
    T, d_out, K, num_slots, max_rank,
    sv_r, sv_t, sv_k, sb_p, sb_n, st_s, ss_r, ss_k, sw_r, sw_k, sy_r, sy_t, sy_n,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, R_BLOCK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: row ``i``, tokens ``t = tb·BLOCK_T + [0, BLOCK_T)``, outputs
    ``n = nb·BLOCK_N + [0, BLOCK_N)``.

    Pseudo-code (``B: [num_pages, d_out]``, ``y: [R, T, d_out]``, ``v`` from :func:`_shrink_kernel`)::

        acc = zeros([BLOCK_T, BLOCK_N], fp32)
        for k in range(K):
            s, r = _slot_rank(slots[i, k]);  w = weights[i, k]
            for r0 in range(0, r, R_BLOCK):
                p = page_table[s, r0 : r0 + R_BLOCK]                        # masked beyond r
                acc += (w * v[i, t, k, r0 : r0 + R_BLOCK]) @ B[p, n]        # [BLOCK_T, BLOCK_N]
        if any r > 0:  y[i, t, n] = (y[i, t, n] + acc).to(y.dtype)          # fused add, in place
    """
    i = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_BLOCK)
    t_mask = offs_t < T
    n_mask = offs_n < d_out
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    pages_seen = 0
    for k in range(K):
        s, rank = _slot_rank(slots_ptr + i * ss_r + k * ss_k, ranks_ptr, num_slots, max_rank)
        w = tl.load(weights_ptr + i * sw_r + k * sw_k).to(tl.float32)
        pages_seen += rank
        for r0 in range(0, rank, R_BLOCK):
            r_mask = r0 + offs_r < rank
            page = tl.load(table_ptr + s * st_s + r0 + offs_r, mask=r_mask, other=0).to(tl.int64)
            v_in = v_ptr + i * sv_r + offs_t[:, None] * sv_t + k * sv_k + (r0 + offs_r)[None, :]
            vt = tl.load(v_in, mask=t_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_T, R_BLOCK]
            bt = tl.load(
                b_ptr + page[:, None] * sb_p + offs_n[None, :] * sb_n,
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            )  # [R_BLOCK, BLOCK_N]: gathered page rows
            vt = (vt * w).to(bt.dtype)  # v meets B in the serving dtype, as in the torch backend
            acc = tl.dot(vt.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tile = y_ptr + i * sy_r + offs_t[:, None] * sy_t + offs_n[None, :] * sy_n
    t_end = tl.where(pages_seen > 0, T, 0)  # rows without adapters are neither read nor written
    mask = (offs_t < t_end)[:, None] & n_mask[None, :]
    yt = tl.load(tile, mask=mask, other=0.0)
    tl.store(tile, (yt.to(tl.float32) + acc).to(yt.dtype), mask=mask)


def _tile(cap: int, dim: int) -> int:
    """``min(cap, max(16, next_pow2(dim)))``: no tile wider than the dimension needs."""
    return min(cap, max(16, triton.next_power_of_2(max(dim, 1))))


def _dot_args(dtype: torch.dtype) -> dict[str, object]:
    """``tl.dot`` operand dtype and precision for tiles of ``dtype``.

    Halves multiply in their own dtype (tensor cores, exact products, fp32 accumulation); float32 in IEEE
    float32 (TF32 would cost ~1e-3 relative error). Triton's CPU interpreter stores bfloat16 as raw
    ``uint16`` and cannot multiply it, so there bfloat16 tiles are upcast to float32 first (exact, and
    the same products the tensor cores form).
    """
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not triton.knobs.runtime.interpret):
        return {"DOT_DTYPE": _TL_DTYPES[dtype], "PRECISION": "tf32"}
    return {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}


def _launch_shrink(
    v: torch.Tensor, x: torch.Tensor, A: torch.Tensor, page_table: torch.Tensor, ranks: torch.Tensor,
    slots: torch.Tensor, blocks: TritonBlocks,
) -> None:  # fmt: skip
    """``v[i, :, k, :r] = x[i] @ A[page_table[s, :r]].T`` for every pair (see :func:`_shrink_kernel`)."""
    R, T, d_in = x.shape
    block_t, block_k = _tile(blocks.block_t, T), _tile(blocks.block_k, d_in)
    grid = (R, triton.cdiv(T, block_t), slots.shape[1])
    _shrink_kernel[grid](
        x, A, page_table, ranks, slots, v,
        T, d_in, page_table.shape[0], page_table.shape[1],
        *x.stride(), *A.stride(), page_table.stride(0), *slots.stride(), *v.stride()[:3],
        BLOCK_T=block_t, BLOCK_K=block_k, R_BLOCK=blocks.r_block, **_dot_args(x.dtype),
    )  # fmt: skip


def _launch_expand(
    y: torch.Tensor, v: torch.Tensor, B: torch.Tensor, page_table: torch.Tensor, ranks: torch.Tensor,
    slots: torch.Tensor, weights: torch.Tensor, blocks: TritonBlocks,
) -> None:  # fmt: skip
    """``y[i] += Σ_k weights[i, k] · v[i, :, k, :r] @ B[page_table[s, :r]]`` (:func:`_expand_kernel`)."""
    R, T, d_out = y.shape
    block_t, block_n = _tile(blocks.block_t, T), _tile(blocks.block_n, d_out)
    grid = (R, triton.cdiv(T, block_t), triton.cdiv(d_out, block_n))
    _expand_kernel[grid](
        v, B, page_table, ranks, slots, weights, y,
        T, d_out, slots.shape[1], page_table.shape[0], page_table.shape[1],
        *v.stride()[:3], *B.stride(), page_table.stride(0), *slots.stride(), *weights.stride(), *y.stride(),
        BLOCK_T=block_t, BLOCK_N=block_n, R_BLOCK=blocks.r_block, **_dot_args(B.dtype),
    )  # fmt: skip


def _check_args(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor
) -> None:
    """Shape and dtype agreement, checked on the host (no device synchronisation)."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2] or slots.shape[0] != x.shape[0]:
        raise ValueError(
            f"add_adapters expects x [R, T, d_in], y [R, T, d_out], slots [R, K]; got x {tuple(x.shape)}, "
            f"y {tuple(y.shape)}, slots {tuple(slots.shape)}"
        )
    if x.shape[2] != A.shape[1] or y.shape[2] != B.shape[1]:
        raise ValueError(
            f"layer pages map d_in={A.shape[1]} → d_out={B.shape[1]} but x is {tuple(x.shape)}, "
            f"y is {tuple(y.shape)}"
        )
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"x is {x.dtype}; the Triton backend serves float32, float16 and bfloat16")
    if not x.dtype == A.dtype == B.dtype:
        raise ValueError(
            f"x is {x.dtype} but the pool pages are {A.dtype}/{B.dtype}: build the pool in the serving dtype"
        )


@torch.library.custom_op("deft::add_adapters", mutates_args=("y", "scratch"))
def add_adapters_op(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, page_table: torch.Tensor,
    ranks: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, scratch: torch.Tensor,
    block_t: int, block_k: int, block_n: int, r_block: int,
) -> None:  # fmt: skip
    """The module-level op as one opaque custom op; ``y`` (and ``scratch``) are written in place.

    Pseudo-code (``x: [R, T, d_in]``, ``y: [R, T, d_out]``, ``slots``/``weights``: ``[R, K]``,
    ``scratch``: fp32 ``[R, T, K, max_rank]``)::

        scratch = shrink(x, A, page_table, ranks, slots)                     # per-pair x @ A_pᵀ
        y += expand(scratch, B, page_table, ranks, slots, weights)           # Σ_k w · v @ B_p
    """
    _check_args(y, x, A, B, slots)
    if x.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "the Triton backend got CPU tensors: run on a GPU, set TRITON_INTERPRET=1 before importing "
            "triton (tests), or build the runtime with backend='torch'"
        )
    if y.numel() == 0 or slots.shape[1] == 0:
        return
    blocks = TritonBlocks(block_t, block_k, block_n, r_block)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _launch_shrink(scratch, x, A, page_table, ranks, slots, blocks)
        _launch_expand(y, scratch, B, page_table, ranks, slots, weights, blocks)


@add_adapters_op.register_fake
def _add_adapters_fake(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, page_table: torch.Tensor,
    ranks: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, scratch: torch.Tensor,
    block_t: int, block_k: int, block_n: int, r_block: int,
) -> None:  # fmt: skip
    """Shapes only: returns nothing, writes ``y``/``scratch`` in place (same checks as the real op)."""
    _check_args(y, x, A, B, slots)


class TritonOps(AdapterOps):
    """Calls ``deft::add_adapters`` with the first ``R`` rows of its own slot and weight tensors.

    ``prepare`` (once per forward, skipped when the mapping repeats) writes the batch's rows into
    preallocated device tensors ``slots`` (int32 ``[max_rows, K]``, :data:`NO_ADAPTER` where unused) and
    ``weights`` (float32, 0 where unused) in place, so CUDA graphs captured over them stay valid. Also owns
    the fp32 shrink scratch ``[R, T, K, max_rank]``: one flat buffer per instance, grown (never shrunk)
    when a call needs more, so steady-state calls and CUDA-graph replays allocate nothing.
    """

    name: ClassVar[str] = "triton"

    def __init__(self, blocks: TritonBlocks | None = None) -> None:
        super().__init__()
        self.blocks = blocks or TritonBlocks()
        self._scratch: torch.Tensor | None = None
        self.slots = torch.empty(0, 0, dtype=torch.int32)
        self.weights = torch.empty(0, 0)

    def allocate(self, batch: AdapterBatch) -> None:
        shape = (batch.max_rows, batch.K)
        self.slots = torch.full(shape, NO_ADAPTER, dtype=torch.int32, device=batch.device)
        self.weights = torch.zeros(shape, dtype=torch.float32, device=batch.device)

    def update(self, rows: Mapping) -> None:
        slots, weights = pack_rows(rows, self.slots.shape[1])
        n = len(rows)
        self.slots[:n].copy_(slots)
        self.weights[:n].copy_(weights)

    def scratch(self, shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
        """A ``[R, T, K, max_rank]`` fp32 view of the instance's buffer (contents undefined)."""
        need = shape[0] * shape[1] * shape[2] * shape[3]
        buf = self._scratch
        if buf is None or buf.device != device or buf.numel() < need:
            buf = torch.empty(max(need, 1), dtype=torch.float32, device=device)
            self._scratch = buf
        return buf[:need].view(shape)

    def add_adapters(
        self, y: torch.Tensor, x: torch.Tensor, pages: LayerPages, batch: AdapterBatch
    ) -> torch.Tensor:
        """``y[i] += Σ_k w_ik · (x[i] @ A_pᵀ) @ B_p`` over the batch's rows; returns y."""
        self.check_prepared(batch)
        R, T = x.shape[0], x.shape[1]
        slots, weights = self.slots[:R], self.weights[:R]
        scratch = self.scratch((R, T, batch.K, pages.page_table.shape[1]), x.device)
        b = self.blocks
        torch.ops.deft.add_adapters(
            y, x, pages.A, pages.B, pages.page_table, pages.ranks, slots, weights, scratch,
            b.block_t, b.block_k, b.block_n, b.r_block,
        )  # fmt: skip
        return y
