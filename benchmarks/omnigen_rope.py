"""omnigen-rope: what ``omnigen_exact_rope=False`` costs in fidelity and gains in batching.

diffusers' OmniGen applies the rotary positions of a batch's *first* row to every row, so an image
depends on what shares its forward. deft's default (``omnigen_exact_rope=True``) only batches requests
whose first-row positions agree, which keeps each image equal to ``OmniGenPipeline``'s; with variable-
length multimodal prompts (text, one image, two images) that splits the batch. This suite submits the
same mixed set of requests to two engines on ``tiny-omnigen`` (random weights, so the pixel error is a
property of the arithmetic, not of a trained model's image), one per setting, and reports per setting:
denoiser forwards, mean rows per forward, wall time, and each image's largest per-pixel error against
the pipeline run alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, run_suite, string_params
from deft_runtime.engine import Engine, EngineConfig, GenerationRequest
from deft_runtime.engine.observer import NullObserver
from deft_runtime.models import build_tiny_omnigen
from deft_runtime.pool import PoolConfig
from deft_runtime.runtime import MultiAdapterModel

PROMPTS = (
    ("a cat", 0),
    ("a red car on a long and winding road", 0),
    ("make <img><|image_1|></img> blue", 1),
    ("the dog in <img><|image_1|></img>, at night", 1),
    ("put <img><|image_2|></img> next to <img><|image_1|></img>", 2),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks omnigen-rope", description=__doc__)
    p.add_argument("--requests", type=int, default=10, help="requests per setting (prompts cycle)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--out", default="omnigen-rope")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def picture(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def requests(args: argparse.Namespace) -> list[GenerationRequest]:
    out = []
    for i in range(args.requests):
        prompt, images = PROMPTS[i % len(PROMPTS)]
        out.append(
            GenerationRequest(
                prompt,
                input_images=tuple(picture(10 * i + k, args.size) for k in range(images)),
                width=args.size,
                height=args.size,
                num_inference_steps=args.steps,
                seed=i,
            )
        )
    return out


def reference(request: GenerationRequest) -> np.ndarray:
    pipe = build_tiny_omnigen(0)
    assert request.seed is not None
    torch.manual_seed(request.seed)  # the pipeline samples input-image latents from the global generator
    images = list(request.input_images) or None
    out = pipe(
        request.prompt,
        input_images=images,
        width=request.width,
        height=request.height,
        num_inference_steps=request.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="np",
    ).images
    return np.asarray(out[0], dtype=np.float32)


class RowCounter(NullObserver):
    """Rows of every denoiser forward."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def on_forward(self, rows: int, distinct_adapters: int, seconds: float) -> None:
        self.rows.append(rows)


def run_setting(exact: bool, jobs: list[GenerationRequest], refs: list[np.ndarray]) -> dict[str, Any]:
    pipe = build_tiny_omnigen(0)
    model = MultiAdapterModel(
        pipe.transformer, pool_config=PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20), backend="torch"
    )
    counter = RowCounter()
    engine = Engine(pipe, model, EngineConfig(max_batch_rows=64, omnigen_exact_rope=exact), observer=counter)
    rows = counter.rows
    try:
        start = time.perf_counter()
        handles = [engine.submit(job) for job in jobs]
        results = [h.result(timeout=1800) for h in handles]
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    errors = [
        float(np.abs(np.asarray(r.images[0], dtype=np.float32) / 255.0 - ref).max())
        for r, ref in zip(results, refs, strict=True)
    ]
    return {
        "omnigen_exact_rope": exact,
        "forwards": len(rows),
        "rows_per_forward": sum(rows) / max(len(rows), 1),
        "seconds": seconds,
        "max_error_255": 255 * max(errors),
        "mean_error_255": 255 * sum(errors) / len(errors),
        "images_within_2_255": sum(e <= 2 / 255 for e in errors),
        "images": len(errors),
    }


def report(name: str, payload: dict[str, Any]) -> str:
    columns = [
        "omnigen_exact_rope",
        "forwards",
        "rows_per_forward",
        "seconds",
        "max_error_255",
        "mean_error_255",
        "images_within_2_255",
        "images",
    ]
    return f"## {name}\n\n{__doc__.split(chr(10))[0]}\n\n" + markdown_table(payload["settings"], columns)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    def measured(_: Path) -> dict[str, Any]:
        jobs = requests(args)
        refs = [reference(job) for job in jobs]
        return {"settings": [run_setting(exact, jobs, refs) for exact in (True, False)]}

    return run_suite(
        "omnigen-rope",
        args.out,
        measured,
        machine=lambda: machine_info(torch.device("cpu")),
        params=string_params(args),
        report=report,
        out_dir=args.results_dir,
    )


if __name__ == "__main__":
    main()
