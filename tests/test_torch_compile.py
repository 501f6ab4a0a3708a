"""``EngineConfig(compile=True)`` (``deft serve --compile``): the tiny-sdxl denoiser with its adapter
layers compiled once by inductor, then served through changing adapter mixes, weights, blends, batch
sizes, step counts and a newly registered adapter without one recompile, and equal to diffusers + PEFT
and to the eager engine within 2/255.

One compile of tiny-sdxl takes about two minutes on the 2-core CI machine, so the module compiles once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import as_array, reference_image, serving_engine
from test_image_conditioning import make_adapters

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.engine import Engine, EngineConfig, GenerationRequest
from deft_runtime.engine.runner import bucket_for, default_buckets, resize_rows
from deft_runtime.layers import MultiAdapterLinear
from deft_runtime.models import build_tiny_sdxl
from deft_runtime.testing import random_adapter

TOL = 2 / 255
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("compile_adapters"))


@pytest.fixture(scope="module")
def engines(adapter_dirs):
    """(eager, compiled): two engines over one pipeline and one adapter model, used one at a time."""
    torch._dynamo.reset()
    eager = serving_engine(build_tiny_sdxl(0), adapter_dirs, max_batch_rows=16)
    compiled = Engine(eager.pipe, eager.model, EngineConfig(max_batch_rows=16, compile=True))
    compiled.warm_up(timeout=1200)
    yield eager, compiled
    compiled.shutdown()
    eager.shutdown()


def run(engine: Engine, requests: list[GenerationRequest]) -> list[np.ndarray]:
    handles = [engine.submit(r) for r in requests]
    return [as_array(h.result(600).images) for h in handles]


def request(prompt: str, seed: int, steps: int, adapters=(), guidance_scale_override=5.0, **kw):
    return GenerationRequest(
        prompt=prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance_scale_override,
        adapters=adapters, **kw,
    )  # fmt: skip


def test_the_compiled_denoiser_equals_diffusers_with_peft(engines, adapter_dirs):
    _, compiled = engines
    with torch._dynamo.config.patch(error_on_recompile=True):
        (got,) = run(compiled, [request("a dog", 1, 4, (("dog", 1.0),))])
    ref = reference_image(build_tiny_sdxl, adapter_dirs["dog"], prompt="a dog", seed=1, num_inference_steps=4)
    assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= TOL


def test_changing_mixes_batch_sizes_and_new_adapters_never_recompile(engines):
    eager, compiled = engines
    waves = [
        # every request its own adapter (or none), staggered step counts: batch sizes 2..8 rows
        [request("a", 0, 3, (("dog", 1.0),)), request("b", 1, 5, (("style", 1.0),)), request("c", 2, 4)],
        # blends and negative weights; four requests at once
        [
            request("d", 3, 3, (("dog", 0.5), ("style", 0.7))),
            request("e", 4, 3, (("style", -1.0),)),
            request("f", 5, 2, (("dog", 2.0),), num_images=2),
            request("g", 6, 4),
        ],
        # full forwards: 16 rows (the warm-up compiled a full batch too)
        [request(f"full {i}", 20 + i, 4, (("dog" if i % 2 else "style", 1.0),)) for i in range(8)],
    ]
    rows: list[int] = []
    observer = compiled.observer
    spy = type(
        "Spy",
        (),
        {
            "on_forward": lambda self, n, *a: rows.append(n),
            "__getattr__": lambda self, k: getattr(observer, k),
        },
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        for wave in waves:
            compiled.observer = spy()
            try:
                got = run(compiled, wave)
            finally:
                compiled.observer = observer
            want = run(eager, wave)
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape and float(np.abs(g - w).max()) <= TOL
                assert g.std() > 0.01  # real images, not a constant
        # hot swap: an adapter registered after compiling, of another rank and projector
        shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in compiled.model.base_weights.items()}
        fresh = random_adapter(
            AdapterKind.PARA, shapes, rank=7, decomposition=Decomposition.QR, seed=5, magnitude=1.0
        )
        compiled.model.register("fresh", fresh)
        mix = [request("h", 7, 3, (("fresh", 1.0),)), request("i", 8, 3, (("dog", 1.0),))]
        got, want = run(compiled, mix), run(eager, mix)
    for g, w in zip(got, want, strict=True):
        assert float(np.abs(g - w).max()) <= TOL
    assert 16 in rows and len(set(rows)) >= 4, rows  # full forwards and several batch sizes ran compiled
    base = run(eager, [request("h", 7, 3)])[0]
    assert float(np.abs(got[0] - base).max()) > 3 * TOL  # the fresh adapter really applied (10/255 here)


def test_compiled_layers_go_through_the_opaque_op(engines):
    """Inside the compiled graph each wrapped layer is one ``deft::layer_adapters`` call (what keeps
    the mapping out of the graph's guards); eager calls never go through it."""
    _, compiled = engines
    layers = [m for m in compiled.model.denoiser.modules() if isinstance(m, MultiAdapterLinear)]
    assert layers and len({m.handle for m in layers}) == len(layers)
    calls = []
    original = MultiAdapterLinear.add_adapters

    def counting(self, y, x):
        calls.append(torch.compiler.is_compiling())
        return original(self, y, x)

    MultiAdapterLinear.add_adapters = counting
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            run(compiled, [request("j", 9, 1, (("dog", 1.0),))])
    finally:
        MultiAdapterLinear.add_adapters = original
    assert len(calls) == len(layers) and not any(calls)  # once per layer, from the op (run eagerly)


def test_deft_serve_compile_compiles_before_serving_and_equals_diffusers(server_factory, adapter_dirs):
    """The real server with ``--compile``: SERVING only once the warm-up compiled the denoiser; then a
    request with a registered PEFT adapter equals diffusers + PEFT within 2/255."""
    from deft_client import DeftClient

    server = server_factory.start("--compile")
    assert "compiled and warmed up in" in server.log()
    with DeftClient(server.address, timeout=300) as client:
        client.register_adapter("dog", adapter_dirs["dog"])
        (image,) = client.generate("a dog", adapters=["dog"], seed=1, steps=4, guidance_scale=5.0)
    ref = reference_image(build_tiny_sdxl, adapter_dirs["dog"], prompt="a dog", seed=1, num_inference_steps=4)
    got = as_array([image.convert("RGB")])
    assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= TOL


# ---------------------------------------------------------------------------- bucketed batch sizes


def test_bucket_sizes_and_row_padding():
    assert default_buckets(16) == (1, 2, 4, 8, 16)
    assert default_buckets(12) == (1, 2, 4, 8, 12) and default_buckets(1) == (1,)
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        bucket_for(9, (1, 2, 4, 8))
    inputs = {
        "sample": torch.arange(6.0).view(3, 2),
        "timestep": torch.tensor([1, 2, 3]),
        "scalar": torch.tensor(5.0),
        "added_cond_kwargs": {"time_ids": torch.ones(3, 6)},
        "return_dict": False,
    }
    padded = resize_rows(inputs, 3, 4)
    assert padded["sample"].tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]  # copies of the last row
    assert padded["timestep"].tolist() == [1, 2, 3, 3] and padded["added_cond_kwargs"]["time_ids"].shape == (
        4,
        6,
    )
    assert padded["scalar"] is inputs["scalar"] and padded["return_dict"] is False
    assert resize_rows(inputs, 3, 1)["sample"].tolist() == [[0, 1]]


