"""Which requests go into the next denoiser forward: pure planning, no tensors, unit-tested alone.

Policy (step-level continuous batching):

- Only requests that share a latent shape (a *bucket*) can share a forward; their timesteps and
  adapters may all differ.
- Within one tenant, the request that has waited longest since it last ran (ties: earliest arrival)
  picks the bucket and always gets in; others of that bucket follow in the same order while their rows
  fit ``max_rows``. A request left out this time is first in line next time, so nothing starves, and a
  short request is never held behind a long one: both advance one step per forward
  (:func:`plan_batch`).
- Across tenants (:class:`BatchPlanner`), the rows of each forward are shared by weighted fair
  queuing over *row-steps*: every tenant has a virtual time, the row-steps it was given divided by
  its weight; the tenant furthest behind leads (picks the bucket), and the forward is filled one
  request at a time from whichever tenant is then furthest behind. A tenant coming back after being
  idle re-enters at most ``credit`` row-steps behind the others (what an idle tenant may bank, like a
  CPU scheduler's sleeper credit), so a light tenant's request runs ahead of a flood for a bounded
  while and then shares equally; a tenant that never pauses banks nothing.
- ``mixed_rows`` caps the rows of a forward while several tenants have requests ready; only the lead
  tenant, while it is still the furthest behind, adds more of its own requests (up to ``max_rows``), so
  a light tenant's burst shares forwards as it would alone. Where each row costs the same compute (a
  CPU), a light tenant's step is then as cheap as when it runs alone, at little cost in throughput;
  where extra rows are nearly free (a GPU), leave it at ``max_rows``.

- ``order`` says who fills a forward after its lead (the longest-waiting request, which always gets
  in, so nothing starves whatever the order): ``"longest-wait"`` (the default: round-robin over every
  active request, all advance at the same pace), ``"arrival"`` (earliest admitted first: the requests
  that fit a forward run back to back, the others wait their turn, like continuous batching of LLM
  servers) or ``"fewest-remaining"`` (fewest denoising steps left first: short requests finish first).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

BatchOrder = Literal["longest-wait", "arrival", "fewest-remaining"]
BATCH_ORDERS: tuple[BatchOrder, ...] = ("longest-wait", "arrival", "fewest-remaining")


@dataclass(frozen=True)
class Candidate:
    """A request that is ready to take a denoising step."""

    request_id: str
    bucket: Hashable
    rows: int  # rows it adds to the forward: num_images × (2 with CFG, else 1)
    arrival: int  # admission sequence number (FCFS)
    last_scheduled: int  # engine iteration of its last step, -1 if never
    tenant: str = ""
    weight: float = 1.0  # the tenant's fair-share weight (> 0)
    remaining: int = 0  # denoising steps left


def _waited(c: Candidate) -> tuple[int, int]:
    return (c.last_scheduled, c.arrival)


_ORDER_KEYS: dict[BatchOrder, Callable[[Candidate], tuple[int, ...]]] = {
    "longest-wait": _waited,
    "arrival": lambda c: (c.arrival,),
    "fewest-remaining": lambda c: (c.remaining, c.arrival),
}


def check_order(order: str) -> None:
    if order not in _ORDER_KEYS:
        raise ValueError(f"unknown batch order {order!r}; expected one of {', '.join(BATCH_ORDERS)}")


def ordered(candidates: Sequence[Candidate], order: BatchOrder = "longest-wait") -> list[Candidate]:
    """The longest-waiting candidate first (it always runs), then the rest in ``order``."""
    check_order(order)
    if not candidates:
        return []
    head = min(candidates, key=_waited)
    return [head, *sorted((c for c in candidates if c is not head), key=_ORDER_KEYS[order])]


def plan_batch(
    candidates: Sequence[Candidate], max_rows: int, order: BatchOrder = "longest-wait"
) -> list[str]:
    """Request ids for the next forward (empty when nothing is ready), ignoring tenants."""
    ordered_ = ordered(candidates, order)
    if not ordered_:
        return []
    _check_head(ordered_[0], max_rows)
    bucket = ordered_[0].bucket
    chosen: list[str] = []
    used = 0
    for c in ordered_:
        if c.bucket != bucket or used + c.rows > max_rows:
            continue
        chosen.append(c.request_id)
        used += c.rows
    return chosen


def _check_head(head: Candidate, max_rows: int) -> None:
    if head.rows > max_rows:  # admission should have refused it
        raise ValueError(f"request {head.request_id} needs {head.rows} rows > max_rows={max_rows}")


class BatchPlanner:
    """:func:`plan_batch` made fair across tenants (see the module docstring); keeps the tenants'
    virtual times between forwards. Engine-thread only."""

    def __init__(
        self,
        max_rows: int,
        *,
        mixed_rows: int | None = None,
        credit: float = 0.0,
        order: BatchOrder = "longest-wait",
    ) -> None:
        if mixed_rows is not None and mixed_rows < 1:
            raise ValueError(f"mixed_rows must be ≥ 1, got {mixed_rows}")
        check_order(order)  # now, not at the first forward
        self.max_rows, self.credit, self.order = max_rows, credit, order
        self.mixed_rows = min(mixed_rows or max_rows, max_rows)
        self.virtual = 0.0  # never decreases: the least virtual time among tenants with work
        self.times: dict[str, float] = {}  # tenant → weighted row-steps given (virtual time)

    def plan(self, candidates: Sequence[Candidate]) -> list[str]:
        """Request ids for the next forward; charges the tenants for the rows they get."""
        by_tenant: dict[str, list[Candidate]] = {}
        for c in candidates:
            by_tenant.setdefault(c.tenant, []).append(c)
        lanes = {t: ordered(cs, self.order) for t, cs in by_tenant.items()}
        floor = self.virtual - self.credit  # an idle tenant re-enters at most `credit` behind
        times = {t: max(self.times.get(t, floor), floor) for t in lanes}
        alone = len(lanes) <= 1
        chosen = (
            plan_batch(candidates, self.max_rows, self.order) if alone else self._fill(lanes, dict(times))
        )
        picked = set(chosen)
        self._charge(times, [c for c in candidates if c.request_id in picked])
        return chosen

    def _fill(self, lanes: dict[str, list[Candidate]], times: dict[str, float]) -> list[str]:
        """One forward's requests, taken one at a time from the tenant furthest behind."""
        lead = min(lanes, key=lambda t: (times[t], _waited(lanes[t][0])))
        head = lanes[lead][0]
        _check_head(head, self.max_rows)
        limit = max(self.mixed_rows, head.rows)  # the lead's head always runs
        queues = {t: [c for c in cs if c.bucket == head.bucket] for t, cs in lanes.items()}
        chosen: list[str] = []
        used = 0

        def take(tenant: str, c: Candidate) -> None:
            nonlocal used
            queues[tenant].remove(c)
            chosen.append(c.request_id)
            used += c.rows
            times[tenant] += c.rows / c.weight

        while True:  # up to the cap: one request at a time from the tenant then furthest behind
            fitting = {t: [c for c in q if used + c.rows <= limit] for t, q in queues.items()}
            ready = [t for t, q in fitting.items() if q]
            if not ready:
                break
            tenant = min(ready, key=lambda t: (times[t], _waited(fitting[t][0])))
            take(tenant, fitting[tenant][0])
        # past the cap, the lead's own requests while it is still furthest behind: a light tenant's
        # burst shares one forward, as it would alone, instead of taking one forward per request
        while queues[lead] and lead == min((t for t, q in queues.items() if q), key=times.__getitem__):
            fits = [c for c in queues[lead] if used + c.rows <= self.max_rows]
            if not fits:
                break
            take(lead, fits[0])
        return chosen

    def _charge(self, times: dict[str, float], chosen: list[Candidate]) -> None:
        """Record the forward: the active tenants' (clamped) times plus what each was given."""
        self.times.update(times)
        for c in chosen:
            self.times[c.tenant] += c.rows / c.weight
        if times:
            self.virtual = max(self.virtual, min(self.times[t] for t in times))
        floor = self.virtual - self.credit  # a tenant this far behind re-enters at the floor anyway
        self.times = {t: v for t, v in self.times.items() if t in times or v > floor}


def admit_count(waiting: int, active: int, max_active: int) -> int:
    """How many waiting requests may become active now (FCFS, bounded concurrency)."""
    return max(0, min(waiting, max_active - active))
