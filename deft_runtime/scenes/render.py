"""Deterministic renderer of the scene language: exact geometry, 4x4 supersampled edges.

Every shape is defined by its bounding-box centre ``(cx, cy)`` and ``size``, the longer side of its
bounding box. A pixel's colour is ``background + coverage * (foreground - background)`` in sRGB,
where coverage is the fraction of its 16 subpixel centres inside the shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image

from deft_runtime.scenes.language import IMAGE_SIZE, PALETTE, POSITIONS, SHAPES, Scene

__all__ = [
    "SUPERSAMPLE",
    "coverage",
    "inside_polygon",
    "region_coverage",
    "render",
    "render_coverage",
    "render_image",
    "shape_outline",
]

SUPERSAMPLE = 4
Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (xs, ys) -> bool mask, broadcast
_STAR_INNER = 0.5  # inner radius / outer radius: chunkier than a pentagram so 20 px stars stay legible


def shape_outline(shape: str, size: float, cx: float, cy: float) -> np.ndarray:
    """Polygon vertices ``[n, 2]`` (x, y; y down) of a non-circle shape, bounding box centred at (cx, cy)."""
    half = size / 2
    if shape == "square":
        corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
    elif shape == "diamond":  # a square rotated 45 degrees whose bounding box side is ``size``
        corners = [(0.0, -half), (half, 0.0), (0.0, half), (-half, 0.0)]
    elif shape == "triangle":  # equilateral, apex up: width = size, height = size * sqrt(3) / 2
        h = size * math.sqrt(3) / 2
        corners = [(0.0, -h / 2), (half, h / 2), (-half, h / 2)]
    elif shape == "star":
        corners = _star_corners(size)
    else:
        raise ValueError(
            f"{shape!r} has no polygon outline; expected one of {[s for s in SHAPES if s != 'circle']}"
        )
    return np.asarray(corners, dtype=np.float64) + np.array([cx, cy])


def _star_corners(size: float) -> list[tuple[float, float]]:
    """Five points, one up; outer radius chosen so the bounding box width is ``size``, box centred."""
    outer = size / (2 * math.cos(math.radians(18)))
    y_shift = -(outer * math.cos(math.radians(36)) - outer) / 2  # move the box centre to the origin
    corners = []
    for k in range(10):
        radius = outer if k % 2 == 0 else outer * _STAR_INNER
        angle = math.radians(-90 + 36 * k)
        corners.append((radius * math.cos(angle), radius * math.sin(angle) + y_shift))
    return corners


def inside_polygon(xs: np.ndarray, ys: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over the sample grid."""
    inside = np.zeros(np.broadcast(xs, ys).shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > ys) != (y2 > ys)
        x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    return inside


@lru_cache(maxsize=2048)
def coverage(shape: str, size: float, cx: float, cy: float) -> np.ndarray:
    """``[64, 64]`` float32 in [0, 1]: the fraction of each pixel inside the shape (read-only, cached)."""
    out = render_coverage(shape, size, cx, cy)
    out.flags.writeable = False
    return out


def render_coverage(shape: str, size: float, cx: float, cy: float) -> np.ndarray:
    """:func:`coverage` without the cache (for one-off geometry such as the parser's templates)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    if shape == "circle":
        return region_coverage(
            lambda xs, ys: (xs - cx) ** 2 + (ys - cy) ** 2 <= (size / 2) ** 2, size, cx, cy
        )
    polygon = shape_outline(shape, size, cx, cy)
    return region_coverage(lambda xs, ys: inside_polygon(xs, ys, polygon), size, cx, cy)


def region_coverage(inside_fn: Inside, size: float, cx: float, cy: float) -> np.ndarray:
    """``[64, 64]`` coverage of the region ``inside(xs, ys)`` (subpixel-centre arrays, broadcast), which
    lies within ``size * 0.75`` of ``(cx, cy)``; the machinery every shape (and every concept) renders by."""
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    reach = size * 0.75 + 2  # the window holds the whole shape with a margin
    x0, x1 = max(0, math.floor(cx - reach)), min(IMAGE_SIZE, math.ceil(cx + reach))
    y0, y1 = max(0, math.floor(cy - reach)), min(IMAGE_SIZE, math.ceil(cy + reach))
    if x0 >= x1 or y0 >= y1:
        return out
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs = (np.arange(x0, x1)[:, None] + offsets).reshape(1, -1)  # subpixel centres, [1, W*S]
    ys = (np.arange(y0, y1)[:, None] + offsets).reshape(-1, 1)  # [H*S, 1]
    inside = np.broadcast_to(inside_fn(xs, ys), (ys.shape[0], xs.shape[1]))
    window = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = window
    return out


def render(scene: Scene) -> np.ndarray:
    """The scene as a ``[64, 64, 3]`` uint8 sRGB array."""
    cx, cy = POSITIONS[scene.position]
    alpha = coverage(scene.shape, float(scene.size), cx, cy)[:, :, None]
    fg = np.asarray(PALETTE[scene.foreground], dtype=np.float32)
    bg = np.asarray(PALETTE[scene.background], dtype=np.float32)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


def render_image(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene))
