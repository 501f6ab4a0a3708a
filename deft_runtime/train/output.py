"""The finished run's output directory, written all at once.

::

    <out>/
        adapter.deft.safetensors   deft's own format (always)
        peft/                      PEFT directory: LoRA (a LoraConfig), or DEFT/PaRa in the modes PEFT
                                   implements (relu, qr; no gate)
        training.json              config, result summary, base fingerprint, which files were written
        train_log.jsonl            one JSON object per step (step, loss, learning rates, seconds)
        validation/                validation samples, if any

Everything is written into a hidden temporary directory beside ``<out>`` and renamed into place, so
``<out>`` either does not exist or is complete: a crashed run never leaves something that looks like
a finished adapter. ``--overwrite`` replaces an existing ``<out>`` only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deft_runtime.adapter import Adapter, AdapterKind
from deft_runtime.formats import save_adapter
from deft_runtime.formats.file_modes import publish
from deft_runtime.formats.peft import PEFT_WRITABLE_MODES

ADAPTER_FILE = "adapter.deft.safetensors"
PEFT_DIR = "peft"
SUMMARY_FILE = "training.json"
LOG_FILE = "train_log.jsonl"
VALIDATION_DIR = "validation"


def peft_unsupported_reason(adapter: Adapter) -> str | None:
    """Why PEFT cannot load this adapter (``None`` if it can: every LoRA adapter can)."""
    if adapter.kind is AdapterKind.LORA:
        return None
    if adapter.decomposition not in PEFT_WRITABLE_MODES:
        mode = adapter.decomposition.value if adapter.decomposition else "none"
        return f"PEFT's DEFT tuner implements relu and qr, not {mode}"
    if any(layer.gate is not None for layer in adapter.layers.values()):
        return "PEFT's DEFT tuner has no gate"
    return None


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes ``out`` (replacing an old one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        publish(staging)  # mkdtemp and safetensors make owner-only folders and files
        retired = None
        if out.exists():
            retired = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, retired)
        os.replace(staging, out)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_output(
    out: Path,
    adapter: Adapter,
    summary: dict[str, Any],
    *,
    log_file: Path | None,
    validation_dir: Path | None,
    base_model_name: str,
) -> list[Path]:
    """Write the whole output directory atomically; return the paths written (relative to ``out``)."""
    with staged_directory(out) as staging:
        save_adapter(adapter, staging / ADAPTER_FILE, format="deft")
        reason = peft_unsupported_reason(adapter)
        if reason is None:
            save_adapter(adapter, staging / PEFT_DIR, format="peft", base_model_name_or_path=base_model_name)
        if log_file is not None and log_file.is_file():
            shutil.copy2(log_file, staging / LOG_FILE)
        if validation_dir is not None and validation_dir.is_dir():
            shutil.copytree(validation_dir, staging / VALIDATION_DIR)
        written = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        document = {**summary, "files": [*written, SUMMARY_FILE], "peft": reason or "written"}
        (staging / SUMMARY_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    return [Path(p) for p in document["files"]]
