"""OmniGen: text-to-image and multimodal prompts (``<img><|image_1|></img>``), as ``OmniGenPipeline``.

A request's rows are ``[cond × n, uncond × n]``, plus ``[image-cond × n]`` when it has input images
(the pipeline's image guidance); each row carries the VAE latents of the images its sequence contains.
Text-only and image-conditioned requests share forwards (see :meth:`OmniGenFamily.bucket`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

from deft_runtime.engine.conditioning import (
    OmniGenRows,
    check_omnigen_images,
    encode_batched,
    omnigen_rows,
    sample_row_latents,
)
from deft_runtime.engine.families import GenerationDefaults, ModelFamily, StepState
from deft_runtime.engine.types import GenerationRequest


class OmniGenFamily(ModelFamily):
    name = "omnigen"

    def __init__(
        self, pipe: Any, device: torch.device, dtype: torch.dtype, *, exact_rope: bool = True
    ) -> None:
        super().__init__(pipe, device, dtype)
        processor = pipe.multimodal_processor
        self.default_negative = inspect.signature(processor.__call__).parameters["negative_prompt"].default
        self.exact_rope = exact_rope

    def bucket(self, state: StepState) -> tuple[int, ...]:
        """diffusers' OmniGen rotary embedding takes the positions of the batch's *first* row for every
        row (``OmniGenSuScaledRotaryEmbedding``: ``emb = cat(freqs, freqs)[0]``). A request's own
        pipeline run therefore depends on its prompt's token count (input images' tokens included) and
        its padded sequence length; with ``exact_rope`` requests only share a forward when both agree,
        which keeps every image equal to ``OmniGenPipeline``'s. Without it they batch by shape alone
        (more batching, slightly different images for prompts of other lengths)."""
        shape = self.latent_shape(state.width, state.height)
        if not self.exact_rope:
            return shape
        rows: OmniGenRows = state.cond
        lengths = [len(r["input_ids"]) for r in rows.rows]
        return (*shape, lengths[0], max(lengths))

    def defaults(self) -> GenerationDefaults:
        size = int(self.pipe.default_sample_size * self.vae_scale)
        return GenerationDefaults(size, size, 50, 2.5)

    def check_conditioning(self, request: GenerationRequest) -> None:
        check_omnigen_images(request)

    def size_multiple(self) -> int:
        # the processor counts one output token per 16x16 pixels, and the transformer patchifies latents
        return max(16, self.vae_scale * int(self.pipe.transformer.config.patch_size))

    def uses_cfg(self, guidance_scale: float) -> bool:
        return True  # OmniGen's pipeline always runs the unconditional row

    def rows_for(self, request: GenerationRequest) -> int:
        return request.num_images * (3 if request.input_images else 2)

    def latent_channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels)

    def encode(self, states: Sequence[StepState]) -> None:
        processor = self.pipe.multimodal_processor
        pixels: list[list[torch.Tensor]] = []
        for s in states:
            req = s.request
            negative = req.negative_prompt if req.negative_prompt is not None else self.default_negative
            images = [processor.process_image(im) for im in req.input_images]
            s.cond = omnigen_rows(processor, req, negative, images or None)
            pixels.append(images)
        flat = [p.unsqueeze(0) for images in pixels for p in images]
        if not flat:
            return
        dists = iter(encode_batched(self.pipe.vae, flat))
        scale = float(self.pipe.vae.config.scaling_factor)
        for s, images in zip(states, pixels, strict=True):
            mine = [next(dists) for _ in images]
            if images:
                assert s.request.seed is not None
                generator = torch.Generator("cpu").manual_seed(s.request.seed)
                sample_row_latents(s.cond, images, mine, generator, lambda x: x * scale)

    def start(self, state: StepState) -> None:
        state.scheduler = self.new_scheduler()
        sigmas = np.linspace(1, 0, state.steps + 1)[: state.steps].tolist()
        state.timesteps, _ = retrieve_timesteps(state.scheduler, state.steps, self.device, sigmas=sigmas)
        state.latents = self.pipe.prepare_latents(
            state.num_images,
            self.latent_channels(),
            state.height,
            state.width,
            torch.float32,
            self.device,
            state.generator,
        )

    def denoiser_inputs(self, states: Sequence[StepState]) -> dict[str, Any]:
        mllm, sizes, latents, timesteps, image_latents = [], [], [], [], []
        for s in states:
            rows: OmniGenRows = s.cond
            mllm += rows.rows
            sizes += [[s.height, s.width]] * len(rows.rows)
            for found in rows.latents:
                image_latents += found
            copies = len(rows.rows) // s.num_images
            latents.append(torch.cat([s.latents] * copies))
            timesteps.append(s.timestep.reshape(1).expand(len(rows.rows)))
        collator = self.pipe.multimodal_processor.collator
        input_ids, position_ids, attention_mask, _, _, image_sizes = collator.process_mllm_input(mllm, sizes)
        dtype = self.pipe.transformer.dtype
        return {
            "hidden_states": torch.cat(latents).to(dtype),
            "timestep": torch.cat(timesteps).to(self.device),
            "input_ids": input_ids.to(self.device),
            "input_img_latents": [x.to(self.device) for x in image_latents],
            "input_image_sizes": image_sizes,
            "attention_mask": attention_mask.to(self.device),
            "position_ids": position_ids.to(self.device),
            "return_dict": False,
        }

    def guide(self, state: StepState, prediction: torch.Tensor) -> torch.Tensor:
        rows: OmniGenRows = state.cond
        if rows.conditioned:  # the pipeline's num_cfg == 2
            cond, uncond, image = prediction.chunk(3)
            g, ig = state.guidance_scale, rows.image_guidance_scale
            return uncond + ig * (image - uncond) + g * (cond - image)
        cond, uncond = prediction.chunk(2)
        return uncond + state.guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> list[Any]:
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return list(self.pipe.image_processor.postprocess(image, output_type="pil"))
