"""The step runner: all tensor work of one engine iteration, no request bookkeeping.

For a :class:`StepPlan` it

1. prepares newly admitted requests: seeds their CPU generators like diffusers, encodes their prompts
   in one batch and sets up their latents and scheduler state;
2. runs the denoiser once over every row of the planned requests (CFG rows carry the request's
   adapters), then each request's guidance and its own scheduler step (batched across requests where
   :mod:`.batched_steps` computes it exactly);
3. checks every stepped request's latents for NaN/Inf with one batched reduction (one host sync per
   forward), so a broken adapter fails only its own request;
4. renders due previews and VAE-decodes finished requests in batches of one latent shape.

It reports what happened in a :class:`StepOutput`; the scheduler turns that into events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from deft_runtime.engine.families import ModelFamily, StepState
from deft_runtime.engine.observer import EngineObserver
from deft_runtime.engine.preview import LatentPreviewer
from deft_runtime.engine.request_state import StepOutput, StepPlan, TrackedRequest
from deft_runtime.runtime import MultiAdapterModel


class StepRunner:
    def __init__(
        self,
        model: MultiAdapterModel,
        family: ModelFamily,
        previewer: LatentPreviewer,
        observer: EngineObserver,
        *,
        compile: bool = False,
        buckets: Sequence[int] = (),
        compile_backend: str = "inductor",
    ) -> None:
        self.model = model
        self.family = family
        self.previewer = previewer
        self.observer = observer
        #: batch sizes a forward is padded up to (empty: run every forward at its own size)
        self.buckets = tuple(sorted(buckets))
        if self.buckets and not family.rows_paddable:
            raise ValueError(
                f"{family.name} forwards cannot be padded to bucketed batch sizes: compile_buckets / "
                "--compile-buckets serves SDXL-family models; use --compile alone"
            )
        self.denoiser = (
            compiled_denoiser(
                model.denoiser,
                static=bool(self.buckets),
                backend=compile_backend,
                cuda_graphs=bool(self.buckets) and model.pool.config.device.type == "cuda",
            )
            if compile
            else model.denoiser
        )
        self._sample_inputs: dict[str, Any] | None = None  # a forward's inputs, for compile_buckets
        self._buckets_compiled = False

    def execute(self, plan: StepPlan) -> StepOutput:
        out = StepOutput(plan.iteration)
        if plan.admitted:
            self._prepare(plan.admitted)
            out.prepared = list(plan.admitted)
        if plan.batch:
            with torch.no_grad():
                self._step(plan.batch, out)
        return out

    def _prepare(self, admitted: Sequence[TrackedRequest]) -> None:
        for r in admitted:
            req = r.request
            assert req.width and req.height and req.num_inference_steps and req.guidance_scale is not None
            assert req.seed is not None
            generator = torch.Generator("cpu").manual_seed(req.seed)
            r.state = StepState(
                req, req.width, req.height, req.num_inference_steps, req.guidance_scale, generator
            )
        self.family.encode([r.st for r in admitted])
        for r in admitted:
            r.bucket = self.family.bucket(r.st)
            self.family.start(r.st)

    def _step(self, batch: Sequence[TrackedRequest], out: StepOutput) -> None:
        output = self._forward(batch)
        predictions, offset = [], 0
        for r in batch:
            n = self.family.rows(r.st)
            predictions.append(output[offset : offset + n])
            offset += n
        self.family.step_many([r.st for r in batch], predictions)  # guidance + each request's scheduler
        finite = all_finite([r.st.latents for r in batch])
        finished = []
        for r, ok in zip(batch, finite, strict=True):
            if not ok:
                out.not_finite.append(r)
                continue
            out.stepped.append(r)
            s = r.st
            every = r.request.preview_every_n_steps
            if every and s.step_index % every == 0 and s.step_index < s.steps:
                image = self.previewer.preview(s.last_x0 if s.last_x0 is not None else s.latents)
                out.previews.append((r, image))
            if s.step_index >= s.steps:
                finished.append(r)
        if finished:
            out.finished = self._decode(finished)

    def _forward(self, batch: Sequence[TrackedRequest]) -> torch.Tensor:
        """One denoiser forward over every row of ``batch``; returns its output ``[rows, ...]``."""
        rows = [list(r.request.adapters) for r in batch for _ in range(self.family.rows(r.st))]
        inputs = self.family.denoiser_inputs([r.st for r in batch])
        start = time.perf_counter()
        n = len(rows)
        if self.buckets:
            if self._sample_inputs is None and not self._buckets_compiled:
                self._sample_inputs = inputs
            size = bucket_for(n, self.buckets)
            inputs = resize_rows(inputs, n, size)
            rows += [[] for _ in range(size - n)]  # padding rows: no adapter
        self.model.set_rows(rows)
        try:
            output: torch.Tensor = self.denoiser(**inputs)[0][:n]
        finally:
            self.model.batch.clear()
        distinct = len({name for r in batch for name in r.adapter_names})
        self.observer.on_forward(n, distinct, time.perf_counter() - start)
        return output

    def compile_buckets(self) -> list[int]:
        """Run the denoiser once at every bucketed batch size (from a forward already seen, padded or
        cut to size; no adapters), so each size's graph is compiled before serving. Returns the sizes."""
        sample = self._sample_inputs
        if not self.buckets or self._buckets_compiled:
            return list(self.buckets)
        if sample is None:
            raise RuntimeError("compile_buckets needs one forward first (Engine.warm_up runs one)")
        n = int(sample["sample"].shape[0])
        with torch.no_grad():
            for size in self.buckets:
                self.model.set_rows([[] for _ in range(size)])
                try:
                    self.denoiser(**resize_rows(sample, n, size))
                finally:
                    self.model.batch.clear()
        self._sample_inputs, self._buckets_compiled = None, True  # nothing keeps those tensors alive
        return list(self.buckets)

    def _decode(self, finished: list[TrackedRequest]) -> list[tuple[TrackedRequest, list[object]]]:
        by_shape: dict[tuple[int, ...], list[TrackedRequest]] = {}
        for r in finished:
            by_shape.setdefault(r.bucket, []).append(r)
        done = []
        for group in by_shape.values():
            images = self.family.decode(torch.cat([r.st.latents for r in group]))
            offset = 0
            for r in group:
                n = r.request.num_images
                done.append((r, list(images[offset : offset + n])))
                offset += n
        return done


