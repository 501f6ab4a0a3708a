"""The options of ``deft train``, declared once per setting in option groups (one frozen dataclass
per help panel, see :mod:`deft_cli.options`), and the one mapping from them to a
:class:`~deft_runtime.train.config.TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import typer
from deft_cli.options import DEFAULT_MODEL, model_option

if TYPE_CHECKING:
    from deft_runtime.train.config import PriorPreservation, TrainConfig, Validation

_DATA = "Data"
_ADAPTER = "Adapter"
_OPTIM = "Optimization"
_PRIOR = "Prior preservation"
_RUN = "Run"
_VALID = "Validation"


def _option(help: str, panel: str | None = None, *names: str) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=panel)


@dataclass(frozen=True)
class BaseOptions:
    out: Annotated[Path, _option("output directory (written atomically at the end)")]
    model: Annotated[str, model_option()] = DEFAULT_MODEL


@dataclass(frozen=True)
class DataOptions:
    instance_data: Annotated[
        Path | None, _option("folder of instance images (<stem>.txt beside an image = its caption)", _DATA)
    ] = None
    instance_prompt: Annotated[
        str | None, _option("prompt of the instance images, e.g. 'a photo of sks dog'", _DATA)
    ] = None
    concept: Annotated[
        list[str] | None,
        _option("DIR=PROMPT, repeatable: several concepts trained jointly into one adapter", _DATA),
    ] = None
    resolution: Annotated[
        int | None, _option("training image size (default: the base's, 1024 for SDXL)", _DATA)
    ] = None
    center_crop: Annotated[bool, _option("center crop instead of random crop", _DATA)] = False
    random_flip: Annotated[bool, _option("flip images horizontally with p=0.5", _DATA)] = False


@dataclass(frozen=True)
class AdapterOptions:
    method: Annotated[str, _option("deft | para (removal only) | lora (baseline)", _ADAPTER)] = "deft"
    decomposition: Annotated[
        str | None,
        _option(
            "projector: deft plain|relu|qr|svd, para qr|tsvd|lrmf|nmf|eig (default: qr; none for lora)",
            _ADAPTER,
        ),
    ] = None
    rank: Annotated[int, _option("rank r (paper: 4 for personalization, 32 for general tasks)", _ADAPTER)] = 4
    alpha: Annotated[float | None, _option("injection scale s = alpha / rank (default: s = 1)", _ADAPTER)] = (
        None
    )
    gate: Annotated[bool, _option("deft: learn a gate g = sigmoid(gate) on the injection", _ADAPTER)] = False
    init: Annotated[
        str,
        _option(
            "identity (deft/lora start as a no-op; para cannot) | random (reference code: N(0, 0.02²))",
            _ADAPTER,
        ),
    ] = "identity"
    cache_projector: Annotated[
        bool,
        _option(
            "deft: freeze P and compile its projector once (faster; only R and the gate train). "
            "Default: the projector is recomputed every step with gradient, so P trains",
            _ADAPTER,
        ),
    ] = False
    target: Annotated[
        list[str] | None,
        _option(
            "regex on the end of Linear module paths, repeatable (default: to_q to_k to_v to_out\\.0 — "
            "the attention projections of the SDXL UNet / OmniGen transformer; text encoders are not trained)",
            _ADAPTER,
        ),
    ] = None


@dataclass(frozen=True)
class OptimOptions:
    lr: Annotated[
        float | None,
        _option("learning rate of R / LoRA and the gate (default: the model's, see --steps)", _OPTIM),
    ] = None
    p_lr_scale: Annotated[
        float, _option("P and H train at lr × this (differentiated learning rates)", _OPTIM)
    ] = 0.1
    steps: Annotated[
        int | None,
        _option(
            "optimizer steps. Defaults per model: shapes-sdxl lr 3e-3, 300 steps, batch size 4, --latents mean; "
            "any other model the paper's SDXL personalization settings: lr 5e-5, 500 steps, batch size 1, "
            "--latents sample",
            _OPTIM,
        ),
    ] = None
    latents: Annotated[
        str | None,
        _option(
            "sample | mean: encode images to a VAE posterior sample or its mean (default: the model's)",
            _OPTIM,
        ),
    ] = None
    batch_size: Annotated[
        int | None,
        _option("instance images per step (plus as many class images; default: the model's)", _OPTIM),
    ] = None
    lr_schedule: Annotated[str, _option("constant | cosine (both after --warmup-steps)", _OPTIM)] = "constant"
    warmup_steps: Annotated[int, _option("linear warm-up steps", _OPTIM)] = 0
    weight_decay: Annotated[
        float, _option("AdamW weight decay (0: decay would pull deft's R off identity)", _OPTIM)
    ] = 0.0
    max_grad_norm: Annotated[float, _option("gradient clipping norm (0 disables)", _OPTIM)] = 1.0
    timestep_sampling: Annotated[str, _option("flow matching (OmniGen): logit_normal | uniform", _OPTIM)] = (
        "logit_normal"
    )
    mixed_precision: Annotated[str, _option("no | bf16 | fp16 (CUDA only; float32 on CPU)", _OPTIM)] = "no"
    gradient_checkpointing: Annotated[bool, _option("trade compute for activation memory", _OPTIM)] = False
    seed: Annotated[int, _option("seed of initialization, data order, augmentation and noise", _OPTIM)] = 0


@dataclass(frozen=True)
class PriorOptions:
    class_data: Annotated[
        Path | None, _option("class images folder (missing ones are generated)", _PRIOR)
    ] = None
    class_prompt: Annotated[str | None, _option("class prompt, e.g. 'a photo of a dog'", _PRIOR)] = None
    num_class_images: Annotated[
        int, _option("class images to have (generated with the base, seeded)", _PRIOR)
    ] = 100
    prior_loss_weight: Annotated[float, _option("weight of the class loss", _PRIOR)] = 1.0
    class_generation_steps: Annotated[int, _option("denoising steps per generated class image", _PRIOR)] = 25


@dataclass(frozen=True)
class RunOptions:
    device: Annotated[str, _option("auto | cpu | cuda | cuda:N", _RUN)] = "auto"
    checkpoint_every: Annotated[
        int, _option("checkpoint every N steps into the run directory (0: never)", _RUN)
    ] = 0
    keep_checkpoints: Annotated[int, _option("newest checkpoints to keep (0: all)", _RUN)] = 2
    run_dir: Annotated[Path | None, _option("checkpoints, live log, samples (default: OUT.run)", _RUN)] = None
    resume: Annotated[str | None, _option("checkpoint directory, or 'latest' in the run directory", _RUN)] = (
        None
    )
    overwrite: Annotated[bool, _option("replace an existing --out (and a stale run directory)", _RUN)] = False
    progress: Annotated[bool, _option("show a progress bar", _RUN)] = True
    register: Annotated[
        str | None,
        _option("after training, upload the adapter to --server under NAME (train-then-register)", _RUN),
    ] = None


@dataclass(frozen=True)
class ValidationOptions:
    validation_prompt: Annotated[str | None, _option("prompt sampled during training", _VALID)] = None
    validation_every: Annotated[int, _option("sample every N steps (needs --validation-prompt)", _VALID)] = (
        100
    )
    num_validation_images: Annotated[int, _option("images per validation", _VALID)] = 1
    validation_steps: Annotated[int, _option("denoising steps per validation image", _VALID)] = 25
    validation_seed: Annotated[int, _option("image i uses seed validation_seed + i", _VALID)] = 0


@dataclass(frozen=True)
class TrainOptions:
    """Every ``deft train`` option, by group."""

    base: BaseOptions
    data: DataOptions
    adapter: AdapterOptions
    optim: OptimOptions
    prior: PriorOptions
    run: RunOptions
    validation: ValidationOptions

    GROUPS: ClassVar[dict[str, type]] = {
        "base": BaseOptions,
        "data": DataOptions,
        "adapter": AdapterOptions,
        "optim": OptimOptions,
        "prior": PriorOptions,
        "run": RunOptions,
        "validation": ValidationOptions,
    }


def build_config(o: TrainOptions) -> TrainConfig:
    """The :class:`TrainConfig` of the command's options (raises ``TrainingInputError`` on bad ones)."""
    from deft_runtime.train import config as c

    a, opt, run = o.adapter, o.optim, o.run
    defaults = c.train_defaults(o.base.model)
    return c.TrainConfig(
        model=o.base.model,
        concepts=_concepts(o.data),
        out=o.base.out,
        method=c.parse_method(a.method),
        decomposition=c.parse_mode(a.decomposition),
        rank=a.rank,
        alpha=a.alpha,
        gate=a.gate,
        init=_choice("--init", a.init, ("identity", "random")),
        cache_projector=a.cache_projector,
        targets=tuple(a.target) if a.target else c.DEFAULT_TRAIN_TARGETS,
        lr=defaults["lr"] if opt.lr is None else opt.lr,
        p_lr_scale=opt.p_lr_scale,
        weight_decay=opt.weight_decay,
        schedule=_choice("--lr-schedule", opt.lr_schedule, ("constant", "cosine")),
        warmup_steps=opt.warmup_steps,
        max_grad_norm=opt.max_grad_norm or None,
        steps=defaults["steps"] if opt.steps is None else opt.steps,
        latents=_choice("--latents", opt.latents or defaults["latents"], ("sample", "mean")),
        batch_size=defaults["batch_size"] if opt.batch_size is None else opt.batch_size,
        resolution=o.data.resolution,
        center_crop=o.data.center_crop,
        random_flip=o.data.random_flip,
        prior=_prior(o.prior),
        timestep_sampling=_choice("--timestep-sampling", opt.timestep_sampling, ("uniform", "logit_normal")),
        seed=opt.seed,
        mixed_precision=_choice("--mixed-precision", opt.mixed_precision, ("no", "bf16", "fp16")),
        gradient_checkpointing=opt.gradient_checkpointing,
        device=run.device,
        checkpoint_every=run.checkpoint_every,
        keep_checkpoints=run.keep_checkpoints,
        run_dir=run.run_dir,
        resume=run.resume,
        validation=_validation(o.validation),
        overwrite=run.overwrite,
    )


