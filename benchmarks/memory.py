"""memory: resident bytes per adapter against its factor bytes, and SDXL-sized adapters per GiB.

1. **Tiny model, measured.** (a) In process: the pool's resident bytes for adapters of rank 4, 8 and 32
   against the bytes of their compiled factors ``(B, A)`` in the serving dtype. (b) A real deft server:
   growth of its resident set size (RSS) per adapter once adapters are registered and then made resident
   by a one-step request each, against the ``compiled_bytes`` the server reports. On a CPU server the
   device pages and the host cache are both host memory, so about 2x is expected there.
2. **SDXL, computed and allocated.** Target shapes come from SDXL's real UNet config (built on the meta
   device: 560 attention projections, no weights). For rank 4, 8 and 32 in float16 (the GPU serving
   dtype) and float32: the factor bytes of one adapter, how many fit in 1 GiB ideally, how many deft's
   pool holds when given a 1 GiB budget (a real pool allocated on the CPU and filled until the first
   eviction), the page tables' bytes outside that budget, and how many would fit if every adapter were
   padded to rank 64 (a pool without rank paging).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import torch
from deft_client import DeftClient

from benchmarks.common import markdown_table, run_suite, string_params
from benchmarks.suites import (
    PRESETS,
    Preset,
    ensure_model,
    environment,
    preset_argument,
    pyplot,
    running_servers,
    save_figure,
    target_shapes,
    write_peft_adapters,
)
from deft_runtime.adapter import AdapterKind, BaseFingerprint, Decomposition
from deft_runtime.compile import CompiledAdapter, LowRankFactors
from deft_runtime.pool import AdapterPool, PoolConfig
from deft_runtime.runtime import MultiAdapterModel
from deft_runtime.testing import random_adapter

GIB = 1 << 30
RANKS = (4, 8, 32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks memory", description=__doc__)
    preset_argument(p)
    p.add_argument("--per-rank", type=int, default=48, help="adapters per rank on the server")
    p.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    p.add_argument("--workdir", type=Path)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "deft" / "bench-models")
    p.add_argument("--out", help="report name (default: memory-PRESET)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ tiny, measured


def pool_accounting(preset: Preset) -> list[dict[str, Any]]:
    """Resident bytes in the pool per adapter ÷ its compiled factor bytes (serving dtype)."""
    from deft_runtime.models import build_tiny_sdxl

    unet = build_tiny_sdxl(0).unet
    dtype = torch.float32 if preset.device == "cpu" else getattr(torch, preset.dtype)
    model = MultiAdapterModel(
        unet, pool_config=PoolConfig(device_bytes=32 << 20, host_bytes=32 << 20, dtype=dtype), backend="torch"
    )
    shapes = {name: (int(w.shape[0]), int(w.shape[1])) for name, w in model.base_weights.items()}
    rows = []
    for rank in RANKS:
        adapter = random_adapter(
            AdapterKind.DEFT, shapes, rank=rank, decomposition=Decomposition.RELU, seed=rank
        )
        compiled = model.register(f"r{rank}", adapter)
        model.pool.acquire([f"r{rank}"])
        elem = torch.empty((), dtype=dtype).element_size()
        factor_bytes = sum(f.B.numel() + f.A.numel() for f in compiled.factors.values()) * elem
        resident = model.pool.resident_nbytes(f"r{rank}")
        rows.append(
            {
                "rank": rank,
                "factor bytes": factor_bytes,
                "pool resident bytes": resident,
                "resident / factor": resident / factor_bytes,
            }
        )
    return rows


def server_rss(args: argparse.Namespace, preset: Preset, workdir: Path) -> dict[str, Any]:
    """RSS growth of a real deft server per registered, then per resident, adapter."""
    model = ensure_model(preset, args.cache_dir)
    shapes = target_shapes(preset.model)
    # room for every adapter at once, so that nothing is evicted while RSS grows
    slots = ("--max-resident-adapters", str(len(RANKS) * args.per_rank + 8))
    with running_servers(["deft"], preset, model, workdir, extra={"deft": slots}) as servers:
        server = servers["deft"]
        process = psutil.Process(server.process.pid)
        width, height = preset.sizes[0]
        rows = []
        with DeftClient(server.address, timeout=preset.run_timeout_s) as client:
            for _ in range(3):
                client.generate("warm-up", steps=1, width=width, height=height, seed=0)
            for rank in RANKS:
                paths = write_peft_adapters(
                    shapes, range(args.per_rank), (rank,), workdir / f"rss-r{rank}", prefix=f"mem-r{rank}"
                )
                rss0 = process.memory_info().rss
                infos = [client.register_adapter(name, path) for name, path in paths.items()]
                rss1 = process.memory_info().rss
                for info in infos:
                    client.generate(
                        "resident", adapters=[info.name], steps=1, width=width, height=height, seed=0
                    )
                rss2 = process.memory_info().rss
                resident = sum(client.get_adapter(i.name).state == "resident" for i in infos)
                compiled = statistics.mean(i.compiled_bytes for i in infos)
                rows.append(
                    {
                        "rank": rank,
                        "adapters": len(infos),
                        "resident after": resident,
                        "compiled bytes": compiled,
                        "RSS / registered adapter": (rss1 - rss0) / len(infos),
                        "RSS / resident adapter": (rss2 - rss1) / len(infos),
                        "resident RSS / compiled": (rss2 - rss1) / len(infos) / compiled,
                    }
                )
                print(rows[-1], flush=True)
    return {"rows": rows}


# ------------------------------------------------------------------------------------------ SDXL per GiB


class _OneCompiled:
    """A pool source that hands out the same random factors under any name (the pool copies them)."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], rank: int, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(rank)
        self.compiled = CompiledAdapter(
            AdapterKind.DEFT,
            {
                name: LowRankFactors(
                    B=torch.randn(d_out, rank, generator=g).to(dtype),
                    A=torch.randn(rank, d_in, generator=g).to(dtype),
                )
                for name, (d_out, d_in) in shapes.items()
            },
            BaseFingerprint(dict(shapes)),
        )

    def __call__(self, name: str) -> CompiledAdapter:
        return self.compiled


