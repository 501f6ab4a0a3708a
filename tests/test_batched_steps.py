"""The batched DPM-Solver++ step against each request's own ``scheduler.step`` (the oracle): the same bits,
at mixed step indices, step counts and image counts, and the same scheduler state afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from deft_runtime.engine.batched_steps import batchable, dpm_solver_step
from deft_runtime.models import SHAPES_MODEL_DIR

# the shipped model's sampler
SHAPES_CONFIG = dict(DPMSolverMultistepScheduler.load_config(SHAPES_MODEL_DIR, subfolder="scheduler"))


def scheduler(steps: int, **overrides) -> DPMSolverMultistepScheduler:
    s = DPMSolverMultistepScheduler.from_config({**SHAPES_CONFIG, **overrides})
    s.set_timesteps(steps)
    s.set_begin_index(0)
    return s


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # final_sigmas_type "zero", lower_order_final, trailing spacing
        {"final_sigmas_type": "sigma_min", "timestep_spacing": "leading"},
        {"solver_order": 1},
        {"use_karras_sigmas": True},
    ],
)
def test_batched_steps_equal_each_schedulers_own_steps(overrides) -> None:
    # (steps, images, the round it joins): 20 steps crosses the "fewer than 15 steps" rule
    plan = [(12, 1, 0), (12, 2, 3), (20, 1, 1), (5, 2, 0), (12, 1, 7)]
    assert all(batchable(scheduler(n, **overrides), torch.zeros(1)) for n, _, _ in plan)
    mine = [scheduler(n, **overrides) for n, _, _ in plan]
    oracle = [copy.deepcopy(s) for s in mine]
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(k, 4, 8, 8, generator=g) for _, k, _ in plan]
    expected = [x.clone() for x in latents]
    steps_done = [0] * len(plan)
    for round_ in range(30):
        active = [i for i, (n, _, join) in enumerate(plan) if join <= round_ and steps_done[i] < n]
        if round_ % 4 == 2 and len(active) > 2:
            active = active[1:]  # one request sits a forward out: indices drift apart
        if not active:
            continue
        outputs = {i: torch.randn(latents[i].shape, generator=g) for i in active}
        new = dpm_solver_step(
            [mine[i] for i in active],
            [mine[i].timesteps[steps_done[i]] for i in active],
            [outputs[i] for i in active],
            [latents[i] for i in active],
        )
        for i, x in zip(active, new, strict=True):
            t = oracle[i].timesteps[steps_done[i]]
            expected[i] = oracle[i].step(outputs[i], t, expected[i], return_dict=True).prev_sample
            latents[i] = x
            steps_done[i] += 1
            assert torch.equal(x, expected[i]), f"request {i}, step {steps_done[i]}"
            assert mine[i].step_index == oracle[i].step_index
            assert mine[i].lower_order_nums == oracle[i].lower_order_nums
            for a, b in zip(mine[i].model_outputs, oracle[i].model_outputs, strict=True):
                assert (a is None and b is None) or torch.equal(a, b)
    assert steps_done == [n for n, _, _ in plan]
    assert all(torch.isfinite(x).all() for x in latents)


def test_only_configurations_written_out_take_the_batched_path() -> None:
    x = torch.zeros(1, 4, 8, 8)
    assert batchable(scheduler(12), x)
    assert not batchable(scheduler(12), x.bfloat16())  # diffusers keeps 0-dim sigmas out of promotion
    for overrides in (
        {"algorithm_type": "sde-dpmsolver++"},  # draws noise
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        {"solver_order": 3},
        {"solver_type": "heun"},
        {"prediction_type": "v_prediction"},
        {"thresholding": True},
        {"euler_at_final": True},
    ):
        assert not batchable(scheduler(12, **overrides), x), overrides
    assert not batchable(EulerDiscreteScheduler(), x)
