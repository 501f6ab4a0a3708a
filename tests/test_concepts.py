"""Personalisation on shapes-sdxl: the new shapes, their templates and datasets, the per-model trainer
defaults, and the README's "Train your own concept" walkthrough run for real (train with `deft train`'s
defaults, then register on a real server and generate through it)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from deft_cli.app import app
from PIL import Image
from typer.testing import CliRunner

from deft_runtime.scenes import PALETTE, POSITIONS, SHAPES, parse_prompt
from deft_runtime.scenes.concepts import (
    CONCEPTS,
    ConceptScene,
    concept_coverage,
    main,
    read_concept,
    render_concept,
    write_class_images,
    write_concept_dataset,
)
from deft_runtime.train.config import MODEL_TRAIN_DEFAULTS, PAPER_TRAIN_DEFAULTS, train_defaults

CAPTION = re.compile(r"^a (\w+) sks on a (\w+) background(?:, ([a-z ]+))?$")


@pytest.mark.parametrize("concept", CONCEPTS)
@pytest.mark.parametrize("size", [20.0, 32.0])
def test_concept_template_reads_back_with_colours_position_and_margin(concept: str, size: float) -> None:
    """Each rendered concept fits its own template (IoU > 0.95) far better than any base shape (by >= 0.2),
    and the parser reads colours and position, on the closest palette pair and at both size extremes."""
    assert concept not in SHAPES
    for position in POSITIONS:
        scene = ConceptScene(concept, "yellow", "orange", position, size)
        read = read_concept(render_concept(scene), concept)
        assert (read.background, read.foreground, read.position) == ("orange", "yellow", position)
        assert read.iou > 0.95 and read.iou - read.base_iou > 0.2, read


@pytest.mark.parametrize("concept", CONCEPTS)
def test_concept_geometry_follows_the_scene_rules(concept: str) -> None:
    """Bounding box's longer side = size, centred on the position (to a pixel); flat palette colours."""
    cover = concept_coverage(concept, 28.0, 18.0, 32.0)
    ys, xs = np.nonzero(cover > 0.5)
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    assert abs(max(width, height) - 28) <= 1
    assert abs((xs.min() + xs.max() + 1) / 2 - 18) <= 1 and abs((ys.min() + ys.max() + 1) / 2 - 32) <= 1
    image = render_concept(ConceptScene(concept, "red", "blue", "left"))
    assert tuple(image[0, 0]) == PALETTE["blue"]
    assert (image.reshape(-1, 3) == PALETTE["red"]).all(axis=1).sum() > 150


def test_unknown_concept_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="heart"):
        ConceptScene("dog", "red", "blue")
    with pytest.raises(ValueError, match="both 'red'"):
        ConceptScene("heart", "red", "red")


def test_dataset_writer_images_match_their_captions(tmp_path: Path) -> None:
    paths = write_concept_dataset("ring", tmp_path / "ring")
    assert len(paths) == 5
    pairs = set()
    for path in paths:
        match = CAPTION.match(path.with_suffix(".txt").read_text().strip())
        assert match is not None
        fg, bg, where = match.groups()
        read = read_concept(np.asarray(Image.open(path).convert("RGB")), "ring")
        assert (read.foreground, read.background) == (fg, bg) and read.recognised
        assert where is not None
        pairs.add((fg, bg))
    assert len(pairs) == 5  # five contexts, not one image five times
    classes = write_class_images(tmp_path / "class", 6)
    for path in classes:
        fg, shape, bg, _ = parse_prompt(path.with_suffix(".txt").read_text().strip())
        assert shape in SHAPES
        assert np.asarray(Image.open(path).convert("RGB"))[0, 0].tolist() == list(PALETTE[bg])


def test_command_line_writes_instances_and_class_images(tmp_path: Path, capsys) -> None:
    main(
        [
            "cross",
            "--out",
            str(tmp_path / "cross"),
            "--class-out",
            str(tmp_path / "cls"),
            "--class-images",
            "3",
        ]
    )
    assert len(list((tmp_path / "cross").glob("*.png"))) == 5
    assert len(list((tmp_path / "cls").glob("*.txt"))) == 3
    assert "wrote 5 images of 'cross'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["cross", "--out", str(tmp_path / "x"), "--count", "0"])


def test_trainer_defaults_are_per_model() -> None:
    assert train_defaults("tiny-sdxl") == PAPER_TRAIN_DEFAULTS
    assert train_defaults("shapes-sdxl") == {**PAPER_TRAIN_DEFAULTS, **MODEL_TRAIN_DEFAULTS["shapes-sdxl"]}
    assert train_defaults("shapes-sdxl")["latents"] == "mean"
    assert PAPER_TRAIN_DEFAULTS["lr"] == 5e-5 and PAPER_TRAIN_DEFAULTS["steps"] == 500


