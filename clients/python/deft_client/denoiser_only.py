"""``register_adapter(..., denoiser_only=True)``: upload a LoRA file without its text-encoder layers.

deft applies adapters to the denoiser only and refuses LoRA files with text-encoder layers (kohya/A1111
``lora_te1_…``/``lora_te2_…``, diffusers ``text_encoder.``/``text_encoder_2.``). With ``denoiser_only``
the client copies the ``.safetensors`` file without those tensors (plain byte copies, no tensor
library needed), uploads the copy, and warns with :class:`DroppedLayersWarning` naming what it left
out. The registered sha256 is the copy's.
"""

from __future__ import annotations

import json
import struct
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from deft_files.text_encoder_keys import describe_dropped, dropped_layers, text_encoder_prefix

MAX_HEADER_BYTES = 100 * 1024**2


class DroppedLayersWarning(UserWarning):
    """``denoiser_only`` left text-encoder layers out of an upload; the message says which."""


def _read_header(f: IO[bytes], name: str) -> tuple[int, dict[str, Any]]:
    head = f.read(8)
    (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
    raw = f.read(length) if 0 < length <= MAX_HEADER_BYTES else b""
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ValueError(
            f"{name} is not a safetensors file; --denoiser-only applies to LoRA .safetensors files"
        )
    return 8 + length, header


def copy_without_text_encoder(source: Path, out: IO[bytes], name: str) -> str | None:
    """Write ``source`` (a safetensors file) to ``out`` without its text-encoder tensors; what was left
    out (``"36 text-encoder layers (lora_te1_: 24, lora_te2_: 12)"``), or None when nothing was."""
    with source.open("rb") as f:
        data_start, header = _read_header(f, name)
        dropped = dropped_layers(header)
        if not dropped:
            return None
        kept = {k: v for k, v in header.items() if text_encoder_prefix(k) is None}
        ranges = {k: _offsets(v, k, name) for k, v in kept.items() if k != "__metadata__"}
        offset, spans = 0, []
        for key in sorted(ranges, key=lambda k: ranges[k]):
            begin, end = ranges[key]
            kept[key] = {**kept[key], "data_offsets": [offset, offset + end - begin]}
            spans.append((data_start + begin, end - begin))
            offset += end - begin
        encoded = json.dumps(kept, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # tensor data stays 8-byte aligned
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for start, size in spans:
            f.seek(start)
            _copy(f, out, size, name)
    return describe_dropped(dropped)


def _copy(f: IO[bytes], out: IO[bytes], size: int, name: str) -> None:
    while size > 0:
        block = f.read(min(size, 1 << 20))
        if not block:
            raise ValueError(f"{name} is truncated: a tensor's bytes end before the file does")
        out.write(block)
        size -= len(block)


def _offsets(entry: object, key: str, name: str) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(
            f"{name}: tensor {key[:80]!r} has no valid data_offsets; it is not a safetensors file"
        )
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ValueError(f"{name}: tensor {key[:80]!r} has data_offsets {offsets}; the file is damaged")
    return begin, end


@contextmanager
def denoiser_part(path: Path, label: str, denoiser_only: bool) -> Iterator[Path]:
    """``path``, or with ``denoiser_only`` a temporary copy without text-encoder layers (warning with
    :class:`DroppedLayersWarning` about what was left out)."""
    if not denoiser_only:
        yield path
        return
    if path.is_dir():
        raise ValueError(f"--denoiser-only applies to a LoRA .safetensors file; {label} is a directory")
    with tempfile.TemporaryDirectory(prefix="deft-upload-") as tmp:
        copy = Path(tmp) / "denoiser.safetensors"
        with copy.open("wb") as out:
            dropped = copy_without_text_encoder(path, out, label)
        if dropped is None:
            yield path
            return
        warnings.warn(
            f"{label}: left out {dropped}; deft applies adapters to the denoiser only",
            DroppedLayersWarning,
            stacklevel=4,
        )
        yield copy
