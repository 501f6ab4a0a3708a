"""``deft train``: options → one :class:`~deft_runtime.train.config.TrainConfig` → :func:`train`.

This module imports nothing heavy at import time (the command registers on ``deft``'s app, whose
``--help`` must stay fast); the config and the loop load when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from deft_runtime.train.config import PriorPreservation, TrainConfig, Validation

DEFAULT_SERVER = "127.0.0.1:50051"

_DATA = "Data"
_ADAPTER = "Adapter"
_OPTIM = "Optimization"
_PRIOR = "Prior preservation"
_RUN = "Run"
_VALID = "Validation"


def _fail(message: object) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=1)


def train_command(
    model: Annotated[str, typer.Option(help="base: diffusers directory, hub id, tiny-sdxl or tiny-omnigen")],
    out: Annotated[Path, typer.Option(help="output directory (written atomically at the end)")],
    instance_data: Annotated[
        Path | None,
        typer.Option(
            help="folder of instance images (<stem>.txt beside an image = its caption)", rich_help_panel=_DATA
        ),
    ] = None,
    instance_prompt: Annotated[
        str | None,
        typer.Option(help="prompt of the instance images, e.g. 'a photo of sks dog'", rich_help_panel=_DATA),
    ] = None,
    concept: Annotated[
        list[str] | None,
        typer.Option(
            help="DIR=PROMPT, repeatable: several concepts trained jointly into one adapter",
            rich_help_panel=_DATA,
        ),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(help="training image size [default: the base's, 1024 for SDXL]", rich_help_panel=_DATA),
    ] = None,
    center_crop: Annotated[
        bool, typer.Option(help="center crop instead of random crop", rich_help_panel=_DATA)
    ] = False,
    random_flip: Annotated[
        bool, typer.Option(help="flip images horizontally with p=0.5", rich_help_panel=_DATA)
    ] = False,
    method: Annotated[
        str, typer.Option(help="deft | para (removal only) | lora (baseline)", rich_help_panel=_ADAPTER)
    ] = "deft",
    decomposition: Annotated[
        str | None,
        typer.Option(
            help="projector: deft plain|relu|qr|svd, para qr|tsvd|lrmf|nmf|eig [default: qr; none for lora]",
            rich_help_panel=_ADAPTER,
        ),
    ] = None,
    rank: Annotated[
        int,
        typer.Option(
            help="rank r (paper: 4 for personalization, 32 for general tasks)", rich_help_panel=_ADAPTER
        ),
    ] = 4,
    alpha: Annotated[
        float | None,
        typer.Option(help="injection scale s = alpha / rank [default: s = 1]", rich_help_panel=_ADAPTER),
    ] = None,
    gate: Annotated[
        bool,
        typer.Option(help="deft: learn a gate g = sigmoid(gate) on the injection", rich_help_panel=_ADAPTER),
    ] = False,
    init: Annotated[
        str,
        typer.Option(
            help="identity (deft/lora start as a no-op; para cannot) | random (reference code: N(0, 0.02²))",
            rich_help_panel=_ADAPTER,
        ),
    ] = "identity",
    cache_projector: Annotated[
        bool,
        typer.Option(
            help="deft: freeze P and compile its projector once (faster; only R and the gate train). "
            "Default: the projector is recomputed every step with gradient, so P trains",
            rich_help_panel=_ADAPTER,
        ),
    ] = False,
    target: Annotated[
        list[str] | None,
        typer.Option(
            help="regex on the end of Linear module paths, repeatable [default: to_q to_k to_v to_out\\.0 — "
            "the attention projections of the SDXL UNet / OmniGen transformer; text encoders are not trained]",
            rich_help_panel=_ADAPTER,
        ),
    ] = None,
    lr: Annotated[
        float,
        typer.Option(
            help="learning rate of R / LoRA and the gate (paper, SDXL personalization: 5e-5)",
            rich_help_panel=_OPTIM,
        ),
    ] = 5e-5,
    p_lr_scale: Annotated[
        float,
        typer.Option(
            help="P and H train at lr × this (differentiated learning rates)", rich_help_panel=_OPTIM
        ),
    ] = 0.1,
    steps: Annotated[
        int, typer.Option(help="optimizer steps (paper, SDXL personalization: 500)", rich_help_panel=_OPTIM)
    ] = 500,
    batch_size: Annotated[
        int, typer.Option(help="instance images per step (plus as many class images)", rich_help_panel=_OPTIM)
    ] = 1,
    lr_schedule: Annotated[
        str, typer.Option(help="constant | cosine (both after --warmup-steps)", rich_help_panel=_OPTIM)
    ] = "constant",
    warmup_steps: Annotated[int, typer.Option(help="linear warm-up steps", rich_help_panel=_OPTIM)] = 0,
    weight_decay: Annotated[
        float,
        typer.Option(
            help="AdamW weight decay (0: decay would pull deft's R off identity)", rich_help_panel=_OPTIM
        ),
    ] = 0.0,
    max_grad_norm: Annotated[
        float, typer.Option(help="gradient clipping norm (0 disables)", rich_help_panel=_OPTIM)
    ] = 1.0,
    timestep_sampling: Annotated[
        str, typer.Option(help="flow matching (OmniGen): logit_normal | uniform", rich_help_panel=_OPTIM)
    ] = "logit_normal",
    mixed_precision: Annotated[
        str, typer.Option(help="no | bf16 | fp16 (CUDA only; float32 on CPU)", rich_help_panel=_OPTIM)
    ] = "no",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="trade compute for activation memory", rich_help_panel=_OPTIM)
    ] = False,
    seed: Annotated[
        int,
        typer.Option(
            help="seed of initialization, data order, augmentation and noise", rich_help_panel=_OPTIM
        ),
    ] = 0,
    class_data: Annotated[
        Path | None,
        typer.Option(help="class images folder (missing ones are generated)", rich_help_panel=_PRIOR),
    ] = None,
    class_prompt: Annotated[
        str | None, typer.Option(help="class prompt, e.g. 'a photo of a dog'", rich_help_panel=_PRIOR)
    ] = None,
    num_class_images: Annotated[
        int,
        typer.Option(help="class images to have (generated with the base, seeded)", rich_help_panel=_PRIOR),
    ] = 100,
    prior_loss_weight: Annotated[
        float, typer.Option(help="weight of the class loss", rich_help_panel=_PRIOR)
    ] = 1.0,
    class_generation_steps: Annotated[
        int, typer.Option(help="denoising steps per generated class image", rich_help_panel=_PRIOR)
    ] = 25,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N", rich_help_panel=_RUN)] = "auto",
    checkpoint_every: Annotated[
        int,
        typer.Option(help="checkpoint every N steps into the run directory (0: never)", rich_help_panel=_RUN),
    ] = 0,
    keep_checkpoints: Annotated[
        int, typer.Option(help="newest checkpoints to keep (0: all)", rich_help_panel=_RUN)
    ] = 2,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="checkpoints, live log, samples [default: OUT.run]", rich_help_panel=_RUN),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="checkpoint directory, or 'latest' in the run directory", rich_help_panel=_RUN),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="replace an existing --out (and a stale run directory)", rich_help_panel=_RUN)
    ] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar", rich_help_panel=_RUN)] = True,
    validation_prompt: Annotated[
        str | None, typer.Option(help="prompt sampled during training", rich_help_panel=_VALID)
    ] = None,
    validation_every: Annotated[
        int, typer.Option(help="sample every N steps (needs --validation-prompt)", rich_help_panel=_VALID)
    ] = 100,
    num_validation_images: Annotated[
        int, typer.Option(help="images per validation", rich_help_panel=_VALID)
    ] = 1,
    validation_steps: Annotated[
        int, typer.Option(help="denoising steps per validation image", rich_help_panel=_VALID)
    ] = 25,
    validation_seed: Annotated[
        int, typer.Option(help="image i uses seed validation_seed + i", rich_help_panel=_VALID)
    ] = 0,
    register: Annotated[
        str | None,
        typer.Option(
            help="after training, upload the adapter to --server under NAME (train-then-register)",
            rich_help_panel=_RUN,
        ),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            envvar="DEFT_SERVER",
            help=f"HOST:PORT of a running deft server (default {DEFAULT_SERVER})",
            rich_help_panel=_RUN,
        ),
    ] = None,
) -> None:
    """Fine-tune a DEFT / PaRa / LoRA adapter on a few images of a concept (DreamBooth-style).

    Paper defaults: rank 4 for personalization (rank 32 for general tasks), lr 5e-5 and 500 steps for SDXL personalization, P and H at lr × 0.1.

    Writes OUT/adapter.deft.safetensors (always), OUT/peft/ (deft relu/qr and para qr without a gate: loads with PeftModel.from_pretrained), OUT/training.json and OUT/train_log.jsonl. Checkpoints, the live log and validation samples go to the run directory (OUT.run); a crashed run never leaves OUT behind.
    """
    options = dict(locals())
    from deft_runtime.errors import DeftError

    try:
        config = build_config(options)
        if register is not None:
            _check_server(register, server or DEFAULT_SERVER)  # fail before hours of training, not after
        from deft_runtime.train.loop import train

        result = train(config, progress=progress)
    except DeftError as e:
        raise _fail(e) from e
    console = Console(soft_wrap=True)
    console.print(f"wrote {result.out} ({', '.join(str(f) for f in result.files)})")
    if register is not None:
        info = _register(register, server or DEFAULT_SERVER, result.out / "adapter.deft.safetensors")
        console.print(
            f"registered {info.name!r} on {server or DEFAULT_SERVER}: {info.kind}, sha256 {info.sha256[:12]}"
        )


def _client(server: str) -> Any:
    try:
        from deft_client import DeftClient
    except ImportError as e:
        raise _fail("--register needs the client: pip install 'deft[server]'") from e
    return DeftClient(server)


def _check_server(name: str, server: str) -> None:
    """The name is valid and the server answers (and does not hold the name yet)."""
    import re

    from deft_client import DeftError as ClientError

    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", name) or name in (".", ".."):
        raise _fail(f"--register {name!r}: names use letters, digits, '.', '_' and '-' (at most 128)")
    with _client(server) as client:
        try:
            client.wait_ready(timeout=3)
            existing = {a.name for a in client.list_adapters()}
        except ClientError as e:
            raise _fail(f"cannot reach the deft server at {server}: {e}") from e
    if name in existing:
        raise _fail(
            f"the server at {server} already has an adapter named {name!r}; delete it or pick another name"
        )


def _register(name: str, server: str, path: Path) -> Any:
    from deft_client import DeftError as ClientError

    with _client(server) as client:
        try:
            return client.register_adapter(name, path, metadata={"source": "deft train"})
        except ClientError as e:
            raise _fail(f"training succeeded ({path}) but registering it failed: {e}") from e


def build_config(o: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` of the command's options (raises ``TrainingInputError`` on bad ones)."""
    from deft_runtime.train import config as c

    concepts = [c.parse_concept(value) for value in o["concept"] or []]
    if (o["instance_data"] is None) != (o["instance_prompt"] is None):
        raise c.TrainingInputError("--instance-data and --instance-prompt go together")
    if o["instance_data"] is not None:
        concepts.insert(0, c.Concept(o["instance_data"], o["instance_prompt"]))
    return c.TrainConfig(
        model=o["model"],
        concepts=tuple(concepts),
        out=o["out"],
        method=c.parse_method(o["method"]),
        decomposition=c.parse_mode(o["decomposition"]),
        rank=o["rank"],
        alpha=o["alpha"],
        gate=o["gate"],
        init=_choice("--init", o["init"], ("identity", "random")),
        cache_projector=o["cache_projector"],
        targets=tuple(o["target"]) if o["target"] else c.DEFAULT_TRAIN_TARGETS,
        lr=o["lr"],
        p_lr_scale=o["p_lr_scale"],
        weight_decay=o["weight_decay"],
        schedule=_choice("--lr-schedule", o["lr_schedule"], ("constant", "cosine")),
        warmup_steps=o["warmup_steps"],
        max_grad_norm=o["max_grad_norm"] or None,
        steps=o["steps"],
        batch_size=o["batch_size"],
        resolution=o["resolution"],
        center_crop=o["center_crop"],
        random_flip=o["random_flip"],
        prior=_prior(o),
        timestep_sampling=_choice("--timestep-sampling", o["timestep_sampling"], ("uniform", "logit_normal")),
        seed=o["seed"],
        mixed_precision=_choice("--mixed-precision", o["mixed_precision"], ("no", "bf16", "fp16")),
        gradient_checkpointing=o["gradient_checkpointing"],
        device=o["device"],
        checkpoint_every=o["checkpoint_every"],
        keep_checkpoints=o["keep_checkpoints"],
        run_dir=o["run_dir"],
        resume=o["resume"],
        validation=_validation(o),
        overwrite=o["overwrite"],
    )


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> Any:
    from deft_runtime.train.config import TrainingInputError

    if value not in allowed:
        raise TrainingInputError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _prior(o: dict[str, Any]) -> PriorPreservation | None:
    from deft_runtime.train.config import PriorPreservation, TrainingInputError

    if o["class_data"] is None:
        if o["class_prompt"] is not None:
            raise TrainingInputError("--class-prompt needs --class-data (the folder for class images)")
        return None
    if o["class_prompt"] is None:
        raise TrainingInputError("--class-data needs --class-prompt")
    return PriorPreservation(
        class_dir=o["class_data"],
        class_prompt=o["class_prompt"],
        num_images=o["num_class_images"],
        loss_weight=o["prior_loss_weight"],
        generation_steps=o["class_generation_steps"],
    )


def _validation(o: dict[str, Any]) -> Validation | None:
    from deft_runtime.train.config import Validation

    if o["validation_prompt"] is None:
        return None
    return Validation(
        prompt=o["validation_prompt"],
        every=o["validation_every"],
        num_images=o["num_validation_images"],
        inference_steps=o["validation_steps"],
        seed=o["validation_seed"],
    )
