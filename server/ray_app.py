"""deft on Ray Serve: N engine replicas behind Serve's gRPC ingress, with adapter-affinity routing.

Two deployments::

    client ──gRPC──► Serve gRPC proxy ──► DeftIngress ──handle, multiplexed_model_id=<adapter set>──► DeftReplica × N
                     (deft.v1 services)    (one, no model)                                            (one ServingRuntime each)

**Replicas.** Each :class:`DeftReplica` is one ordinary deft server without its own gRPC port: it builds a
:class:`~deft_server.loading.ServingRuntime` (model, registry, engine) from :class:`ServerSettings`
with :func:`~deft_server.loading.load_runtime`, and runs requests through the very
:class:`~deft_server.service.GenerationService` / :class:`~deft_server.service.AdapterService` that
``deft serve`` uses, so validation, batching, events and error statuses are identical. Several requests
on one replica are batched together by its engine, adapters mixed per row, exactly as on a single server.

**Routing id = the request's adapter set.** :func:`adapter_set_id` is the sorted, de-duplicated adapter
names joined with ``+`` (``+`` cannot occur in a name); ``""`` for a request without adapters. The
ingress sends each request with that id as Serve's ``multiplexed_model_id``; Serve's router prefers
replicas whose ``@serve.multiplexed`` cache holds the id, and each replica caches up to
``max_adapter_sets`` ids (LRU). Loading an id on a replica (:meth:`DeftReplica._load_set`) checks the
adapters exist and makes them resident in that replica's adapter pool (device pages), unpinned: the
pool's own LRU and the engine still decide, so an id only says where the adapters are warm.

*Why the set and not each adapter.* Serve routes on one id per request. A request blending ``{a, b}`` is
fastest on a replica that has both resident, which is exactly what the id ``a+b`` records; routing on
one member alone would send it to a replica that may lack the other. The price: ``{a}`` and ``{a, b}``
are different ids and may live on different replicas (the adapters are then resident on both, which
the pool allows; factors are small next to the base model). *On a miss* (no replica holds the id yet)
Serve picks among the replicas holding the fewest ids, which then loads it: loading is a registry read
plus a host→device copy, never a failure. When every replica holding an id is busy
(``max_ongoing_requests``), Serve spills the request to another replica, which loads the set too, so
hot adapter sets spread over replicas on their own. Requests without adapters (id ``""``) go to any
replica (power of two choices).

**Which replica served a request**: the trailing metadata ``deft-replica`` carries the replica's Serve id
(for a streamed ``Generate`` as well; an error reported before the first event has no trailing metadata,
see below).

**Metrics.** Each replica serves deft's Prometheus metrics (the same as ``deft serve``'s) on
``metrics_port`` plus its rank on the node (``9400``, ``9401``, … per node; ``metrics_port=0``: off).

**Shared registry.** Every replica opens the registry given by its settings: ``registry=postgresql://…``
(any number of nodes) or ``data_dir=…`` (the SQLite registry, for replicas on one machine, or a shared
filesystem). An adapter registered anywhere (``deft adapters register`` against any ``deft serve``
pointed at the same registry, an "admin" server, or through this ingress) is seen by every replica,
each keeping its own host/device caches.

**The ingress** implements ``deft.v1.GenerationService`` (``Generate`` server-streaming,
``GenerateOnce``) and ``deft.v1.AdapterService`` (``ListAdapters``, ``GetAdapter``, ``DeleteAdapter``, and
``RegisterAdapter``: Ray 2.60's proxy passes client streams to deployments; the ingress gathers the
upload, up to ``max_upload_size``, and hands it to one replica). Errors are the single server's: the replica maps
them with :func:`deft_server.errors.to_status`; a unary call ends with the same code, message and
``grpc-status-details-bin`` (ErrorInfo reason) as ``deft serve``; a stream ends with the same code and
message, but Serve's proxy drops trailing metadata on a failed stream, so ``DeftError.reason`` is empty
there. ``token=…`` makes the ingress require ``authorization: Bearer …`` like ``deft serve --token``.

**Tenants** (``auth=keys``, like ``deft serve --auth keys``): the ingress checks every call's
``authorization: Bearer deft_…`` against the registry's keys exactly as the gRPC server's interceptor
does (:mod:`deft_server.tenants_auth`: the same messages, the same one-second cache, so a revocation
reaches the ingress within a second; failures are audited), and hands the resolved tenant to the
replica, which runs the call as that tenant: ownership (another tenant's adapter answers NOT_FOUND like
a missing name, List shows one's own and the public ones), quotas (per replica, as per server), the
engine's fair share (``weight``) and the metrics' optional tenant label (``metrics_tenant_labels``) are
the single server's. The routing id is then qualified by the
tenant (``alice/dog+style``), so two tenants' ``dog`` never share an id, and a replica warms the adapters that tenant's names resolve to. The ingress opens
the registry for keys only (``registry=postgresql://…`` in a fleet; ``data_dir`` on one machine).
Client certificates do not reach the ingress (Serve's proxy ends TLS), so ``tls_client_tenants`` is
not supported here.

Run (``build_app`` takes ``key=value`` arguments; the deployment ones are listed in
:data:`DEPLOYMENT_ARGS`, the rest are ``deft serve`` settings)::

    serve run deft_server.ray_app:build_app model=tiny-sdxl data_dir=/srv/deft num_replicas=2 device=cpu
    serve deploy deploy/ray/serve_config.yaml        # on a running cluster (`ray start --head`)

Serve's gRPC ingress must be given the deft services (``grpc_servicer_functions``), see
``deploy/ray/serve_config.yaml``; ``serve run`` alone starts only the HTTP proxy, so use the config file
(or ``serve.start(grpc_options=…)``) for gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
from deft_client.proto import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from deft_server.auth import BearerToken
from deft_server.config import ServerSettings, UploadLimits
from deft_server.convert import generation_request
from deft_server.errors import UploadTooLarge, to_status
from deft_server.metrics import ServerMetrics
from deft_server.service import AdapterService, GenerationService, ServerState
from deft_server.store import AdapterStore, open_store
from deft_server.tenants import OPEN_TENANT, PUBLIC, Tenant, acting_as
from deft_server.tenants_auth import INVALID_KEY, KeyResolver, bearer_key
from deft_server.upload_limits import bounded_chunks
from google.protobuf.message import Message
from prometheus_client import start_http_server
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deft_runtime.errors import InvalidRequest, PoolExhausted

log = logging.getLogger(__name__)

#: trailing metadata key naming the replica that served the call
REPLICA_KEY = "deft-replica"
#: build_app arguments that configure the deployments rather than the deft settings
DEPLOYMENT_ARGS = {
    "num_replicas": "engine replicas (default 2)",
    "max_adapter_sets": "adapter sets each replica keeps warm for routing (default 16)",
    "max_ongoing_requests": "requests one replica takes at once (default: the max_active setting)",
    "num_cpus": "CPUs reserved per replica (default 1)",
    "num_gpus": "GPUs per replica (default 0; 1 on a GPU node)",
    "torch_threads": "torch intra-op threads per replica on CPU (default 1)",
    "routing": "affinity (the adapter set is the multiplexed id; default) | any (Serve's plain routing)",
}
ROUTING_MODES = ("affinity", "any")
#: grpc_options.grpc_servicer_functions of Serve's gRPC proxy for this application
SERVICE_FUNCTIONS = [
    "deft_server.ray_app.add_generation_service",
    "deft_server.ray_app.add_adapter_service",
]


def add_generation_service(servicer: Any, server: Any) -> None:
    """``add_GenerationServiceServicer_to_server`` (a stable name for Serve's ``grpc_servicer_functions``)."""
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)


