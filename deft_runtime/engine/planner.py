"""Which requests go into the next denoiser forward: pure planning, no tensors, unit-tested alone.

Policy (step-level continuous batching):

- Only requests that share a latent shape (a *bucket*) can share a forward; their timesteps and
  adapters may all differ.
- The request that has waited longest since it last ran (ties: earliest arrival) picks the bucket and
  always gets in; others of that bucket follow in the same order while their rows fit ``max_rows``.
  A request left out this time is first in line next time, so nothing starves, and a short request is
  never held behind a long one: both advance one step per forward.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A request that is ready to take a denoising step."""

    request_id: str
    bucket: Hashable
    rows: int  # rows it adds to the forward: num_images × (2 with CFG, else 1)
    arrival: int  # admission sequence number (FCFS)
    last_scheduled: int  # engine iteration of its last step, -1 if never


def plan_batch(candidates: Sequence[Candidate], max_rows: int) -> list[str]:
    """Request ids for the next forward (empty when nothing is ready)."""
    ordered = sorted(candidates, key=lambda c: (c.last_scheduled, c.arrival))
    if not ordered:
        return []
    bucket = ordered[0].bucket
    chosen: list[str] = []
    used = 0
    for c in ordered:
        if c.bucket != bucket or used + c.rows > max_rows:
            continue
        chosen.append(c.request_id)
        used += c.rows
    if not chosen:  # the head request alone exceeds max_rows: admission should have refused it
        raise ValueError(
            f"request {ordered[0].request_id} needs {ordered[0].rows} rows > max_rows={max_rows}"
        )
    return chosen


def admit_count(waiting: int, active: int, max_active: int) -> int:
    """How many waiting requests may become active now (FCFS, bounded concurrency)."""
    return max(0, min(waiting, max_active - active))
