"""Checkpoints for ``--resume``: safetensors for every tensor, JSON for the rest, never pickle.

::

    <run dir>/checkpoints/step-000100/
        state.safetensors   adapter.<module>.<role>       every adapter tensor (float32)
                            optimizer.<index>.<key>       AdamW's exp_avg, exp_avg_sq, step
                            rng.torch, rng.cuda.<i>       global torch / CUDA generator states (uint8)
        state.json          step, the run's config, optimizer param groups and scalar state,
                            lr scheduler and grad scaler state dicts

The data order, augmentation and noise of step ``s`` come from generators seeded by ``(seed, s)``
(:mod:`deft_runtime.train.data`), so they need no saved state; the global RNG states are kept for
anything else that draws from them (dropout in a base model). A checkpoint directory is written
under a temporary name and renamed, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deft_runtime.train.config import TrainingInputError

TENSORS_NAME = "state.safetensors"
JSON_NAME = "state.json"
FORMAT = "deft.train-checkpoint/1"


@dataclass
class CheckpointState:
    """Everything a run needs to continue bit-exactly from ``step``."""

    step: int
    config: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    grad_scaler: dict[str, Any]
    rng: dict[str, torch.Tensor]


def capture_rng() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[f"cuda.{i}"] for i in range(len(states) - 1) if f"cuda.{i}" in states]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Optimizer state → (JSON-able part, tensors keyed ``optimizer.<index>.<key>``)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        scalars[str(index)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[str(index)][key] = value
    return {"param_groups": state_dict["param_groups"], "state": scalars}, tensors


def _join_optimizer(part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in part["state"].items()}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in part["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(checkpoints_dir: Path, state: CheckpointState) -> Path:
    """Write ``step-XXXXXX`` under ``checkpoints_dir`` atomically and return its path."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    target = checkpoints_dir / f"step-{state.step:06d}"
    optimizer_json, optimizer_tensors = _split_optimizer(state.optimizer)
    tensors = {
        **{f"adapter.{k}": v for k, v in state.adapter.items()},
        **optimizer_tensors,
        **{f"rng.{k}": v for k, v in state.rng.items()},
    }
    document = {
        "format": FORMAT,
        "step": state.step,
        "config": state.config,
        "optimizer": optimizer_json,
        "lr_scheduler": state.lr_scheduler,
        "grad_scaler": state.grad_scaler,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=checkpoints_dir))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / TENSORS_NAME))
        (staging / JSON_NAME).write_text(json.dumps(document, indent=1, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_checkpoint(directory: Path) -> CheckpointState:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        document = json.loads((directory / JSON_NAME).read_text())
        tensors = load_file(str(directory / TENSORS_NAME))
    except (OSError, ValueError) as e:
        raise TrainingInputError(f"{directory} is not a readable training checkpoint: {e}") from e
    if document.get("format") != FORMAT:
        raise TrainingInputError(
            f"{directory} is not a deft training checkpoint (format {document.get('format')!r})"
        )
    groups: dict[str, dict[str, torch.Tensor]] = {"adapter": {}, "optimizer": {}, "rng": {}}
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".")
        groups[prefix][rest if prefix != "optimizer" else key] = tensor
    return CheckpointState(
        step=int(document["step"]),
        config=document["config"],
        adapter=groups["adapter"],
        optimizer=_join_optimizer(document["optimizer"], groups["optimizer"]),
        lr_scheduler=document["lr_scheduler"],
        grad_scaler=document["grad_scaler"],
        rng=groups["rng"],
    )


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.glob("step-*") if (p / JSON_NAME).is_file())


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep = 0`` keeps every one)."""
    if keep <= 0:
        return
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
