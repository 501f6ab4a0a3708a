"""``--auth keys``: every call but health checks and reflection carries exactly one
``authorization: Bearer deft_…`` header naming a valid, unrevoked tenant key, else UNAUTHENTICATED.

The interceptor resolves the key to a :class:`~deft_server.tenants.Tenant` and runs the handler
inside :func:`~deft_server.tenants.acting_as` (the one way a handler learns its caller). Verified
keys are remembered for at most :data:`CACHE_TTL_S` (one second), so a revocation (``deft keys
revoke``, from any process on the registry's database) reaches every replica within a second while
a busy tenant costs one database look-up per second, not one per call. Failures are audited (at most
:data:`AUDIT_FAILURES_PER_S` entries a second, so a flood of bad keys cannot fill the disk).

:func:`auth_interceptors` picks the interceptor for ``--auth none | token | keys`` and refuses to
serve beyond loopback without authentication unless ``--insecure-no-auth`` is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import ipaddress
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from deft_server.auth import OPEN_PREFIXES, TokenAuth, _denying, rewrap
from deft_server.tenants import Tenant, acting_as, enter
from deft_server.tenants_mtls import SubjectResolver, acting_by_certificate, load_subject_map

from deft_runtime.errors import DeftError

if TYPE_CHECKING:
    from deft_server.config import ServerSettings
    from deft_server.store import AdapterStore

CACHE_TTL_S = 1.0
CACHE_ENTRIES = 4096
AUDIT_FAILURES_PER_S = 20
MISSING_KEY = (
    "this server requires a tenant key: pass token='deft_…' to the client, --token to the CLI, or set "
    "DEFT_TOKEN (an admin creates keys with `deft keys create TENANT`)"
)
INVALID_KEY = "the key is not valid (malformed, unknown or revoked); ask an admin for a key"
LOADING = "the server is still loading its model; retry in a moment"


class InsecureBind(DeftError):
    """``--auth none`` on a non-loopback address without ``--insecure-no-auth``."""


class KeyResolver:
    """Bearer token → tenant, with a cache of at most :data:`CACHE_TTL_S` (thread-safe)."""

    def __init__(self, store: AdapterStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[bytes, tuple[float, Tenant | None]] = {}  # sha256(token) → (expiry, tenant)
        self._audit_window = (0.0, 0)  # (second, failures audited in it)

    def resolve(self, token: str) -> Tenant | None:
        """The tenant of ``token``, or None (blocking on a cache miss: one database look-up)."""
        digest, now = hashlib.sha256(token.encode()).digest(), self._clock()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        tenant = self.store.keys.verify(token)
        with self._lock:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= CACHE_ENTRIES:
                    self._cache.clear()
            self._cache[digest] = (now + CACHE_TTL_S, tenant)
        if tenant is None:
            self._audit_failure(token, now)
        return tenant

    def _audit_failure(self, token: str, now: float) -> None:
        with self._lock:
            second, count = self._audit_window
            if int(now) != second:
                second, count = int(now), 0
            self._audit_window = (second, count + 1)
        if count < AUDIT_FAILURES_PER_S:
            key_id = token[5:17] if token.startswith("deft_") else ""  # the id part only, never the secret
            self.store.audit.record("auth.fail", key_id=key_id, result="invalid key")


def bearer_key(given: list[Any]) -> tuple[str, str]:
    """``(key, "")`` from a call's ``authorization`` values, or ``("", why it is refused)``."""
    if len(given) != 1:
        return "", MISSING_KEY if not given else "send exactly one authorization header"
    value = given[0] if isinstance(given[0], str) else ""
    if not value.startswith("Bearer "):
        return "", "the authorization header must read 'Bearer deft_…'"
    return value.removeprefix("Bearer "), ""


