"""Train-then-register end to end: `deft train --register` against a real server process, then the
generated image equals diffusers + PEFT with the adapter files the trainer wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from deft_cli.app import app
from deft_client import DeftClient
from peft import PeftModel
from PIL import Image
from typer.testing import CliRunner

from deft_runtime.models import load_pipeline


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "dog"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_train_then_register_then_generate_matches_diffusers_peft(
    server_factory, tiny_model_cache, images, tmp_path, monkeypatch
):
    monkeypatch.setenv("DEFT_CACHE_DIR", str(tiny_model_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server = server_factory.start("--model", "tiny-sdxl")
    out = tmp_path / "dog-adapter"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            "tiny-sdxl",
            "--instance-data",
            str(images),
            "--instance-prompt",
            "a photo of sks dog",
            "--method",
            "deft",
            "--decomposition",
            "qr",
            "--rank",
            "4",
            "--init",
            "random",
            "--steps",
            "3",
            "--lr",
            "1e-2",
            "--resolution",
            "32",
            "--no-progress",
            "--out",
            str(out),
            "--register",
            "sks-dog",
            "--server",
            server.address,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "registered 'sks-dog'" in result.output

    with DeftClient(server.address) as client:
        info = client.get_adapter("sks-dog")
        assert info.kind == "deft" and info.metadata.get("source") == "deft train"
        params = dict(prompt="a photo of sks dog", seed=5, steps=4, width=64, height=64, guidance_scale=5.0)
        served = client.generate(adapters=[("sks-dog", 1.0)], **params)[0]
        plain = client.generate(**params)[0]

    pipe = load_pipeline("tiny-sdxl")
    pipe.unet = PeftModel.from_pretrained(pipe.unet, out / "peft").get_base_model()
    ref = pipe(
        prompt=params["prompt"],
        num_inference_steps=4,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images[0]
    got = np.asarray(served, dtype=np.float32) / 255.0
    assert np.abs(got - ref).max() <= 2 / 255
    assert np.abs(got - np.asarray(plain, dtype=np.float32) / 255.0).max() > 2 / 255, (
        "the trained adapter changes the image"
    )


def _register_taken(client: DeftClient, tmp_path: Path) -> None:
    from deft_runtime.adapter import AdapterKind
    from deft_runtime.formats import save_adapter
    from deft_runtime.testing import random_adapter

    path = tmp_path / "a.deft.safetensors"
    save_adapter(
        random_adapter(
            AdapterKind.LORA, {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}, rank=2
        ),
        path,
    )
    client.register_adapter("taken", path)


def _train_and_register(images: Path, out: Path, *connection: str, env: dict[str, str] | None = None):
    args = ["--model", "tiny-sdxl", "--instance-data", str(images), "--instance-prompt", "x"]
    args += ["--steps", "1", "--resolution", "32", "--no-progress", "--out", str(out), "--register", "taken"]
    return CliRunner().invoke(app, ["train", *args, *connection], env=env)


def test_register_refuses_a_taken_name_before_training(
    server_factory, tiny_model_cache, images, tmp_path, monkeypatch
):
    monkeypatch.setenv("DEFT_CACHE_DIR", str(tiny_model_cache))
    server = server_factory.start("--model", "tiny-sdxl")
    with DeftClient(server.address) as client:
        _register_taken(client, tmp_path)
    out = tmp_path / "out"
    result = _train_and_register(images, out, "--server", server.address)
    assert result.exit_code == 1 and "already has an adapter named 'taken'" in result.output
    assert not out.exists()


def test_register_uses_the_shared_connection_options_and_reports_auth_failures(
    server_factory, tiny_model_cache, images, tmp_path, monkeypatch
):
    """`--register` reaches a token-protected server with --token or DEFT_TOKEN; without the right
    token the failure says authentication, not "cannot reach", and so do the adapters commands."""
    monkeypatch.setenv("DEFT_CACHE_DIR", str(tiny_model_cache))
    monkeypatch.delenv("DEFT_TOKEN", raising=False)
    server = server_factory.start("--model", "tiny-sdxl", "--token", "s3cret")
    with DeftClient(server.address, token="s3cret") as client:
        _register_taken(client, tmp_path)
    out = tmp_path / "out"
    for connection in (["--server", server.address], ["--server", server.address, "--token", "wrong"]):
        refused = _train_and_register(images, out, *connection)
        text = " ".join(refused.output.split())
        assert refused.exit_code == 1 and f"authentication failed at {server.address}" in text, text
        assert "cannot reach" not in text and "DEFT_TOKEN" in text
        listed = CliRunner().invoke(app, ["adapters", "list", *connection])
        assert listed.exit_code == 1 and "authentication failed" in listed.output, listed.output
    # the right token, by flag and by environment: the check gets through to the name (taken)
    by_flag = _train_and_register(images, out, "--server", server.address, "--token", "s3cret")
    by_env = _train_and_register(images, out, "--server", server.address, env={"DEFT_TOKEN": "s3cret"})
    for result in (by_flag, by_env):
        assert result.exit_code == 1 and "already has an adapter named 'taken'" in result.output, (
            result.output
        )
    listed = CliRunner().invoke(
        app, ["adapters", "list", "--server", server.address], env={"DEFT_TOKEN": "s3cret"}
    )
    assert listed.exit_code == 0 and "taken" in listed.output, listed.output
    assert not out.exists()
