"""Adapter leases: one request's pins on its adapters, as one small state machine.

::

    IDLE ──acquire()──► LOADING ──load done──► PINNED ──pool.ready()──► READY
                          ▲   │
                          └───┘  PoolExhausted while other requests run: retry after retry_wait_s
               LOADING ──any other error──► FAILED (nothing pinned)
    any state ──release()──► RELEASED   pins dropped exactly once; a load still in flight drops them
                                        when it lands

``pool.acquire`` may block (registry look-ups, disk reads, compilation), so it runs on the engine's
loader thread; everything else runs on the engine thread. When a load lands, ``on_landed`` (the
engine's wake-up) is called from the loader thread, so the engine starts the request at once instead of
finding it ready after its idle wait. The pool's own lock is a leaf (see :mod:`deft_runtime.pool`), so
a lease never holds a lock while calling out.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, Protocol

from deft_runtime.errors import PoolExhausted


class PinPool(Protocol):
    """The part of :class:`~deft_runtime.pool.AdapterPool` a lease uses."""

    def acquire(self, names: Sequence[str]) -> Any: ...
    def release(self, names: Sequence[str]) -> None: ...
    def ready(self, names: Sequence[str]) -> bool: ...


class LeaseState(StrEnum):
    IDLE = "idle"
    LOADING = "loading"
    PINNED = "pinned"
    READY = "ready"
    FAILED = "failed"
    RELEASED = "released"


class AdapterLease:
    """Pins of one request's adapters (engine thread; the acquire itself runs on ``loader``)."""

    def __init__(
        self,
        pool: PinPool,
        loader: cf.Executor,
        names: Sequence[str],
        *,
        retry_wait_s: float,
        on_landed: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.loader = loader
        self.names = list(names)
        self.retry_wait_s = retry_wait_s
        self.on_landed = on_landed
        self.state = LeaseState.IDLE
        self.error: BaseException | None = None
        self._loading: cf.Future[Any] | None = None

    def acquire(self) -> None:
        """Start pinning (and loading) the adapters on the loader thread."""
        assert self.state is LeaseState.IDLE, self.state
        if not self.names:  # nothing to load: ready now, not after a round trip to the loader thread
            self.state = LeaseState.PINNED
            return
        self._loading = self._submit(self.pool.acquire, self.names)
        self.state = LeaseState.LOADING

    def _submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        fut = self.loader.submit(fn, *args)
        if self.on_landed is not None:
            on_landed = self.on_landed
            fut.add_done_callback(lambda _: on_landed())  # runs once the future is done
        return fut

    def poll(self, *, may_retry: bool) -> LeaseState:
        """Advance as far as possible without blocking; ``may_retry``: others hold pins that will free."""
        if self.state is LeaseState.LOADING:
            self._land(may_retry)
        if self.state is LeaseState.PINNED and self.pool.ready(self.names):
            self.state = LeaseState.READY
        return self.state

    def _land(self, may_retry: bool) -> None:
        fut = self._loading
        assert fut is not None
        if not fut.done():
            return
        error = fut.exception()
        if error is None:
            self.state = LeaseState.PINNED
        elif isinstance(error, PoolExhausted) and may_retry:
            self._loading = self._submit(self._retry)  # room frees up as running requests finish
        else:
            self.state, self.error = LeaseState.FAILED, error

    def _retry(self) -> Any:
        time.sleep(self.retry_wait_s)
        return self.pool.acquire(self.names)

    def release(self) -> None:
        """Drop the pins (idempotent); a load still in flight drops them when it lands."""
        if self.state in (LeaseState.PINNED, LeaseState.READY):
            self.pool.release(self.names)
        elif self.state is LeaseState.LOADING and self._loading is not None:
            self._loading.add_done_callback(self._release_when_loaded)
        self.state = LeaseState.RELEASED

    def _release_when_loaded(self, fut: cf.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.pool.release(self.names)
