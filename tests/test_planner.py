"""Planner unit tests: pure batch selection, no models."""

from __future__ import annotations

import pytest

from deft_runtime.engine.planner import Candidate, admit_count, plan_batch


def cand(rid, bucket="64x64", rows=2, arrival=0, last=-1):
    return Candidate(rid, bucket, rows, arrival, last)


def test_empty_and_single():
    assert plan_batch([], 8) == []
    assert plan_batch([cand("a")], 8) == ["a"]


def test_max_rows_is_respected_and_smaller_requests_fill_the_gap():
    cs = [
        cand("a", rows=4, arrival=0),
        cand("b", rows=4, arrival=1),
        cand("c", rows=2, arrival=2),
        cand("d", rows=1, arrival=3),
    ]
    assert plan_batch(cs, 8) == ["a", "b"]
    assert plan_batch(cs, 7) == ["a", "c", "d"]


def test_one_bucket_per_forward_chosen_by_the_longest_waiting():
    cs = [
        cand("a", bucket="big", arrival=0, last=5),
        cand("b", bucket="small", arrival=1, last=3),
        cand("c", bucket="small", arrival=2, last=5),
    ]
    assert plan_batch(cs, 16) == ["b", "c"]


def test_fairness_a_request_left_out_goes_first_next_time():
    cs = [cand(f"r{i}", rows=2, arrival=i, last=-1) for i in range(5)]
    first = plan_batch(cs, 6)
    assert first == ["r0", "r1", "r2"]
    after = [
        cand(c.request_id, rows=2, arrival=c.arrival, last=1 if c.request_id in first else -1) for c in cs
    ]
    assert plan_batch(after, 6)[:2] == ["r3", "r4"]


def test_no_starvation_across_buckets():
    """Simulate many iterations with two buckets: every request advances within a bounded wait."""
    last = {"a": -1, "b": -1, "c": -1}
    buckets = {"a": "x", "b": "y", "c": "x"}
    waits = {k: 0 for k in last}
    max_wait = 0
    for it in range(30):
        chosen = plan_batch([cand(k, buckets[k], 2, i, last[k]) for i, k in enumerate(last)], 4)
        for k in last:
            if k in chosen:
                last[k] = it
                waits[k] = 0
            else:
                waits[k] += 1
                max_wait = max(max_wait, waits[k])
    assert max_wait <= 1


def test_join_and_leave_at_any_step():
    """A request joining mid-run (never scheduled) is picked before ones that just ran."""
    running = [cand("long", arrival=0, last=9), cand("mid", arrival=1, last=9)]
    assert plan_batch([*running, cand("new", arrival=2, last=-1)], 4) == ["new", "long"]
    assert plan_batch([cand("mid", arrival=1, last=9)], 4) == ["mid"]  # "long" left: the batch shrinks


def test_oversized_head_request_is_a_bug():
    with pytest.raises(ValueError, match="needs 10 rows > max_rows=8"):
        plan_batch([cand("a", rows=10)], 8)


def test_admission_bound():
    assert admit_count(waiting=10, active=30, max_active=32) == 2
    assert admit_count(waiting=1, active=0, max_active=32) == 1
    assert admit_count(waiting=5, active=40, max_active=32) == 0
