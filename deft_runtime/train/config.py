"""What a training run is: one frozen :class:`TrainConfig`, parsed once at the entry point and checked
before anything heavy happens.

:meth:`TrainConfig.check` runs the checks that need no model (numbers in range, method and projector
mode that make sense together, folders that exist, an output that would not clobber anything);
checks that need the base (targets, ranks against the layer shapes, resolution against the latent
grid) run in :mod:`deft_runtime.train.loop` right after the model is loaded, still before training.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deft_runtime.adapter import (
    DEFT_MODES,
    PARA_DECOMPOSITIONS,
    AdapterKind,
    Decomposition,
    parse_decomposition,
    parse_kind,
)
from deft_runtime.errors import DeftError, InvalidAdapter

#: Paper defaults: SDXL UNet attention projections (OmniGen's attention uses the same names).
DEFAULT_TRAIN_TARGETS: tuple[str, ...] = (r"to_q", r"to_k", r"to_v", r"to_out\.0")
#: Paper defaults: rank 4 for personalization (rank 32 for general tasks), lr 5e-5, 500 steps.
PAPER_RANK_PERSONALIZATION = 4
PAPER_RANK_GENERAL = 32
PAPER_LR_SDXL = 5e-5
PAPER_STEPS_SDXL = 500

#: The settings a base model may override (field names of :class:`TrainConfig`); ``deft train``
#: fills the ones a user leaves out from :func:`train_defaults`.
PAPER_TRAIN_DEFAULTS: dict[str, Any] = {
    "lr": PAPER_LR_SDXL,
    "steps": PAPER_STEPS_SDXL,
    "batch_size": 1,
    "latents": "sample",
}
#: Per-model trainer defaults where the paper's SDXL ones do not fit. shapes-sdxl (measured with
#: tests/test_concepts.py and ``python -m benchmarks quality``): its denoiser was trained on VAE
#: posterior means (the posterior's spread is as wide as the latents'), and it is small enough to
#: take a far higher learning rate.
MODEL_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "shapes-sdxl": {"lr": 3e-3, "steps": 300, "batch_size": 4, "latents": "mean"},
}


def train_defaults(model: str) -> dict[str, Any]:
    """The trainer defaults for base ``model``: the paper's, with the model's own overrides."""
    return {**PAPER_TRAIN_DEFAULTS, **MODEL_TRAIN_DEFAULTS.get(model, {})}


InitMode = Literal["identity", "random"]
Schedule = Literal["constant", "cosine"]
MixedPrecision = Literal["no", "bf16", "fp16"]
TimestepSampling = Literal["uniform", "logit_normal"]
LatentEncoding = Literal["sample", "mean"]

#: Fields a resumed run may change; every other field must equal the checkpoint's.
RESUMABLE_CHANGES = frozenset(
    {
        "out",
        "steps",
        "resume",
        "run_dir",
        "checkpoint_every",
        "keep_checkpoints",
        "overwrite",
        "validation",
        "extra_metadata",
    }
)


class TrainingInputError(DeftError, ValueError):
    """A training option or input is unusable; raised before any training step runs."""


@dataclass(frozen=True)
class Concept:
    """A folder of instance images and the prompt that names them (``a photo of sks dog``)."""

    data_dir: Path
    prompt: str


@dataclass(frozen=True)
class PriorPreservation:
    """DreamBooth class-prior preservation: ``loss = mse(instance) + weight · mse(class)``.

    Missing class images (fewer than ``num_images`` in ``class_dir``) are generated with the base
    pipeline before training, one seeded generator per image, ``generation_steps`` denoising steps.
    """

    class_dir: Path
    class_prompt: str
    num_images: int = 100
    loss_weight: float = 1.0
    generation_steps: int = 25


@dataclass(frozen=True)
class Validation:
    """Sample ``num_images`` images of ``prompt`` every ``every`` steps (fixed ``seed``) on a merged copy."""

    prompt: str
    every: int
    num_images: int = 1
    inference_steps: int = 25
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; defaults are the paper's SDXL personalization settings."""

    model: str
    concepts: tuple[Concept, ...]
    out: Path
    method: AdapterKind = AdapterKind.DEFT
    decomposition: Decomposition | None = None  # None: qr for deft and para, none for lora
    rank: int = PAPER_RANK_PERSONALIZATION
    alpha: float | None = None  # injection scale s = alpha / rank; None: s = 1
    gate: bool = False
    init: InitMode = "identity"
    cache_projector: bool = False
    targets: tuple[str, ...] = DEFAULT_TRAIN_TARGETS
    lr: float = PAPER_LR_SDXL
    p_lr_scale: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    steps: int = PAPER_STEPS_SDXL
    batch_size: int = 1
    resolution: int | None = None  # None: the base's default image size
    center_crop: bool = False
    random_flip: bool = False
    prior: PriorPreservation | None = None
    timestep_sampling: TimestepSampling = "logit_normal"  # flow matching only
    latents: LatentEncoding = "sample"  # VAE posterior sample (diffusers' DreamBooth) or its mean
    seed: int = 0
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    device: str = "auto"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    run_dir: Path | None = None  # None: "<out>.run" beside the output
    resume: str | None = None  # a checkpoint directory, or "latest" in the run directory
    validation: Validation | None = None
    overwrite: bool = False
    extra_metadata: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived

    @property
    def projector(self) -> Decomposition | None:
        """The projector mode actually used (``qr`` unless given; ``None`` for LoRA)."""
        if self.method is AdapterKind.LORA:
            return None
        return self.decomposition or Decomposition.QR

    @property
    def scale(self) -> float:
        """Injection scale ``s`` (``alpha / r``, or 1 without ``alpha``)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def run_directory(self) -> Path:
        """Checkpoints, the live JSON-lines log and validation images of the run in progress."""
        return self.run_dir if self.run_dir is not None else self.out.with_name(self.out.name + ".run")

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-able view (paths and enums as strings), stored in checkpoints and outputs."""
        return _jsonable(dataclasses.asdict(self))

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """Fields that differ from a checkpoint's recorded config, except those a resume may change."""
        mine = self.to_json_dict()
        keys = (set(mine) | set(recorded)) - RESUMABLE_CHANGES
        return sorted(k for k in keys if mine.get(k) != recorded.get(k))

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """Raise :class:`TrainingInputError` for any option that cannot work (no model needed)."""
        _check_numbers(self)
        _check_method(self)
        _check_runs(self)
        if not self.concepts:
            raise TrainingInputError("no training images: pass --instance-data DIR or --concept DIR=PROMPT")
        for concept in self.concepts:
            if not concept.prompt.strip():
                raise TrainingInputError(f"the prompt of {concept.data_dir} is empty")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, AdapterKind | Decomposition):
        return value.value
    return value


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise TrainingInputError(f"{name} must be {bound}, got {value}")


