"""LoRA files with text-encoder layers (kohya/A1111 SDXL ``lora_te1_…``/``lora_te2_…``, diffusers
``text_encoder.``/``text_encoder_2.``): refused with what to do, or with ``--denoiser-only`` read without
them and a warning naming what was left out — in ``load_adapter``, the client's upload, ``deft convert``
and ``deft adapters register`` against a real server."""

from __future__ import annotations

import io
import os
import subprocess
import warnings

import grpc
import pytest
import torch
from conftest import DEFT_EXECUTABLE
from deft_client import DeftClient, DeftError, DroppedLayersWarning
from deft_client.denoiser_only import copy_without_text_encoder
from safetensors.torch import load, load_file, save_file

from deft_runtime.errors import AdapterFormatError, UnknownTargetModule
from deft_runtime.formats import load_adapter
from deft_runtime.formats.lora_files import DROPPED_METADATA_KEY

UNET_LAYERS = (
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
)
TE_LAYERS = (
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te1_text_model_encoder_layers_0_self_attn_v_proj",
    "lora_te2_text_model_encoder_layers_1_mlp_fc1",
)
DROPPED = "3 text-encoder layers (lora_te1_: 2, lora_te2_: 1)"


def _kohya_pair(key: str, d_out: int, d_in: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{key}.lora_down.weight": torch.randn(2, d_in, generator=g),
        f"{key}.lora_up.weight": torch.randn(d_out, 2, generator=g),
        f"{key}.alpha": torch.tensor(1.0),
    }


def kohya_sdxl_lora() -> dict[str, torch.Tensor]:
    """A kohya-style SDXL LoRA for tiny-sdxl: two UNet layers and three text-encoder layers."""
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(UNET_LAYERS):
        tensors |= _kohya_pair("lora_unet_" + name.replace(".", "_"), 64, 64, i)
    for i, key in enumerate(TE_LAYERS):
        tensors |= _kohya_pair(key, 32, 32, 10 + i)
    return tensors


@pytest.fixture
def kohya_file(tmp_path):
    path = tmp_path / "sdxl-style.safetensors"
    save_file(kohya_sdxl_lora(), str(path), metadata={"ss_network_dim": "2"})
    return path


def test_text_encoder_layers_are_refused_with_what_to_do(kohya_file):
    with pytest.raises(UnknownTargetModule, match=r"text-encoder tensors .*--denoiser-only"):
        load_adapter(kohya_file)


def test_denoiser_only_reads_the_unet_part_exactly_and_says_what_it_left_out(kohya_file, tmp_path):
    adapter = load_adapter(kohya_file, denoiser_only=True)
    assert set(adapter.layers) == set(UNET_LAYERS)
    assert adapter.metadata[DROPPED_METADATA_KEY] == DROPPED
    unet_only = {k: v for k, v in kohya_sdxl_lora().items() if k.startswith("lora_unet_")}
    save_file(unet_only, str(tmp_path / "unet-only.safetensors"))
    expected = load_adapter(tmp_path / "unet-only.safetensors")  # the file without the te part, read as usual
    for name, layer in expected.layers.items():
        got = adapter.layers[name]
        assert torch.equal(got.up, layer.up) and torch.equal(got.down, layer.down)
        assert got.scale == layer.scale == 0.5  # alpha 1 / rank 2


def test_denoiser_only_drops_diffusers_text_encoder_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"unet.{UNET_LAYERS[0]}.lora_A.weight": torch.randn(2, 64, generator=g),
        f"unet.{UNET_LAYERS[0]}.lora_B.weight": torch.randn(64, 2, generator=g),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 32),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight": torch.randn(2, 32),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight": torch.randn(32, 2),
    }
    save_file(tensors, str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(UnknownTargetModule):
        load_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    adapter = load_adapter(tmp_path / "pytorch_lora_weights.safetensors", denoiser_only=True)
    assert list(adapter.layers) == [UNET_LAYERS[0]]
    assert (
        adapter.metadata[DROPPED_METADATA_KEY]
        == "2 text-encoder layers (text_encoder.: 1, text_encoder_2.: 1)"
    )


def test_a_file_of_text_encoder_layers_only_is_refused_even_with_denoiser_only(tmp_path):
    save_file(_kohya_pair(TE_LAYERS[0], 32, 32, 0), str(tmp_path / "te.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"holds only 1 text-encoder layers"):
        load_adapter(tmp_path / "te.safetensors", denoiser_only=True)


def test_the_clients_copy_keeps_the_unet_tensors_bit_exact_and_the_metadata(kohya_file):
    out = io.BytesIO()
    assert copy_without_text_encoder(kohya_file, out, kohya_file.name) == DROPPED
    copied = load(out.getvalue())
    original = load_file(str(kohya_file))
    assert set(copied) == {k for k in original if k.startswith("lora_unet_")}
    assert all(torch.equal(copied[k], original[k]) for k in copied)
    header_length = int.from_bytes(out.getvalue()[:8], "little")
    assert header_length % 8 == 0 and b'"ss_network_dim":"2"' in out.getvalue()[8 : 8 + header_length]
    unet_only = kohya_file.with_name("unet-only.safetensors")
    save_file({k: v for k, v in original.items() if k.startswith("lora_unet_")}, str(unet_only))
    assert copy_without_text_encoder(unet_only, io.BytesIO(), unet_only.name) is None  # uploaded as it is


def test_the_clients_copy_refuses_what_is_not_safetensors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        copy_without_text_encoder(tmp_path / "junk.safetensors", io.BytesIO(), "junk.safetensors")


# ---------------------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start()


def test_register_refuses_text_encoder_layers_then_takes_the_denoiser_part(server, kohya_file):
    with DeftClient(server.address, timeout=120) as client:
        with pytest.raises(DeftError) as refused:
            client.register_adapter("te-refused", kohya_file)
        assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "--denoiser-only" in refused.value.message
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = client.register_adapter("te-dropped", kohya_file, denoiser_only=True)
    assert (info.kind, info.source_format, info.target_count) == ("lora", "kohya", 2)
    messages = [str(w.message) for w in caught if issubclass(w.category, DroppedLayersWarning)]
    assert messages == [
        f"sdxl-style.safetensors: left out {DROPPED}; deft applies adapters to the denoiser only"
    ]


def _deft(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEFT_EXECUTABLE), *args], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_the_cli_convert_and_register_take_denoiser_only(server, kohya_file, tmp_path):
    out = tmp_path / "unet.deft.safetensors"
    refused = _deft("convert", str(kohya_file), str(out))
    assert refused.returncode == 1 and "--denoiser-only" in refused.stderr and not out.exists()
    converted = _deft("convert", str(kohya_file), str(out), "--denoiser-only")
    assert converted.returncode == 0, converted.stderr
    assert f"warning: left out {DROPPED}" in " ".join(converted.stderr.split())
    assert set(load_adapter(out).layers) == set(UNET_LAYERS)
    registered = _deft(
        "adapters", "register", "te-cli", str(kohya_file), "--denoiser-only", DEFT_SERVER=server.address
    )
    assert registered.returncode == 0, registered.stderr
    assert "registered te-cli" in registered.stdout and "left out 3 text-encoder layers" in registered.stderr
