"""The server process: listen first, load the model, serve, and drain on SIGTERM.

Life cycle (health ``""`` and every deft service report the same status)::

    start ──► listening, NOT_SERVING (calls: UNAVAILABLE "loading") ──► model + registry + engine loaded
          ──► SERVING ──SIGTERM/SIGINT──► NOT_SERVING, new requests UNAVAILABLE, in-flight requests
          finish within --grace-period (the rest then fail UNAVAILABLE, saying so) ──► exit 0
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from deft_client.proto import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from deft_server.config import ServerSettings
from deft_server.http_api import HttpServer, start_http
from deft_server.loading import ServingRuntime, load_runtime
from deft_server.metrics import ServerMetrics
from deft_server.ports import StartupError, check_ports, in_use, port_in_use_message
from deft_server.service import AdapterService, GenerationService, ServerState
from deft_server.tenants_auth import InsecureBind, auth_interceptors
from deft_server.tenants_mtls import SubjectMapError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from deft_runtime.errors import DeftError

log = logging.getLogger("deft_server")
T = TypeVar("T")
SERVICES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def run(settings: ServerSettings) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    configure_logging(settings.log_level)
    try:
        return asyncio.run(serve(settings))
    except StartupError as e:
        log.error("%s", e)
        return 2


def _options(settings: ServerSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", int(settings.max_message_size)),
        ("grpc.max_send_message_length", -1),  # results are as large as the limits above allow
        ("grpc.so_reuseport", 0),
    ]


def build_server(
    settings: ServerSettings, state: ServerState, generation: GenerationService, health: HealthServicer
) -> grpc.aio.Server:
    def store() -> Any:  # the registry's store (for --auth keys) once the runtime is loaded
        return state.runtime.registry.store if state.runtime is not None else None

    try:
        interceptors = auth_interceptors(settings, store)
    except (InsecureBind, SubjectMapError) as e:
        raise StartupError(str(e)) from e
    server = grpc.aio.server(options=_options(settings), interceptors=interceptors)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(generation, server)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
        AdapterService(state, settings.upload_limits()), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    _bind(server, settings)
    return server


def _read_pem(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise StartupError(f"cannot read {flag} {path}: {e.strerror or e}") from e


def _bind(server: grpc.aio.Server, settings: ServerSettings) -> None:
    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls_cert and settings.tls_key:
            pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
            ca = _read_pem(settings.tls_client_ca, "--tls-client-ca") if settings.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [pair], root_certificates=ca, require_client_auth=ca is not None
            )
            server.add_secure_port(address, credentials)
        else:
            server.add_insecure_port(address)
    except (OSError, RuntimeError) as e:
        if in_use(settings.host, settings.port):  # taken since check_ports looked
            raise StartupError(port_in_use_message(settings.port, "--port")) from e
        raise StartupError(f"cannot listen on {address}: {e}") from e


async def set_health(health: HealthServicer, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
    for service in ("", *SERVICES):
        await health.set(service, status)


def start_metrics(settings: ServerSettings, metrics: ServerMetrics) -> Callable[[], None]:
    """Serve /metrics over HTTP; returns its stop function (a no-op when --metrics-port is 0)."""
    if not settings.metrics_port:
        return lambda: None
    try:
        http, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {settings.host}:{settings.metrics_port}: {e}") from e
    return http.shutdown


def in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``fn`` on a daemon thread, so a SIGTERM during a long model load does not wait for it."""
    future: cf.Future[T] = cf.Future()

    def target() -> None:
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=target, name="deft-model-loader", daemon=True).start()
    return asyncio.wrap_future(future)


def stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def load(
    settings: ServerSettings, metrics: ServerMetrics, stop: asyncio.Event
) -> ServingRuntime | None:
    """The loaded runtime, or None when a stop signal came first."""
    loading = in_daemon_thread(lambda: load_runtime(settings, metrics))
    stopped = asyncio.ensure_future(stop.wait())
    either: list[asyncio.Future[Any]] = [loading, stopped]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not loading.done():
        loading.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        return None
    return loading.result()


def check_free(settings: ServerSettings) -> None:
    """Every port this server would listen on is free (else one message naming the flag to change)."""
    ports = [(settings.port, "--port"), (settings.metrics_port, "--metrics-port")]
    check_ports(settings.host, [*ports, (settings.http_port, "--http-port")])


