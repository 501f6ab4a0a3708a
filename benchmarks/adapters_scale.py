"""adapters-scale: throughput and p99 latency as the number of registered adapters grows, deft vs baseline.

For each N in the preset's adapter counts (tiny: 1, 10, 100, 1000), N seeded DEFT adapters of mixed,
mostly small ranks are registered on three servers running side by side: deft, the baseline (diffusers
+ PEFT, one request at a time, switching the active adapter per request) and the grouped baseline
(queued requests sharing an adapter run as one pipeline call). The same open-loop Poisson trace (mixed
step counts and sizes) is then sent to each server in turn, once per popularity law (Zipf(1.0) and
uniform). The offered rate is ``--load`` times the one-at-a-time capacity of the machine (measured first
on the deft server), so every server is overloaded and the throughput measured is its capacity.

Reported per (N, popularity, server): throughput (images/s), p50/p95/p99 latency, queue time; and the
issue's targets: deft ÷ baseline throughput at N = 100 (uniform) and deft's throughput at 1000 ÷ at 10.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

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
    Preset,
    ServerKind,
    adapter_name,
    ensure_model,
    environment,
    judge,
    preset_argument,
    pyplot,
    running_servers,
    save_figure,
    single_request_seconds,
    start_server,
    target_shapes,
    write_peft_adapters,
)

SYSTEMS: tuple[ServerKind, ...] = ("deft", "baseline", "baseline-grouped")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks adapters-scale", description=__doc__)
    preset_argument(p)
    p.add_argument("--counts", type=int, nargs="+", help="adapter counts N (default: the preset's)")
    p.add_argument("--popularity", nargs="+", default=["zipf:1.0", "uniform"])
    p.add_argument("--requests", type=int, help="requests per run (default: the preset's)")
    p.add_argument("--load", type=float, help="offered load, x one-at-a-time capacity (default: preset)")
    p.add_argument("--baseline-max-adapters", type=int, help="run the baselines only up to this N")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument(
        "--confirm",
        type=int,
        nargs=2,
        default=(10, 1000),
        metavar=("SMALL", "LARGE"),
        help="the adapter counts whose throughput ratio is the target (default: 10 1000)",
    )
    p.add_argument(
        "--confirm-rounds",
        type=int,
        default=2,
        help="alternating pairs of runs of deft at N=10 and N=1000 on two servers side by side (0: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="servers' data and logs (default: a temporary folder)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "deft" / "bench-models")
    p.add_argument("--out", help="report name (default: adapters-scale-PRESET)")
    return p.parse_args(argv)


def run_row(address: str, arrivals: list[Arrival], preset: Preset, **labels: Any) -> dict[str, Any]:
    before = load_snapshot()
    run = run_load_sync(address, arrivals, guidance=preset.guidance, timeout_s=preset.run_timeout_s)
    summary = run.summary()
    row = {**labels, **flat_row(summary)}
    print(row, flush=True)
    return {**row, "load1": before["load1"], "statuses": summary["statuses"]}


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    counts = args.counts or list(preset.adapter_counts)
    requests = args.requests or preset.requests
    baseline_max = args.baseline_max_adapters or preset.baseline_max_adapters
    model = ensure_model(preset, args.cache_dir)
    shapes = target_shapes(preset.model)
    small, large = args.confirm
    confirm = args.confirm_rounds and "deft" in args.systems and small in counts and large in counts
    rows: list[dict[str, Any]] = []
    registration: dict[str, dict[int, float]] = {s: {} for s in args.systems}
    second = start_server("deft", preset, model, workdir) if confirm else None  # serves N = small only
    try:
        with running_servers(args.systems, preset, model, workdir) as servers:
            single_s = single_request_seconds(servers[args.systems[0]].address, preset)
            rate = (args.load or preset.load) / single_s
            print(f"one request alone: {single_s:.3f} s; offered rate {rate:.2f} req/s", flush=True)
            for n in counts:
                paths = write_peft_adapters(shapes, range(n), preset.ranks, workdir / "adapters")
                systems = [s for s in args.systems if s == "deft" or n <= baseline_max]
                for system in systems:
                    seconds = register_adapters_sync(servers[system].address, paths)
                    registration[system][n] = sum(seconds.values()) / max(1, len(seconds))
                for law in args.popularity:
                    arrivals = workload(n, law, rate, requests, preset, args.seed)
                    for system in systems:
                        rows.append(
                            run_row(
                                servers[system].address, arrivals, preset, N=n, popularity=law, server=system
                            )
                        )
            confirmation = []
            if second is not None:
                second.wait_ready()
                register_adapters_sync(
                    second.address,
                    write_peft_adapters(shapes, range(small), preset.ranks, workdir / "adapters"),
                )
                targets_by_n = {small: second.address, large: servers["deft"].address}
                confirmation = confirm_scaling(targets_by_n, args, preset, rate, requests)
    finally:
        if second is not None:
            second.stop()
    return {
        "preset": preset.describe(),
        "single_request_s": single_s,
        "offered_req_s": rate,
        "requests_per_run": requests,
        "counts": counts,
        "baseline_max_adapters": baseline_max,
        "mean_registration_s": registration,
        "rows": rows,
        "confirmation": confirmation,
        "confirm": list(args.confirm),
    }


def workload(n: int, law: str, rate: float, requests: int, preset: Preset, seed: int) -> list[Arrival]:
    """The run's trace: for one seed, every N and law share arrival times, steps, sizes and seeds."""
    names = [adapter_name(i) for i in range(n)]
    return poisson_arrivals(requests, rate, names, Popularity.parse(law), preset.steps, preset.sizes, seed)


