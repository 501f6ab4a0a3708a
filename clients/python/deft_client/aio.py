"""The asyncio client: ``async with AsyncDeftClient("127.0.0.1:50051") as c: await c.generate(...)``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from deft_client.adapter_files import prepared_upload
from deft_client.channel import CHANNEL_OPTIONS, call_metadata, credentials, resolve_target
from deft_client.errors import DeftError
from deft_client.proto import adapters_pb2, adapters_pb2_grpc, generation_pb2_grpc
from deft_client.results import (
    AdapterInfo,
    AdapterPage,
    GenerationEvent,
    Result,
    event_from_message,
    result_from_message,
)
from deft_client.wire import GenerateOptions, generate_request, upload_chunks

T = TypeVar("T")
_DONE = object()


async def _off_loop(items: Iterator[T]) -> AsyncIterator[T]:
    """Iterate a blocking iterator (file reads) on worker threads."""
    while (item := await asyncio.to_thread(next, items, _DONE)) is not _DONE:
        yield item  # type: ignore[misc]


class AsyncDeftClient:
    """The asyncio twin of :class:`deft_client.DeftClient` (same methods, awaitable)."""

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        client_certificate: bytes | str | os.PathLike[str] | None = None,
        client_key: bytes | str | os.PathLike[str] | None = None,
    ) -> None:
        self.target = resolve_target(target)
        creds = credentials(root_certificates, client_certificate, client_key)
        self._channel = (
            grpc.aio.secure_channel(self.target, creds, options=CHANNEL_OPTIONS)
            if creds is not None
            else grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        )
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdapterServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = call_metadata(token)
        self.timeout = timeout

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise DeftError.from_rpc_error(e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncDeftClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service="")
        while True:
            try:
                reply = await self._health.Check(request, timeout=max(0.1, min(5.0, end - time.monotonic())))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                if time.monotonic() >= end:
                    raise DeftError.from_rpc_error(e) from None
            if time.monotonic() >= end:
                raise DeftError(grpc.StatusCode.UNAVAILABLE, f"{self.target} is not serving yet")
            await asyncio.sleep(0.1)

    async def register_adapter(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, str] | None = None,
        public: bool = False,
        denoiser_only: bool = False,
        timeout: float | None = None,
    ) -> AdapterInfo:
        """See :meth:`DeftClient.register_adapter`."""
        with contextlib.ExitStack() as stack:  # reading a folder, copying a file: off the event loop
            source = await asyncio.to_thread(stack.enter_context, prepared_upload(path, denoiser_only))
            chunks = _off_loop(upload_chunks(name, source.path, metadata, public, file_name=source.label))
            reply = await self._call(self._adapters.RegisterAdapter, chunks, timeout)
        return AdapterInfo.from_message(reply)

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        adapters, token = [], ""
        while True:
            page = await self.list_adapters_page(page_token=token, timeout=timeout)
            adapters += page.adapters
            if not (token := page.next_page_token):
                return adapters

    async def list_adapters_page(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> AdapterPage:
        request = adapters_pb2.ListAdaptersRequest(page_size=page_size, page_token=page_token)
        return AdapterPage.from_message(await self._call(self._adapters.ListAdapters, request, timeout))

    async def get_adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        reply = await self._call(
            self._adapters.GetAdapter, adapters_pb2.GetAdapterRequest(name=name), timeout
        )
        return AdapterInfo.from_message(reply)

    async def delete_adapter(self, name: str, *, timeout: float | None = None) -> None:
        await self._call(self._adapters.DeleteAdapter, adapters_pb2.DeleteAdapterRequest(name=name), timeout)

    async def generate(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **params: Any,
    ) -> list[Image.Image]:
        """Generate and return the images (same parameters as :meth:`DeftClient.generate`)."""
        return (await self.generate_result(prompt, options, timeout=timeout, **params)).images

    async def generate_result(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **params: Any,
    ) -> Result:
        request = generate_request(prompt, options, **params)
        reply = await self._call(self._generation.GenerateOnce, request, timeout)
        return result_from_message(reply.request_id, reply.result)

    async def generate_stream(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **params: Any,
    ) -> AsyncIterator[GenerationEvent]:
        request = generate_request(prompt, options, **params)
        call = self._generation.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for message in call:
                event = event_from_message(message)
                if event is not None:
                    yield event
        except grpc.RpcError as e:
            raise DeftError.from_rpc_error(e) from None
        finally:
            call.cancel()
