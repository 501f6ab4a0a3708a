"""The exact, non-learned scene parser every quality figure is measured with.

Reads a 64x64 image and returns background colour, foreground colour, shape and position:

1. background = nearest palette colour to the median of the 2-pixel border;
2. foreground pixels = those far from the measured background; foreground colour = nearest palette
   colour to the median of the most saturated half of them; a soft mask is each pixel's fraction
   of the way from the background to the foreground colour;
3. shape = the template with the highest soft IoU against that mask, each template rendered at the
   scale that gives the mask's area and placed where its centroid is the mask's centroid;
4. position = the named position nearest the best template's bounding-box centre, i.e. the mask
   centroid corrected by that shape's centroid offset (a triangle's centroid sits below its box
   centre).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image

from deft_runtime.scenes.language import IMAGE_SIZE, PALETTE, POSITIONS, SHAPES
from deft_runtime.scenes.render import render_coverage, shape_outline

__all__ = [
    "ParsedScene",
    "fit_template",
    "nearest_position",
    "parse_image",
    "read_foreground",
    "shape_moments",
]

_BORDER = 2
_FOREGROUND_DISTANCE = 35.0  # half the closest palette pair (yellow/orange, 71 apart)
_MIN_FOREGROUND_PIXELS = 40  # the smallest shape (a 20 px star) covers about 150 pixels
_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.asarray([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class ParsedScene:
    """What the parser read; foreground fields are None when no foreground shape was found."""

    background: str
    foreground: str | None
    shape: str | None
    position: str | None
    iou: float  # soft IoU of the mask with the best template (0 without a foreground)
    scores: dict[str, float]  # soft IoU with each shape's template


def _polygon_moments(points: np.ndarray) -> tuple[float, float]:
    """(area, centroid y) of a simple polygon by the shoelace formula."""
    x, y = points[:, 0], points[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * area)
    return abs(float(area)), float(cy)


def shape_moments(shape: str) -> tuple[float, float]:
    """For a shape of size 1 centred at the origin: (area, centroid y offset from the box centre)."""
    if shape == "circle":
        return math.pi / 4, 0.0
    return _polygon_moments(shape_outline(shape, 1.0, 0.0, 0.0))


_MOMENTS = {shape: shape_moments(shape) for shape in SHAPES}


def _nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE_RGB - rgb) ** 2).sum(axis=1)))]


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"expected a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image, got an array of shape {array.shape}"
        )
    return array


def _soft_mask(pixels: np.ndarray, bg_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(foreground rgb, soft mask in [0, 1]) or None when too few pixels differ from the background."""
    distance = np.linalg.norm(pixels - bg_rgb, axis=2)
    far = distance > _FOREGROUND_DISTANCE
    if far.sum() < _MIN_FOREGROUND_PIXELS:
        return None
    core = far & (distance >= np.median(distance[far]))  # drop anti-aliased edge pixels
    fg_rgb = np.median(pixels[core], axis=0)
    direction = fg_rgb - bg_rgb
    t = ((pixels - bg_rgb) @ direction) / max(float(direction @ direction), 1e-6)
    return fg_rgb, np.clip(t, 0.0, 1.0)


Template = Callable[[float, float, float], np.ndarray]  # (size, cx, cy) -> [64, 64] coverage


def fit_template(
    mask: np.ndarray, template: Template, moments: tuple[float, float]
) -> tuple[float, tuple[float, float]]:
    """(soft IoU, bounding-box centre) of ``template`` rendered at the scale that gives the mask's area
    and placed where its centroid is the mask's; ``moments`` = :func:`shape_moments` of the template."""
    unit_area, unit_dy = moments
    area = float(mask.sum())
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    mx, my = float((mask * xs).sum() / area), float((mask * ys).sum() / area)
    size = math.sqrt(area / unit_area)
    centre = (mx, my - unit_dy * size)
    fitted = template(size, *centre)
    return float(np.minimum(mask, fitted).sum() / np.maximum(mask, fitted).sum()), centre


def _match_shape(mask: np.ndarray) -> tuple[str, float, tuple[float, float], dict[str, float]]:
    """(best shape, its soft IoU, its bounding-box centre, IoU per shape) for a soft mask."""
    scores: dict[str, float] = {}
    centres: dict[str, tuple[float, float]] = {}
    for shape, moments in _MOMENTS.items():
        scores[shape], centres[shape] = fit_template(mask, partial(render_coverage, shape), moments)
    best = max(scores, key=scores.__getitem__)
    return best, scores[best], centres[best], scores


def nearest_position(centre: tuple[float, float]) -> str:
    return min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], centre))


def read_foreground(image: Image.Image | np.ndarray) -> tuple[str, str | None, np.ndarray | None]:
    """(background colour, foreground colour, soft foreground mask): steps 1 and 2 of the parser
    (colour and mask are None when no foreground is found)."""
    pixels = _as_array(image)
    border = np.concatenate(
        [
            pixels[:_BORDER].reshape(-1, 3),
            pixels[-_BORDER:].reshape(-1, 3),
            pixels[:, :_BORDER].reshape(-1, 3),
            pixels[:, -_BORDER:].reshape(-1, 3),
        ]
    )
    bg_rgb = np.median(border, axis=0)
    background = _nearest_colour(bg_rgb)
    found = _soft_mask(pixels, bg_rgb)
    if found is None:
        return background, None, None
    return background, _nearest_colour(found[0]), found[1]


def parse_image(image: Image.Image | np.ndarray) -> ParsedScene:
    """Read a 64x64 scene (PIL image or ``[64, 64, 3]`` array of 0-255 sRGB values)."""
    background, foreground, mask = read_foreground(image)
    if mask is None:
        return ParsedScene(background, None, None, None, 0.0, dict.fromkeys(SHAPES, 0.0))
    shape, iou, centre, scores = _match_shape(mask)
    return ParsedScene(background, foreground, shape, nearest_position(centre), iou, scores)
