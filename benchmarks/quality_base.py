"""quality-base: how well the shipped ``shapes-sdxl`` follows prompts, read by the exact scene parser.

Generates ``--scenes`` captions of the scene language (one in three from the held-out combinations
never seen in training, 70% with a position phrase), one seed each, at the model's recorded
defaults (``deft.json``: steps and guidance), and reports the parser's accuracy for background
colour, foreground colour, shape, position (only where the prompt gives one) and all four, overall
and on seen vs held-out combinations, plus a PNG grid of the first 32 samples.

    python -m benchmarks quality-base [--scenes 480] [--model shapes-sdxl]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import RESULTS_DIR, markdown_table, run_suite, string_params
from deft_runtime.models import SHAPES_MODEL_DIR, SHAPES_MODEL_NAME, load_pipeline, shapes_defaults
from deft_runtime.scenes.language import caption
from deft_runtime.scenes.quality import ATTRIBUTES, evaluation_scenes, generate_images, score

TARGETS = {"background": 0.95, "foreground": 0.90, "shape": 0.85, "position": 0.90, "all": 0.75}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = shapes_defaults()
    parser = argparse.ArgumentParser(prog="python -m benchmarks quality-base", description=__doc__)
    parser.add_argument("--model", default=SHAPES_MODEL_NAME, help="shapes-sdxl or a diffusers directory")
    parser.add_argument("--scenes", type=int, default=480, help="prompts (each with its own seed)")
    parser.add_argument("--seed", type=int, default=0, help="scene list seed; image seeds are seed+i")
    parser.add_argument("--steps", type=int, default=int(defaults["num_inference_steps"]))
    parser.add_argument("--guidance", type=float, default=float(defaults["guidance_scale"]))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="report name (default quality-base)")
    return parser.parse_args(argv)


def save_grid(path: Path, images: list[np.ndarray], columns: int = 8) -> None:
    """Images in rows of ``columns``, shown at 2x with a 2 px white gutter."""
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    size, gutter = images[0].shape[0], 2
    canvas = np.full(
        (len(rows) * (size + gutter) + gutter, columns * (size + gutter) + gutter, 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = gutter + r * (size + gutter), gutter + c * (size + gutter)
            canvas[y : y + size, x : x + size] = image
    picture = Image.fromarray(canvas)
    picture.resize((picture.width * 2, picture.height * 2), Image.Resampling.NEAREST).save(path)


def measure(args: argparse.Namespace, grid_path: Path | None) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    scenes = evaluation_scenes(args.scenes, seed=args.seed)
    prompts = [caption(s) for s in scenes]
    seeds = [args.seed + i for i in range(len(scenes))]
    images = generate_images(pipe, prompts, seeds, steps=args.steps, guidance_scale=args.guidance)
    scores = score(scenes, images)
    if grid_path is not None:
        save_grid(grid_path, images[:32])
    return {"summary": scores.summary(), "targets": TARGETS, "rows": scores.rows}


def report(name: str, payload: dict[str, Any]) -> str:
    summary, params = payload["summary"], payload["params"]
    rows = [
        {
            "attribute": a,
            "all prompts": summary[a],
            "seen": summary[f"{a}_seen"],
            "held-out": summary[f"{a}_held_out"],
            "target": TARGETS[a],
        }
        for a in ATTRIBUTES
    ]
    gap = max(abs((summary[f"{a}_seen"] or 0.0) - (summary[f"{a}_held_out"] or 0.0)) for a in ATTRIBUTES)
    return (
        f"# {name}\n\n{summary['n']} prompts x 1 seed, model {params['model']}, "
        f"{params['steps']} steps, guidance {params['guidance']} (python {platform.python_version()})\n\n"
        + markdown_table(rows, ["attribute", "all prompts", "seen", "held-out", "target"])
        + f"\n\nlargest seen/held-out gap: {gap:.3f} (target <= 0.10). Position counts only prompts that name one.\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    name = args.out or "quality-base"
    grid = RESULTS_DIR / f"{name}-grid.png"
    return run_suite(
        "quality-base",
        name,
        lambda _workdir: measure(args, grid),
        machine=lambda: {"model_dir": str(SHAPES_MODEL_DIR), "threads": args.threads},
        params=string_params(args),
        report=report,
    )


if __name__ == "__main__":
    main()
