"""Multi-adapter kernels against two oracles: the fp32 row-by-row reference and a float64 dense
``x @ (B·A)ᵀ`` built from the adapters' own factors (independent of the page tables).

The sweep follows what breaks segmented kernels (Punica's test_sgmv.py): adapter popularity, odd
batch sizes, mixed ranks 1..64 in one batch, the NO_ADAPTER sentinel anywhere in a row, the pool's last
slot, untargeted (rank-0) slots, K=4 blends, non-contiguous inputs and sizes that are not multiples of
the tiles. Pages are shuffled (one slot's pages are scattered and unordered), spare pages and page-table
entries beyond a slot's rank point at NaN pages, so any read outside a slot's own pages shows up.
Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``); GPU-only tests skip.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode

from deft_runtime.batch import NO_ADAPTER, AdapterBatch, RowAdapters
from deft_runtime.ops import AdapterOps, LayerPages, make_ops, pack_rows
from deft_runtime.ops.torch_ops import TorchOps, reference_add_adapters
from deft_runtime.ops.triton_ops import TritonBlocks, TritonOps

CPU = torch.device("cpu")
BACKENDS = ["torch", "triton"]
#: Tiles of 16 so small tensors still span several tiles along T, d_in, d_out and rank.
SMALL = TritonBlocks(block_t=16, block_k=16, block_n=16, r_block=16)
#: Mixed in one pool: below, at and across the 16-page rank block, up to max_rank.
RANKS = (1, 2, 3, 4, 8, 16, 33, 64)
MAX_RANK = 64
#: Per dtype, against both oracles, for O(1) values; scaled up by each row's magnitude (assert_within).
TOL: dict[torch.dtype, tuple[float, float]] = {  # (atol, rtol)
    torch.float32: (2e-5, 2e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 4e-2),
}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@dataclass
class Pool:
    """One layer's pages plus the dense factors each slot was built from (slot → ``A [r, d_in]``,
    ``B [d_out, r]``, float64 copies of the stored values)."""

    pages: LayerPages
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]


def build_pool(
    d_in: int, d_out: int, slot_ranks: Sequence[int], *, dtype: torch.dtype = torch.float32,
    seed: int = 0, scale: dict[int, float] | None = None, device: torch.device = CPU,
) -> Pool:  # fmt: skip
    """Slot ``s`` gets ``slot_ranks[s]`` random pages (0: untargeted); everything else points at NaN."""
    g = torch.Generator().manual_seed(seed)
    total = sum(slot_ranks)
    pages = LayerPages.allocate(d_in, d_out, total + 2, len(slot_ranks), MAX_RANK, dtype=dtype, device=CPU)
    pages.A.fill_(math.nan)
    pages.B.fill_(math.nan)
    order = torch.randperm(total + 2, generator=g)  # pages of one slot: scattered, unsorted
    pages.page_table.fill_(int(order[total]))  # beyond a slot's rank: a NaN page
    factors, cursor = {}, 0
    for s in torch.randperm(len(slot_ranks), generator=g).tolist():
        r = slot_ranks[s]
        if r == 0:
            continue
        ids, cursor = order[cursor : cursor + r], cursor + r
        A = (torch.randn(r, d_in, generator=g) * (scale or {}).get(s, 1.0) / d_in**0.5).to(dtype)
        B = (torch.randn(d_out, r, generator=g) / r**0.5).to(dtype)
        pages.A[ids], pages.B[ids] = A, B.T
        pages.page_table[s, :r] = ids.to(torch.int32)
        pages.ranks[s], pages.page_index[s] = r, ids
        factors[s] = (A.double(), B.double())
    return Pool(pages=pages_to(pages, device), factors=factors)


def pages_to(pages: LayerPages, device: torch.device) -> LayerPages:
    index = [None if p is None else p.to(device) for p in pages.page_index]
    return LayerPages(
        pages.A.to(device), pages.B.to(device), pages.page_table.to(device), pages.ranks.to(device),
        index,
    )  # fmt: skip


def dense_expected(y: torch.Tensor, x: torch.Tensor, pool: Pool, rows: Sequence[RowAdapters]) -> torch.Tensor:
    """``y[i] + Σ w · x[i] @ (B·A)ᵀ`` in float64 from the dense factors (no page tables involved)."""
    out = y.double().cpu().clone()
    for i, pairs in enumerate(rows):
        for s, w in pairs:
            if s in pool.factors:
                A, B = pool.factors[s]
                out[i] += w * x[i].double().cpu() @ (B @ A).T
    return out


def assert_within(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """``|actual - expected| ≤ atol·m + rtol·|expected|`` with ``dtype``'s row of the tolerance table and
    ``m = max(1, max |expected[i]|)`` per row: rounding errors grow with the size of the values summed, so
    a row carrying a ×1000 adapter gets a 1000× wider absolute tolerance than an O(1) row (CPUs with
    other SIMD widths sum in other orders)."""
    atol, rtol = TOL[dtype]
    a, e = actual.double().cpu(), expected.double().cpu()
    magnitude = e.abs().flatten(1).amax(dim=1).clamp(min=1.0).view(-1, *[1] * (e.dim() - 1))
    allowed = atol * magnitude + rtol * e.abs()
    err = (a - e).abs()
    bad = ~(err <= allowed)  # NaN anywhere fails
    assert not bad.any(), (
        f"{int(bad.sum())} of {e.numel()} values outside tolerance; worst error {err[bad].max().item():.3g} "
        f"where {allowed[bad][err[bad].argmax()].item():.3g} is allowed ({dtype}, atol {atol}, rtol {rtol})"
    )


def make_backend(name: str) -> AdapterOps:
    return TorchOps() if name == "torch" else TritonOps(SMALL)


def apply(ops: AdapterOps, y: torch.Tensor, x: torch.Tensor, pool: Pool, batch: AdapterBatch) -> torch.Tensor:
    """Run the backend on a copy of ``y`` with ``y``'s exact strides and check it works in place."""
    target = torch.empty_strided(y.shape, y.stride(), dtype=y.dtype, device=y.device).copy_(y)
    out = ops.add_adapters(target, x, pool.pages, batch)
    assert out is target, "add_adapters must update y in place and return it"
    return out


