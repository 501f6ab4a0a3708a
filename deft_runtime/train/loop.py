"""The training run: every check first, then steps, checkpoints, validation, and the atomic output.

::

    session = TrainingSession.prepare(config)    # all input checks, model load, adapter, optimizer
    session.run(progress=True)                   # steps + JSON-lines log + checkpoints + validation
    result = session.finish()                    # <out>/ written atomically
    session.close()                              # the denoiser gets its original Linears back

:func:`train` does all four. Nothing is written before step 1 (no output, no run directory), so a
rejected input leaves the file system as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from deft_runtime import __version__
from deft_runtime.devices import resolve_device
from deft_runtime.errors import DeftError
from deft_runtime.models import architecture_of, denoiser_of, load_pipeline
from deft_runtime.train import checkpoint as ckpt
from deft_runtime.train.config import Concept, TrainConfig, TrainingInputError, config_json
from deft_runtime.train.data import (
    Example,
    ImageTransform,
    TrainingData,
    load_concept,
    load_concepts,
    seeded_generator,
)
from deft_runtime.train.modules import TrainableAdapter
from deft_runtime.train.objectives import Objective, encode_images, objective_for
from deft_runtime.train.optim import build_lr_scheduler, build_optimizer, learning_rates
from deft_runtime.train.output import LOG_FILE, VALIDATION_DIR, write_output
from deft_runtime.train.records import StepRecord, TrainLog, TrainResult, progress_bar
from deft_runtime.train.sampling import ensure_class_images, sample_validation
from deft_runtime.validation import validate_against_base

logger = logging.getLogger(__name__)


class TrainingDiverged(DeftError):
    """The loss became NaN or infinite; nothing is written (lower --lr or enable --max-grad-norm)."""


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16/fp16 on CUDA; float32 (``None``) otherwise."""
    if config.mixed_precision == "no":
        return None
    if device.type != "cuda":
        logger.warning(
            "--mixed-precision %s needs a CUDA GPU; training in float32 on %s", config.mixed_precision, device
        )
        return None
    return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16


def check_resolution(pipe: DiffusionPipeline, architecture: str, requested: int | None) -> int:
    """The training resolution (the base's default if not given), a multiple of the latent grid."""
    vae_factor = int(pipe.vae_scale_factor)
    resolution = requested or int(pipe.default_sample_size) * vae_factor
    if architecture == "sdxl":
        factor = vae_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    else:
        factor = vae_factor * int(pipe.transformer.config.patch_size)
    if resolution % factor:
        raise TrainingInputError(
            f"--resolution {resolution} must be a multiple of {factor} for this base model"
        )
    return resolution


def _resume_state(config: TrainConfig) -> ckpt.CheckpointState | None:
    """The checkpoint to resume from, checked against ``config`` before anything heavy is loaded."""
    if config.resume is None:
        return None
    if config.resume == "latest":
        found = ckpt.list_checkpoints(config.run_directory / "checkpoints")
        if not found:
            raise TrainingInputError(f"--resume latest: {config.run_directory} holds no checkpoint")
        path = found[-1]
    else:
        path = Path(config.resume)
    state = ckpt.load_checkpoint(path)
    differing = config.differences(state.config)
    if differing:
        raise TrainingInputError(
            f"--resume {path}: the checkpoint was made with different settings for {', '.join(differing)}; "
            "resume with the same options (only --steps, --out and checkpoint/validation options may change)"
        )
    if state.step > config.steps:
        raise TrainingInputError(f"--resume {path} is at step {state.step}, past --steps {config.steps}")
    return state


