"""PEFT and diffusers as oracles: adapters they make, read by deft and compiled to (B, A), reproduce
their forward output of the whole tiny SDXL UNet and tiny OmniGen transformer."""

from __future__ import annotations

import copy

import pytest
import torch
from denoisers import DENOISERS, forward, sdxl_unet_and_inputs
from peft import DeftConfig, LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.compile import compile_adapter, linear_weights, merge_into
from deft_runtime.formats import load_adapter, save_adapter

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _enlarge(model: torch.nn.Module, factor: float) -> None:
    """PEFT's random init is ~N(0, 0.02): scale the adapter up so it visibly changes outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(tag in name for tag in ("deft_P", "deft_R", "lora_A", "lora_B")):
                p.mul_(factor)


PEFT_CONFIGS = {
    "deft-relu": lambda: DeftConfig(
        r=4, target_modules=TARGETS, decomposition_method="relu", init_weights=False, alpha=8
    ),
    "deft-qr": lambda: DeftConfig(r=4, target_modules=TARGETS, decomposition_method="qr", init_weights=False),
    "para-qr": lambda: DeftConfig(
        r=2, target_modules=TARGETS, decomposition_method="qr", para=True, init_weights=False
    ),
    "lora": lambda: LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False),
}
EXPECTED_KIND = {
    "deft-relu": (AdapterKind.DEFT, Decomposition.RELU),
    "deft-qr": (AdapterKind.DEFT, Decomposition.QR),
    "para-qr": (AdapterKind.PARA, Decomposition.QR),
    "lora": (AdapterKind.LORA, None),
}


@pytest.mark.parametrize("arch", list(DENOISERS))
@pytest.mark.parametrize("config_name", list(PEFT_CONFIGS))
def test_peft_adapter_compiled_by_deft_reproduces_peft_forward(tmp_path, arch, config_name):
    base, inputs = DENOISERS[arch]()
    base_out = forward(base, inputs)
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[config_name]())
    _enlarge(peft_model, 10.0 if config_name.startswith("deft") else 1.0)
    peft_out = forward(peft_model, inputs)
    assert (peft_out - base_out).abs().max() > 1e-2, "the adapter must change the denoiser's output"

    peft_model.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft")
    assert (adapter.kind, adapter.decomposition) == EXPECTED_KIND[config_name]
    weights = linear_weights(base, list(adapter.layers))
    assert len(weights) >= 8
    compiled = compile_adapter(adapter, weights)
    ours = forward(merge_into(copy.deepcopy(base), compiled), inputs)
    torch.testing.assert_close(ours, peft_out, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["relu", "qr"])
def test_adapter_written_by_deft_loads_in_peft_and_matches(tmp_path, mode):
    """deft → PEFT directory → PeftModel.from_pretrained gives the same denoiser output as deft's compile."""
    from peft import PeftModel

    from deft_runtime.testing import random_adapter

    unet, inputs = sdxl_unet_and_inputs()
    shapes = {n: tuple(w.shape) for n, w in linear_weights(unet).items() if n.endswith(tuple(TARGETS))}
    adapter = random_adapter(
        AdapterKind.DEFT, shapes, rank=4, decomposition=Decomposition(mode), scale=0.5, magnitude=0.2
    )
    save_adapter(adapter, tmp_path / "peft", format="peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "peft")
    compiled = compile_adapter(adapter, linear_weights(unet, list(shapes)))
    ours = forward(merge_into(copy.deepcopy(unet), compiled), inputs)
    assert (ours - forward(unet, inputs)).abs().max() > 1e-2
    torch.testing.assert_close(forward(peft_model, inputs), ours, atol=5e-5, rtol=1e-4)


def test_diffusers_lora_single_file_matches_diffusers_forward(tmp_path):
    """The user's path: unet.add_adapter + save_lora_weights → pytorch_lora_weights.safetensors."""
    from diffusers import StableDiffusionXLPipeline

    unet, inputs = sdxl_unet_and_inputs()
    unet = copy.deepcopy(unet)
    base_out = forward(unet, inputs)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(2)
    unet.add_adapter(config)
    diffusers_out = forward(unet, inputs)
    assert (diffusers_out - base_out).abs().max() > 1e-2
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict(),
    )
    adapter = load_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    assert adapter.kind is AdapterKind.LORA and {layer.scale for layer in adapter.layers.values()} == {2.0}
    base, _ = sdxl_unet_and_inputs()
    compiled = compile_adapter(adapter, linear_weights(base, list(adapter.layers)))
    ours = forward(merge_into(copy.deepcopy(base), compiled), inputs)
    torch.testing.assert_close(ours, diffusers_out, atol=5e-5, rtol=1e-4)
