"""What differs between architectures: prompt encoding, latents, denoiser inputs, guidance, decoding.

Each family reuses its diffusers pipeline's own helpers (``encode_prompt``, ``_get_add_time_ids``,
``prepare_extra_step_kwargs``, the OmniGen processor and collator, ``retrieve_timesteps``,
``image_processor.postprocess``) so that, per request, the engine computes exactly what the pipeline
computes; only the batching across requests is ours. Rows of one request are laid out like the
pipeline lays them out (SDXL: ``[uncond × n, cond × n]``; OmniGen: ``[cond × n, uncond × n]``).
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from deft_runtime.engine.batched_steps import batchable, dpm_solver_step
from deft_runtime.engine.conditioning import (
    SourceImage,
    check_sdxl_images,
    encode_batched,
    sdxl_default_size,
    sdxl_source,
    timesteps_from,
)
from deft_runtime.engine.types import GenerationRequest
from deft_runtime.errors import InvalidRequest


@dataclass
class StepState:
    """The per-request tensors a family reads and writes (owned by the engine's request state)."""

    request: GenerationRequest
    width: int
    height: int
    steps: int
    guidance_scale: float
    generator: torch.Generator
    scheduler: Any = None
    timesteps: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    step_index: int = 0
    latents: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    cond: Any = None  # family-specific conditioning
    source: Any = None  # family-specific input-image state (img2img, inpainting)
    last_x0: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return self.request.num_images

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.step_index]


