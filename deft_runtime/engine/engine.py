"""The generation engine: step-level continuous batching over one pipeline and many adapters.

The engine thread runs one loop, in three verbs::

    plan = scheduler.schedule()      # queue, cancel, expire, admit, adapter leases, pick one forward
    out = runner.execute(plan)       # encode new prompts; forward, guidance, scheduler steps, NaN check,
                                     # previews, batched VAE decode
    scheduler.update(out)            # events, completions, lease releases

:mod:`.scheduler` owns request lifecycles, :mod:`.leases` the adapter pins, :mod:`.runner` the tensor
work, :mod:`.planner` (pure) the choice of each forward, and :mod:`.rules` the checks at submission.
The public API is thread-safe and async-friendly (``handle.future`` wraps into asyncio); model work
never runs on the caller's thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from deft_runtime.engine.families import ModelFamily, family_for
from deft_runtime.engine.observer import EngineObserver, NullObserver
from deft_runtime.engine.planner import BatchOrder
from deft_runtime.engine.preview import LatentPreviewer
from deft_runtime.engine.request_state import EventCallback, RequestHandle
from deft_runtime.engine.rules import resolve_request
from deft_runtime.engine.runner import StepRunner, default_buckets
from deft_runtime.engine.scheduler import RequestScheduler
from deft_runtime.engine.types import EngineDraining, GenerationFailed, GenerationRequest, GenerationResult
from deft_runtime.errors import AdapterNotFound
from deft_runtime.runtime import MultiAdapterModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """``admission="static"`` is the baseline the benchmarks compare against: a batch is formed only when
    the previous one has completely finished (whole-request batching, what pipelines do)."""

    max_batch_rows: int = 16  # rows per denoiser forward (CFG rows count)
    max_active: int = 32  # requests holding latents at once
    max_queue: int = 256  # waiting requests before QueueFull
    idle_wait_s: float = 0.05
    admission: Literal["continuous", "static"] = "continuous"
    omnigen_exact_rope: bool = True  # see OmniGenFamily.bucket
    # fairness across tenants (see planner.BatchPlanner and RequestScheduler):
    mixed_batch_rows: int | None = None  # rows per forward while several tenants have work (None: max)
    idle_credit_row_steps: float = 100.0  # how far ahead a tenant back from idle may run (row-steps)
    newcomer_slots: int = 1  # in-flight slots above max_active, for tenants below their share of it
    compile: bool = False  # torch.compile the denoiser with its adapter layers (see StepRunner)
    compile_buckets: bool = False  # with compile: pad forwards to a few batch sizes, static shapes
    compile_backend: str = "inductor"  # torch.compile backend (tests use aot_eager: same guards)
    batch_order: BatchOrder = "longest-wait"  # who fills a forward after its lead (planner.BatchOrder)


class Engine:
    """Owns one pipeline, its :class:`MultiAdapterModel` and the engine thread."""

    def __init__(
        self,
        pipe: Any,
        model: MultiAdapterModel,
        config: EngineConfig | None = None,
        *,
        observer: EngineObserver | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.pipe = pipe
        self.model = model
        self.config = cfg = config or EngineConfig()
        self.device = device or model.pool.config.device
        self.dtype = dtype or next(model.denoiser.parameters()).dtype
        self.family: ModelFamily = family_for(
            pipe, self.device, self.dtype, exact_rope=cfg.omnigen_exact_rope
        )
        self.previewer = LatentPreviewer(pipe, self.family, self.device)
        self._loader = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="deft-adapter-loader")
        obs = observer or NullObserver()
        self.scheduler = RequestScheduler(
            self.family, model.pool, self._loader, obs,
            max_rows=cfg.max_batch_rows, max_active=cfg.max_active, max_queue=cfg.max_queue,
            static=cfg.admission == "static", retry_wait_s=cfg.idle_wait_s,
            mixed_rows=cfg.mixed_batch_rows, credit_row_steps=cfg.idle_credit_row_steps,
            newcomer_slots=cfg.newcomer_slots, batch_order=cfg.batch_order,
        )  # fmt: skip
        buckets = default_buckets(cfg.max_batch_rows) if cfg.compile and cfg.compile_buckets else ()
        self.runner = StepRunner(
            model, self.family, self.previewer, obs,
            compile=cfg.compile, buckets=buckets, compile_backend=cfg.compile_backend,
        )  # fmt: skip
        self._stop, self._stop_reason = False, ""
        self._thread = threading.Thread(target=self._run, name="deft-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    @property
    def observer(self) -> EngineObserver:
        return self.runner.observer

    @observer.setter
    def observer(self, observer: EngineObserver) -> None:
        self.runner.observer = self.scheduler.observer = observer

    def submit(self, request: GenerationRequest, on_event: EventCallback | None = None) -> RequestHandle:
        """Validate and queue ``request``; raises typed errors (InvalidRequest, AdapterNotFound,
        QueueFull, EngineDraining) without touching the running batch. The handle's ``server_id`` is
        the engine's own unique id for it; ``request.request_id`` is only the client's label."""
        request = resolve_request(
            request, self.family, max_rows=self.config.max_batch_rows, max_adapters=self.model.batch.K
        )
        for name, _ in request.adapters:
            if not self.model.has_adapter(name):
                raise AdapterNotFound(f"no adapter named {name!r} is registered")
        return self.scheduler.submit(request, on_event)

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Blocking convenience: submit and wait."""
        return self.submit(request).result(timeout)

    def warm_up(self, timeout: float | None = None) -> float:
        """Small requests (the model's default size, CFG, 3 steps) before serving, so that a compiled
        denoiser (:attr:`EngineConfig.compile`) compiles now and not in a user's request: one request
        alone (2 rows), then enough at once to fill ``max_batch_rows`` (dynamo specialises a batch size
        that equals another dimension of the graph, e.g. 16 rows beside 16 channels, so the full batch
        gets its graph here too; with :attr:`EngineConfig.compile_buckets`, every bucketed size is run
        once instead). The observer (metrics) does not see them. Returns their seconds."""
        observer, self.observer = self.observer, NullObserver()
        start = time.perf_counter()
        try:
            first = GenerationRequest(prompt="warm-up", seed=0, num_inference_steps=3, guidance_scale=5.0)
            self.generate(first, timeout)
            if self.runner.buckets:  # static shapes: every bucketed batch size compiles now
                self.runner.compile_buckets()
                return time.perf_counter() - start
            full = max(1, self.config.max_batch_rows // 2)
            handles = [self.submit(replace(first, seed=i)) for i in range(full)]
            for handle in handles:
                handle.result(timeout)
        finally:
            self.observer = observer
        return time.perf_counter() - start

    @property
    def waiting(self) -> int:
        return self.scheduler.waiting

    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def draining(self) -> bool:
        return self.scheduler.draining

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait until every admitted one has finished. True if all finished."""
        self.scheduler.refuse_new()
        end = None if timeout is None else time.monotonic() + timeout
        while self.waiting or self.running:
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.02)
        return True

    def shutdown(
        self, timeout: float = 10.0, reason: str = "the engine stopped before the request finished"
    ) -> None:
        """Stop the engine thread; requests still queued or running fail with EngineDraining(``reason``)."""
        self.scheduler.refuse_new()
        self._stop_reason = reason
        self._stop = True
        self.scheduler.wake.set()
        self._thread.join(timeout)
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        wake = self.scheduler.wake
        while not self._stop:
            try:
                progressed = self._iterate()
            except Exception as e:  # a bug, not a user's error: fail what is in flight, keep serving
                self._fail_in_flight(e)
                progressed = False
            if not progressed:
                wake.wait(self.config.idle_wait_s)
                wake.clear()
        self.scheduler.fail_everything(lambda: EngineDraining(self._stop_reason))

    def _iterate(self) -> bool:
        plan = self.scheduler.schedule()
        if not plan.has_work:
            return False
        out = self.runner.execute(plan)
        self.scheduler.update(out)
        return True

    def _fail_in_flight(self, cause: Exception) -> None:
        def error() -> GenerationFailed:
            failure = GenerationFailed("internal engine error; the server log has the details")
            failure.__cause__ = cause
            return failure

        # logged before the requests fail, so the log has it by the time a client sees the error
        n = self.scheduler.in_flight
        log.error("engine iteration failed; failing %d in-flight requests", n, exc_info=cause)
        self.model.batch.clear()
        self.scheduler.fail_in_flight(error)