def all_finite(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Per tensor, whether every value is finite: one reduction per tensor, one host sync in all."""
    if not tensors:
        return []
    flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    return [bool(f) for f in flags.tolist()]


def compiled_denoiser(
    denoiser: torch.nn.Module, *, static: bool = False, backend: str = "inductor", cuda_graphs: bool = False
) -> Callable[..., Any]:
    """``torch.compile`` of the denoiser with its adapter layers.

    Each :class:`~deft_runtime.layers.MultiAdapterLinear` enters the graph as one opaque custom op
    (``deft::layer_adapters``) that reads the batch mapping and page tables when it runs, so swapping
    adapters, their weights or their mix between forwards never recompiles. By default batch size,
    token count and latent size are symbolic (``dynamic=True``): a new batch size reuses the same code
    (dynamo may still specialise a size that equals another dimension of the graph; the warm-up covers
    a full batch). With ``static`` (bucketed batch sizes: the runner pads every forward to one of a few
    sizes) each size compiles once, with static shapes, and ``cuda_graphs`` adds inductor's
    ``reduce-overhead`` mode (CUDA graphs) on a GPU.
    """
    if not static:
        return torch.compile(denoiser, dynamic=True, backend=backend)
    mode = "reduce-overhead" if cuda_graphs and backend == "inductor" else None
    return torch.compile(denoiser, dynamic=False, backend=backend, mode=mode)


def default_buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two below ``max_rows``, then ``max_rows`` itself: ``16 → (1, 2, 4, 8, 16)``."""
    sizes = [1 << k for k in range(max_rows.bit_length()) if 1 << k < max_rows]
    return (*sizes, max_rows)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``rows`` (buckets sorted ascending)."""
    for size in buckets:
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows exceed the largest bucket {buckets[-1]}")


def resize_rows(value: Any, n: int, size: int) -> Any:
    """``value`` (denoiser keyword arguments) with every tensor whose first dimension is ``n`` cut to
    ``size`` rows or padded with copies of its last row (real values: padding never makes NaNs)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n and size != n:
        if size < n:
            return value[:size]
        return torch.cat([value, value[-1:].expand(size - n, *value.shape[1:])])
    if isinstance(value, dict):
        return {k: resize_rows(v, n, size) for k, v in value.items()}
    return value
