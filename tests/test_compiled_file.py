"""The compiled-factor cache file (deft_server.compiled_file): what the pool's pages want (A and Bᵀ per
layer, float32, contiguous views of one buffer read at once), and a damaged file is never trusted: the
reader says None and the registry recompiles."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from deft_server.compiled_file import COMPILED_FORMAT, compiled_tensors, read_compiled
from deft_server.local_cache import LocalCache

from deft_runtime.adapter import AdapterKind
from deft_runtime.compile import CompiledAdapter, LowRankFactors
from deft_runtime.formats.safetensors_io import write_safetensors_atomic

SHAPES = {"down.attn.to_q": (24, 16), "mid.attn.to_out.0": (40, 40)}


def compiled(rank: int = 3) -> CompiledAdapter:
    g = torch.Generator().manual_seed(0)
    factors = {
        name: LowRankFactors(B=torch.randn(d_out, rank, generator=g), A=torch.randn(rank, d_in, generator=g))
        for name, (d_out, d_in) in SHAPES.items()
    }
    return CompiledAdapter(kind=AdapterKind.DEFT, factors=factors, fingerprint=None)


def write(path: Path, c: CompiledAdapter, **metadata: str) -> Path:
    meta = {"format": COMPILED_FORMAT, "kind": c.kind.value, "base_digest": "d", **metadata}
    return write_safetensors_atomic(path, compiled_tensors(c), meta)


def test_round_trip_gives_views_of_one_buffer_laid_out_for_the_pages(tmp_path):
    c = compiled()
    factors, metadata = read_compiled(write(tmp_path / "a.safetensors", c))
    assert metadata["format"] == COMPILED_FORMAT and set(factors) == set(SHAPES)
    storages = set()
    for name, f in factors.items():
        assert torch.equal(f.A, c.factors[name].A) and torch.equal(f.B, c.factors[name].B)
        assert f.A.is_contiguous() and f.B.T.is_contiguous()  # A and Bᵀ: the pool copies them as they are
        storages.add(f.A.untyped_storage().data_ptr())
        storages.add(f.B.untyped_storage().data_ptr())
    assert len(storages) == 1  # one read, zero-copy views


def test_the_cache_loads_what_it_saved_and_ignores_other_layouts(tmp_path):
    cache = LocalCache(tmp_path / "data")
    c = compiled()
    cache.save_compiled("ab" * 32, "digest", c)
    loaded = cache.load_compiled("ab" * 32, "digest")
    assert loaded is not None and loaded.kind is AdapterKind.DEFT
    assert all(torch.equal(loaded.factors[n].delta(), c.factors[n].delta()) for n in SHAPES)
    assert cache.load_compiled("ab" * 32, "other-digest") is None  # compiled for another base
    old = {f"{n}.B": f.B.contiguous() for n, f in c.factors.items()} | {
        f"{n}.A": f.A for n, f in c.factors.items()
    }
    path = cache.compiled_path("cd" * 32, "digest")
    write_safetensors_atomic(path, old, {"format": "deft.compiled", "kind": "deft", "base_digest": "digest"})
    assert cache.load_compiled("cd" * 32, "digest") is None  # the previous layout: recompiled, not misread


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.mark.parametrize(
    "damage",
    [
        "truncated",
        "empty",
        "offset past the end",
        "dtype",
        "shape does not match bytes",
        "Bt missing",
        "not json",
    ],
)
def test_a_damaged_file_is_not_trusted(tmp_path, damage):
    path = damaged(write(tmp_path / "a.safetensors", compiled()), damage)
    assert read_compiled(path) is None
    assert read_compiled(tmp_path / "missing.safetensors") is None


def damaged(path: Path, damage: str) -> Path:
    """``path`` with one kind of damage done to it."""
    first = "down.attn.to_q"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-5])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "offset past the end":
        _rewrite_header(path, lambda h: h[f"{first}.A"].update(data_offsets=[0, 1 << 30]))
    elif damage == "dtype":
        _rewrite_header(path, lambda h: h[f"{first}.A"].update(dtype="F16"))
    elif damage == "shape does not match bytes":
        _rewrite_header(path, lambda h: h[f"{first}.A"].update(shape=[5, 16]))
    elif damage == "gap":  # a tensor moved 4 bytes on: not back to back any more
        _rewrite_header(
            path,
            lambda h: h[f"{first}.A"].update(data_offsets=[o + 4 for o in h[f"{first}.A"]["data_offsets"]]),
        )
    elif damage == "Bt missing":
        _rewrite_header(path, lambda h: h.pop(f"{first}.Bt"))
    else:
        raw = bytearray(path.read_bytes())
        raw[8:12] = b"\xff\xfe{["
        path.write_bytes(bytes(raw))
    return path


# ---------------------------------------------------------------------------- one-read plans


def test_a_read_plan_fills_given_arrays_exactly_as_read_compiled_reads(tmp_path):
    import numpy as np
    from deft_server.compiled_file import plan_compiled_read

    c = compiled(rank=3)
    path = write(tmp_path / "a.safetensors", c)
    plan, metadata = plan_compiled_read(path)
    assert metadata["format"] == COMPILED_FORMAT
    assert plan.ranks == dict.fromkeys(SHAPES, 3) and plan.shapes == SHAPES
    assert plan.nbytes == sum(4 * 3 * (o + i) for o, i in SHAPES.values())
    dests = {
        layer: (np.full((3, d_in), np.nan, np.float32), np.full((3, d_out), np.nan, np.float32))
        for layer, (d_out, d_in) in SHAPES.items()
    }
    assert plan.read_into(dests)
    factors, _ = read_compiled(path)
    for layer, (A, Bt) in dests.items():
        assert np.array_equal(A, factors[layer].A.numpy()) and np.array_equal(Bt, factors[layer].B.T.numpy())
    wrong = {**dests, "down.attn.to_q": (np.zeros((2, 16), np.float32), dests["down.attn.to_q"][1])}
    assert not plan.read_into(wrong)  # a destination of another shape: refused, nothing assumed
    path.write_bytes(path.read_bytes()[:-4])
    assert not plan.read_into(dests)  # the file changed size since the plan


def test_the_vectorised_plan_fills_an_iovec_array_of_buffers_and_checks_every_length(tmp_path):
    import numpy as np
    from deft_server.compiled_file import plan_compiled_read

    c = compiled(rank=3)
    path = write(tmp_path / "a.safetensors", c)
    plan, _ = plan_compiled_read(path)
    spans = plan.vector
    assert spans.layers == tuple(SHAPES) and spans.ranks.tolist() == [3, 3]
    assert spans.d_out.tolist() == [o for o, _ in SHAPES.values()]
    assert spans.d_in.tolist() == [i for _, i in SHAPES.values()]
    assert int(spans.span_bytes.sum()) == plan.nbytes and len(spans.span_layer) == 4
    dests = []  # one buffer per span, in file order, as the spans describe them
    for layer, is_a in zip(spans.span_layer.tolist(), spans.span_is_a.tolist(), strict=True):
        d_out, d_in = SHAPES[spans.layers[layer]]
        dests.append(((spans.layers[layer], is_a), np.full((3, d_in if is_a else d_out), np.nan, np.float32)))
    iov = np.array([[d.ctypes.data, d.nbytes] for _, d in dests], dtype=np.uint64)
    assert spans.read(iov)
    factors, _ = read_compiled(path)
    for (layer, is_a), d in dests:
        want = factors[layer].A if is_a else factors[layer].B.T
        assert np.array_equal(d, want.numpy())
    longer = iov.copy()
    longer[0, 1] += 4  # a length that is not the tensor's: refused before reading
    assert not spans.read(longer)
    assert not spans.read(iov[:-1].copy())  # one buffer short
    assert not spans.read(iov.astype(np.int64))
    path.write_bytes(path.read_bytes()[:-4])
    assert not spans.read(iov)  # the file changed size since the plan


@pytest.mark.parametrize(
    "damage", ["truncated", "empty", "offset past the end", "dtype", "gap", "Bt missing", "not json"]
)
def test_no_read_plan_for_a_file_not_laid_out_back_to_back(tmp_path, damage):
    from deft_server.compiled_file import plan_compiled_read

    assert plan_compiled_read(damaged(write(tmp_path / "a.safetensors", compiled()), damage)) is None


def test_the_cache_keeps_plans_while_the_file_stays_the_same(tmp_path):
    cache = LocalCache(tmp_path / "cache")
    c = compiled()
    cache.save_compiled("ab" * 32, "digest", c)
    first = cache.plan_compiled("ab" * 32, "digest")
    assert first is not None and cache.plan_compiled("ab" * 32, "digest") is first
    assert cache.plan_compiled("ab" * 32, "other base") is None
    cache.save_compiled("ab" * 32, "digest", c)  # replaced atomically: a new file, a new plan
    assert cache.plan_compiled("ab" * 32, "digest") is not first
    cache.compiled_path("ab" * 32, "digest").unlink()
    assert cache.plan_compiled("ab" * 32, "digest") is None
