"""Resolve a model name to a loaded diffusers pipeline, and describe what was loaded.

One entry point serves four kinds of name so the server, CLI and tests never special-case them:
the trained ``shapes-sdxl`` model shipped inside the package, the built-in tiny models (built once,
cached on disk as ordinary diffusers directories), local diffusers directories, and hub ids. Every failure surfaces as ``ModelLoadError`` naming what was
tried, so the server can report a bad ``--model`` precisely instead of as an internal error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline  # not the top level: see tiny.py

from deft_runtime.errors import ModelLoadError
from deft_runtime.library_logs import no_progress_bars
from deft_runtime.models.shapes import SHAPES_MODEL_DIR, SHAPES_MODEL_NAME
from deft_runtime.models.tiny import TINY_MODELS, ensure_omnigen_support

__all__ = [
    "TINY_MODEL_VERSION",
    "architecture_of",
    "builtin_model_names",
    "default_cache_dir",
    "denoiser_of",
    "ensure_tiny_model",
    "load_pipeline",
]

# Bump when a tiny builder changes, so stale cached weights are never mistaken for current ones.
TINY_MODEL_VERSION = "v1"


def default_cache_dir() -> Path:
    """``$DEFT_CACHE_DIR`` if set (tests point it at a temp dir), else ``~/.cache/deft/models``."""
    configured = os.environ.get("DEFT_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "deft" / "models"


def _is_saved_pipeline(directory: Path) -> bool:
    """A directory counts as saved once ``model_index.json`` exists (it is renamed in whole)."""
    return (directory / "model_index.json").is_file()


def ensure_tiny_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Build the tiny pipeline ``name`` (seed 0) into ``<cache_dir>/<name>-v1`` unless already there.

    The pipeline is saved into a fresh temp directory beside the target and moved into place with
    one ``os.replace``, so concurrent processes either see a complete directory or none. If another
    process wins the race, its (identical) copy is kept and ours is discarded.
    """
    if name not in TINY_MODELS:
        raise ModelLoadError(f"unknown tiny model {name!r}; the built-in ones are {sorted(TINY_MODELS)}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"{name}-{TINY_MODEL_VERSION}"
    if _is_saved_pipeline(target):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=root))
    except OSError as e:
        raise ModelLoadError(f"cannot create the model cache directory {root}: {e}") from e
    try:
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a published cache should be readable
        TINY_MODELS[name](0).save_pretrained(staging, safe_serialization=True)
        _publish(staging, target)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"could not build and save tiny model {name!r} into {target}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path) -> None:
    """Atomically rename ``staging`` to ``target``; losing a race to an identical copy is fine."""
    try:
        os.replace(staging, target)
    except OSError as e:
        if _is_saved_pipeline(target):
            return
        if target.exists():
            raise ModelLoadError(
                f"{target} exists but is not a saved pipeline (no model_index.json); delete it and retry"
            ) from e
        raise ModelLoadError(f"could not move the saved tiny model into {target}: {e}") from e


def _looks_like_path(model: str) -> bool:
    """True for names that can only mean a filesystem location, never a hub id like ``org/name``."""
    return (
        model.startswith(("/", "./", "../", "~", "\\"))
        or model in (".", "..")
        or model.count("/") >= 2
        or os.path.exists(os.path.expanduser(model))
    )


def builtin_model_names() -> list[str]:
    """Every name ``load_pipeline`` resolves without a path or the hub."""
    return [SHAPES_MODEL_NAME, *sorted(TINY_MODELS)]


def _resolve(model: str, cache_dir: str | os.PathLike[str] | None) -> tuple[str, str]:
    """Map ``model`` to (what ``from_pretrained`` gets, a description of it for error messages)."""
    if model == SHAPES_MODEL_NAME:
        if not _is_saved_pipeline(SHAPES_MODEL_DIR):
            raise ModelLoadError(
                f"the {SHAPES_MODEL_NAME!r} weights are missing from this install ({SHAPES_MODEL_DIR} has "
                "no model_index.json); reinstall deft, or train them with "
                "`python -m deft_runtime.scenes.train_base --out DIR` and pass DIR/pipeline"
            )
        return str(SHAPES_MODEL_DIR), f"built-in trained model {SHAPES_MODEL_NAME!r}"
    if model in TINY_MODELS:
        return str(ensure_tiny_model(model, cache_dir)), f"built-in tiny model {model!r}"
    local = Path(model).expanduser()
    if local.is_dir():
        return str(local), f"local diffusers directory {str(local)!r}"
    if _looks_like_path(model):
        kind = "is a file, not a diffusers directory" if local.exists() else "does not exist"
        raise ModelLoadError(
            f"model {model!r} looks like a local path but {kind}; pass a directory written by "
            f"save_pretrained, a hub id such as 'org/name', or one of {builtin_model_names()}"
        )
    return model, f"hub model {model!r}"


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: recent diffusers take ``dtype`` and warn on ``torch_dtype``.

    Older releases only know ``torch_dtype`` and would silently ignore ``dtype`` (loading float32),
    so the new name is used only where diffusers has the helper that resolves it.
    """
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_pipeline(
    model: str,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> DiffusionPipeline:
    """Load ``model`` (built-in name, local diffusers directory, or hub id) onto ``device``.

    Progress bars are disabled, the loading ones (diffusers' components, transformers' weights) for the
    process: a serving runtime would otherwise print one per request, every command a few per load.
    """
    no_progress_bars()
    source, description = _resolve(model, cache_dir)
    ensure_omnigen_support()  # OmniGen directories need it whichever way they are named
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **_dtype_kwarg(torch_dtype))
    except Exception as e:
        raise ModelLoadError(f"could not load {description} with diffusers: {e}") from e
    try:
        pipe = pipe.to(device)
    except Exception as e:
        raise ModelLoadError(f"loaded {description} but could not move it to device {device!r}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The network adapters attach to: ``pipe.unet`` (SDXL-style) or ``pipe.transformer`` (DiT-style)."""
    for attribute in ("unet", "transformer"):
        module = getattr(pipe, attribute, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ModelLoadError(
        f"{type(pipe).__name__} has neither a 'unet' nor a 'transformer' module, so deft has no "
        "denoiser to attach adapters to"
    )


def architecture_of(pipe: DiffusionPipeline) -> str:
    """``"sdxl"``, ``"omnigen"``, or the pipeline class name for anything else.

    Adapters record the architecture they were trained for; matching on the class hierarchy (by
    name, so no pipeline module has to be imported) also covers SDXL img2img/inpaint variants.
    """
    for cls in type(pipe).__mro__:
        if cls.__name__.startswith("StableDiffusionXL"):
            return "sdxl"
        if cls.__name__.startswith("OmniGen"):
            return "omnigen"
    return type(pipe).__name__