def test_cli_fills_the_model_defaults_and_keeps_explicit_options(tmp_path: Path) -> None:
    from deft_cli.train_options import (
        AdapterOptions,
        BaseOptions,
        DataOptions,
        OptimOptions,
        PriorOptions,
        RunOptions,
        TrainOptions,
        ValidationOptions,
        build_config,
    )

    def config(model: str, **optim: object):
        return build_config(
            TrainOptions(
                BaseOptions(out=tmp_path / "o", model=model),
                DataOptions(instance_data=tmp_path, instance_prompt="a sks"),
                AdapterOptions(),
                OptimOptions(**optim),  # type: ignore[arg-type]
                PriorOptions(),
                RunOptions(),
                ValidationOptions(),
            )
        )

    shapes = config("shapes-sdxl")
    expected = train_defaults("shapes-sdxl")
    assert (shapes.lr, shapes.steps, shapes.batch_size, shapes.latents) == (
        expected["lr"],
        expected["steps"],
        expected["batch_size"],
        "mean",
    )
    paper = config("tiny-sdxl")
    assert (paper.lr, paper.steps, paper.batch_size, paper.latents) == (5e-5, 500, 1, "sample")
    explicit = config("shapes-sdxl", lr=1e-4, steps=7, batch_size=2, latents="sample")
    assert (explicit.lr, explicit.steps, explicit.batch_size, explicit.latents) == (1e-4, 7, 2, "sample")


# ------------------------------------------------------------------ the walkthrough, for real

SKS_PROMPTS = 12  # new contexts (colour pairs the training images lack), 2 in 3 with a position
PRIOR_PROMPTS = 12
EVAL = {"steps": 25, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def heart_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README walkthrough's first two steps: render the data, `deft train` with the model defaults."""
    import torch

    torch.set_num_threads(1)  # on a shared machine, two OpenMP threads spin against busy neighbours
    root = tmp_path_factory.mktemp("heart")
    main(["heart", "--out", str(root / "heart"), "--class-out", str(root / "shapes")])
    args = ["train", "--model", "shapes-sdxl", "--instance-data", str(root / "heart")]
    args += ["--instance-prompt", "a sks", "--class-data", str(root / "shapes"), "--class-prompt", "a shape"]
    args += ["--num-class-images", "50", "--out", str(root / "heart-adapter"), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "heart-adapter"


def test_trained_adapter_draws_the_concept_in_prompted_colours_and_keeps_the_prior(
    heart_adapter: Path,
) -> None:
    import torch

    from deft_runtime.formats import load_adapter
    from deft_runtime.models import load_pipeline
    from deft_runtime.scenes.concept_quality import (
        adapted,
        concept_contexts,
        evaluate_concept,
        evaluate_prior,
    )

    torch.set_num_threads(1)
    pipe = load_pipeline("shapes-sdxl")
    scenes = concept_contexts("heart", SKS_PROMPTS)
    before, _ = evaluate_concept(pipe, scenes, **EVAL)
    prior_before = evaluate_prior(pipe, PRIOR_PROMPTS, seed=1000, **EVAL)
    with adapted(pipe, load_adapter(heart_adapter)) as tuned:
        after, _ = evaluate_concept(tuned, scenes, **EVAL)
        prior_after = evaluate_prior(tuned, PRIOR_PROMPTS, seed=1000, **EVAL)
    b, a = before.summary(), after.summary()
    print("before", b, prior_before, "after", a, prior_after)
    # The base model never draws a heart; the adapter draws it in at least 2 of the 12 new contexts
    # (measured: 3 of 12) without losing the prompt: the trigger is one token, so the colour and
    # position words keep the places the text encoders learned them at (base and adapter both ~1.0).
    assert b["recognised"] <= 0.1 and a["recognised"] >= 2 / SKS_PROMPTS - 1e-6, (b, a)
    assert a["prompt_following"] >= 0.75 and b["prompt_following"] >= 0.75, (b, a)
    assert prior_after >= prior_before - 0.25, (prior_before, prior_after)


def test_walkthrough_registers_and_generates_on_a_real_server(server_factory, heart_adapter: Path, tmp_path):
    """The walkthrough's last two commands against `deft serve --model shapes-sdxl`: the served images
    are the adapted pipeline's (same seed), and differ from the base's."""
    import torch

    from deft_runtime.formats import load_adapter
    from deft_runtime.models import load_pipeline
    from deft_runtime.scenes.concept_quality import adapted
    from deft_runtime.scenes.quality import generate_images

    server = server_factory.start("--model", "shapes-sdxl")
    runner = CliRunner()
    registered = runner.invoke(
        app, ["adapters", "register", "heart", str(heart_adapter), "--server", server.address]
    )
    assert registered.exit_code == 0, registered.output
    prompt, seeds = "a green sks on a yellow background", [0, 1]
    served = []
    for seed in seeds:
        out = tmp_path / f"heart-{seed}.png"
        args = ["generate", "--prompt", prompt, "--adapter", "heart", "--steps", "25", "--guidance", "5"]
        generated = runner.invoke(
            app, [*args, "--seed", str(seed), "--out", str(out), "--server", server.address]
        )
        assert generated.exit_code == 0, generated.output
        with Image.open(out) as image:
            served.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    torch.set_num_threads(1)
    pipe = load_pipeline("shapes-sdxl")
    base = generate_images(pipe, [prompt] * 2, seeds, steps=25, guidance_scale=5.0)
    with adapted(pipe, load_adapter(heart_adapter)) as tuned:
        expected = generate_images(tuned, [prompt] * 2, seeds, steps=25, guidance_scale=5.0)
    for got, want, plain in zip(served, expected, base, strict=True):
        assert np.abs(got - want).max() <= 3, "the server draws what the adapted pipeline draws"
        assert np.abs(got - plain).max() > 20, "the adapter changes the image"
        assert read_concept(got.astype(np.uint8), "heart").foreground == "green"
