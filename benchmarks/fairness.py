"""Fairness suite: a tenant flooding the queue against a tenant with a modest load.

Tenant B sends a modest Poisson load; tenant A sends ``--flood`` times B's rate (far above its share),
starting ``--lead`` single-request service times before B's first request and going on as long after
its last, so every request of B arrives while A floods (at a flood's very first instant neither tenant
has a history, and each gets half the machine). The same traces are replayed side by side:

- ``fair``: requests labelled by tenant, as the server labels them; admission and batch planning fair
  across tenants (``mixed_batch_rows``, ``idle_credit_row_steps``, ``newcomer_slots``: see
  :mod:`deft_runtime.engine.planner`);
- ``fair admission only``: the same labels on an engine whose batch planning ignores tenants (what
  deft did before fair planning), for comparison;
- ``fcfs``: no labels: one FIFO, first come, first served.

Reported: B's p50/p99 latency alone and under the flood in each run, and each run's total throughput;
the targets are ``B p99 under flood (fair) / B p99 alone ≤ 1.5`` and ``throughput fair / FCFS ≥ 0.95``.
A latency CDF of B's requests is drawn. The engine is the tiny SDXL of ``benchmarks.engine``.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, run_suite
from benchmarks.engine import build_engine
from deft_runtime.engine import Engine, GenerationRequest


@dataclass(frozen=True)
class Arrival:
    at: float
    tenant: str
    seed: int


def poisson(tenant: str, n: int, rate: float, seed: int) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    return [Arrival(float(t), tenant, seed * 10_000 + i) for i, t in enumerate(times)]


def replay(
    engine: Engine, trace: list[Arrival], steps: int, fair: bool
) -> tuple[dict[str, list[float]], float]:
    """Open-loop replay; latencies per tenant and the wall time until the last request finished."""
    trace = sorted(trace, key=lambda a: a.at)
    latencies: dict[str, list[float]] = {a.tenant: [] for a in trace}
    lock, done = threading.Lock(), threading.Semaphore(0)
    start = time.perf_counter()
    for a in trace:
        if (delay := start + a.at - time.perf_counter()) > 0:
            time.sleep(delay)
        submitted = time.perf_counter()
        request = GenerationRequest(
            f"concept {a.seed}", num_inference_steps=steps, seed=a.seed, tenant=a.tenant if fair else ""
        )

        def finished(fut: Any, tenant: str = a.tenant, t0: float = submitted) -> None:
            if fut.exception() is None:
                with lock:
                    latencies[tenant].append(time.perf_counter() - t0)
            done.release()

        engine.submit(request).future.add_done_callback(finished)
    for _ in trace:
        done.acquire(timeout=600)
    return latencies, time.perf_counter() - start


def stats(latencies: list[float]) -> dict[str, float]:
    xs = np.array(latencies)
    return {"n": int(xs.size), "p50_s": float(np.percentile(xs, 50)), "p99_s": float(np.percentile(xs, 99))}


def engines(args: argparse.Namespace) -> dict[str, Engine]:
    """The fair engine (also replays the unlabelled FCFS trace) and one whose planning ignores tenants."""
    base = {"admission": "continuous", "max_active": args.max_active}
    fair = {
        "mixed_batch_rows": args.mixed_rows,
        "idle_credit_row_steps": args.credit,
        "newcomer_slots": args.newcomer_slots,
    }
    unfair = {"mixed_batch_rows": None, "idle_credit_row_steps": 0.0, "newcomer_slots": 0}
    torch.manual_seed(0)
    built = {"fair": build_engine({**base, **fair}, 1, args.max_batch_rows)[0]}
    built["admission"] = build_engine({**base, **unfair}, 1, args.max_batch_rows)[0]
    for engine in built.values():
        engine.generate(GenerationRequest("warm-up", num_inference_steps=args.steps, seed=0), timeout=300)
    return built


def measure(args: argparse.Namespace) -> dict[str, Any]:
    built = engines(args)
    engine = built["fair"]
    try:
        t0 = time.perf_counter()
        engine.generate(GenerationRequest("calibrate", num_inference_steps=args.steps, seed=1), timeout=300)
        service = time.perf_counter() - t0
        rate_b = args.load / service
        alone: list[float] = []
        runs: dict[str, tuple[dict[str, list[float]], float]] = {}
        for repeat in range(args.repeats):  # fresh traces each time; the runs of one repeat share one
            light = poisson("B", args.requests, rate_b, 1 + 10 * repeat)
            alone += replay(engine, light, args.steps, fair=True)[0]["B"]
            # under the flood: A's requests start `lead` before B's first and end `lead` after B's last
            lead = args.lead * service
            light = [Arrival(a.at + lead, a.tenant, a.seed) for a in light]
            count = round((light[-1].at + lead) * rate_b * args.flood)
            trace = light + poisson("A", count, rate_b * args.flood, 2 + 10 * repeat)
            for name, eng, fair in (
                ("fair", engine, True),
                ("fcfs", engine, False),
                ("fair admission only", built["admission"], True),
            ):
                _merge(runs, name, replay(eng, trace, args.steps, fair=fair))
    finally:
        for e in built.values():
            e.shutdown()
    return summarise(args, service, rate_b, alone, runs)


def _merge(
    runs: dict[str, tuple[dict[str, list[float]], float]],
    name: str,
    run: tuple[dict[str, list[float]], float],
) -> None:
    """Pool one replay into ``runs[name]``: latencies appended per tenant, wall times added."""
    latencies, wall = runs.get(name, ({}, 0.0))
    for tenant, xs in run[0].items():
        latencies.setdefault(tenant, []).extend(xs)
    runs[name] = (latencies, wall + run[1])


def summarise(
    args: argparse.Namespace,
    service: float,
    rate_b: float,
    alone: list[float],
    runs: dict[str, tuple[dict[str, list[float]], float]],
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = [{"run": "B alone", **stats(alone)}]
    for name, (lat, wall) in runs.items():
        total = sum(len(v) for v in lat.values())
        rows.append({"run": f"B under flood, {name}", **stats(lat["B"]), "throughput_img_s": total / wall})
    by_run = {row["run"].removeprefix("B under flood, "): row for row in rows}
    fcfs = by_run["fcfs"]
    ratios = {
        f"B p99 flood ({name}) / alone": row["p99_s"] / rows[0]["p99_s"] for name, row in by_run.items()
    }
    ratios.pop("B p99 flood (B alone) / alone")
    for name in ("fair", "fair admission only"):
        ratios[f"throughput {name} / fcfs"] = by_run[name]["throughput_img_s"] / fcfs["throughput_img_s"]
    curves = {"alone": alone, **{name: lat["B"] for name, (lat, _) in runs.items()}}
    plot = args.out_dir / f"{args.out}-b-latency-cdf.png"
    plot_cdf(curves, plot)
    return {
        "single_request_service_s": service,
        "rate_b_req_s": rate_b,
        "rows": rows,
        "ratios": ratios,
        "b_latencies_s": {name: sorted(lat) for name, lat in curves.items()},
        "plot": plot.name,
    }


def plot_cdf(curves: dict[str, list[float]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, lat in curves.items():
        xs = np.sort(np.array(lat))
        ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)
    ax.set_title("tenant B latency CDF")
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of B's requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace, payload: dict[str, Any]) -> str:
    return (
        f"# fairness (tiny-sdxl, B: {args.repeats} x {args.requests} requests at "
        f"{payload['rate_b_req_s']:.2f} req/s, A: {args.flood}x that from {args.lead:g} service times "
        f"before, {args.steps} steps, newcomer slots {args.newcomer_slots}, max_active {args.max_active}, max_batch_rows "
        f"{args.max_batch_rows}, mixed_batch_rows {args.mixed_rows}, idle credit {args.credit:g} row-steps)\n\n"
        + markdown_table(payload["rows"], ["run", "n", "p50_s", "p99_s", "throughput_img_s"])
        + "\n\n"
        + markdown_table([payload["ratios"]], list(payload["ratios"]))
        + f"\n\n![B latency CDF]({payload['plot']})\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks fairness", description=__doc__)
    parser.add_argument("--requests", type=int, default=10, help="tenant B's requests")
    parser.add_argument("--flood", type=int, default=10, help="tenant A's load as a multiple of B's")
    parser.add_argument(
        "--load", type=float, default=0.3, help="B's load as a fraction of one request's service rate"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--repeats", type=int, default=2, help="replays of each run (fresh traces; latencies pooled)"
    )
    parser.add_argument(
        "--lead",
        type=float,
        default=6.0,
        help="A's flood starts this many single-request service times before B's first request",
    )
    parser.add_argument("--max-active", type=int, default=4)
    parser.add_argument("--max-batch-rows", type=int, default=8)
    parser.add_argument(
        "--mixed-rows", type=int, default=4, help="fair engine's mixed_batch_rows (4: two CFG requests)"
    )
    parser.add_argument("--credit", type=float, default=100.0, help="fair engine's idle_credit_row_steps")
    parser.add_argument(
        "--newcomer-slots",
        type=int,
        default=2,
        help="fair engine's newcomer_slots (B's share of --max-active)",
    )
    parser.add_argument("--quick", action="store_true", help="a small run (a smoke test): 4 B requests, A 4x")
    parser.add_argument("--out", default=None, help="results name (default fairness-tiny-sdxl[-quick])")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.flood, args.steps, args.repeats = 4, 4, 4, 1
    args.out = args.out or ("fairness-tiny-sdxl-quick" if args.quick else "fairness-tiny-sdxl")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run_suite(
        "fairness",
        args.out,
        lambda _workdir: measure(args),
        machine=lambda: machine_info(torch.device("cpu")),
        params={**vars(args), "out_dir": str(args.out_dir)},
        report=lambda _name, payload: report(args, payload),
        out_dir=args.out_dir,
    )


if __name__ == "__main__":
    main()
