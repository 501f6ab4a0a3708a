"""The admission queue, fair across tenants: start-time fair queuing, weighted. Pure, no tensors.

Each tenant has its own FIFO. A request of cost ``c`` (its work: images × steps) queued by tenant
``t`` of weight ``w`` gets the virtual start tag ``S = max(V, F[t])`` and advances the tenant's finish
tag ``F[t] = S + c / w``; ``V`` is the start tag of the request dequeued last. :meth:`FairQueue.pop`
takes the head with the smallest start tag (ties: the earlier arrival). So:

- one tenant alone is served first come, first served (its tags only grow);
- a tenant that queued a burst of ``n`` requests first does not delay another tenant's request
  behind all ``n``: the newcomer's tag starts at the current ``V``, so it is admitted after at most
  about ``w_A / w_B`` of the burst's requests (weighted by cost);
- a tenant idle for a while gets no banked credit (``max(V, F[t])``), so it cannot flood later.

Thread-safe: ``_lock`` is a leaf, never held while calling out (``remove_if``'s predicate must be a
plain attribute test).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Lane(Generic[T]):
    finish: float = 0.0
    weight: float = 1.0  # of the tenant's latest queued request
    items: deque[tuple[float, int, T]] = field(default_factory=deque)  # (start tag, arrival, item)


class FairQueue(Generic[T]):
    """Per-tenant FIFOs served by weighted start-time fair queuing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lane[T]] = {}
        self._virtual = 0.0
        self._arrivals = itertools.count()
        self._size = 0

    def put(self, item: T, tenant: str = "", weight: float = 1.0, cost: float = 1.0) -> None:
        if not weight > 0 or not cost > 0:
            raise ValueError(f"weight and cost must be > 0, got {weight} and {cost}")
        with self._lock:
            lane = self._lanes.setdefault(tenant, _Lane())
            start = max(self._virtual, lane.finish)
            lane.finish = start + cost / weight
            lane.weight = weight
            lane.items.append((start, next(self._arrivals), item))
            self._size += 1

    def pop(self, skip: AbstractSet[str] = frozenset()) -> T | None:
        """The next item to admit, or None when empty; ``skip``: tenants whose items stay queued."""
        with self._lock:
            heads = [
                (lane.items[0][:2], tenant)
                for tenant, lane in self._lanes.items()
                if lane.items and tenant not in skip
            ]
            if not heads:
                return None
            (start, _), tenant = min(heads)
            lane = self._lanes[tenant]
            _, _, item = lane.items.popleft()
            self._virtual = max(self._virtual, start)
            if not lane.items and lane.finish <= self._virtual:
                del self._lanes[tenant]  # nothing to remember: its next request starts at V anyway
            self._size -= 1
            return item

    def waiting_weights(self) -> dict[str, float]:
        """The tenants with queued items, and their weights."""
        with self._lock:
            return {tenant: lane.weight for tenant, lane in self._lanes.items() if lane.items}

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out every queued item ``predicate`` selects (e.g. cancelled requests), keeping order."""
        removed: list[T] = []
        with self._lock:
            for lane in self._lanes.values():
                kept: deque[tuple[float, int, T]] = deque()
                for entry in lane.items:
                    if predicate(entry[2]):
                        removed.append(entry[2])
                    else:
                        kept.append(entry)
                lane.items = kept
            self._size -= len(removed)
        return removed

    def __len__(self) -> int:
        with self._lock:
            return self._size
