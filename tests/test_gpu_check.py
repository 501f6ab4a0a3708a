"""``benchmarks/gpu_check.sh`` without a GPU: every command it would run, in both its GPU mode and its
``--cpu-dry-run`` mode, is recorded by a stand-in Python and its flags are parsed by the suite's own
argument parser, so a typo in a flag fails here rather than on the first (rare, time-boxed) GPU run.
The dry run itself (``--cpu-dry-run``, about 15 minutes) is what runs the commands end to end."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import SUITES

ROOT = Path(__file__).resolve().parents[1]
RECORDER = """
import json, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:2] == ["-"]:
    sys.stdin.read()
    print("torch (recorded) device none")
"""


def _recorded_commands(tmp_path: Path, *flags: str) -> list[list[str]]:
    log = tmp_path / "commands.jsonl"
    (tmp_path / "record.py").write_text(RECORDER.format(log=str(log)))
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "record.py"}" "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python)}
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *flags, str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "results in" in done.stdout and (out / "machine.txt").exists()
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("mode", [(), ("--cpu-dry-run",)], ids=["gpu", "cpu-dry-run"])
def test_every_gpu_check_command_parses_with_its_suites_own_flags(tmp_path, mode):
    if shutil.which("timeout") is None:
        pytest.skip("gpu_check.sh caps its steps with coreutils' timeout")
    commands = _recorded_commands(tmp_path, *mode)
    suites = []
    for argv in commands:
        if argv[:1] == ["-"]:
            continue  # the machine description
        assert argv[0] == "-m", argv
        if argv[1] == "pytest":
            flags = argv[2:]
            assert "-m" in flags and flags[flags.index("-m") + 1] == "gpu", argv  # the GPU-marked tests
            continue
        assert argv[1] == "benchmarks" and argv[2] in SUITES, argv
        module = importlib.import_module(SUITES[argv[2]])
        module.parse_args(argv[3:])  # argparse exits (SystemExit) on an unknown or malformed flag
        suites.append(argv[2])
    expected = {"kernels", "mixed-vs-base", "adapters-scale", "cold-load", "compiled"}
    assert set(suites) == expected, suites
    if not mode:  # the GPU mode runs the GPU presets and devices
        text = " ".join(" ".join(c) for c in commands)
        assert "--preset sdxl" in text and "--device cuda" in text and "--preset gpu" in text
