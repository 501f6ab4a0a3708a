"""The blocking client: ``DeftClient("127.0.0.1:50051")``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
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


class DeftClient:
    """A connection to a deft server. Every failure raises :class:`DeftError`; use as a context manager
    or call :meth:`close`. ``timeout`` (seconds) is the default deadline of every call (None: none).
    ``client_certificate`` and ``client_key`` (PEM bytes or paths) present a client certificate to a
    server with mutual TLS (``deft serve --tls-client-ca``)."""

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
            grpc.secure_channel(self.target, creds, options=CHANNEL_OPTIONS)
            if creds is not None
            else grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        )
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdapterServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = call_metadata(token)
        self.timeout = timeout

    # ------------------------------------------------------------------ plumbing

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise DeftError.from_rpc_error(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DeftClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server reports SERVING (it loads its model first); DeftError on timeout."""
        end = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service="")
        while True:
            try:
                reply = self._health.Check(request, timeout=max(0.1, min(5.0, end - time.monotonic())))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                if time.monotonic() >= end:
                    raise DeftError.from_rpc_error(e) from None
            if time.monotonic() >= end:
                raise DeftError(grpc.StatusCode.UNAVAILABLE, f"{self.target} is not serving yet")
            time.sleep(0.1)

    # ------------------------------------------------------------------ adapters

    def register_adapter(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, str] | None = None,
        public: bool = False,
        denoiser_only: bool = False,
        timeout: float | None = None,
    ) -> AdapterInfo:
        """Upload and register an adapter: a PEFT directory, a ``.safetensors`` LoRA file, a deft file, or
        a folder holding one of them (a ``deft train`` output folder) (``public``: usable by every
        tenant; needs an admin key). Errors name the user's file, which the server knows by name only.
        ``denoiser_only`` uploads a LoRA file without its text-encoder layers (which deft refuses),
        warning with :class:`~deft_client.denoiser_only.DroppedLayersWarning` about what was left out."""
        with prepared_upload(path, denoiser_only) as source:
            chunks = upload_chunks(name, source.path, metadata, public, file_name=source.label)
            return AdapterInfo.from_message(self._call(self._adapters.RegisterAdapter, chunks, timeout))

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        """Every registered adapter, by name (fetched page by page; ``timeout`` applies to each page)."""
        adapters, token = [], ""
        while True:
            page = self.list_adapters_page(page_token=token, timeout=timeout)
            adapters += page.adapters
            if not (token := page.next_page_token):
                return adapters

    def list_adapters_page(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> AdapterPage:
        """One page of at most ``page_size`` adapters (0: the server's default) after ``page_token``."""
        request = adapters_pb2.ListAdaptersRequest(page_size=page_size, page_token=page_token)
        return AdapterPage.from_message(self._call(self._adapters.ListAdapters, request, timeout))

    def get_adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        reply = self._call(self._adapters.GetAdapter, adapters_pb2.GetAdapterRequest(name=name), timeout)
        return AdapterInfo.from_message(reply)

    def delete_adapter(self, name: str, *, timeout: float | None = None) -> None:
        self._call(self._adapters.DeleteAdapter, adapters_pb2.DeleteAdapterRequest(name=name), timeout)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **params: Any,
    ) -> list[Image.Image]:
        """Generate and return the images. ``options`` and/or keyword arguments (the fields of
        :class:`GenerateOptions`: ``adapters``, ``seed``, ``steps``, ``width``, ``height``,
        ``guidance_scale``, ``num_images``, ``negative_prompt``, ``request_id``, ...) describe the
        request; what is left out takes the base model's default."""
        return self.generate_result(prompt, options, timeout=timeout, **params).images

    def generate_result(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **params: Any,
    ) -> Result:
        """Like :meth:`generate`, returning the whole :class:`Result` (images, seed used, timings)."""
        request = generate_request(prompt, options, **params)
        reply = self._call(self._generation.GenerateOnce, request, timeout)
        return result_from_message(reply.request_id, reply.result)

    def generate_stream(
        self,
        prompt: str,
        options: GenerateOptions | None = None,
        *,
        timeout: float | None = None,
        **params: Any,
    ) -> Iterator[GenerationEvent]:
        """Yield :class:`Queued`, :class:`Started`, :class:`Progress`, :class:`Preview` (with
        ``preview_every_n_steps=N``) and finally :class:`Result`. Leaving the loop early cancels the request."""
        request = generate_request(prompt, options, **params)
        call = self._generation.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            for message in call:
                event = event_from_message(message)
                if event is not None:
                    yield event
        except grpc.RpcError as e:
            raise DeftError.from_rpc_error(e) from None
        finally:
            call.cancel()
