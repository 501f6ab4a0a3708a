"""Image-conditioned requests: SDXL img2img and inpainting, OmniGen's multimodal prompts.

Each request's input images are prepared as its diffusers pipeline prepares them (the pipelines' own
``image_processor`` / ``mask_processor`` / OmniGen processor), VAE-encoded in batches at admission (one
encoder forward per image size for every admitted request), and then *sampled* from the encoder's
distribution per request, with the generator and in the order the pipeline uses, so each image equals
the pipeline's:

- SDXL img2img (``StableDiffusionXLImg2ImgPipeline``): the request's generator draws the image
  latents' sample, then the noise; the latents start as the encoded image noised to the first of the
  last ``int(steps × strength)`` timesteps.
- SDXL inpainting with a standard UNet (``StableDiffusionXLInpaintPipeline``, 4 input channels): the
  generator draws the image sample, the noise, then the (for a 4-channel UNet unused) masked-image
  sample, which is drawn but not encoded; after every step the kept region is reset to the image
  latents noised to the next timestep.
- OmniGen (``OmniGenPipeline``) samples input-image latents from torch's *global* generator, once per
  occurrence of an image in the batch's rows; deft draws them, in the same order, from a generator
  seeded with the request's seed: equal to the pipeline called right after ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from deft_runtime.engine.types import GenerationRequest
from deft_runtime.errors import InvalidRequest

#: diffusers' defaults when a request leaves ``strength`` out
IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.3, 0.9999
#: OmniGen's default ``img_guidance_scale``
OMNIGEN_IMAGE_GUIDANCE = 1.6
_PLACEHOLDER = re.compile(r"<\|image_(\d+)\|>")


@dataclass
class SourceImage:
    """An SDXL request's input image (img2img when ``mask`` is None, else inpainting)."""

    pixels: torch.Tensor  # [1, 3, H, W] in [-1, 1], as the pipeline preprocesses it
    strength: float
    mask: torch.Tensor | None = None  # [1, 1, H, W], binarised (1 = repaint)
    dist: DiagonalGaussianDistribution | None = None  # the VAE encoder's output (set at admission)
    image_latents: torch.Tensor | None = None  # inpainting: the kept region's clean latents [n, c, h, w]
    noise: torch.Tensor | None = None  # inpainting: the noise the kept region is re-noised with
    latent_mask: torch.Tensor | None = None  # inpainting: ``mask`` at latent resolution [n, 1, h, w]

    @property
    def inpainting(self) -> bool:
        return self.mask is not None


def sdxl_default_size(request: GenerationRequest, vae_scale: int) -> tuple[int, int] | None:
    """img2img and inpainting default to the input image's size, rounded down to the VAE's multiple
    (``VaeImageProcessor.get_default_height_width``); None for text-to-image."""
    if not request.input_images:
        return None
    width, height = request.input_images[0].size
    return width - width % vae_scale, height - height % vae_scale


def check_sdxl_images(request: GenerationRequest, steps: int, unet_channels: int) -> None:
    images = request.input_images
    if not images:
        return
    if len(images) > 1:
        raise InvalidRequest(
            f"SDXL takes one input image (img2img, or inpainting with mask_image), got {len(images)}"
        )
    if request.image_guidance_scale is not None:
        raise InvalidRequest("image_guidance_scale applies to OmniGen models; leave it out for SDXL")
    mask = request.mask_image
    if mask is not None and mask.size != images[0].size:
        raise InvalidRequest(
            f"mask_image is {mask.size[0]}x{mask.size[1]} but the input image is "
            f"{images[0].size[0]}x{images[0].size[1]}; send a mask of the image's size"
        )
    if mask is not None and unet_channels != 4:
        raise InvalidRequest(
            f"inpainting blends masked latents with a standard 4-channel UNet; this model's UNet has "
            f"{unet_channels} input channels"
        )
    strength = sdxl_strength(request)
    if int(steps * strength) < 1:
        raise InvalidRequest(
            f"strength {strength:g} of {steps} steps runs no step (int(steps x strength) = 0); "
            "raise num_inference_steps or strength"
        )


def sdxl_strength(request: GenerationRequest) -> float:
    if request.strength is not None:
        return request.strength
    return INPAINT_STRENGTH if request.mask_image is not None else IMG2IMG_STRENGTH


