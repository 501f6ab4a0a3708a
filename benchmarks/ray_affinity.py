"""Adapter-affinity routing on Ray Serve against Serve's plain routing: same replicas, same workload.

``deft_server.ray_app`` routes each request by its adapter set (Serve's multiplexed id). The baseline is
``routing=any``: no id, so Serve spreads requests over replicas without regard to what they hold. The
replicas' pools are kept small (``--resident`` adapters each) and the workload spreads over more
adapters (``--adapters``) than one replica holds, so routing decides how often adapters are reloaded.

Reported per mode, from the replicas' own ``/metrics`` (deltas over the run): adapter loads onto the
device per request, registry reads per request, images/s, p50/p99 latency; then affinity ÷ any. The two
modes alternate (``--rounds``), each on freshly started replicas.

``python -m benchmarks ray-affinity [--adapters 8 --resident 3 --requests 64 --concurrency 4]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, markdown_table, run_suite, string_params
from benchmarks.suites import (
    PRESETS,
    environment,
    free_port,
    running_servers,
    target_shapes,
    write_peft_adapters,
)

MODES = ("affinity", "any")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks ray-affinity", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters in the workload (uniform)")
    p.add_argument("--resident", type=int, default=3, help="adapters each replica keeps on the device")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=64, help="requests per mode and round")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (closed loop)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="times each mode runs (alternating)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep adapters and logs here (default: a temporary folder)")
    p.add_argument("--out", help="report name (default: ray-affinity)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def scrape(port: int) -> dict[str, float]:
    """The counters this suite reads, from one replica's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {"device_loads": 0.0, "host_loads": 0.0, "requests_ok": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "deft_adapter_loads_total":
                out[f"{sample.labels['tier']}_loads"] += sample.value
            elif sample.name == "deft_requests_total" and sample.labels.get("status") == "ok":
                out["requests_ok"] += sample.value
    return out


def workload(args: argparse.Namespace, names: list[str]) -> list[str]:
    rng = random.Random(args.seed)
    return [rng.choice(names) for _ in range(args.requests)]


def _app_args(
    mode: str, args: argparse.Namespace, registry: dict[str, str], metrics_base: int
) -> dict[str, str]:
    """``build_app`` arguments: the shared registry, tiny replicas on the CPU, ``routing=mode``."""
    return {
        **registry,
        "model": "tiny-sdxl",
        "device": "cpu",
        "routing": mode,
        "num_replicas": str(args.replicas),
        "num_cpus": "0.5",
        "max_adapter_sets": str(args.resident),
        "max_resident_adapters": str(args.resident),
        "metrics_port": str(metrics_base),
        "log_level": "WARNING",
    }


def run_mode(
    mode: str, args: argparse.Namespace, registry: dict[str, str], names: list[str], address: str
) -> dict[str, Any]:
    """Deploy the app with ``routing=mode`` on fresh replicas, drive the workload, tear it down."""
    import grpc
    from deft_client.proto import generation_pb2_grpc
    from deft_client.wire import generate_request
    from deft_server.ray_app import REPLICA_KEY, build_app
    from ray import serve

    metrics_base = free_port()
    app = build_app(_app_args(mode, args, registry, metrics_base))
    serve.run(app, name="deft", route_prefix="/")
    ports = [metrics_base + rank for rank in range(args.replicas)]
    before = [scrape(port) for port in ports]
    latencies: list[float] = []
    replicas: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        def one(i_name: tuple[int, str]) -> None:
            i, name = i_name
            request = generate_request(prompt="a photo", adapters=[name], steps=args.steps, seed=i)
            start = time.perf_counter()
            _, call = stub.GenerateOnce.with_call(request, timeout=300)
            latencies.append(time.perf_counter() - start)
            replica = dict(call.trailing_metadata())[REPLICA_KEY]
            replicas[replica] = replicas.get(replica, 0) + 1

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, enumerate(workload(args, names))))
        elapsed = time.perf_counter() - started
    after = [scrape(port) for port in ports]
    serve.delete("deft")
    delta = {key: sum(a[key] - b[key] for a, b in zip(after, before, strict=True)) for key in after[0]}
    n = len(latencies)
    assert delta["requests_ok"] == n, f"{mode}: the replicas counted {delta['requests_ok']} of {n} requests"
    ordered = sorted(latencies)
    return {
        "mode": mode,
        "requests": n,
        "device_loads_per_request": delta["device_loads"] / n,
        "host_loads_per_request": delta["host_loads"] / n,
        "images_per_s": n / elapsed,
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[int(0.99 * (n - 1))],
        "requests_per_replica": sorted(replicas.values()),
    }


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Both routing modes, interleaved over the rounds, against replicas sharing one registry."""
    import ray
    from deft_client import DeftClient
    from deft_server.ray_app import SERVICE_FUNCTIONS
    from ray import serve
    from ray.serve.config import gRPCOptions

    preset = PRESETS["tiny"]
    rows: list[dict[str, Any]] = []
    files = write_peft_adapters(
        target_shapes("tiny-sdxl"), range(args.adapters), (4, 8), workdir / "adapters", prefix="ray"
    )
    with running_servers(["deft"], preset, "tiny-sdxl", workdir) as servers:
        admin = servers["deft"]
        with DeftClient(admin.address) as client:
            for name, path in files.items():
                client.register_adapter(name, path)
        registry = {"data_dir": str(admin.data_dir)}  # one machine: the SQLite registry is shared
        grpc_port = free_port()
        ray.init(num_cpus=4, object_store_memory=128 << 20, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICE_FUNCTIONS),
                http_options={"host": "127.0.0.1", "port": free_port()},
            )
            for _ in range(args.rounds):
                for mode in MODES:
                    rows.append(run_mode(mode, args, registry, list(files), f"127.0.0.1:{grpc_port}"))
                    print(rows[-1], flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    return {"rows": rows, "affinity_over_any": affinity_over_any(rows)}


def affinity_over_any(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    by_mode = {mode: [r for r in rows if r["mode"] == mode] for mode in MODES}

    def mean(mode: str, key: str) -> float:
        return statistics.mean(r[key] for r in by_mode[mode])

    return {
        "device_loads_per_request": _ratio(
            mean("affinity", "device_loads_per_request"), mean("any", "device_loads_per_request")
        ),
        "images_per_s": _ratio(mean("affinity", "images_per_s"), mean("any", "images_per_s")),
        "p99_s": _ratio(mean("affinity", "p99_s"), mean("any", "p99_s")),
    }


def report(args: argparse.Namespace, payload: dict[str, Any]) -> str:
    rows, ratios = payload["rows"], payload["affinity_over_any"]
    columns = ["mode", "requests", "device_loads_per_request", "host_loads_per_request", "images_per_s"]
    return "\n\n".join(
        [
            f"# ray-affinity ({args.replicas} replicas × {args.resident} resident adapters, {args.adapters} "
            f"adapters uniform, {args.requests} requests at concurrency {args.concurrency}, "
            f"{args.steps} steps, tiny-sdxl on CPU)",
            markdown_table(rows, [*columns, "p50_s", "p99_s", "requests_per_replica"]),
            "affinity ÷ any: "
            + ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} n/a" for k, v in ratios.items()),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run_suite(
        "ray-affinity",
        args.out or "ray-affinity",
        lambda workdir: measure(args, workdir),
        machine=lambda: environment(PRESETS["tiny"]),
        params=string_params(args),
        report=lambda _name, payload: report(args, payload),
        workdir=args.workdir,
        out_dir=args.results_dir,
    )


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


if __name__ == "__main__":
    main()
