"""The scene language, its renderer and the exact parser every shapes-sdxl quality figure relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deft_runtime.scenes import (
    PALETTE,
    POSITIONS,
    SHAPES,
    Scene,
    caption,
    combination_is_held_out,
    held_out_combinations,
    parse_image,
    parse_prompt,
    render,
    sample_scene,
)
from deft_runtime.scenes.render import coverage


def test_parser_reads_rendered_ground_truth_per_attribute() -> None:
    """>= 99.5% per attribute on random scenes, sizes drawn continuously over the whole 20-32 px range."""
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng, held_out=None, size_step=0.01) for _ in range(400)]
    right = dict.fromkeys(("background", "foreground", "shape", "position"), 0)
    for scene in scenes:
        parsed = parse_image(render(scene))
        right["background"] += parsed.background == scene.background
        right["foreground"] += parsed.foreground == scene.foreground
        right["shape"] += parsed.shape == scene.shape
        right["position"] += parsed.position == scene.position
    for attribute, count in right.items():
        assert count / len(scenes) >= 0.995, (attribute, count)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [20.0, 32.0])
def test_parser_at_size_extremes_and_hardest_colour_pair(shape: str, size: float) -> None:
    # yellow/orange is the closest palette pair (71 apart in sRGB)
    for position in POSITIONS:
        scene = Scene("yellow", shape, "orange", position, size)
        parsed = parse_image(render(scene))
        assert (parsed.background, parsed.foreground, parsed.shape, parsed.position) == (
            "orange",
            "yellow",
            shape,
            position,
        )
        assert parsed.iou > 0.9


def test_parser_reports_no_foreground_on_a_flat_image() -> None:
    flat = np.full((64, 64, 3), PALETTE["green"], dtype=np.uint8)
    parsed = parse_image(flat)
    assert parsed.background == "green"
    assert (parsed.foreground, parsed.shape, parsed.position, parsed.iou) == (None, None, None, 0.0)


def test_parser_rejects_wrong_image_size() -> None:
    with pytest.raises(ValueError, match="64x64"):
        parse_image(np.zeros((32, 32, 3), dtype=np.uint8))


def test_renderer_uses_exact_palette_and_geometry() -> None:
    image = render(Scene("red", "square", "blue", "left", 20.0))
    assert tuple(image[32, 18]) == PALETTE["red"]
    assert tuple(image[0, 0]) == PALETTE["blue"]
    # a 20 px square centred at x=18 spans pixels 8..27 exactly
    row = image[32]
    red = [x for x in range(64) if tuple(row[x]) == PALETTE["red"]]
    assert (red[0], red[-1]) == (8, 27)


@pytest.mark.parametrize(
    ("shape", "area"),
    [
        ("circle", math.pi * 14**2),
        ("square", 28.0**2),
        ("diamond", 28.0**2 / 2),
        ("triangle", math.sqrt(3) / 4 * 28.0**2),
    ],
)
def test_coverage_area_matches_geometry(shape: str, area: float) -> None:
    covered = float(coverage(shape, 28.0, 32.0, 32.0).sum())
    assert covered == pytest.approx(area, rel=0.02)  # 4x4 supersampling


def test_star_points_up_and_fills_its_box() -> None:
    mask = coverage("star", 30.0, 32.0, 32.0) > 0.5
    rows, cols = np.nonzero(mask)
    assert cols.max() - cols.min() + 1 == pytest.approx(30, abs=2)
    top_row = rows.min()
    top_cols = cols[rows == top_row]
    assert abs(top_cols.mean() + 0.5 - 32.0) <= 1.0  # the topmost pixels are the upward point


def test_captions_round_trip_through_the_prompt_grammar() -> None:
    scene = Scene("red", "circle", "blue", "left", 24.0)
    assert caption(scene) == "a red circle on a blue background, on the left"
    assert parse_prompt(caption(scene)) == ("red", "circle", "blue", "left")
    unpositioned = Scene("white", "star", "black", "top", 24.0, prompted_position=False)
    assert caption(unpositioned) == "a white star on a black background"
    assert parse_prompt(caption(unpositioned)) == ("white", "star", "black", None)
    with pytest.raises(ValueError, match="position phrase"):
        parse_prompt("a red circle on a blue background, somewhere")


def test_held_out_split_is_fixed_and_ten_percent() -> None:
    held = held_out_combinations()
    assert len(held) == 28  # 10% of 8 * 7 * 5 = 280
    assert all(fg != bg for fg, _, bg in held)
    # every colour and shape still occurs in training
    rng = np.random.default_rng(0)
    train = {sample_scene(rng).combination for _ in range(3000)}
    assert not train & held
    assert {c[0] for c in train} == set(PALETTE) and {c[1] for c in train} == set(SHAPES)
    assert combination_is_held_out(*sorted(held)[0])


def test_scene_validation_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="shape"):
        Scene("red", "heart", "blue")
    with pytest.raises(ValueError, match="must differ"):
        Scene("red", "circle", "red")
    with pytest.raises(ValueError, match="size"):
        Scene("red", "circle", "blue", size=40.0)
