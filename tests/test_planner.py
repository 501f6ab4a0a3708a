"""Planner unit tests: pure batch selection, no models."""

from __future__ import annotations

import pytest

from deft_runtime.engine.planner import BATCH_ORDERS, BatchPlanner, Candidate, admit_count, plan_batch


def cand(rid, bucket="64x64", rows=2, arrival=0, last=-1, tenant="", weight=1.0):
    return Candidate(rid, bucket, rows, arrival, last, tenant, weight)


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


# ---------------------------------------------------------------- fair across tenants (BatchPlanner)


class Sim:
    """Drives a BatchPlanner like the scheduler does: requests take one step per forward they join."""

    def __init__(self, planner: BatchPlanner) -> None:
        self.planner = planner
        self.live: dict[str, dict] = {}
        self.arrivals = 0
        self.iteration = 0

    def add(self, rid, tenant, steps=1000, rows=2, weight=1.0, bucket="64x64"):
        self.live[rid] = dict(tenant=tenant, steps=steps, rows=rows, weight=weight, bucket=bucket, last=-1)
        self.arrivals += 1
        self.live[rid]["arrival"] = self.arrivals

    def step(self) -> list[str]:
        cs = [cand(k, v["bucket"], v["rows"], v["arrival"], v["last"], v["tenant"], v["weight"])
              for k, v in self.live.items()]  # fmt: skip
        chosen = self.planner.plan(cs)
        self.iteration += 1
        for k in chosen:
            self.live[k]["last"] = self.iteration
            self.live[k]["steps"] -= 1
            if self.live[k]["steps"] == 0:
                del self.live[k]
        return chosen


def test_one_tenant_plans_exactly_like_plan_batch():
    cs = [cand("a", rows=4, arrival=0), cand("b", rows=4, arrival=1), cand("c", rows=2, arrival=2, last=0)]
    for tenant in ("", "alice"):
        tenanted = [
            Candidate(c.request_id, c.bucket, c.rows, c.arrival, c.last_scheduled, tenant) for c in cs
        ]
        planner = BatchPlanner(8, mixed_rows=2, credit=100)
        assert planner.plan(tenanted) == plan_batch(cs, 8) == ["a", "b"]  # no cap with one tenant


def test_a_light_tenant_back_from_idle_runs_alone_for_its_credit_then_shares():
    sim = Sim(BatchPlanner(8, mixed_rows=2, credit=10))
    for i in range(4):
        sim.add(f"A{i}", "A")
    for _ in range(20):
        assert len(sim.step()) == 4  # A alone: full forwards (no cap with one tenant)
    sim.add("B0", "B")
    plans = [sim.step() for _ in range(12)]
    assert plans[:5] == [["B0"]] * 5  # 10 row-steps of credit = 5 steps of a 2-row request, alone
    rest = plans[5:]
    assert all(len(p) == 1 for p in rest)  # mixed_rows=2: one 2-row request per forward
    assert sum(p == ["B0"] for p in rest) in (3, 4)  # then B gets every other forward


def test_without_a_cap_the_light_tenant_leads_and_the_others_fill_the_forward():
    sim = Sim(BatchPlanner(8, credit=10))
    for i in range(4):
        sim.add(f"A{i}", "A")
    sim.step()
    sim.add("B0", "B")
    for _ in range(10):
        plan = sim.step()
        assert plan[0] == "B0" and len(plan) == 4  # B's request in every forward, A fills the rest


def test_a_light_tenants_burst_shares_one_forward_past_the_cap_while_it_is_furthest_behind():
    sim = Sim(BatchPlanner(8, mixed_rows=2, credit=12))
    for i in range(4):
        sim.add(f"A{i}", "A", steps=100)
    for _ in range(10):
        sim.step()
    sim.add("B0", "B")
    sim.add("B1", "B")
    plans = [sim.step() for _ in range(6)]
    # 12 row-steps of credit: B's two requests together (4 rows, as alone) for 3 forwards, A none
    assert plans[:3] == [["B0", "B1"]] * 3
    # then B is no longer furthest behind after one request: the cap holds, one request per forward
    assert all(len(p) == 1 for p in plans[3:]) and any(p[0].startswith("A") for p in plans[3:])


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_busy_tenants_share_row_steps_by_weight_and_a_tenant_that_never_pauses_banks_nothing(weight):
    sim = Sim(BatchPlanner(4, mixed_rows=2, credit=50))
    for i in range(3):
        sim.add(f"A{i}", "A")
        sim.add(f"B{i}", "B", weight=weight)
    given = {"A": 0, "B": 0}
    for _ in range(80):
        for k in sim.step():
            given[k[0]] += 2
    assert given["B"] / given["A"] == pytest.approx(weight, rel=0.1)  # from the start: no credit banked


