"""Kernel suite: one SDXL-sized layer, a batch of 8 rows with 8 different adapters, side by side with
the same batch without adapters, PEFT's mixed-batch path, and merge-per-request.

Figures (each a ratio of interleaved medians in one process):

- ``mixed/base``: batch of 8 with 8 distinct adapters over the same batch with none (target ≤ 1.15 at
  rank 8, CPU, torch backend; the FLOP ratio is about 1.01-1.02);
- ``peft/deft`` and ``merge/deft``: how much faster deft is than PEFT's ``adapter_names=`` mixed batch
  (LoRA only: PEFT's DEFT tuner has no mixed-batch path) and than merging each request's adapter into
  the weight, running that row, and restoring the weight;
- ``factored/compiled``: DEFT's factored form ``Q·(s·R·x − rightᵀ·(W0·x))`` over the compiled
  ``B·(A·x)`` for one adapter on the whole batch;
- ``resident/factor bytes``: what the pool holds per adapter over the adapter's own factor bytes.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import interleaved_medians, machine_info, markdown_table, run_suite
from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.compile import compile_adapter
from deft_runtime.ops.torch_ops import factored_deft_delta
from deft_runtime.pool import PoolConfig
from deft_runtime.projectors import project
from deft_runtime.runtime import MultiAdapterModel
from deft_runtime.testing import random_adapter


@dataclass(frozen=True)
class LayerCase:
    name: str
    d_in: int
    d_out: int
    tokens: int


PRESETS: dict[str, list[LayerCase]] = {
    # CPU: SDXL widths with token counts that keep one run within minutes on 2 cores
    "cpu": [
        LayerCase("self-attn d640", 640, 640, 1024),
        LayerCase("self-attn d1280", 1280, 1280, 1024),
        LayerCase("cross-attn k 2048->1280", 2048, 1280, 77),
    ],
    "gpu": [
        LayerCase("self-attn d640", 640, 640, 4096),
        LayerCase("self-attn d1280", 1280, 1280, 1024),
        LayerCase("cross-attn k 2048->1280", 2048, 1280, 77),
    ],
    # benchmarks/gpu_check.sh --cpu-dry-run: every code path, sizes the Triton interpreter runs in seconds
    "dry": [LayerCase("dry run d64", 64, 64, 16)],
}
BATCH = 8


class OneLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        return self.to_q(x)


def _build(
    case: LayerCase, ranks: list[int], *, backend: str, device: torch.device, dtype: torch.dtype, seed: int
):
    torch.manual_seed(seed)
    base = OneLayer(case.d_in, case.d_out).to(device=device, dtype=dtype).eval()
    model = copy.deepcopy(base)
    shapes = {"to_q": (case.d_out, case.d_in)}
    budget = sum(ranks) * (case.d_in + case.d_out) * torch.empty((), dtype=dtype).element_size() * 2
    mam = MultiAdapterModel(
        model,
        pool_config=PoolConfig(device_bytes=budget, host_bytes=budget * 4, dtype=dtype, device=device),
        targets=["to_q"],
        backend=backend,  # type: ignore[arg-type]
        max_rows=BATCH,
    )
    adapters = {
        f"a{i}": random_adapter(
            AdapterKind.DEFT, shapes, rank=r, decomposition=Decomposition.QR, seed=i, magnitude=0.05
        )
        for i, r in enumerate(ranks)
    }
    compiled = {n: mam.register(n, a) for n, a in adapters.items()}
    return base, mam, adapters, compiled


def _peft_mixed(base: OneLayer, compiled: dict, device: torch.device, dtype: torch.dtype):
    """PEFT's mixed-batch LoRA path with the same (B, A) factors as LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    names = list(compiled)
    peft_model = None
    for n in names:
        f = compiled[n].factors["to_q"]
        cfg = LoraConfig(r=f.rank, lora_alpha=f.rank, target_modules=["to_q"])
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=n)
        else:
            peft_model.add_adapter(n, cfg)
        model: Any = peft_model.base_model.model
        layer = model.to_q
        with torch.no_grad():
            layer.lora_A[n].weight.copy_(f.A.to(dtype))
            layer.lora_B[n].weight.copy_(f.B.to(dtype))
    assert peft_model is not None
    return peft_model.to(device).eval(), names


def _merge_per_request(base: OneLayer, compiled: dict, names: list[str], x: torch.Tensor) -> torch.Tensor:
    """What users do without a multi-adapter server: per request, merge, run its row, restore."""
    W = base.to_q.weight
    saved = W.detach().clone()
    outs = []
    with torch.no_grad():
        for i, n in enumerate(names):
            f = compiled[n].factors["to_q"]
            W.add_(f.B.to(W) @ f.A.to(W))
            outs.append(base(x[i : i + 1]))
            W.copy_(saved)
    return torch.cat(outs)


