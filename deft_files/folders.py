"""The adapter a folder holds: the folder itself when it is a PEFT directory, else the one adapter
directly inside it. A ``deft train`` output folder holds ``adapter.deft.safetensors`` and its ``peft/``
export (the same adapter): the deft file is the adapter. Zero or several adapters: an error listing
what the folder holds.

Pure Python (no torch): the client resolves a folder with it before uploading, and
:func:`deft_runtime.formats.load_adapter` before reading; both turn :class:`AdapterFolderError` into
their own error types.
"""

from __future__ import annotations

from pathlib import Path

PEFT_CONFIG = "adapter_config.json"
#: what ``deft train --out DIR`` writes: the adapter, and the same adapter exported for PEFT
TRAINING_ADAPTER, TRAINING_PEFT_DIR = "adapter.deft.safetensors", "peft"
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_LISTED = 10  # entries a message names before "and N more"


class AdapterFolderError(ValueError):
    """A folder holds no adapter or several; the message lists what it holds."""


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


def adapter_in_folder(folder: Path, label: str | None = None) -> Path:
    """``folder`` when it is a PEFT directory, else the one adapter inside it; messages name the folder
    ``label`` (default: its path)."""
    if (folder / PEFT_CONFIG).is_file():
        return folder
    found = adapters_in(folder)
    if len(found) == 1:
        return found[0]
    raise AdapterFolderError(_folder_message(folder, label or str(folder), found))


def _listing(paths: list[Path]) -> str:
    shown = [f"{p.name}/" if p.is_dir() else p.name for p in paths[:_LISTED]]
    more = f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
    return ", ".join(shown) + more


def _folder_message(folder: Path, label: str, found: list[Path]) -> str:
    if found:
        return (
            f"{label} holds {len(found)} adapters ({_listing(found)}); pass the one to use, e.g. "
            f"{label}/{found[0].name}"
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
        f"{label} holds no adapter: expected a PEFT directory ({PEFT_CONFIG} + "
        f"adapter_model.safetensors), a `deft train` output ({TRAINING_ADAPTER}), or one .safetensors "
        f"file; {holds}"
    )