def confirm_scaling(
    targets_by_n: dict[int, str], args: argparse.Namespace, preset: Preset, rate: float, requests: int
) -> list[dict[str, Any]]:
    """deft at N = small vs N = large, two servers side by side, alternating order over rounds, so that the
    ratio the target quotes is not two single runs minutes apart."""
    rows = []
    for r in range(args.confirm_rounds):
        for law in args.popularity:
            order = sorted(targets_by_n.items(), reverse=bool(r % 2))
            for n, address in order:
                arrivals = workload(n, law, rate, requests, preset, args.seed + 1 + r)
                rows.append(run_row(address, arrivals, preset, round=r, N=n, popularity=law, server="deft"))
    return rows


def throughput(rows: list[dict[str, Any]], server: str, n: int, law: str) -> float | None:
    for r in rows:
        if (r["server"], r["N"], r["popularity"]) == (server, n, law):
            return float(r["img/s"])
    return None


def p99(rows: list[dict[str, Any]], server: str, n: int, law: str) -> float | None:
    for r in rows:
        if (r["server"], r["N"], r["popularity"]) == (server, n, law) and r["p99 s"] is not None:
            return float(r["p99 s"])
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(rows: list[dict[str, Any]], confirmation: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for law in sorted({r["popularity"] for r in rows}):
        for base in ("baseline", "baseline-grouped"):
            per_n = {
                n: ratio(throughput(rows, "deft", n, law), throughput(rows, base, n, law))
                for n in (1, 10, 100, 1000)
            }
            out[f"deft / {base} throughput, {law}"] = {str(n): v for n, v in per_n.items() if v is not None}
    for law in sorted({r["popularity"] for r in rows}):
        per_n = {
            n: ratio(p99(rows, "baseline", n, law), p99(rows, "deft", n, law)) for n in (1, 10, 100, 1000)
        }
        out[f"p99 baseline / deft, {law}"] = {str(n): v for n, v in per_n.items() if v is not None}
    out["deft / baseline at N=100, uniform (target ≥ 3)"] = judge(
        ratio(throughput(rows, "deft", 100, "uniform"), throughput(rows, "baseline", 100, "uniform")), 3.0
    )
    for law in sorted({r["popularity"] for r in rows}):
        out[f"deft throughput N=1000 / N=10, {law}, sweep (one run each)"] = ratio(
            throughput(rows, "deft", 1000, law), throughput(rows, "deft", 10, law)
        )
    out.update(confirmed_ratios(confirmation))
    return out


def confirmed_ratios(confirmation: list[dict[str, Any]]) -> dict[str, Any]:
    """Median throughput at the large N ÷ at the small N over the alternating pairs, per popularity."""
    if not confirmation:
        return {}
    small, large = min(r["N"] for r in confirmation), max(r["N"] for r in confirmation)
    rounds = len({r["round"] for r in confirmation})
    out = {}
    for law in sorted({r["popularity"] for r in confirmation}):
        at = {
            n: statistics.median(
                float(r["img/s"]) for r in confirmation if (r["N"], r["popularity"]) == (n, law)
            )
            for n in (small, large)
        }
        key = f"deft throughput N={large} / N={small}, {law}, medians of {rounds} alternating pairs (target ≥ 0.9)"
        out[key] = judge(at[large] / at[small], 0.9)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    fig, (thr, p99) = plt.subplots(1, 2, figsize=(12, 4.5))
    for law in sorted({r["popularity"] for r in rows}):
        for server in SYSTEMS:
            pts = sorted(
                (r["N"], r["img/s"], r["p99 s"])
                for r in rows
                if (r["server"], r["popularity"]) == (server, law)
            )
            if not pts:
                continue
            style = "-" if law.startswith("zipf") else "--"
            thr.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{server}, {law}")
            p99.plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=f"{server}, {law}")
    thr.set(xscale="log", xlabel="registered adapters N", ylabel="images/s", title="throughput")
    p99.set(xscale="log", xlabel="registered adapters N", ylabel="seconds", title="p99 latency")
    for ax in (thr, p99):
        ax.grid(alpha=0.3)
    thr.legend(fontsize=8)
    return save_figure(fig, path)


