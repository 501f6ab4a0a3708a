"""The HTTP face of ``deft serve`` (``--http-port``, default 8000): an OpenAI-compatible Images API, adapter
management, health, and the browser playground at ``/``.

It is a FastAPI app served by uvicorn *inside the server's event loop* (a task, no thread or process):
the same process, engine, registry, token and error mapping as gRPC. Signals stay with
:mod:`deft_server.app` (uvicorn's own handlers are off): on SIGTERM the server drains (new HTTP
requests get 503, in-flight ones finish) and :meth:`HttpServer.stop` then closes the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from deft_server.config import ServerSettings
from deft_server.http_api.app import build_app
from deft_server.service import GenerationService, ServerState

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the deft server owns SIGTERM/SIGINT and drains first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """A running HTTP server: its uvicorn instance and the task serving it."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None]) -> None:
        self._server, self._task = server, task

    async def stop(self) -> None:
        """Stop listening, let open responses finish (within the grace period), then return."""
        self._server.should_exit = True
        await self._task


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (raises OSError: the caller reports it as a start-up failure)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    sock.set_inheritable(False)
    return sock


async def start_http(
    settings: ServerSettings, state: ServerState, generation: GenerationService
) -> HttpServer | None:
    """Serve HTTP on ``--host:--http-port`` (None when the port is 0); returns once it listens."""
    if not settings.http_port:
        return None
    sock = listening_socket(settings.host, settings.http_port)
    config = uvicorn.Config(
        build_app(settings, state, generation),
        log_config=None,
        lifespan="off",
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=max(1, int(settings.grace_period)),
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="deft-http")
    while not server.started:
        if task.done():
            task.result()
            raise OSError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    log.info(
        "HTTP API and playground on http%s://%s:%d/",
        "s" if settings.tls_cert else "",
        settings.host,
        settings.http_port,
    )
    return HttpServer(server, task)
