"""Fair share inside the real engine (tiny SDXL), as a bounded test of ordering, not timing.

Tenant A's burst is queued first and runs alone for a while, then tenant B sends two requests: B's
requests are admitted and finish before A's backlog drains, B's first request takes every forward
while it runs (its idle credit covers it and ``mixed_batch_rows`` keeps A's rows out), and every image is the one the same request gets when
nobody is labelled (first come, first served), so pausing a request between steps changes nothing.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from deft_runtime.engine import Engine, EngineConfig, EventKind, GenerationEvent, GenerationRequest
from deft_runtime.models import build_tiny_sdxl
from deft_runtime.pool import PoolConfig
from deft_runtime.runtime import MultiAdapterModel

TOL = 2 / 255  # images are uint8; batch composition may change float rounding, never the picture
STEPS = 6
BURST = 10
CREDIT = 16  # row-steps: B's request needs 12 (6 steps × 2 CFG rows)


@pytest.fixture(scope="module")
def engine():
    pipe = build_tiny_sdxl(0)
    mam = MultiAdapterModel(
        pipe.unet, pool_config=PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20), backend="torch"
    )
    config = EngineConfig(
        max_batch_rows=4, max_active=2, mixed_batch_rows=2, newcomer_slots=1, idle_credit_row_steps=CREDIT
    )
    engine = Engine(pipe, mam, config)
    yield engine
    engine.shutdown()


def run_burst(engine: Engine, labelled: bool) -> tuple[list[tuple[str, EventKind]], dict[str, np.ndarray]]:
    """A's burst then B's two requests; the (request, event) order and each request's image."""
    log: list[tuple[str, EventKind]] = []
    lock = threading.Lock()

    def record(event: GenerationEvent) -> None:
        if event.kind in (EventKind.PROGRESS, EventKind.RESULT):
            with lock:
                log.append((event.request_id, event.kind))

    def submit(name: str, seed: int) -> None:
        tenant = name[0] if labelled else ""
        request = GenerationRequest(
            f"prompt {name}", num_inference_steps=STEPS, seed=seed, request_id=name, tenant=tenant
        )
        handles[name] = engine.submit(request, record)

    handles = {}
    for i in range(BURST):
        submit(f"A{i}", i)
    handles["A0"].result(300)  # A has had the engine to itself: no credit left
    submit("B0", 100)
    submit("B1", 101)
    images = {n: np.asarray(h.result(300).images[0], dtype=np.float32) / 255 for n, h in handles.items()}
    return log, images


def results_before(log: list[tuple[str, EventKind]], name: str) -> int:
    """How many of A's requests finished before ``name`` did."""
    done = [rid for rid, kind in log if kind is EventKind.RESULT]
    return sum(rid.startswith("A") for rid in done[: done.index(name)])


def test_the_light_tenant_is_admitted_and_advanced_before_the_floods_backlog_drains(engine):
    fcfs_log, fcfs_images = run_burst(engine, labelled=False)
    fair_log, fair_images = run_burst(engine, labelled=True)
    # first come, first served: B waits behind the whole burst
    assert results_before(fcfs_log, "B0") == BURST and results_before(fcfs_log, "B1") == BURST
    # fair: B0 gets a newcomer slot at once (A0 and A1 shared every forward, so finished together),
    # B1 one of the next slots (A and B alternate in the admission queue)
    assert results_before(fair_log, "B0") <= 3, fair_log
    assert results_before(fair_log, "B1") <= 6, fair_log
    steps = [rid for rid, kind in fair_log if kind is EventKind.PROGRESS]
    first, last = steps.index("B0"), len(steps) - 1 - steps[::-1].index("B0")
    assert steps[first : last + 1] == ["B0"] * STEPS  # B0 ran alone, one step per forward
    for name, image in fair_images.items():
        assert np.abs(image - fcfs_images[name]).max() <= TOL, name
