"""The engine against diffusers (+PEFT) as the oracle: same inputs → the same image within 2/255,
whatever else shares its forwards; plus cancellation, deadlines, queue limits and NaN isolation."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, OmniGenPipeline, StableDiffusionXLPipeline
from peft import DeftConfig, LoraConfig, PeftModel, get_peft_model

from deft_runtime.compile import CompiledAdapter, LowRankFactors
from deft_runtime.engine import (
    DeadlineExceeded,
    Engine,
    EngineConfig,
    EventKind,
    GenerationFailed,
    GenerationRequest,
    QueueFull,
    RequestCancelled,
)
from deft_runtime.errors import AdapterNotFound, InvalidRequest
from deft_runtime.formats import load_adapter
from deft_runtime.models import build_tiny_omnigen, build_tiny_sdxl
from deft_runtime.pool import PoolConfig
from deft_runtime.runtime import MultiAdapterModel

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TOL = 2 / 255


def make_peft_dir(denoiser, config, path, seed: int, boost: float = 8.0):
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(denoiser), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "deft_R" in name or "lora_B" in name:
                p.mul_(boost)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sdxl_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_adapters")
    unet = build_tiny_sdxl(0).unet
    return {
        "dog": make_peft_dir(
            unet,
            DeftConfig(r=4, target_modules=TARGETS, decomposition_method="qr", init_weights=False),
            root / "dog",
            1,
        ),
        "style": make_peft_dir(
            unet,
            LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
            root / "style",
            2,
        ),
    }


def serving_engine(pipe, adapters: dict, **config):
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    mam = MultiAdapterModel(
        denoiser, pool_config=PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20), backend="torch"
    )
    for name, path in adapters.items():
        mam.register(name, load_adapter(path))
    return Engine(pipe, mam, EngineConfig(**config))


def reference_image(pipe_factory, adapter_dir, **kwargs) -> np.ndarray:
    """diffusers' own pipeline, with the adapter attached through PEFT."""
    pipe = pipe_factory(0)
    if adapter_dir is not None:
        attr = "unet" if hasattr(pipe, "unet") else "transformer"
        setattr(pipe, attr, PeftModel.from_pretrained(getattr(pipe, attr), adapter_dir).get_base_model())
    seed = kwargs.pop("seed")
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images
    return out


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])


@pytest.fixture(scope="module")
def sdxl_engine(sdxl_adapters):
    engine = serving_engine(build_tiny_sdxl(0), sdxl_adapters, max_batch_rows=16)
    yield engine
    engine.shutdown()


def test_single_request_matches_diffusers(sdxl_engine):
    res = sdxl_engine.generate(
        GenerationRequest(prompt="a photo of a dog", num_inference_steps=5, seed=7), timeout=120
    )
    ref = reference_image(build_tiny_sdxl, None, prompt="a photo of a dog", num_inference_steps=5, seed=7)
    assert np.abs(as_array(res.images) - ref).max() <= TOL
    assert res.seed == 7 and res.steps == 5


def test_concurrent_staggered_requests_with_different_adapters_match_diffusers_peft(
    sdxl_engine, sdxl_adapters
):
    specs = [
        dict(
            prompt="a dog on a beach",
            adapters=(("dog", 1.0),),
            num_inference_steps=10,
            guidance_scale=5.0,
            seed=1,
        ),
        dict(
            prompt="a city at night",
            adapters=(("style", 1.0),),
            num_inference_steps=7,
            guidance_scale=1.0,
            seed=2,
        ),
        dict(prompt="a cat", adapters=(), num_inference_steps=4, guidance_scale=3.0, seed=3, num_images=2),
        dict(
            prompt="a dog in snow",
            adapters=(("dog", 1.0),),
            num_inference_steps=4,
            guidance_scale=7.0,
            seed=4,
            negative_prompt="blurry",
        ),
    ]
    handles: list = [None] * len(specs)
    forwards_with_mixed_adapters = []
    started = threading.Event()

    def first_listener(event):
        # staggered arrival: the others join while the first is mid-run
        if event.kind is EventKind.PROGRESS and event.step == 3 and not started.is_set():
            started.set()
            for i in range(1, len(specs)):
                handles[i] = sdxl_engine.submit(GenerationRequest(**specs[i]))

    original = sdxl_engine.observer
    sdxl_engine.observer = type(
        "Obs",
        (),
        {
            "on_forward": lambda self, rows, distinct, s: forwards_with_mixed_adapters.append(distinct),
            "on_request_done": lambda self, *a: None,
            "on_queue": lambda self, *a: None,
        },
    )()
    try:
        handles[0] = sdxl_engine.submit(GenerationRequest(**specs[0]), on_event=first_listener)
        results = [handles[0].result(120)]
        assert started.wait(10)
        results += [h.result(120) for h in handles[1:]]
    finally:
        sdxl_engine.observer = original
    assert max(forwards_with_mixed_adapters) >= 2, "requests with different adapters shared a forward"
    for spec, res in zip(specs, results, strict=True):
        spec = dict(spec)
        names = [n for n, _ in spec.pop("adapters")]
        n = spec.pop("num_images", 1)
        ref = reference_image(
            build_tiny_sdxl, sdxl_adapters[names[0]] if names else None, num_images_per_prompt=n, **spec
        )
        got = as_array(res.images)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= TOL, f"{spec['prompt']}: {np.abs(got - ref).max() * 255:.2f}/255"