@dataclass(frozen=True)
class GenerationDefaults:
    """A base model's defaults for what a request leaves out."""

    width: int
    height: int
    steps: int
    guidance_scale: float

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``width, height, steps, guidance_scale`` (callers written for the old tuple)."""
        return iter((self.width, self.height, self.steps, self.guidance_scale))


class ModelFamily(ABC):
    """One diffusers pipeline family served by the engine."""

    name: str
    #: every tensor of :meth:`denoiser_inputs` whose first dimension is the row count is per row, so a
    #: forward can be padded with copies of its last row (bucketed compiled batches)
    rows_paddable: bool = False

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.vae_scale = int(pipe.vae_scale_factor)

    # ---- defaults and validation
    @abstractmethod
    def defaults(self) -> GenerationDefaults:
        """What the pipeline uses when the request leaves width, height, steps or guidance out."""

    def size_multiple(self) -> int:
        return self.vae_scale

    def check_size(self, width: int, height: int) -> None:
        m = self.size_multiple()
        if width % m or height % m or width < m or height < m:
            raise InvalidRequest(f"width and height must be positive multiples of {m}; got {width}x{height}")

    def default_size(self, request: GenerationRequest) -> tuple[int, int]:
        """``(width, height)`` when the request leaves them out."""
        defaults = self.defaults()
        return defaults.width, defaults.height

    @abstractmethod
    def check_conditioning(self, request: GenerationRequest) -> None:
        """Refuse input images, masks, strength the model cannot use (``request`` is resolved)."""

    @abstractmethod
    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether the request runs an unconditional row per image."""

    def rows_for(self, request: GenerationRequest) -> int:
        """Rows a request adds to each forward: one per image, two with CFG (the one home of this rule;
        ``request`` is resolved: its guidance scale is never None)."""
        assert request.guidance_scale is not None
        return request.num_images * (2 if self.uses_cfg(request.guidance_scale) else 1)

    def rows(self, state: StepState) -> int:
        return self.rows_for(state.request)

    def bucket(self, state: StepState) -> tuple[int, ...]:
        """Requests with equal buckets may share a forward (by default: same latent shape)."""
        return self.latent_shape(state.width, state.height)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        return (self.latent_channels(), height // self.vae_scale, width // self.vae_scale)

    @abstractmethod
    def latent_channels(self) -> int: ...

    # ---- request set-up
    @abstractmethod
    def encode(self, states: Sequence[StepState]) -> None:
        """Encode the prompts of newly admitted requests (batched) into ``state.cond``."""

    @abstractmethod
    def start(self, state: StepState) -> None:
        """Create the request's own scheduler, timesteps and initial latents (seeded like the pipeline)."""

    def new_scheduler(self) -> Any:
        return type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)

    # ---- one batched step
    @abstractmethod
    def denoiser_inputs(self, states: Sequence[StepState]) -> dict[str, Any]:
        """Keyword arguments of one denoiser forward over all rows of ``states``, in order."""

    @abstractmethod
    def guide(self, state: StepState, prediction: torch.Tensor) -> torch.Tensor:
        """Combine a request's rows of the denoiser output into its guided prediction."""

    def step_many(self, states: Sequence[StepState], predictions: Sequence[torch.Tensor]) -> None:
        """Guidance and one scheduler step for every request of one forward (``predictions[i]`` = its
        rows of the output). Two or more requests whose schedulers :mod:`.batched_steps` computes
        exactly (DPM-Solver++ on float32 latents) step together in a few batched operations; the others
        each call their own scheduler."""
        guided = [self.guide(s, p) for s, p in zip(states, predictions, strict=True)]
        together = [i for i, s in enumerate(states) if batchable(s.scheduler, s.latents)]
        if len(together) > 1:
            new = dpm_solver_step(
                [states[i].scheduler for i in together],
                [states[i].timestep for i in together],
                [guided[i] for i in together],
                [states[i].latents for i in together],
            )
            for i, latents in zip(together, new, strict=True):
                self._stepped(states[i], latents, None)
        else:
            together = []
        for i, (s, g) in enumerate(zip(states, guided, strict=True)):
            if i not in together:
                self._advance(s, g)

    def _advance(self, state: StepState, guided: torch.Tensor) -> None:
        out = state.scheduler.step(
            guided, state.timestep, state.latents, **self.step_kwargs(state), return_dict=True
        )
        self._stepped(state, out.prev_sample, getattr(out, "pred_original_sample", None))

    def _stepped(self, state: StepState, latents: torch.Tensor, x0: torch.Tensor | None) -> None:
        state.latents = latents
        state.last_x0 = x0
        state.step_index += 1
        self.after_step(state)

    def after_step(self, state: StepState) -> None:
        """Anything after the scheduler's step (SDXL inpainting resets the kept region); nothing by
        default."""
        return None

    def step_kwargs(self, state: StepState) -> dict[str, Any]:
        """Extra ``scheduler.step`` arguments, as the pipeline passes them (none by default)."""
        return {}

    # ---- finish
    @abstractmethod
    def decode(self, latents: torch.Tensor) -> list[Any]:
        """Decode a batch of final latents into PIL images."""