class KeyAuth(grpc.aio.ServerInterceptor):
    """The ``--auth keys`` interceptor; ``store()`` is the registry's store once loaded, else None."""

    def __init__(
        self, store: Callable[[], AdapterStore | None], subjects: dict[str, str] | None = None
    ) -> None:
        self._store = store
        self._resolver: KeyResolver | None = None
        self._subjects = subjects  # --tls-client-tenants: certificate subject → key id
        self._subject_resolver: SubjectResolver | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        given = [value for key, value in details.invocation_metadata or () if key == "authorization"]
        if not given and self._subjects is not None:
            return acting_by_certificate(handler, self._subject_resolver_now)
        key, refusal = bearer_key(given)
        if refusal:
            return _denying(handler, refusal)
        resolver = self._resolver_now()
        if resolver is None:
            return _denying(handler, LOADING, grpc.StatusCode.UNAVAILABLE)
        tenant = await asyncio.to_thread(resolver.resolve, key)
        return _denying(handler, INVALID_KEY) if tenant is None else _acting(handler, tenant)

    def _resolver_now(self) -> KeyResolver | None:
        if self._resolver is None and (store := self._store()) is not None:
            self._resolver = KeyResolver(store)
        return self._resolver

    def _subject_resolver_now(self) -> SubjectResolver | None:
        if self._subject_resolver is None and self._subjects is not None and (store := self._store()):
            self._subject_resolver = SubjectResolver(self._subjects, store)
        return self._subject_resolver


class HttpKeyCheck:
    """The HTTP API's ``--auth keys`` dependency: the same key check, then the rest of the request
    (its task) acts as the key's tenant. ``store()`` as for :class:`KeyAuth`."""

    def __init__(self, store: Callable[[], AdapterStore | None]) -> None:
        self._store = store
        self._resolver: KeyResolver | None = None

    async def __call__(self, request: Any) -> None:
        from deft_server.http_api.errors import StatusError

        def refusal(code: grpc.StatusCode, message: str) -> StatusError:
            return StatusError.http_only(code, message, code.name)

        given = request.headers.getlist("authorization")
        if len(given) != 1 or not given[0].startswith("Bearer "):
            raise refusal(grpc.StatusCode.UNAUTHENTICATED, MISSING_KEY if not given else INVALID_KEY)
        if self._resolver is None and (store := self._store()) is not None:
            self._resolver = KeyResolver(store)
        if self._resolver is None:
            raise refusal(grpc.StatusCode.UNAVAILABLE, LOADING)
        tenant = await asyncio.to_thread(self._resolver.resolve, given[0].removeprefix("Bearer "))
        if tenant is None:
            raise refusal(grpc.StatusCode.UNAUTHENTICATED, INVALID_KEY)
        enter(tenant)  # this request's task: the endpoint and the threads it starts see it


def _acting(handler: grpc.RpcMethodHandler, tenant: Tenant) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour run as ``tenant``."""
    return rewrap(handler, lambda behaviour: _as(tenant, behaviour))


def _as(tenant: Tenant, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            with acting_as(tenant):
                async for message in behaviour(request, context):
                    yield message

        return stream

    async def call(request: Any, context: Any) -> Any:
        with acting_as(tenant):
            return await behaviour(request, context)

    return call


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_interceptors(
    settings: ServerSettings, store: Callable[[], AdapterStore | None]
) -> list[grpc.aio.ServerInterceptor] | None:
    """The interceptors of ``--auth`` (None for none); raises InsecureBind for an open public port."""
    mode = settings.auth_mode
    if mode == "keys":
        subjects = load_subject_map(settings.tls_client_tenants) if settings.tls_client_tenants else None
        return [KeyAuth(store, subjects)]
    if mode == "token":
        assert settings.token is not None
        return [TokenAuth(settings.token.get_secret_value())]
    if not is_loopback(settings.host) and not settings.insecure_no_auth:
        raise InsecureBind(
            f"refusing to serve {settings.host} without authentication: use --auth keys (tenant keys) or "
            "--auth token --token TOKEN, listen on 127.0.0.1, or pass --insecure-no-auth to accept the risk"
        )
    return None
