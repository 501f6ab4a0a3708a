"""Load generator: drive a running deft server (or anything speaking ``deft.v1``) with an open-loop workload.

``python -m benchmarks loadgen --target 127.0.0.1:50051 --rate 2 --requests 100 --popularity zipf:1.0``

Arrivals are open loop: each request is sent at its arrival time whether or not earlier ones have
finished, either from a Poisson process at ``--rate`` requests/s or replayed from a trace file. Each
request names one adapter drawn from a popularity law over N adapters (``uniform``, ``zipf:ALPHA``,
``hot:SHARE``: one adapter gets SHARE of the requests, ``distinct``: every request a different adapter,
``none``), a step count and a size. Every request is a ``Generate`` stream, so the client sees the
server's events: queue time is ``queued → started``, time to first step is ``sent → first progress``,
latency is ``sent → result``. Errors are counted by gRPC status code.

The run is bounded in requests (the trace's length), in time (``--duration``: no request is sent after
it; ``--timeout``: requests still running then are cancelled and counted ``unfinished``), and targets
loopback addresses only unless ``--allow-remote`` is given.

Trace files are CSV with a header; ``adapter`` may be empty (no adapter), ``seed`` is optional::

    t,adapter,steps,size,seed
    0.000,dog,8,64x64,0
    0.412,,4,32x32,1
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ipaddress
import math
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deft_client import AsyncDeftClient, DeftError, Progress, Queued, Result, Started

from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, write_report

DEFAULT_PROMPT = "a photo of concept {index}"
POPULARITY_KINDS = ("none", "uniform", "zipf", "hot", "distinct")


# ------------------------------------------------------------------------------------------ workload


@dataclass(frozen=True)
class Arrival:
    """One request of a workload: when it is sent (seconds from the start) and what it asks for."""

    at: float
    adapter: str | None
    steps: int
    width: int
    height: int
    seed: int


@dataclass(frozen=True)
class Popularity:
    """How requests pick among N adapters: ``uniform``, ``zipf`` (``param`` = α), ``hot`` (``param`` =
    the hot adapter's share), ``distinct`` (no adapter twice until all were used) or ``none``."""

    kind: str
    param: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Popularity:
        kind, _, value = text.partition(":")
        if kind not in POPULARITY_KINDS:
            raise ValueError(f"unknown popularity {text!r}; use one of {', '.join(POPULARITY_KINDS)}")
        default = {"zipf": 1.0, "hot": 0.9}.get(kind, 0.0)
        param = float(value) if value else default
        if kind == "hot" and not 0.0 <= param <= 1.0:
            raise ValueError(f"hot:SHARE needs a share between 0 and 1, got {param}")
        if kind == "zipf" and param < 0:
            raise ValueError(f"zipf:ALPHA needs α ≥ 0, got {param}")
        return cls(kind, param)

    def __str__(self) -> str:
        return f"{self.kind}:{self.param:g}" if self.kind in ("zipf", "hot") else self.kind

    def probabilities(self, n: int) -> np.ndarray:
        """Probability of each popularity rank 1..n (rank 1 the most popular)."""
        if self.kind == "zipf":
            weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** self.param
        elif self.kind == "hot" and n > 1:
            weights = np.full(n, (1.0 - self.param) / (n - 1))
            weights[0] = self.param
        else:
            weights = np.ones(n, dtype=np.float64)
        return weights / weights.sum()

    def assign(self, names: Sequence[str], count: int, rng: np.random.Generator) -> list[str | None]:
        """``count`` adapter choices; which adapter holds which popularity rank is itself random."""
        if self.kind == "none":
            return [None] * count
        if not names:
            raise ValueError(f"popularity {self} needs at least one adapter name")
        order = [names[i] for i in rng.permutation(len(names))]
        if self.kind == "distinct":
            return [order[i % len(order)] for i in range(count)]
        picks = rng.choice(len(order), size=count, p=self.probabilities(len(order)))
        return [order[int(i)] for i in picks]


def parse_size(text: str) -> tuple[int, int]:
    """``"64x48"`` → ``(64, 48)`` (width, height)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 64x64")
    return int(width), int(height)


def poisson_arrivals(
    count: int,
    rate: float,
    adapters: Sequence[str],
    popularity: Popularity,
    steps: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    seed: int = 0,
) -> list[Arrival]:
    """A seeded open-loop workload; ``rate`` ≤ 0 or infinite sends everything at once.

    Times, steps, sizes and seeds come from one stream and adapters from another, so two workloads
    with the same seed differ only in their adapters (deft vs baseline, N = 10 vs 1000).
    """
    rng = np.random.default_rng(seed)
    if rate > 0 and math.isfinite(rate):
        gaps = rng.exponential(1.0 / rate, size=count)
        times = np.cumsum(gaps) - gaps[0]
    else:
        times = np.zeros(count)
    step_picks = rng.choice(np.asarray(steps), size=count)
    size_picks = rng.integers(len(sizes), size=count)
    chosen = popularity.assign(adapters, count, np.random.default_rng(seed + 1))
    return [
        Arrival(float(t), name, int(s), *sizes[int(z)], seed=seed * 100_000 + i)
        for i, (t, name, s, z) in enumerate(zip(times, chosen, step_picks, size_picks, strict=True))
    ]


def read_trace(path: str | Path) -> list[Arrival]:
    """Arrivals from a CSV trace (``t,adapter,steps,size[,seed]``), sorted by time."""
    arrivals = []
    with Path(path).open(newline="") as f:
        rows = csv.DictReader(line for line in f if line.strip() and not line.lstrip().startswith("#"))
        missing = {"t", "adapter", "steps", "size"} - set(rows.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: the header lacks {sorted(missing)} (need t,adapter,steps,size[,seed])")
        for line, row in enumerate(rows, start=2):
            try:
                t, steps = float(row["t"]), int(row["steps"])
                width, height = parse_size(row["size"])
                seed = int(row["seed"]) if row.get("seed") not in (None, "") else line - 2
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}, row {line}: {e}") from e
            if not (math.isfinite(t) and t >= 0) or steps < 1:
                raise ValueError(f"{path}, row {line}: t must be ≥ 0 and steps ≥ 1")
            adapter = (row["adapter"] or "").strip() or None
            arrivals.append(Arrival(t, adapter, steps, width, height, seed))
    return sorted(arrivals, key=lambda a: a.at)


def write_trace(arrivals: Sequence[Arrival], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t", "adapter", "steps", "size", "seed"])
        for a in arrivals:
            writer.writerow([f"{a.at:.6f}", a.adapter or "", a.steps, f"{a.width}x{a.height}", a.seed])
    return path


# ------------------------------------------------------------------------------------------ target


def check_target(target: str, allow_remote: bool = False) -> str:
    """``target`` if it is a loopback address (or a unix socket); refuses anything else unless allowed."""
    if target.startswith(("unix:", "unix-abstract:")) or allow_remote:
        return target
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {target!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {host!r}: {e}") from e
    addresses = {str(info[4][0]) for info in infos}
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote:
        raise ValueError(
            f"{target} resolves to non-loopback address(es) {remote}; the load generator only targets "
            "loopback by default. Pass --allow-remote to load a deployment you own."
        )
    return target


# ------------------------------------------------------------------------------------------ running


@dataclass
class RequestRecord:
    """What happened to one request; times are seconds from the start of the run."""

    index: int
    adapter: str | None
    steps: int
    width: int
    height: int
    scheduled_s: float
    sent_s: float | None = None
    queued_s: float | None = None
    started_s: float | None = None
    first_step_s: float | None = None
    done_s: float | None = None
    server_queue_s: float | None = None
    images: int = 0
    status: str = "not_sent"  # ok | a gRPC status code in lower case | not_sent | unfinished
    error: str = ""

    @property
    def latency_s(self) -> float | None:
        return None if self.done_s is None or self.sent_s is None else self.done_s - self.sent_s

    @property
    def queue_s(self) -> float | None:
        return None if self.started_s is None or self.queued_s is None else self.started_s - self.queued_s

    @property
    def first_step_latency_s(self) -> float | None:
        if self.first_step_s is None or self.sent_s is None:
            return None
        return self.first_step_s - self.sent_s


@dataclass
class LoadRun:
    target: str
    records: list[RequestRecord]
    wall_s: float
    started_unix: float
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return summarize(self.records)


async def _send(
    client: AsyncDeftClient,
    a: Arrival,
    rec: RequestRecord,
    t0: float,
    end: float,
    prompt: str,
    guidance: float | None,
) -> None:
    def now() -> float:
        return time.perf_counter() - t0

    rec.sent_s = now()
    try:
        stream = client.generate_stream(
            prompt.format(index=rec.index),
            adapters=[(a.adapter, 1.0)] if a.adapter else None,
            seed=a.seed,
            steps=a.steps,
            width=a.width,
            height=a.height,
            guidance_scale=guidance,
            request_id=f"loadgen-{rec.index}",
            timeout=max(0.001, end - time.perf_counter()),
        )
        async for event in stream:
            t = now()
            if isinstance(event, Queued):
                rec.queued_s = t
            elif isinstance(event, Started):
                rec.started_s = t
            elif isinstance(event, Progress) and rec.first_step_s is None:
                rec.first_step_s = t
            elif isinstance(event, Result):
                rec.done_s, rec.images, rec.server_queue_s = t, len(event.images), event.queue_seconds
        rec.status = "ok" if rec.done_s is not None else "no_result"
    except DeftError as e:
        rec.status, rec.error = e.code.name.lower(), e.message[:300]
    except asyncio.CancelledError:
        rec.status = "unfinished"
        raise


async def run_load(
    target: str,
    arrivals: Sequence[Arrival],
    *,
    prompt: str = DEFAULT_PROMPT,
    guidance: float | None = None,
    duration_s: float | None = None,
    timeout_s: float = 600.0,
    token: str | None = None,
) -> LoadRun:
    """Send ``arrivals`` open loop and wait for them; nothing is sent after ``duration_s`` and whatever
    still runs ``timeout_s`` after the start is cancelled."""
    records = [RequestRecord(i, a.adapter, a.steps, a.width, a.height, a.at) for i, a in enumerate(arrivals)]
    started_unix = time.time()
    async with AsyncDeftClient(target, token=token) as client:
        t0 = time.perf_counter()
        end = t0 + timeout_s
        tasks = []
        for rec, a in zip(records, arrivals, strict=True):
            if duration_s is not None and a.at > duration_s:
                break
            delay = t0 + a.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() >= end:
                break
            tasks.append(asyncio.create_task(_send(client, a, rec, t0, end, prompt, guidance)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - time.perf_counter()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    return LoadRun(target, records, wall, started_unix)


def run_load_sync(target: str, arrivals: Sequence[Arrival], **kwargs: Any) -> LoadRun:
    return asyncio.run(run_load(target, arrivals, **kwargs))


# ------------------------------------------------------------------------------------------ summary


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": …}``; linear interpolation (with 30 samples p99 lies between the two largest)."""
    if not values:
        return {f"p{q:g}": None for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}


def summarize(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Throughput (images/s over the span from the first send to the last result), latency, queue time
    and time-to-first-step percentiles, and error counts by status."""
    sent = [r for r in records if r.sent_s is not None]
    ok = [r for r in sent if r.status == "ok"]
    images = sum(r.images for r in ok)
    span = (
        (
            max(r.done_s for r in ok if r.done_s is not None)
            - min(r.sent_s for r in sent if r.sent_s is not None)
        )
        if ok
        else 0.0
    )
    send_times = sorted(r.sent_s for r in sent if r.sent_s is not None)
    send_span = send_times[-1] - send_times[0] if len(send_times) > 1 else 0.0
    statuses = Counter(r.status for r in records if r.status != "ok")
    latency = [r.latency_s for r in ok if r.latency_s is not None]
    queue = [r.queue_s for r in ok if r.queue_s is not None]
    first = [r.first_step_latency_s for r in ok if r.first_step_latency_s is not None]
    return {
        "requests": len(records),
        "sent": len(sent),
        "completed": len(ok),
        "errors": sum(n for s, n in statuses.items() if s != "not_sent"),
        "statuses": dict(statuses),
        "images": images,
        "span_s": span,
        "offered_req_s": (len(sent) - 1) / send_span if send_span > 0 else None,
        "throughput_img_s": images / span if span > 0 else 0.0,
        "latency_s": {**percentiles(latency), "mean": float(np.mean(latency)) if latency else None},
        "queue_s": percentiles(queue),
        "first_step_s": percentiles(first),
    }


def flat_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The summary as one table row (the columns every report uses)."""
    return {
        "sent": summary["sent"],
        "ok": summary["completed"],
        "errors": summary["errors"],
        "img/s": summary["throughput_img_s"],
        "p50 s": summary["latency_s"]["p50"],
        "p95 s": summary["latency_s"]["p95"],
        "p99 s": summary["latency_s"]["p99"],
        "queue p50 s": summary["queue_s"]["p50"],
        "queue p99 s": summary["queue_s"]["p99"],
    }


ROW_COLUMNS = ("sent", "ok", "errors", "img/s", "p50 s", "p95 s", "p99 s", "queue p50 s", "queue p99 s")


def records_payload(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


# ------------------------------------------------------------------------------------------ adapters


async def register_adapters(
    target: str, paths: Mapping[str, Path], *, concurrency: int = 4, token: str | None = None
) -> dict[str, float]:
    """Register every ``name → path`` not yet registered on ``target``; returns seconds per new adapter."""
    async with AsyncDeftClient(target, token=token, timeout=600) as client:
        present = {a.name for a in await client.list_adapters()}
        gate = asyncio.Semaphore(concurrency)
        seconds: dict[str, float] = {}

        async def one(name: str, path: Path) -> None:
            async with gate:
                start = time.perf_counter()
                await client.register_adapter(name, path)
                seconds[name] = time.perf_counter() - start

        await asyncio.gather(*(one(n, p) for n, p in paths.items() if n not in present))
    return seconds


def register_adapters_sync(target: str, paths: Mapping[str, Path], **kwargs: Any) -> dict[str, float]:
    return asyncio.run(register_adapters(target, paths, **kwargs))


async def list_adapter_names(target: str, token: str | None = None) -> list[str]:
    async with AsyncDeftClient(target, token=token) as client:
        return [a.name for a in await client.list_adapters()]


# ------------------------------------------------------------------------------------------ plots


def plot_run(records: Sequence[RequestRecord], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.status == "ok" and r.latency_s is not None]
    fig, (cdf, timeline) = plt.subplots(1, 2, figsize=(11, 4))
    lat = np.sort(np.array([r.latency_s for r in ok], dtype=np.float64))
    if lat.size:
        cdf.step(lat, np.arange(1, lat.size + 1) / lat.size, where="post")
    cdf.set(xlabel="latency (s)", ylabel="fraction of requests", title="latency CDF")
    timeline.scatter([r.sent_s for r in ok], [r.latency_s for r in ok], s=12, label="latency")
    timeline.scatter([r.sent_s for r in ok], [r.queue_s for r in ok], s=12, marker="x", label="queue")
    timeline.set(xlabel="sent at (s)", ylabel="seconds", title="per request")
    timeline.legend()
    for ax in (cdf, timeline):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ CLI


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--token", default=None, help="bearer token, when the server requires one")
    p.add_argument("--trace", type=Path, help="replay this CSV trace instead of Poisson arrivals")
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second (0: all at once)")
    p.add_argument("--requests", type=int, default=50, help="requests in the Poisson workload")
    p.add_argument("--duration", type=float, default=None, help="send nothing after this many seconds")
    p.add_argument("--timeout", type=float, default=600.0, help="cancel what still runs after this")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--adapters", default="", help="comma-separated adapter names to draw from")
    names.add_argument("--all-adapters", action="store_true", help="draw from every registered adapter")
    names.add_argument("--register", type=int, default=0, help="register N synthetic adapters first")
    p.add_argument("--register-model", default="tiny-sdxl", help="their architecture: tiny-sdxl | sdxl")
    p.add_argument("--ranks", type=_csv_ints, default=(4, 8, 16), help="their ranks, cycled")
    p.add_argument(
        "--popularity", default="zipf:1.0", help="uniform | zipf:ALPHA | hot:SHARE | distinct | none"
    )
    p.add_argument("--steps", type=_csv_ints, default=(4, 8, 16), help="step counts, drawn uniformly")
    p.add_argument("--sizes", default="64x64", help="comma-separated WIDTHxHEIGHT, drawn uniformly")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-trace", type=Path, help="also write the workload as a CSV trace")
    p.add_argument("--out", default=None, help="write OUT.json, OUT.md and OUT.png")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p


def _adapter_names(args: argparse.Namespace) -> list[str]:
    if args.register:
        from benchmarks.suites import target_shapes, write_peft_adapters

        folder = Path(tempfile.mkdtemp(prefix="deft-loadgen-adapters-"))
        paths = write_peft_adapters(
            target_shapes(args.register_model), range(args.register), args.ranks, folder, prefix="loadgen"
        )
        register_adapters_sync(args.target, paths, token=args.token)
        return list(paths)
    if args.all_adapters:
        return asyncio.run(list_adapter_names(args.target, args.token))
    return [n for n in args.adapters.split(",") if n]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    try:
        check_target(args.target, args.allow_remote)
        popularity = Popularity.parse(args.popularity)
        sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.trace:
        arrivals = read_trace(args.trace)
    else:
        names = _adapter_names(args)
        if popularity.kind != "none" and not names:
            raise SystemExit(
                "error: no adapters to draw from: give --adapters, --all-adapters or --register N"
            )
        arrivals = poisson_arrivals(args.requests, args.rate, names, popularity, args.steps, sizes, args.seed)
    if args.write_trace:
        write_trace(arrivals, args.write_trace)
    run = run_load_sync(
        args.target,
        arrivals,
        guidance=args.guidance,
        duration_s=args.duration,
        timeout_s=args.timeout,
        token=args.token,
    )
    summary = run.summary()
    params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "token"}
    md = f"# loadgen against {args.target}\n\n" + markdown_table([flat_row(summary)], ROW_COLUMNS)
    print(md)
    print(f"statuses: {summary['statuses'] or 'all ok'}")
    if args.out:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        plot = plot_run(
            run.records, args.out_dir / f"{args.out}.png", f"{args.target}: {len(arrivals)} requests"
        )
        payload = {
            "suite": "loadgen",
            "client_machine": machine_info(torch.device("cpu")),
            "params": params,
            "summary": summary,
            "records": records_payload(run.records),
            "plot": plot.name,
        }
        write_report(args.out, payload, md + f"\n\n![latency]({plot.name})", args.out_dir)
    return summary


if __name__ == "__main__":
    main()
