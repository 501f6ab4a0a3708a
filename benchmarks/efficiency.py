"""Efficiency suite: how close the engine comes to the bare denoiser it drives.

Under saturation, every request with its own adapter (``--requests`` requests × ``--steps`` steps with
CFG, rank-``--rank`` DEFT adapters, all submitted at once so every forward carries
``--max-batch-rows`` rows), the engine's denoiser rows per second are divided by the rows per second of
the *bare* denoiser: an unwrapped copy of the same UNet (no adapter layers, no engine) run on the very
inputs the engine built for its full-batch forwards. That is the roofline the engine can at best reach
on this hardware; prompt encoding and decoding count against the engine.

A second, instrumented pass (a perf-counter pair around each phase: a few dozen per iteration) says
where the engine's time goes: the bare-forward equivalent of its forwards, the adapter layers (forward
time above that), row mapping, input assembly, guidance, scheduler steps, NaN checks, previews, prompt
encoding and request setup, VAE decode, planning (schedule + update) and the rest (Python between
phases, the engine thread's wake-ups). "Host work per iteration" is everything outside the forward that
happens every iteration (not encoding or decoding), as a fraction of one forward.

Engine runs and bare runs alternate (``--repeats``), and medians are compared, so drift in the machine's
load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import deft_runtime.engine.runner as runner_module
from benchmarks.common import (
    RESULTS_DIR,
    interleaved_medians,
    machine_info,
    markdown_table,
    run_suite,
    string_params,
    synchronize,
)
from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.engine import Engine, EngineConfig, GenerationRequest
from deft_runtime.models import build_tiny_sdxl, load_pipeline
from deft_runtime.pool import PoolConfig
from deft_runtime.runtime import MultiAdapterModel
from deft_runtime.testing import random_adapter

MODELS = ("tiny-sdxl", "shapes-sdxl")
#: the instrumented phases, in report order (``forward`` is split into bare + adapter layers)
PHASES = (
    "bare forward", "adapter layers", "row mapping", "input assembly", "guidance", "scheduler steps",
    "NaN checks", "previews", "encode + setup", "decode", "planning", "other (Python)",
)  # fmt: skip
PER_ITERATION = ("row mapping", "input assembly", "guidance", "scheduler steps", "NaN checks", "planning")


def _pipe(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    if model == "tiny-sdxl":
        return build_tiny_sdxl(0).to(device=device, dtype=dtype)
    return load_pipeline(model, torch_dtype=dtype, device=device)


@dataclass
class Workload:
    model: str
    requests: int
    steps: int
    rank: int
    max_rows: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    engine: Engine = field(init=False)
    bare_unet: Any = field(init=False)
    full_inputs: dict[str, Any] = field(init=False, default_factory=dict)
    adapters: list[Any] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        pipe = self.pipe()
        pool = PoolConfig(device_bytes=256 << 20, host_bytes=256 << 20, dtype=self.dtype, device=self.device)
        mam = MultiAdapterModel(pipe.unet, pool_config=pool, backend="torch")
        shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in mam.base_weights.items()}
        for i in range(self.requests):
            adapter = random_adapter(
                AdapterKind.DEFT,
                shapes,
                rank=self.rank,
                decomposition=Decomposition.QR,
                seed=i,
                magnitude=0.05,
            )
            mam.register(f"a{i}", adapter)
            self.adapters.append(adapter)
        self.engine = self.engine_for(
            pipe, mam, EngineConfig(max_batch_rows=self.max_rows, max_active=self.requests)
        )
        self.bare_unet = self.pipe().unet.eval()  # same weights, never wrapped
        self._capture_full_inputs()

    def _capture_full_inputs(self) -> None:
        family = self.engine.family
        original = family.denoiser_inputs

        def capture(states: Any) -> dict[str, Any]:
            inputs = original(states)
            if int(inputs["sample"].shape[0]) == self.max_rows and not self.full_inputs:
                self.full_inputs.update({k: _clone(v) for k, v in inputs.items()})
            return inputs

        family.denoiser_inputs = capture  # type: ignore[method-assign]
        try:
            self.run_engine()
        finally:
            del family.denoiser_inputs
        if not self.full_inputs:
            raise RuntimeError(f"no forward carried {self.max_rows} rows: raise --requests")

    def pipe(self) -> Any:
        """A fresh copy of the model's pipeline on the workload's device and dtype."""
        return _pipe(self.model, self.device, self.dtype)

    def engine_for(self, pipe: Any, model: MultiAdapterModel, config: EngineConfig) -> Engine:
        return Engine(pipe, model, config, device=self.device, dtype=self.dtype)

    def rows_per_run(self) -> int:
        return self.requests * self.steps * 2  # CFG: two rows per request per step

    def run_engine(self, engine: Engine | None = None) -> float:
        """Seconds for the saturated run: every request at once, each with its own adapter."""
        start = time.perf_counter()
        self.results(engine)
        return time.perf_counter() - start

    def results(self, engine: Engine | None = None) -> list[Any]:
        """Run the requests on ``engine`` (default: the workload's), all submitted at once; their results."""
        engine = engine or self.engine
        handles = [
            engine.submit(
                GenerationRequest(
                    prompt=f"a photo of concept {i}", seed=i, num_inference_steps=self.steps,
                    guidance_scale=5.0, adapters=((f"a{i}", 1.0),),
                )
            )
            for i in range(self.requests)
        ]  # fmt: skip
        return [h.result(600) for h in handles]

    def bare_forward(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            self.bare_unet(**self.full_inputs)
        synchronize(self.device)
        return time.perf_counter() - start

    def bare_run(self) -> float:
        """Seconds for as many bare full-batch forwards as one engine run does (rows / max_rows)."""
        forwards = self.rows_per_run() / self.max_rows
        return sum(self.bare_forward() for _ in range(int(forwards))) * forwards / int(forwards)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def single_request_latency(w: Workload, workdir: Path, repeats: int) -> dict[str, float]:
    """One request alone, deft's engine against diffusers' own pipeline (same model, prompt, seed, steps
    and size): with no adapter, and with adapter ``a0`` against diffusers + PEFT (the adapter written as
    a PEFT directory, ``PeftModel.from_pretrained`` on a third copy of the UNet). Medians of
    interleaved runs."""
    from peft import PeftModel

    from deft_runtime.formats import save_adapter

    plain, with_peft = w.pipe(), w.pipe()
    with_peft.unet = PeftModel.from_pretrained(
        with_peft.unet, save_adapter(w.adapters[0], workdir / "a0-peft", format="peft"), is_trainable=False
    )
    size = w.engine.family.defaults()
    kwargs = dict(
        prompt="a photo of concept 0", num_inference_steps=w.steps, guidance_scale=5.0,
        width=size.width, height=size.height,
    )  # fmt: skip

    def deft(adapters: tuple[tuple[str, float], ...]) -> Callable[[], object]:
        request = GenerationRequest(**kwargs, seed=0, adapters=adapters)  # type: ignore[arg-type]
        return lambda: w.engine.generate(request, timeout=600)

    def diffusers(pipe: Any) -> Callable[[], object]:
        return lambda: pipe(**kwargs, generator=torch.Generator().manual_seed(0))

    medians = interleaved_medians(
        {
            "deft": deft(()),
            "diffusers": diffusers(plain),
            "deft + adapter": deft((("a0", 1.0),)),
            "diffusers + PEFT": diffusers(with_peft),
        },
        device=w.device,
        repeats=repeats,
    )
    return {
        **{f"{k} s": v for k, v in medians.items()},
        "deft / diffusers": medians["deft"] / medians["diffusers"],
        "deft + adapter / diffusers + PEFT": medians["deft + adapter"] / medians["diffusers + PEFT"],
    }


class PhaseTimer:
    """Accumulated seconds per phase, by wrapping callables in place (and putting them back). On CUDA
    each phase synchronizes the device before it starts and ends (else it would time kernel launches,
    not kernels): the instrumented run is then slower than a real one, but says where the time goes."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._restore: list[Callable[[], None]] = []
        self.device = device

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        original = getattr(owner, attr)
        had_own = attr in vars(owner)

        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.seconds[phase] += time.perf_counter() - start

        setattr(owner, attr, timed)
        self._restore.append(
            (lambda: setattr(owner, attr, original)) if had_own else (lambda: delattr(owner, attr))
        )

    def restore(self) -> None:
        while self._restore:
            self._restore.pop()()


@contextmanager
def instrumented(engine: Engine, device: torch.device = torch.device("cpu")) -> Iterator[PhaseTimer]:
    timer = PhaseTimer(device)
    family, scheduler, runner = engine.family, engine.scheduler, engine.runner
    for owner, attr, phase in (
        (engine.model.denoiser, "forward", "forward"),
        (engine.model, "set_rows", "row mapping"),
        (family, "denoiser_inputs", "input assembly"),
        (family, "guide", "guidance"),
        (family, "step_many", "step (with guidance)"),
        (runner_module, "all_finite", "NaN checks"),
        (engine.previewer, "preview", "previews"),
        (runner, "_prepare", "encode + setup"),
        (family, "decode", "decode"),
        (scheduler, "schedule", "planning"),
        (scheduler, "update", "planning"),
    ):
        timer.wrap(owner, attr, phase)
    try:
        yield timer
    finally:
        timer.restore()


def breakdown(w: Workload, wall: float, seconds: dict[str, float], bare_forward_s: float) -> dict[str, float]:
    forwards = w.rows_per_run() / w.max_rows
    s = dict(seconds)
    forward = s.get("forward", 0.0)
    # the bare forward is timed in its own runs: on a noisy machine it can come out slower than the
    # instrumented run's whole forward, and then the adapter layers' share is below what one run resolves
    bare = min(bare_forward_s * forwards, forward)
    parts = {
        "bare forward": bare,
        "adapter layers": forward - bare,
        "scheduler steps": s.get("step (with guidance)", 0.0) - s.get("guidance", 0.0),
        **{p: s.get(p, 0.0) for p in PHASES if p in s},
    }
    parts["other (Python)"] = wall - sum(parts.values())
    return {p: parts.get(p, 0.0) / wall for p in PHASES}


def measure_model(args: argparse.Namespace, model: str, workdir: Path) -> dict[str, Any]:
    w = workload(args, model)
    try:
        engine_s, bare_s = [], []
        for _ in range(args.repeats):  # alternate, so drift in load hits both alike
            engine_s.append(w.run_engine())
            bare_s.append(w.bare_run())
        bare_forward_s = statistics.median(bare_s) / (w.rows_per_run() / w.max_rows)
        with instrumented(w.engine, w.device) as timer:
            wall = w.run_engine()
        parts = breakdown(w, wall, timer.seconds, bare_forward_s)
        latency = single_request_latency(w, workdir, args.repeats)
    finally:
        w.engine.shutdown()
    engine_rows_s = w.rows_per_run() / statistics.median(engine_s)
    bare_rows_s = w.max_rows / bare_forward_s
    forwards = w.rows_per_run() / w.max_rows
    host = sum(parts[p] for p in PER_ITERATION) + parts["other (Python)"]
    return {
        "model": model,
        "engine_rows_s": engine_rows_s,
        "bare_rows_s": bare_rows_s,
        "efficiency": engine_rows_s / bare_rows_s,
        "engine_runs_s": engine_s,
        "bare_runs_s": bare_s,
        "bare_forward_ms": bare_forward_s * 1e3,
        "host_per_iteration_vs_forward": host * wall / forwards / bare_forward_s,
        "breakdown": parts,
        "single_request": latency,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_workload_args("efficiency", __doc__, argv)


def workload(args: argparse.Namespace, model: str) -> Workload:
    """The saturated workload of ``args`` (``--device``, ``--dtype``) for ``model``."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    return Workload(model, args.requests, args.steps, args.rank, args.max_batch_rows, device, dtype)


def parse_workload_args(
    suite: str, doc: str | None, argv: list[str] | None, *, modes: tuple[str, ...] = ()
) -> argparse.Namespace:
    """The saturated workload's options (shared with the ``compiled`` suite, which adds ``--modes``:
    ``--quick`` keeps the first)."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {suite}", description=doc)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    if modes:
        parser.add_argument("--modes", nargs="+", choices=modes, default=list(modes))
    parser.add_argument("--requests", type=int, default=8, help="requests per run, each its own adapter")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-batch-rows", type=int, default=16, help="rows per forward (CFG rows count)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (gpu_check.sh: cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--quick", action="store_true", help="tiny-sdxl only, 4 requests x 3 steps, 1 repeat")
    parser.add_argument("--out", default=None, help=f"report name (default {suite}, or {suite}-quick)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.requests, args.steps, args.repeats, args.max_batch_rows = ["tiny-sdxl"], 4, 3, 1, 8
        if modes:
            args.modes = [modes[0]]
    if args.max_batch_rows > 2 * args.requests:
        parser.error("--max-batch-rows must be at most 2 x --requests (CFG rows) to saturate the engine")
    return args


def report(name: str, payload: dict[str, Any]) -> str:
    rows = [
        {
            "model": r["model"],
            "efficiency": f"{r['efficiency']:.3f}",
            "engine rows/s": f"{r['engine_rows_s']:.1f}",
            "bare rows/s": f"{r['bare_rows_s']:.1f}",
            "bare forward ms": f"{r['bare_forward_ms']:.1f}",
            "host work / forward": f"{r['host_per_iteration_vs_forward']:.1%}",
        }
        for r in payload["rows"]
    ]
    parts = [
        {"phase": p, **{r["model"]: f"{r['breakdown'][p]:.1%}" for r in payload["rows"]}} for p in PHASES
    ]
    latency = [
        {"model": r["model"], **{k: f"{v:.3f}" for k, v in r["single_request"].items()}}
        for r in payload["rows"]
    ]
    return "\n".join(
        [
            f"# {name}",
            "",
            workload_summary(payload["params"]),
            "",
            markdown_table(rows, list(rows[0])),
            "",
            "Where the engine's time goes (instrumented run, share of its wall time):",
            "",
            markdown_table(parts, list(parts[0])),
            "",
            "Single request alone (seconds, medians of interleaved runs; adapter: a0, rank-"
            f"{payload['params']['rank']} DEFT):",
            "",
            markdown_table(latency, list(latency[0])),
            "",
            "Targets: efficiency >= 0.95 on tiny-sdxl and >= 0.9 on shapes-sdxl; host work per iteration "
            "outside the forward <= 5% of the forward; deft / diffusers <= 1.05 and deft + adapter / "
            "diffusers + PEFT <= 1.10.",
        ]
    )


def figure(path: Any, payload: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.8 * len(rows)))
    left = [0.0] * len(rows)
    for phase in PHASES:
        widths = [max(r["breakdown"][phase], 0.0) for r in rows]
        ax.barh([r["model"] for r in rows], widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("share of the engine's wall time")
    ax.set_title(
        "engine time by phase (efficiency: " + ", ".join(f"{r['efficiency']:.2f}" for r in rows) + ")"
    )
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def workload_summary(p: dict[str, Any]) -> str:
    """The saturated workload in one line, from a report's params."""
    return (
        f"{p['requests']} requests x {p['steps']} steps with CFG, rank-{p['rank']} DEFT adapter each, "
        f"{p['max_batch_rows']} rows per forward, {p['threads']} thread(s), median of {p['repeats']}, "
        f"{p.get('device', 'cpu')} {p.get('dtype', 'float32')}"
    )


def run_workload_suite(
    suite: str,
    args: argparse.Namespace,
    measure: Callable[[Path], dict[str, Any]],
    report: Callable[[str, dict[str, Any]], str],
    figure: Callable[[Path, dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """:func:`run_suite` for a suite over the saturated workload (efficiency, compiled)."""
    torch.set_num_threads(args.threads)
    return run_suite(
        suite,
        args.out or (f"{suite}-quick" if args.quick else suite),
        measure,
        machine=lambda: {**machine_info(torch.device(args.device)), "threads": args.threads},
        params={
            **string_params(args, leave_out=("results_dir",)),
            "requests": args.requests,
            "steps": args.steps,
        },
        report=report,
        figure=figure,
        out_dir=args.results_dir,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return run_workload_suite(
        "efficiency",
        args,
        lambda workdir: {"rows": [measure_model(args, m, workdir) for m in args.models]},
        report,
        figure,
    )


if __name__ == "__main__":
    main()