def fill_pool(shapes: Mapping[str, tuple[int, int]], rank: int, dtype: torch.dtype, slots: int) -> int:
    """Adapters of ``rank`` a real 1 GiB pool holds: acquire new ones until the first eviction."""
    source = _OneCompiled(shapes, rank, dtype)
    config = PoolConfig(device_bytes=GIB, host_bytes=1, max_slots=slots, max_rank=64, dtype=dtype)
    pool = AdapterPool(dict(shapes), config, source)
    count = 0
    while pool.stats.evictions["device"] == 0 and count < slots:
        pool.acquire([f"a{count}"])
        pool.release([f"a{count}"])
        count += 1
    return count - 1 if pool.stats.evictions["device"] else count


def sdxl_per_gib(dtypes: list[str], server_slots: int = 64) -> list[dict[str, Any]]:
    shapes = target_shapes("sdxl")
    width = sum(d_out + d_in for d_out, d_in in shapes.values())  # one rank vector over every layer
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        elem = torch.empty((), dtype=dtype).element_size()
        for rank in RANKS:
            factor = rank * width * elem
            ideal = GIB // factor
            slots = int(ideal) + 8
            tables = len(shapes) * (server_slots * 64 + server_slots) * 4  # page_table + ranks, int32
            rows.append(
                {
                    "dtype": dtype_name,
                    "rank": rank,
                    "factor MiB": factor / 2**20,
                    "ideal per GiB": int(ideal),
                    "deft pool per GiB (computed)": (GIB // (width * elem)) // rank,
                    "deft pool per GiB (filled)": fill_pool(shapes, rank, dtype, slots),
                    "padded to rank 64 per GiB": GIB // (64 * width * elem),
                    "page tables MiB (64 slots)": tables / 2**20,
                }
            )
            print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------ report


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len({r["dtype"] for r in rows}), figsize=(11, 4), squeeze=False)
    for ax, dtype in zip(axes[0], sorted({r["dtype"] for r in rows}), strict=True):
        sub = [r for r in rows if r["dtype"] == dtype]
        xs = range(len(sub))
        for k, column in enumerate(
            ("ideal per GiB", "deft pool per GiB (filled)", "padded to rank 64 per GiB")
        ):
            ax.bar([x + (k - 1) * 0.27 for x in xs], [r[column] for r in sub], 0.27, label=column)
        ax.set_xticks(list(xs), [f"rank {r['rank']}" for r in sub])
        ax.set(title=f"SDXL-sized adapters per GiB ({dtype})", ylabel="adapters")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def report(name: str, payload: dict[str, Any]) -> str:
    lines = [
        f"# memory ({payload['preset']['name']} preset)",
        "",
        "## Resident bytes per adapter (tiny-sdxl, in process: the pool's own accounting)",
        "",
        markdown_table(payload["pool_accounting"], list(payload["pool_accounting"][0])),
        "",
        "## A real deft server's RSS growth per adapter (CPU: device pages and host cache are both RSS)",
        "",
        markdown_table(payload["server_rss"]["rows"], list(payload["server_rss"]["rows"][0])),
        "",
        f"## SDXL-sized adapters per GiB ({payload['sdxl_targets']} attention projections of SDXL's UNet)",
        "",
        markdown_table(payload["sdxl_per_gib"], list(payload["sdxl_per_gib"][0])),
        "",
        f"![adapters per GiB]({name}.png)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset = PRESETS[args.preset]

    def measured(workdir: Path) -> dict[str, Any]:
        return {
            "preset": preset.describe(),
            "pool_accounting": pool_accounting(preset),
            "server_rss": server_rss(args, preset, workdir),
            "sdxl_targets": len(target_shapes("sdxl")),
            "sdxl_per_gib": sdxl_per_gib(args.dtypes),
        }

    return run_suite(
        "memory",
        args.out or f"memory-{args.preset}",
        measured,
        machine=lambda: environment(preset),
        params=string_params(args),
        report=report,
        figure=lambda path, payload: plot(payload["sdxl_per_gib"], path),
        workdir=args.workdir,
    )


if __name__ == "__main__":
    main()
