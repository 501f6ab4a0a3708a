"""The step runner: all tensor work of one engine iteration, no request bookkeeping.

For a :class:`StepPlan` it

1. prepares newly admitted requests: seeds their CPU generators like diffusers, encodes their prompts
   in one batch and sets up their latents and scheduler state;
2. runs the denoiser once over every row of the planned requests (CFG rows carry the request's
   adapters), then each request's guidance and its own scheduler step;
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
    ) -> None:
        self.model = model
        self.family = family
        self.previewer = previewer
        self.observer = observer
        self.denoiser = compiled_denoiser(model.denoiser) if compile else model.denoiser

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
        offset = 0
        for r in batch:
            n = self.family.rows(r.st)
            self.family.step(r.st, output[offset : offset + n])  # guidance + the request's scheduler
            offset += n
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
        self.model.set_rows(rows)
        try:
            output: torch.Tensor = self.denoiser(**inputs)[0]
        finally:
            self.model.batch.clear()
        distinct = len({name for r in batch for name in r.adapter_names})
        self.observer.on_forward(len(rows), distinct, time.perf_counter() - start)
        return output

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


def compiled_denoiser(denoiser: torch.nn.Module) -> Callable[..., Any]:
    """``torch.compile`` of the denoiser with its adapter layers (inductor, dynamic shapes).

    Each :class:`~deft_runtime.layers.MultiAdapterLinear` enters the graph as one opaque custom op
    (``deft::layer_adapters``) that reads the batch mapping and page tables when it runs, so swapping
    adapters, their weights or their mix between forwards never recompiles. Batch size, token count and
    latent size are symbolic (``dynamic=True``): a new batch size reuses the same code; only a new
    model-level shape class (e.g. batch 1) compiles once more.
    """
    return torch.compile(denoiser, dynamic=True)
