"""Adapter formats: bit-exact round trips, and every validation error with its message."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from deft_runtime.adapter import Adapter, AdapterKind, BaseFingerprint, Decomposition, LayerParams
from deft_runtime.compile import compile_adapter
from deft_runtime.errors import (
    AdapterDtypeError,
    AdapterFormatError,
    AdapterIncompatible,
    AdapterShapeError,
    AdapterTooLarge,
    NonFiniteAdapter,
    UnknownTargetModule,
    UnsafeAdapterFormat,
)
from deft_runtime.formats import ReadLimits, load_adapter, save_adapter
from deft_runtime.formats.native import to_native
from deft_runtime.testing import random_adapter

SHAPES = {"down.attn1.to_q": (16, 12), "down.attn1.to_out.0": (12, 16), "mid.attn2.to_k": (16, 24)}


def assert_same_adapter(a: Adapter, b: Adapter, *, metadata: bool = True) -> None:
    assert (a.kind, a.decomposition) == (b.kind, b.decomposition)
    assert set(a.layers) == set(b.layers)
    for name in a.layers:
        ta, tb = a.layers[name].tensors(), b.layers[name].tensors()
        assert set(ta) == set(tb), name
        for role in ta:
            assert ta[role].dtype == tb[role].dtype and torch.equal(ta[role], tb[role]), f"{name}.{role}"
        assert a.layers[name].scale == b.layers[name].scale
    if metadata:
        assert a.fingerprint == b.fingerprint


ALL_KINDS = [(AdapterKind.DEFT, m) for m in Decomposition] + [(AdapterKind.PARA, m) for m in Decomposition]
ALL_KINDS += [(AdapterKind.LORA, None)]


@pytest.mark.parametrize(("kind", "mode"), ALL_KINDS, ids=lambda v: getattr(v, "value", str(v)))
def test_native_round_trip_is_bit_exact(tmp_path, kind, mode):
    adapter = random_adapter(
        kind,
        SHAPES,
        rank={"down.attn1.to_q": 1, "down.attn1.to_out.0": 4, "mid.attn2.to_k": 3},
        decomposition=mode,
        gated=True,
        scale=0.25,
        with_fingerprint=True,
    )
    adapter.metadata["name"] = "dog"
    path = save_adapter(adapter, tmp_path / "a.deft.safetensors")
    loaded = load_adapter(path)
    assert_same_adapter(adapter, loaded)
    assert loaded.metadata == {"name": "dog"}


@pytest.mark.parametrize(
    ("kind", "mode"),
    [
        (AdapterKind.DEFT, Decomposition.RELU),
        (AdapterKind.DEFT, Decomposition.QR),
        (AdapterKind.PARA, Decomposition.QR),
    ],
    ids=["deft-relu", "deft-qr", "para-qr"],
)
def test_native_peft_native_round_trip_is_bit_exact(tmp_path, kind, mode):
    adapter = random_adapter(kind, SHAPES, rank=4, decomposition=mode, scale=2.0)
    peft_dir = save_adapter(adapter, tmp_path / "peft", format="peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "DEFT"
        and config["alpha"] == 8.0
        and config["para"] == (kind is AdapterKind.PARA)
    )
    from_peft = load_adapter(peft_dir)
    assert_same_adapter(adapter, from_peft)
    again = load_adapter(save_adapter(from_peft, tmp_path / "b.deft.safetensors"))
    assert_same_adapter(adapter, again)


def test_peft_writer_refuses_what_peft_cannot_load(tmp_path):
    with pytest.raises(AdapterFormatError, match="implements the relu and qr modes"):
        save_adapter(
            random_adapter(AdapterKind.DEFT, SHAPES, decomposition=Decomposition.SVD),
            tmp_path / "x",
            format="peft",
        )
    with pytest.raises(AdapterFormatError, match="no gate"):
        save_adapter(random_adapter(AdapterKind.DEFT, SHAPES, gated=True), tmp_path / "y", format="peft")
    mixed = random_adapter(
        AdapterKind.DEFT, SHAPES, rank={"down.attn1.to_q": 1, "down.attn1.to_out.0": 2, "mid.attn2.to_k": 2}
    )
    with pytest.raises(AdapterFormatError, match=r"one rank and one alpha.*ranks \[1, 2\]"):
        save_adapter(mixed, tmp_path / "z", format="peft")
    assert not any(tmp_path.iterdir()), "a refused write leaves nothing behind"


def test_peft_lora_patterns_and_rslora(tmp_path):
    """rank_pattern / alpha_pattern / use_rslora are honoured exactly as PEFT does."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "base_model.model.a.to_q.lora_A.weight": torch.randn(2, 8, generator=g),
        "base_model.model.a.to_q.lora_B.weight": torch.randn(8, 2, generator=g),
        "base_model.model.b.to_k.lora_A.weight": torch.randn(4, 8, generator=g),
        "base_model.model.b.to_k.lora_B.weight": torch.randn(8, 4, generator=g),
    }
    d = tmp_path / "lora"
    d.mkdir()
    save_file(tensors, str(d / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "rank_pattern": {"to_k": 4},
        "alpha_pattern": {"to_k": 2},
    }
    (d / "adapter_config.json").write_text(json.dumps(config))
    adapter = load_adapter(d)
    assert adapter.layers["a.to_q"].scale == 2.0 and adapter.layers["b.to_k"].scale == 0.5
    (d / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    assert load_adapter(d).layers["a.to_q"].scale == pytest.approx(4 / 2**0.5)
    (d / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {}}))
    with pytest.raises(AdapterFormatError, match="has rank 4, the config says 2"):
        load_adapter(d)
    no_alpha = {k: v for k, v in config.items() if k not in ("lora_alpha", "alpha_pattern")}
    (d / "adapter_config.json").write_text(json.dumps(no_alpha))  # PEFT fills in its own default
    expected = LoraConfig.from_pretrained(str(d)).lora_alpha
    assert load_adapter(d).layers["a.to_q"].scale == pytest.approx(expected / 2)


