"""New shapes for personalisation: concepts ``shapes-sdxl`` never saw, their templates and datasets.

Each concept (``heart``, ``ring``, ``crescent``, ``cross``) follows the scene language's rules: one
flat, upright shape whose bounding box's longer side is ``size`` (20-32 px) centred at a named
position, rendered with the renderer's own supersampling (:func:`region_coverage`) and palette. The
parser's template fit (:func:`deft_runtime.scenes.parser.fit_template`) then measures a generated
image against the concept's own template (*concept fidelity*), and its colour reading says whether
the prompted colours came out.

A concept dataset is ``count`` rendered images captioned ``a {colour} sks on a {colour} background,
{where}`` (a ``.txt`` beside each image, which ``deft train`` reads), plus class images for prior
preservation: rendered base scenes with their own captions::

    python -m deft_runtime.scenes.concepts heart --out data/heart --class-out data/shapes
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from deft_runtime.scenes.language import PALETTE, POSITION_PHRASES, POSITIONS, SHAPES, Scene, caption
from deft_runtime.scenes.language import sample_scene as sample_base_scene
from deft_runtime.scenes.parser import fit_template, nearest_position, read_foreground
from deft_runtime.scenes.render import inside_polygon, region_coverage, render

__all__ = [
    "CONCEPTS",
    "TRIGGER",
    "ConceptReading",
    "ConceptScene",
    "concept_caption",
    "concept_coverage",
    "instance_scenes",
    "read_concept",
    "render_concept",
    "write_class_images",
    "write_concept_dataset",
]

TRIGGER = "sks"
_ARC_POINTS = 96  # vertices per full circle of a curved outline


def _circle(radius: float, cx: float = 0.0, cy: float = 0.0, reverse: bool = False) -> np.ndarray:
    angles = np.linspace(0.0, 2 * math.pi, _ARC_POINTS, endpoint=False)
    if reverse:
        angles = angles[::-1]
    return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)


def _heart() -> list[np.ndarray]:
    t = np.linspace(0.0, 2 * math.pi, 2 * _ARC_POINTS, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y down: lobes up
    return [np.stack([x, y], axis=1)]


def _ring() -> list[np.ndarray]:
    return [_circle(1.0), _circle(0.5, reverse=True)]  # the hole's diameter is half the ring's


def _crescent(offset: float = 0.7) -> list[np.ndarray]:
    """A unit disc minus an equal disc shifted up by ``offset``: horns up, symmetric left-right (the
    parser's template fit assumes the centroid is on the box's vertical axis)."""
    half_chord = math.sqrt(1 - (offset / 2) ** 2)
    outer_start = math.atan2(half_chord, offset / 2)
    outer = np.linspace(outer_start, 2 * math.pi - outer_start, _ARC_POINTS)
    inner_start = math.atan2(half_chord, -offset / 2)
    inner = np.linspace(2 * math.pi - inner_start, inner_start, _ARC_POINTS // 2)
    xs = np.concatenate([np.cos(outer), offset + np.cos(inner)])
    ys = np.concatenate([np.sin(outer), np.sin(inner)])
    return [np.stack([ys, -xs], axis=1)]  # turned a quarter: the cut side faces up


def _cross(arm: float = 1 / 3) -> list[np.ndarray]:
    """A plus sign: two bars of width ``arm`` (of the size) crossing at the centre."""
    a, b = arm / 2, 0.5
    corners = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a)]
    return [np.asarray([*corners, (-b, -a), (-a, -a)])]


def _normalised(loops: list[np.ndarray]) -> np.ndarray:
    """The loops scaled so the bounding box's longer side is 1 and centred at the origin, joined into
    one vertex list for the even-odd test (each loop closed, so the bridges between loops cancel)."""
    points = np.concatenate(loops)
    low, high = points.min(axis=0), points.max(axis=0)
    centre, side = (low + high) / 2, float((high - low).max())
    return (np.concatenate([np.vstack([loop, loop[:1]]) for loop in loops]) - centre) / side


_OUTLINES: dict[str, Callable[[], list[np.ndarray]]] = {
    "heart": _heart,
    "ring": _ring,
    "crescent": _crescent,
    "cross": _cross,
}
CONCEPTS: tuple[str, ...] = tuple(_OUTLINES)


@cache
def _unit_outline(name: str) -> np.ndarray:
    if name not in _OUTLINES:
        raise ValueError(f"unknown concept {name!r}; expected one of {list(CONCEPTS)}")
    return _normalised(_OUTLINES[name]())


def concept_coverage(name: str, size: float, cx: float, cy: float) -> np.ndarray:
    """``[64, 64]`` coverage of concept ``name``: bounding box's longer side ``size``, centred at (cx, cy)."""
    polygon = _unit_outline(name) * size + np.array([cx, cy])
    return region_coverage(lambda xs, ys: inside_polygon(xs, ys, polygon), size, cx, cy)


@cache
def concept_moments(name: str) -> tuple[float, float]:
    """(area, centroid y offset from the box centre) at size 1, measured on a 32 px rendering."""
    size, centre = 32.0, 32.0
    mask = concept_coverage(name, size, centre, centre).astype(np.float64)
    ys = np.arange(mask.shape[0])[:, None] + 0.5
    return float(mask.sum()) / size**2, (float((mask * ys).sum() / mask.sum()) - centre) / size


