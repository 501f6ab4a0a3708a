"""The HTTP API's routes: OpenAI's Images and Models endpoints, adapter management, health, the playground.

Every route that does work calls the gRPC servicers (:class:`GenerationService`,
:class:`AdapterService`) with an :class:`~deft_server.http_api.errors.HttpCallContext`, so a request
over HTTP is converted, bounded, admitted, recorded in the metrics and refused exactly as over gRPC;
this module only translates between JSON and the ``deft.v1`` messages.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from importlib import resources
from typing import Any, TypeVar, cast

import grpc
from deft_client.proto import adapters_pb2, generation_pb2
from deft_server.config import ServerSettings
from deft_server.convert import MAX_PAGE_SIZE
from deft_server.errors import UploadTooLarge
from deft_server.http_api import edits, images
from deft_server.http_api.errors import HttpCallContext, StatusError, stream_error_body
from deft_server.http_api.uploads import upload_chunks
from deft_server.service import AdapterService, GenerationService, ServerState
from fastapi import APIRouter, Request
from google.protobuf import json_format
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

CONTEXT = cast(Any, HttpCallContext())  # what the servicers are given as their ServicerContext
_STATE_PREFIX = "ADAPTER_STATE_"
#: how often a waiting (non-streaming) generation checks that its client is still connected
DISCONNECT_POLL_S = 0.5
T = TypeVar("T")


class Routes:
    """The routes of one server, over its servicers."""

    def __init__(self, settings: ServerSettings, state: ServerState, generation: GenerationService) -> None:
        self.state = state
        self.generation = generation
        self.adapters = AdapterService(state, settings.upload_limits())
        self.started = int(time.time())
        self.max_upload = int(settings.max_upload_size)
        self.max_edit = int(settings.max_message_size)  # the edit becomes one gRPC message
        self.max_images, self.max_pixels = settings.max_input_images, settings.max_input_image_pixels

    def router(self) -> APIRouter:
        """The authorized API (the caller adds the token check as a dependency)."""
        api = APIRouter()
        api.add_api_route("/v1/images/generations", self.generate, methods=["POST"])
        api.add_api_route("/v1/images/edits", self.edit, methods=["POST"])
        api.add_api_route("/v1/models", self.models, methods=["GET"])
        api.add_api_route("/v1/adapters", self.register, methods=["POST"])
        api.add_api_route("/v1/adapters/{name}", self.get_adapter, methods=["GET"])
        api.add_api_route("/v1/adapters/{name}", self.delete_adapter, methods=["DELETE"])
        return api

    def open_router(self) -> APIRouter:
        """What needs no token: health, readiness and the playground page."""
        open_api = APIRouter()
        open_api.add_api_route("/health", self.health, methods=["GET"])
        open_api.add_api_route("/ready", self.ready, methods=["GET"])
        open_api.add_api_route("/", self.playground, methods=["GET"], response_class=HTMLResponse)
        return open_api

    # ------------------------------------------------------------------ images

    async def generate(self, request: Request) -> Any:
        """OpenAI's ``POST /v1/images/generations`` (``stream: true``: server-sent events)."""
        body = images.parse_body(await _body(request, images.MAX_BODY_BYTES))
        runtime = self.state.require()
        adapter = self._adapter(body.model, runtime.model_name)
        message = images.generate_request(body, adapter, runtime.engine.family.defaults().steps)
        if body.stream:
            return await self._stream(message, body)
        return await self._answer(request, message, body)

    async def edit(self, request: Request) -> Any:
        """OpenAI's ``POST /v1/images/edits`` (multipart; see :mod:`.edits`)."""
        _check_length(request, self.max_edit)
        content_type = request.headers.get("content-type", "")
        form = await edits.read_form(content_type, _limited(request, self.max_edit), self.max_images)
        body = edits.parse_fields(form.fields)
        runtime = self.state.require()
        adapter = self._adapter(body.model, runtime.model_name)
        message = await asyncio.to_thread(edits.edit_request, form, body, adapter, self.max_pixels)
        return await self._answer(request, message, body)

    async def _answer(
        self, request: Request, message: generation_pb2.GenerateRequest, body: images.ImageGenerationBody
    ) -> Response:
        reply = await _unless_disconnected(request, self.generation.GenerateOnce(message, CONTEXT))
        if reply is None:
            return Response(status_code=499)  # nobody reads it: the client left
        return JSONResponse(await asyncio.to_thread(images.images_response, reply.result, body))

    @staticmethod
    def _adapter(model: str | None, base: str) -> str | None:
        try:
            return images.split_model(model, base)
        except LookupError as e:
            raise StatusError.http_only(grpc.StatusCode.NOT_FOUND, str(e), "MODEL_NOT_FOUND") from None

    async def _stream(self, message: generation_pb2.GenerateRequest, body: images.ImageGenerationBody) -> Any:
        events = cast(AsyncIterator[generation_pb2.GenerateEvent], self.generation.Generate(message, CONTEXT))
        first = await anext(events)  # a request refused at admission is answered with its status
        return StreamingResponse(
            _sse(first, events, body), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    # ------------------------------------------------------------------ models and adapters

    async def models(self) -> dict[str, Any]:
        """OpenAI's model list: the base model, then ``BASE:ADAPTER`` for every registered adapter."""
        base = self.state.require().model_name
        data = [_model(base, self.started)]
        token = ""
        while True:
            page_request = adapters_pb2.ListAdaptersRequest(page_size=MAX_PAGE_SIZE, page_token=token)
            page = await self.adapters.ListAdapters(page_request, CONTEXT)
            data += [_model(f"{base}:{a.name}", a.created_at.seconds) for a in page.adapters]
            if not (token := page.next_page_token):
                return {"object": "list", "data": data}

    async def register(self, request: Request) -> dict[str, Any]:
        """Register the adapter uploaded as ``multipart/form-data`` (see :mod:`.uploads`)."""
        _check_length(request, self.max_upload + (1 << 20))  # the file plus its form fields
        return adapter_json(await self.adapters.RegisterAdapter(upload_chunks(request), CONTEXT))

    async def get_adapter(self, name: str) -> dict[str, Any]:
        reply = await self.adapters.GetAdapter(adapters_pb2.GetAdapterRequest(name=name), CONTEXT)
        return adapter_json(reply)

    async def delete_adapter(self, name: str) -> dict[str, Any]:
        await self.adapters.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(name=name), CONTEXT)
        return {"id": name, "object": "adapter", "deleted": True}

    # ------------------------------------------------------------------ open routes

    async def health(self) -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    async def ready(self) -> dict[str, str]:
        """Readiness: the model is loaded and the server is not draining (else 503)."""
        return {"status": "ready", "model": self.state.require().model_name}

    async def playground(self) -> str:
        return resources.files("deft_server").joinpath("static/index.html").read_text()