async def serve(settings: ServerSettings) -> int:
    check_free(settings)
    metrics, state, health = ServerMetrics(settings.metrics_tenant_labels), ServerState(), HealthServicer()
    await set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    generation = GenerationService(state, metrics, settings.request_limits(), settings.log_prompts)
    server = build_server(settings, state, generation, health)
    # whatever started is stopped on the way out, in reverse order: a failure half-way through start-up
    # (a port taken meanwhile) leaves no server to be torn down after the event loop has closed
    async with contextlib.AsyncExitStack() as started:
        await server.start()
        started.push_async_callback(server.stop, None)  # after shutdown()'s drain: a no-op
        started.callback(start_metrics(settings, metrics))
        http = await _start_http(settings, state, generation)
        started.push_async_callback(_stop_http, http)
        log.info(
            "listening on %s:%d (metrics port %d); loading the model",
            settings.host,
            settings.port,
            settings.metrics_port,
        )
        return await _serve_loaded(settings, server, state, health, metrics)
    raise AssertionError("unreachable")


async def _serve_loaded(
    settings: ServerSettings,
    server: grpc.aio.Server,
    state: ServerState,
    health: HealthServicer,
    metrics: ServerMetrics,
) -> int:
    """Load the model, serve until a stop signal, drain; the exit code."""
    stop = stop_event()
    try:
        runtime = await load(settings, metrics, stop)
    except Exception as e:
        log.error("could not start serving: %s", e, exc_info=not isinstance(e, DeftError))
        await server.stop(grace=None)
        return 1
    if runtime is not None:
        state.runtime = metrics.live.runtime = runtime
        await set_health(health, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", settings.model, settings.host, settings.port)
        watch = asyncio.create_task(watch_registry(runtime, health))
        await stop.wait()
        watch.cancel()
    await shutdown(server, health, state, settings.grace_period)
    return 0


async def _start_http(
    settings: ServerSettings, state: ServerState, generation: GenerationService
) -> HttpServer | None:
    try:
        return await start_http(settings, state, generation)
    except OSError as e:
        raise StartupError(f"cannot serve HTTP on {settings.host}:{settings.http_port}: {e}") from e


async def _stop_http(http: HttpServer | None) -> None:
    """After the drain: in-flight HTTP requests have their results; close the listener."""
    if http is not None:
        await http.stop()


async def watch_registry(runtime: ServingRuntime, health: HealthServicer, interval_s: float = 1.0) -> None:
    """Health follows the registry: NOT_SERVING while its database is gone, replaced or unreadable (a
    load balancer then stops sending work here), SERVING again once it answers."""
    healthy = True
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(runtime.registry.store.check)
            ok = True
        except DeftError as e:
            ok = False
            if healthy:
                log.error("the adapter registry cannot be used: %s", e)
        if ok != healthy:
            healthy = ok
            status = (
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await set_health(health, status)
            log.warning("health is now %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))


async def shutdown(server: grpc.aio.Server, health: HealthServicer, state: ServerState, grace: float) -> None:
    """Refuse new work, let in-flight requests finish within ``grace`` seconds, then stop."""
    log.info("shutting down: finishing in-flight requests (grace period %gs)", grace)
    deadline = time.monotonic() + grace
    await health.enter_graceful_shutdown()
    state.draining = True
    runtime = state.runtime
    if runtime is not None:
        finished = await asyncio.to_thread(runtime.engine.drain, grace)
        if not finished:
            await fail_unfinished(runtime, grace)
    await server.stop(grace=max(1.0, deadline - time.monotonic()))
    if runtime is not None:
        runtime.close()
    log.info("stopped")


async def fail_unfinished(runtime: ServingRuntime, grace: float) -> None:
    """The grace period ran out: the requests still queued or running fail with UNAVAILABLE and a message
    saying why, sent by their own handlers before the gRPC server stops (which would otherwise cancel
    them, leaving the client "Cancelling all calls" and the log a CancelledError)."""
    left = runtime.engine.running + runtime.engine.waiting
    log.warning("grace period of %gs over: failing the %d requests still running", grace, left)
    reason = (
        f"the server is shutting down and its grace period ({grace:g}s, --grace-period) ran out before "
        "this request finished; send it again (to another replica, or once the server is back)"
    )
    await asyncio.to_thread(runtime.engine.shutdown, 10.0, reason)


def main(overrides: dict[str, Any]) -> int:
    """Entry point of ``deft serve``: ``overrides`` are the flags given (they beat ``DEFT_*`` variables)."""
    from pydantic import ValidationError

    try:
        settings = ServerSettings(**overrides)
    except ValidationError as e:
        for problem in e.errors():
            flag = (
                "--" + "-".join(str(p) for p in problem["loc"]).replace("_", "-")
                if problem["loc"]
                else "settings"
            )
            print(f"error: {flag}: {problem['msg']}", file=sys.stderr)
        return 2
    return run(settings)