def test_bucketed_static_shapes_compile_each_size_once_and_equal_the_eager_engine(engines):
    """``compile_buckets``: every forward is padded to 1, 2, 4 or 8 rows (padding rows use no adapter
    and are dropped from the output); the warm-up compiles each size, then odd row counts, blends and
    a request without CFG (one row) run without a new graph and equal the eager engine. The backend is
    aot_eager: dynamo's guards and graphs as inductor's, without inductor's minutes of C++ per size."""
    from torch._dynamo.utils import counters

    eager, _ = engines
    config = EngineConfig(max_batch_rows=8, compile=True, compile_buckets=True, compile_backend="aot_eager")
    bucketed = Engine(eager.pipe, eager.model, config)
    try:
        assert bucketed.runner.buckets == (1, 2, 4, 8)
        before = counters["stats"]["unique_graphs"]
        bucketed.warm_up(timeout=600)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs - before >= 4  # one static graph per bucket, compiled by the warm-up
        wave = [
            request("k", 30, 3, (("dog", 1.0),)),  # 2 rows
            request("l", 31, 4, (("style", 0.5), ("dog", 0.5))),  # with k: 4 rows, then 6 (padded to 8)
            request("m", 32, 2, (("dog", 1.0),), num_images=1),
            request("n", 33, 3, guidance_scale_override=1.0),  # no CFG: 1 row
        ]
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = run(bucketed, wave)
        want = run(eager, wave)
        assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the warm-up
    finally:
        bucketed.shutdown()
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and float(np.abs(g - w).max()) <= TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_buckets_serve_mixes_without_recompiling_on_a_gpu(adapter_dirs):
    """On a GPU, ``compile_buckets`` adds CUDA graphs (inductor's reduce-overhead mode): mixed adapters at
    odd row counts replay the bucket graphs and equal the eager engine (benchmarks/gpu_check.sh)."""
    from deft_runtime.formats import load_adapter
    from deft_runtime.pool import PoolConfig
    from deft_runtime.runtime import MultiAdapterModel

    device = torch.device("cuda")
    pipe = build_tiny_sdxl(0).to(device)
    pool = PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20, device=device)
    mam = MultiAdapterModel(pipe.unet, pool_config=pool, backend="auto")
    for name, path in adapter_dirs.items():
        mam.register(name, load_adapter(path))
    eager = Engine(pipe, mam, EngineConfig(max_batch_rows=8))
    graphs = Engine(pipe, mam, EngineConfig(max_batch_rows=8, compile=True, compile_buckets=True))
    try:
        graphs.warm_up(timeout=600)
        wave = [
            request("o", 40, 3, (("dog", 1.0),)),
            request("p", 41, 4, (("style", 1.0),)),
            request("q", 42, 2, (("dog", 0.5), ("style", 0.5))),
        ]
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = run(graphs, wave)
        want = run(eager, wave)
    finally:
        graphs.shutdown()
        eager.shutdown()
    for g, w in zip(got, want, strict=True):
        assert float(np.abs(g - w).max()) <= TOL


def test_bucketed_batches_are_refused_for_omnigen_with_what_to_use():
    from deft_runtime.models import build_tiny_omnigen

    eager = serving_engine(build_tiny_omnigen(0), {})
    try:
        with pytest.raises(ValueError, match="serves SDXL-family models; use --compile alone"):
            Engine(eager.pipe, eager.model, EngineConfig(compile=True, compile_buckets=True))
    finally:
        eager.shutdown()
