"""The heart of the suite: one denoiser forward in which every row uses its own adapters.

First each adapter is shown to change the output; then a mixed batch
``[none, A, B, A+B blend, A, C, ...]`` must equal separate single-adapter runs, merged-weight runs,
and PEFT's own forward for PEFT-made adapters — on every backend, on the tiny SDXL UNet and the tiny
OmniGen transformer.
"""

from __future__ import annotations

import copy
import os
import zlib

import pytest
import torch
from denoisers import DENOISERS, forward, select_rows
from peft import DeftConfig, LoraConfig, get_peft_model

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.compile import merge_into
from deft_runtime.errors import UnknownTargetModule
from deft_runtime.formats import load_adapter
from deft_runtime.layers import MultiAdapterLinear
from deft_runtime.pool import PoolConfig
from deft_runtime.runtime import MultiAdapterModel
from deft_runtime.testing import random_adapter

BACKENDS = ["torch", "triton"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ATOL = {"torch": 2e-5, "triton": 5e-5}


def make_model(arch: str, backend: str, rows: int, side: int = 16):
    base, inputs = DENOISERS[arch](rows=rows, side=side)
    denoiser = copy.deepcopy(base)
    mam = MultiAdapterModel(
        denoiser,
        pool_config=PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20),
        backend=backend,
        max_rows=max(rows, 8),
    )
    return base, mam, inputs


def adapters_for(mam: MultiAdapterModel) -> dict[str, object]:
    shapes = {n: tuple(w.shape) for n, w in mam.base_weights.items()}
    half = dict(list(shapes.items())[::2])  # an adapter that targets only some wrapped layers
    return {
        "deft_qr": random_adapter(
            AdapterKind.DEFT, shapes, rank=4, decomposition=Decomposition.QR, seed=1, scale=0.5
        ),
        "lora": random_adapter(AdapterKind.LORA, shapes, rank=2, seed=2),
        "para_tsvd": random_adapter(
            AdapterKind.PARA, half, rank=3, decomposition=Decomposition.TSVD, seed=3, magnitude=0.2
        ),
        "deft_plain_gated": random_adapter(
            AdapterKind.DEFT, shapes, rank=1, decomposition=Decomposition.PLAIN, seed=4, gated=True
        ),
    }


MIXED_ROWS = [
    [],
    [("deft_qr", 1.0)],
    [("lora", 1.0)],
    [("deft_qr", 0.5), ("lora", 0.5)],
    [("deft_qr", 1.0)],
    [("para_tsvd", 1.0)],
    [("deft_plain_gated", 0.7), ("para_tsvd", 0.3), ("lora", -0.5), ("deft_qr", 0.2)],
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(DENOISERS))
def test_mixed_batch_equals_separate_and_merged_runs(arch, backend):
    """Under the CPU interpreter each Triton forward takes long, so there that backend runs smaller
    latents, separately only the four-adapter blend row, and shows every adapter row differs from the
    base within the mixed forward; each row still equals its merged-weight run."""
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    rows = len(MIXED_ROWS)
    base, mam, inputs = make_model(arch, backend, rows, side=8 if interpreted else 16)
    adapters = adapters_for(mam)
    compiled = {name: mam.register(name, a) for name, a in adapters.items()}
    base_out = forward(mam.denoiser, inputs)
    torch.testing.assert_close(
        base_out, forward(base, inputs), atol=0, rtol=0
    )  # empty batch: exactly the base

    # 1. every adapter changes the output on its own (one row is enough)
    first = select_rows(inputs, [0])
    for name in [] if interpreted else adapters:
        with mam.rows([[(name, 1.0)]]):
            alone = forward(mam.denoiser, first)
        assert (alone - base_out[:1]).abs().max() > 1e-3, f"{name} must change the output"

    # 2. the mixed batch
    with mam.rows(MIXED_ROWS):
        mixed = forward(mam.denoiser, inputs)

    separately = [rows - 1] if interpreted else range(rows)
    for i, pairs in enumerate(MIXED_ROWS):
        row_inputs = select_rows(inputs, [i])
        if pairs:
            assert (mixed[i] - base_out[i]).abs().max() > 1e-3, f"row {i} must differ from the base"
        if i in separately:
            with mam.rows([pairs]):
                separate = forward(mam.denoiser, row_inputs)
            torch.testing.assert_close(
                mixed[i : i + 1], separate, atol=ATOL[backend], rtol=1e-4, msg=f"row {i} vs separate"
            )
        merged = copy.deepcopy(base)
        for name, weight in pairs:
            merge_into(merged, compiled[name], weight=weight)
        torch.testing.assert_close(
            mixed[i : i + 1],
            forward(merged, row_inputs),
            atol=ATOL[backend] * 5,
            rtol=1e-3,
            msg=f"row {i} vs merged",
        )
    # the base weights were never modified
    for name, layer in mam.layers.items():
        assert torch.equal(layer.base.weight, dict(base.named_modules())[name].weight)