def run_case(
    case: LayerCase, *, backend: str, device: torch.device, dtype: torch.dtype, repeats: int
) -> list[dict[str, Any]]:
    rows_out = []
    x = torch.randn(BATCH, case.tokens, case.d_in, device=device, dtype=dtype)
    for label, ranks in (("rank 8", [8] * BATCH), ("ranks 4/8/32/64", [4, 8, 32, 64] * (BATCH // 4))):
        base, mam, _, compiled = _build(case, ranks, backend=backend, device=device, dtype=dtype, seed=0)
        names = list(compiled)
        peft_model, _ = _peft_mixed(base, compiled, device, dtype)
        rows = [[(n, 1.0)] for n in names]

        def deft_mixed(rows=rows, mam=mam) -> None:
            with torch.no_grad(), mam.rows(rows):
                mam.denoiser(x)

        def deft_base(mam=mam) -> None:
            with torch.no_grad():
                mam.denoiser(x)

        def peft(peft_model=peft_model, names=names) -> None:
            with torch.no_grad():
                peft_model(x, adapter_names=names)

        def merge(base=base, compiled=compiled, names=names) -> None:
            _merge_per_request(base, compiled, names, x)

        t = interleaved_medians(
            {"base": deft_base, "deft": deft_mixed, "peft": peft, "merge": merge},
            device=device,
            repeats=repeats,
        )
        flops_base = 2 * BATCH * case.tokens * case.d_in * case.d_out
        flops_adapters = sum(2 * case.tokens * r * (case.d_in + case.d_out) for r in ranks)
        with torch.no_grad(), mam.rows(rows):
            resident = [
                mam.pool.resident_nbytes(n) / (compiled[n].nbytes * _dtype_ratio(dtype)) for n in names
            ]
        rows_out.append(
            {
                "layer": case.name,
                "ranks": label,
                "tokens": case.tokens,
                "base_ms": 1e3 * t["base"],
                "deft_ms": 1e3 * t["deft"],
                "mixed/base": t["deft"] / t["base"],
                "flop ratio": (flops_base + flops_adapters) / flops_base,
                "peft/deft": t["peft"] / t["deft"],
                "merge/deft": t["merge"] / t["deft"],
                "resident/factor bytes": max(resident),
            }
        )
    rows_out.append(_factored_vs_compiled(case, x, device=device, dtype=dtype, repeats=repeats))
    return rows_out


def _dtype_ratio(dtype: torch.dtype) -> float:
    """Compiled factors are float32; the pool stores them in the serving dtype."""
    return torch.empty((), dtype=dtype).element_size() / 4


def _factored_vs_compiled(
    case: LayerCase, x: torch.Tensor, *, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, Any]:
    torch.manual_seed(1)
    lin = nn.Linear(case.d_in, case.d_out).to(device=device, dtype=dtype)
    shapes = {"to_q": (case.d_out, case.d_in)}
    adapter = random_adapter(AdapterKind.DEFT, shapes, rank=8, decomposition=Decomposition.QR, magnitude=0.05)
    layer = adapter.layers["to_q"]
    assert adapter.decomposition is not None and layer.P is not None and layer.R is not None
    Q, right = (t.to(device=device, dtype=dtype) for t in project(adapter.decomposition, layer.P))
    sR = (layer.scale * layer.R).to(device=device, dtype=dtype)
    f = compile_adapter(adapter, {"to_q": lin.weight.detach().float().cpu()}).factors["to_q"]
    A, B = f.A.to(device=device, dtype=dtype), f.B.to(device=device, dtype=dtype)

    def compiled_form() -> None:
        with torch.no_grad():
            y = lin(x)
            y += (x @ A.T) @ B.T

    def factored_form() -> None:
        with torch.no_grad():
            y = lin(x)
            y += factored_deft_delta(x, y - lin.bias, Q, right, sR)

    t = interleaved_medians(
        {"compiled": compiled_form, "factored": factored_form}, device=device, repeats=repeats
    )
    return {
        "layer": case.name,
        "ranks": "rank 8, one adapter",
        "tokens": case.tokens,
        "factored/compiled": t["factored"] / t["compiled"],
        "deft_ms": 1e3 * t["compiled"],
    }


COLUMNS = [
    "layer",
    "ranks",
    "tokens",
    "base_ms",
    "deft_ms",
    "mixed/base",
    "flop ratio",
    "peft/deft",
    "merge/deft",
    "factored/compiled",
    "resident/factor bytes",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks kernels", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--backend", choices=["torch", "triton"], default="torch")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", default=None, help="report name (default kernels-<preset>-<backend>-<dtype>)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    dtype = getattr(torch, args.dtype)

    def measured(_workdir: Path) -> dict[str, Any]:
        rows = []
        for case in PRESETS[args.preset]:
            rows += run_case(case, backend=args.backend, device=device, dtype=dtype, repeats=args.repeats)
        return {"batch": BATCH, "rows": rows}

    def report(_name: str, payload: dict[str, Any]) -> str:
        title = f"# kernels ({args.preset}, {args.backend}, {args.dtype}, batch {BATCH})\n\n"
        return title + markdown_table(payload["rows"], COLUMNS)

    return run_suite(
        "kernels",
        args.out or f"kernels-{args.preset}-{args.backend}-{args.dtype}",
        measured,
        machine=lambda: machine_info(device),
        params=vars(args),
        report=report,
    )


if __name__ == "__main__":
    main()