def test_adapter_changes_the_image(sdxl_engine):
    kw = dict(prompt="a dog", num_inference_steps=4, seed=11)
    plain = as_array(sdxl_engine.generate(GenerationRequest(**kw), timeout=60).images)
    dog = as_array(sdxl_engine.generate(GenerationRequest(**kw, adapters=(("dog", 1.0),)), timeout=60).images)
    assert np.abs(plain - dog).max() > 10 / 255


def test_a_request_prepares_the_backend_metadata_once_for_all_its_steps(sdxl_engine):
    """Consecutive steps of the same request repeat the mapping: the backend skips re-preparing it
    (a weight no other test uses, so the first step's mapping is new)."""
    ops = sdxl_engine.model.ops
    before = ops.metadata_updates
    request = GenerationRequest(prompt="a dog", adapters=(("dog", 0.625),), num_inference_steps=6, seed=4)
    assert sdxl_engine.generate(request, timeout=60).steps == 6
    assert ops.metadata_updates - before == 1


def test_second_scheduler_matches_diffusers(sdxl_adapters, monkeypatch):
    """DPM-Solver++ requests sharing forwards step together (deft_runtime.engine.batched_steps); their
    images still equal diffusers' own pipeline's."""
    import deft_runtime.engine.families as families

    batched: list[int] = []

    def counted(schedulers, *args):
        batched.append(len(schedulers))
        return real(schedulers, *args)

    real = families.dpm_solver_step
    monkeypatch.setattr(families, "dpm_solver_step", counted)

    def dpm_pipe(seed):
        pipe = build_tiny_sdxl(seed)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        return pipe

    engine = serving_engine(dpm_pipe(0), sdxl_adapters)
    try:
        handles = [
            engine.submit(
                GenerationRequest(prompt="a dog", adapters=(("dog", 1.0),), num_inference_steps=6, seed=5)
            ),
            engine.submit(GenerationRequest(prompt="a tree", num_inference_steps=4, seed=6)),
        ]
        results = [h.result(120) for h in handles]
    finally:
        engine.shutdown()
    assert batched and max(batched) == 2  # both requests' steps ran as one batched step
    ref0 = reference_image(dpm_pipe, sdxl_adapters["dog"], prompt="a dog", num_inference_steps=6, seed=5)
    ref1 = reference_image(dpm_pipe, None, prompt="a tree", num_inference_steps=4, seed=6)
    assert np.abs(as_array(results[0].images) - ref0).max() <= TOL
    assert np.abs(as_array(results[1].images) - ref1).max() <= TOL


