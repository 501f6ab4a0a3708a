"""mixed-vs-base: deft's throughput when every request uses a different adapter ÷ with no adapters at all.

One deft server, N registered adapters (tiny: 100, mixed small ranks). Two workloads share one seeded
Poisson trace (arrival times, step counts, sizes, seeds) and differ only in the adapters: ``base`` names
none, ``mixed`` gives every request a different adapter (a fresh random subset of the N each round, so
adapters are loaded into the pool as they would be in service). Rounds alternate the order (base, mixed,
then mixed, base, ...) so drift in machine load hits both alike; the ratio of the medians is reported.
The offered rate overloads the server (``--load`` x one-at-a-time capacity): throughput is capacity.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import load_snapshot, markdown_table, run_suite, string_params
from benchmarks.loadgen import (
    ROW_COLUMNS,
    Arrival,
    Popularity,
    flat_row,
    poisson_arrivals,
    register_adapters_sync,
    run_load_sync,
)
from benchmarks.suites import (
    PRESETS,
    ensure_model,
    environment,
    judge,
    preset_argument,
    pyplot,
    running_servers,
    save_figure,
    single_request_seconds,
    target_shapes,
    write_peft_adapters,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks mixed-vs-base", description=__doc__)
    preset_argument(p)
    p.add_argument("--adapters", type=int, help="registered adapters (default: the preset's)")
    p.add_argument("--requests", type=int, help="requests per run, at most --adapters (default: preset)")
    p.add_argument("--rounds", type=int, help="base/mixed pairs (default: the preset's)")
    p.add_argument("--load", type=float, help="offered load, x one-at-a-time capacity (default: preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "deft" / "bench-models")
    p.add_argument("--out", help="report name (default: mixed-vs-base-PRESET)")
    return p.parse_args(argv)


def with_distinct_adapters(arrivals: list[Arrival], names: list[str], seed: int) -> list[Arrival]:
    chosen = Popularity("distinct").assign(names, len(arrivals), np.random.default_rng(seed))
    return [dataclasses.replace(a, adapter=name) for a, name in zip(arrivals, chosen, strict=True)]


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    n = args.adapters or preset.mixed_adapters
    requests = min(args.requests or preset.requests, n)
    rounds = args.rounds or preset.mixed_rounds
    model = ensure_model(preset, args.cache_dir)
    paths = write_peft_adapters(target_shapes(preset.model), range(n), preset.ranks, workdir / "adapters")
    rows: list[dict[str, Any]] = []
    with running_servers(["deft"], preset, model, workdir) as servers:
        address = servers["deft"].address
        register_adapters_sync(address, paths)
        single_s = single_request_seconds(address, preset)
        rate = (args.load or preset.load) / single_s
        base = poisson_arrivals(requests, rate, [], Popularity("none"), preset.steps, preset.sizes, args.seed)
        for r in range(rounds):
            mixed = with_distinct_adapters(base, list(paths), args.seed + r)
            order = [("base", base), ("mixed", mixed)]
            for label, arrivals in order if r % 2 == 0 else order[::-1]:
                before = load_snapshot()
                run = run_load_sync(
                    address, arrivals, guidance=preset.guidance, timeout_s=preset.run_timeout_s
                )
                summary = run.summary()
                row = {"round": r, "workload": label, **flat_row(summary), "load1": before["load1"]}
                rows.append({**row, "statuses": summary["statuses"]})
                print(row, flush=True)
    return {
        "preset": preset.describe(),
        "adapters": n,
        "requests_per_run": requests,
        "rounds": rounds,
        "single_request_s": single_s,
        "offered_req_s": rate,
        "rows": rows,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def median(label: str, column: str) -> float:
        return statistics.median(float(r[column]) for r in rows if r["workload"] == label)

    per_round = {}
    for r in sorted({row["round"] for row in rows}):
        by = {row["workload"]: row for row in rows if row["round"] == r}
        per_round[str(r)] = by["mixed"]["img/s"] / by["base"]["img/s"]
    mixed_over_base = median("mixed", "img/s") / median("base", "img/s")
    return {
        "throughput mixed / base, per round": per_round,
        "p99 mixed / base": median("mixed", "p99 s") / median("base", "p99 s"),
        "throughput mixed / base (target ≥ 0.9)": judge(mixed_over_base, 0.9),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rounds = sorted({r["round"] for r in rows})
    width = 0.38
    for k, label in enumerate(("base", "mixed")):
        values = [next(r["img/s"] for r in rows if (r["round"], r["workload"]) == (i, label)) for i in rounds]
        ax.bar([i + (k - 0.5) * width for i in rounds], values, width, label=label)
    ax.set(xlabel="round", ylabel="images/s", title="no adapters vs a different adapter per request")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return save_figure(fig, path)


def report(name: str, payload: dict[str, Any]) -> str:
    preset = payload["preset"]
    lines = [
        f"# mixed-vs-base ({preset['name']} preset, {preset['model']})",
        "",
        f"{payload['adapters']} registered adapters; {payload['requests_per_run']} requests per run, Poisson at "
        f"{payload['offered_req_s']:.2f} req/s ({preset['load']:g} x one-at-a-time capacity), steps "
        f"{preset['steps']}, sizes {preset['sizes']}; `mixed`: every request a different adapter.",
        "",
        markdown_table(payload["rows"], ["round", "workload", *ROW_COLUMNS, "load1"]),
        "",
    ]
    s = payload["summary"]
    per_round = ", ".join(f"round {k}: {v:.3f}" for k, v in s["throughput mixed / base, per round"].items())
    lines += [
        f"- throughput mixed / base per round: {per_round}",
        f"- p99 latency mixed / base (medians): {s['p99 mixed / base']:.3f}",
        f"- **throughput mixed / base (medians), target ≥ 0.9: {s['throughput mixed / base (target ≥ 0.9)']['verdict']}**",
        "",
        f"![throughput per round]({name}.png)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    def measured(workdir: Path) -> dict[str, Any]:
        result = measure(args, workdir)
        return {**result, "summary": summarize(result["rows"])}

    return run_suite(
        "mixed-vs-base",
        args.out or f"mixed-vs-base-{args.preset}",
        measured,
        machine=lambda: environment(PRESETS[args.preset]),
        params=string_params(args),
        report=report,
        figure=lambda path, payload: plot(payload["rows"], path),
        workdir=args.workdir,
    )


if __name__ == "__main__":
    main()