class SDXLFamily(ModelFamily):
    """SDXL text-to-image, img2img and inpainting (standard UNet): all three share forwards, since
    their rows differ only in latents and timestep (see :mod:`.conditioning`)."""

    rows_paddable = True

    name = "sdxl"

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(pipe, device, dtype)
        # what StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline preprocess with
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    def defaults(self) -> GenerationDefaults:
        size = int(self.pipe.default_sample_size * self.vae_scale)
        return GenerationDefaults(size, size, 50, 5.0)

    def default_size(self, request: GenerationRequest) -> tuple[int, int]:
        return sdxl_default_size(request, self.vae_scale) or super().default_size(request)

    def check_conditioning(self, request: GenerationRequest) -> None:
        assert request.num_inference_steps is not None
        check_sdxl_images(request, request.num_inference_steps, int(self.pipe.unet.config.in_channels))

    def uses_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    def latent_channels(self) -> int:
        return int(self.pipe.unet.config.in_channels)

    def encode(self, states: Sequence[StepState]) -> None:
        # diffusers zeroes the negative embeddings when no negative prompt is given
        # (force_zeros_for_empty_prompt) for the whole call, so the two kinds are encoded apart.
        for group in (
            [s for s in states if s.request.negative_prompt is None],
            [s for s in states if s.request.negative_prompt is not None],
        ):
            if group:
                self._encode_group(group)

    def _encode_group(self, states: Sequence[StepState]) -> None:
        negatives = [s.request.negative_prompt for s in states]
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=[s.request.prompt for s in states],
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=None if negatives[0] is None else negatives,
        )
        proj_dim = (
            int(self.pipe.text_encoder_2.config.projection_dim)
            if self.pipe.text_encoder_2 is not None
            else int(pooled.shape[-1])
        )
        for i, s in enumerate(states):
            n = s.num_images
            time_ids = self.pipe._get_add_time_ids(
                (s.height, s.width),
                (0, 0),
                (s.height, s.width),
                dtype=pos.dtype,
                text_encoder_projection_dim=proj_dim,
            ).to(self.device)
            embeds, text = pos[i : i + 1].repeat(n, 1, 1), pooled[i : i + 1].repeat(n, 1)
            if self.uses_cfg(s.guidance_scale):
                embeds = torch.cat([neg[i : i + 1].repeat(n, 1, 1), embeds])
                text = torch.cat([neg_pooled[i : i + 1].repeat(n, 1), text])
            s.cond = (embeds, text, time_ids.repeat(embeds.shape[0], 1))
        self._encode_images(states)

    def _encode_images(self, states: Sequence[StepState]) -> None:
        """Input images of img2img / inpainting requests, VAE-encoded in batches of one size."""
        for s in states:
            s.source = sdxl_source(s.request, s.width, s.height, self.image_processor, self.mask_processor)
        conditioned = [s for s in states if s.source is not None]
        if conditioned:
            dists = encode_batched(self.pipe.vae, [s.source.pixels for s in conditioned])
            for s, dist in zip(conditioned, dists, strict=True):
                s.source.dist = dist

    def start(self, state: StepState) -> None:
        state.scheduler = self.new_scheduler()
        state.timesteps, _ = retrieve_timesteps(state.scheduler, state.steps, self.device)
        if state.source is not None:
            self._start_from_image(state, state.source)
            return
        if hasattr(state.scheduler, "set_begin_index"):
            state.scheduler.set_begin_index(0)
        state.latents = self._noise(state) * state.scheduler.init_noise_sigma

    def _noise(self, state: StepState) -> torch.Tensor:
        c, h, w = self.latent_shape(state.width, state.height)
        shape = (state.num_images, c, h, w)
        return randn_tensor(shape, generator=state.generator, device=self.device, dtype=self.dtype)

    def _start_from_image(self, state: StepState, src: SourceImage) -> None:
        """img2img / inpainting latents, drawing from the generator in the pipeline's order."""
        state.timesteps = timesteps_from(state.scheduler, state.steps, src.strength)
        state.steps = len(state.timesteps)
        assert src.dist is not None
        n, vae = state.num_images, self.pipe.vae
        sample = src.dist.sample(generator=state.generator).to(self.dtype)
        first = state.timesteps[:1].repeat(n)
        if not src.inpainting:  # StableDiffusionXLImg2ImgPipeline.prepare_latents
            clean = self._normalise(sample).repeat(n, 1, 1, 1)
            state.latents = state.scheduler.add_noise(clean, self._noise(state), first)
            return
        # StableDiffusionXLInpaintPipeline: prepare_latents, then prepare_mask_latents
        src.image_latents = (vae.config.scaling_factor * sample).repeat(n, 1, 1, 1)
        src.noise = self._noise(state)
        if src.strength == 1.0:
            state.latents = src.noise * state.scheduler.init_noise_sigma
        else:
            state.latents = state.scheduler.add_noise(src.image_latents, src.noise, first)
        _, h, w = self.latent_shape(state.width, state.height)
        assert src.mask is not None
        mask = torch.nn.functional.interpolate(src.mask, size=(h, w))
        src.latent_mask = mask.to(device=self.device, dtype=self.dtype).repeat(n, 1, 1, 1)
        # the pipeline also encodes the masked image (unused by a 4-channel UNet): draw its sample
        randn_tensor(tuple(sample.shape), generator=state.generator, device=self.device, dtype=vae.dtype)

    def _normalise(self, sample: torch.Tensor) -> torch.Tensor:
        """Encoder sample → denoiser latents, as img2img does (``latents_mean``/``std`` when set)."""
        config = self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return config.scaling_factor * sample
        shape = (1, len(mean), 1, 1)
        mean_t, std_t = torch.tensor(mean).view(shape).to(sample), torch.tensor(std).view(shape).to(sample)
        return (sample - mean_t) * config.scaling_factor / std_t

    def denoiser_inputs(self, states: Sequence[StepState]) -> dict[str, Any]:
        latents, timesteps, embeds, texts, time_ids = [], [], [], [], []
        for s in states:
            x = torch.cat([s.latents] * 2) if self.uses_cfg(s.guidance_scale) else s.latents
            latents.append(s.scheduler.scale_model_input(x, s.timestep))
            timesteps.append(s.timestep.reshape(1).expand(x.shape[0]))
            e, t, ids = s.cond
            embeds.append(e)
            texts.append(t)
            time_ids.append(ids)
        return {
            "sample": torch.cat(latents),
            "timestep": torch.cat(timesteps).to(self.device),
            "encoder_hidden_states": torch.cat(embeds),
            "added_cond_kwargs": {"text_embeds": torch.cat(texts), "time_ids": torch.cat(time_ids)},
            "return_dict": False,
        }

    def step_kwargs(self, state: StepState) -> dict[str, Any]:
        # as the pipeline's prepare_extra_step_kwargs: eta=0 and the request's own generator (ancestral /
        # SDE schedulers draw noise from it), each only if scheduler.step takes it; the signature is
        # inspected once, not on every step
        accepts = self._step_parameters
        extra: dict[str, Any] = {"eta": 0.0} if "eta" in accepts else {}
        if "generator" in accepts:
            extra["generator"] = state.generator
        return extra

    @functools.cached_property
    def _step_parameters(self) -> frozenset[str]:
        return frozenset(inspect.signature(self.pipe.scheduler.step).parameters)

    def after_step(self, state: StepState) -> None:
        src = state.source
        if src is None or not src.inpainting:
            return
        # StableDiffusionXLInpaintPipeline's loop: the kept region is the image noised to the next step
        i = state.step_index - 1
        kept = src.image_latents
        if i < len(state.timesteps) - 1:
            kept = state.scheduler.add_noise(kept, src.noise, state.timesteps[i + 1 : i + 2])
        state.latents = (1 - src.latent_mask) * kept + src.latent_mask * state.latents

    def guide(self, state: StepState, prediction: torch.Tensor) -> torch.Tensor:
        if not self.uses_cfg(state.guidance_scale):
            return prediction
        uncond, text = prediction.chunk(2)
        return uncond + state.guidance_scale * (text - uncond)

    def decode(self, latents: torch.Tensor) -> list[Any]:
        vae = self.pipe.vae
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents)
            std_t = torch.tensor(std).view(shape).to(latents)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        return list(self.pipe.image_processor.postprocess(image, output_type="pil"))


def family_for(
    pipe: Any, device: torch.device, dtype: torch.dtype, *, exact_rope: bool = True
) -> ModelFamily:
    from deft_runtime.models import architecture_of

    arch = architecture_of(pipe)
    if arch == "sdxl":
        return SDXLFamily(pipe, device, dtype)
    if arch == "omnigen":
        from deft_runtime.engine.omnigen_family import OmniGenFamily

        return OmniGenFamily(pipe, device, dtype, exact_rope=exact_rope)
    raise InvalidRequest(f"the engine serves SDXL and OmniGen pipelines, not {arch}")
