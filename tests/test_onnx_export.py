"""`deft export-onnx` on the tiny models: files, dynamic axes, and onnxruntime against independent
torch oracles (the adapters applied *unmerged* through MultiAdapterModel, not the exporter's merge)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from deft_cli.app import app
from typer.testing import CliRunner

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.export.onnx import DEFAULT_TOLERANCE, adapter_sha256
from deft_runtime.formats import load_adapter, save_adapter
from deft_runtime.layers import find_targets
from deft_runtime.models import load_pipeline
from deft_runtime.pool import PoolConfig
from deft_runtime.runtime import MultiAdapterModel
from deft_runtime.testing import random_adapter

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

runner = CliRunner()
UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
LORA_WEIGHT = 0.5


def bound(reference: np.ndarray) -> float:
    """The documented acceptance rule: tolerance · max(1, max|torch|)."""
    return DEFAULT_TOLERANCE * max(1.0, float(np.abs(reference).max()))


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-model-cache")


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, cache) -> dict[str, Path]:
    """A DEFT adapter as a PEFT directory and a LoRA as a deft file, over every UNet target."""
    folder = tmp_path_factory.mktemp("onnx-adapters")
    unet = load_pipeline("tiny-sdxl", cache_dir=cache).unet
    shapes = {n: tuple(m.weight.shape) for n, m in find_targets(unet).items()}
    deft = random_adapter(AdapterKind.DEFT, shapes, rank=2, decomposition=Decomposition.QR, seed=1)
    lora = random_adapter(AdapterKind.LORA, shapes, rank=3, seed=2, magnitude=0.2)
    return {
        "deft": save_adapter(deft, folder / "deft-peft", format="peft"),
        "lora": save_adapter(lora, folder / "lora.deft.safetensors"),
    }


def export(out: Path, cache: Path, *args: str):
    return runner.invoke(
        app, ["export-onnx", "--model", "tiny-sdxl", "--cache-dir", str(cache), "--out", str(out), *args]
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache, adapter_files) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx-out")
    result = export(
        out,
        cache,
        *("--adapter", str(adapter_files["deft"])),
        *("--adapter", f"{adapter_files['lora']}:{LORA_WEIGHT}"),
        "--text-encoders",
        "--vae-decoder",
    )
    assert result.exit_code == 0, result.output
    assert "validated with onnxruntime at batch sizes [1, 3]" in result.output
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def oracle(cache, adapter_files):
    """A fresh pipeline whose UNet applies the adapters unmerged (MultiAdapterModel, torch backend)."""
    pipe = load_pipeline("tiny-sdxl", cache_dir=cache)
    mam = MultiAdapterModel(
        pipe.unet, pool_config=PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20), backend="torch"
    )
    mam.register("deft", load_adapter(adapter_files["deft"]))
    mam.register("lora", load_adapter(adapter_files["lora"]))

    def unet(inputs: dict[str, np.ndarray], rows: list[tuple[str, float]]) -> np.ndarray:
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
        batch = t["sample"].shape[0]
        with mam.rows([rows] * batch), torch.no_grad():
            out = pipe.unet(
                t["sample"], t["timestep"], t["encoder_hidden_states"], added_cond_kwargs=added
            ).sample
        return out.numpy()

    return pipe, unet


def unet_inputs(batch: int, height: int, width: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {
        "sample": g.standard_normal((batch, 4, height, width), dtype=np.float32),
        "timestep": (g.random(batch, dtype=np.float32) * 999).astype(np.float32),
        "encoder_hidden_states": g.standard_normal((batch, seq, 80), dtype=np.float32),
        "text_embeds": g.standard_normal((batch, 48), dtype=np.float32),
        "time_ids": np.tile(np.array([64, 64, 0, 0, 64, 64], dtype=np.float32), (batch, 1)),
    }


def test_files_pass_the_checker_with_opset_17_and_a_symbolic_batch(exported, adapter_files):
    out, manifest = exported
    assert set(manifest["files"]) == {"unet", "text_encoder", "text_encoder_2", "vae_decoder"}
    for name, entry in manifest["files"].items():
        path = out / entry["path"]
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset >= 17 and manifest["opset"] == opset == 17
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch", (name, value.name)
    unet = manifest["files"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == UNET_INPUTS
    assert unet["inputs"][0]["shape"] == ["batch", 4, "height", "width"]
    assert unet["outputs"] == [
        {"name": "noise_pred", "dtype": "float32", "shape": ["batch", 4, "height", "width"]}
    ]
    # adapters are recorded with digests that identify them
    deft, lora = manifest["adapters"]
    assert (deft["kind"], deft["weight"], deft["origin"]) == ("deft", 1.0, "path")
    assert (lora["kind"], lora["weight"]) == ("lora", LORA_WEIGHT)
    assert deft["sha256"] == adapter_sha256(load_adapter(adapter_files["deft"]))
    assert lora["source_sha256"] == hashlib.sha256(adapter_files["lora"].read_bytes()).hexdigest()
    check = manifest["validation"]
    assert check["passed"] and check["tolerance"] == DEFAULT_TOLERANCE
    assert check["max_abs_error"] < DEFAULT_TOLERANCE * 0.1  # measured ~1e-6: well inside the tolerance
    assert [r["batch"] for r in unet["validation"]["runs"]] == [1, 3]


@pytest.mark.parametrize(("batch", "height", "width", "seq"), [(1, 32, 32, 77), (3, 16, 24, 20)])
def test_unet_matches_the_unmerged_adapters_in_torch(exported, oracle, batch, height, width, seq):
    out, _ = exported
    _, unet = oracle
    inputs = unet_inputs(batch, height, width, seq, seed=batch)
    (got,) = session(out / "unet.onnx").run(None, inputs)
    want = unet(inputs, [("deft", 1.0), ("lora", LORA_WEIGHT)])
    assert got.shape == (batch, 4, height, width)
    assert np.abs(got - want).max() <= bound(want)


def test_the_adapters_change_the_output(exported, oracle):
    out, _ = exported
    _, unet = oracle
    inputs = unet_inputs(2, 32, 32, 77, seed=7)
    (got,) = session(out / "unet.onnx").run(None, inputs)
    base = unet(inputs, [])
    only_deft = unet(inputs, [("deft", 1.0)])
    assert np.abs(got - base).max() > 1000 * bound(base)
    assert np.abs(got - only_deft).max() > 100 * bound(base)  # the LoRA is merged too


def test_text_encoders_and_vae_decoder_match_torch(exported, oracle):
    out, manifest = exported
    pipe, _ = oracle
    ids = torch.randint(
        0, pipe.text_encoder.config.vocab_size, (3, 77), generator=torch.Generator().manual_seed(0)
    )
    ids[:, 9:] = pipe.text_encoder.config.eos_token_id
    for name, pooled in (("text_encoder", "pooler_output"), ("text_encoder_2", "text_embeds")):
        assert (out / f"{name}.onnx").is_file()
        with torch.no_grad():
            ref = getattr(pipe, name)(ids, output_hidden_states=True)
        want = {
            "last_hidden_state": ref.last_hidden_state,
            "penultimate_hidden_state": ref.hidden_states[-2],
            pooled: getattr(ref, pooled),
        }
        names = [o["name"] for o in manifest["files"][name]["outputs"]]
        got = dict(
            zip(names, session(out / f"{name}.onnx").run(None, {"input_ids": ids.numpy()}), strict=True)
        )
        assert set(got) == set(want)
        for key, value in want.items():
            assert np.abs(got[key] - value.numpy()).max() <= bound(value.numpy()), (name, key)
    latents = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image = pipe.vae.decode(latents).sample.numpy()
    (got_image,) = session(out / "vae_decoder.onnx").run(None, {"latent_sample": latents.numpy()})
    assert got_image.shape == (2, 3, 24, 40)
    assert np.abs(got_image - image).max() <= bound(image)
    assert manifest["files"]["vae_decoder"]["notes"]["scaling_factor"] == pipe.vae.config.scaling_factor


def test_cli_errors(tmp_path, cache, adapter_files):
    result = export(
        tmp_path / "a", cache, "--adapter", "no-such-adapter", "--data-dir", str(tmp_path / "none")
    )
    assert result.exit_code == 1
    assert "'no-such-adapter' is neither an existing file or directory" in result.output
    assert "registered" in result.output
    result = export(tmp_path / "b", cache, "--opset", "16")
    assert result.exit_code == 2 and "below 17" in result.output
    result = export(tmp_path / "c", cache, "--opset", "99")
    assert result.exit_code == 1 and "--opset must be between 17 and" in result.output
    result = export(tmp_path / "d", cache, "--adapter", f"{adapter_files['lora']}:heavy")
    assert result.exit_code == 1 and "is not a number" in result.output
    # an impossible tolerance: the measured error is reported and the command fails
    result = export(tmp_path / "e", cache, "--tolerance", "1e-12")
    assert result.exit_code == 1 and "differs from torch beyond tolerance 1e-12" in result.output
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["validation"]["passed"] is False


def test_omnigen_transformer_exports_text_to_image(tmp_path, cache):
    pipe = load_pipeline("tiny-omnigen", cache_dir=cache)
    shapes = {n: tuple(m.weight.shape) for n, m in find_targets(pipe.transformer).items()}
    path = save_adapter(
        random_adapter(AdapterKind.LORA, shapes, rank=2, seed=3), tmp_path / "o.deft.safetensors"
    )
    base = ["export-onnx", "--model", "tiny-omnigen", "--cache-dir", str(cache), "--out", str(tmp_path / "o")]
    refused = runner.invoke(app, [*base, "--text-encoders"])
    assert refused.exit_code == 1 and "OmniGen has no separate text encoder" in refused.output
    result = runner.invoke(app, [*base, "--adapter", str(path)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "omnigen" and manifest["validation"]["passed"]
    # independent oracle: the adapter unmerged on a fresh transformer
    mam = MultiAdapterModel(
        pipe.transformer, pool_config=PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20), backend="torch"
    )
    mam.register("o", load_adapter(path))
    batch, text, seq = 2, 7, 7 + 1 + 16
    g = torch.Generator().manual_seed(5)
    inputs = {
        "hidden_states": torch.randn(batch, 4, 32, 32, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "input_ids": torch.randint(3, 200, (batch, text), generator=g),
        "attention_mask": torch.ones(batch, seq, seq),
        "position_ids": torch.arange(seq).expand(batch, seq).clone(),
    }
    with mam.rows([[("o", 1.0)]] * batch), torch.no_grad():
        want = pipe.transformer(
            inputs["hidden_states"],
            inputs["timestep"],
            inputs["input_ids"],
            [],
            {},
            inputs["attention_mask"],
            inputs["position_ids"],
        ).sample.numpy()
    (got,) = session(tmp_path / "o" / "transformer.onnx").run(None, {k: v.numpy() for k, v in inputs.items()})
    assert np.abs(got - want).max() <= bound(want)


def test_export_by_registered_name(tmp_path, server_factory, cache, adapter_files, oracle):
    from deft_client import DeftClient

    server = server_factory.start()
    with DeftClient(server.address, timeout=120) as client:
        client.register_adapter("dog", adapter_files["deft"])
    result = export(tmp_path / "r", cache, "--adapter", "dog:0.7", "--data-dir", str(server.data_dir))
    assert result.exit_code == 0, result.output
    (entry,) = json.loads((tmp_path / "r" / "manifest.json").read_text())["adapters"]
    assert (entry["origin"], entry["weight"]) == ("registry", 0.7)
    assert entry["sha256"] == adapter_sha256(load_adapter(adapter_files["deft"]))
    _, unet = oracle
    inputs = unet_inputs(2, 16, 16, 77, seed=11)
    (got,) = session(tmp_path / "r" / "unet.onnx").run(None, inputs)
    want = unet(inputs, [("deft", 0.7)])
    assert np.abs(got - want).max() <= bound(want)