PEFT_CONFIGS = {
    "deft-relu": lambda: DeftConfig(
        r=4, target_modules=TARGETS, decomposition_method="relu", init_weights=False
    ),
    "deft-qr": lambda: DeftConfig(
        r=2, target_modules=TARGETS, decomposition_method="qr", init_weights=False, alpha=4
    ),
    "para-qr": lambda: DeftConfig(
        r=2, target_modules=TARGETS, decomposition_method="qr", para=True, init_weights=False
    ),
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
}


def peft_made_adapters(base, inputs, root) -> dict[str, torch.Tensor]:
    """Save one PEFT adapter per config under ``root``; return PEFT's own forward output for each."""
    peft_outputs = {}
    for n, make_config in PEFT_CONFIGS.items():
        torch.manual_seed(zlib.crc32(n.encode()))  # stable across processes, unlike hash(str)
        peft_model = get_peft_model(copy.deepcopy(base), make_config())
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "deft_R" in pname or ("deft_P" in pname and not n.startswith("para")):
                    p.mul_(10.0)
        peft_outputs[n] = forward(peft_model, inputs)
        peft_model.save_pretrained(root / n)
    return peft_outputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(DENOISERS))
def test_mixed_batch_equals_peft_forward_per_row(tmp_path, arch, backend):
    """Adapters made by PEFT, all in one batch, each row equal to PEFT's forward with that adapter.

    The Triton kernels run under the CPU interpreter here (slow per program), so that backend gets one
    small mixed forward; it must also equal the torch backend's mixed forward row for row."""
    side = 16 if backend == "torch" else 8
    names = list(PEFT_CONFIGS)
    rows = [[], *[[(n, 1.0)] for n in names], [(names[0], 0.5), (names[3], 0.5)]]
    base, mam, inputs = make_model(arch, backend, len(rows), side)
    peft_outputs = peft_made_adapters(base, inputs, tmp_path)
    for n in names:
        mam.register(n, load_adapter(tmp_path / n))
    base_out = forward(base, inputs)
    with mam.rows(rows):
        mixed = forward(mam.denoiser, inputs)
    torch.testing.assert_close(mixed[0], base_out[0], atol=0, rtol=0)
    for i, n in enumerate(names, start=1):
        assert (peft_outputs[n][i] - base_out[i]).abs().max() > 1e-3, (
            f"PEFT adapter {n} must change the output"
        )
        torch.testing.assert_close(mixed[i], peft_outputs[n][i], atol=1e-4, rtol=1e-4, msg=f"{n} vs PEFT")
    if backend != "torch":
        _, reference, _ = make_model(arch, "torch", len(rows), side)
        for n in names:
            reference.register(n, load_adapter(tmp_path / n))
        with reference.rows(rows):
            torch.testing.assert_close(
                mixed, forward(reference.denoiser, inputs), atol=ATOL[backend], rtol=1e-4
            )


def test_wrapping_targets_attention_projections_only():
    _, mam, _ = make_model("sdxl", "torch", rows=2)
    assert mam.layers and all(isinstance(m, MultiAdapterLinear) for m in mam.layers.values())
    suffixes = {
        name.rsplit(".", 2)[-1] if name.endswith("to_out.0") else name.rsplit(".", 1)[-1]
        for name in mam.layers
    }
    assert suffixes <= {"to_q", "to_k", "to_v", "0"}
    wrapped_in_model = [n for n, m in mam.denoiser.named_modules() if isinstance(m, MultiAdapterLinear)]
    assert sorted(wrapped_in_model) == sorted(mam.layers)


def test_adapter_outside_the_wrapped_set_is_rejected_at_registration():
    _, mam, _ = make_model("sdxl", "torch", rows=2)
    ff = next(
        n
        for n, m in mam.denoiser.named_modules()
        if n.endswith("ff.net.2") and isinstance(m, torch.nn.Linear)
    )
    w = mam.denoiser.get_submodule(ff).weight
    adapter = random_adapter(AdapterKind.LORA, {ff: tuple(w.shape)}, rank=2)
    with pytest.raises(
        UnknownTargetModule, match=r"outside the wrapped set.*Restart it with target patterns"
    ):
        mam.register("ff", adapter)
    bogus = random_adapter(AdapterKind.LORA, {"down_blocks.9.nope.to_q": (8, 8)}, rank=2)
    with pytest.raises(UnknownTargetModule, match="no adapter target"):
        mam.register("bogus", bogus)