def target_text(value: Any) -> str:
    if isinstance(value, dict) and "verdict" in value:
        return str(value["verdict"])
    if isinstance(value, dict):
        return ", ".join(f"N={n}: {v:.2f}" for n, v in value.items())
    return "not measured" if value is None else f"{value:.3f}"


def report(name: str, payload: dict[str, Any]) -> str:
    rows, preset = payload["rows"], payload["preset"]
    lines = [
        f"# adapters-scale ({preset['name']} preset, {preset['model']})",
        "",
        f"{payload['requests_per_run']} requests per run, Poisson at {payload['offered_req_s']:.2f} req/s "
        f"({preset['load']:g} x one-at-a-time capacity; one request alone takes {payload['single_request_s']:.3f} s), "
        f"steps {preset['steps']}, sizes {preset['sizes']}, adapter ranks cycled over {preset['ranks']}. "
        f"Baselines run up to N = {payload['baseline_max_adapters']}.",
        "",
        markdown_table(rows, ["N", "popularity", "server", *ROW_COLUMNS, "load1"]),
        "",
        "## Targets",
        "",
    ]
    for key, value in payload["targets"].items():
        if value != {}:
            lines.append(f"- {key}: {target_text(value)}")
    if payload["confirmation"]:
        lines += [
            "",
            "## deft at N = {} vs N = {}, two servers side by side, alternating order".format(
                *payload["confirm"]
            ),
            "",
            markdown_table(payload["confirmation"], ["round", "popularity", "N", *ROW_COLUMNS, "load1"]),
        ]
    lines += ["", f"![throughput and p99 vs N]({name}.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    def measured(workdir: Path) -> dict[str, Any]:
        payload = measure(args, workdir)
        return {**payload, "targets": targets(payload["rows"], payload["confirmation"])}

    return run_suite(
        "adapters-scale",
        args.out or f"adapters-scale-{args.preset}",
        measured,
        machine=lambda: environment(PRESETS[args.preset]),
        params=string_params(args),
        report=report,
        figure=lambda path, payload: plot(payload["rows"], path),
        workdir=args.workdir,
    )


if __name__ == "__main__":
    main()
