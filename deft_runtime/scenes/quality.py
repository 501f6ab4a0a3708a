"""Prompt-following accuracy of a text-to-image pipeline on the scene language, read by the parser."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deft_runtime.scenes.language import Scene, caption, combination_is_held_out, sample_scene
from deft_runtime.scenes.parser import ParsedScene, parse_image

__all__ = ["QualityScores", "evaluate_pipeline", "evaluation_scenes", "generate_images", "score"]

ATTRIBUTES = ("background", "foreground", "shape", "position", "all")


def evaluation_scenes(count: int, seed: int = 0, held_out_every: int = 3) -> list[Scene]:
    """``count`` scenes; every ``held_out_every``-th from the held-out combinations, 70% with a position."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, held_out=i % held_out_every == 0) for i in range(count)]


@dataclass
class QualityScores:
    """Per-scene parser verdicts; ``summary()`` gives accuracies overall, on seen and on held-out combos."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, scene: Scene, parsed: ParsedScene) -> None:
        right = {
            "background": parsed.background == scene.background,
            "foreground": parsed.foreground == scene.foreground,
            "shape": parsed.shape == scene.shape,
            "position": parsed.position == scene.position if scene.prompted_position else None,
        }
        right["all"] = all(v for v in right.values() if v is not None)
        held = combination_is_held_out(*scene.combination)
        self.rows.append({"prompt": caption(scene), "held_out": held, "iou": parsed.iou, **right})

    def accuracy(self, attribute: str, held_out: bool | None = None) -> float | None:
        values = [
            r[attribute]
            for r in self.rows
            if r[attribute] is not None and (held_out is None or r["held_out"] == held_out)
        ]
        return round(sum(values) / len(values), 4) if values else None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(self.rows)}
        for attribute in ATTRIBUTES:
            out[attribute] = self.accuracy(attribute)
            out[f"{attribute}_seen"] = self.accuracy(attribute, held_out=False)
            out[f"{attribute}_held_out"] = self.accuracy(attribute, held_out=True)
        return out


@torch.no_grad()
def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    batch: int = 64,
) -> list[np.ndarray]:
    """``[64, 64, 3]`` uint8 images of ``pipe`` (a diffusers SDXL pipeline), one seeded generator per image."""
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch]]
        out = pipe(
            prompt=chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
        ).images
        images.extend(np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8))
    return images


def score(scenes: Sequence[Scene], images: Sequence[np.ndarray]) -> QualityScores:
    scores = QualityScores()
    for scene, image in zip(scenes, images, strict=True):
        scores.add(scene, parse_image(image))
    return scores


def evaluate_pipeline(
    pipe: Any, scenes: Sequence[Scene], *, steps: int, guidance_scale: float, seed: int = 0
) -> QualityScores:
    """Generate each scene's caption with seed ``seed + i`` and score what the parser reads."""
    prompts = [caption(s) for s in scenes]
    images = generate_images(
        pipe, prompts, [seed + i for i in range(len(scenes))], steps=steps, guidance_scale=guidance_scale
    )
    return score(scenes, images)