def test_omnigen_concurrent_requests_match_diffusers(tmp_path):
    transformer = build_tiny_omnigen(0).transformer
    adapters = {
        "dog": make_peft_dir(
            transformer,
            DeftConfig(r=2, target_modules=TARGETS, decomposition_method="relu", init_weights=False),
            tmp_path / "dog",
            3,
        )
    }
    engine = serving_engine(build_tiny_omnigen(0), adapters)
    rows_per_forward = []
    engine.observer = type(
        "Obs",
        (),
        {
            "on_forward": lambda self, rows, distinct, s: rows_per_forward.append(rows),
            "on_request_done": lambda self, *a: None,
            "on_queue": lambda self, *a: None,
        },
    )()
    specs = [
        dict(prompt="a dog", adapters=(("dog", 1.0),), num_inference_steps=5, seed=1, height=64, width=64),
        dict(
            prompt="a cat", num_inference_steps=4, seed=3, height=64, width=64
        ),  # same token count: shares forwards
        dict(
            prompt="a long prompt about a red house near a lake",
            num_inference_steps=3,
            seed=2,
            height=64,
            width=64,
            guidance_scale=3.0,
        ),
    ]
    try:
        results = [h.result(120) for h in [engine.submit(GenerationRequest(**s)) for s in specs]]
    finally:
        engine.shutdown()
    assert max(rows_per_forward) >= 4, "two OmniGen requests shared a forward"
    for spec, res in zip(specs, results, strict=True):
        spec = dict(spec)
        names = [n for n, _ in spec.pop("adapters", ())]
        ref = reference_image(build_tiny_omnigen, adapters["dog"] if names else None, **spec)
        assert np.abs(as_array(res.images) - ref).max() <= TOL


def test_events_arrive_in_order_with_previews(sdxl_engine):
    events = []
    done = threading.Event()

    def listen(e):
        events.append(e)
        if e.kind in (EventKind.RESULT, EventKind.FAILED):
            done.set()

    sdxl_engine.submit(
        GenerationRequest(prompt="x", num_inference_steps=4, seed=1, preview_every_n_steps=2), on_event=listen
    )
    assert done.wait(60)
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.QUEUED and kinds[1] is EventKind.STARTED and kinds[-1] is EventKind.RESULT
    assert [e.step for e in events if e.kind is EventKind.PROGRESS] == [1, 2, 3, 4]
    previews = [e for e in events if e.kind is EventKind.PREVIEW]
    assert [p.step for p in previews] == [2]
    assert previews[0].preview.size == (32, 32)  # latent resolution of a 64x64 image


def test_cancellation_mid_run_releases_pins(sdxl_engine):
    pool = sdxl_engine.model.pool
    holder = {}

    def listen(e):
        if e.kind is EventKind.PROGRESS and e.step == 2:
            holder["h"].cancel()

    holder["h"] = sdxl_engine.submit(
        GenerationRequest(prompt="x", adapters=(("style", 1.0),), num_inference_steps=50, seed=1),
        on_event=listen,
    )
    with pytest.raises(RequestCancelled):
        holder["h"].result(60)
    assert pool.pins("style") == 0


def test_deadline_expiry(sdxl_engine):
    h = sdxl_engine.submit(GenerationRequest(prompt="x", num_inference_steps=500, seed=1, deadline_s=0.3))
    with pytest.raises(DeadlineExceeded, match="deadline"):
        h.result(60)


def test_unknown_adapter_and_bad_parameters_are_refused_at_submit(sdxl_engine):
    with pytest.raises(AdapterNotFound, match="no adapter named 'ghost'"):
        sdxl_engine.submit(GenerationRequest(prompt="x", adapters=(("ghost", 1.0),)))
    with pytest.raises(InvalidRequest, match="must be positive multiples of 2; got 65x64"):
        sdxl_engine.submit(GenerationRequest(prompt="x", width=65))
    with pytest.raises(InvalidRequest, match="above this server's max batch of 16 rows"):
        sdxl_engine.submit(GenerationRequest(prompt="x", num_images=9))
    with pytest.raises(InvalidRequest, match="finite"):
        sdxl_engine.submit(GenerationRequest(prompt="x", adapters=(("dog", float("nan")),)))


def test_an_explicit_guidance_of_zero_counts_one_row_per_image(sdxl_engine):
    """guidance_scale=0.0 means no CFG (1 row per image), not "unset" (the default 5.0 would mean 2):
    16 images fit the 16-row limit, and the same request with the default guidance does not."""
    with pytest.raises(InvalidRequest, match="16 images need 32 rows per step"):
        sdxl_engine.submit(GenerationRequest(prompt="x", num_images=16))
    result = sdxl_engine.generate(
        GenerationRequest(prompt="x", num_images=16, guidance_scale=0.0, num_inference_steps=1, seed=3),
        timeout=120,
    )
    assert len(result.images) == 16