def _check_numbers(config: TrainConfig) -> None:
    for name in ("rank", "lr", "steps", "batch_size"):
        _positive(f"--{name.replace('_', '-')}", getattr(config, name))
    for name in ("p_lr_scale", "weight_decay", "warmup_steps", "checkpoint_every", "keep_checkpoints"):
        _positive(f"--{name.replace('_', '-')}", getattr(config, name), allow_zero=True)
    if config.alpha is not None:
        _positive("--alpha", config.alpha)
    if config.max_grad_norm is not None:
        _positive("--max-grad-norm", config.max_grad_norm)
    if config.resolution is not None:
        _positive("--resolution", config.resolution)
    if config.prior is not None:
        _positive("--num-class-images", config.prior.num_images)
        _positive("--prior-loss-weight", config.prior.loss_weight, allow_zero=True)
        _positive("--class-generation-steps", config.prior.generation_steps)
        if not config.prior.class_prompt.strip():
            raise TrainingInputError("--class-data needs a non-empty --class-prompt")
    if config.validation is not None:
        _positive("--validation-every", config.validation.every)
        _positive("--num-validation-images", config.validation.num_images)


def _check_method(config: TrainConfig) -> None:
    method, mode = config.method, config.decomposition
    if method is AdapterKind.LORA and mode is not None:
        raise TrainingInputError(
            f"--decomposition {mode.value} makes no sense with --method lora (LoRA has no projector)"
        )
    allowed = {AdapterKind.DEFT: DEFT_MODES, AdapterKind.PARA: PARA_DECOMPOSITIONS}.get(method, ())
    if mode is not None and mode not in allowed:
        names = ", ".join(d.value for d in allowed)
        raise TrainingInputError(
            f"--method {method.value} supports the decompositions {names}; got {mode.value}"
        )
    if config.gate and method is not AdapterKind.DEFT:
        raise TrainingInputError(f"--gate scales DEFT's injection; a {method.value} adapter has none")
    if config.cache_projector and method is not AdapterKind.DEFT:
        reason = "P is its only trainable tensor" if method is AdapterKind.PARA else "LoRA has no projector"
        raise TrainingInputError(
            f"--cache-projector freezes P, which makes no sense for {method.value}: {reason}"
        )
    if config.alpha is not None and method is AdapterKind.PARA:
        raise TrainingInputError("--alpha scales the injection; PaRa only removes a subspace")
    if not config.targets:
        raise TrainingInputError("at least one --target pattern is needed")


def _check_runs(config: TrainConfig) -> None:
    if config.out.exists() and not config.overwrite:
        raise TrainingInputError(
            f"{config.out} already exists; pass --overwrite to replace it, or another --out"
        )
    if config.out.exists() and not config.out.is_dir():
        raise TrainingInputError(f"--out {config.out} is a file; the output is a directory")
    if config.resume not in (None, "latest"):
        ckpt = Path(str(config.resume))
        if not (ckpt / "state.json").is_file():
            raise TrainingInputError(f"--resume {ckpt} is not a checkpoint directory (no state.json)")
    if config.resume == "latest" and not config.run_directory.is_dir():
        raise TrainingInputError(f"--resume latest: there is no run directory {config.run_directory}")
    stale = config.run_directory / "checkpoints"
    if config.resume is None and not config.overwrite and stale.is_dir() and any(stale.glob("step-*")):
        raise TrainingInputError(
            f"{config.run_directory} holds checkpoints of an earlier run; pass --resume latest to continue it, "
            "--overwrite to start over, or another --run-dir"
        )


def parse_method(value: str) -> AdapterKind:
    try:
        return parse_kind(value)
    except InvalidAdapter as e:
        raise TrainingInputError(f"--method: {e}") from e


def parse_mode(value: str | None) -> Decomposition | None:
    if value is None:
        return None
    try:
        return parse_decomposition(value)
    except InvalidAdapter as e:
        raise TrainingInputError(f"--decomposition: {e}") from e


def parse_concept(value: str) -> Concept:
    """``DIR=PROMPT`` (the first ``=`` splits; prompts may contain more)."""
    folder, sep, prompt = value.partition("=")
    if not sep or not folder or not prompt.strip():
        raise TrainingInputError(f"--concept expects DIR=PROMPT, got {value!r}")
    return Concept(Path(folder).expanduser(), prompt)


def config_json(config: TrainConfig) -> str:
    return json.dumps(config.to_json_dict(), indent=2, sort_keys=True)
