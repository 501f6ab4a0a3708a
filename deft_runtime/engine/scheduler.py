"""The request scheduler: queue, cancellation, deadlines, admission, fairness and completion.

Requests move ``queued → pending (prompts encoded, adapter lease loading) → active → finished``:

- :meth:`RequestScheduler.submit` (any thread) queues a request under its server id, bounded; the queue
  is fair across tenants (``request.tenant``, weighted by ``request.weight``; :mod:`.fair_queue`) and
  first come, first served within one;
- :meth:`schedule` (engine thread) drops cancelled queued requests, admits waiting ones (bounded
  concurrency; ``static`` admission waits for the whole batch to finish), promotes pending requests whose
  adapter leases are ready, fails cancelled and expired ones, and lets the pure planner
  (:class:`.planner.BatchPlanner`, fair across tenants by row-steps) pick the next forward;
- :meth:`update` turns the runner's :class:`StepOutput` into events, starts leases for newly prepared
  requests, and completes finished and failed requests (releasing their leases).

Slots for newcomers: ``max_active`` bounds the requests in flight, but a request whose tenant holds
fewer than its weighted share of ``max_active`` (over the tenants with requests in flight or queued;
a tenant with nothing in flight always does) may take one of ``newcomer_slots`` more. So a tenant
flooding every slot cannot make another tenant wait for one of its requests to finish before the
newcomer's request, or the next of a short burst, even starts.

Locking: ``_lock`` guards only the queue counters and the draining flag (submission against the engine
thread); it is a leaf, never held while calling out. Everything else is engine-thread only.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from deft_runtime.engine.fair_queue import FairQueue
from deft_runtime.engine.families import ModelFamily
from deft_runtime.engine.leases import AdapterLease, LeaseState, PinPool
from deft_runtime.engine.observer import EngineObserver
from deft_runtime.engine.planner import BatchOrder, BatchPlanner, Candidate, admit_count
from deft_runtime.engine.request_state import (
    EventCallback,
    RequestHandle,
    StepOutput,
    StepPlan,
    TrackedRequest,
    new_server_id,
)
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


class RequestScheduler:
    """Owns every request's lifecycle; the step runner owns the tensor work."""

    def __init__(
        self,
        family: ModelFamily,
        pool: PinPool,
        loader: cf.Executor,
        observer: EngineObserver,
        *,
        max_rows: int,
        max_active: int,
        max_queue: int,
        static: bool,
        retry_wait_s: float,
        mixed_rows: int | None = None,
        credit_row_steps: float = 0.0,
        newcomer_slots: int = 0,
        batch_order: BatchOrder = "longest-wait",
    ) -> None:
        self.family = family
        self.pool = pool
        self.loader = loader
        self.observer = observer
        self.max_rows, self.max_active, self.max_queue = max_rows, max_active, max_queue
        self.static = static
        self.retry_wait_s = retry_wait_s
        self.planner = BatchPlanner(
            max_rows, mixed_rows=mixed_rows, credit=credit_row_steps, order=batch_order
        )
        self.newcomer_slots = newcomer_slots
        self.wake = threading.Event()
        self._waiting: FairQueue[TrackedRequest] = FairQueue()  # fair across tenants, FIFO within one
        self._n_waiting = 0
        self._pending: list[TrackedRequest] = []  # admitted: being prepared, or adapters loading
        self._active: dict[str, TrackedRequest] = {}  # by server id
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._iteration = 0
        self.draining = False

    # ------------------------------------------------------------------ any thread

    def submit(self, request: GenerationRequest, on_event: EventCallback | None) -> RequestHandle:
        """Queue a resolved request under a fresh server id; raises EngineDraining or QueueFull."""
        with self._lock:
            if self.draining:
                raise EngineDraining("the server is shutting down and accepts no new requests")
            if self._n_waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self._n_waiting += 1
            position = self._n_waiting
        handle = RequestHandle(new_server_id(), request.request_id)
        now = time.monotonic()
        deadline = now + request.deadline_s if request.deadline_s else None
        r = TrackedRequest(handle, request, on_event, now, deadline)
        r.emit(GenerationEvent(EventKind.QUEUED, r.public_id, queue_position=position))
        self._waiting.put(r, request.tenant, request.weight, _cost(request))
        self.wake.set()
        return handle

    def refuse_new(self) -> None:
        with self._lock:
            self.draining = True

    @property
    def waiting(self) -> int:
        return self._n_waiting + len(self._pending)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def in_flight(self) -> int:
        """Admitted requests not finished yet (pending or active)."""
        return len(self._active) + len(self._pending)

    # ------------------------------------------------------------------ engine thread: schedule

    def schedule(self) -> StepPlan:
        """The next iteration's work: requests to prepare, and the requests of one forward."""
        self._drop_cancelled_waiting()
        admitted = self._admit()
        self._promote_ready()
        self._expire()
        # a newcomer tenant's request is prepared first and joins the very next forward, instead of
        # waiting out one forward of the others' rows before it can even start
        keys = [] if self._newcomer_admitted(admitted) else self.planner.plan(self._candidates())
        self.observer.on_queue(self.waiting, self.running)
        self._iteration += 1
        return StepPlan(self._iteration, admitted, [self._active[k] for k in keys])

    def _drop_cancelled_waiting(self) -> None:
        """Cancelled requests leave the queue at the next step, not when admission reaches them: while
        every active slot is busy they would otherwise hold queue places (and count as waiting)."""
        dropped = self._waiting.remove_if(lambda r: r.handle.cancelled)
        if not dropped:
            return
        with self._lock:
            self._n_waiting -= len(dropped)
        for r in dropped:
            self._finish_error(r, RequestCancelled("cancelled while queued"), "cancelled")

    def _admit(self) -> list[TrackedRequest]:
        in_flight = len(self._active) + len(self._pending)
        if self.static and in_flight:
            return []  # whole-request batching: wait until the current batch has finished
        rows, admitted = 0, []
        for _ in range(admit_count(self._n_waiting, in_flight, self.max_active)):
            r = self._waiting.pop()
            if r is None:
                break
            if not self._take(r):
                continue
            admitted.append(r)
            req = r.request
            assert req.guidance_scale is not None
            rows += self.family.rows_for(req)
            if self.static and rows >= self.max_rows:
                break
        return admitted if self.static else admitted + self._admit_newcomers()

    def _admit_newcomers(self) -> list[TrackedRequest]:
        """Requests of tenants below their share of max_active, into the ``newcomer_slots`` above it."""
        admitted = []
        while self._n_waiting and self.in_flight < self.max_active + self.newcomer_slots:
            r = self._waiting.pop(skip=self._tenants_at_share())
            if r is None:
                break
            if self._take(r):
                admitted.append(r)
        return admitted

    def _tenants_at_share(self) -> set[str]:
        """Tenants holding at least their weighted share of ``max_active`` in-flight slots."""
        held: dict[str, int] = {}
        weights = self._waiting.waiting_weights()
        for r in [*self._active.values(), *self._pending]:
            held[r.request.tenant] = held.get(r.request.tenant, 0) + 1
            weights[r.request.tenant] = r.request.weight
        total = sum(weights.values())
        return {t for t, n in held.items() if n >= self.max_active * weights[t] / total}

    def _take(self, r: TrackedRequest) -> bool:
        """Move a request popped from the queue in flight; False if it was cancelled meanwhile."""
        with self._lock:
            self._n_waiting -= 1
        if r.handle.cancelled:
            self._finish_error(r, RequestCancelled("cancelled while queued"), "cancelled")
            return False
        r.seq = next(self._seq)
        self._pending.append(r)  # in flight from now on: an engine error fails it too
        return True

    def _newcomer_admitted(self, admitted: list[TrackedRequest]) -> bool:
        """Whether a request just admitted belongs to a tenant with nothing running while others run."""
        running = {r.request.tenant for r in self._active.values()}
        return bool(running) and any(r.request.tenant not in running for r in admitted)

    def _promote_ready(self) -> None:
        still = []
        for r in self._pending:
            state = r.lease.poll(may_retry=bool(self._active)) if r.lease is not None else None
            if state is LeaseState.READY:
                r.started = time.monotonic()
                self._active[r.key] = r
                r.emit(GenerationEvent(EventKind.STARTED, r.public_id, total_steps=r.st.steps))
            elif state is LeaseState.FAILED:
                assert r.lease is not None and r.lease.error is not None
                self._finish_error(r, r.lease.error, "error", pending=False)
            else:
                still.append(r)
        self._pending = still

    def _expire(self) -> None:
        now = time.monotonic()
        for r in [*self._active.values(), *self._pending]:
            if r.handle.cancelled:
                self._finish_error(r, RequestCancelled("cancelled by the client"), "cancelled")
            elif r.deadline is not None and now > r.deadline:
                self._finish_error(
                    r, DeadlineExceeded(f"deadline of {r.request.deadline_s}s passed"), "deadline_exceeded"
                )

    def _candidates(self) -> list[Candidate]:
        return [
            Candidate(
                key,
                r.bucket,
                self.family.rows(r.st),
                r.seq,
                r.last_scheduled,
                r.request.tenant,
                r.request.weight,
                r.st.steps - r.st.step_index,
            )
            for key, r in self._active.items()
        ]

    # ------------------------------------------------------------------ engine thread: update

    def update(self, out: StepOutput) -> None:
        """Events and completions for what the runner did."""
        for r in out.prepared:
            if r in self._pending:  # not cancelled meanwhile
                r.lease = AdapterLease(
                    self.pool,
                    self.loader,
                    r.adapter_names,
                    retry_wait_s=self.retry_wait_s,
                    on_landed=self.wake.set,
                )
                r.lease.acquire()
        for r in out.not_finite:
            self._finish_error(r, _not_finite(r), "error")
        for r in out.stepped:
            r.last_scheduled = out.iteration
            s = r.st
            r.emit(GenerationEvent(EventKind.PROGRESS, r.public_id, step=s.step_index, total_steps=s.steps))
        for r, image in out.previews:
            s = r.st
            r.emit(
                GenerationEvent(
                    EventKind.PREVIEW, r.public_id, step=s.step_index, total_steps=s.steps, preview=image
                )
            )
        for r, images in out.finished:
            self._finish_ok(r, images)

    # ------------------------------------------------------------------ completion

    def _release(self, r: TrackedRequest, *, pending: bool = True) -> None:
        self._active.pop(r.key, None)
        if pending and r in self._pending:
            self._pending.remove(r)
        if r.lease is not None:
            r.lease.release()

    def _finish_ok(self, r: TrackedRequest, images: list[Any]) -> None:
        self._release(r)
        now, req = time.monotonic(), r.request
        assert req.seed is not None and req.num_inference_steps is not None
        steps = req.num_inference_steps
        queued, total = r.started - r.submitted, now - r.submitted
        result = GenerationResult(r.public_id, images, req.seed, queued, total, steps, req.guidance_scale)
        self.observer.on_request_done("ok", total, queued, len(images))
        r.emit(GenerationEvent(EventKind.RESULT, r.public_id, step=steps, total_steps=steps, result=result))
        if not r.handle.future.done():  # the caller may have cancelled the future meanwhile
            r.handle.future.set_result(result)

    def _finish_error(
        self, r: TrackedRequest, error: BaseException, status: str, *, pending: bool = True
    ) -> None:
        self._release(r, pending=pending)
        now = time.monotonic()
        self.observer.on_request_done(status, now - r.submitted, (r.started or now) - r.submitted, 0)
        r.emit(GenerationEvent(EventKind.FAILED, r.public_id, error=error))
        if not r.handle.future.done():
            r.handle.future.set_exception(error)

    def fail_in_flight(self, make_error: Callable[[], BaseException]) -> None:
        """Fail every admitted request (after an engine error)."""
        for r in [*self._active.values(), *self._pending]:
            self._finish_error(r, make_error(), "error")

    def fail_everything(self, make_error: Callable[[], BaseException]) -> None:
        """Fail admitted and queued requests (the engine stopped)."""
        self.fail_in_flight(make_error)
        while (r := self._waiting.pop()) is not None:
            self._finish_error(r, make_error(), "error")


def _cost(request: GenerationRequest) -> float:
    """A request's work for fair admission: images × denoising steps (resolved at submission)."""
    return float(request.num_images * (request.num_inference_steps or 1))


def _not_finite(r: TrackedRequest) -> GenerationFailed:
    if r.adapter_names:
        return AdapterOutputNotFinite(
            f"the denoiser produced NaN/Inf for this request ({', '.join(r.adapter_names)}); "
            "its adapter is broken"
        )
    return GenerationFailed(
        "the denoiser produced NaN/Inf for this request (no adapter); try a smaller guidance_scale"
    )
