"""``python -m benchmarks <suite> [options]``: one entry point for every suite."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "kernels": "benchmarks.kernels",
    "engine": "benchmarks.engine",
    "loadgen": "benchmarks.loadgen",
    "adapters-scale": "benchmarks.adapters_scale",
    "mixed-vs-base": "benchmarks.mixed_vs_base",
    "cold-load": "benchmarks.cold_load",
    "memory": "benchmarks.memory",
    "registry": "benchmarks.registry",
    "ray-affinity": "benchmarks.ray_affinity",
    "fairness": "benchmarks.fairness",
    "quality-base": "benchmarks.quality_base",
    "quality": "benchmarks.quality",
    "efficiency": "benchmarks.efficiency",
    "compiled": "benchmarks.compiled",
    "omnigen-rope": "benchmarks.omnigen_rope",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SUITES:
        print(f"usage: python -m benchmarks {{{','.join(SUITES)}}} [--help]", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(SUITES[sys.argv[1]])
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()
