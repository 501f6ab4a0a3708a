"""Reading adapter tensors safely: safetensors only, size-limited, never unpickled.

A safetensors file is ``[8-byte little-endian header length][JSON header][raw tensor bytes]``. The
header is checked by hand before the library touches the file, so a hostile or truncated upload fails
with a precise error instead of a large allocation or an opaque library message.
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deft_runtime.errors import (
    AdapterDtypeError,
    AdapterFormatError,
    AdapterTooLarge,
    UnsafeAdapterFormat,
    shorten,
)
from deft_runtime.formats.fields import parse_json
from deft_runtime.formats.file_modes import publish

#: Suffixes of pickle-based checkpoints: refused before a single byte is parsed.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container wraps a pickle
#: safetensors dtypes an adapter tensor may have (float8 and integer tensors are refused).
ACCEPTED_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_TENSOR_NAME_CHARS = 1024
MAX_TENSORS = 100_000


@dataclass(frozen=True)
class ReadLimits:
    """Upper bounds on what an adapter file may be (configurable by the server)."""

    max_file_bytes: int = 2 * 1024**3
    max_header_bytes: int = 16 * 1024**2


DEFAULT_LIMITS = ReadLimits()


def refuse_pickle(path: Path, label: str | None = None) -> None:
    """Raise :class:`UnsafeAdapterFormat` for pickle-based files, by suffix or by content (``label``:
    how messages name the file, by default its name)."""
    label = label or path.name
    reason = "pickle can run arbitrary code when loaded, so deft never unpickles adapter files"
    fix = "convert it once, in a trusted environment, with safetensors.torch.save_file"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeAdapterFormat(f"{label}: {path.suffix} files are pickle-based; {reason}. Please {fix}.")
    with path.open("rb") as f:
        head = f.read(9)
    looks_like_safetensors = head[8:9] == b"{"  # 8-byte length, then the JSON header
    if not looks_like_safetensors and (head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80"):
        raise UnsafeAdapterFormat(f"{label} is a pickle (torch.save) file; {reason}. Please {fix}.")


def read_header(
    path: Path, limits: ReadLimits = DEFAULT_LIMITS, label: str | None = None
) -> dict[str, object]:
    """Check size limits and parse the JSON header of a safetensors file (``label``: as in
    :func:`refuse_pickle`)."""
    label = label or path.name
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise AdapterTooLarge(
            f"{label} is {size} bytes, above the limit of {limits.max_file_bytes} bytes for an adapter file"
        )
    if size < 8:
        raise AdapterFormatError(f"{label} is {size} bytes: too short to be a safetensors file")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:  # checked first: garbage bytes are "not safetensors", not "too large"
            raise AdapterFormatError(
                f"{label}: header claims {header_len} bytes but the file has {size - 8} after its length; "
                "the file is truncated or not a safetensors file"
            )
        if header_len > limits.max_header_bytes:
            raise AdapterTooLarge(
                f"{label}: safetensors header of {header_len} bytes is above the limit of "
                f"{limits.max_header_bytes} bytes"
            )
        raw = f.read(header_len)
    header = parse_json(raw, f"{label}: the safetensors header")
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{label}: the safetensors header is not a JSON object")
    _check_entries(label, header)
    return header


def _check_entries(file: str, header: dict[str, object]) -> None:
    """Names, count and dtypes of the tensors, before the library reads a byte of their data."""
    if len(header) > MAX_TENSORS:
        raise AdapterFormatError(f"{file} has {len(header)} tensors; at most {MAX_TENSORS} are accepted")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if len(name) > MAX_TENSOR_NAME_CHARS:
            raise AdapterFormatError(
                f"{file}: tensor name {shorten(name)} has {len(name)} characters; at most "
                f"{MAX_TENSOR_NAME_CHARS} are accepted"
            )
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            raise AdapterFormatError(
                f"{file}: the header entry of tensor {shorten(name)} must be an object with a string "
                f"dtype, a shape and data_offsets; found {shorten(entry)}"
            )
        if entry["dtype"] not in ACCEPTED_DTYPES:
            raise AdapterDtypeError(
                f"{file}: tensor {shorten(name)} has dtype {shorten(entry['dtype'], 16, quote=False)}; adapter "
                f"tensors must be floating point: {', '.join(ACCEPTED_DTYPES[:-1])} or {ACCEPTED_DTYPES[-1]}"
            )


def read_safetensors(
    path: str | os.PathLike[str], limits: ReadLimits = DEFAULT_LIMITS, label: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return ``(tensors, metadata)`` of a safetensors file after the safety checks above. Messages
    name the file ``label`` (a server passes the name of the user's file, not its temporary copy's)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"{label or path} does not exist or is not a file")
    label = label or path.name
    refuse_pickle(path, label)
    header = read_header(path, limits, label)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{label}: __metadata__ must map strings to strings")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise AdapterFormatError(
            f"{label} is not a readable safetensors file: {shorten(str(e), 200, quote=False)}"
        ) from e
    return tensors, dict(metadata)


def write_safetensors_atomic(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write a safetensors file through a temporary sibling and ``os.replace``: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per writer (threads of one process may write the same content-addressed file at once); the
    # pid stays last, where garbage collection reads it to tell a live writer's file from a crash's
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}-{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(publish(tmp), path)  # safetensors writes 0600
    finally:
        tmp.unlink(missing_ok=True)
    return path