def test_too_many_adapters_are_refused_at_submit_by_the_batch_rule(sdxl_engine):
    adapters = tuple((name, 0.1) for name in ["dog", "style", "a", "b", "c"])
    with pytest.raises(InvalidRequest, match="the request blends 5 adapters; at most 4 per sample"):
        sdxl_engine.submit(GenerationRequest(prompt="x", adapters=adapters))


def test_two_requests_with_the_same_label_both_complete_and_release_their_pins(sdxl_engine):
    """The client's request_id is a label, never the engine's key (a reused id used to make the first
    request hang until its deadline and leave its adapter pinned)."""
    kw = dict(prompt="x", adapters=(("style", 1.0),), num_inference_steps=3, request_id="same")
    events: dict[int, list] = {1: [], 2: []}
    first = sdxl_engine.submit(GenerationRequest(**kw, seed=1), on_event=events[1].append)
    second = sdxl_engine.submit(GenerationRequest(**kw, seed=2), on_event=events[2].append)
    results = [first.result(60), second.result(60)]
    assert [r.request_id for r in results] == ["same", "same"] and [r.seed for r in results] == [1, 2]
    assert first.server_id != second.server_id
    for got in events.values():
        assert [e.kind for e in got if e.kind is EventKind.PROGRESS] == [EventKind.PROGRESS] * 3
        assert {e.request_id for e in got} == {"same"}
    assert sdxl_engine.model.pool.pins("style") == 0


def test_server_ids_are_unique_and_unguessable_and_labels_are_bounded(sdxl_engine):
    handles = [
        sdxl_engine.submit(GenerationRequest(prompt="x", num_inference_steps=1, seed=i)) for i in range(3)
    ]
    ids = [h.server_id for h in handles]
    assert len(set(ids)) == 3 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert [h.request_id for h in handles] == ids  # without a label, events carry the server id
    for h in handles:
        assert h.result(60).request_id == h.server_id
    label = "L" * 128
    labelled = sdxl_engine.submit(GenerationRequest(prompt="x", num_inference_steps=1, request_id=label))
    assert labelled.result(60).request_id == label and labelled.server_id != label
    with pytest.raises(InvalidRequest, match="request_id must be a string of at most 128 characters") as err:
        sdxl_engine.submit(GenerationRequest(prompt="x", request_id="L" * 129))
    assert "LLLL" not in str(err.value)  # the label is not echoed back


