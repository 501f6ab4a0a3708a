"""Shared benchmark plumbing: interleaved timing, machine info, JSON + markdown output."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, device: torch.device, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each function, measured round-robin (A, B, C, A, B, C, ...) so that drift in
    machine load hits every contender alike; ratios of these medians are what the reports quote."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    name: str, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS_DIR
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(markdown + "\n")
    return json_path, md_path


def load_snapshot() -> dict[str, float]:
    """The 1/5/15-minute load averages: how busy the shared machine was around a measurement."""
    one, five, fifteen = os.getloadavg()
    return {"load1": one, "load5": five, "load15": fifteen}


def run_suite(
    suite: str,
    name: str,
    measure: Callable[[Path], dict[str, Any]],
    *,
    machine: Callable[[], dict[str, Any]],
    params: dict[str, Any],
    report: Callable[[str, dict[str, Any]], str],
    figure: Callable[[Path, dict[str, Any]], object] | None = None,
    workdir: Path | None = None,
    out_dir: Path = RESULTS_DIR,
) -> dict[str, Any]:
    """The one ``main`` of every suite, around its own ``measure(workdir)``.

    Measures in ``workdir`` (default: a fresh temporary folder, removed after), then records the
    machine with its load before and after, the parameters and the suite's wall time; draws
    ``out_dir/NAME.png`` when the suite has a ``figure(path, payload)``, writes
    ``out_dir/NAME.{json,md}`` (markdown from ``report(name, payload)``) and prints the markdown."""
    started, load_at_start = time.perf_counter(), load_snapshot()
    with tempfile.TemporaryDirectory(prefix="deft-bench-") as tmp:
        measured = measure(workdir or Path(tmp))
    payload: dict[str, Any] = {
        "suite": suite,
        "machine": {**machine(), "load_at_start": load_at_start, "load_at_end": load_snapshot()},
        "params": params,
        **measured,
        "suite_seconds": time.perf_counter() - started,
    }
    if figure is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        figure(out_dir / f"{name}.png", payload)
    markdown = report(name, payload)
    write_report(name, payload, markdown, out_dir)
    print(markdown)
    return payload


def string_params(args: Any, *, leave_out: Sequence[str] = ()) -> dict[str, str]:
    """A suite's command-line arguments as the report records them (secrets left out)."""
    return {k: str(v) for k, v in vars(args).items() if k not in leave_out}
