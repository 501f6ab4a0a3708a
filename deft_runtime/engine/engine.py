"""The generation engine: step-level continuous batching over one pipeline and many adapters.

Each iteration of the engine thread:

1. admits waiting requests (FCFS, bounded), encodes their prompts in one batch, seeds their latents,
   and asks the loader thread to pin and load their adapters;
2. drops cancelled and expired requests (their adapter pins are released);
3. plans one forward (:mod:`.planner`): requests of one latent shape, any timestep, any adapters;
4. runs the denoiser once over all their rows (CFG rows carry the request's adapters), then applies
   each request's guidance and its own scheduler step; a request whose latents turn NaN/Inf fails alone;
5. VAE-decodes finished requests in batches and resolves their handles.

The public API is thread-safe and async-friendly (``handle.future`` wraps into asyncio); model work
never runs on the caller's thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from deft_runtime.engine.families import ModelFamily, StepState, family_for
from deft_runtime.engine.planner import Candidate, admit_count, plan_batch
from deft_runtime.engine.preview import LatentPreviewer
from deft_runtime.engine.types import (
    AdapterOutputNotFinite,
    DeadlineExceeded,
    EngineDraining,
    EventKind,
    GenerationEvent,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    QueueFull,
    RequestCancelled,
)
from deft_runtime.errors import AdapterNotFound, DeftError, InvalidRequest, PoolExhausted
from deft_runtime.runtime import MultiAdapterModel


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


class EngineObserver(Protocol):
    """Metrics hooks, called on the engine thread at the step and request boundaries (cheap only)."""

    def on_forward(self, rows: int, distinct_adapters: int, seconds: float) -> None: ...
    def on_request_done(self, status: str, latency_s: float, queue_s: float, images: int) -> None: ...
    def on_queue(self, waiting: int, running: int) -> None: ...


class _NullObserver:
    def on_forward(self, rows: int, distinct_adapters: int, seconds: float) -> None:
        pass

    def on_request_done(self, status: str, latency_s: float, queue_s: float, images: int) -> None:
        pass

    def on_queue(self, waiting: int, running: int) -> None:
        pass


EventCallback = Callable[[GenerationEvent], None]


class RequestHandle:
    """What :meth:`Engine.submit` returns: cancel it, wait for it, or ``await asyncio.wrap_future(h.future)``."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.future: cf.Future[GenerationResult] = cf.Future()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Takes effect at the engine's next step; the request's adapter pins are then released."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        # cancelling the future (e.g. an awaiting asyncio.wrap_future task was cancelled) cancels the request
        return self._cancel.is_set() or self.future.cancelled()

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self.future.result(timeout)


