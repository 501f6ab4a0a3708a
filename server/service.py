"""The ``deft.v1`` servicers on ``grpc.aio``.

Handlers never do model work or blocking I/O on the event loop: generation runs on the engine
thread (its events are carried into the loop by :class:`EventBridge`), registration, SQLite and PNG
encoding run on worker threads. Every error leaves through :func:`deft_server.errors.to_status`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
from deft_client.proto import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from deft_server.access_log import AccessEntry, log_access
from deft_server.config import RequestLimits, UploadLimits
from deft_server.convert import (
    MAX_REQUEST_ID_CHARS,
    UPLOAD_FORMATS,
    adapter_message,
    adapters_page,
    event_message,
    generation_request,
    page_after,
    page_size,
    result_message,
)
from deft_server.errors import NotReady, status_code_of, to_status
from deft_server.loading import ServingRuntime
from deft_server.metrics import ServerMetrics
from deft_server.tenants import current_tenant
from deft_server.upload_limits import bounded_chunks
from deft_server.uploads import received_upload, validate_name

from deft_runtime.engine import EventKind, GenerationEvent, GenerationRequest, RequestHandle

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerState:
    """What every handler shares: the runtime once loaded, and whether the server is draining."""

    runtime: ServingRuntime | None = None
    draining: bool = False
    registrations: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))

    def require(self) -> ServingRuntime:
        if self.draining:
            raise NotReady(
                "the server is shutting down and accepts no new requests; retry on another replica"
            )
        if self.runtime is None:
            raise NotReady("the server is still loading its model; retry in a moment")
        return self.runtime


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> NoReturn:
    await context.abort_with_status(to_status(error))
    raise AssertionError("unreachable: abort_with_status raises")


def mapped_errors(
    handler: Callable[[Any, Any, Any], Awaitable[T]],
) -> Callable[[Any, Any, Any], Awaitable[T]]:
    """Report any exception of a unary-response handler with its mapped status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        try:
            return await handler(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await abort(context, e)

    return wrapper


class EventBridge:
    """Carries one request's events from the engine thread into the event loop, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()

    def __call__(self, event: GenerationEvent) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """Events up to and including the result; a failure is raised as its typed error."""
        while True:
            event = await self._queue.get()
            if event.kind is EventKind.FAILED:
                raise event.error or RuntimeError("the request failed without an error")
            yield event
            if event.kind is EventKind.RESULT:
                return


class GenerationService(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(
        self, state: ServerState, metrics: ServerMetrics, limits: RequestLimits, log_prompts: bool = False
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.limits = limits
        self.log_prompts = log_prompts  # --log-prompts: the access log quotes them

    async def _submit(
        self,
        request: generation_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        entry: AccessEntry,
    ) -> tuple[RequestHandle, EventBridge]:
        entry.label = request.request_id[:MAX_REQUEST_ID_CHARS]  # a refused request is logged too
        runtime = self.state.require()
        defaults, remaining = runtime.engine.family.defaults(), context.time_remaining()
        # on a worker thread: decoding the input images is CPU work
        job = await asyncio.to_thread(generation_request, request, self.limits, defaults, remaining)
        _describe(entry, job, runtime)
        bridge = EventBridge(asyncio.get_running_loop())
        # on a worker thread: admission asks the registry whether the adapters exist (a database
        # round trip with a shared registry), which must not stall every other stream on this loop;
        # the runtime resolves them for the calling tenant and applies its quotas
        submitted = asyncio.ensure_future(asyncio.to_thread(_admit, runtime, job, bridge, entry))
        try:
            handle = await asyncio.shield(submitted)
        except asyncio.CancelledError:  # the client left while the request was being admitted
            submitted.add_done_callback(_cancel_admitted)
            raise
        entry.server_id = handle.server_id
        return handle, bridge

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        start, handle, status, entry = time.monotonic(), None, "ok", AccessEntry(current_tenant().id)
        try:
            handle, bridge = await self._submit(request, context, entry)
            async for event in bridge.events():
                message = await asyncio.to_thread(event_message, event)
                if message is not None:
                    if message.HasField("result"):
                        self._annotate(message.result, entry)
                    yield message
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except Exception as e:
            status = status_code_of(e).name.lower()
            await abort(context, e)
        finally:
            self._finish(handle, status, start, entry)

    @mapped_errors
    async def GenerateOnce(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.GenerateResponse:
        start, handle, status, entry = time.monotonic(), None, "ok", AccessEntry(current_tenant().id)
        try:
            handle, bridge = await self._submit(request, context, entry)
            async for event in bridge.events():
                if event.kind is EventKind.RESULT and event.result is not None:
                    result = await asyncio.to_thread(result_message, event.result)
                    self._annotate(result, entry)
                    return generation_pb2.GenerateResponse(request_id=event.request_id, result=result)
            raise RuntimeError("the engine finished the request without a result")
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as e:
            status = status_code_of(e).name.lower()
            raise
        finally:
            self._finish(handle, status, start, entry)

    def _annotate(self, result: generation_pb2.Result, entry: AccessEntry) -> None:
        """What the engine's result lacks: the request's warnings and the base model's name."""
        result.warnings.extend(entry.warnings)
        if self.state.runtime is not None:
            result.model = self.state.runtime.model_name

    def _finish(self, handle: RequestHandle | None, status: str, start: float, entry: AccessEntry) -> None:
        """Record the RPC's outcome; a request the client abandoned stops at the engine's next step."""
        if handle is not None and not handle.future.done():
            handle.cancel()
        latency = time.monotonic() - start if handle is not None else None
        self.metrics.request_finished(status, latency, entry.tenant)
        log_access(entry, status, time.monotonic() - start, self.log_prompts)


def _describe(entry: AccessEntry, job: GenerationRequest, runtime: ServingRuntime) -> None:
    """What the access log says of ``job`` (its sizes resolved to the model's defaults)."""
    defaults = runtime.engine.family.defaults()
    entry.adapters, entry.images = len(job.adapters), job.num_images
    entry.steps = job.num_inference_steps or defaults.steps
    entry.width, entry.height = job.width or defaults.width, job.height or defaults.height
    entry.prompt, entry.negative_prompt = job.prompt, job.negative_prompt


def _admit(
    runtime: ServingRuntime, job: GenerationRequest, bridge: EventBridge, entry: AccessEntry
) -> RequestHandle:
    """Submit ``job`` (blocking: registry look-ups, tokenizing); ``entry`` gets its prompt warnings."""
    entry.warnings = runtime.prompt_warnings(job)
    return runtime.submit(job, bridge)


def _cancel_admitted(submitted: asyncio.Future[RequestHandle]) -> None:
    if not submitted.cancelled() and submitted.exception() is None:
        submitted.result().cancel()


class AdapterService(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, state: ServerState, limits: UploadLimits) -> None:
        self.state = state
        self.limits = limits

    @mapped_errors
    async def RegisterAdapter(
        self, request_iterator: AsyncIterator[adapters_pb2.RegisterAdapterChunk], context: Any
    ) -> adapters_pb2.Adapter:
        runtime = self.state.require()
        registry = runtime.registry
        chunks = bounded_chunks(request_iterator, self.limits)
        upload = received_upload(chunks, registry.cache.tmp, self.limits.max_bytes, registry.check_free)
        async with upload as (header, received), self.state.registrations:
            fmt = UPLOAD_FORMATS.get(header.format)
            record = await asyncio.to_thread(
                registry.register, header.name, received, fmt, dict(header.metadata), public=header.public
            )
        return adapter_message(record, *runtime.adapter_state(record))

    @mapped_errors
    async def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: Any
    ) -> adapters_pb2.ListAdaptersResponse:
        runtime = self.state.require()
        registry = runtime.registry
        size, after = page_size(request), page_after(request.page_token)
        records = await asyncio.to_thread(registry.records_page, after, size + 1)
        return adapters_page(records, size, lambda r: adapter_message(r, *runtime.adapter_state(r)))

    @mapped_errors
    async def GetAdapter(self, request: adapters_pb2.GetAdapterRequest, context: Any) -> adapters_pb2.Adapter:
        runtime = self.state.require()
        registry = runtime.registry
        record = await asyncio.to_thread(registry.get, validate_name(request.name))
        return adapter_message(record, *runtime.adapter_state(record))

    @mapped_errors
    async def DeleteAdapter(
        self, request: adapters_pb2.DeleteAdapterRequest, context: Any
    ) -> adapters_pb2.DeleteAdapterResponse:
        runtime = self.state.require()
        await asyncio.to_thread(runtime.delete_adapter, validate_name(request.name))
        return adapters_pb2.DeleteAdapterResponse()