def _concepts(d: DataOptions) -> tuple[Any, ...]:
    from deft_runtime.train import config as c

    concepts = [c.parse_concept(value) for value in d.concept or []]
    if (d.instance_data is None) != (d.instance_prompt is None):
        raise c.TrainingInputError("--instance-data and --instance-prompt go together")
    if d.instance_data is not None and d.instance_prompt is not None:
        concepts.insert(0, c.Concept(d.instance_data, d.instance_prompt))
    return tuple(concepts)


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> Any:
    from deft_runtime.train.config import TrainingInputError

    if value not in allowed:
        raise TrainingInputError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _prior(p: PriorOptions) -> PriorPreservation | None:
    from deft_runtime.train.config import PriorPreservation, TrainingInputError

    if p.class_data is None:
        if p.class_prompt is not None:
            raise TrainingInputError("--class-prompt needs --class-data (the folder for class images)")
        return None
    if p.class_prompt is None:
        raise TrainingInputError("--class-data needs --class-prompt")
    return PriorPreservation(
        class_dir=p.class_data,
        class_prompt=p.class_prompt,
        num_images=p.num_class_images,
        loss_weight=p.prior_loss_weight,
        generation_steps=p.class_generation_steps,
    )


def _validation(v: ValidationOptions) -> Validation | None:
    from deft_runtime.train.config import Validation

    if v.validation_prompt is None:
        return None
    return Validation(
        prompt=v.validation_prompt,
        every=v.validation_every,
        num_images=v.num_validation_images,
        inference_steps=v.validation_steps,
        seed=v.validation_seed,
    )