@dataclass
class _Request:
    handle: RequestHandle
    request: GenerationRequest
    on_event: EventCallback | None
    submitted: float
    deadline: float | None
    state: StepState | None = None
    seq: int = 0
    started: float = 0.0
    last_scheduled: int = -1
    adapters_loading: cf.Future[Any] | None = None
    adapters_pinned: bool = False
    bucket: tuple[int, ...] = ()

    @property
    def st(self) -> StepState:
        """The request's tensors (set at admission)."""
        assert self.state is not None, "request not admitted yet"
        return self.state

    @property
    def adapter_names(self) -> list[str]:
        return [name for name, _ in self.request.adapters]


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
        self.config = config or EngineConfig()
        self.device = device or model.pool.config.device
        self.dtype = dtype or next(model.denoiser.parameters()).dtype
        self.family: ModelFamily = family_for(
            pipe, self.device, self.dtype, exact_rope=self.config.omnigen_exact_rope
        )
        self.observer: EngineObserver = observer or _NullObserver()
        self.previewer = LatentPreviewer(pipe, self.family, self.device)
        self._waiting: queue.Queue[_Request] = queue.Queue()  # FIFO; cancelled ones are purged in place
        self._n_waiting = 0
        self._pending: list[_Request] = []  # admitted, adapters loading
        self._active: dict[str, _Request] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._seq = itertools.count()
        self._iteration = 0
        self._draining = False
        self._stop = False
        self._loader = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="deft-adapter-loader")
        self._thread = threading.Thread(target=self._run, name="deft-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def submit(self, request: GenerationRequest, on_event: EventCallback | None = None) -> RequestHandle:
        """Validate and queue ``request``; raises typed errors (InvalidRequest, AdapterNotFound,
        QueueFull, EngineDraining) without touching the running batch."""
        request.validate()
        request = self._resolve(request)
        self._check_adapters(request)
        with self._lock:
            if self._draining or self._stop:
                raise EngineDraining("the server is shutting down and accepts no new requests")
            if self._n_waiting >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} waiting requests); retry later")
            self._n_waiting += 1
            position = self._n_waiting
        handle = RequestHandle(request.request_id)
        deadline = time.monotonic() + request.deadline_s if request.deadline_s else None
        r = _Request(handle, request, on_event, time.monotonic(), deadline)
        self._emit(r, GenerationEvent(EventKind.QUEUED, request.request_id, queue_position=position))
        self._waiting.put(r)
        self._wake.set()
        return handle

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Blocking convenience: submit and wait."""
        return self.submit(request).result(timeout)

    @property
    def waiting(self) -> int:
        return self._n_waiting + len(self._pending)

    @property
    def running(self) -> int:
        return len(self._active)

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait until every admitted one has finished. True if all finished."""
        with self._lock:
            self._draining = True
        end = None if timeout is None else time.monotonic() + timeout
        while self.waiting or self.running:
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.02)
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still queued or running fail with EngineDraining."""
        self._draining = True
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ submission helpers

    def _resolve(self, request: GenerationRequest) -> GenerationRequest:
        width, height, steps, guidance = self.family.defaults()
        width, height = request.width or width, request.height or height
        self.family.check_size(width, height)
        rows = request.num_images * (2 if self.family.uses_cfg(request.guidance_scale or guidance) else 1)
        if rows > self.config.max_batch_rows:
            raise InvalidRequest(
                f"{request.num_images} images need {rows} rows per step, above this server's "
                f"max batch of {self.config.max_batch_rows} rows; ask for fewer images"
            )
        if len(request.adapters) > self.model.batch.K:
            raise InvalidRequest(
                f"{len(request.adapters)} adapters requested; at most {self.model.batch.K} per request"
            )
        seed = request.seed if request.seed is not None else random.randrange(2**63)
        request_id = request.request_id or f"req-{next(self._seq)}"
        return GenerationRequest(
            **{
                **request.__dict__,
                "width": width,
                "height": height,
                "num_inference_steps": request.num_inference_steps or steps,
                "guidance_scale": request.guidance_scale if request.guidance_scale is not None else guidance,
                "seed": seed,
                "request_id": request_id,
            }
        )

    def _check_adapters(self, request: GenerationRequest) -> None:
        for name, _ in request.adapters:
            if not self.model.has_adapter(name):
                raise AdapterNotFound(f"no adapter named {name!r} is registered")

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while not self._stop:
            try:
                progressed = self._iterate()
            except Exception as e:  # a bug, not a user's error: fail what is in flight, keep serving
                self._fail_all_active(GenerationFailed(f"internal engine error: {e!r}"))
                progressed = False
            if not progressed:
                self._wake.wait(self.config.idle_wait_s)
                self._wake.clear()
        self._fail_everything(EngineDraining("the engine stopped before the request finished"))

    def _iterate(self) -> bool:
        self._drop_cancelled_waiting()
        self._admit()
        self._promote_loaded()
        self._expire()
        ids = plan_batch(self._candidates(), self.config.max_batch_rows)
        self.observer.on_queue(self.waiting, self.running)
        if not ids:
            return False
        self._iteration += 1
        self._step([self._active[i] for i in ids])
        return True

    def _drop_cancelled_waiting(self) -> None:
        """Cancelled requests leave the queue at the next step, not when admission reaches them: while
        every active slot is busy they would otherwise hold queue places (and count as waiting)."""
        with self._waiting.mutex:
            queued = self._waiting.queue
            dropped = [r for r in queued if r.handle.cancelled]
            if not dropped:
                return
            kept = [r for r in queued if not r.handle.cancelled]
            queued.clear()
            queued.extend(kept)
        with self._lock:
            self._n_waiting -= len(dropped)
        for r in dropped:
            self._finish_error(r, RequestCancelled("cancelled while queued"), "cancelled")

    def _admit(self) -> None:
        in_flight = len(self._active) + len(self._pending)
        if self.config.admission == "static" and in_flight:
            return  # whole-request batching: wait until the current batch has finished
        n = admit_count(self._n_waiting, in_flight, self.config.max_active)
        rows = 0
        admitted: list[_Request] = []
        for _ in range(n):
            try:
                r = self._waiting.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                self._n_waiting -= 1
            if r.handle.cancelled:
                self._finish_error(r, RequestCancelled("cancelled while queued"), "cancelled")
                continue
            admitted.append(r)
            rows += self._rows_of(r.request)
            if self.config.admission == "static" and rows >= self.config.max_batch_rows:
                break
        if not admitted:
            return
        for r in admitted:
            req = r.request
            assert req.width and req.height and req.num_inference_steps and req.guidance_scale is not None
            assert req.seed is not None
            r.state = StepState(
                req,
                req.width,
                req.height,
                req.num_inference_steps,
                req.guidance_scale,
                torch.Generator("cpu").manual_seed(req.seed),
            )
            r.seq = next(self._seq)
        self.family.encode([r.st for r in admitted])
        for r in admitted:
            r.bucket = self.family.bucket(r.st)
            self.family.start(r.st)
            r.adapters_loading = self._loader.submit(self.model.pool.acquire, r.adapter_names)
            self._pending.append(r)

    def _rows_of(self, request: GenerationRequest) -> int:
        return request.num_images * (2 if self.family.uses_cfg(request.guidance_scale or 0.0) else 1)

    def _promote_loaded(self) -> None:
        still = []
        for r in self._pending:
            fut = r.adapters_loading
            if fut is None or not fut.done():
                still.append(r)
                continue
            error = fut.exception()
            if error is None:
                r.adapters_pinned = True
                if self.model.pool.ready(r.adapter_names):
                    r.started = time.monotonic()
                    self._active[r.request.request_id] = r
                    self._emit(
                        r, GenerationEvent(EventKind.STARTED, r.request.request_id, total_steps=r.st.steps)
                    )
                else:
                    still.append(r)
            elif isinstance(error, PoolExhausted) and self._active:
                r.adapters_loading = self._loader.submit(self._retry_acquire, r.adapter_names)
                still.append(r)  # room frees up as running requests finish
            else:
                self._finish_error(r, error, "error")
        self._pending = still

    def _retry_acquire(self, names: list[str]) -> dict[str, int]:
        time.sleep(self.config.idle_wait_s)
        return self.model.pool.acquire(names)

    def _expire(self) -> None:
        now = time.monotonic()
        for r in list(self._active.values()) + list(self._pending):
            if r.handle.cancelled:
                self._finish_error(r, RequestCancelled("cancelled by the client"), "cancelled")
            elif r.deadline is not None and now > r.deadline:
                self._finish_error(
                    r, DeadlineExceeded(f"deadline of {r.request.deadline_s}s passed"), "deadline_exceeded"
                )

    def _candidates(self) -> list[Candidate]:
        return [
            Candidate(rid, r.bucket, self.family.rows(r.st), r.seq, r.last_scheduled)
            for rid, r in self._active.items()
        ]

    def _step(self, batch: list[_Request]) -> None:
        states = [r.st for r in batch]
        rows = [list(r.request.adapters) for r in batch for _ in range(self.family.rows(r.st))]
        inputs = self.family.denoiser_inputs(states)
        start = time.perf_counter()
        self.model.set_rows(rows)
        try:
            with torch.no_grad():
                output = self.model.denoiser(**inputs)[0]
        finally:
            self.model.batch.clear()
        distinct = len({name for r in batch for name in r.adapter_names})
        self.observer.on_forward(len(rows), distinct, time.perf_counter() - start)
        offset = 0
        finished = []
        for r in batch:
            s = r.st
            n = self.family.rows(s)
            with torch.no_grad():
                self.family.step(s, output[offset : offset + n])
            offset += n
            r.last_scheduled = self._iteration
            if not bool(torch.isfinite(s.latents).all()):
                names = ", ".join(r.adapter_names) or "no adapter"
                failure = AdapterOutputNotFinite if r.adapter_names else GenerationFailed
                self._finish_error(
                    r,
                    failure(
                        f"the denoiser produced NaN/Inf for this request ({names}); its adapter is broken"
                    ),
                    "error",
                )
                continue
            self._emit(
                r,
                GenerationEvent(
                    EventKind.PROGRESS, r.request.request_id, step=s.step_index, total_steps=s.steps
                ),
            )
            every = r.request.preview_every_n_steps
            if every and s.step_index % every == 0 and s.step_index < s.steps:
                preview = self.previewer.preview(s.last_x0 if s.last_x0 is not None else s.latents)
                self._emit(
                    r,
                    GenerationEvent(
                        EventKind.PREVIEW,
                        r.request.request_id,
                        step=s.step_index,
                        total_steps=s.steps,
                        preview=preview,
                    ),
                )
            if s.step_index >= s.steps:
                finished.append(r)
        if finished:
            self._decode(finished)

    def _decode(self, finished: list[_Request]) -> None:
        by_shape: dict[tuple[int, ...], list[_Request]] = {}
        for r in finished:
            by_shape.setdefault(r.bucket, []).append(r)
        for group in by_shape.values():
            with torch.no_grad():
                images = self.family.decode(torch.cat([r.st.latents for r in group]))
            offset = 0
            for r in group:
                n = r.request.num_images
                self._finish_ok(r, images[offset : offset + n])
                offset += n

    # ------------------------------------------------------------------ completion

    def _emit(self, r: _Request, event: GenerationEvent) -> None:
        if r.on_event is not None:
            try:
                r.on_event(event)
            except Exception:  # a broken listener must not break the engine
                r.on_event = None

    def _release(self, r: _Request) -> None:
        self._active.pop(r.request.request_id, None)
        if r in self._pending:
            self._pending.remove(r)
        if r.adapters_pinned:
            self.model.pool.release(r.adapter_names)
            r.adapters_pinned = False
        elif r.adapters_loading is not None:
            # still loading: drop the pins as soon as the load lands
            r.adapters_loading.add_done_callback(self._release_when_loaded(r.adapter_names))

    def _release_when_loaded(self, names: list[str]) -> Callable[[cf.Future[Any]], None]:
        def release(f: cf.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                self.model.pool.release(names)

        return release

    def _finish_ok(self, r: _Request, images: list[Any]) -> None:
        self._release(r)
        now = time.monotonic()
        req = r.request
        assert req.seed is not None and req.num_inference_steps is not None
        result = GenerationResult(
            req.request_id,
            images,
            req.seed,
            r.started - r.submitted,
            now - r.submitted,
            req.num_inference_steps,
        )
        self.observer.on_request_done("ok", now - r.submitted, r.started - r.submitted, len(images))
        self._emit(
            r,
            GenerationEvent(
                EventKind.RESULT,
                req.request_id,
                step=req.num_inference_steps,
                total_steps=req.num_inference_steps,
                result=result,
            ),
        )
        if not r.handle.future.done():  # the caller may have cancelled the future meanwhile
            r.handle.future.set_result(result)

    def _finish_error(self, r: _Request, error: BaseException, status: str) -> None:
        self._release(r)
        now = time.monotonic()
        queued = (r.started or now) - r.submitted
        self.observer.on_request_done(status, now - r.submitted, queued, 0)
        self._emit(r, GenerationEvent(EventKind.FAILED, r.request.request_id, error=error))
        if not r.handle.future.done():
            r.handle.future.set_exception(error)

    def _fail_all_active(self, error: DeftError) -> None:
        for r in list(self._active.values()):
            self._finish_error(r, error, "error")

    def _fail_everything(self, error: DeftError) -> None:
        self._fail_all_active(error)
        for r in list(self._pending):
            self._finish_error(r, error, "error")
        while True:
            try:
                r = self._waiting.get_nowait()
            except queue.Empty:
                break
            self._finish_error(r, error, "error")
