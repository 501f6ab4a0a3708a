"""Offline trainer: DreamBooth-style DEFT / PaRa / LoRA fine-tuning of an SDXL or OmniGen base.

::

    from deft_runtime.train import train
    from deft_runtime.train.config import Concept, TrainConfig

    result = train(TrainConfig(model="tiny-sdxl", concepts=(Concept(Path("dog"), "a photo of sks dog"),),
                               out=Path("out/dog"), rank=4, steps=500))
    result.out / "adapter.deft.safetensors"      # deft's own format; result.out / "peft" for relu/qr

=====================  ===========================================================================
module                 what it holds
=====================  ===========================================================================
``config``             :class:`TrainConfig` (frozen, checked once) and its parts
``modules``            :class:`TrainableAdapter` / ``AdaptedLinear``: the served math with gradients
``data``               image discovery and checks, captions, transforms, counter-based sampling
``objectives``         SDXL denoising loss (epsilon / v) and OmniGen flow matching
``optim``              AdamW with differentiated learning rates, the lr schedule
``checkpoint``         ``--resume`` state in safetensors + JSON
``sampling``           class images and validation samples through the diffusers pipeline
``output``             the atomic output directory
``records``            per-step records, the JSON-lines log, the progress bar, the result
``loop``               :class:`TrainingSession` and :func:`train`
``cli``                the ``deft train`` command
=====================  ===========================================================================

Importing this package is cheap (no torch, no diffusers): ``deft --help`` stays fast. The heavy
modules load when :func:`train` runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    from deft_runtime.train.config import TrainConfig
    from deft_runtime.train.records import TrainResult

__all__ = ["train"]


def train(
    config: TrainConfig, *, pipe: DiffusionPipeline | None = None, progress: bool = False
) -> TrainResult:
    """Run a whole training job; see :func:`deft_runtime.train.loop.train`."""
    from deft_runtime.train.loop import train as run

    return run(config, pipe=pipe, progress=progress)
