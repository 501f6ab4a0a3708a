"""The README's commands, as written: its shell blocks are read out of README.md and run with bash in a
scratch folder holding a link to this checkout's ``.venv``, against a real server. The line that starts
the server in "terminal 1" (``make serve`` / ``deft serve``) is the one thing replaced: the test starts
that server itself (``DEFT_SERVER`` points the commands at it)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.formats import save_adapter
from deft_runtime.layers import DEFAULT_TARGETS, find_targets
from deft_runtime.models import load_pipeline
from deft_runtime.scenes import parse_image
from deft_runtime.testing import random_adapter

ROOT = Path(__file__).resolve().parents[1]
STARTS_SERVER = re.compile(r"^(make serve|deft serve)\b")


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block under ``## heading`` (comment-only lines and the
    server-starting line left out; continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def run_block(lines: list[str], cwd: Path, server: str, timeout: float = 600) -> subprocess.CompletedProcess:
    commands = [line for line in lines if not STARTS_SERVER.match(line.strip())]
    assert len(commands) < len(lines), "the block no longer starts a server: update this test"
    (cwd / ".venv").symlink_to(ROOT / ".venv")
    env = {**os.environ, "DEFT_SERVER": server}
    script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
    result = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{script}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def shapes_server(server_factory):
    return server_factory.start("--model", "shapes-sdxl")


def test_first_image_is_the_prompted_scene(shapes_server, tmp_path):
    """`make serve`, then the README's generate line: a 64x64 PNG whose colours the parser reads as
    prompted (the default model is real; the shape itself is right ~90% of the time, so not asserted)."""
    lines = readme_block("First image")
    assert any(line.startswith("make serve") for line in lines)
    run_block(lines, tmp_path, shapes_server.address)
    with Image.open(tmp_path / "circle.png") as image:
        assert image.format == "PNG" and image.size == (64, 64)
        parsed = parse_image(np.asarray(image.convert("RGB")))
    assert (parsed.foreground, parsed.background) == ("red", "blue"), parsed


def test_serving_three_commands(shapes_server, tmp_path):
    """`source .venv/bin/activate`, register a `deft train` output folder, generate with it."""
    targets = find_targets(load_pipeline("shapes-sdxl").unet, DEFAULT_TARGETS)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    adapter = random_adapter(AdapterKind.DEFT, shapes, rank=4, decomposition=Decomposition.QR, magnitude=0.05)
    (tmp_path / "dog-adapter").mkdir()
    save_adapter(adapter, tmp_path / "dog-adapter" / "adapter.deft.safetensors")
    lines = readme_block("Serving")
    assert lines[0] == "source .venv/bin/activate"
    result = run_block(lines, tmp_path, shapes_server.address)
    assert "dog" in result.stdout
    with Image.open(tmp_path / "dog.png") as image:
        assert image.format == "PNG" and image.size == (64, 64)
