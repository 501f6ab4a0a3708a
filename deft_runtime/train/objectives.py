"""The base model's own training objective, per architecture.

Both return the per-sample MSE ``mean((pred − target)²)`` over ``[C, h, w]`` in float32; the loop
weights instance and class rows. ``x0`` are VAE latents (``latent_dist.sample · scaling_factor``).

SDXL (DDPM-style, the scheduler config's ``prediction_type``; the diffusers SDXL DreamBooth recipe)::

    t ~ U{0, …, T−1},  ε ~ N(0, I)
    x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε                       # DDPMScheduler.add_noise
    target = ε | v = √ᾱ_t · ε − √(1 − ᾱ_t) · x0 | x0       # epsilon | v_prediction | sample
    pred = unet(x_t, t, text embeddings of both encoders, pooled text embedding,
                time_ids = [orig_h, orig_w, crop_top, crop_left, res, res])

OmniGen (rectified flow matching, as the diffusers OmniGen/SD3 training scripts)::

    u ~ U(0, 1) or sigmoid(N(0, 1)) (logit-normal),  i = ⌊u·T⌋
    σ = sigmas[i],  t = timesteps[i] (= σ·T after the scheduler's shift)
    x_σ = (1 − σ) · x0 + σ · ε,   target = ε − x0          # the velocity FlowMatchEuler integrates
    pred = transformer(x_σ, t, input_ids / attention_mask / position_ids of the prompt, as the pipeline)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

from deft_runtime.train.config import TimestepSampling, TrainingInputError
from deft_runtime.train.data import Batch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Objective(Protocol):
    """What the loop needs from an architecture: prompts encoded once, then per-sample losses."""

    def prepare_prompts(self, prompts: Iterable[str]) -> None: ...

    def losses(self, latents: torch.Tensor, batch: Batch, generator: torch.Generator) -> torch.Tensor: ...


def encode_images(
    vae: Any, pixels: torch.Tensor, generator: torch.Generator, *, mean: bool = False
) -> torch.Tensor:
    """``x0 = (latent_dist.sample(generator) − shift) · scaling_factor`` (shift only if the VAE has one);
    ``mean``: the posterior mean instead of a sample (for a base trained on means, like shapes-sdxl)."""
    with torch.no_grad():
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        sample = posterior.mean if mean else posterior.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            sample = sample - shift
        return (sample * vae.config.scaling_factor).float()


def _mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().flatten(1).mean(dim=1)  # [b]


def _noise(latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(latents.shape, generator=generator).to(latents.device)


class DenoisingObjective:
    """SDXL: noise prediction (or v / sample prediction) with micro-conditioning (see module doc)."""

    def __init__(self, pipe: DiffusionPipeline) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = str(self.scheduler.config.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise TrainingInputError(
                f"the base's scheduler has prediction_type {self.prediction_type!r}; the trainer supports "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        self._embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare_prompts(self, prompts: Iterable[str]) -> None:
        """Encode each prompt once with both text encoders, as the pipeline does (no CFG)."""
        device = self.unet.device
        with torch.no_grad():
            for prompt in prompts:
                if prompt not in self._embeds:
                    embeds, _, pooled, _ = self.pipe.encode_prompt(
                        prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                    )
                    self._embeds[prompt] = (embeds, pooled)  # [1, L, D], [1, D_pooled]

    def _conditioning(self, batch: Batch, device: torch.device) -> dict[str, Any]:
        embeds = torch.cat([self._embeds[p][0] for p in batch.prompts]).to(device)
        pooled = torch.cat([self._embeds[p][1] for p in batch.prompts]).to(device)
        res_h, res_w = int(batch.pixels.shape[-2]), int(batch.pixels.shape[-1])
        time_ids = torch.tensor(
            [
                [*size, *origin, res_h, res_w]
                for size, origin in zip(batch.original_sizes, batch.crop_origins, strict=True)
            ],
            dtype=embeds.dtype,
            device=device,
        )
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return latents

    def losses(self, latents: torch.Tensor, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        noise = _noise(latents, generator)
        T = int(self.scheduler.config.num_train_timesteps)
        timesteps = torch.randint(0, T, (latents.shape[0],), generator=generator).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        cond = self._conditioning(batch, latents.device)
        pred = self.unet(noisy.to(self.unet.dtype), timesteps, return_dict=False, **cond)[0]
        return _mse_per_sample(pred, self.target(latents, noise, timesteps))


class FlowMatchingObjective:
    """OmniGen: rectified-flow velocity ``ε − x0`` (see module doc)."""

    def __init__(self, pipe: DiffusionPipeline, sampling: TimestepSampling = "logit_normal") -> None:
        self.transformer = pipe.transformer
        self.processor = pipe.multimodal_processor
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # fresh: T train steps
        self.sigmas = scheduler.sigmas.float()  # [T], descending from 1
        self.timesteps = scheduler.timesteps.float()  # [T]
        self.sampling = sampling
        self._tokens: dict[str, dict[str, Any]] = {}

    def prepare_prompts(self, prompts: Iterable[str]) -> None:
        """Tokenize each prompt once with the pipeline's processor (chat template included)."""
        for prompt in prompts:
            if prompt not in self._tokens:
                self._tokens[prompt] = self.processor.process_multi_modal_prompt(prompt, None)

    def _conditioning(self, batch: Batch, device: torch.device) -> dict[str, Any]:
        """Left-padded ids, OmniGen's causal/bidirectional mask and positions, as the pipeline's collator."""
        size = [int(batch.pixels.shape[-2]), int(batch.pixels.shape[-1])]
        inputs = [self._tokens[p] for p in batch.prompts]
        ids, positions, mask, *_ = self.processor.collator.process_mllm_input(inputs, [size] * batch.size)
        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "position_ids": positions.to(device),
            "input_img_latents": [],
            "input_image_sizes": {},
        }

    def _draw_u(self, count: int, generator: torch.Generator) -> torch.Tensor:
        if self.sampling == "logit_normal":
            return torch.sigmoid(torch.randn(count, generator=generator))
        return torch.rand(count, generator=generator)

    def losses(self, latents: torch.Tensor, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        noise = _noise(latents, generator)
        count = len(self.sigmas)
        index = (self._draw_u(latents.shape[0], generator) * count).long().clamp(max=count - 1)
        sigma = self.sigmas[index].to(latents.device).view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * latents + sigma * noise
        cond = self._conditioning(batch, latents.device)
        timestep = self.timesteps[index].to(latents.device)
        pred = self.transformer(
            hidden_states=noisy.to(self.transformer.dtype), timestep=timestep, return_dict=False, **cond
        )[0]
        return _mse_per_sample(pred, noise - latents)


def objective_for(pipe: DiffusionPipeline, architecture: str, sampling: TimestepSampling) -> Objective:
    if architecture == "sdxl":
        return DenoisingObjective(pipe)
    if architecture == "omnigen":
        return FlowMatchingObjective(pipe, sampling)
    raise TrainingInputError(f"the trainer supports SDXL and OmniGen bases; this one is {architecture}")
