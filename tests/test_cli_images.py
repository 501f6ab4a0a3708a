"""``deft generate --image FILE [--mask FILE] [--strength S]`` as a user runs it (the real executable, a
real tiny-sdxl server): the CLI's image equals the client's for the same request, the PNG records the
strength and each input's sha256, ``--from-png`` needs the inputs again (and warns when they differ),
and bad files or flags are refused before connecting, naming the flag."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from deft_client import DeftClient
from deft_client.png_info import read_record
from test_cli_generate import NOBODY, deft, pixels
from test_image_conditioning import picture, square_mask

REQUEST = ("--prompt", "a dog on a beach", "--steps", "5", "--seed", "5", "--guidance", "5")


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    paths = {"image": root / "in.png", "other": root / "other.jpg", "mask": root / "mask.png"}
    picture(1).save(paths["image"])
    picture(2).save(paths["other"], quality=95)
    square_mask().save(paths["mask"])
    return paths


def generate(server, out: Path, *args: str):
    return deft("generate", "--server", server.address, "--out", str(out), *args)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_img2img_equals_the_client_and_the_png_records_strength_and_input(server, files, tmp_path):
    out = tmp_path / "i2i.png"
    made = generate(server, out, *REQUEST, "--image", str(files["image"]), "--strength", "0.6")
    assert made.returncode == 0, made.stderr
    with DeftClient(server.address, timeout=300) as client:
        (expected,) = client.generate(
            "a dog on a beach", images=files["image"], strength=0.6, steps=5, seed=5, guidance_scale=5.0
        )
    assert np.array_equal(pixels(out), np.asarray(expected.convert("RGB")))
    record = read_record(out)
    assert record.strength == 0.6 and record.input_images == [sha256(files["image"])]
    assert record.mask_image is None
    weaker = generate(
        server, tmp_path / "weak.png", *REQUEST, "--image", str(files["image"]), "--strength", "0.2"
    )
    assert weaker.returncode == 0, weaker.stderr
    assert not np.array_equal(pixels(out), pixels(tmp_path / "weak.png"))  # the strength reaches the server


def test_inpainting_with_mask_equals_the_client(server, files, tmp_path):
    out = tmp_path / "inpaint.png"
    args = ("--image", str(files["image"]), "--mask", str(files["mask"]), "--strength", "0.8")
    made = generate(server, out, *REQUEST, *args)
    assert made.returncode == 0, made.stderr
    with DeftClient(server.address, timeout=300) as client:
        (expected,) = client.generate(
            "a dog on a beach", images=files["image"], mask=files["mask"], strength=0.8, steps=5, seed=5,
            guidance_scale=5.0,
        )  # fmt: skip
    assert np.array_equal(pixels(out), np.asarray(expected.convert("RGB")))
    record = read_record(out)
    assert record.mask_image == sha256(files["mask"]) and record.input_images == [sha256(files["image"])]
    plain = tmp_path / "i2i.png"
    assert (
        generate(server, plain, *REQUEST, "--image", str(files["image"]), "--strength", "0.8").returncode == 0
    )
    assert not np.array_equal(pixels(out), pixels(plain))  # the mask reached the server


def test_from_png_needs_the_inputs_again_and_warns_when_they_differ(server, files, tmp_path):
    first = tmp_path / "first.png"
    args = ("--image", str(files["image"]), "--strength", "0.7")
    assert generate(server, first, *REQUEST, *args).returncode == 0
    alone = deft("generate", "--from-png", str(first), "--out", str(tmp_path / "x.png"), "--server", NOBODY)
    assert alone.returncode == 1, alone.stderr
    assert (
        "generated from 1 input image(s)" in alone.stderr and "give them again with --image" in alone.stderr
    )
    assert sha256(files["image"])[:12] in alone.stderr and "cannot reach" not in alone.stderr

    again = tmp_path / "again.png"
    repeat = generate(server, again, "--from-png", str(first), "--image", str(files["image"]))
    assert repeat.returncode == 0, repeat.stderr
    assert "warning" not in repeat.stderr
    assert np.array_equal(pixels(first), pixels(again))  # strength, seed and steps came from the PNG

    other = tmp_path / "other.png"
    changed = generate(server, other, "--from-png", str(first), "--image", str(files["other"]))
    assert changed.returncode == 0, changed.stderr
    assert "the input images differ" in changed.stderr and "the image will differ" in changed.stderr
    assert sha256(files["other"])[:12] in changed.stderr
    assert not np.array_equal(pixels(first), pixels(other))
    assert read_record(other).input_images == [sha256(files["other"])]

    masked = tmp_path / "masked.png"
    mask_args = ("--image", str(files["image"]), "--mask", str(files["mask"]))
    assert generate(server, masked, *REQUEST, *mask_args).returncode == 0
    no_mask = deft(
        "generate", "--from-png", str(masked), "--image", str(files["image"]), "--out", str(tmp_path / "y.png"),
        "--server", NOBODY,
    )  # fmt: skip
    assert no_mask.returncode == 1 and "inpainted with a mask" in no_mask.stderr, no_mask.stderr


def test_bad_files_and_flags_are_refused_before_connecting(files, tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "anim.gif")
    image = str(files["image"])
    cases = [
        (
            ("--image", str(tmp_path / "missing.png")),
            "--image " + str(tmp_path / "missing.png") + ": no such file",
        ),
        (("--image", str(tmp_path)), "is a folder; give an image file"),
        (("--image", str(tmp_path / "notes.png")), "is not an image; give a PNG, JPEG or WebP file"),
        (("--image", str(tmp_path / "anim.gif")), "is a GIF image; the server reads PNG, JPEG or WebP"),
        (("--image", image, "--mask", str(tmp_path / "notes.png")), "--mask"),
        (("--mask", str(files["mask"])), "--mask needs --image FILE"),
        (("--strength", "0.5"), "--strength needs --image FILE"),
        (("--image-guidance", "2"), "--image-guidance needs --image FILE"),
        (("--image", image, "--strength", "0"), "--strength 0 is out of range: give a number in (0, 1]"),
        (("--image", image, "--strength", "1.5"), "--strength 1.5 is out of range"),
        (("--image", image, "--strength", "nan"), "is out of range: give a number in (0, 1]"),
    ]
    for args, message in cases:
        result = deft(
            "generate", "--prompt", "a", *args, "--out", str(tmp_path / "x.png"), "--server", NOBODY
        )
        assert result.returncode != 0, (args, result.stderr)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
        assert "cannot reach" not in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert not (tmp_path / "x.png").exists()