def sdxl_source(
    request: GenerationRequest, width: int, height: int, images: VaeImageProcessor, masks: VaeImageProcessor
) -> SourceImage | None:
    """The request's preprocessed input image and mask (resized to the request's size), or None."""
    if not request.input_images:
        return None
    pixels = images.preprocess(request.input_images[0], height=height, width=width).to(torch.float32)
    mask = None
    if request.mask_image is not None:
        mask = masks.preprocess(request.mask_image, height=height, width=width)
    return SourceImage(pixels, sdxl_strength(request), mask)


def encode_batched(vae: Any, pixels: Sequence[torch.Tensor]) -> list[DiagonalGaussianDistribution]:
    """The VAE encoder's distribution of each ``[1, 3, H, W]`` image: one forward per image size."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixels):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    dists: list[DiagonalGaussianDistribution | None] = [None] * len(pixels)
    dtype, device = vae.dtype, vae.device
    for indices in by_shape.values():
        batch = torch.cat([pixels[i] for i in indices]).to(device=device, dtype=dtype)
        moments = vae.encode(batch).latent_dist.parameters
        for row, i in enumerate(indices):
            dists[i] = DiagonalGaussianDistribution(moments[row : row + 1])
    return [d for d in dists if d is not None]


def timesteps_from(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The last ``int(steps × strength)`` timesteps (the pipelines' ``get_timesteps``); sets the
    scheduler's begin index to the first of them."""
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps: torch.Tensor = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


# ---- OmniGen


def placeholder_ids(prompt: str) -> list[int]:
    """The image indices a prompt references, in order (``<img><|image_2|></img>`` → 2)."""
    return [int(m) for m in _PLACEHOLDER.findall(prompt)]


def check_omnigen_images(request: GenerationRequest) -> None:
    if request.mask_image is not None:
        raise InvalidRequest(
            "OmniGen has no inpainting mask; describe the edit in the prompt and reference the image "
            "as <img><|image_1|></img>"
        )
    if request.strength is not None:
        raise InvalidRequest("strength applies to SDXL img2img and inpainting; leave it out for OmniGen")
    ids, count = placeholder_ids(request.prompt), len(request.input_images)
    wanted = sorted(set(ids))
    if wanted != list(range(1, count + 1)):
        shown = ", ".join(f"<img><|image_{i}|></img>" for i in wanted) or "none"
        raise InvalidRequest(
            f"the prompt references images {shown} but {count} input image(s) were sent; reference "
            "each input image once or more as <img><|image_1|></img>, <img><|image_2|></img>, ... "
            "in the prompt (indices from 1, none skipped)"
        )
    if request.image_guidance_scale is not None and not count:
        raise InvalidRequest("image_guidance_scale applies to requests with input images")


@dataclass
class OmniGenRows:
    """An OmniGen request's rows as its pipeline lays them out: ``[cond × n, uncond × n]`` plus
    ``[image-cond × n]`` with input images; per row, the VAE latents of the images it contains."""

    rows: list[dict[str, Any]]
    latents: list[list[torch.Tensor]] = field(default_factory=list)
    image_guidance_scale: float = OMNIGEN_IMAGE_GUIDANCE

    @property
    def conditioned(self) -> bool:
        return len(self.rows) > 0 and any(r["pixel_values"] is not None for r in self.rows)


def omnigen_rows(
    processor: Any, request: GenerationRequest, negative: str, images: list[torch.Tensor] | None
) -> OmniGenRows:
    """The processor's inputs for each row of the request (``OmniGenMultiModalProcessor.__call__``)."""
    n = request.num_images
    cond = processor.process_multi_modal_prompt(request.prompt, images)
    uncond = processor.process_multi_modal_prompt(negative, None)
    rows = [cond] * n + [uncond] * n
    if images:
        tags = " ".join(f"<img><|image_{i + 1}|></img>" for i in range(len(images)))
        rows += [processor.process_multi_modal_prompt(tags, images)] * n
    guidance = request.image_guidance_scale
    return OmniGenRows(rows, image_guidance_scale=OMNIGEN_IMAGE_GUIDANCE if guidance is None else guidance)


def sample_row_latents(
    state_rows: OmniGenRows,
    images: list[torch.Tensor],
    dists: list[DiagonalGaussianDistribution],
    generator: torch.Generator,
    scale: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """One latent sample per image occurrence, row by row (the pipeline's ``encode_input_images``)."""
    for row in state_rows.rows:
        found = []
        for pixels in row["pixel_values"] or []:
            index = next(i for i, im in enumerate(images) if im is pixels)
            found.append(scale(dists[index].sample(generator=generator)))
        state_rows.latents.append(found)
