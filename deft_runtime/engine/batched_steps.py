"""One scheduler step for many requests at once, bit for bit what each request's own scheduler computes.

Every request owns a diffusers scheduler (its own timesteps and history), and ``scheduler.step`` costs
~40 small tensor operations on 0-dim sigmas per request: on a small model that is most of the engine's
host work per iteration. For the multistep DPM-Solver++ (SDXL pipelines' usual fast sampler; the
default of the shipped ``shapes-sdxl``) this module instead

1. computes each request's step coefficients once per ``(sigmas, step index, order)`` with exactly the
   scalar operations ``DPMSolverMultistepScheduler`` uses, and keeps them (they depend on nothing else);
2. runs the update as a handful of elementwise operations over every request's latents at once, in the
   scheduler's own order of operations, with each request's coefficients broadcast over its rows; an
   elementwise float32 operation gives the same bits whether its scalar is 0-dim or one row of a column;
3. writes back what ``step`` would have left in each scheduler (its history, ``lower_order_nums``, step
   index), so the request's scheduler stays usable on its own.

Only configurations whose arithmetic is written out here take this path (:func:`batchable`); anything
else (SDE variants, thresholding, other prediction types, non-float32 latents, other schedulers) runs
``scheduler.step`` per request as before. ``tests/test_batched_steps.py`` checks the equality against
``scheduler.step`` itself, step by step, at mixed step indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler


def batchable(scheduler: Any, latents: torch.Tensor) -> bool:
    """Whether :func:`dpm_solver_step` computes exactly what ``scheduler.step`` would."""
    if type(scheduler) is not DPMSolverMultistepScheduler or latents.dtype != torch.float32:
        return False
    c: Any = scheduler.config  # type: ignore[attr-defined]  # diffusers declares it dynamically
    return bool(
        c.algorithm_type == "dpmsolver++"
        and c.solver_order in (1, 2)
        and c.solver_type == "midpoint"
        and c.prediction_type == "epsilon"
        and not c.thresholding
        and c.variance_type is None
        and not c.use_flow_sigmas
        and not c.euler_at_final
    )


@dataclass(frozen=True)
class Coefficients:
    """One request's step, as the scheduler's own 0-dim float32 values (second order: ``inv_r0``, ``half``
    set)."""

    alpha: torch.Tensor  # alpha_t of the current sigma (model output → x0)
    sigma: torch.Tensor  # sigma_t of the current sigma
    ratio: torch.Tensor  # sigma_t / sigma_s (next over current)
    scale: torch.Tensor  # alpha_t · (exp(−h) − 1) of the next sigma
    inv_r0: torch.Tensor | None = None  # 1 / r0 (second order)
    half: torch.Tensor | None = None  # 0.5 · scale (second order)


_CACHE: dict[tuple[int, bool, bytes], Coefficients] = {}


def coefficients(scheduler: Any, i: int, second: bool) -> Coefficients:
    """Step ``i``'s coefficients, computed like ``convert_model_output`` and the first/second order
    updates do (cached by the sigmas' bytes, so equal schedules share them; the scheduler keeps its
    sigmas on the CPU)."""
    key = (i, second, scheduler.sigmas.cpu().numpy().tobytes())
    found = _CACHE.get(key)
    if found is None:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        found = _CACHE[key] = _compute(scheduler, i, second)
    return found


def _compute(s: Any, i: int, second: bool) -> Coefficients:
    alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(s.sigmas[i + 1])
    alpha_s0, sigma_s0 = s._sigma_to_alpha_sigma_t(s.sigmas[i])  # also x0's: the current sigma
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    scale = alpha_t * (torch.exp(-h) - 1.0)
    if not second:
        return Coefficients(alpha_s0, sigma_s0, sigma_t / sigma_s0, scale)
    alpha_s1, sigma_s1 = s._sigma_to_alpha_sigma_t(s.sigmas[i - 1])
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
    r0 = (lambda_s0 - lambda_s1) / h
    return Coefficients(alpha_s0, sigma_s0, sigma_t / sigma_s0, scale, 1.0 / r0, 0.5 * scale)


def _order(s: Any) -> bool:
    """Whether this step is second order (``step``'s own rule for solver orders 1 and 2)."""
    c = s.config
    last = s.step_index == len(s.timesteps) - 1
    lower_order_final = last and (
        (c.lower_order_final and len(s.timesteps) < 15) or c.final_sigmas_type == "zero"
    )
    return not (c.solver_order == 1 or s.lower_order_nums < 1 or lower_order_final)


def _column(values: Sequence[torch.Tensor], counts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-request 0-dim values repeated over each request's rows: ``[rows, 1, 1, 1]``."""
    col = torch.stack(list(values)).repeat_interleave(counts)
    return col.to(like.device).view(-1, *[1] * (like.dim() - 1))


def dpm_solver_step(
    schedulers: Sequence[Any],  # DPMSolverMultistepScheduler (diffusers' own types are partial)
    timesteps: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    samples: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """``[s.step(out, t, x).prev_sample for ...]`` in a few batched operations (all :func:`batchable`)."""
    for s, t in zip(schedulers, timesteps, strict=True):
        if s.step_index is None:
            s._init_step_index(t)
    second = [_order(s) for s in schedulers]
    coefs = [coefficients(s, s.step_index, o) for s, o in zip(schedulers, second, strict=True)]
    counts = [int(x.shape[0]) for x in samples]
    repeats = torch.tensor(counts)
    sample, output = torch.cat(list(samples)), torch.cat(list(outputs))
    everyone = range(len(coefs))

    def col(name: str, idx: Sequence[int] = everyone) -> torch.Tensor:
        return _column([getattr(coefs[i], name) for i in idx], repeats[list(idx)], sample)

    x0 = (sample - col("sigma") * output) / col("alpha")  # convert_model_output
    prev = col("ratio") * sample - col("scale") * x0  # first order; second-order rows replaced below
    seconds = [i for i, o in enumerate(second) if o]
    if seconds:
        starts = [sum(counts[:i]) for i in range(len(counts))]
        rows = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in seconds]).to(sample.device)
        m1 = torch.cat([schedulers[i].model_outputs[-1] for i in seconds])
        m0, x = x0.index_select(0, rows), sample.index_select(0, rows)
        d1 = col("inv_r0", seconds) * (m0 - m1)
        prev[rows] = col("ratio", seconds) * x - col("scale", seconds) * m0 - col("half", seconds) * d1
    out, offset = [], 0
    for s, n in zip(schedulers, counts, strict=True):
        history = s.model_outputs
        for k in range(s.config.solver_order - 1):
            history[k] = history[k + 1]
        history[-1] = x0[offset : offset + n]
        if s.lower_order_nums < s.config.solver_order:
            s.lower_order_nums += 1
        s._step_index += 1
        out.append(prev[offset : offset + n])
        offset += n
    return out
