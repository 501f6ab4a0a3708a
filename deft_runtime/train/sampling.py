"""Images from the diffusers pipeline: class images for prior preservation, validation samples.

Validation runs the pipeline on a *merged copy* of the denoiser (``W0 + B·A`` through
:func:`deft_runtime.compile.merge_into`), so samples show the compiled adapter, not the training
modules; the copy costs one extra denoiser in memory for the duration of the sampling.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image
from torch import nn

from deft_runtime.compile import compile_adapter, merge_into
from deft_runtime.models import denoiser_of
from deft_runtime.train.config import PriorPreservation
from deft_runtime.train.data import IMAGE_SUFFIXES, derive_seed
from deft_runtime.train.modules import TrainableAdapter


def generate_images(
    pipe: DiffusionPipeline, prompt: str, seeds: Sequence[int], resolution: int, steps: int
) -> list[Image.Image]:
    """One image per seed (a CPU generator each, so images do not depend on the batch or device)."""
    call = cast(
        Callable[..., Any], pipe
    )  # every diffusers pipeline defines __call__; the base class does not
    images = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            out = call(
                prompt=prompt,
                height=resolution,
                width=resolution,
                num_inference_steps=steps,
                generator=generator,
            )
        images.append(out.images[0])
    return images


def ensure_class_images(pipe: DiffusionPipeline, prior: PriorPreservation, resolution: int, seed: int) -> int:
    """Generate ``class-NNNNN.png`` until ``prior.class_dir`` holds ``num_images`` images; return how many
    were made. Image ``i`` always uses the seed ``derive_seed(seed, "class-image", i)``."""
    prior.class_dir.mkdir(parents=True, exist_ok=True)
    existing = [p for p in prior.class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    missing = prior.num_images - len(existing)
    made = 0
    index = 0
    while made < missing:
        path = prior.class_dir / f"class-{index:05d}.png"
        if not path.exists():
            seeds = [derive_seed(seed, "class-image", index)]
            generate_images(pipe, prior.class_prompt, seeds, resolution, prior.generation_steps)[0].save(path)
            made += 1
        index += 1
    return made


@contextlib.contextmanager
def swapped_denoiser(pipe: DiffusionPipeline, denoiser: nn.Module) -> Iterator[DiffusionPipeline]:
    """``pipe`` with ``denoiser`` in place of its own for the duration of the block."""
    attribute = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    original = denoiser_of(pipe)
    setattr(pipe, attribute, denoiser)
    try:
        yield pipe
    finally:
        setattr(pipe, attribute, original)


def merged_denoiser(adapter: TrainableAdapter) -> nn.Module:
    """A copy of the base denoiser with the current adapter merged in (``W0 + B·A``), in eval mode."""
    compiled = compile_adapter(adapter.to_adapter(), adapter.base_weights())
    with adapter.detached() as base:
        merged = copy.deepcopy(base)
    return merge_into(merged, compiled).eval()


def sample_validation(
    pipe: DiffusionPipeline,
    adapter: TrainableAdapter,
    prompt: str,
    seeds: Sequence[int],
    resolution: int,
    steps: int,
    directory: Path,
    stem: str,
) -> list[Path]:
    """Write ``<stem>-<i>.png`` images of ``prompt`` from the merged adapter into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with swapped_denoiser(pipe, merged_denoiser(adapter)):
        images = generate_images(pipe, prompt, seeds, resolution, steps)
    paths = []
    for i, image in enumerate(images):
        paths.append(directory / f"{stem}-{i}.png")
        image.save(paths[-1])
    return paths
