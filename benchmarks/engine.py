"""Engine suite: step-level continuous batching vs static whole-request batching vs one at a time.

The same Poisson arrival trace (mixed step counts, a different adapter per request) is replayed against
three engines that share every kernel and differ only in admission policy:

- ``step-level``: requests join and leave the running batch at any denoising step (deft), with each
  of the planner's batch orders (``longest-wait``, the default; ``arrival``; ``fewest-remaining``);
- ``static``: a batch is formed when the previous batch has completely finished (what pipelines do);
- ``one-at-a-time``: a single request at a time.

Two offered loads are measured, calibrated from the measured service time of one request alone on this
machine, so that "low" is below and "high" above what one-at-a-time can sustain. Reported per policy and
load: throughput (images/s) and p50/p95/p99 end-to-end latency, plus a latency CDF plot.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, run_suite
from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.engine import Engine, EngineConfig, GenerationRequest
from deft_runtime.models import build_tiny_sdxl
from deft_runtime.pool import PoolConfig
from deft_runtime.runtime import MultiAdapterModel
from deft_runtime.testing import random_adapter

POLICIES = {
    "step-level": dict(admission="continuous", max_active=32),
    "step-level, arrival order": dict(admission="continuous", max_active=32, batch_order="arrival"),
    "step-level, fewest remaining": dict(
        admission="continuous", max_active=32, batch_order="fewest-remaining"
    ),
    "static": dict(admission="static", max_active=32),
    "one-at-a-time": dict(admission="continuous", max_active=1),
}
STEP_CHOICES = (4, 8, 16, 32)


@dataclass(frozen=True)
class Arrival:
    at: float
    steps: int
    adapter: str | None
    seed: int


def make_trace(n: int, rate: float, adapters: list[str], seed: int) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n)
    times = np.cumsum(gaps) - gaps[0]
    return [
        Arrival(
            float(t),
            int(rng.choice(STEP_CHOICES)),
            adapters[int(rng.integers(len(adapters)))] if rng.random() > 0.1 else None,
            i,
        )
        for i, t in enumerate(times)
    ]


def build_engine(policy: dict[str, Any], n_adapters: int, max_rows: int) -> tuple[Engine, list[str]]:
    pipe = build_tiny_sdxl(0)
    mam = MultiAdapterModel(
        pipe.unet, pool_config=PoolConfig(device_bytes=64 << 20, host_bytes=64 << 20), backend="torch"
    )
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in mam.base_weights.items()}
    names = []
    for i in range(n_adapters):
        name = f"a{i}"
        mam.register(
            name,
            random_adapter(
                AdapterKind.DEFT,
                shapes,
                rank=(4, 8, 16)[i % 3],
                decomposition=Decomposition.QR,
                seed=i,
                magnitude=0.05,
            ),
        )
        names.append(name)
    return Engine(pipe, mam, EngineConfig(max_batch_rows=max_rows, **policy)), names


def request_for(a: Arrival) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"a photo of concept {a.seed}",
        num_inference_steps=a.steps,
        seed=a.seed,
        adapters=((a.adapter, 1.0),) if a.adapter else (),
    )


def replay(engine: Engine, trace: list[Arrival], timeout_s: float) -> list[float]:
    """Submit each request at its arrival time (open loop); return end-to-end latencies in seconds."""
    latencies: list[float] = [float("nan")] * len(trace)
    done = threading.Semaphore(0)
    start = time.perf_counter()

    def finisher(i: int, submitted: float):
        def cb(fut) -> None:
            if fut.exception() is None:
                latencies[i] = time.perf_counter() - submitted
            done.release()

        return cb

    for i, a in enumerate(trace):
        delay = start + a.at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted = time.perf_counter()
        engine.submit(request_for(a)).future.add_done_callback(finisher(i, submitted))
    for _ in trace:
        if not done.acquire(timeout=timeout_s):
            break
    return latencies


def service_time(n_adapters: int, max_rows: int) -> float:
    """Mean seconds for one request alone (mixed step counts), the calibration for offered load."""
    engine, names = build_engine(POLICIES["one-at-a-time"], n_adapters, max_rows)
    try:
        engine.generate(request_for(Arrival(0, 4, names[0], 0)), timeout=120)  # warm-up
        t = time.perf_counter()
        for i, steps in enumerate(STEP_CHOICES):
            engine.generate(request_for(Arrival(0, steps, names[i % len(names)], i)), timeout=300)
        return (time.perf_counter() - t) / len(STEP_CHOICES)
    finally:
        engine.shutdown()


def summarize(latencies: list[float], trace: list[Arrival], wall: float) -> dict[str, float]:
    ok = np.array([x for x in latencies if np.isfinite(x)])
    return {
        "completed": int(ok.size),
        "throughput_img_s": ok.size / wall if wall > 0 else 0.0,
        "p50_s": float(np.percentile(ok, 50)),
        "p95_s": float(np.percentile(ok, 95)),
        "p99_s": float(np.percentile(ok, 99)),
        "mean_s": float(ok.mean()),
    }


def plot_cdf(curves: dict[str, dict[str, list[float]]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (load, per_policy) in zip(axes[0], curves.items(), strict=True):
        for policy, lat in per_policy.items():
            xs = np.sort(np.array([x for x in lat if np.isfinite(x)]))
            ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=policy)
        ax.set_title(f"latency CDF, {load} load")
        ax.set_xlabel("end-to-end latency (s)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks engine", description=__doc__)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument(
        "--loads",
        type=float,
        nargs=2,
        default=(0.8, 2.0),
        help="offered loads as multiples of one-at-a-time capacity (1 / mean service time)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="engine-tiny-sdxl")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every policy at both offered loads on the same Poisson trace; draws the latency CDFs."""
    torch.manual_seed(0)
    t_single = service_time(args.adapters, args.max_batch_rows)
    rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    for label, load in zip(("low", "high"), args.loads, strict=True):
        rate = load / t_single
        trace = make_trace(args.requests, rate, [f"a{i}" for i in range(args.adapters)], args.seed)
        curves[label] = {}
        for policy, cfg in POLICIES.items():
            engine, _ = build_engine(cfg, args.adapters, args.max_batch_rows)
            try:
                start = time.perf_counter()
                lat = replay(engine, trace, timeout_s=600)
                wall = time.perf_counter() - start
            finally:
                engine.shutdown()
            curves[label][policy] = lat
            rows.append(
                {"load": label, "offered req/s": rate, "policy": policy, **summarize(lat, trace, wall)}
            )
            print(rows[-1], flush=True)
    plot = RESULTS_DIR / f"{args.out}-latency-cdf.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot_cdf(curves, plot)
    return {"single_request_service_s": t_single, "rows": rows, "ratios": ratios(rows), "plot": plot.name}


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for label in dict.fromkeys(r["load"] for r in rows):
        by = {r["policy"]: r for r in rows if r["load"] == label}
        out[label] = {
            **{
                f"{metric} {policy} / static": by[policy][key] / by["static"][key]
                for policy in by
                if policy.startswith("step-level, ")
                for metric, key in (("p99", "p99_s"), ("throughput", "throughput_img_s"))
            },
            "p99 step-level / static": by["step-level"]["p99_s"] / by["static"]["p99_s"],
            "throughput step-level / static": by["step-level"]["throughput_img_s"]
            / by["static"]["throughput_img_s"],
            "p99 step-level / one-at-a-time": by["step-level"]["p99_s"] / by["one-at-a-time"]["p99_s"],
        }
    return out


def report(args: argparse.Namespace, payload: dict[str, Any]) -> str:
    rows, t_single = payload["rows"], payload["single_request_service_s"]
    return (
        f"# engine (tiny-sdxl, {args.requests} requests per run, steps {STEP_CHOICES}, {args.adapters} adapters)\n\n"
        f"One request alone takes {t_single:.3f} s on average.\n\n"
        + markdown_table(
            rows,
            ["load", "offered req/s", "policy", "completed", "throughput_img_s", "p50_s", "p95_s", "p99_s"],
        )
        + "\n\n"
        + markdown_table(
            [{"load": k, **v} for k, v in payload["ratios"].items()],
            ["load", *next(iter(payload["ratios"].values()))],
        )
        + f"\n\n![latency CDF]({payload['plot']})\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run_suite(
        "engine",
        args.out,
        lambda _workdir: measure(args),
        machine=lambda: machine_info(torch.device("cpu")),
        params=vars(args),
        report=lambda _name, payload: report(args, payload),
    )


if __name__ == "__main__":
    main()