def test_custom_target_patterns_wrap_feed_forward_layers():
    base, inputs = DENOISERS["sdxl"](rows=2)
    mam = MultiAdapterModel(
        copy.deepcopy(base),
        pool_config=PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20),
        targets=[r"ff\.net\.2"],
        backend="torch",
    )
    assert mam.layers and all(n.endswith("ff.net.2") for n in mam.layers)
    shapes = {n: tuple(w.shape) for n, w in mam.base_weights.items()}
    mam.register("ff", random_adapter(AdapterKind.LORA, shapes, rank=2))
    with mam.rows([[("ff", 1.0)], []]):
        out = forward(mam.denoiser, inputs)
    ref = forward(base, inputs)
    assert (out[0] - ref[0]).abs().max() > 1e-3
    torch.testing.assert_close(out[1], ref[1], atol=0, rtol=0)


def _sd15_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(3, 4, 8, 8, generator=g),
        "timestep": torch.tensor([1, 500, 999]),
        "encoder_hidden_states": torch.randn(3, 7, 24, generator=g),
    }
    return unet, inputs


def _sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(3, 4, 8, 8, generator=g),
        "timestep": torch.tensor([1.0, 500.0, 999.0]),
        "encoder_hidden_states": torch.randn(3, 5, 16, generator=g),
        "pooled_projections": torch.randn(3, 12, generator=g),
    }
    return model, inputs


@pytest.mark.parametrize("build", [_sd15_unet, _sd3_transformer], ids=["sd15-unet", "sd3-transformer"])
def test_other_diffusers_denoisers_work_by_the_same_mechanism(build):
    """SD 1.5 UNets and SD3 transformers: same generic wrapping, mixed batch equals merged runs."""
    base, inputs = build()
    mam = MultiAdapterModel(
        copy.deepcopy(base), pool_config=PoolConfig(device_bytes=4 << 20, host_bytes=4 << 20), backend="torch"
    )
    assert any(n.endswith("to_q") for n in mam.layers) and any(n.endswith("to_out.0") for n in mam.layers)
    shapes = {n: tuple(w.shape) for n, w in mam.base_weights.items()}
    compiled = {
        "a": mam.register(
            "a", random_adapter(AdapterKind.DEFT, shapes, rank=2, decomposition=Decomposition.QR, seed=1)
        ),
        "b": mam.register("b", random_adapter(AdapterKind.LORA, shapes, rank=2, seed=2)),
    }
    rows = [[("a", 1.0)], [], [("b", 1.0)]]
    with mam.rows(rows):
        mixed = forward(mam.denoiser, inputs)
    for i, pairs in enumerate(rows):
        merged = copy.deepcopy(base)
        for name, weight in pairs:
            merge_into(merged, compiled[name], weight=weight)
        expected = forward(merged, inputs)[i]
        torch.testing.assert_close(mixed[i], expected, atol=5e-5, rtol=1e-4)
        if pairs:
            assert (expected - forward(base, inputs)[i]).abs().max() > 1e-4


def test_torch_backend_restacks_pages_when_an_adapter_is_swapped_into_the_same_slot():
    """The torch backend keeps each layer's stacked pages between forwards of one tiling
    (:class:`~deft_runtime.ops.torch_ops.StackCache`). Re-registering an adapter reloads it into the same
    slot with the same mapping, so the backend skips re-planning, yet the next forward must use the new
    weights: it equals a fresh model serving them, and the stale stacks are not reused."""
    _, mam, inputs = make_model("sdxl", "torch", 4)
    shapes = {n: tuple(w.shape) for n, w in mam.base_weights.items()}
    old, new, other = (random_adapter(AdapterKind.LORA, shapes, rank=2, seed=s, scale=0.5) for s in (1, 2, 3))
    mam.register("a", old)
    mam.register("b", other)
    rows = [[("a", 1.0)], [("a", 1.0)], [("b", 1.0)], [("b", 1.0)]]  # tiles: one slot per pair of rows
    stacks = mam.ops.stacks
    with mam.rows(rows):
        first = forward(mam.denoiser, inputs)
        misses = stacks.misses
        again = forward(mam.denoiser, inputs)
    assert stacks.hits >= len(mam.layers) and stacks.misses == misses  # the second forward reused all
    assert torch.equal(first, again)
    slot, updates = mam.pool.slot_of("a"), mam.ops.metadata_updates
    mam.register("a", new)  # evicts the old copy; the next acquire loads the new one
    with mam.rows(rows):
        assert mam.pool.slot_of("a") == slot
        swapped = forward(mam.denoiser, inputs)
    assert mam.ops.metadata_updates == updates  # the same mapping: nothing re-planned
    _, fresh, _ = make_model("sdxl", "torch", 4)
    fresh.register("a", new)
    fresh.register("b", other)
    with fresh.rows(rows):
        expected = forward(fresh.denoiser, inputs)
    torch.testing.assert_close(swapped, expected, atol=1e-6, rtol=1e-6)
    assert (swapped[:2] - first[:2]).abs().max() > 1e-3  # the new adapter really differs
    torch.testing.assert_close(swapped[2:], first[2:], atol=1e-6, rtol=1e-6)
