"""How well an adapter learned a concept, read by the exact parser: fidelity, prompt following, prior.

- **concept fidelity**: soft IoU of the generated foreground with the concept's own template
  (:func:`deft_runtime.scenes.concepts.read_concept`), the analogue of CLIP-I / DINO;
- **prompt following**: prompted foreground and background colours (and the position, when the
  prompt names one) right, in contexts (colour pairs, positions) the training images never showed:
  the analogue of CLIP-T;
- **prior preservation**: the base model's "all four right" accuracy on prompts without the trigger.

All three are fractions or IoUs in [0, 1].
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deft_runtime.adapter import Adapter
from deft_runtime.scenes.concepts import (
    ConceptScene,
    concept_caption,
    instance_scenes,
    read_concept,
)
from deft_runtime.scenes.language import PALETTE, POSITIONS
from deft_runtime.scenes.quality import evaluation_scenes, generate_images, score

__all__ = ["ConceptScores", "adapted", "concept_contexts", "evaluate_concept", "evaluate_prior"]


def concept_contexts(name: str, count: int, seed: int = 0, instance_seed: int = 0) -> list[ConceptScene]:
    """``count`` prompts of concept ``name`` in new contexts: colour pairs none of its training images
    has, two in three with a position phrase (positions cycled), size 28."""
    seen = {(s.foreground, s.background) for s in instance_scenes(name, seed=instance_seed)}
    pairs = [(fg, bg) for fg in PALETTE for bg in PALETTE if fg != bg and (fg, bg) not in seen]
    rng = np.random.default_rng([seed, 17])
    order = rng.permutation(len(pairs))
    positions = list(POSITIONS)
    return [
        ConceptScene(
            name,
            *pairs[int(order[i % len(pairs)])],
            position=positions[i % len(positions)],
            prompted_position=i % 3 != 2,
        )
        for i in range(count)
    ]


@dataclass
class ConceptScores:
    """Per-prompt verdicts of one concept; :meth:`summary` gives the three metrics."""

    rows: list[dict[str, Any]]

    def summary(self) -> dict[str, float]:
        def mean(key: str) -> float:
            values = [float(r[key]) for r in self.rows if r[key] is not None]
            return round(sum(values) / len(values), 4) if values else 0.0

        return {
            "fidelity": mean("iou"),
            "recognised": mean("recognised"),
            "prompt_following": mean("following"),
            "colours": mean("colours"),
            "position": mean("position"),
        }


def score_concept(scenes: Sequence[ConceptScene], images: Sequence[np.ndarray]) -> ConceptScores:
    rows = []
    for scene, image in zip(scenes, images, strict=True):
        read = read_concept(image, scene.concept)
        colours = read.background == scene.background and read.foreground == scene.foreground
        position = read.position == scene.position if scene.prompted_position else None
        rows.append(
            {
                "prompt": concept_caption(scene),
                "iou": read.iou,
                "recognised": read.recognised,
                "base_shape": read.base_shape,
                "colours": colours,
                "position": position,
                "following": colours and position is not False,
            }
        )
    return ConceptScores(rows)


def evaluate_concept(
    pipe: Any,
    scenes: Sequence[ConceptScene],
    *,
    steps: int,
    guidance_scale: float,
    seed: int = 0,
) -> tuple[ConceptScores, list[np.ndarray]]:
    """Generate each concept prompt (seed ``seed + i``) and score it; also returns the images."""
    prompts = [concept_caption(s) for s in scenes]
    seeds = [seed + i for i in range(len(scenes))]
    images = generate_images(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    return score_concept(scenes, images), images


def evaluate_prior(pipe: Any, count: int, *, steps: int, guidance_scale: float, seed: int = 0) -> float:
    """The parser's "all four right" accuracy on ``count`` base prompts (no trigger)."""
    scenes = evaluation_scenes(count, seed=seed)
    from deft_runtime.scenes.language import caption

    images = generate_images(
        pipe,
        [caption(s) for s in scenes],
        [seed + i for i in range(count)],
        steps=steps,
        guidance_scale=guidance_scale,
    )
    return float(score(scenes, images).accuracy("all") or 0.0)


@contextlib.contextmanager
def adapted(pipe: Any, adapter: Adapter) -> Iterator[Any]:
    """``pipe`` with ``adapter`` merged into a copy of its UNet (``W0 + B·A``) for the block."""
    from deft_runtime.compile import compile_adapter, linear_weights, merge_into
    from deft_runtime.train.sampling import swapped_denoiser

    unet = copy.deepcopy(pipe.unet)
    compiled = compile_adapter(adapter, linear_weights(unet, list(adapter.layers)))
    with swapped_denoiser(pipe, merge_into(unet, compiled).eval()) as swapped:
        yield swapped