def add_adapter_service(servicer: Any, server: Any) -> None:
    """``add_AdapterServiceServicer_to_server`` (a stable name for Serve's ``grpc_servicer_functions``)."""
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(servicer, server)


def adapter_set_id(names: list[str] | tuple[str, ...] | Any) -> str:
    """The routing id of a request's adapters: sorted unique names joined with ``+``; ``""`` for none."""
    return "+".join(sorted({str(name) for name in names}))


def request_set_id(request: generation_pb2.GenerateRequest, tenant: Tenant | None = None) -> str:
    """The routing id of a request: its adapter set, qualified by the tenant (``alice/a+b``) under keys."""
    names = adapter_set_id([ref.name for ref in request.adapters])
    if not names or tenant is None or tenant.id == PUBLIC:
        return names
    return f"{tenant.id}/{names}"  # tenant ids and adapter names never contain "/"


def set_tenant(set_id: str) -> tuple[Tenant, tuple[str, ...]]:
    """The tenant (only its id: whose names these are) and the names of a routing id."""
    owner, _, names = set_id.rpartition("/")
    return (Tenant(id=owner) if owner else OPEN_TENANT), tuple(names.split("+"))


@contextmanager
def acting_for(tenant: Tenant | None) -> Iterator[None]:
    """Run a replica's call as the tenant the ingress resolved (None: no keys, the open tenant)."""
    with acting_as(tenant or OPEN_TENANT):
        yield


