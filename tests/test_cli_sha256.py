"""One identity for an adapter everywhere: the sha256 ``deft adapters register`` prints, ``deft
adapters show`` lists and ``deft export-onnx`` prints is the sha256 of the uploaded bytes (for a
folder, of the adapter file in it that is uploaded) — checked with hashlib, the real executable and a
real server."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess

import pytest
from conftest import DEFT_EXECUTABLE

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.formats import save_adapter
from deft_runtime.testing import random_adapter

LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def deft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DEFT_EXECUTABLE), *args], capture_output=True, text=True, timeout=600)


def test_register_show_and_export_print_the_same_sha256(server_factory, tiny_model_cache, tmp_path):
    pytest.importorskip("onnxscript")
    adapter = random_adapter(AdapterKind.DEFT, {LAYER: (64, 64)}, rank=2, decomposition=Decomposition.RELU)
    folder = tmp_path / "dog-adapter"  # shaped like a deft train output folder
    folder.mkdir()
    path = save_adapter(adapter, folder / "adapter.deft.safetensors")
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    server = server_factory.start()
    registered = deft("adapters", "register", "dog", str(folder), "--server", server.address)
    assert registered.returncode == 0, registered.stderr
    assert f"sha256 {want}" in registered.stdout
    shown = json.loads(deft("adapters", "show", "dog", "--json", "--server", server.address).stdout)
    assert shown["sha256"] == want
    exported = deft(
        *("export-onnx", "--model", "tiny-sdxl", "--cache-dir", str(tiny_model_cache), "--no-validate"),
        *("--adapter", str(folder), "--adapter", f"{path}:0.5", "--adapter", "dog:0.25"),
        *("--data-dir", str(server.data_dir), "--out", str(tmp_path / "onnx")),
    )
    assert exported.returncode == 0, exported.stderr
    printed = re.findall(r"sha256 ([0-9a-f]{64})", exported.stdout)
    assert printed == [want, want, want], exported.stdout
    assert "(of the registered bytes)" in exported.stdout
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["adapters"][2]["source_sha256"] == want
