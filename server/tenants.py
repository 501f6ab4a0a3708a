"""Tenants: who a call acts for, what it may see, and the one place that names an adapter in the pool.

A *tenant* is a string id chosen by an operator (``deft keys create TENANT``); every key belongs to
one. Adapters have an ``owner``: the tenant that registered them, or :data:`PUBLIC` (registered by
an admin with ``--public``, or by anyone on a server without ``--auth keys``). A tenant sees its own
adapters and the public ones; its own shadow a public adapter of the same name. Another tenant's
adapter does not exist for it: look-ups ask the store only for ``owner IN (tenant, PUBLIC)``, so a
name another tenant holds and a name nobody holds run the same query and fail the same way.

The resolved tenant of a call travels in one context variable (:func:`current_tenant`), set by the
authentication interceptor around the handler (and copied into worker threads by
``asyncio.to_thread``). Without ``--auth keys`` every call acts as :data:`OPEN_TENANT`: an admin whose
registrations are public, which is exactly the single shared namespace of earlier versions.

Pool names: the adapter pool and the engine know an adapter as ``owner/name``
(:func:`pool_name`); tenant ids and adapter names never contain ``/``, so two tenants' ``dog``
never collide and a pool name always splits back into its parts.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from dataclasses import dataclass

from deft_runtime.errors import DeftError, InvalidRequest, shorten

#: the owner of public adapters; not a valid tenant id (tenant ids start with a letter or digit)
PUBLIC = "_public"
MAX_TENANT_CHARS = 64
_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class QuotaExceeded(DeftError):
    """A tenant's quota refuses the call (RESOURCE_EXHAUSTED); ``retry_after_s`` when waiting helps."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotPermitted(DeftError):
    """The caller's key may not do this (PERMISSION_DENIED): e.g. public adapters need an admin key."""


@dataclass(frozen=True)
class Limits:
    """A key's quotas (None: unlimited) and its fair-share weight."""

    max_adapters: int | None = None
    max_adapter_bytes: int | None = None
    max_concurrent: int | None = None
    rate: float | None = None  # requests per second (token bucket, burst max(1, rate))
    weight: float = 1.0

    def check_storage(self, count: int, size: int, adding: int) -> None:
        """Refuse one more adapter of ``adding`` bytes to a tenant holding ``count`` adapters of ``size``."""
        if self.max_adapters is not None and count + 1 > self.max_adapters:
            raise QuotaExceeded(
                f"quota max_adapters={self.max_adapters} reached: this tenant has {count} adapters; "
                "delete one first or ask an admin for a larger quota"
            )
        if self.max_adapter_bytes is not None and size + adding > self.max_adapter_bytes:
            raise QuotaExceeded(
                f"quota max_adapter_bytes={self.max_adapter_bytes} exceeded: this tenant's adapters hold "
                f"{size} bytes and this upload has {adding}; delete adapters first or ask an admin"
            )


@dataclass(frozen=True)
class Tenant:
    """Who a call acts for: the tenant id, the key that proved it, and that key's rights."""

    id: str
    key_id: str = ""
    admin: bool = False
    limits: Limits = Limits()

    @property
    def visible_owners(self) -> tuple[str, ...]:
        """Whose adapters a look-up by name may find, in order of preference."""
        return (self.id, PUBLIC) if self.id != PUBLIC else (PUBLIC,)

    def owner_for(self, public: bool) -> str:
        """The owner of an adapter this tenant registers (``public`` needs an admin key)."""
        if public and not self.admin:
            raise NotPermitted("only an admin key can register public adapters; leave out --public")
        return PUBLIC if public else self.id


#: the caller on a server without ``--auth keys``: one shared, public namespace, as before tenants
OPEN_TENANT = Tenant(id=PUBLIC, admin=True)
_current: contextvars.ContextVar[Tenant] = contextvars.ContextVar("deft_tenant", default=OPEN_TENANT)


def current_tenant() -> Tenant:
    """The tenant the running call acts for (:data:`OPEN_TENANT` outside an authenticated call)."""
    return _current.get()


def enter(tenant: Tenant) -> None:
    """Act as ``tenant`` for the rest of the running task (an HTTP request's, which ends with it)."""
    _current.set(tenant)


@contextlib.contextmanager
def acting_as(tenant: Tenant) -> Iterator[Tenant]:
    """Run the block as ``tenant`` (the interceptor wraps each handler in this)."""
    token = _current.set(tenant)
    try:
        yield tenant
    finally:
        _current.reset(token)


def validate_tenant_id(tenant: str) -> str:
    if len(tenant) > MAX_TENANT_CHARS or not _TENANT_ID.fullmatch(tenant):
        raise InvalidRequest(
            f"tenant id {shorten(tenant)} is not valid: use 1-{MAX_TENANT_CHARS} letters, digits, '.', "
            "'_' or '-', starting with a letter or digit"
        )
    return tenant


def pool_name(owner: str, name: str) -> str:
    """The adapter pool's (and the engine's) name of ``owner``'s adapter ``name``."""
    return f"{owner}/{name}"


def split_pool_name(qualified: str) -> tuple[str, str]:
    """``(owner, name)`` of a pool name; a bare name is a public adapter's."""
    owner, sep, name = qualified.partition("/")
    return (owner, name) if sep else (PUBLIC, qualified)