@dataclass
class TrainingSession:
    """A prepared run: the base pipeline with adapter layers attached, data, objective and optimizer."""

    config: TrainConfig
    pipe: DiffusionPipeline
    architecture: str
    resolution: int
    adapter: TrainableAdapter
    data: TrainingData
    objective: Objective
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    step: int = 0
    history: list[StepRecord] = field(default_factory=list)

    # ------------------------------------------------------------------ preparation

    @classmethod
    def prepare(cls, config: TrainConfig, pipe: DiffusionPipeline | None = None) -> TrainingSession:
        """Check everything, load the base (unless given), attach the adapter; raises before step 1."""
        config.check()
        resume = _resume_state(config)
        instances = load_concepts(config.concepts)
        device = resolve_device(config.device)
        pipe = (pipe if pipe is not None else load_pipeline(config.model, device=device)).to(device)
        architecture = architecture_of(pipe)
        objective = objective_for(pipe, architecture, config.timestep_sampling)
        resolution = check_resolution(pipe, architecture, config.resolution)
        autocast = amp_dtype(config, device)
        if autocast is not None:
            denoiser_of(pipe).to(autocast)  # frozen base in half precision; adapter tensors stay float32
        adapter = _attach(config, pipe)
        try:
            session = cls._assemble(
                config, pipe, architecture, resolution, adapter, instances, objective, autocast
            )
        except BaseException:
            adapter.detach()
            raise
        if resume is not None:
            session.restore(resume)
        elif config.overwrite:
            shutil.rmtree(config.run_directory, ignore_errors=True)
        return session

    @classmethod
    def _assemble(
        cls,
        config: TrainConfig,
        pipe: DiffusionPipeline,
        architecture: str,
        resolution: int,
        adapter: TrainableAdapter,
        instances: list[Example],
        objective: Objective,
        autocast: torch.dtype | None,
    ) -> TrainingSession:
        classes = _class_examples(config, pipe, adapter, resolution)
        transform = ImageTransform(resolution, config.center_crop, config.random_flip)
        data = TrainingData(
            instances, transform, batch_size=config.batch_size, seed=config.seed, classes=classes
        )
        objective.prepare_prompts(data.prompts())
        optimizer = build_optimizer(adapter, config)
        denoiser = cast(ModelMixin, denoiser_of(pipe))
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        return cls(
            config=config,
            pipe=pipe,
            architecture=architecture,
            resolution=resolution,
            adapter=adapter,
            data=data,
            objective=objective,
            optimizer=optimizer,
            lr_scheduler=build_lr_scheduler(optimizer, config),
            scaler=torch.amp.GradScaler(denoiser.device.type, enabled=autocast is torch.float16),
            autocast_dtype=autocast,
        )

    # ------------------------------------------------------------------ paths

    @property
    def run_dir(self) -> Path:
        return self.config.run_directory

    @property
    def denoiser(self) -> ModelMixin:
        return cast(ModelMixin, denoiser_of(self.pipe))

    @property
    def log(self) -> TrainLog:
        return TrainLog(self.run_dir / LOG_FILE)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.denoiser.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ steps

    def batch_loss(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(loss, instance loss, prior loss)`` of batch ``step`` (its data, noise and timesteps come from
        the step's own generator, so the same ``step`` always gives the same inputs)."""
        generator = seeded_generator(self.config.seed, "step", step)
        batch = self.data.batch(step, generator)
        latents = encode_images(self.pipe.vae, batch.pixels, generator, mean=self.config.latents == "mean")
        with self._autocast():
            per_sample = self.objective.losses(latents, batch, generator)  # [b]
        instance = per_sample[: batch.num_instance].mean()
        prior = per_sample[batch.num_instance :].mean() if batch.size > batch.num_instance else None
        loss = instance if prior is None else instance + self._prior_weight * prior
        return loss, instance, prior

    def evaluate(self, steps: Iterable[int]) -> float:
        """Mean loss over the batches of ``steps`` without training (fixed inputs: compare before/after)."""
        with torch.no_grad():
            losses = [float(self.batch_loss(step)[0]) for step in steps]
        return sum(losses) / len(losses)

    def train_step(self) -> StepRecord:
        """One optimizer step on batch ``self.step``."""
        started = time.perf_counter()
        loss, instance, prior = self.batch_loss(self.step)
        if not bool(torch.isfinite(loss)):
            raise TrainingDiverged(f"the loss became {loss.item()} at step {self.step + 1}; lower --lr")
        rates = learning_rates(self.optimizer)
        self._optimize(loss)
        self.step += 1
        return StepRecord(
            step=self.step,
            loss=loss.item(),
            instance_loss=instance.item(),
            prior_loss=None if prior is None else prior.item(),
            lr=rates,
            seconds=time.perf_counter() - started,
        )

    @property
    def _prior_weight(self) -> float:
        return self.config.prior.loss_weight if self.config.prior is not None else 0.0

    def _optimize(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        if self.config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, until: int | None = None, *, progress: bool = False) -> list[StepRecord]:
        """Train up to step ``until`` (default ``config.steps``), logging, checkpointing, validating."""
        stop = min(until if until is not None else self.config.steps, self.config.steps)
        with progress_bar(progress, self.config.steps, self.step) as advance:
            while self.step < stop:
                record = self.train_step()
                self.history.append(record)
                self.log.append(record)
                advance(record)
                self._after_step()
        return self.history

    def _after_step(self) -> None:
        every = self.config.checkpoint_every
        if every and self.step % every == 0:
            self.save_checkpoint()
        validation = self.config.validation
        if validation is not None and self.step % validation.every == 0:
            self.validate()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        state = ckpt.CheckpointState(
            step=self.step,
            config=self.config.to_json_dict(),
            adapter=self.adapter.state_tensors(),
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(),
            grad_scaler=self.scaler.state_dict(),
            rng=ckpt.capture_rng(),
        )
        checkpoints = self.run_dir / "checkpoints"
        path = ckpt.save_checkpoint(checkpoints, state)
        ckpt.prune_checkpoints(checkpoints, self.config.keep_checkpoints)
        return path

    def restore(self, state: ckpt.CheckpointState) -> None:
        """Continue from ``state``: adapter, optimizer, schedule, grad scaler, global RNG, step, log."""
        self.adapter.load_state_tensors(state.adapter)
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_scheduler.load_state_dict(state.lr_scheduler)
        if state.grad_scaler:
            self.scaler.load_state_dict(state.grad_scaler)
        ckpt.restore_rng(state.rng)
        self.step = state.step
        self.log.truncate(state.step)

    # ------------------------------------------------------------------ validation and output

    def validate(self) -> list[Path]:
        """Sample the validation prompt from the merged adapter (image ``i`` uses seed ``seed + i``)."""
        v = self.config.validation
        assert v is not None
        seeds = [v.seed + i for i in range(v.num_images)]
        with self._autocast():
            return sample_validation(
                self.pipe,
                self.adapter,
                v.prompt,
                seeds,
                self.resolution,
                v.inference_steps,
                self.run_dir / VALIDATION_DIR,
                f"step-{self.step:06d}",
            )

    def metadata(self) -> dict[str, str]:
        """Training metadata stored in the adapter (all strings)."""
        c = self.config
        return {
            "trainer": f"deft train {__version__}",
            "base_model": c.model,
            "architecture": self.architecture,
            "method": c.method.value,
            "decomposition": c.projector.value if c.projector else "",
            "rank": str(c.rank),
            "init": c.init,
            "cache_projector": str(c.cache_projector).lower(),
            "steps": str(self.step),
            "lr": repr(c.lr),
            "p_lr_scale": repr(c.p_lr_scale),
            "batch_size": str(c.batch_size),
            "resolution": str(self.resolution),
            "seed": str(c.seed),
            "prompts": json.dumps(sorted({concept.prompt for concept in c.concepts})),
            "prior_preservation": "true" if c.prior is not None else "false",
            **c.extra_metadata,
        }

    def finish(self) -> TrainResult:
        """Write ``<out>`` atomically (adapter in both formats where possible, summary, log, samples)."""
        adapter = self.adapter.to_adapter(self.metadata())
        validate_against_base(adapter, self.adapter.base_weights())  # finite, shapes, fingerprint
        seconds = sum(r.seconds for r in self.history)
        summary = {
            "config": json.loads(config_json(self.config)),
            "steps": self.step,
            "final_loss": self.history[-1].loss if self.history else None,
            "seconds_this_session": seconds,
            "architecture": self.architecture,
            "resolution": self.resolution,
            "base_fingerprint": adapter.fingerprint.digest if adapter.fingerprint else None,
            "adapter": adapter.describe(),
        }
        files = write_output(
            self.config.out,
            adapter,
            summary,
            log_file=self.log.path,
            validation_dir=self.run_dir / VALIDATION_DIR,
            base_model_name=self.config.model,
        )
        if not ckpt.list_checkpoints(self.run_dir / "checkpoints"):
            shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing left to resume from
        return TrainResult(self.config.out, adapter, list(self.history), files, seconds)

    def close(self) -> None:
        """Give the denoiser its original Linears back (and inference mode)."""
        self.adapter.detach()
        if self.config.gradient_checkpointing:
            self.denoiser.disable_gradient_checkpointing()
        self.denoiser.eval()


def _attach(config: TrainConfig, pipe: DiffusionPipeline) -> TrainableAdapter:
    return TrainableAdapter.attach(
        denoiser_of(pipe),
        kind=config.method,
        decomposition=config.projector,
        rank=config.rank,
        targets=config.targets,
        seed=config.seed,
        random_init=config.init == "random",
        scale=config.scale,
        gated=config.gate,
        cache_projector=config.cache_projector,
    )


def _class_examples(
    config: TrainConfig, pipe: DiffusionPipeline, adapter: TrainableAdapter, resolution: int
) -> list[Example]:
    """Class images for prior preservation, generating the missing ones with the base model first."""
    if config.prior is None:
        return []
    with adapter.detached():
        made = ensure_class_images(pipe, config.prior, resolution, config.seed)
    if made:
        logger.info("generated %d class images in %s", made, config.prior.class_dir)
    return load_concept(Concept(config.prior.class_dir, config.prior.class_prompt), "class")


def train(
    config: TrainConfig,
    *,
    pipe: DiffusionPipeline | None = None,
    progress: bool = False,
    report: Callable[[str], None] = logger.info,
) -> TrainResult:
    """Run a whole training job (see the module docstring); ``pipe`` skips loading ``config.model``.
    ``report`` gets what the user should read before the steps start (the step a ``--resume`` restored)."""
    session = TrainingSession.prepare(config, pipe)
    if session.step:
        report(f"resumed from step {session.step} of {config.steps} (checkpoints in {config.run_directory})")
    try:
        session.run(progress=progress)
        return session.finish()
    finally:
        session.close()
