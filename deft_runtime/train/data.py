"""Training images: discovery and checks, captions, DreamBooth transforms, and a counter-based sampler.

Every random choice of a run is *counter-based*: step ``s`` draws from a generator seeded with
``derive_seed(seed, purpose, s)`` (``purpose`` names the stream: data order, per-step augmentation
and noise, class images). Nothing carries over between steps, so a resumed run needs only the step
number to reproduce the rest of an uninterrupted one exactly, and batch ``s`` does not depend on how
many images an earlier step looked at.

Sampling: all images of all concepts form one dataset (multi-concept training = one joint adapter);
each epoch visits every image once in a seeded random order. With prior preservation each batch is
``batch_size`` instance rows followed by ``batch_size`` class rows, drawn the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from deft_runtime.train.config import Concept, TrainingInputError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_SUFFIX = ".txt"


class DatasetError(TrainingInputError):
    """A training-image folder is missing, empty, or holds an unreadable image."""


def derive_seed(seed: int, purpose: str, index: int) -> int:
    """A 63-bit seed for stream ``purpose`` at ``index``; streams are independent of each other."""
    digest = hashlib.sha256(f"deft-train:{seed}:{purpose}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_generator(seed: int, purpose: str, index: int) -> torch.Generator:
    """A CPU generator for ``(seed, purpose, index)`` (CPU so results do not depend on the device)."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, index))


@dataclass(frozen=True)
class Example:
    """One training image (decoded, EXIF-rotated, RGB) and its prompt."""

    path: Path
    prompt: str
    image: Image.Image


def image_files(folder: Path, what: str) -> list[Path]:
    """The image files directly in ``folder`` (sorted), or a :class:`DatasetError` saying what is wrong."""
    if not folder.exists():
        raise DatasetError(f"{what} folder {folder} does not exist")
    if not folder.is_dir():
        raise DatasetError(f"{what} {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    files = [p for p in files if not p.name.startswith(".")]
    if not files:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise DatasetError(f"{what} folder {folder} holds no images (looked for {suffixes})")
    return files


def read_image(path: Path) -> Image.Image:
    """Decode ``path`` fully (so a truncated file fails here, not mid-training), upright and RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return (upright if upright is not None else image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path} is not a readable image ({e}); remove or replace it") from e


def caption_of(path: Path, default: str) -> str:
    """The text of ``<stem>.txt`` beside the image (it replaces the concept prompt), else ``default``."""
    caption = path.with_suffix(CAPTION_SUFFIX)
    if not caption.is_file():
        return default
    try:
        text = caption.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"caption {caption} is not readable UTF-8 text ({e})") from e
    return text or default


def load_concept(concept: Concept, what: str = "instance") -> list[Example]:
    return [
        Example(path, caption_of(path, concept.prompt), read_image(path))
        for path in image_files(concept.data_dir, what)
    ]


def load_concepts(concepts: Sequence[Concept]) -> list[Example]:
    """All images of all concepts, checked and decoded (raises before any model is loaded)."""
    return [example for concept in concepts for example in load_concept(concept)]


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``resolution``, flip (p = ½) if enabled, crop a square.

    Returns the ``[3, res, res]`` tensor in ``[-1, 1]`` plus SDXL's micro-conditioning inputs: the
    original ``(height, width)`` and the crop's ``(top, left)`` in the resized (and flipped) image.
    Two uniforms are drawn per image whatever the flags, so flags never shift later random draws.
    """

    resolution: int
    center_crop: bool = False
    random_flip: bool = False

    def __call__(
        self, image: Image.Image, generator: torch.Generator
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        res = self.resolution
        flip_draw, crop_draw = torch.rand(2, generator=generator).tolist()
        width, height = image.size
        factor = res / min(width, height)
        resized = image.resize(
            (max(res, round(width * factor)), max(res, round(height * factor))), Image.Resampling.BILINEAR
        )
        if self.random_flip and flip_draw < 0.5:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top, left = self._crop_origin(resized.size, crop_draw)
        square = resized.crop((left, top, left + res, top + res))
        array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0  # [res, res, 3]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (height, width), (top, left)

    def _crop_origin(self, size: tuple[int, int], draw: float) -> tuple[int, int]:
        width, height = size
        spare_h, spare_w = height - self.resolution, width - self.resolution
        if self.center_crop:
            return round(spare_h / 2), round(spare_w / 2)
        # one uniform places the crop along the longer side (the other side has no slack)
        return int(draw * (spare_h + 1)), int(draw * (spare_w + 1))


@dataclass
class Batch:
    """One training batch: instance rows first, then class rows (prior preservation)."""

    pixels: torch.Tensor  # [b, 3, res, res] in [-1, 1]
    prompts: list[str]
    original_sizes: list[tuple[int, int]]
    crop_origins: list[tuple[int, int]]
    num_instance: int

    @property
    def size(self) -> int:
        return len(self.prompts)


def epoch_indices(count: int, step: int, batch_size: int, seed: int, purpose: str) -> list[int]:
    """Dataset indices of batch ``step``: position ``k = step·batch_size + j`` of epoch ``k // count``."""
    indices = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, position = divmod(k, count)
        order = torch.randperm(count, generator=seeded_generator(seed, purpose, epoch))
        indices.append(int(order[position]))
    return indices


class TrainingData:
    """Instance (and optional class) examples, sampled per step without any carried-over state."""

    def __init__(
        self,
        instances: Sequence[Example],
        transform: ImageTransform,
        *,
        batch_size: int,
        seed: int,
        classes: Sequence[Example] = (),
    ) -> None:
        self.instances = list(instances)
        self.classes = list(classes)
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed

    @property
    def has_prior(self) -> bool:
        return bool(self.classes)

    def prompts(self) -> list[str]:
        """Every distinct prompt, in first-seen order (for encoding them once before training)."""
        return list(dict.fromkeys(e.prompt for e in [*self.instances, *self.classes]))

    def batch(self, step: int, generator: torch.Generator) -> Batch:
        """Batch ``step``; ``generator`` (the step's own) drives flips and crops."""
        chosen = [self.instances[i] for i in self._indices(len(self.instances), step, "instances")]
        if self.classes:
            chosen += [self.classes[i] for i in self._indices(len(self.classes), step, "classes")]
        rows = [self.transform(example.image, generator) for example in chosen]
        return Batch(
            pixels=torch.stack([pixels for pixels, _, _ in rows]),
            prompts=[example.prompt for example in chosen],
            original_sizes=[size for _, size, _ in rows],
            crop_origins=[origin for _, _, origin in rows],
            num_instance=self.batch_size,
        )

    def _indices(self, count: int, step: int, purpose: str) -> list[int]:
        return epoch_indices(count, step, self.batch_size, self.seed, purpose)
