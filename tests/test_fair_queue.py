"""The fair admission queue (pure): FIFO for one tenant, a burst cannot starve another tenant,
weights scale the shares, idle tenants bank no credit, cancelled entries leave in order."""

from __future__ import annotations

import pytest

from deft_runtime.engine import GenerationRequest
from deft_runtime.engine.fair_queue import FairQueue
from deft_runtime.engine.observer import NullObserver
from deft_runtime.engine.scheduler import RequestScheduler


def _drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


def test_one_tenant_is_first_come_first_served():
    queue: FairQueue[str] = FairQueue()
    for i, cost in enumerate([5, 1, 3, 1]):
        queue.put(f"r{i}", "a", cost=cost)
    assert _drain(queue) == ["r0", "r1", "r2", "r3"] and len(queue) == 0


def test_with_a_burst_queued_first_the_other_tenant_is_admitted_before_the_backlog_drains():
    queue: FairQueue[str] = FairQueue()
    for i in range(30):  # A offers 10x B's load, all queued before B's first request
        queue.put(f"A{i}", "A")
    for i in range(3):
        queue.put(f"B{i}", "B")
    order = _drain(queue)
    positions = [order.index(f"B{i}") for i in range(3)]
    assert positions == [1, 3, 5]  # alternating from the start, not after A's 30
    assert [x for x in order if x.startswith("A")] == [f"A{i}" for i in range(30)]  # A keeps its order


@pytest.mark.parametrize("weight", [2.0, 3.0])
def test_weights_scale_the_share(weight):
    queue: FairQueue[str] = FairQueue()
    for i in range(60):
        queue.put(f"A{i}", "A")
        queue.put(f"B{i}", "B", weight=weight)
    first = _drain(queue)[:40]
    b, a = sum(x.startswith("B") for x in first), sum(x.startswith("A") for x in first)
    assert b / a == pytest.approx(weight, rel=0.15)


def test_cost_counts_work_not_requests():
    queue: FairQueue[str] = FairQueue()
    for i in range(10):
        queue.put(f"big{i}", "A", cost=4)
    for i in range(8):
        queue.put(f"small{i}", "B", cost=1)
    first = _drain(queue)[:10]
    assert sum(x.startswith("small") for x in first) == 8  # four small requests per big one


def test_an_idle_tenant_banks_no_credit():
    queue: FairQueue[str] = FairQueue()
    queue.put("B0", "B")
    assert queue.pop() == "B0"
    for i in range(10):
        queue.put(f"A{i}", "A")
    for _ in range(6):
        queue.pop()
    for i in range(5):  # B comes back after being idle while A ran: no burst ahead of A
        queue.put(f"B{i + 1}", "B")
    order = _drain(queue)
    assert order[:4] == ["A6", "B1", "A7", "B2"] or order[:4] == ["B1", "A6", "B2", "A7"]


def test_remove_if_keeps_the_rest_in_order_and_rejects_bad_weights():
    queue: FairQueue[str] = FairQueue()
    for i in range(6):
        queue.put(f"A{i}", "A")
    assert queue.remove_if(lambda x: x in ("A1", "A4")) == ["A1", "A4"] and len(queue) == 4
    assert _drain(queue) == ["A0", "A2", "A3", "A5"]
    with pytest.raises(ValueError):
        queue.put("x", "A", weight=0)


class _Family:
    def rows_for(self, request: GenerationRequest) -> int:
        assert request.guidance_scale is not None
        return request.num_images * (2 if request.guidance_scale > 1 else 1)


def _request(tenant: str, i: int, weight: float = 1.0) -> GenerationRequest:
    return GenerationRequest(
        f"{tenant}{i}", num_inference_steps=4, guidance_scale=5.0, seed=i, tenant=tenant, weight=weight
    )


def test_the_scheduler_admits_the_light_tenant_before_the_floods_backlog():
    """The fairness benchmark's scenario as a bounded ordering test: A's burst is queued first, B's
    few requests come after, and only four requests may run at once."""
    scheduler = RequestScheduler(
        _Family(), None, None, NullObserver(),  # type: ignore[arg-type]
        max_rows=16, max_active=4, max_queue=100, static=False, retry_wait_s=0.01,
    )  # fmt: skip
    for i in range(30):
        scheduler.submit(_request("A", i), None)
    for i in range(2):
        scheduler.submit(_request("B", i), None)
    admitted = [r.request.prompt for r in scheduler.schedule().admitted]
    assert admitted == ["A0", "B0", "A1", "B1"]  # 28 of A's still wait
    assert scheduler.waiting == 32


def test_the_scheduler_is_first_come_first_served_for_one_tenant():
    scheduler = RequestScheduler(
        _Family(), None, None, NullObserver(),  # type: ignore[arg-type]
        max_rows=16, max_active=5, max_queue=100, static=False, retry_wait_s=0.01,
    )  # fmt: skip
    for i in range(5):
        scheduler.submit(_request("", i), None)
    assert [r.request.prompt for r in scheduler.schedule().admitted] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("newcomer_slots", [0, 1])
def test_a_tenant_with_nothing_in_flight_gets_a_newcomer_slot_while_a_flood_holds_every_slot(newcomer_slots):
    scheduler = RequestScheduler(
        _Family(), None, None, NullObserver(),  # type: ignore[arg-type]
        max_rows=16, max_active=4, max_queue=100, static=False, retry_wait_s=0.01,
        newcomer_slots=newcomer_slots,
    )  # fmt: skip
    for i in range(10):
        scheduler.submit(_request("A", i), None)
    assert [r.request.prompt for r in scheduler.schedule().admitted] == ["A0", "A1", "A2", "A3"]
    for request in (_request("B", 0), _request("B", 1), _request("C", 0)):
        scheduler.submit(request, None)
    admitted = [r.request.prompt for r in scheduler.schedule().admitted]
    # B0 at once, beyond max_active; B1 waits (B has one in flight), C0 too (the one slot is taken)
    assert admitted == (["B0"] if newcomer_slots else [])
    assert scheduler.in_flight == 4 + newcomer_slots and not scheduler.schedule().admitted


@pytest.mark.parametrize(("weight", "expected"), [(1.0, ["B0", "B1"]), (0.25, ["B0"])])
def test_a_short_burst_takes_newcomer_slots_up_to_its_tenants_share_of_max_active(weight, expected):
    scheduler = RequestScheduler(
        _Family(), None, None, NullObserver(),  # type: ignore[arg-type]
        max_rows=16, max_active=4, max_queue=100, static=False, retry_wait_s=0.01, newcomer_slots=3,
    )  # fmt: skip
    for i in range(10):
        scheduler.submit(_request("A", i), None)
    assert len(scheduler.schedule().admitted) == 4  # A alone: every slot, none of the extra ones
    for i in range(3):
        scheduler.submit(_request("B", i, weight), None)
    # B's share of max_active: 4 × w/(1 + w) = 2 slots at weight 1, 0.8 at 0.25 (its first request only)
    assert [r.request.prompt for r in scheduler.schedule().admitted] == expected
    assert not scheduler.schedule().admitted  # B at its share, A above its own: the rest wait
    assert scheduler.in_flight == 4 + len(expected)