@dataclass(frozen=True)
class ConceptScene:
    """One image of a concept: like :class:`Scene`, with a concept instead of a base shape."""

    concept: str
    foreground: str
    background: str
    position: str = "center"
    size: float = 28.0
    prompted_position: bool = True

    def __post_init__(self) -> None:
        _unit_outline(self.concept)  # raises for an unknown concept
        Scene(self.foreground, SHAPES[0], self.background, self.position, self.size)  # the same checks


def concept_caption(scene: ConceptScene, trigger: str = TRIGGER) -> str:
    """``a {fg} sks on a {bg} background`` plus ``, {where}`` when the position is prompted."""
    text = f"a {scene.foreground} {trigger} on a {scene.background} background"
    return f"{text}, {POSITION_PHRASES[scene.position]}" if scene.prompted_position else text


def render_concept(scene: ConceptScene) -> np.ndarray:
    """The concept scene as a ``[64, 64, 3]`` uint8 sRGB array (the renderer's colour rule)."""
    alpha = concept_coverage(scene.concept, scene.size, *POSITIONS[scene.position])[:, :, None]
    fg = np.asarray(PALETTE[scene.foreground], dtype=np.float32)
    bg = np.asarray(PALETTE[scene.background], dtype=np.float32)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


@dataclass(frozen=True)
class ConceptReading:
    """What the parser reads in an image, measured against one concept's template."""

    background: str
    foreground: str | None
    iou: float  # soft IoU of the foreground mask with the concept's fitted template (0: no foreground)
    base_iou: float  # the best soft IoU of any base shape's template
    base_shape: str | None  # which base shape that is
    position: str | None  # nearest named position to the fitted concept's box centre

    @property
    def recognised(self) -> bool:
        """The concept's template fits better than every base shape's."""
        return self.iou > self.base_iou


def read_concept(image: Image.Image | np.ndarray, name: str) -> ConceptReading:
    """Parse ``image`` with the exact parser, fitting concept ``name``'s template to its mask."""
    from deft_runtime.scenes.parser import parse_image

    background, foreground, mask = read_foreground(image)
    if mask is None:
        return ConceptReading(background, None, 0.0, 0.0, None, None)
    iou, centre = fit_template(mask, lambda s, x, y: concept_coverage(name, s, x, y), concept_moments(name))
    parsed = parse_image(image)
    return ConceptReading(background, foreground, iou, parsed.iou, parsed.shape, nearest_position(centre))


# ------------------------------------------------------------------------------------------ datasets


def _colour_pairs(
    rng: np.random.Generator, count: int, avoid: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    pairs = [(fg, bg) for fg in PALETTE for bg in PALETTE if fg != bg and (fg, bg) not in avoid]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    return [pairs[int(i)] for i in chosen]


def instance_scenes(name: str, count: int = 5, seed: int = 0) -> list[ConceptScene]:
    """``count`` training images of concept ``name``: distinct colour pairs, positions cycled, sizes 24-30."""
    rng = np.random.default_rng([seed, CONCEPTS.index(name) if name in CONCEPTS else 0])
    positions = list(POSITIONS)
    return [
        ConceptScene(name, fg, bg, positions[i % len(positions)], 24.0 + 0.5 * int(rng.integers(13)))
        for i, (fg, bg) in enumerate(_colour_pairs(rng, count))
    ]


def write_concept_dataset(name: str, out: Path, count: int = 5, seed: int = 0) -> list[Path]:
    """``out/{name}-{i}.png`` with its caption in ``out/{name}-{i}.txt``; returns the image paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(instance_scenes(name, count, seed)):
        path = out / f"{name}-{i}.png"
        Image.fromarray(render_concept(scene)).save(path)
        path.with_suffix(".txt").write_text(concept_caption(scene) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def write_class_images(out: Path, count: int = 50, seed: int = 0) -> list[Path]:
    """``count`` rendered base scenes with their captions: class images for prior preservation."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    paths = []
    for i in range(count):
        scene = sample_base_scene(rng, held_out=False)
        path = out / f"class-{i:05d}.png"
        Image.fromarray(render(scene)).save(path)
        path.with_suffix(".txt").write_text(caption(scene) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deft_runtime.scenes.concepts",
        description="Render a new shape's training images (captioned 'a {colour} sks on a {colour} "
        "background, {where}') and, with --class-out, class images for prior preservation.",
    )
    parser.add_argument("concept", choices=CONCEPTS)
    parser.add_argument("--out", type=Path, required=True, help="folder for the instance images")
    parser.add_argument("--count", type=int, default=5, help="instance images (default 5)")
    parser.add_argument("--class-out", type=Path, default=None, help="folder for rendered class images")
    parser.add_argument("--class-images", type=int, default=50, help="class images (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count < 1 or args.class_images < 1:
        parser.error("--count and --class-images must be at least 1")
    written = write_concept_dataset(args.concept, args.out, args.count, args.seed)
    print(f"wrote {len(written)} images of {args.concept!r} with captions to {args.out}")
    if args.class_out is not None:
        classes = write_class_images(args.class_out, args.class_images, args.seed)
        print(f"wrote {len(classes)} class images with captions to {args.class_out}")


if __name__ == "__main__":
    main()
