"""The adapter lease state machine against a scripted pool (no model, no threads of our own)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Iterator, Sequence

import pytest

from deft_runtime.engine.leases import AdapterLease, LeaseState
from deft_runtime.engine.runner import all_finite
from deft_runtime.errors import AdapterNotFound, PoolExhausted


class ScriptedPool:
    """Pins by name; ``acquire`` raises the scripted errors first, and may wait for ``gate``."""

    def __init__(self, errors: Sequence[Exception] = (), ready: bool = True) -> None:
        self.errors = list(errors)
        self.pins: dict[str, int] = {}
        self.is_ready = ready
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0

    def acquire(self, names: Sequence[str]) -> dict[str, int]:
        self.calls += 1
        self.gate.wait(10)
        if self.errors:
            raise self.errors.pop(0)
        for n in names:
            self.pins[n] = self.pins.get(n, 0) + 1
        return {n: 0 for n in names}

    def release(self, names: Sequence[str]) -> None:
        for n in names:
            self.pins[n] -= 1

    def ready(self, names: Sequence[str]) -> bool:
        return self.is_ready


@pytest.fixture
def loader() -> Iterator[cf.ThreadPoolExecutor]:
    executor = cf.ThreadPoolExecutor(max_workers=1)
    yield executor
    executor.shutdown(wait=True)


def settle(lease: AdapterLease, *, may_retry: bool = False, until: LeaseState | None = None) -> LeaseState:
    """Poll until the lease leaves LOADING (or reaches ``until``)."""
    for _ in range(1000):
        state = lease.poll(may_retry=may_retry)
        if (until is None and state is not LeaseState.LOADING) or state is until:
            return state
        threading.Event().wait(0.005)
    raise AssertionError(f"lease stuck in {lease.state}")


def test_acquire_then_ready_then_release_drops_the_pins_once(loader):
    pool = ScriptedPool(ready=False)
    lease = AdapterLease(pool, loader, ["a", "b"], retry_wait_s=0.0)
    lease.acquire()
    assert settle(lease) is LeaseState.PINNED  # pinned, but the device copy is not done
    pool.is_ready = True
    assert lease.poll(may_retry=False) is LeaseState.READY
    assert pool.pins == {"a": 1, "b": 1}
    lease.release()
    lease.release()
    assert pool.pins == {"a": 0, "b": 0} and lease.state is LeaseState.RELEASED


def test_pool_exhausted_is_retried_only_while_others_can_free_room(loader):
    pool = ScriptedPool(errors=[PoolExhausted("full"), PoolExhausted("full")])
    lease = AdapterLease(pool, loader, ["a"], retry_wait_s=0.0)
    lease.acquire()
    assert settle(lease, may_retry=True, until=LeaseState.READY) is LeaseState.READY
    assert pool.calls == 3 and pool.pins == {"a": 1}
    alone = AdapterLease(ScriptedPool(errors=[PoolExhausted("full")]), loader, ["a"], retry_wait_s=0.0)
    alone.acquire()
    assert settle(alone, may_retry=False) is LeaseState.FAILED
    assert isinstance(alone.error, PoolExhausted)


def test_a_failed_load_pins_nothing(loader):
    pool = ScriptedPool(errors=[AdapterNotFound("gone")])
    lease = AdapterLease(pool, loader, ["a"], retry_wait_s=0.0)
    lease.acquire()
    assert settle(lease, may_retry=True) is LeaseState.FAILED and isinstance(lease.error, AdapterNotFound)
    lease.release()
    assert pool.pins == {}


def test_release_while_loading_drops_the_pins_when_the_load_lands(loader):
    pool = ScriptedPool()
    pool.gate.clear()
    lease = AdapterLease(pool, loader, ["a"], retry_wait_s=0.0)
    lease.acquire()
    lease.release()  # cancelled mid-load
    assert lease.state is LeaseState.RELEASED
    pool.gate.set()
    loader.submit(lambda: None).result(10)  # the loader thread has finished the acquire and its callback
    assert pool.pins == {"a": 0}


def test_every_landed_load_wakes_the_engine_once_it_is_done(loader):
    """``on_landed`` (the engine's wake-up) fires after each load, retries included, and only once the
    future is done: a woken engine that polls finds the lease landed (it does not wait out its idle
    timeout for a request whose adapters are ready)."""
    pool = ScriptedPool(errors=[PoolExhausted("full")])
    pool.gate.clear()
    landed: list[bool] = []
    woken = threading.Event()

    def on_landed() -> None:
        landed.append(lease.poll(may_retry=True) is not LeaseState.IDLE)
        woken.set()

    lease = AdapterLease(pool, loader, ["a"], retry_wait_s=0.0, on_landed=on_landed)
    lease.acquire()
    assert not woken.is_set()  # the load is still blocked
    pool.gate.set()
    assert woken.wait(10)
    assert settle(lease, may_retry=True, until=LeaseState.READY) is LeaseState.READY
    loader.submit(lambda: None).result(10)
    assert len(landed) == 2  # the first load (PoolExhausted) and its retry each woke the engine
    assert lease.state is LeaseState.READY


def test_all_finite_flags_each_tensor():
    import torch

    good, bad, inf = torch.zeros(2, 3), torch.tensor([[0.0, float("nan")]]), torch.tensor([float("inf")])
    assert all_finite([good, bad, inf, good]) == [True, False, False, True]
    assert all_finite([]) == []
