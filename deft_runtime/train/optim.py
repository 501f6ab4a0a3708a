"""AdamW with the paper's differentiated learning rates, and the learning-rate schedule.

=========  ===========================  ==========================
group      tensors                      learning rate
=========  ===========================  ==========================
``R``      R (deft), up/down (lora)     ``lr``
``P``      P, H (deft, para)            ``lr × p_lr_scale`` (0.1)
``gate``   gate (deft ``--gate``)       ``lr``
=========  ===========================  ==========================

Weight decay defaults to 0: AdamW decays towards 0, and ``R = 0`` is not a neutral DEFT adapter (it
removes ``Π·W0`` without re-injecting it), so decay would pull an identity-initialized adapter away
from the base.
"""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR

from deft_runtime.train.config import TrainConfig
from deft_runtime.train.modules import TrainableAdapter

GROUP_ORDER = ("R", "P", "gate")


def group_lr(config: TrainConfig, group: str) -> float:
    return config.lr * config.p_lr_scale if group == "P" else config.lr


def build_optimizer(adapter: TrainableAdapter, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the adapter's parameters, one param group per role group (named ``name``)."""
    groups = adapter.parameter_groups()
    param_groups = [
        {"params": groups[name], "lr": group_lr(config, name), "name": name}
        for name in GROUP_ORDER
        if name in groups
    ]
    return torch.optim.AdamW(
        param_groups, betas=config.adam_betas, eps=config.adam_eps, weight_decay=config.weight_decay
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LambdaLR:
    """``constant`` (with linear warm-up when ``warmup_steps > 0``) or ``cosine`` decay after warm-up."""
    name = "cosine" if config.schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps
    )


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current learning rate of each named group."""
    return {str(group.get("name", i)): float(group["lr"]) for i, group in enumerate(optimizer.param_groups)}
