"""A request inside the engine, and what the scheduler and the step runner hand each other.

Identity is the engine's: every submitted request gets :attr:`RequestHandle.server_id`, a random 128-bit
hex string that keys it everywhere (active table, planner, leases). The client's ``request_id`` is only a
label carried back in events and results; two requests may carry the same label.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deft_runtime.engine.families import StepState
from deft_runtime.engine.types import GenerationEvent, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from deft_runtime.engine.leases import AdapterLease

log = logging.getLogger(__name__)

EventCallback = Callable[[GenerationEvent], None]


def new_server_id() -> str:
    """A unique, unguessable request id (128 random bits)."""
    return secrets.token_hex(16)


class RequestHandle:
    """What :meth:`Engine.submit` returns: cancel it, wait for it, or ``await asyncio.wrap_future(h.future)``.

    ``server_id`` is the engine's key for the request; ``request_id`` is what its events and result carry:
    the client's label when it gave one, else ``server_id``.
    """

    def __init__(self, server_id: str, label: str = "") -> None:
        self.server_id = server_id
        self.request_id = label or server_id
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


@dataclass(eq=False)  # identity semantics: two requests are never "equal"
class TrackedRequest:
    """One request from submission to its last event (engine thread only, after submission)."""

    handle: RequestHandle
    request: GenerationRequest
    on_event: EventCallback | None
    submitted: float
    deadline: float | None
    state: StepState | None = None
    seq: int = 0
    started: float = 0.0
    last_scheduled: int = -1
    lease: AdapterLease | None = None
    bucket: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        return self.handle.server_id

    @property
    def public_id(self) -> str:
        return self.handle.request_id

    @property
    def st(self) -> StepState:
        """The request's tensors (set when the runner prepares it)."""
        assert self.state is not None, "request not prepared yet"
        return self.state

    @property
    def adapter_names(self) -> list[str]:
        return [name for name, _ in self.request.adapters]

    def emit(self, event: GenerationEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # a broken listener must not break the engine
            log.warning(
                "event listener of request %s failed; it gets no more events", self.key, exc_info=True
            )
            self.on_event = None


@dataclass
class StepPlan:
    """What the scheduler asks the runner to do in one iteration."""

    iteration: int
    admitted: list[TrackedRequest] = field(default_factory=list)  # encode prompts, seed latents
    batch: list[TrackedRequest] = field(default_factory=list)  # one denoiser forward

    @property
    def has_work(self) -> bool:
        return bool(self.admitted or self.batch)


@dataclass
class StepOutput:
    """What the runner did, for the scheduler to turn into events and completions."""

    iteration: int
    prepared: list[TrackedRequest] = field(default_factory=list)
    stepped: list[TrackedRequest] = field(default_factory=list)  # took a step with finite latents
    not_finite: list[TrackedRequest] = field(default_factory=list)
    previews: list[tuple[TrackedRequest, Any]] = field(default_factory=list)  # PIL images
    finished: list[tuple[TrackedRequest, list[Any]]] = field(default_factory=list)  # decoded images