def kohya_from_peft_lora(adapter: Adapter, alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in adapter.layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = layer.down
        out[f"{key}.lora_up.weight"] = layer.up
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def test_kohya_file_reads_through_diffusers_conversion(tmp_path):
    names = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": (64, 64),
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (64, 32),
    }
    lora = random_adapter(AdapterKind.LORA, names, rank=4)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya_from_peft_lora(lora, alpha=2.0), str(path))
    loaded = load_adapter(path)
    assert loaded.kind is AdapterKind.LORA and loaded.metadata["source_format"] == "kohya"
    assert set(loaded.layers) == set(names)
    for name in names:
        assert torch.equal(loaded.layers[name].up, lora.layers[name].up)
        assert torch.equal(loaded.layers[name].down, lora.layers[name].down)
        assert loaded.layers[name].scale == 0.5  # alpha 2 / rank 4


def test_text_encoder_layers_are_refused_with_a_reason(tmp_path):
    tensors = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 8),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(8, 2),
    }
    save_file(tensors, str(tmp_path / "te.safetensors"))
    with pytest.raises(UnknownTargetModule, match="text-encoder tensors .* denoiser only"):
        load_adapter(tmp_path / "te.safetensors")


# ---------------------------------------------------------------- validation errors


class _Boom:
    """Unpickling this writes a marker file: proof that a loader executed pickle code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".safetensors"])
def test_pickle_files_are_refused_and_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(pickle.dumps(_Boom(str(marker)), protocol=4))
    with pytest.raises(UnsafeAdapterFormat, match="never unpickles"):
        load_adapter(path)
    assert not marker.exists()


def test_torch_save_zip_is_refused_even_when_renamed(tmp_path):
    path = tmp_path / "adapter.safetensors"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(UnsafeAdapterFormat, match=r"pickle \(torch.save\) file"):
        load_adapter(path)


def test_peft_dir_with_only_a_pickle_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UnsafeAdapterFormat, match="adapter_model.bin"):
        load_adapter(tmp_path)


def test_garbage_and_truncated_headers(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\x00" * 16)
    with pytest.raises(AdapterFormatError, match="header is not valid JSON"):
        load_adapter(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(AdapterFormatError, match="header claims 1000 bytes but the file has 2"):
        load_adapter(truncated)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(AdapterFormatError, match="too short"):
        load_adapter(tiny)


def test_size_limits(tmp_path):
    adapter = random_adapter(AdapterKind.LORA, SHAPES, rank=4)
    path = save_adapter(adapter, tmp_path / "a.deft.safetensors")
    size = path.stat().st_size
    with pytest.raises(AdapterTooLarge, match=f"is {size} bytes, above the limit of 1000 bytes"):
        load_adapter(path, limits=ReadLimits(max_file_bytes=1000))
    with pytest.raises(AdapterTooLarge, match="header of .* bytes is above the limit of 64 bytes"):
        load_adapter(path, limits=ReadLimits(max_header_bytes=64))


def _write_native_with(tmp_path, role: str, value: torch.Tensor):
    adapter = random_adapter(AdapterKind.DEFT, {"proj": (8, 8)}, rank=2)
    tensors, metadata = to_native(adapter)
    tensors[f"proj.{role}"] = value
    path = tmp_path / "bad.deft.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_nan_inf_and_integer_tensors_are_refused(tmp_path):
    nan = torch.zeros(8, 2)
    nan[3, 1] = float("nan")
    with pytest.raises(NonFiniteAdapter, match=r"proj.P contains 1 NaN/Inf"):
        load_adapter(_write_native_with(tmp_path, "P", nan))
    inf = torch.zeros(2, 8)
    inf[0, 0] = float("inf")
    with pytest.raises(NonFiniteAdapter, match=r"proj.R contains 1 NaN/Inf"):
        load_adapter(_write_native_with(tmp_path, "R", inf))
    with pytest.raises(
        AdapterDtypeError, match=r"tensor 'proj.R' has dtype I32; adapter tensors must be floating point"
    ):
        load_adapter(_write_native_with(tmp_path, "R", torch.zeros(2, 8, dtype=torch.int32)))


def test_inconsistent_shapes_inside_the_file(tmp_path):
    with pytest.raises(AdapterShapeError, match=r"proj.R has 3 rows but the layer's rank is 2"):
        load_adapter(_write_native_with(tmp_path, "R", torch.zeros(3, 8)))


def test_unknown_target_module_suggests_the_closest_name():
    adapter = random_adapter(AdapterKind.DEFT, {"down.attn1.to_qq": (8, 8)}, rank=2)
    base = {"down.attn1.to_q": torch.randn(8, 8), "down.attn1.to_k": torch.randn(8, 8)}
    with pytest.raises(
        UnknownTargetModule, match=r"no adapter target 'down.attn1.to_qq' .* Did you mean 'down.attn1.to_q'"
    ):
        compile_adapter(adapter, base)


def test_shape_mismatch_against_the_base():
    adapter = random_adapter(AdapterKind.LORA, {"proj": (8, 6)}, rank=2)
    with pytest.raises(
        AdapterShapeError, match=r"adapter is for a \[8 x 6\] weight, the base weight is \[8 x 7\]"
    ):
        compile_adapter(adapter, {"proj": torch.randn(8, 7)})
    para = random_adapter(AdapterKind.PARA, {"proj": (9, 6)}, rank=2, decomposition=Decomposition.QR)
    with pytest.raises(AdapterShapeError, match=r"\[9 x any\] weight, the base weight is \[8 x 7\]"):
        compile_adapter(para, {"proj": torch.randn(8, 7)})


def test_fingerprint_mismatch_is_incompatible_not_malformed():
    adapter = random_adapter(AdapterKind.DEFT, {"proj": (8, 8)}, rank=2)
    adapter.fingerprint = BaseFingerprint({"proj": (8, 8), "other": (4, 4)})
    with pytest.raises(
        AdapterIncompatible, match=r"made for base [0-9a-f]{16} whose 'other' weight is \(4, 4\)"
    ):
        compile_adapter(adapter, {"proj": torch.randn(8, 8), "other": torch.randn(4, 5)})


def test_structure_errors():
    with pytest.raises(AdapterFormatError, match="needs a projector decomposition"):
        Adapter(kind=AdapterKind.DEFT, layers={"p": LayerParams(P=torch.zeros(4, 1), R=torch.zeros(1, 4))})
    bad = Adapter(
        kind=AdapterKind.LORA,
        layers={"p": LayerParams(P=torch.zeros(4, 1), up=torch.zeros(4, 1), down=torch.zeros(1, 4))},
    )
    with pytest.raises(AdapterFormatError, match=r"not allowed \['P'\]"):
        compile_adapter(bad, {"p": torch.zeros(4, 4)})


def test_unknown_peft_type(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(
        AdapterFormatError, match="peft_type 'IA3' is not supported; deft reads DEFT and LORA"
    ):
        load_adapter(tmp_path)
