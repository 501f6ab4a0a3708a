"""`deft train` end to end on tiny-sdxl, and every bad input refused before training starts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from deft_cli.app import app
from PIL import Image
from typer.testing import CliRunner

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.formats import load_adapter

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_train.py: two contended threads are far slower on 2 cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deft-cache")  # tiny-sdxl is built into it once for the module


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("DEFT_CACHE_DIR", str(model_cache))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "dog"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["train", *args])
    return result.exit_code, result.output


def base_args(images: Path, out: Path) -> list[str]:
    return [
        "--model",
        "tiny-sdxl",
        "--instance-data",
        str(images),
        "--instance-prompt",
        "a photo of sks dog",
        "--out",
        str(out),
        "--resolution",
        "32",
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--no-progress",
    ]


def test_train_end_to_end_writes_both_formats(tmp_path, images):
    out = tmp_path / "dog-adapter"
    cat = tmp_path / "cat"
    cat.mkdir()
    Image.new("RGB", (48, 32), (200, 120, 40)).save(cat / "cat.webp")
    concept = f"--concept={cat}=a photo of zwx cat"
    options = ["--decomposition", "relu", "--rank", "2", "--random-flip", concept]
    code, output = run(*base_args(images, out), *options)
    assert code == 0, output
    assert "wrote" in output
    adapter = load_adapter(out / "adapter.deft.safetensors")
    assert (adapter.kind, adapter.decomposition, adapter.max_rank) == (
        AdapterKind.DEFT,
        Decomposition.RELU,
        2,
    )
    assert load_adapter(out / "peft").layers.keys() == adapter.layers.keys()
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-sdxl" and config["decomposition_method"] == "relu"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2]
    assert json.loads(adapter.metadata["prompts"]) == ["a photo of sks dog", "a photo of zwx cat"]
    assert not (tmp_path / "dog-adapter.run").exists()


def test_help_documents_the_paper_defaults():
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for fact in ("rank 4 for personalization", "32 for general tasks", "5e-5", "500 steps", "--p-lr-scale"):
        assert fact in text, fact


BAD_INPUTS = [
    (["--instance-data", "{tmp}/nowhere"], "does not exist"),
    (["--instance-data", "{tmp}/empty"], "holds no images"),
    (["--instance-data", "{tmp}/broken"], "not a readable image"),
    (["--decomposition", "cholesky"], "unknown projector decomposition 'cholesky'"),
    (["--method", "dora"], "unknown adapter kind 'dora'"),
    (["--method", "para", "--decomposition", "relu"], "para supports the decompositions qr, tsvd"),
    (["--method", "lora", "--decomposition", "qr"], "makes no sense with --method lora"),
    (["--method", "para", "--gate"], "a para adapter has none"),
    (["--method", "lora", "--cache-projector"], "--cache-projector freezes P"),
    (["--rank", "65"], "--rank 65 is impossible"),
    (["--rank", "0"], "--rank must be > 0"),
    (["--resolution", "30"], "must be a multiple of 4"),
    (["--target", "no_such_layer"], "no nn.Linear of the denoiser matches"),
    (["--model", "{tmp}/no-model"], "looks like a local path but does not exist"),
    (["--class-data", "{tmp}/class"], "--class-data needs --class-prompt"),
    (["--concept", "nodelimiter"], "--concept expects DIR=PROMPT"),
    (["--init", "zeros"], "--init must be one of identity, random"),
    (["--resume", "{tmp}/nowhere"], "not a checkpoint directory"),
    (
        ["--register", "bad/name", "--server", "127.0.0.1:9"],
        "invalid adapter name 'bad/name': use 1-128 letters, digits",
    ),
    (["--register", "dog", "--server", "127.0.0.1:9"], "cannot reach the deft server at 127.0.0.1:9"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_exits_non_zero_before_training(tmp_path, images, extra, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    code, output = run(*base_args(images, out), *[arg.format(tmp=tmp_path) for arg in extra])
    assert code == 1, output
    assert message in " ".join(output.split()), output
    assert not out.exists() and not (tmp_path / "out.run").exists()


def test_an_existing_output_is_not_overwritten_without_the_flag(tmp_path, images):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = run(*base_args(images, out))
    assert code == 1 and "already exists" in output
    assert (out / "keep.txt").read_text() == "mine"