def test_an_internal_error_fails_in_flight_requests_with_a_short_message_and_keeps_serving(
    sdxl_engine, caplog
):
    runner = sdxl_engine.runner
    original = runner._forward
    calls = []

    def broken(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("secret internals: tensor at 0xdeadbeef")
        return original(batch)

    runner._forward = broken
    try:
        with caplog.at_level("ERROR", logger="deft_runtime.engine.engine"):
            h = sdxl_engine.submit(
                GenerationRequest(prompt="x", adapters=(("dog", 1.0),), num_inference_steps=4, seed=1)
            )
            with pytest.raises(GenerationFailed) as err:
                h.result(60)
    finally:
        runner._forward = original
    assert str(err.value) == "internal engine error; the server log has the details"
    assert isinstance(err.value.__cause__, RuntimeError)
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "0xdeadbeef" in str(logged[0].exc_info[1]) and "1 in-flight" in logged[0].getMessage()
    assert sdxl_engine.model.pool.pins("dog") == 0
    assert sdxl_engine.generate(
        GenerationRequest(prompt="x", num_inference_steps=2, seed=2), timeout=60
    ).images


def test_full_queue_is_refused(sdxl_adapters):
    engine = serving_engine(build_tiny_sdxl(0), sdxl_adapters, max_active=1, max_queue=2)
    try:
        first = engine.submit(GenerationRequest(prompt="x", num_inference_steps=40, seed=1))
        queued = []
        with pytest.raises(QueueFull, match="queue is full"):
            for _ in range(10):
                queued.append(engine.submit(GenerationRequest(prompt="y", num_inference_steps=1, seed=2)))
        assert 1 <= len(queued) <= 3
        first.result(120)
        for h in queued:
            h.result(120)
    finally:
        engine.shutdown()


def test_a_cancelled_queued_request_frees_its_queue_place_at_once(sdxl_adapters):
    engine = serving_engine(build_tiny_sdxl(0), sdxl_adapters, max_active=1, max_queue=1)
    try:
        running = engine.submit(GenerationRequest(prompt="x", num_inference_steps=200, seed=1))
        deadline = time.monotonic() + 60
        while engine.running == 0:  # admitted: the queue is empty again
            assert time.monotonic() < deadline and not running.future.done()
            time.sleep(0.01)
        waiting = engine.submit(GenerationRequest(prompt="y", num_inference_steps=1, seed=2))
        with pytest.raises(QueueFull):
            engine.submit(GenerationRequest(prompt="z", num_inference_steps=1, seed=3))
        waiting.cancel()
        with pytest.raises(RequestCancelled, match="while queued"):
            waiting.result(60)  # dropped at the next step, while the long request still runs
        assert not running.future.done() and engine.waiting == 0
        replacement = engine.submit(GenerationRequest(prompt="z", num_inference_steps=1, seed=3))
        running.cancel()
        assert replacement.result(120).images
    finally:
        engine.shutdown()


def test_nan_adapter_fails_only_its_own_request(sdxl_adapters):
    engine = serving_engine(build_tiny_sdxl(0), sdxl_adapters)
    try:
        mam = engine.model
        name = next(iter(mam.base_weights))
        d_out, d_in = mam.base_weights[name].shape
        bad = LowRankFactors(B=torch.full((d_out, 1), float("nan")), A=torch.ones(1, d_in))
        mam.register(
            "broken",
            CompiledAdapter(
                kind=load_adapter(sdxl_adapters["dog"]).kind, factors={name: bad}, fingerprint=None
            ),
        )  # type: ignore[arg-type]
        good = engine.submit(
            GenerationRequest(prompt="ok", adapters=(("dog", 1.0),), num_inference_steps=4, seed=9)
        )
        broken = engine.submit(
            GenerationRequest(prompt="bad", adapters=(("broken", 1.0),), num_inference_steps=4, seed=9)
        )
        with pytest.raises(GenerationFailed, match="NaN/Inf .* broken"):
            broken.result(60)
        result = good.result(60)
    finally:
        engine.shutdown()
    ref = reference_image(build_tiny_sdxl, sdxl_adapters["dog"], prompt="ok", num_inference_steps=4, seed=9)
    assert np.abs(as_array(result.images) - ref).max() <= TOL


def test_drain_finishes_admitted_requests_and_refuses_new_ones(sdxl_adapters):
    from deft_runtime.engine import EngineDraining

    engine = serving_engine(build_tiny_sdxl(0), sdxl_adapters)
    try:
        h = engine.submit(GenerationRequest(prompt="x", num_inference_steps=6, seed=1))
        drained = threading.Thread(target=engine.drain, args=(60,))
        drained.start()
        while not engine.draining:
            pass
        with pytest.raises(EngineDraining):
            engine.submit(GenerationRequest(prompt="late"))
        assert h.result(60).steps == 6
        drained.join(60)
    finally:
        engine.shutdown()


def test_pipelines_of_both_families_are_real_diffusers_classes():
    assert isinstance(build_tiny_sdxl(0), StableDiffusionXLPipeline)
    assert isinstance(build_tiny_omnigen(0), OmniGenPipeline)


def test_an_adapter_request_starts_when_its_load_lands_not_after_the_idle_wait(sdxl_adapters):
    """The engine sleeps ``idle_wait_s`` when nothing can run, and a request whose adapter is still
    loading cannot run. With a 60 s idle wait the request must still finish within the 30 s it is
    given: the landed load wakes the engine (liveness, not a timing: without the wake-up it waits 60 s)."""
    engine = serving_engine(build_tiny_sdxl(0), sdxl_adapters, idle_wait_s=60.0)
    try:
        request = GenerationRequest(
            prompt="a dog", seed=0, num_inference_steps=2, width=64, height=64, adapters=(("dog", 1.0),)
        )
        assert len(engine.generate(request, timeout=30).images) == 1
    finally:
        engine.shutdown()
