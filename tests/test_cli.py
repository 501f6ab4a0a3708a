"""The `deft` command line on local adapter files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.cli import app
from deft_runtime.formats import load_adapter, save_adapter
from deft_runtime.testing import random_adapter

runner = CliRunner()
SHAPES = {"attn.to_q": (8, 8), "attn.to_v": (8, 6)}


def test_inspect_prints_kind_ranks_and_layers(tmp_path):
    path = save_adapter(
        random_adapter(AdapterKind.DEFT, SHAPES, rank=2, decomposition=Decomposition.QR),
        tmp_path / "a.deft.safetensors",
    )
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "deft (qr) adapter on 2 layers, ranks [2]" in result.output
    assert "attn.to_v" in result.output


def test_convert_to_peft_and_back(tmp_path):
    adapter = random_adapter(AdapterKind.PARA, SHAPES, rank=2, decomposition=Decomposition.QR)
    src = save_adapter(adapter, tmp_path / "a.deft.safetensors")
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "peft"), "--to", "peft"])
    assert result.exit_code == 0, result.output
    back = load_adapter(tmp_path / "peft")
    assert back.kind is AdapterKind.PARA
    for name, layer in adapter.layers.items():
        assert back.layers[name].P.equal(layer.P)


def test_errors_exit_non_zero_with_the_reason(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"\x80\x04.")
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 1
    assert "never unpickles" in result.output
    result = runner.invoke(app, ["convert", str(bad), str(tmp_path / "y"), "--to", "onnx"])
    assert result.exit_code == 1 and "--to must be 'deft' or 'peft'" in result.output


def test_console_script_is_installed():
    exe = str(Path(sys.executable).parent / "deft")  # the venv's console script; bin/ may not be on PATH
    out = subprocess.run([exe, "version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == __import__("deft_runtime").__version__
