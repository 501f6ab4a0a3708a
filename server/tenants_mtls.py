"""Mutual TLS: ``--tls-client-ca`` makes the server demand a client certificate signed by that CA, and
``--tls-client-tenants FILE`` (with ``--auth keys``) lets a verified certificate stand in for a key.

The file is a JSON object from certificate subject to key id (``deft keys list`` shows ids)::

    {"CN=render-farm,O=Acme": "3f9c1a2b7d4e", "CN=alice": "8a7b6c5d4e3f"}

A subject is matched against the certificate's subject as gRPC reports it (RFC 2253, most specific
part first: ``CN=render-farm,O=Acme``) and against ``CN=<its common name>`` alone. A call that carries
no ``authorization`` header then acts as the mapped key's tenant with that key's rights, quotas and
weight; revoking the key (``deft keys revoke``) revokes the certificate's access within a second, like
a bearer key's. A call with a bearer key is checked as before, certificate or not. The certificate
itself is verified by TLS before any handler runs: an unsigned or expired one never connects.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from deft_server.auth import rewrap
from deft_server.tenants import Tenant, acting_as

from deft_runtime.errors import DeftError

if TYPE_CHECKING:
    from deft_server.store import AdapterStore

CACHE_TTL_S = 1.0  # as for bearer keys: a revocation reaches every replica within a second
MAX_SUBJECTS = 10_000
UNMAPPED = (
    "this client certificate is not mapped to a tenant and no key was sent: send 'authorization: Bearer "
    "deft_…' or ask an admin to map the certificate's subject in --tls-client-tenants"
)


class SubjectMapError(DeftError, ValueError):
    """``--tls-client-tenants`` is unreadable or not a JSON object of subject → key id."""


def load_subject_map(path: Path) -> dict[str, str]:
    """The subject → key id map of ``path`` (checked at start-up, so a typo stops the server at once)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SubjectMapError(f"cannot read --tls-client-tenants {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SubjectMapError(f"--tls-client-tenants {path} is not JSON: {e}") from e
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in data.items()
    ):
        raise SubjectMapError(
            f'--tls-client-tenants {path} must be a JSON object of subject to key id, e.g. {{"CN=alice": '
            '"3f9c1a2b7d4e"}'
        )
    if len(data) > MAX_SUBJECTS:
        raise SubjectMapError(
            f"--tls-client-tenants {path} maps {len(data)} subjects; at most {MAX_SUBJECTS}"
        )
    return {subject.strip(): key_id.strip() for subject, key_id in data.items()}


def certificate_subjects(auth_context: dict[str, list[bytes]]) -> list[str]:
    """The names a verified peer certificate goes by: its full subject, then ``CN=<common name>``."""
    subjects = [v.decode(errors="replace") for v in auth_context.get("x509_subject", [])]
    subjects += [f"CN={v.decode(errors='replace')}" for v in auth_context.get("x509_common_name", [])]
    return subjects


class SubjectResolver:
    """Certificate subject → the mapped key's tenant (None: unmapped, unknown or revoked key), cached 1 s."""

    def __init__(
        self, subjects: dict[str, str], store: AdapterStore, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.subjects = subjects
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Tenant | None]] = {}  # key id → (expiry, tenant)

    def resolve(self, names: list[str]) -> Tenant | None:
        key_id = next((self.subjects[n] for n in names if n in self.subjects), None)
        if key_id is None:
            return None
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        record = self.store.keys.find(key_id)
        tenant = None if record is None or record.revoked else record.tenant_of()
        with self._lock:
            self._cache[key_id] = (now + CACHE_TTL_S, tenant)
        return tenant


def acting_by_certificate(
    handler: grpc.RpcMethodHandler, resolver: Callable[[], SubjectResolver | None]
) -> grpc.RpcMethodHandler:
    """``handler`` run as the tenant its caller's certificate maps to, or refused UNAUTHENTICATED."""
    return rewrap(handler, lambda behaviour: _certified(resolver, behaviour))


async def _tenant_of(resolver: Callable[[], SubjectResolver | None], context: Any) -> Tenant:
    current = resolver()
    if current is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading; retry in a moment")
    assert current is not None
    tenant = await asyncio.to_thread(current.resolve, certificate_subjects(context.auth_context()))
    if tenant is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNMAPPED)
    assert tenant is not None
    return tenant


def _certified(resolver: Callable[[], SubjectResolver | None], behaviour: Callable[..., Any]) -> Any:
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            with acting_as(await _tenant_of(resolver, context)):
                async for message in behaviour(request, context):
                    yield message

        return stream

    async def call(request: Any, context: Any) -> Any:
        with acting_as(await _tenant_of(resolver, context)):
            return await behaviour(request, context)

    return call
