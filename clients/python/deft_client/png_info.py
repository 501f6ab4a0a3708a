"""Generation parameters in PNG text chunks: what ``deft generate`` writes into every PNG, and reads
back with ``--from-png``.

Two chunks (UTF-8 ``iTXt``):

- ``deft.generation``: one JSON object, :class:`GenerationRecord`'s fields and ``"format":
  "deft.generation/1"``. ``guidance_scale`` and ``model`` are what the server's result reports
  it used (``null`` only from servers too old to say). Image ``image_index`` of ``num_images`` came from one
  request with that seed: all images of a request are drawn from one generator (as diffusers does), so
  image *i* is reproduced by the same request (same seed, ``num_images``, parameters and adapters, on
  the same base model) and taking its image *i*, which is what ``--from-png`` does. An
  image-conditioned request also records the sha256 of each input image (``input_images``) and of
  its mask (``mask_image``), with ``strength`` and ``image_guidance_scale`` (``null``: the server's
  default); these keys are left out of text-to-image records.
- ``parameters``: the same in the A1111 text convention (``prompt``, ``Negative prompt: ...``, then
  ``Steps: .., CFG scale: .., Seed: .., Size: WxH, ...``) for image viewers; never read back.

Pure Python (Pillow only), usable with images from :meth:`DeftClient.generate` too.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from PIL import Image, PngImagePlugin

FORMAT = "deft.generation/1"
KEY = "deft.generation"
A1111_KEY = "parameters"
_CONDITIONING = ("input_images", "mask_image", "strength", "image_guidance_scale")


@dataclass(frozen=True)
class AdapterUse:
    name: str
    weight: float
    sha256: str  # the registry's sha256: of the bytes that were uploaded (deft adapters show)


@dataclass(frozen=True)
class GenerationRecord:
    """What one image was generated with."""

    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    negative_prompt: str | None = None
    guidance_scale: float | None = None  # None: the model's default (an older server did not say which)
    adapters: list[AdapterUse] = field(default_factory=list)
    num_images: int = 1
    image_index: int = 0
    model: str | None = None  # the server's base model (``Result.model``; None from older servers)
    deft_version: str = ""
    input_images: list[str] = field(default_factory=list)  # sha256 of each input image, in order
    mask_image: str | None = None  # sha256 of the inpainting mask
    strength: float | None = None
    image_guidance_scale: float | None = None

    def to_json(self) -> str:
        record = asdict(self)
        if not self.input_images:  # text-to-image: the conditioning keys are left out
            for key in _CONDITIONING:
                del record[key]
        return json.dumps({"format": FORMAT, **record}, ensure_ascii=False)

    def a1111_text(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        settings = [f"Steps: {self.steps}"]
        if self.guidance_scale is not None:
            settings.append(f"CFG scale: {self.guidance_scale:g}")
        settings += [f"Seed: {self.seed}", f"Size: {self.width}x{self.height}"]
        if self.strength is not None:
            settings.append(f"Denoising strength: {self.strength:g}")
        if self.num_images > 1:
            settings.append(f"Batch size: {self.num_images}, Batch pos: {self.image_index}")
        if self.model:
            settings.append(f"Model: {self.model}")
        if self.adapters:
            uses = ", ".join(f"{a.name}:{a.weight:g}:{a.sha256[:12]}" for a in self.adapters)
            settings.append(f'Adapters: "{uses}"')
        settings.append(f"Version: deft {self.deft_version}")
        return "\n".join([*lines, ", ".join(settings)])

    def png_info(self) -> PngImagePlugin.PngInfo:
        info = PngImagePlugin.PngInfo()
        info.add_itxt(KEY, self.to_json())
        info.add_itxt(A1111_KEY, self.a1111_text())
        return info

    @classmethod
    def from_json(cls, text: str) -> GenerationRecord:
        """Parse the ``deft.generation`` chunk (ValueError with the reason when it is not one)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"its {KEY} chunk is not JSON ({e})") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError(f"its {KEY} chunk is not {FORMAT}")
        known = {f.name for f in fields(cls)}
        try:
            adapters = [AdapterUse(**a) for a in data.pop("adapters", [])]
            return cls(**{k: v for k, v in data.items() if k in known}, adapters=adapters)
        except TypeError as e:
            raise ValueError(f"its {KEY} chunk lacks a field or has a wrong one ({e})") from None


def read_record(path: str | os.PathLike[str]) -> GenerationRecord:
    """The record in the PNG at ``path`` (ValueError naming the file when it has none)."""
    try:
        with Image.open(path) as image:
            text: Any = getattr(image, "text", {}).get(KEY)
    except (OSError, Image.UnidentifiedImageError) as e:
        raise ValueError(f"cannot read {os.fspath(path)!r} as an image ({e})") from None
    if text is None:
        raise ValueError(f"{os.fspath(path)!r} has no {KEY} text chunk (not a PNG written by deft generate)")
    try:
        return GenerationRecord.from_json(text)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)!r}: {e}") from None
