"""What the client uploads for a path the user gives: a file, a PEFT directory, or the one adapter a
folder holds (a ``deft train`` output folder holds ``adapter.deft.safetensors`` and its ``peft/``
export: the deft file is the adapter)."""

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

PEFT_CONFIG = "adapter_config.json"
#: what ``deft train --out DIR`` writes: the adapter, and the same adapter exported for PEFT
TRAINING_ADAPTER, TRAINING_PEFT_DIR = "adapter.deft.safetensors", "peft"
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_LISTED = 10  # entries a message names before "and N more"


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
    if (path / PEFT_CONFIG).is_file():
        return UploadSource(path, name)
    found = adapters_in(path)
    if len(found) == 1:
        return UploadSource(found[0], f"{name}/{found[0].name}")
    raise ValueError(_folder_message(path, found))


def _is_adapter(path: Path) -> bool:
    if path.is_dir():
        return (path / PEFT_CONFIG).is_file()
    return path.suffix == ".safetensors"


def adapters_in(folder: Path) -> list[Path]:
    """The adapters directly inside ``folder``: ``.safetensors`` files and PEFT directories (the
    ``peft/`` export beside a training output's ``adapter.deft.safetensors`` is the same adapter)."""
    found = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and _is_adapter(p))
    names = {p.name for p in found}
    if TRAINING_ADAPTER in names and TRAINING_PEFT_DIR in names:
        found = [p for p in found if p.name != TRAINING_PEFT_DIR]
    return found


def _listing(paths: list[Path]) -> str:
    shown = [f"{p.name}/" if p.is_dir() else p.name for p in paths[:_LISTED]]
    more = f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
    return ", ".join(shown) + more


def _folder_message(folder: Path, found: list[Path]) -> str:
    if found:
        return (
            f"{folder} holds {len(found)} adapters ({_listing(found)}); pass the one to register, "
            f"e.g. {folder / found[0].name}"
        )
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    pickles = [p for p in entries if p.suffix.lower() in _PICKLE_SUFFIXES]
    hint = (
        f" ({_listing(pickles)}: pickle files are refused; convert them with safetensors.torch.save_file)"
        if pickles
        else ""
    )
    holds = f"it holds {_listing(entries)}{hint}" if entries else "it is empty"
    return (
        f"{folder} holds no adapter: expected a PEFT directory ({PEFT_CONFIG} + "
        f"adapter_model.safetensors), a `deft train` output ({TRAINING_ADAPTER}), or one .safetensors "
        f"file; {holds}"
    )
