"""Procedural scenes for ``shapes-sdxl``: the scene language, its renderer and its exact parser.

The language (one flat shape on a flat background, 64x64) is what the ``shapes-sdxl`` base model is
trained on; the parser is the non-learned metric its quality benchmarks are measured with.
"""

from deft_runtime.scenes.language import (
    PALETTE,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    Scene,
    caption,
    combination_is_held_out,
    held_out_combinations,
    parse_prompt,
    sample_scene,
)
from deft_runtime.scenes.parser import ParsedScene, parse_image
from deft_runtime.scenes.render import coverage, render, render_image

__all__ = [
    "PALETTE",
    "POSITIONS",
    "POSITION_PHRASES",
    "SHAPES",
    "ParsedScene",
    "Scene",
    "caption",
    "combination_is_held_out",
    "coverage",
    "held_out_combinations",
    "parse_image",
    "parse_prompt",
    "render",
    "render_image",
    "sample_scene",
]
