"""LoRA exports, checked by their consumers: the PEFT directory loads with ``PeftModel.from_pretrained``
and the diffusers file with ``pipe.load_lora_weights``, and both give the tiny SDXL UNet the output deft's
own compiled adapter gives it. Ranks and scales differ per layer (so ``rank_pattern`` and
``alpha_pattern`` are exercised)."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess

import pytest
import torch
from conftest import DEFT_EXECUTABLE
from denoisers import forward, sdxl_inputs, sdxl_unet_and_inputs

from deft_runtime.adapter import Adapter, AdapterKind, Decomposition
from deft_runtime.compile import compile_adapter, linear_weights, merge_into
from deft_runtime.errors import AdapterFormatError
from deft_runtime.export.lora import DIFFUSERS_WEIGHTS_NAME, save_diffusers_lora
from deft_runtime.formats import load_adapter, save_adapter
from deft_runtime.models import build_tiny_sdxl
from deft_runtime.testing import random_adapter

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _lora_for(unet: torch.nn.Module) -> Adapter:
    shapes = {n: tuple(w.shape) for n, w in linear_weights(unet).items() if n.endswith(TARGETS)}
    names = sorted(shapes)
    ranks = {name: (4 if i % 3 else 2) for i, name in enumerate(names)}
    adapter = random_adapter(AdapterKind.LORA, shapes, rank=ranks, scale=0.5, magnitude=0.3, seed=7)
    layers = adapter.layers
    layers[names[1]] = dataclasses.replace(layers[names[1]], scale=1.25)  # a second alpha
    return adapter


def _close_in_float32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Merged weights (deft) against unmerged W0·x + B·(A·x) (PEFT, diffusers): float32 rounding through
    the whole UNet, so the bound scales with the output's magnitude."""
    bound = 64 * torch.finfo(torch.float32).eps * float(expected.abs().max())  # measured: 1.2e-6 of 1.2
    error = float((actual - expected).abs().max())
    assert error <= bound, f"max |difference| {error:.3g} above {bound:.3g}"


@pytest.fixture(scope="module")
def unet_inputs_and_reference():
    unet, inputs = sdxl_unet_and_inputs()
    adapter = _lora_for(unet)
    compiled = compile_adapter(adapter, linear_weights(unet, list(adapter.layers)))
    reference = forward(merge_into(copy.deepcopy(unet), compiled), inputs)
    assert (reference - forward(unet, inputs)).abs().max() > 1e-2, "the adapter must change the output"
    return unet, inputs, adapter, reference


def test_the_peft_export_loads_in_peft_and_matches_deft(tmp_path, unet_inputs_and_reference):
    from peft import PeftModel

    unet, inputs, adapter, reference = unet_inputs_and_reference
    save_adapter(adapter, tmp_path / "peft", format="peft", base_model_name_or_path="tiny-sdxl")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] and len(config["alpha_pattern"]) >= 2
    peft_model = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "peft")
    _close_in_float32(forward(peft_model, inputs), reference)


def test_the_diffusers_export_loads_with_load_lora_weights_and_matches_deft(
    tmp_path, unet_inputs_and_reference
):
    _, _, adapter, reference = unet_inputs_and_reference
    written = save_adapter(adapter, tmp_path / "out", format="diffusers")
    assert written == tmp_path / "out" / DIFFUSERS_WEIGHTS_NAME
    pipe = build_tiny_sdxl(seed=0)  # the same weights as the reference's UNet, in a pipeline of its own
    pipe.load_lora_weights(tmp_path / "out")
    _close_in_float32(forward(pipe.unet.eval(), sdxl_inputs(pipe.unet)), reference)


def test_deft_reads_its_lora_exports_back(tmp_path, unet_inputs_and_reference):
    _, _, adapter, _ = unet_inputs_and_reference
    save_adapter(adapter, tmp_path / "peft", format="peft")
    file = save_diffusers_lora(adapter, tmp_path / "lora.safetensors")
    assert file == tmp_path / "lora.safetensors"
    for path in (tmp_path / "peft", file):
        loaded = load_adapter(path)
        assert loaded.kind is AdapterKind.LORA and loaded.ranks == adapter.ranks
        for name, layer in adapter.layers.items():
            got = loaded.layers[name]
            assert torch.equal(got.up, layer.up) and torch.equal(got.down, layer.down), name
            assert got.scale == pytest.approx(layer.scale, rel=1e-12, abs=0)  # alpha / r in float64


def test_deft_adapters_are_refused_for_diffusers_with_what_to_do(tmp_path):
    adapter = random_adapter(
        AdapterKind.DEFT, {"mid_block.attn.to_q": (8, 8)}, decomposition=Decomposition.QR
    )
    with pytest.raises(AdapterFormatError, match=r"LoRA adapters; this is a deft/qr adapter.*--to peft"):
        save_adapter(adapter, tmp_path / "out", format="diffusers")
    assert not (tmp_path / "out").exists()


def test_deft_convert_exports_a_lora_file_to_peft_and_diffusers(tmp_path, unet_inputs_and_reference):
    _, _, adapter, _ = unet_inputs_and_reference
    source = save_adapter(adapter, tmp_path / "x.deft.safetensors")
    for to, out in (("peft", tmp_path / "peft"), ("diffusers", tmp_path / "diffusers")):
        done = subprocess.run(
            [str(DEFT_EXECUTABLE), "convert", str(source), str(out), "--to", to],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert load_adapter(out if to == "peft" else out / DIFFUSERS_WEIGHTS_NAME).ranks == adapter.ranks
