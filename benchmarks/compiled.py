"""Compiled-path suite: what ``deft serve --compile`` costs at start-up and gains while serving.

For each model and mode, one engine runs the denoiser eagerly and a second one, over the same pipeline
and adapter pool, runs it through ``torch.compile`` (inductor; every adapter layer is one opaque
``deft::layer_adapters`` op, so the graph never depends on which adapters a forward uses). Modes
(``--modes``; ``--quick`` runs ``dynamic`` only): ``dynamic`` (dynamic shapes, ``deft serve --compile``)
and ``buckets`` (every forward padded to a power-of-two batch size, static shapes per size,
``--compile --compile-buckets``). The suite records

- **compile seconds**: the compiled engine's :meth:`~deft_runtime.engine.Engine.warm_up` (small
  requests), what a server spends before it reports SERVING, with inductor's on-disk caches off (a
  cold compile; a restart with a warm cache is faster);
- **saturated speed-up**: the efficiency suite's run (``--requests`` requests × ``--steps`` steps with
  CFG, each its own rank-``--rank`` DEFT adapter, all at once) eager ÷ compiled, medians of
  alternating runs;
- **single-request speed-up**: one request with one adapter, alone, eager ÷ compiled;
- **max pixel difference** between the two engines' images of the same requests (/255);
- **graphs compiled while serving**: dynamo's graph count after the warm-up minus before the timed
  runs (0: changing adapters, mixes and batch sizes never recompiled).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import interleaved_medians, markdown_table
from benchmarks.efficiency import parse_workload_args, run_workload_suite, workload, workload_summary
from deft_runtime.engine import EngineConfig, GenerationRequest


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _max_pixel_diff(a: list[Any], b: list[Any]) -> float:
    diffs = [
        np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)).max()
        for ra, rb in zip(a, b, strict=True)
        for x, y in zip(ra.images, rb.images, strict=True)
    ]
    return float(max(diffs))


#: the compiled engines measured against the eager one (``--modes``)
MODES: dict[str, dict[str, Any]] = {
    "dynamic": dict(compile=True),  # deft serve --compile
    "buckets": dict(compile=True, compile_buckets=True),  # deft serve --compile --compile-buckets
}


def measure_model(args: argparse.Namespace, model: str, mode: str) -> dict[str, Any]:
    w = workload(args, model)
    eager = w.engine
    torch._dynamo.reset()  # a cold compile, whatever ran before in this process (or on disk: below)
    compiled = w.engine_for(
        eager.pipe,
        eager.model,
        EngineConfig(max_batch_rows=args.max_batch_rows, max_active=args.requests, **MODES[mode]),
    )
    try:
        # inductor's on-disk caches off while compiling (a restarted server with a warm cache is faster)
        with (
            torch._inductor.config.patch(fx_graph_cache=False),
            torch._functorch.config.patch(enable_autograd_cache=False),
        ):
            compile_s = compiled.warm_up(timeout=3600)
        graphs = _graphs()
        alone = GenerationRequest(
            prompt="a photo of concept 0", seed=0, num_inference_steps=args.steps, guidance_scale=5.0,
            adapters=(("a0", 1.0),),
        )  # fmt: skip
        started = time.perf_counter()
        medians = interleaved_medians(
            {
                "eager saturated": lambda: w.run_engine(eager),
                "compiled saturated": lambda: w.run_engine(compiled),
                "eager alone": lambda: eager.generate(alone, timeout=600),
                "compiled alone": lambda: compiled.generate(alone, timeout=600),
            },
            device=w.device,
            repeats=args.repeats,
        )
        timed_s = time.perf_counter() - started
        diff = _max_pixel_diff(w.results(eager), w.results(compiled))
        recompiled = _graphs() - graphs
    finally:
        compiled.shutdown()
        eager.shutdown()
    return {
        "model": model,
        "mode": mode,
        "compile_s": compile_s,
        "seconds": medians,
        "saturated_speedup": medians["eager saturated"] / medians["compiled saturated"],
        "alone_speedup": medians["eager alone"] / medians["compiled alone"],
        "max_pixel_diff_255": diff,
        "graphs_compiled_while_serving": recompiled,
        "timed_seconds": timed_s,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_workload_args("compiled", __doc__, argv, modes=tuple(MODES))


def report(name: str, payload: dict[str, Any]) -> str:
    rows = [
        {
            "model": r["model"],
            "mode": r["mode"],
            "compile s": f"{r['compile_s']:.1f}",
            "saturated eager / compiled": f"{r['saturated_speedup']:.3f}",
            "alone eager / compiled": f"{r['alone_speedup']:.3f}",
            "max pixel diff /255": f"{r['max_pixel_diff_255']:.2f}",
            "graphs compiled while serving": str(r["graphs_compiled_while_serving"]),
        }
        for r in payload["rows"]
    ]
    seconds = [
        {"model": r["model"], "mode": r["mode"], **{k: f"{v:.3f}" for k, v in r["seconds"].items()}}
        for r in payload["rows"]
    ]
    return "\n".join(
        [
            f"# {name}",
            "",
            workload_summary(payload["params"])
            + "; inductor; mode dynamic: dynamic shapes (`deft serve --compile`), buckets: static shapes per "
            "power-of-two batch size (`--compile --compile-buckets`)",
            "",
            markdown_table(rows, list(rows[0])),
            "",
            "Medians (seconds per run):",
            "",
            markdown_table(seconds, list(seconds[0])),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run_workload_suite(
        "compiled",
        args,
        lambda workdir: {"rows": [measure_model(args, m, mode) for m in args.models for mode in args.modes]},
        report,
    )


if __name__ == "__main__":
    main()
