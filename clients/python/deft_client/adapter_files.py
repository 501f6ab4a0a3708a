"""What the client uploads for a path the user gives: a file, a PEFT directory, or the one adapter a
folder holds (:mod:`deft_files.folders`: a ``deft train`` output folder uploads its
``adapter.deft.safetensors``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from deft_client.denoiser_only import denoiser_part
from deft_client.errors import DeftError
from deft_files.folders import adapter_in_folder


@dataclass(frozen=True)
class UploadSource:
    """The file or PEFT directory to upload, and how messages name it (the user's own names: the
    server sees only ``label``, never a path)."""

    path: Path
    label: str


@contextmanager
def prepared_upload(path: str | os.PathLike[str], denoiser_only: bool = False) -> Iterator[UploadSource]:
    """The adapter to upload for ``path`` (with ``denoiser_only``, a copy without text-encoder layers:
    see :mod:`deft_client.denoiser_only`); :class:`DeftError` (INVALID_ARGUMENT) naming what is wrong."""
    with contextlib.ExitStack() as stack:
        try:
            source = _resolve(Path(path).expanduser())
            upload = stack.enter_context(denoiser_part(source.path, source.label, denoiser_only))
        except OSError as e:
            raise DeftError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read {path}: {e}") from e
        except ValueError as e:
            raise DeftError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        yield UploadSource(upload, source.label)


def _resolve(path: Path) -> UploadSource:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    name = path.resolve().name  # "." names the folder it is
    if not path.is_dir():
        with path.open("rb"):  # unreadable: fail now, not halfway through a stream
            return UploadSource(path, name)
    inner = adapter_in_folder(path)  # AdapterFolderError (a ValueError) listing what it holds
    return UploadSource(inner, name if inner == path else f"{name}/{inner.name}")
