"""Adapter memory and indexing edge cases: paging, pins, eviction, pool full, popularity, 133 rows."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.compile import compile_adapter
from deft_runtime.errors import AdapterNotFound, InvalidRequest, PoolExhausted
from deft_runtime.pool import AdapterPool, PoolConfig
from deft_runtime.runtime import MultiAdapterModel
from deft_runtime.testing import random_adapter

D_MODEL, D_CROSS = 16, 24


class TinyAttention(nn.Module):
    """Just enough of an attention block to exercise wrapping: rectangular and square projections."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(D_MODEL, D_MODEL)
        self.to_k = nn.Linear(D_CROSS, D_MODEL, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(D_MODEL, D_MODEL)])

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        q, k = self.to_q(x), self.to_k(ctx)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D_MODEL), dim=-1)
        return self.to_out[0](attn @ k)


def tiny_model(seed: int = 0) -> TinyAttention:
    torch.manual_seed(seed)
    return TinyAttention().eval()


SHAPES = {"to_q": (D_MODEL, D_MODEL), "to_k": (D_MODEL, D_CROSS), "to_out.0": (D_MODEL, D_MODEL)}


def factor_bytes(compiled, dtype=torch.float32) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(f.rank * (f.B.shape[0] + f.A.shape[1]) * elem for f in compiled.factors.values())


def make(budget_pages: int, *, max_slots: int = 16, backend: str = "torch", max_rows: int = 256):
    page_bytes = sum(o + i for o, i in SHAPES.values()) * 4
    model = tiny_model()
    mam = MultiAdapterModel(
        model,
        pool_config=PoolConfig(
            device_bytes=budget_pages * page_bytes, host_bytes=1 << 30, max_slots=max_slots
        ),
        backend=backend,
        max_rows=max_rows,
    )
    return model, mam


def dense_reference(mam: MultiAdapterModel, compiled: dict, rows, x, ctx) -> torch.Tensor:
    """Row by row, with each row's adapters merged densely into fresh weights (no pool, no kernels)."""
    outs = []
    for i, pairs in enumerate(rows):
        ref = tiny_model()
        with torch.no_grad():
            for name, weight in pairs:
                for layer, f in compiled[name].factors.items():
                    ref.get_submodule(layer).weight += weight * f.delta()
            outs.append(ref(x[i : i + 1], ctx[i : i + 1]))
    return torch.cat(outs)


