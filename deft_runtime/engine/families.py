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

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

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

    @abstractmethod
    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether the request runs an unconditional row per image."""

    def rows_for(self, num_images: int, guidance_scale: float) -> int:
        """Rows a request adds to each forward: one per image, two with CFG (the one home of this rule;
        ``guidance_scale`` is the resolved value, never None)."""
        return num_images * (2 if self.uses_cfg(guidance_scale) else 1)

    def rows(self, state: StepState) -> int:
        return self.rows_for(state.num_images, state.guidance_scale)

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

    def step(self, state: StepState, prediction: torch.Tensor) -> None:
        """Advance the request's scheduler by one step (``prediction`` = its rows of the output)."""
        guided = self.guide(state, prediction)
        out = state.scheduler.step(
            guided, state.timestep, state.latents, **self.step_kwargs(state), return_dict=True
        )
        state.latents = out.prev_sample
        state.last_x0 = getattr(out, "pred_original_sample", None)
        state.step_index += 1

    def step_kwargs(self, state: StepState) -> dict[str, Any]:
        """Extra ``scheduler.step`` arguments, as the pipeline passes them (none by default)."""
        return {}

    # ---- finish
    @abstractmethod
    def decode(self, latents: torch.Tensor) -> list[Any]:
        """Decode a batch of final latents into PIL images."""


class SDXLFamily(ModelFamily):
    name = "sdxl"

    def defaults(self) -> GenerationDefaults:
        size = int(self.pipe.default_sample_size * self.vae_scale)
        return GenerationDefaults(size, size, 50, 5.0)

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

    def start(self, state: StepState) -> None:
        state.scheduler = self.new_scheduler()
        state.timesteps, _ = retrieve_timesteps(state.scheduler, state.steps, self.device)
        if hasattr(state.scheduler, "set_begin_index"):
            state.scheduler.set_begin_index(0)
        c, h, w = self.latent_shape(state.width, state.height)
        latents = randn_tensor(
            (state.num_images, c, h, w), generator=state.generator, device=self.device, dtype=self.dtype
        )
        state.latents = latents * state.scheduler.init_noise_sigma

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
        pipeline run therefore depends on its prompt's token count and its padded text length; with
        ``exact_rope`` requests only share a forward when both agree, which keeps every image equal to
        ``OmniGenPipeline``'s. Without it they batch by shape alone (more batching, slightly different
        images for prompts of other lengths)."""
        shape = self.latent_shape(state.width, state.height)
        if not self.exact_rope:
            return shape
        cond, uncond = state.cond
        n_cond, n_uncond = len(cond["input_ids"]), len(uncond["input_ids"])
        return (*shape, n_cond, max(n_cond, n_uncond))

    def defaults(self) -> GenerationDefaults:
        size = int(self.pipe.default_sample_size * self.vae_scale)
        return GenerationDefaults(size, size, 50, 2.5)

    def size_multiple(self) -> int:
        # the processor counts one output token per 16x16 pixels, and the transformer patchifies latents
        return max(16, self.vae_scale * int(self.pipe.transformer.config.patch_size))

    def uses_cfg(self, guidance_scale: float) -> bool:
        return True  # OmniGen's pipeline always runs the unconditional row

    def latent_channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels)

    def encode(self, states: Sequence[StepState]) -> None:
        processor = self.pipe.multimodal_processor
        for s in states:
            negative = (
                s.request.negative_prompt if s.request.negative_prompt is not None else self.default_negative
            )
            s.cond = (
                processor.process_multi_modal_prompt(s.request.prompt, None),
                processor.process_multi_modal_prompt(negative, None),
            )

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
        mllm, sizes, latents, timesteps = [], [], [], []
        for s in states:
            cond, uncond = s.cond
            n = s.num_images
            mllm += [cond] * n + [uncond] * n
            sizes += [[s.height, s.width]] * (2 * n)
            latents.append(torch.cat([s.latents] * 2))
            timesteps.append(s.timestep.reshape(1).expand(2 * n))
        collator = self.pipe.multimodal_processor.collator
        input_ids, position_ids, attention_mask, _, _, image_sizes = collator.process_mllm_input(mllm, sizes)
        return {
            "hidden_states": torch.cat(latents).to(self.pipe.transformer.dtype),
            "timestep": torch.cat(timesteps).to(self.device),
            "input_ids": input_ids.to(self.device),
            "input_img_latents": [],
            "input_image_sizes": image_sizes,
            "attention_mask": attention_mask.to(self.device),
            "position_ids": position_ids.to(self.device),
            "return_dict": False,
        }

    def guide(self, state: StepState, prediction: torch.Tensor) -> torch.Tensor:
        cond, uncond = prediction.chunk(2)
        return uncond + state.guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> list[Any]:
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return list(self.pipe.image_processor.postprocess(image, output_type="pil"))


def family_for(
    pipe: Any, device: torch.device, dtype: torch.dtype, *, exact_rope: bool = True
) -> ModelFamily:
    from deft_runtime.models import architecture_of

    arch = architecture_of(pipe)
    if arch == "sdxl":
        return SDXLFamily(pipe, device, dtype)
    if arch == "omnigen":
        return OmniGenFamily(pipe, device, dtype, exact_rope=exact_rope)
    raise InvalidRequest(f"the engine serves SDXL and OmniGen pipelines, not {arch}")