def check(
    ops: AdapterOps, pool: Pool, rows: Sequence[RowAdapters], x: torch.Tensor, y: torch.Tensor, K: int = 1
) -> torch.Tensor:
    """Both oracles agree with the backend; rows with nothing to add are bit-for-bit unchanged."""
    batch = AdapterBatch(len(rows), K, device=x.device, backend=ops)
    batch.set(rows)
    out = apply(ops, y, x, pool, batch)
    ref = reference_add_adapters(y.clone(), x, pool.pages, *pack_rows(rows, K))
    assert_within(out, ref, y.dtype)
    assert_within(out.double().cpu(), dense_expected(y, x, pool, rows), y.dtype)
    for i, pairs in enumerate(rows):
        if not any(s in pool.factors for s, _ in pairs):
            assert torch.equal(out[i], y[i]), f"row {i} has no adapter in this layer but changed"
    return out


def random_xy(
    R: int, T: int, d_in: int, d_out: int, dtype: torch.dtype, seed: int = 1, device: torch.device = CPU
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [R, T, d_in]``, ``y: [R, T, d_out]`` standard normal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, T, d_in, generator=g).to(dtype=dtype, device=device)
    return x, torch.randn(R, T, d_out, generator=g).to(dtype=dtype, device=device)


# ---------------------------------------------------------------- the sweep


def popularity(kind: str, n: int, num_slots: int, g: torch.Generator) -> list[int]:
    """One slot per row; every kind uses the pool's last slot."""
    last = num_slots - 1
    if kind == "distinct":
        return [last - i for i in range(n)]
    if kind == "identical":
        return [last] * n
    if kind == "skewed":  # one row differs, the rest share the last slot
        return [int(torch.randint(last, (1,), generator=g))] + [last] * (n - 1)
    if kind == "uniform":
        slots = torch.randint(num_slots, (n,), generator=g).tolist()
    elif kind == "zipf":  # the most popular adapter is the last slot
        p = torch.arange(1, num_slots + 1, dtype=torch.float64) ** -1.5
        slots = [last - s for s in torch.multinomial(p, n, replacement=True, generator=g).tolist()]
    else:
        raise AssertionError(kind)
    slots[-1] = last
    return slots


