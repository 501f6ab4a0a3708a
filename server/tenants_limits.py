"""Per-tenant admission limits at Generate, on this replica: concurrent requests and a request rate.

``max_concurrent`` counts a tenant's requests queued or running on this server; ``rate`` is a token
bucket (``rate`` tokens per second, a burst of ``max(1, rate)``). Both refuse with
:class:`~deft_server.tenants.QuotaExceeded` (RESOURCE_EXHAUSTED) naming the quota and its value, with
how long to wait as the status's ``RetryInfo``. Limits are per replica: N replicas behind a load
balancer admit up to N times a tenant's limits (``README.md`` says so).

Locking: ``_lock`` is a leaf guarding the counters and buckets; nothing calls out while holding it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from deft_server.tenants import QuotaExceeded, Tenant


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    tokens: float
    last: float

    @property
    def burst(self) -> float:
        return max(1.0, self.rate)

    def take(self, now: float) -> float:
        """Take one token: 0 when taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class TenantLimiter:
    """Admission of each tenant's requests on this server (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, tenant: Tenant) -> Callable[[], None]:
        """Count one request of ``tenant`` in (or raise QuotaExceeded); returns its release (idempotent)."""
        limits = tenant.limits
        with self._lock:
            running = self._running.get(tenant.id, 0)
            if limits.max_concurrent is not None and running >= limits.max_concurrent:
                raise QuotaExceeded(
                    f"quota max_concurrent={limits.max_concurrent} reached: this tenant has {running} "
                    "requests queued or running on this server; retry when one has finished",
                    retry_after_s=1.0,
                )
            wait = self._take_token(tenant)
            if wait:
                raise QuotaExceeded(
                    f"quota rate={limits.rate:g}/s exceeded: retry in {wait:.2f}s", retry_after_s=wait
                )
            self._running[tenant.id] = running + 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                left = self._running.get(tenant.id, 1) - 1
                if left:
                    self._running[tenant.id] = left
                else:
                    self._running.pop(tenant.id, None)

        return release

    def _take_token(self, tenant: Tenant) -> float:
        rate = tenant.limits.rate
        if rate is None:
            self._buckets.pop(tenant.id, None)
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(tenant.id)
        if bucket is None or bucket.rate != rate:  # new, or the key's rate was updated
            bucket = self._buckets[tenant.id] = TokenBucket(rate, max(1.0, rate), now)
        return bucket.take(now)

    def running(self, tenant_id: str) -> int:
        with self._lock:
            return self._running.get(tenant_id, 0)