def _model(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "deft"}


def adapter_json(adapter: adapters_pb2.Adapter) -> dict[str, Any]:
    """An ``Adapter`` message as JSON (proto field names; ``state`` as ``ready``/``resident``/...)."""
    fields = json_format.MessageToDict(
        adapter, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    fields["state"] = str(fields["state"]).removeprefix(_STATE_PREFIX).lower()
    for key in ("size_bytes", "compiled_bytes"):  # proto3 JSON writes 64-bit integers as strings
        fields[key] = int(fields[key])
    return {"id": adapter.name, "object": "adapter", **fields}


def _check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise UploadTooLarge(f"the request body is {length} bytes, above this server's limit of {limit}")


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes while it arrives."""
    _check_length(request, limit)
    body = bytearray()
    async for chunk in _limited(request, limit):
        body += chunk
    return bytes(body)


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive, refused once more than ``limit`` bytes came."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise UploadTooLarge(f"the request body is larger than this server's limit of {limit} bytes")
        yield chunk


async def _unless_disconnected(request: Request, call: Awaitable[T]) -> T | None:
    """``call``'s result, or None once the client has disconnected (``call`` is then cancelled, so the
    engine drops the request at its next step, as when a gRPC client cancels)."""
    task = asyncio.ensure_future(call)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                return None
        return task.result()
    finally:
        task.cancel()


def _sse_message(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _sse(
    first: generation_pb2.GenerateEvent,
    events: AsyncIterator[generation_pb2.GenerateEvent],
    body: images.ImageGenerationBody,
) -> AsyncIterator[bytes]:
    """OpenAI's image stream: up to ``partial_images`` previews, then one ``completed`` per image; a
    failure after the 200 is an ``error`` event with OpenAI's error body."""
    sent, wanted = 0, body.partial_images or 0
    try:
        message: generation_pb2.GenerateEvent | None = first
        while message is not None:
            kind = message.WhichOneof("event")
            if kind == "preview" and sent < wanted:
                b64 = await asyncio.to_thread(images.encoded, message.preview.png, body)
                data = images.stream_event(
                    "partial_image", b64, body.size or "auto", body, partial_image_index=sent
                )
                yield _sse_message(data["type"], data)
                sent += 1
            elif kind == "result":
                for image in message.result.images:
                    b64 = await asyncio.to_thread(images.encoded, image.png, body)
                    size, warned = f"{image.width}x{image.height}", images.warnings_field(message.result)
                    data = images.stream_event("completed", b64, size, body, **warned)
                    yield _sse_message(data["type"], data)
            message = await anext(events, None)
    except StatusError as e:
        yield _sse_message("error", stream_error_body(e))
    finally:
        await cast(Any, events).aclose()