def sweep_rows(kind: str, n: int, num_slots: int, untargeted: int, seed: int) -> list[RowAdapters]:
    """Popularity rows, with the sentinel (an empty row) and an untargeted slot mixed in from n ≥ 3."""
    g = torch.Generator().manual_seed(seed)
    weights = (1.0, -0.5, 2.0, 0.75)
    rows: list[RowAdapters] = [[(s, weights[i % 4])] for i, s in enumerate(popularity(kind, n, num_slots, g))]
    if n >= 3:
        rows[n // 2] = []
    if n >= 7:
        rows[1] = [(untargeted, 1.0)]
    return rows


@pytest.mark.parametrize("n", [1, 3, 7, 133])
@pytest.mark.parametrize("kind", ["distinct", "uniform", "zipf", "identical", "skewed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_popularity_and_odd_batch_sizes(backend: str, kind: str, n: int) -> None:
    T, d_in, d_out = (2, 16, 16) if n > 100 else (19, 24, 40)  # the interpreter is slow: tiny for 133 rows
    num_slots = max(n, 8) + 1
    slot_ranks = [RANKS[s % len(RANKS)] for s in range(num_slots)]
    slot_ranks[2] = 0  # an adapter that does not target this layer
    pool = build_pool(d_in, d_out, slot_ranks, seed=n)
    x, y = random_xy(n, T, d_in, d_out, torch.float32, seed=n)
    check(make_backend(backend), pool, sweep_rows(kind, n, num_slots, untargeted=2, seed=n), x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend: str, dtype: torch.dtype) -> None:
    """Half-precision inputs accumulate in float32 (bf16 runs upcast under the interpreter)."""
    pool = build_pool(24, 40, [64, 3, 0, 17, 1], dtype=dtype, seed=3)
    x, y = random_xy(5, 19, 24, 40, dtype, seed=3)
    rows = [[(0, 1.0)], [(3, -0.5), (4, 2.0)], [], [(2, 1.0), (1, 0.5)], [(4, 1.0), (0, 0.25)]]
    check(make_backend(backend), pool, rows, x, y, K=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_blended_adapters_of_mixed_ranks(backend: str) -> None:
    pool = build_pool(24, 40, [1, 2, 4, 8, 16, 0, 32, 64], seed=4)
    x, y = random_xy(4, 5, 24, 40, torch.float32, seed=4)
    rows = [
        [(0, 0.5), (7, -1.0), (4, 0.25), (6, 1.5)],
        [],
        [(5, 1.0), (3, 2.0), (1, -0.5), (2, 1.0)],  # the first pair is untargeted
        [(7, 1.0), (5, 3.0)],
    ]
    check(make_backend(backend), pool, rows, x, y, K=4)


@pytest.mark.parametrize(
    ("case", "tiled"),
    [
        ("one weight", True),  # every request its own adapter, CFG rows adjacent
        ("weights differ", True),
        ("after a row without adapters", True),
        ("an untargeted slot", False),  # this layer falls back to the per-slot loop
        ("ranks differ", False),
        ("runs of different lengths", None),  # no tiling planned at all
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_batches_take_the_batched_path_and_match_both_oracles(
    case: str, tiled: bool | None, dtype
) -> None:
    """The torch backend's fast path (:class:`Tiling`: slots that tile a block of rows run as two batched
    matmuls) against both oracles, and it falls back when a layer's pages do not allow it."""
    from deft_runtime.ops.torch_ops import tiled_add_adapters

    ranks = {"an untargeted slot": [8, 8, 0, 8], "ranks differ": [8, 4, 8, 8]}.get(case, [8, 8, 8, 8])
    pool = build_pool(24, 40, ranks, dtype=dtype, seed=8)
    weights = {"weights differ": (1.0, -0.5, 2.0, 0.75)}.get(case, (0.5,) * 4)
    rows: list[RowAdapters] = [[(s, weights[s])] for s in range(4) for _ in range(2)]
    if case == "after a row without adapters":
        rows = [[], *rows]
    if case == "runs of different lengths":
        rows = [*rows, [(3, weights[3])]]
    x, y = random_xy(len(rows), 6, 24, 40, dtype, seed=8)
    ops = TorchOps()
    check(ops, pool, rows, x, y)
    assert (ops.tiling is not None) == (tiled is not None)
    if ops.tiling is not None:
        assert tiled_add_adapters(y.clone(), x, pool.pages, ops.tiling) == tiled


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_blending_the_same_slot_twice(backend: str) -> None:
    pool = build_pool(24, 40, [8, 16], seed=5)
    x, y = random_xy(2, 3, 24, 40, torch.float32, seed=5)
    check(make_backend(backend), pool, [[(1, 1.0), (1, 0.5)], []], x, y, K=2)


def test_sentinel_anywhere_in_a_row_is_skipped() -> None:
    """Kernels read the slots tensor: NO_ADAPTER between real pairs, with a nonzero weight, adds nothing."""
    pool = build_pool(24, 40, [4, 33, 0, 64], seed=6)
    x, y = random_xy(3, 5, 24, 40, torch.float32, seed=6)
    slots = torch.tensor([[1, NO_ADAPTER, 0, NO_ADAPTER], [NO_ADAPTER] * 4, [NO_ADAPTER, 3, NO_ADAPTER, 2]])
    weights = torch.tensor([[1.0, 5.0, -0.5, 5.0], [5.0] * 4, [5.0, 0.75, 5.0, 1.0]])
    p, out = pool.pages, y.clone()
    scratch = torch.empty(3, 5, 4, MAX_RANK)
    torch.ops.deft.add_adapters(
        out, x, p.A, p.B, p.page_table, p.ranks, slots.int(), weights, scratch, 16, 16, 16, 16
    )
    rows = [[(1, 1.0), (0, -0.5)], [], [(3, 0.75), (2, 1.0)]]
    assert_within(out.double(), dense_expected(y, x, pool, rows), torch.float32)
    assert torch.equal(out[1], y[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_slot_never_leaks_into_rows_without_adapters(backend: str) -> None:
    """The last slot holds a loud rank-64 adapter: a sentinel read as index -1 would alias it."""
    slot_ranks = [2, 0, 5, 64]
    pool = build_pool(24, 40, slot_ranks, seed=7, scale={3: 1000.0})
    x, y = random_xy(5, 7, 24, 40, torch.float32, seed=7)
    rows = [[], [(3, 1.0)], [(1, 1.0)], [(0, 1.0)], []]
    out = check(make_backend(backend), pool, rows, x, y, K=2)
    assert (out[1] - y[1]).abs().max() > 100  # the loud adapter is really there


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend: str, layout: str) -> None:
    R, T, d_in, d_out = 3, 19, 24, 40
    g = torch.Generator().manual_seed(8)
    if layout == "transposed":  # token-major storage, as after a permute
        x = torch.randn(T, R, d_in, generator=g).transpose(0, 1)
        y = torch.randn(R, d_out, T, generator=g).transpose(1, 2)
    else:  # every other feature of wider tensors
        x = torch.randn(R, T, 2 * d_in, generator=g)[:, :, ::2]
        y = torch.randn(R, T, 2 * d_out, generator=g)[:, :, 1::2]
    assert not x.is_contiguous() and not y.is_contiguous()
    pool = build_pool(d_in, d_out, [16, 3, 64], seed=8)
    check(make_backend(backend), pool, [[(2, 1.0)], [], [(0, -1.0), (1, 0.5)]], x, y, K=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_pages_only_pollute_rows_that_use_them(backend: str) -> None:
    pool = build_pool(24, 40, [8, 20, 4], seed=9)
    pool.pages.A[pool.pages.page_table[1, 17]] = math.nan  # a page in the second rank block of slot 1
    x, y = random_xy(4, 5, 24, 40, torch.float32, seed=9)
    rows = [[(0, 1.0)], [(1, 1.0)], [], [(2, 1.0), (0, 0.5)]]
    ops = make_backend(backend)
    batch = AdapterBatch(4, 2, backend=ops)
    batch.set(rows)
    out = apply(ops, y, x, pool, batch)
    assert out[1].isnan().all()
    clean = [0, 2, 3]
    expected = dense_expected(y, x, pool, rows)
    assert_within(out[clean].double(), expected[clean], torch.float32)


def test_stale_scratch_is_never_read() -> None:
    """The fp32 scratch holds garbage between calls; entries beyond a slot's rank are masked."""
    pool = build_pool(24, 40, [3, 64, 17], seed=10)
    x, y = random_xy(3, 19, 24, 40, torch.float32, seed=10)
    rows = [[(0, 1.0)], [(1, 1.0), (2, -1.0)], []]
    ops = TritonOps(SMALL)
    batch = AdapterBatch(3, 2, backend=ops)
    batch.set(rows)
    ops.scratch((3, 19, 2, MAX_RANK), CPU).fill_(math.nan)
    out = apply(ops, y, x, pool, batch)
    assert_within(out.double(), dense_expected(y, x, pool, rows), torch.float32)


def test_scratch_belongs_to_the_instance_and_only_grows() -> None:
    ops, other = TritonOps(), TritonOps()
    big = ops.scratch((4, 8, 2, 16), CPU)
    small = ops.scratch((1, 2, 1, 16), CPU)
    assert small.data_ptr() == big.data_ptr() and small.shape == (1, 2, 1, 16)
    assert other.scratch((1, 2, 1, 16), CPU).data_ptr() != big.data_ptr()
    assert ops.scratch((8, 8, 2, 16), CPU).numel() == 8 * 8 * 2 * 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_is_rebuilt_only_when_the_mapping_changes(backend: str) -> None:
    """A repeated mapping (the same requests' next step, also after an adapter-free forward) reuses the
    backend's metadata; every new one rebuilds it, and the output is right each time."""
    pool = build_pool(24, 40, [4, 17, 64], seed=15)
    x, y = random_xy(3, 5, 24, 40, torch.float32, seed=15)
    ops = make_backend(backend)
    batch = AdapterBatch(4, 2, backend=ops)
    first = [[(0, 1.0)], [(1, 0.5), (2, 2.0)], [(1, -1.0)]]  # rows 1-2 blend slot 1 with other weights
    second = [[(2, 1.0)], [], [(0, 1.0), (1, 0.25)]]
    steps = [(first, 1), (first, 1), ([], 1), (first, 1), (second, 2), (first, 3)]
    for rows, updates in steps:
        batch.set(rows)
        assert ops.metadata_updates == updates, rows
        if rows:
            assert_within(apply(ops, y, x, pool, batch), dense_expected(y, x, pool, rows), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backend_serves_only_the_batch_that_prepares_it(backend: str) -> None:
    pool = build_pool(24, 40, [4], seed=16)
    x, y = random_xy(1, 2, 24, 40, torch.float32, seed=16)
    ops = make_backend(backend)
    AdapterBatch(1, 1, backend=ops).set([[(0, 1.0)]])
    stranger = AdapterBatch(1, 1)
    stranger.set([[(0, 1.0)]])
    with pytest.raises(ValueError, match="not prepared for this AdapterBatch"):
        ops.add_adapters(y, x, pool.pages, stranger)
    with pytest.raises(ValueError, match="already serves another AdapterBatch"):
        AdapterBatch(1, 1, backend=ops).set([[(0, 1.0)]])


# ---------------------------------------------------------------- registration and errors


def op_args(R: int = 2, T: int = 3, K: int = 2) -> tuple:
    pool = build_pool(24, 40, [4, 0, 17], seed=11)
    x, y = random_xy(R, T, 24, 40, torch.float32, seed=11)
    slots, weights = pack_rows([[(2, 1.0), (0, 0.5)], [(1, 1.0)]][:R], K)
    p = pool.pages
    scratch = torch.empty(R, T, K, MAX_RANK)
    return (y, x, p.A, p.B, p.page_table, p.ranks, slots, weights, scratch, 16, 16, 16, 16)


def test_custom_op_is_registered_as_mutating_y() -> None:
    op = torch.ops.deft.add_adapters.default
    written = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["y", "scratch"] and not op._schema.returns, str(op._schema)
    args = op_args()
    y = args[0].clone()
    torch.ops.deft.add_adapters(y, *args[1:])
    ref = reference_add_adapters(args[0].clone(), args[1], LayerPages(*args[2:6]), args[6], args[7])
    assert_within(y, ref, torch.float32)


def test_fake_impl_under_fake_tensor_mode() -> None:
    args = op_args()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert torch.ops.deft.add_adapters(*fake) is None
        bad = [fake[0], fake[1].to(torch.float16), *fake[2:]]
        with pytest.raises(ValueError, match="pool pages"):
            torch.ops.deft.add_adapters(*bad)


def test_opcheck() -> None:
    torch.library.opcheck(torch.ops.deft.add_adapters.default, op_args(R=2, T=2))


def test_errors_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match="power of two"):
        TritonBlocks(block_t=24)
    pool = build_pool(24, 40, [4], seed=12)
    x, y = random_xy(1, 2, 24, 40, torch.float32)
    ops = TritonOps()
    batch = AdapterBatch(1, 1, backend=ops)
    batch.set([[(0, 1.0)]])
    with pytest.raises(ValueError, match="serving dtype"):
        ops.add_adapters(y.half(), x.half(), pool.pages, batch)
    with pytest.raises(ValueError, match=r"x \[R, T, d_in\]"):
        ops.add_adapters(y[:, 0], x[:, 0], pool.pages, batch)


def test_cpu_tensors_without_the_interpreter_get_an_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.deft.add_adapters(*op_args())


def test_make_ops_builds_the_triton_backend() -> None:
    ops = make_ops("triton", CPU)
    assert isinstance(ops, TritonOps) and ops.name == "triton"


class AdaptedLinear(torch.nn.Module):
    """A base linear plus ``ops.add_adapters``: the shape of a wrapped layer, for compile tests."""

    def __init__(self, ops: AdapterOps, pool: Pool, batch: AdapterBatch, device: torch.device) -> None:
        super().__init__()
        self.base = torch.nn.Linear(pool.pages.d_in, pool.pages.d_out, device=device)
        self.ops, self.pages, self.batch = ops, pool.pages, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.add_adapters(self.base(x), x, self.pages, self.batch)


def swaps_without_recompiling(device: torch.device, backend: str) -> None:
    """Compiled once; changing slots, weights and a page table between calls must not recompile."""
    pool = build_pool(24, 40, [4, 17, 64], seed=13, device=device)
    x, _ = random_xy(3, 5, 24, 40, torch.float32, device=device)
    ops = TritonOps(SMALL)
    batch = AdapterBatch(3, 2, device=device, backend=ops)
    module = AdaptedLinear(ops, pool, batch, device)
    batch.set([[(0, 1.0)], [], [(1, 1.0)]])
    module(x)  # eager warm-up sizes the scratch once, as a server's start-up would
    torch._dynamo.reset()  # forget frames compiled by other tests (or with another backend)
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    swaps = [
        [[(0, 1.0)], [], [(1, 1.0)]],
        [[(2, -1.0), (1, 0.5)], [(0, 2.0)], []],
        [[], [(2, 1.0)], [(2, 0.5), (0, 1.0)]],
    ]
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for step, rows in enumerate(swaps):
            if step == 2:  # re-page slot 0 in place: two of slot 1's pages, a new rank
                pool.pages.page_table[0, :2] = pool.pages.page_table[1, :2]
                pool.pages.ranks[0] = 2
            batch.set(rows)
            got = compiled(x)
            ref = reference_add_adapters(module.base(x), x, pool.pages, *pack_rows(rows, 2))
            assert_within(got, ref, torch.float32)


@pytest.mark.parametrize(
    "compiler",
    [
        "aot_eager",
        pytest.param(
            "inductor",  # checks the mutation is re-inplaced, not just traced; needs a C++ compiler on CPU
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    shutil.which("c++") is None, reason="inductor on CPU needs a C++ compiler"
                ),
            ],
        ),
    ],
)
def test_compile_swaps_adapters_without_recompiling_cpu(compiler: str) -> None:
    swaps_without_recompiling(CPU, compiler)


#: Compiles both kernels for sm_90 through Triton's real front end and ptxas (no GPU needed), which the
#: interpreter skips: tl.dot tile minimums, loop-carried types, dtype rules. Prints whether each uses MMA.
AOT_COMPILE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deft_runtime.ops.triton_ops import _dot_args, _expand_kernel, _shrink_kernel

def ptx(fn, ptrs, consts):
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32)).asm["ptx"]

for name, dtype in [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]:
    index = {"table_ptr": "*i32", "ranks_ptr": "*i32", "slots_ptr": "*i32", "weights_ptr": "*fp32"}
    blocks = {"BLOCK_T": 64, "R_BLOCK": 16, **_dot_args(dtype)}
    shrink = ptx(_shrink_kernel, {"x_ptr": f"*{name}", "a_ptr": f"*{name}", "v_ptr": "*fp32", **index},
                 {"BLOCK_K": 64, **blocks})
    expand = ptx(_expand_kernel, {"v_ptr": "*fp32", "b_ptr": f"*{name}", "y_ptr": f"*{name}", **index},
                 {"BLOCK_N": 64, **blocks})
    print(name, "mma" in shrink, "mma" in expand)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
    reason="this triton build has no CUDA back end to compile with",
)
def test_kernels_compile_for_a_real_gpu() -> None:
    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
    }  # the interpreter hides the compiler
    done = subprocess.run([sys.executable, "-c", AOT_COMPILE], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    assert "fp32 False False" in lines, done.stdout  # IEEE float32, no TF32 tensor cores
    assert "fp16 True True" in lines and "bf16 True True" in lines, done.stdout  # halves on tensor cores


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 133])
def test_cuda_dtype_sweep(dtype: torch.dtype, n: int) -> None:
    cuda = torch.device("cuda")
    num_slots = max(n, 8) + 1
    slot_ranks = [RANKS[s % len(RANKS)] for s in range(num_slots)]
    slot_ranks[2] = 0
    pool = build_pool(320, 640, slot_ranks, dtype=dtype, seed=n, device=cuda)
    x, y = random_xy(n, 77, 320, 640, dtype, seed=n, device=cuda)
    rows = sweep_rows("zipf", n, num_slots, untargeted=2, seed=n)
    check(TritonOps(), pool, rows, x, y)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_equals_eager_across_adapter_swaps() -> None:
    cuda = torch.device("cuda")
    pool = build_pool(320, 640, [4, 17, 64, 0, 33], dtype=torch.bfloat16, seed=14, device=cuda)
    x, y0 = random_xy(4, 77, 320, 640, torch.bfloat16, seed=14, device=cuda)
    ops, y = TritonOps(), y0.clone()
    batch = AdapterBatch(4, 2, device=cuda, backend=ops)
    batch.set([[(0, 1.0)], [], [(1, 1.0), (2, 0.5)], [(3, 1.0)]])

    def step() -> None:
        y.copy_(y0)
        ops.add_adapters(y, x, pool.pages, batch)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels and sizes the scratch outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for rows in ([[(2, -1.0)], [(4, 1.0)], [], [(0, 1.0), (1, 1.0)]], [[], [(2, 1.0)], [(0, 2.0)], []]):
        batch.set(rows)
        graph.replay()
        eager = ops.add_adapters(y0.clone(), x, pool.pages, batch)
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
        assert_within(y.double().cpu(), dense_expected(y0, x, pool, rows), torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
def test_compile_swaps_adapters_without_recompiling_cuda() -> None:
    swaps_without_recompiling(torch.device("cuda"), "inductor")


def test_stack_cache_reuses_a_layers_stacks_within_its_budget() -> None:
    """One entry per layer, reused while the slots' page-index objects are unchanged; a stack that
    would exceed the byte budget is used once and not kept; results equal the uncached path."""
    from deft_runtime.ops.torch_ops import StackCache, tiled_add_adapters

    pool = build_pool(24, 40, [8, 8, 8, 8], seed=9)
    rows: list[RowAdapters] = [[(s, 0.5)] for s in range(4) for _ in range(2)]
    x, y = random_xy(len(rows), 6, 24, 40, torch.float32, seed=9)
    ops = TorchOps()
    AdapterBatch(len(rows), 1, backend=ops).set(rows)
    assert ops.tiling is not None
    plain = y.clone()
    assert tiled_add_adapters(plain, x, pool.pages, ops.tiling)
    stack_bytes = 4 * 8 * (24 + 40) * 4
    for budget, kept in ((stack_bytes, True), (stack_bytes - 1, False)):
        cache = StackCache(budget)
        outs = [y.clone(), y.clone()]
        for out in outs:
            assert tiled_add_adapters(out, x, pool.pages, ops.tiling, cache)
            assert torch.equal(out, plain)
        assert (cache.hits, cache.misses, cache.nbytes) == ((1, 1, stack_bytes) if kept else (0, 2, 0))
    cache = StackCache()
    tiled_add_adapters(y.clone(), x, pool.pages, ops.tiling, cache)
    index = pool.pages.page_index[2]
    assert isinstance(index, torch.Tensor)
    pool.pages.page_index[2] = index.clone()  # republished: equal pages, a new index object
    tiled_add_adapters(y.clone(), x, pool.pages, ops.tiling, cache)
    assert (cache.hits, cache.misses) == (0, 2)