def test_the_credit_is_bounded_however_long_the_tenant_was_idle():
    sim = Sim(BatchPlanner(2, credit=6))
    sim.add("A0", "A")
    for _ in range(500):
        sim.step()  # B idle for 500 steps
    sim.add("B0", "B")
    plans = [sim.step() for _ in range(8)]
    assert plans[:3] == [["B0"]] * 3  # 6 row-steps, not 1000
    assert ["A0"] in plans[3:5]


def test_a_tenant_sending_requests_back_to_back_does_not_bank_credit_between_them():
    sim = Sim(BatchPlanner(2, credit=8))
    sim.add("A0", "A")
    b_steps = 0
    for i in range(60):
        if not any(k.startswith("B") for k in sim.live):
            sim.add(f"B{i}", "B", steps=3)  # B's next request as soon as one finishes
        b_steps += sum(k.startswith("B") for k in sim.step())
    assert 30 <= b_steps <= 30 + 4  # half the forwards, plus one credit's worth (8 row-steps)


def test_the_lead_tenant_picks_the_bucket_and_an_oversized_head_runs_alone():
    planner = BatchPlanner(8, mixed_rows=2, credit=0)
    cs = [
        cand("a", bucket="big", tenant="A", arrival=0),
        cand("b", bucket="small", tenant="B", arrival=1),
        cand("b2", bucket="big", rows=6, tenant="B", arrival=2),
    ]
    assert planner.plan(cs) == ["a"]  # tie at the start: A waited longest; only "big" can join
    assert planner.plan(cs) == ["b"]  # now B is behind: its oldest request's bucket
    assert planner.plan([cand("a", bucket="big", tenant="A", arrival=0, last=1), cs[2]]) == ["b2"]


def test_bad_mixed_rows_are_refused():
    with pytest.raises(ValueError, match="mixed_rows must be ≥ 1"):
        BatchPlanner(8, mixed_rows=0)
    with pytest.raises(ValueError, match="needs 10 rows > max_rows=8"):
        BatchPlanner(8).plan([cand("a", rows=10, tenant="A"), cand("b", tenant="B")])


# ---------------------------------------------------------------------------- batch orders


def ordered_cand(rid, arrival, last, remaining, tenant=""):
    return Candidate(rid, "64x64", 2, arrival, last, tenant, 1.0, remaining)


def test_each_order_fills_the_forward_after_the_longest_waiting_lead():
    cs = [
        ordered_cand("old-long", arrival=0, last=5, remaining=30),
        ordered_cand("mid-short", arrival=1, last=4, remaining=2),
        ordered_cand("new-waited", arrival=2, last=1, remaining=20),  # waited longest: the lead
        ordered_cand("newest-shortest", arrival=3, last=5, remaining=1),
    ]
    assert plan_batch(cs, 4) == ["new-waited", "mid-short"]  # default: longest wait
    assert plan_batch(cs, 4, "longest-wait") == ["new-waited", "mid-short"]
    assert plan_batch(cs, 4, "arrival") == ["new-waited", "old-long"]
    assert plan_batch(cs, 4, "fewest-remaining") == ["new-waited", "newest-shortest"]
    for order in BATCH_ORDERS:  # one tenant: the fair planner plans exactly like plan_batch
        assert BatchPlanner(4, order=order).plan(cs) == plan_batch(cs, 4, order)


def simulate(order, arrivals, max_rows, iterations):
    """A toy engine: every request needs `steps` forwards; returns each request's finishing iteration."""
    remaining = {rid: steps for rid, (_, steps) in arrivals.items()}
    last = dict.fromkeys(arrivals, -1)
    finished = {}
    planner = BatchPlanner(max_rows, order=order)
    for it in range(iterations):
        ready = [
            ordered_cand(rid, arrival=at, last=last[rid], remaining=remaining[rid])
            for rid, (at, _) in arrivals.items()
            if at <= it and rid not in finished
        ]
        for rid in planner.plan(ready):
            last[rid] = it
            remaining[rid] -= 1
            if remaining[rid] == 0:
                finished[rid] = it
    return finished


def test_fewest_remaining_finishes_short_requests_first_and_never_starves_a_long_one():
    # one 40-step request, then a new 3-step request every iteration; 2 requests fit a forward
    arrivals = {"long": (0, 40), **{f"s{i}": (i, 3) for i in range(200)}}
    done = {o: simulate(o, arrivals, max_rows=4, iterations=400) for o in BATCH_ORDERS}
    assert "long" in done["fewest-remaining"]  # the lead rule runs it whenever it waited longest
    short = [f"s{i}" for i in range(20)]
    latency = {o: sum(done[o][s] - arrivals[s][0] for s in short) for o in BATCH_ORDERS}
    assert latency["fewest-remaining"] < latency["longest-wait"]
    finish = [done["arrival"][s] for s in short]  # arrival order: first come, first finished
    assert finish == sorted(finish)


def test_an_unknown_order_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="longest-wait, arrival, fewest-remaining"):
        BatchPlanner(4, order="shortest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown batch order"):
        plan_batch([cand("a")], 4, "lifo")  # type: ignore[arg-type]
