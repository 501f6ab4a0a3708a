"""The scene language of ``shapes-sdxl``: palette, shapes, positions, captions and the held-out split.

One filled, flat-coloured, upright shape on a flat background, 64x64 RGB. Everything here is fixed:
the renderer, the parser, the training recipe, the tests and the quality benchmarks all read it,
so changing a value silently changes what every figure measures.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = [
    "IMAGE_SIZE",
    "MAX_SIZE",
    "MIN_SIZE",
    "PALETTE",
    "POSITIONS",
    "POSITION_PHRASES",
    "SHAPES",
    "Scene",
    "caption",
    "combination_is_held_out",
    "held_out_combinations",
    "parse_prompt",
    "sample_scene",
]

IMAGE_SIZE = 64
MIN_SIZE, MAX_SIZE = 20.0, 32.0  # side of the shape's bounding box (the longer one), in pixels

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
# Centre of the shape's bounding box, in continuous pixel coordinates (pixel i spans [i, i + 1)).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (18.0, 32.0),
    "right": (46.0, 32.0),
    "top": (32.0, 18.0),
    "bottom": (32.0, 46.0),
    "center": (32.0, 32.0),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
HELD_OUT_FRACTION = 0.1


@dataclass(frozen=True)
class Scene:
    """One scene. ``position`` is where the shape is; ``prompted_position`` whether the caption says so."""

    foreground: str
    shape: str
    background: str
    position: str = "center"
    size: float = 28.0
    prompted_position: bool = True

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.foreground, PALETTE, "foreground colour"),
            (self.background, PALETTE, "background colour"),
            (self.shape, SHAPES, "shape"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")
        if self.foreground == self.background:
            raise ValueError(f"foreground and background are both {self.foreground!r}; they must differ")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size {self.size} is outside [{MIN_SIZE}, {MAX_SIZE}] pixels")

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.foreground, self.shape, self.background)


def caption(scene: Scene) -> str:
    """``a {fg} {shape} on a {bg} background`` plus ``, {where}`` when the position is prompted."""
    text = f"a {scene.foreground} {scene.shape} on a {scene.background} background"
    return f"{text}, {POSITION_PHRASES[scene.position]}" if scene.prompted_position else text


_PROMPT = re.compile(r"^a (?P<fg>\w+) (?P<shape>\w+) on a (?P<bg>\w+) background(?:, (?P<where>[a-z ]+))?$")
_PHRASE_TO_POSITION = {phrase: name for name, phrase in POSITION_PHRASES.items()}


def parse_prompt(prompt: str) -> tuple[str, str, str, str | None]:
    """``(foreground, shape, background, position or None)`` of a prompt in the grammar; else ValueError."""
    match = _PROMPT.match(prompt.strip())
    if match is None:
        raise ValueError(f"{prompt!r} is not 'a {{colour}} {{shape}} on a {{colour}} background[, where]'")
    where = match["where"]
    if where is not None and where not in _PHRASE_TO_POSITION:
        raise ValueError(f"unknown position phrase {where!r}; expected one of {sorted(_PHRASE_TO_POSITION)}")
    position = _PHRASE_TO_POSITION[where] if where is not None else None
    return match["fg"], match["shape"], match["bg"], position


def _all_combinations() -> list[tuple[str, str, str]]:
    return [(fg, shape, bg) for fg in PALETTE for shape in SHAPES for bg in PALETTE if fg != bg]


@cache
def held_out_combinations() -> frozenset[tuple[str, str, str]]:
    """The fixed 10% of (foreground, shape, background) combinations never shown in training.

    Chosen by SHA-256 of the combination's name, so the split never depends on a library's RNG.
    """
    combos = _all_combinations()
    ranked = sorted(combos, key=lambda c: hashlib.sha256(" ".join(c).encode()).hexdigest())
    return frozenset(ranked[: round(HELD_OUT_FRACTION * len(combos))])


def combination_is_held_out(foreground: str, shape: str, background: str) -> bool:
    return (foreground, shape, background) in held_out_combinations()


def sample_scene(
    rng: np.random.Generator,
    *,
    held_out: bool | None = False,
    position_probability: float = 0.7,
    size_step: float = 0.25,
) -> Scene:
    """A random scene; ``held_out`` True/False restricts to that split, None draws from all.

    Sizes are drawn on a ``size_step`` grid so the renderer's geometry cache is reused.
    """
    combos = [
        c for c in _all_combinations() if held_out is None or (c in held_out_combinations()) == held_out
    ]
    fg, shape, bg = combos[int(rng.integers(len(combos)))]
    steps = round((MAX_SIZE - MIN_SIZE) / size_step)
    return Scene(
        foreground=fg,
        shape=shape,
        background=bg,
        position=list(POSITIONS)[int(rng.integers(len(POSITIONS)))],
        size=MIN_SIZE + size_step * int(rng.integers(steps + 1)),
        prompted_position=bool(rng.random() < position_probability),
    )
