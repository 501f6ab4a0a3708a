"""``deft generate`` as a user runs it (the real executable, a real tiny-sdxl server): seeds, output
files and formats checked before generating, the parameters in PNG text chunks, and ``--from-png``
reproducing an image, also image i of a several-image request."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import DEFT_EXECUTABLE
from deft_client.png_info import KEY, GenerationRecord, read_record
from PIL import Image

from deft_runtime import __version__
from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.formats import save_adapter
from deft_runtime.testing import random_adapter

LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
NOBODY = "127.0.0.1:1"  # nothing listens: a check that needs no server must fail before connecting


def deft(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DEFT_EXECUTABLE), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory):
    server = server_factory.start()
    adapter = random_adapter(AdapterKind.DEFT, {LAYER: (64, 64)}, rank=2, decomposition=Decomposition.RELU)
    path = save_adapter(adapter, tmp_path_factory.mktemp("adapter") / "a.deft.safetensors")
    registered = deft("adapters", "register", "dog", str(path), "--server", server.address)
    assert registered.returncode == 0, registered.stderr
    return server


def generate(server, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return deft("generate", "--server", server.address, "--steps", "2", "--out", str(out), *args)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_seed_minus_one_is_random_and_bad_seeds_say_what_to_give(server, tmp_path):
    ok = generate(server, tmp_path / "r.png", "--prompt", "a", "--seed", "-1")
    assert ok.returncode == 0, ok.stderr
    assert read_record(tmp_path / "r.png").seed >= 0
    for seed in (str(2**64), "-2", str(10**30)):
        bad = deft(
            "generate", "--prompt", "a", "--seed", seed, "--out", str(tmp_path / "x.png"), "--server", NOBODY
        )
        assert bad.returncode == 1, bad.stderr
        assert "out of range: give 0 to 18446744073709551615" in bad.stderr and "Traceback" not in bad.stderr
    largest = generate(server, tmp_path / "m.png", "--prompt", "a", "--seed", str(2**64 - 1))
    assert largest.returncode == 0 and read_record(tmp_path / "m.png").seed == 2**64 - 1, largest.stderr


def test_out_is_checked_before_anything_is_generated(tmp_path):
    (tmp_path / "taken.png").write_bytes(b"mine")
    (tmp_path / "file").write_text("x")
    cases = {
        str(tmp_path): "is a folder; give a file name in it",
        str(tmp_path / "x.gif"): "must end in .png, .jpg, .jpeg or .webp",
        str(tmp_path / "noext"): "must end in .png, .jpg, .jpeg or .webp",
        str(tmp_path / "taken.png"): "exists; pass --overwrite",
        str(tmp_path / "file" / "x.png"): "cannot create the folder of --out",
    }
    for out, message in cases.items():
        result = deft("generate", "--prompt", "a", "--out", out, "--server", NOBODY)
        assert result.returncode == 1 and message in result.stderr, (out, result.stderr)
        assert "cannot reach" not in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "taken.png").read_bytes() == b"mine"
    (tmp_path / "s_1.png").write_bytes(b"mine")
    result = deft(
        "generate", "--prompt", "a", "--num-images", "2", "--out", str(tmp_path / "s.png"), "--server", NOBODY
    )
    assert result.returncode == 1 and "s_1.png exists" in result.stderr, result.stderr


def test_the_extension_picks_the_format_and_overwrite_replaces(server, tmp_path):
    for name, fmt in (("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.JPEG", "JPEG"), ("a.webp", "WEBP")):
        result = generate(server, tmp_path / name, "--prompt", "a", "--seed", "3")
        assert result.returncode == 0, result.stderr
        with Image.open(tmp_path / name) as image:
            assert image.format == fmt, name
    before = (tmp_path / "a.png").read_bytes()
    again = generate(server, tmp_path / "a.png", "--prompt", "other", "--seed", "4")
    assert again.returncode == 1 and (tmp_path / "a.png").read_bytes() == before
    replaced = generate(server, tmp_path / "a.png", "--prompt", "other", "--seed", "4", "--overwrite")
    assert replaced.returncode == 0 and read_record(tmp_path / "a.png").prompt == "other", replaced.stderr


def test_png_carries_the_parameters_and_from_png_reproduces_the_pixels(server, tmp_path):
    first = tmp_path / "first.png"
    args = ["--prompt", "a red ball", "--negative-prompt", "blur", "--seed", "11", "--guidance", "3.5"]
    made = generate(server, first, *args, "--adapter", "dog:0.75")
    assert made.returncode == 0, made.stderr
    with Image.open(first) as image:
        chunk = json.loads(image.text[KEY])
        assert (
            "a red ball\nNegative prompt: blur\nSteps: 2, CFG scale: 3.5, Seed: 11"
            in image.text["parameters"]
        )
    shown = deft("adapters", "show", "dog", "--json", "--server", server.address)
    assert shown.returncode == 0, shown.stderr
    sha256 = json.loads(shown.stdout)["sha256"]
    assert chunk == {
        "format": "deft.generation/1",
        "prompt": "a red ball",
        "negative_prompt": "blur",
        "seed": 11,
        "steps": 2,
        "width": 64,
        "height": 64,
        "guidance_scale": 3.5,
        "adapters": [{"name": "dog", "weight": 0.75, "sha256": sha256}],
        "num_images": 1,
        "image_index": 0,
        "model": "tiny-sdxl",  # the server's --model, as its result reports it
        "deft_version": __version__,
    }
    defaults = tmp_path / "defaults.png"
    assert generate(server, defaults, "--prompt", "a red ball", "--seed", "3").returncode == 0
    assert read_record(defaults).guidance_scale == 5.0  # the model's default, as the server used it
    again = tmp_path / "again.png"
    repeated = deft("generate", "--from-png", str(first), "--out", str(again), "--server", server.address)
    assert repeated.returncode == 0, repeated.stderr
    assert read_record(again) == read_record(first)
    assert np.array_equal(pixels(again), pixels(first))  # same server, same request: the same kernels
    other = tmp_path / "other.png"
    changed = deft(
        "generate", "--from-png", str(first), "--seed", "12", "--out", str(other), "--server", server.address
    )
    assert changed.returncode == 0 and read_record(other).seed == 12, changed.stderr
    assert not np.array_equal(pixels(other), pixels(first))


def test_image_i_of_several_is_reproduced_and_every_seed_is_explained(server, tmp_path):
    made = generate(server, tmp_path / "batch.png", "--prompt", "a", "--seed", "5", "--num-images", "3")
    assert made.returncode == 0, made.stderr
    assert "one generator seeded 5: image i is reproduced by --seed 5 --num-images 3" in " ".join(
        made.stdout.split()
    )
    records = [read_record(tmp_path / f"batch_{i}.png") for i in range(3)]
    assert [(r.seed, r.num_images, r.image_index) for r in records] == [(5, 3, 0), (5, 3, 1), (5, 3, 2)]
    one = tmp_path / "one.png"
    repeated = deft(
        "generate", "--from-png", str(tmp_path / "batch_1.png"), "--out", str(one), "--server", server.address
    )
    assert repeated.returncode == 0, repeated.stderr
    assert np.array_equal(pixels(one), pixels(tmp_path / "batch_1.png"))
    assert not np.array_equal(pixels(one), pixels(tmp_path / "batch_0.png"))
    assert read_record(one).image_index == 1 and not (tmp_path / "one_0.png").exists()


def test_from_png_refuses_an_image_without_parameters(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = deft("generate", "--from-png", str(tmp_path / "plain.png"), "--out", str(tmp_path / "o.png"))
    assert result.returncode == 1 and "has no deft.generation text chunk" in result.stderr, result.stderr
    with pytest.raises(ValueError, match="not deft.generation/1"):
        GenerationRecord.from_json('{"format": "other"}')


def test_a_truncated_prompt_is_a_warning(server, tmp_path):
    long_prompt = " ".join(["a red circle on a blue background"] * 20)  # far beyond 77 tokens
    result = generate(server, tmp_path / "long.png", "--prompt", long_prompt, "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "77" in result.stderr, result.stderr
