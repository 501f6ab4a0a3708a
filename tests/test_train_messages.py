"""What ``deft train`` tells its user and what it leaves on disk: a ``--resume`` says the step it restored,
and its outputs (like every adapter deft writes) get ``0666``/``0777`` minus the umask, not the owner-only
modes of the staging tools (``mkdtemp`` 0700, safetensors 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from deft_cli.app import app
from PIL import Image
from typer.testing import CliRunner

from deft_runtime.formats.peft import write_dir_atomic
from deft_runtime.formats.safetensors_io import write_safetensors_atomic
from deft_runtime.train.loop import TrainingSession

runner = CliRunner()


@pytest.fixture
def umask() -> Iterator[int]:
    """A umask other than the usual 022, so the modes must come from it, not from a constant."""
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_adapter_files_honour_the_umask(tmp_path, umask):
    tensors = {"a": torch.zeros(2)}
    single = write_safetensors_atomic(tmp_path / "x.deft.safetensors", tensors, {})
    folder = write_dir_atomic(tmp_path / "peft", {"peft_type": "LORA"}, {"a": torch.zeros(2)})
    assert mode(single) == 0o640
    assert mode(folder) == 0o750
    assert {p.name: mode(p) for p in folder.iterdir()} == {
        "adapter_config.json": 0o640,
        "adapter_model.safetensors": 0o640,
    }


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("DEFT_CACHE_DIR", str(tmp_path_factory.mktemp("deft-cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two contended threads are far slower on 2 cores (see test_train.py)
    yield
    torch.set_num_threads(threads)


def train_args(tmp_path: Path) -> list[str]:
    images = tmp_path / "dog"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    return [
        "train",
        *("--model", "tiny-sdxl", "--instance-data", str(images), "--instance-prompt", "a photo of sks dog"),
        *("--out", str(tmp_path / "dog-adapter"), "--resolution", "32", "--steps", "2", "--lr", "1e-3"),
        *("--rank", "2", "--checkpoint-every", "1", "--no-progress"),
    ]


class Crash(Exception):
    pass


def test_resume_says_the_step_and_outputs_honour_the_umask(tmp_path, offline, umask, monkeypatch):
    run = TrainingSession.run

    def crash_after_step_1(self: TrainingSession, until: int | None = None, **kw: object) -> None:
        run(self, until=1)
        raise Crash("killed after step 1")

    with monkeypatch.context() as patched:
        patched.setattr(TrainingSession, "run", crash_after_step_1)
        crashed = runner.invoke(app, train_args(tmp_path))
    assert isinstance(crashed.exception, Crash), crashed.output
    assert "resumed" not in crashed.output
    resumed = runner.invoke(app, [*train_args(tmp_path), "--resume", "latest"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from step 1 of 2" in resumed.output
    out = tmp_path / "dog-adapter"
    assert mode(out) == 0o750 and mode(out / "adapter.deft.safetensors") == 0o640
    assert mode(out / "peft") == 0o750 and mode(out / "peft" / "adapter_model.safetensors") == 0o640
    assert mode(out / "training.json") == 0o640