def run(mam, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(len(rows), 5, D_MODEL, generator=g), torch.randn(len(rows), 3, D_CROSS, generator=g)
    with mam.rows(rows), torch.no_grad():
        return mam.denoiser(x, ctx), x, ctx


def test_resident_bytes_equal_factor_bytes_for_mixed_ranks():
    _, mam = make(budget_pages=200)
    for rank in (1, 3, 4, 7, 8, 16):
        compiled = mam.register(f"r{rank}", random_adapter(AdapterKind.DEFT, SHAPES, rank=rank, seed=rank))
        mam.pool.acquire([f"r{rank}"])
        resident = mam.pool.resident_nbytes(f"r{rank}")
        assert resident == factor_bytes(compiled)
        assert resident <= 1.1 * compiled.nbytes
    per_layer_rank = {"to_q": 2, "to_k": 5, "to_out.0": 1}
    compiled = mam.register("pattern", random_adapter(AdapterKind.LORA, SHAPES, rank=per_layer_rank))
    mam.pool.acquire(["pattern"])
    assert mam.pool.resident_nbytes("pattern") == factor_bytes(compiled)


@pytest.mark.parametrize(
    "popularity",
    ["distinct", "identical", "uniform", "zipf", "skewed"],
)
def test_popularity_patterns_match_dense_reference(popularity):
    ranks = [1, 2, 4, 8, 16, 3, 5]  # mixed in one batch; 16 = min(d_out, d_in) is the largest possible
    _, mam = make(budget_pages=400, max_slots=len(ranks))
    compiled = {
        f"a{i}": mam.register(
            f"a{i}", random_adapter(AdapterKind.DEFT, SHAPES, rank=r, decomposition=Decomposition.QR, seed=i)
        )
        for i, r in enumerate(ranks)
    }
    names = list(compiled)
    n_rows = 13
    g = torch.Generator().manual_seed(7)
    if popularity == "distinct":
        picks = [names[i % len(names)] for i in range(n_rows)]
    elif popularity == "identical":
        picks = [names[-1]] * n_rows
    elif popularity == "uniform":
        picks = [names[int(i)] for i in torch.randint(0, len(names), (n_rows,), generator=g)]
    elif popularity == "zipf":
        p = torch.tensor([1.0 / (k + 1) for k in range(len(names))])
        picks = [names[int(i)] for i in torch.multinomial(p, n_rows, replacement=True, generator=g)]
    else:  # skewed: one hot adapter, a few others, some rows without any
        picks = [names[0]] * 9 + [names[-1], None, names[3], None]
    rows = [[] if n is None else [(n, 1.0)] for n in picks]
    out, x, ctx = run(mam, rows)
    torch.testing.assert_close(out, dense_reference(mam, compiled, rows, x, ctx), atol=2e-5, rtol=1e-4)


def test_last_slot_and_sentinel_never_alias():
    """Fill every slot so the last one holds a distinctive adapter; rows without adapters stay exact."""
    max_slots = 4
    _, mam = make(budget_pages=100, max_slots=max_slots)
    compiled = {}
    for i in range(max_slots):
        compiled[f"a{i}"] = mam.register(
            f"a{i}", random_adapter(AdapterKind.LORA, SHAPES, rank=2, seed=i, magnitude=1.0 + i)
        )
    mam.pool.acquire(list(compiled))  # pin all: slots 0..3 in use
    assert sorted(mam.pool.slot_of(n) for n in compiled) == list(range(max_slots))
    last = next(n for n in compiled if mam.pool.slot_of(n) == max_slots - 1)
    rows = [[], [(last, 1.0)], [], [(last, 1.0)], []]
    out, x, ctx = run(mam, rows)
    torch.testing.assert_close(out, dense_reference(mam, compiled, rows, x, ctx), atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        plain = tiny_model()(x, ctx)
    for i in (0, 2, 4):
        torch.testing.assert_close(out[i], plain[i], atol=0, rtol=0)


def test_133_rows_single_adapter_and_single_row():
    _, mam = make(budget_pages=100)
    compiled = {"a": mam.register("a", random_adapter(AdapterKind.DEFT, SHAPES, rank=4))}
    rows = [[("a", 1.0)]] * 133
    out, x, ctx = run(mam, rows)
    torch.testing.assert_close(out, dense_reference(mam, compiled, rows, x, ctx), atol=2e-5, rtol=1e-4)
    out1, x1, ctx1 = run(mam, [[("a", 0.3)]], seed=1)
    torch.testing.assert_close(
        out1, dense_reference(mam, compiled, [[("a", 0.3)]], x1, ctx1), atol=2e-5, rtol=1e-4
    )


def test_eviction_while_another_adapter_is_pinned_is_lru_and_correct():
    # room for exactly two rank-4 adapters
    _, mam = make(budget_pages=8, max_slots=8)
    compiled = {
        n: mam.register(n, random_adapter(AdapterKind.LORA, SHAPES, rank=4, seed=i))
        for i, n in enumerate("abc")
    }
    mam.pool.acquire(["a"])  # pinned: in flight
    mam.pool.acquire(["b"])
    mam.pool.release(["b"])  # b is cached but unpinned
    mam.pool.acquire(["c"])  # needs room: b (unpinned) is evicted, never a
    assert mam.pool.is_resident("a") and mam.pool.is_resident("c") and not mam.pool.is_resident("b")
    assert mam.pool.stats.evictions["device"] == 1
    # a request for b now cannot fit: both residents are pinned
    with pytest.raises(PoolExhausted, match="does not fit in the device pool: 2 pinned"):
        mam.pool.acquire(["b"])
    assert mam.pool.pins("a") == 1 and mam.pool.pins("c") == 1
    mam.pool.release(["a", "c"])
    rows = [[("b", 1.0)], [("a", 1.0)]]  # b reloads from the host tier, evicting the LRU one
    out, x, ctx = run(mam, rows)
    torch.testing.assert_close(out, dense_reference(mam, compiled, rows, x, ctx), atol=2e-5, rtol=1e-4)
    assert mam.pool.stats.loads["host"] == 3  # b was compiled/read once; the reload came from host


def test_acquire_is_all_or_nothing_and_pool_full_is_typed():
    _, mam = make(budget_pages=6, max_slots=8)
    mam.register("small", random_adapter(AdapterKind.LORA, SHAPES, rank=2, seed=1))
    mam.register("big", random_adapter(AdapterKind.LORA, SHAPES, rank=5, seed=2))
    with pytest.raises(PoolExhausted):
        mam.pool.acquire(["small", "big"])  # 2 + 5 pages > 6
    assert mam.pool.pins("small") == 0, "a failed acquire leaves no pin behind"
    mam.pool.acquire(["big"])
    assert mam.pool.is_resident("big")


def test_slots_exhausted_is_typed_and_hits_misses_counted():
    _, mam = make(budget_pages=100, max_slots=2)
    for n in "abc":
        mam.register(n, random_adapter(AdapterKind.LORA, SHAPES, rank=1, seed=ord(n)))
    mam.pool.acquire(["a", "b"])
    with pytest.raises(PoolExhausted):
        mam.pool.acquire(["c"])
    mam.pool.acquire(["a"])
    assert (mam.pool.stats.hits, mam.pool.stats.misses) == (1, 3)


def test_host_tier_lru_respects_its_budget():
    calls = []

    def source(name: str):
        calls.append(name)
        return compile_adapter(
            random_adapter(AdapterKind.LORA, SHAPES, rank=4, seed=len(calls)), dict(weights)
        )

    model = tiny_model()
    weights = {n: model.get_submodule(n).weight for n in SHAPES}
    one = sum(4 * (o + i) * 4 for o, i in SHAPES.values())
    pool = AdapterPool(SHAPES, PoolConfig(device_bytes=one * 10, host_bytes=int(one * 2.5)), source)
    for n in "abc":
        pool.acquire([n])
        pool.release([n])
    assert pool.resident_bytes["host"] <= one * 2.5 and pool.stats.evictions["host"] == 1
    pool.evict("a")
    pool.acquire(["a"])  # host copy of a was evicted first (LRU): the source is asked again
    assert calls == ["a", "b", "c", "a"]


def test_unknown_adapter_and_unacquired_rows_are_typed_errors():
    _, mam = make(budget_pages=10)
    with pytest.raises(AdapterNotFound, match="no adapter named 'ghost'"):
        mam.pool.acquire(["ghost"])
    mam.register("a", random_adapter(AdapterKind.LORA, SHAPES, rank=1))
    with pytest.raises(InvalidRequest, match="not resident; acquire it first"):
        mam.set_rows([[("a", 1.0)]])
    with pytest.raises(InvalidRequest, match="blends 5 adapters; at most 4"), mam.rows([[("a", 0.2)] * 5]):
        pass


def test_rank_above_pool_max_rank_is_refused():
    model = tiny_model()
    pool = AdapterPool(
        SHAPES, PoolConfig(device_bytes=1 << 20, host_bytes=1 << 20, max_rank=2), lambda n: compiled
    )
    compiled = compile_adapter(
        random_adapter(AdapterKind.LORA, SHAPES, rank=3), {n: model.get_submodule(n).weight for n in SHAPES}
    )
    with pytest.raises(PoolExhausted, match="rank 3 in 'to_q', above the pool's max_rank 2"):
        pool.acquire(["x"])


def test_fragmented_pages_use_gathers_and_contiguous_pages_use_views():
    _, mam = make(budget_pages=10, max_slots=8)
    compiled = {
        n: mam.register(n, random_adapter(AdapterKind.LORA, SHAPES, rank=r, seed=i))
        for i, (n, r) in enumerate([("a", 2), ("b", 2), ("c", 3)])
    }
    mam.pool.acquire(["a", "b"])
    layer = mam.pool.layers["to_q"]
    assert isinstance(layer.page_index[mam.pool.slot_of("a")], slice)  # fresh pool: contiguous pages
    mam.pool.release(["a"])
    mam.pool.evict("a")
    mam.pool.acquire(["c"])  # reuses a's two freed pages plus a fresh one: not contiguous
    assert isinstance(layer.page_index[mam.pool.slot_of("c")], torch.Tensor)
    rows = [[("c", 1.0)], [("b", 0.5)], [("c", 0.3), ("b", 0.7)]]
    out, x, ctx = run(mam, rows)
    torch.testing.assert_close(out, dense_reference(mam, compiled, rows, x, ctx), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- one-read cold loads


class FileSource:
    """Compiled adapters in a LocalCache, offered as the server's registry offers them: ``direct_load``
    (the one-read path) and ``load`` (the copying path); counts what the pool used."""

    def __init__(self, root, compiled: dict, *, fail_read: str | None = None, vector: bool = True) -> None:
        from deft_server.local_cache import LocalCache

        self.cache, self.fail_read, self.vector = LocalCache(root), fail_read, vector
        self.calls = {"direct": 0, "load": 0}
        for name, c in compiled.items():
            self.cache.save_compiled(self.sha(name), "base", c)

    @staticmethod
    def sha(name: str) -> str:
        return name.encode().hex().ljust(64, "0")

    def version(self, name: str) -> str:
        return self.sha(name)

    def load(self, name: str):
        self.calls["load"] += 1
        return self.sha(name), self.cache.load_compiled(self.sha(name), "base")

    def direct_load(self, name: str):
        from deft_runtime.pool import DirectLoad

        self.calls["direct"] += 1
        plan = self.cache.plan_compiled(self.sha(name), "base")
        read, spans = plan.read_into, plan.vector
        if self.fail_read == "short":
            read = lambda dests: False  # noqa: E731 - a read that came short
        elif self.fail_read == "raise":

            def read(dests):
                raise OSError(5, "Input/output error")

        if self.fail_read == "lengths":  # a plan whose spans do not match its ranks
            spans = dataclasses.replace(spans, span_bytes=spans.span_bytes + 4)
        elif self.fail_read:
            spans = dataclasses.replace(spans, read=read)  # the same failure, for the vectorised read
        vector = spans if self.vector else None
        return DirectLoad(self.sha(name), plan.ranks, plan.shapes, plan.nbytes, read, spans=vector)


def pools_with_and_without_direct(tmp_path, budget_pages=12, **source_kw):
    compiled = {
        n: compile_adapter(
            random_adapter(AdapterKind.DEFT, SHAPES, rank=r, seed=i, decomposition=Decomposition.QR),
            {k: w for k, w in make(1)[1].base_weights.items()},
        )
        for i, (n, r) in enumerate([("a", 2), ("b", 3), ("c", 4)])
    }
    source = FileSource(tmp_path / "cache", compiled, **source_kw)
    page_bytes = sum(o + i for o, i in SHAPES.values()) * 4
    config = PoolConfig(device_bytes=budget_pages * page_bytes, host_bytes=1 << 30, max_slots=8)
    direct = AdapterPool(SHAPES, config, source)
    copying = AdapterPool(SHAPES, config, lambda name: compiled[name])
    return direct, copying, source


def pages_of(pool: AdapterPool, name: str) -> dict:
    slot = pool.slot_of(name)
    out = {}
    for layer, lp in pool.layers.items():
        r = int(lp.ranks[slot])
        ids = lp.page_table[slot, :r].long()
        out[layer] = (r, lp.A[ids].clone(), lp.B[ids].clone())
    return out


@pytest.mark.parametrize("vector", [True, False], ids=["iovec-array", "per-tensor-views"])
def test_a_cold_load_reads_the_file_straight_into_the_pages(tmp_path, vector):
    direct, copying, source = pools_with_and_without_direct(tmp_path, vector=vector)
    for pool in (direct, copying):
        pool.acquire(["a", "b", "c"])
    assert source.calls == {"direct": 3, "load": 0}  # no host copy, no second copy
    for name in ("a", "b", "c"):
        got, want = pages_of(direct, name), pages_of(copying, name)
        for layer in SHAPES:
            assert got[layer][0] == want[layer][0]
            assert torch.equal(got[layer][1], want[layer][1]) and torch.equal(got[layer][2], want[layer][2])
        lp = direct.layers["to_q"]
        assert isinstance(lp.page_index[direct.slot_of(name)], slice)  # contiguous: views when serving
    assert direct.stats.loads == {"host": 0, "device": 3}
    assert direct.resident_nbytes("b") == copying.resident_nbytes("b")
    direct.release(["a"])
    direct.evict("a")
    direct.acquire(["a"])  # evicted, then cold again: read again, into the pages it had
    assert source.calls["direct"] == 4 and pages_of(direct, "a")["to_k"][0] == 2


@pytest.mark.parametrize("vector", [True, False], ids=["iovec-array", "per-tensor-views"])
def test_scattered_pages_short_reads_and_failing_reads_take_the_copying_path(tmp_path, vector):
    direct, copying, source = pools_with_and_without_direct(tmp_path, budget_pages=9, vector=vector)
    direct.acquire(["a", "b"])  # pages 0-1 and 2-4 in every layer
    direct.release(["a"])
    direct.evict("a")
    direct.acquire(["c"])  # 4 pages: the freed 0-1 and fresh 5-6, not contiguous
    assert source.calls == {"direct": 3, "load": 1}
    copying.acquire(["c"])
    assert all(
        torch.equal(x, y)
        for x, y in zip(pages_of(direct, "c")["to_q"][1:], pages_of(copying, "c")["to_q"][1:], strict=True)
    )
    free = direct.free_pages()

    for fail in ("short", "lengths") if vector else ("short",):
        short, short_copying, short_source = pools_with_and_without_direct(
            tmp_path / fail, fail_read=fail, vector=vector
        )
        short.acquire(["b"])
        assert short_source.calls == {"direct": 1, "load": 1} and short.is_resident("b")
        short_copying.acquire(["b"])
        assert torch.equal(pages_of(short, "b")["to_k"][2], pages_of(short_copying, "b")["to_k"][2])
    failing, _, _ = pools_with_and_without_direct(tmp_path / "raise", fail_read="raise", vector=vector)
    before = failing.free_pages()
    with pytest.raises(OSError, match="Input/output error"):
        failing.acquire(["b"])
    assert failing.free_pages() == before  # reservation returned
    assert not failing.is_resident("b") and len(failing._free_slots) == 8
    assert free == direct.free_pages()