# ---------------------------------------------------------------------------------------- replica


@dataclass(frozen=True)
class Failure:
    """A call's error status, as plain data that crosses actor boundaries."""

    code: str  # grpc.StatusCode name
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        status = error.status if isinstance(error, _Aborted) else to_status(error)
        return cls(status.code.name, status.details, tuple(status.trailing_metadata or ()))

    @property
    def status_code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]


class _Aborted(grpc.aio.AbortError):
    """Raised by :class:`_ReplicaContext` where a grpc.aio context would end the RPC."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


class _ReplicaContext:
    """The part of ``grpc.aio.ServicerContext`` the deft servicers use, for calls run inside a replica."""

    def time_remaining(self) -> float | None:
        return None  # Serve does not pass the client's deadline on (see grpc_options.request_timeout_s)

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise _Aborted(status)


@dataclass(frozen=True)
class AdapterSet:
    """What a replica's multiplexed cache holds for one routing id."""

    names: tuple[str, ...]


class DeftReplica:
    """One engine replica: a ServingRuntime plus the deft servicers, driven by :class:`DeftIngress`."""

    def __init__(
        self, settings: Mapping[str, Any], max_adapter_sets: int = 16, torch_threads: int = 1
    ) -> None:
        import torch
        from deft_server.loading import load_runtime

        self.settings = ServerSettings(**settings)
        logging.getLogger("deft_server").setLevel(self.settings.log_level)
        if torch_threads > 0 and not torch.cuda.is_available():
            torch.set_num_threads(torch_threads)
        self.metrics = ServerMetrics(tenant_labels=self.settings.metrics_tenant_labels)
        self.runtime = load_runtime(self.settings, self.metrics)
        self.state = ServerState(runtime=self.runtime)
        self.metrics.live.runtime = self.runtime
        self.limits = self.settings.request_limits()
        self.generation = GenerationService(self.state, self.metrics, self.limits, self.settings.log_prompts)
        self.adapters = AdapterService(self.state, self.settings.upload_limits())
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context is not None else f"pid-{os.getpid()}"
        self._stop_metrics: Any = None
        self.metrics_port = self._serve_metrics(getattr(getattr(context, "rank", None), "local_rank", 0))

        async def load_set(set_id: str) -> AdapterSet:
            return await self._load_set(set_id)

        # Wired per instance so that max_adapter_sets can be an application argument.
        self._hold = serve.multiplexed(max_num_models_per_replica=max_adapter_sets)(load_set)
        self._closed = False
        log.info("deft replica %s ready (%s)", self.replica_id, self.settings.model)

    def _serve_metrics(self, local_rank: int) -> int | None:
        """This replica's /metrics on ``metrics_port + its rank on the node`` (0: off), so that every
        replica of a node has a predictable port for Prometheus: base, base+1, … (see deploy/README.md)."""
        if not self.settings.metrics_port:
            return None
        port = self.settings.metrics_port + local_rank
        try:
            http, _ = start_http_server(port, addr=self.settings.host, registry=self.metrics.registry)
        except OSError as e:  # metrics are not worth failing a replica for
            log.warning(
                "replica %s cannot serve metrics on %s:%d: %s", self.replica_id, self.settings.host, port, e
            )
            return None
        self._stop_metrics = http.shutdown
        log.info("replica %s serves metrics on %s:%d", self.replica_id, self.settings.host, port)
        return port

    async def _load_set(self, set_id: str) -> AdapterSet:
        """Serve's multiplexed loader: make the set's adapters resident here (the routing id's meaning)."""
        tenant, names = set_tenant(set_id)
        await asyncio.to_thread(self._warm, tenant, names)
        log.info("replica %s holds adapter set %r", self.replica_id, set_id)
        return AdapterSet(names)

    def _warm(self, tenant: Tenant, names: tuple[str, ...]) -> None:
        """Load the set into the pool; a name the tenant cannot see fails here (NOT_FOUND, from the
        registry, as at Generate)."""
        pool = self.runtime.pool
        # as the engine names them: the tenant's own adapter, else the public one
        names = tuple(
            name for name, _ in self.runtime.registry.qualify(tuple((n, 1.0) for n in names), tenant)
        )
        try:
            pool.acquire(names)  # loads (registry → host cache → device pages) and pins ...
            pool.release(names)  # ... then unpins: resident until the pool needs the room
        except PoolExhausted as e:  # every page pinned by running requests: the engine loads it later
            log.warning("replica %s could not pre-load %s now: %s", self.replica_id, names, e)

    async def _prepare(self, request: generation_pb2.GenerateRequest) -> None:
        """Validate like the service would (on a worker thread: input images are decoded), then hold the
        request's adapter set (its routing id)."""
        defaults = self.runtime.engine.family.defaults()
        checked = await asyncio.to_thread(generation_request, request, self.limits, defaults, None)
        checked.validate()
        set_id = serve.get_multiplexed_model_id()  # what the router routed on ("" with routing=any)
        if set_id:
            await self._hold(set_id)

    # ---------------------------------------------------------------- generation

    async def generate(
        self, request_bytes: bytes, tenant: Tenant | None = None
    ) -> AsyncIterator[tuple[str, Any]]:
        """Streams ``("replica", id)``, then ``("event", GenerateEvent bytes)``… or a final ``("error", Failure)``."""
        yield "replica", self.replica_id
        request = generation_pb2.GenerateRequest.FromString(request_bytes)
        try:
            with acting_for(tenant):
                await self._prepare(request)
                async for event in self.generation.Generate(request, _ReplicaContext()):
                    yield "event", event.SerializeToString()
        except Exception as e:
            yield "error", Failure.of(e)

    async def generate_once(
        self, request_bytes: bytes, tenant: Tenant | None = None
    ) -> tuple[str, bytes | Failure]:
        """``(replica id, GenerateResponse bytes or Failure)``."""
        request = generation_pb2.GenerateRequest.FromString(request_bytes)
        try:
            with acting_for(tenant):
                await self._prepare(request)
                response = await self.generation.GenerateOnce(request, _ReplicaContext())
            return self.replica_id, response.SerializeToString()
        except Exception as e:
            return self.replica_id, Failure.of(e)

    # ---------------------------------------------------------------- adapters

    async def adapter_call(
        self, method: str, request_bytes: bytes, tenant: Tenant | None = None
    ) -> tuple[str, bytes | Failure]:
        """One unary AdapterService call (``ListAdapters``, ``GetAdapter``, ``DeleteAdapter``)."""
        requests: dict[str, type[Message]] = {
            "ListAdapters": adapters_pb2.ListAdaptersRequest,
            "GetAdapter": adapters_pb2.GetAdapterRequest,
            "DeleteAdapter": adapters_pb2.DeleteAdapterRequest,
        }
        try:
            request = requests[method].FromString(request_bytes)
            with acting_for(tenant):
                reply = await getattr(self.adapters, method)(request, _ReplicaContext())
            return self.replica_id, reply.SerializeToString()
        except Exception as e:
            return self.replica_id, Failure.of(e)

    async def register_adapter(
        self, chunks: list[bytes], tenant: Tenant | None = None
    ) -> tuple[str, bytes | Failure]:
        """RegisterAdapter with the whole upload at hand (serialized RegisterAdapterChunk messages)."""

        async def stream() -> AsyncIterator[adapters_pb2.RegisterAdapterChunk]:
            for chunk in chunks:
                yield adapters_pb2.RegisterAdapterChunk.FromString(chunk)

        try:
            with acting_for(tenant):
                reply = await self.adapters.RegisterAdapter(stream(), _ReplicaContext())
            return self.replica_id, reply.SerializeToString()
        except Exception as e:
            return self.replica_id, Failure.of(e)

    # ---------------------------------------------------------------- life cycle

    def check_health(self) -> None:
        thread = getattr(self.runtime.engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:
        """Serve calls this when it stops the replica (after in-flight requests had their grace period)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.state.draining = True
        self.runtime.close()
        if self._stop_metrics is not None:
            self._stop_metrics()


# ---------------------------------------------------------------------------------------- ingress


class TenantKeys:
    """``auth=keys`` at the ingress: the gRPC server's key check (:mod:`deft_server.tenants_auth`)
    against the keys of the registry the replicas share, opened at the first call."""

    def __init__(self, data_dir: str, registry: str | None) -> None:
        self.data_dir, self.registry = data_dir, registry
        self._store: AdapterStore | None = None
        self._resolver: KeyResolver | None = None

    async def tenant(self, metadata: Any) -> tuple[Tenant | None, str]:
        """``(tenant, "")`` for a valid key in ``metadata``, else ``(None, why it is refused)``."""
        key, refusal = bearer_key([value for name, value in metadata or () if name == "authorization"])
        if refusal:
            return None, refusal
        if self._resolver is None:
            self._store = await asyncio.to_thread(open_store, Path(self.data_dir), self.registry)
            self._resolver = KeyResolver(self._store)
        tenant = await asyncio.to_thread(self._resolver.resolve, key)
        return (tenant, "") if tenant is not None else (None, INVALID_KEY)

    def __del__(self) -> None:
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()


class DeftIngress:
    """Serve's gRPC entry point for ``deft.v1``: picks the routing id, forwards, maps the outcome."""

    def __init__(
        self,
        replicas: DeploymentHandle,
        token: str | None = None,
        upload_limits: UploadLimits | None = None,
        routing: str = "affinity",
        keys: TenantKeys | None = None,
    ):
        self.replicas = replicas
        self.affinity = routing == "affinity"
        self.token = BearerToken(token) if token else None
        self.keys = keys
        self.upload_limits = upload_limits or ServerSettings.model_validate({}).upload_limits()

    def _routing_id(self, request: generation_pb2.GenerateRequest, tenant: Tenant | None) -> str:
        return request_set_id(request, tenant) if self.affinity else ""

    async def _caller(self, context: Any) -> tuple[Tenant | None, Failure | None]:
        """Who the call acts for (None: no tenant keys), or why it is refused (UNAUTHENTICATED)."""
        metadata = context.invocation_metadata() if context is not None else ()
        if self.keys is not None:
            tenant, refusal = await self.keys.tenant(metadata)
        elif self.token is not None and context is not None:
            tenant, refusal = None, self.token.refusal(metadata) or ""
        else:
            return None, None
        return tenant, (Failure(grpc.StatusCode.UNAUTHENTICATED.name, refusal, ()) if refusal else None)

    @staticmethod
    def _fail_unary(context: Any, replica: str, failure: Failure) -> None:
        """End a unary call with ``failure``: code, message and its trailing metadata (error details)."""
        context.set_code(failure.status_code)
        context.set_details(failure.details)
        context.set_trailing_metadata(
            [*failure.trailing_metadata, *([(REPLICA_KEY, replica)] if replica else [])]
        )

    async def GenerateOnce(
        self, request: generation_pb2.GenerateRequest, grpc_context: Any = None
    ) -> generation_pb2.GenerateResponse:
        tenant, denied = await self._caller(grpc_context)
        if denied is not None:
            self._fail_unary(grpc_context, "", denied)
            return generation_pb2.GenerateResponse()
        handle = self.replicas.options(
            method_name="generate_once", multiplexed_model_id=self._routing_id(request, tenant)
        )
        replica, outcome = await handle.remote(request.SerializeToString(), tenant)
        if isinstance(outcome, Failure):
            self._fail_unary(grpc_context, replica, outcome)
            return generation_pb2.GenerateResponse()
        if grpc_context is not None:
            grpc_context.set_trailing_metadata([(REPLICA_KEY, replica)])
        return generation_pb2.GenerateResponse.FromString(outcome)

    async def Generate(
        self, request: generation_pb2.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        tenant, denied = await self._caller(grpc_context)
        if denied is not None:
            _fail_stream(grpc_context, denied)
        handle = self.replicas.options(
            method_name="generate", multiplexed_model_id=self._routing_id(request, tenant), stream=True
        )
        events = cast(DeploymentResponseGenerator, handle.remote(request.SerializeToString(), tenant))
        async for kind, value in events:
            if kind == "replica":
                if grpc_context is not None:  # sent with the first event, kept to the end
                    grpc_context.set_trailing_metadata([(REPLICA_KEY, value)])
            elif kind == "event":
                yield generation_pb2.GenerateEvent.FromString(value)
            else:
                _fail_stream(grpc_context, value)

    async def _adapter_call(self, method: str, request: Any, context: Any, reply_type: Any) -> Any:
        tenant, denied = await self._caller(context)
        if denied is not None:
            self._fail_unary(context, "", denied)
            return reply_type()
        handle = self.replicas.options(method_name="adapter_call")
        replica, outcome = await handle.remote(method, request.SerializeToString(), tenant)
        if isinstance(outcome, Failure):
            self._fail_unary(context, replica, outcome)
            return reply_type()
        return reply_type.FromString(outcome)

    async def ListAdapters(self, request: Any, grpc_context: Any = None) -> adapters_pb2.ListAdaptersResponse:
        return await self._adapter_call(
            "ListAdapters", request, grpc_context, adapters_pb2.ListAdaptersResponse
        )

    async def GetAdapter(self, request: Any, grpc_context: Any = None) -> adapters_pb2.Adapter:
        return await self._adapter_call("GetAdapter", request, grpc_context, adapters_pb2.Adapter)

    async def DeleteAdapter(
        self, request: Any, grpc_context: Any = None
    ) -> adapters_pb2.DeleteAdapterResponse:
        return await self._adapter_call(
            "DeleteAdapter", request, grpc_context, adapters_pb2.DeleteAdapterResponse
        )

    async def RegisterAdapter(self, request_stream: Any, grpc_context: Any = None) -> adapters_pb2.Adapter:
        """Client streaming: gather the chunks (bounded as ``deft serve`` bounds them), then one replica registers."""
        tenant, denied = await self._caller(grpc_context)
        if denied is not None:
            self._fail_unary(grpc_context, "", denied)
            return adapters_pb2.Adapter()
        chunks: list[bytes] = []
        received = 0
        try:  # the replica's own bounds, applied here too, so nothing unbounded is buffered
            async for chunk in bounded_chunks(request_stream, self.upload_limits):
                received += len(chunk.data)
                if received > self.upload_limits.max_bytes:
                    raise UploadTooLarge(
                        f"the upload is above this server's limit of {self.upload_limits.max_bytes} bytes "
                        "(deploy with a larger max_upload_size)"
                    )
                chunks.append(chunk.SerializeToString())
            if not chunks:
                raise InvalidRequest("the first RegisterAdapterChunk must carry the header (name and format)")
        except Exception as e:
            self._fail_unary(grpc_context, "", Failure.of(e))
            return adapters_pb2.Adapter()
        replica, outcome = await self.replicas.options(method_name="register_adapter").remote(chunks, tenant)
        if isinstance(outcome, Failure):
            self._fail_unary(grpc_context, replica, outcome)
            return adapters_pb2.Adapter()
        return adapters_pb2.Adapter.FromString(outcome)


class StreamFailed(Exception):
    """Ends a streamed call; Serve reports it with the code set on the gRPC context just before."""


def _fail_stream(context: Any, failure: Failure) -> NoReturn:
    if context is not None:
        context.set_code(failure.status_code)
        context.set_details(failure.details)
    raise StreamFailed(failure.details)


# ---------------------------------------------------------------------------------------- application


def build_app(args: Mapping[str, Any]) -> Any:
    """The Serve application: ``serve run deft_server.ray_app:build_app key=value …`` or a config file.

    Keys of :data:`DEPLOYMENT_ARGS` configure the deployments; every other key is a ``deft serve``
    setting (``model``, ``registry``, ``data_dir``, ``cache_dir``, ``device``, ``max_active``, …), validated
    here and handed to each replica.
    """
    args = dict(args)
    num_replicas = int(args.pop("num_replicas", 2))
    max_adapter_sets = int(args.pop("max_adapter_sets", 16))
    num_cpus = float(args.pop("num_cpus", 1))
    num_gpus = float(args.pop("num_gpus", 0))
    torch_threads = int(args.pop("torch_threads", 1))
    routing = str(args.pop("routing", "affinity"))
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing={routing!r}: must be one of {', '.join(ROUTING_MODES)}")
    max_ongoing = args.pop("max_ongoing_requests", None)
    settings = {key: str(value) for key, value in args.items() if value is not None}
    checked = ServerSettings.model_validate(settings)  # fail at deploy time, not in every replica
    threads = str(max(torch_threads, 1))
    replica = serve.deployment(
        name="DeftReplica",
        num_replicas=num_replicas,
        max_ongoing_requests=int(max_ongoing) if max_ongoing is not None else checked.max_active,
        graceful_shutdown_timeout_s=checked.grace_period,
        ray_actor_options={
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
        },
    )(DeftReplica).bind(settings, max_adapter_sets, torch_threads)
    token = checked.token.get_secret_value() if checked.token else None
    if checked.tls_client_tenants is not None:
        raise ValueError("tls_client_tenants: client certificates do not reach a Ray Serve ingress")
    keys = TenantKeys(str(checked.data_dir), checked.registry) if checked.auth_mode == "keys" else None
    ingress = serve.deployment(
        name="DeftIngress",
        num_replicas=1,
        max_ongoing_requests=max(1000, num_replicas * checked.max_queue),
        ray_actor_options={"num_cpus": 0},
    )(DeftIngress)
    return ingress.bind(replica, token, checked.upload_limits(), routing, keys)
