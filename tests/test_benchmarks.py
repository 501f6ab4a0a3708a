"""Smoke tests of the end-to-end benchmark tooling (no timing is asserted anywhere here).

- the load generator against a real deft server: per-request timestamps in order, summary fields that
  agree with the records, errors counted by status;
- the baseline server (diffusers + PEFT) answers the same protocol and, for the same seed and adapter,
  returns deft's image within 2/255 (one request at a time and grouped), which is what makes the
  comparison honest;
- workload and trace parsing, the loopback guard, the suite registry, and the SDXL preset's model
  (built on the meta device, its config checked; no generation).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from deft_client import DeftClient, DeftError

from benchmarks import loadgen
from benchmarks.__main__ import SUITES
from benchmarks.suites import (
    PRESETS,
    SDXL_TARGET_COUNT,
    SDXL_UNET_PARAMETERS,
    ServerProcess,
    build_random_sdxl_pipeline,
    build_sdxl_unet,
    judge,
    start_server,
    target_shapes,
    write_peft_adapters,
)

TOL = 2 / 255


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench-adapters")
    return write_peft_adapters(target_shapes("tiny-sdxl"), range(2), (4, 8), root, magnitude=0.3)


@pytest.fixture(scope="module")
def servers(
    server_factory, tiny_model_cache: Path, tmp_path_factory: pytest.TempPathFactory, adapters
) -> Iterator[tuple[str, ServerProcess]]:
    """A deft server and a grouped baseline server, started together, both with the two adapters."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DEFT_CACHE_DIR", str(tiny_model_cache))
    mp.setenv("OMP_NUM_THREADS", "1")  # steadier on a busy 2-core machine
    baseline = start_server(
        "baseline-grouped", PRESETS["tiny"], "tiny-sdxl", tmp_path_factory.mktemp("baseline")
    )
    try:
        deft = server_factory.start("--model", "tiny-sdxl", "--backend", "torch")
        baseline.wait_ready(180)
        for address in (deft.address, baseline.address):
            loadgen.register_adapters_sync(address, adapters)
        yield deft.address, baseline
    finally:
        baseline.stop()
        mp.undo()


def test_loadgen_reports_consistent_fields_against_a_real_server(servers, adapters):
    deft, _ = servers
    arrivals = loadgen.poisson_arrivals(
        4, 40.0, list(adapters), loadgen.Popularity.parse("zipf:1.0"), (1, 2), [(32, 32), (64, 64)], seed=3
    )
    arrivals.append(loadgen.Arrival(arrivals[-1].at + 0.01, "no-such-adapter", 1, 32, 32, seed=9))
    run = loadgen.run_load_sync(deft, arrivals, guidance=5.0, timeout_s=120)
    summary = run.summary()

    assert summary["requests"] == summary["sent"] == 5
    assert summary["completed"] == summary["images"] == 4
    assert summary["errors"] == 1 and summary["statuses"] == {"not_found": 1}
    assert summary["throughput_img_s"] == pytest.approx(4 / summary["span_s"])
    lat = summary["latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= max(r.latency_s or 0 for r in run.records)
    for r in run.records[:4]:
        assert r.status == "ok" and r.images == 1
        times = [r.sent_s, r.queued_s, r.started_s, r.first_step_s, r.done_s]
        assert None not in times and times == sorted(t for t in times if t is not None)
        assert r.queue_s is not None and r.queue_s >= 0 and r.server_queue_s is not None
    missing = run.records[4]
    assert missing.done_s is None and "no-such-adapter" in missing.error
    row = loadgen.flat_row(summary)
    assert set(loadgen.ROW_COLUMNS) <= set(row) and row["ok"] == 4


def _images(address: str, requests: list[dict]) -> list[np.ndarray]:
    """Send ``requests`` concurrently (so the grouped baseline can batch them); images in request order."""

    def one(params: dict) -> np.ndarray:
        with DeftClient(address, timeout=120) as client:
            return np.asarray(client.generate("a photo of sks dog", **params)[0], dtype=np.float32) / 255.0

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def test_baseline_images_equal_deft_for_the_same_seed_and_adapter(servers, adapters):
    deft, baseline = servers
    a, b = list(adapters)
    common = dict(steps=3, width=64, height=64, guidance_scale=5.0)
    requests: list[dict[str, Any]] = [
        dict(adapters=[a], seed=1, **common),
        dict(adapters=[a], seed=2, **common),
        dict(adapters=[a], seed=3, **common),
        dict(adapters=[b], seed=1, **common),
        dict(seed=1, **common),
    ]
    ours = _images(deft, requests)
    theirs = _images(baseline.address, requests)
    for i, (x, y) in enumerate(zip(ours, theirs, strict=True)):
        assert np.abs(x - y).max() <= TOL, f"request {i} differs between deft and the baseline"
    assert np.abs(ours[0] - ours[4]).max() > TOL, "the adapter changes the image"
    assert np.abs(ours[0] - ours[3]).max() > TOL, "the two adapters differ"


def test_baseline_reports_errors_with_deft_status_codes(servers, adapters):
    _, baseline = servers
    name, path = next(iter(adapters.items()))
    with DeftClient(baseline.address, timeout=60) as client:
        cases = [
            (grpc.StatusCode.NOT_FOUND, lambda: client.generate("x", adapters=["missing"], steps=1)),
            (grpc.StatusCode.INVALID_ARGUMENT, lambda: client.generate("x", adapters=[(name, 0.5)], steps=1)),
            (grpc.StatusCode.INVALID_ARGUMENT, lambda: client.generate("x", steps=1, width=33)),
            (grpc.StatusCode.ALREADY_EXISTS, lambda: client.register_adapter(name, path)),
            (grpc.StatusCode.NOT_FOUND, lambda: client.get_adapter("missing")),
        ]
        for code, call in cases:
            with pytest.raises(DeftError) as info:
                call()
            assert info.value.code == code, info.value
        assert {a.name for a in client.list_adapters()} == set(adapters)


def test_workload_and_trace_round_trip(tmp_path):
    names = [f"a{i}" for i in range(5)]
    zipf = loadgen.Popularity.parse("zipf:1.0")
    arrivals = loadgen.poisson_arrivals(40, 3.0, names, zipf, (4, 8), [(64, 64), (32, 32)], seed=7)
    again = loadgen.poisson_arrivals(40, 3.0, names[:2], zipf, (4, 8), [(64, 64), (32, 32)], seed=7)
    assert [(a.at, a.steps, a.width, a.seed) for a in arrivals] == [
        (a.at, a.steps, a.width, a.seed) for a in again
    ]
    assert arrivals[0].at == 0 and all(x.at <= y.at for x, y in itertools.pairwise(arrivals))
    assert set(a.adapter for a in arrivals) <= set(names)

    path = loadgen.write_trace(arrivals, tmp_path / "trace.csv")
    back = loadgen.read_trace(path)
    assert [(a.adapter, a.steps, a.width, a.height, a.seed) for a in back] == [
        (a.adapter, a.steps, a.width, a.height, a.seed) for a in arrivals
    ]
    assert [a.at for a in back] == pytest.approx([a.at for a in arrivals], abs=1e-6)

    (tmp_path / "hand.csv").write_text("# a comment\nt,adapter,steps,size\n0.5,,4,32x32\n0.1,dog,8,64x48\n")
    hand = loadgen.read_trace(tmp_path / "hand.csv")
    assert [(a.at, a.adapter, a.steps, a.width, a.height) for a in hand] == [
        (0.1, "dog", 8, 64, 48),
        (0.5, None, 4, 32, 32),
    ]
    (tmp_path / "bad.csv").write_text("t,adapter,steps,size\n0.1,dog,8,64by64\n")
    with pytest.raises(ValueError, match="row 2"):
        loadgen.read_trace(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("t,adapter\n0,dog\n")
    with pytest.raises(ValueError, match="header"):
        loadgen.read_trace(tmp_path / "short.csv")


def test_popularity_laws():
    rng = np.random.default_rng(0)
    names = [f"a{i}" for i in range(10)]
    p = loadgen.Popularity.parse("zipf:1.0").probabilities(4)
    assert p == pytest.approx(np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))
    assert loadgen.Popularity.parse("hot:0.7").probabilities(3) == pytest.approx([0.7, 0.15, 0.15])
    distinct = loadgen.Popularity.parse("distinct").assign(names, 10, rng)
    assert sorted(str(n) for n in distinct) == names
    assert loadgen.Popularity.parse("none").assign(names, 3, rng) == [None] * 3
    hot = loadgen.Popularity.parse("hot:1.0").assign(names, 20, rng)
    assert len(set(hot)) == 1
    for bad in ("zipfy", "hot:2", "zipf:-1"):
        with pytest.raises(ValueError):
            loadgen.Popularity.parse(bad)


def test_loadgen_targets_loopback_only_unless_allowed():
    for target in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "unix:/tmp/deft.sock"):
        assert loadgen.check_target(target) == target
    with pytest.raises(ValueError, match="--allow-remote"):
        loadgen.check_target("10.1.2.3:50051")
    assert loadgen.check_target("10.1.2.3:50051", allow_remote=True) == "10.1.2.3:50051"
    with pytest.raises(ValueError, match="HOST:PORT"):
        loadgen.check_target("127.0.0.1")
    with pytest.raises(SystemExit, match="allow-remote"):
        loadgen.main(["--target", "10.1.2.3:50051", "--popularity", "none"])


def test_every_suite_is_registered_and_importable():
    import importlib

    assert {"kernels", "engine", "loadgen", "adapters-scale", "mixed-vs-base", "cold-load", "memory"} <= set(
        SUITES
    )
    for module in SUITES.values():
        assert callable(importlib.import_module(module).main)


def test_sdxl_preset_builds_the_real_unet_architecture_without_weights():
    unet = build_sdxl_unet("meta")
    config = dict(unet.config)
    assert sum(p.numel() for p in unet.parameters()) == SDXL_UNET_PARAMETERS
    assert config["cross_attention_dim"] == 2048 and tuple(config["block_out_channels"]) == (320, 640, 1280)
    assert tuple(config["transformer_layers_per_block"]) == (1, 2, 10)
    shapes = target_shapes("sdxl")
    assert len(shapes) == SDXL_TARGET_COUNT
    assert set(shapes.values()) == {(640, 640), (1280, 1280), (640, 2048), (1280, 2048)}
    pipe = build_random_sdxl_pipeline("meta", torch.float16)  # what the GPU run builds, without memory
    assert pipe.unet.dtype == torch.float16 and pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.hidden_size == 768 and pipe.text_encoder_2.config.hidden_size == 1280
    assert (
        pipe.text_encoder_2.config.num_hidden_layers == 32 and pipe.vae.config.block_out_channels[-1] == 512
    )
    preset = PRESETS["sdxl"]
    assert preset.model == "sdxl" and preset.device == "cuda"
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in preset.sizes)


def test_targets_say_by_how_much_they_are_missed():
    assert judge(3.3, 3.0)["met"] and "met" in judge(3.3, 3.0)["verdict"]
    assert judge(1.5, 3.0)["verdict"].startswith("MISSED by 50.0%")
    assert judge(4.0, 2.0, at_most=True)["verdict"].startswith("MISSED by 100.0%")
    assert judge(None, 2.0)["verdict"] == "not measured"


def test_registry_suite_measures_both_stores_on_a_real_postgres(postgres_url, tmp_path):
    from benchmarks import registry

    small = ["--adapters", "30", "--lookups", "60", "--blob-mib", "1", "--repeats", "1"]
    payload = registry.main(["--registry", postgres_url, *small, "--results-dir", str(tmp_path)])
    assert set(payload["lookup_us"]) == {"sqlite", "postgresql"}
    assert all(v["p99_us"] >= v["p50_us"] > 0 for v in payload["lookup_us"].values())
    (blob,) = payload["blobs"]
    assert blob["mib"] == 1 and blob["fetch_s"] > 0 and blob["fetch_over_file_read"] > 0
    assert "PostgreSQL ÷ SQLite" in (tmp_path / "registry.md").read_text()


def test_cold_load_components_run_on_the_server_store(tmp_path):
    from benchmarks import cold_load
    from benchmarks.suites import PRESETS

    row = cold_load.component_case("small", {"proj": (16, 8)}, 2, PRESETS["tiny"], tmp_path, repeats=1)
    stages = ("read file ms", "disk → host ms", "host → device ms", "disk → device ms")
    assert row["rank"] == 2 and all(row[stage] > 0 for stage in stages)
    assert row["disk→device / read"] == row["disk → device ms"] / row["read file ms"]


def test_run_suite_measures_in_a_temporary_folder_and_writes_every_report(tmp_path, capsys):
    """The one main of every suite: the payload it writes holds the machine with its load before and
    after, the parameters, what was measured and the wall time; the figure and markdown are written
    beside the JSON, and the temporary work folder is gone afterwards."""
    import json

    from benchmarks.common import run_suite

    seen: list[Path] = []

    def measure(workdir: Path) -> dict:
        (workdir / "scratch").write_text("x")
        seen.append(workdir)
        return {"rows": [{"a": 1.5}]}

    def figure(path: Path, payload: dict) -> None:
        path.write_bytes(b"png")

    payload = run_suite(
        "demo",
        "demo-run",
        measure,
        machine=lambda: {"cpu_count": 2},
        params={"n": 3},
        report=lambda name, p: f"# {name}: {p['rows'][0]['a']}",
        figure=figure,
        out_dir=tmp_path,
    )
    assert payload["suite"] == "demo" and payload["params"] == {"n": 3} and payload["rows"] == [{"a": 1.5}]
    assert set(payload["machine"]) == {"cpu_count", "load_at_start", "load_at_end"}
    assert payload["suite_seconds"] >= 0
    assert json.loads((tmp_path / "demo-run.json").read_text())["rows"] == [{"a": 1.5}]
    assert (tmp_path / "demo-run.md").read_text().strip() == "# demo-run: 1.5"
    assert (tmp_path / "demo-run.png").read_bytes() == b"png"
    assert "# demo-run: 1.5" in capsys.readouterr().out
    assert not seen[0].exists()  # the temporary work folder is removed
    kept = tmp_path / "work"
    kept.mkdir()
    run_suite(
        "demo",
        "kept",
        measure,
        machine=dict,
        params={},
        report=lambda n, p: "",
        workdir=kept,
        out_dir=tmp_path,
    )
    assert seen[-1] == kept and (kept / "scratch").exists()


@pytest.mark.slow
def test_compiled_suite_compiles_once_and_serves_every_mix_without_recompiling(tmp_path):
    """--quick on tiny-sdxl: the compiled engine's warm-up took real time, the timed runs (every request
    its own adapter, then one alone) compiled no new graph, and both engines made the same images."""
    from benchmarks import compiled

    payload = compiled.main(["--quick", "--results-dir", str(tmp_path)])
    (row,) = payload["rows"]
    assert row["model"] == "tiny-sdxl" and row["mode"] == "dynamic" and row["compile_s"] > 1
    assert row["graphs_compiled_while_serving"] == 0
    assert row["max_pixel_diff_255"] <= 2
    assert 0.2 < row["saturated_speedup"] < 5 and 0.2 < row["alone_speedup"] < 5  # both really ran
    assert "tiny-sdxl" in (tmp_path / "compiled-quick.md").read_text()


def test_efficiency_breakdown_never_books_negative_adapter_time():
    """The bare forward comes from separate runs; when noise makes it slower than the instrumented
    forward, the breakdown books the whole forward as bare (adapter layers 0), never a negative share."""
    from types import SimpleNamespace

    from benchmarks import efficiency

    w = SimpleNamespace(rows_per_run=lambda: 32, max_rows=8)  # 4 forwards
    seconds = {"forward": 2.0, "decode": 0.5, "schedule": 0.1}
    slow_bare = efficiency.breakdown(w, 3.0, seconds, bare_forward_s=0.6)  # 2.4 s > 2.0 s measured
    assert slow_bare["bare forward"] == 2.0 / 3.0 and slow_bare["adapter layers"] == 0.0
    fast_bare = efficiency.breakdown(w, 3.0, seconds, bare_forward_s=0.4)
    assert abs(fast_bare["bare forward"] - 1.6 / 3.0) < 1e-12
    assert abs(fast_bare["adapter layers"] - 0.4 / 3.0) < 1e-12
    for parts in (slow_bare, fast_bare):
        assert min(parts.values()) >= 0 and abs(sum(parts.values()) - 1) < 1e-12


def test_efficiency_suite_times_every_phase_of_a_saturated_engine(tmp_path):
    """--quick on tiny-sdxl: the engine ran full-batch forwards (the bare roofline is measured on their
    own inputs), every instrumented phase saw time, the shares add up to the wall time, and the engine's
    methods are its own again afterwards."""
    from benchmarks import efficiency

    payload = efficiency.main(["--quick", "--results-dir", str(tmp_path)])
    (row,) = payload["rows"]
    assert row["model"] == "tiny-sdxl" and 0 < row["efficiency"] < 2
    assert row["bare_rows_s"] > 0 and row["engine_rows_s"] > 0
    parts = row["breakdown"]
    assert set(parts) == set(efficiency.PHASES)
    for phase in (
        "bare forward",
        "row mapping",
        "input assembly",
        "guidance",
        "NaN checks",
        "decode",
        "planning",
    ):
        assert parts[phase] > 0, phase
    assert abs(sum(parts.values()) - 1) < 1e-9
    assert 0.2 < parts["bare forward"] < 1
    latency = row["single_request"]
    for pair in ("deft / diffusers", "deft + adapter / diffusers + PEFT"):
        assert 0.2 < latency[pair] < 5, (pair, latency)  # both sides really ran the same request
    assert (tmp_path / "efficiency-quick.md").read_text().count("tiny-sdxl") >= 2
    assert (tmp_path / "efficiency-quick.png").stat().st_size > 0

    class Thing:
        def f(self) -> int:
            return 1

    thing, timer = Thing(), efficiency.PhaseTimer()
    timer.wrap(thing, "f", "f")
    assert "f" in vars(thing) and thing.f() == 1 and timer.seconds["f"] > 0
    timer.restore()
    assert "f" not in vars(thing)  # the class's method again


def test_omnigen_rope_suite_shows_exact_positions_cost_forwards_and_keep_pipeline_images(tmp_path):
    """Variable-length multimodal prompts: the exact setting keeps every image equal to the pipeline's
    and splits the batch; the inexact one batches them all."""
    from benchmarks import omnigen_rope

    payload = omnigen_rope.main(["--requests", "5", "--steps", "2", "--results-dir", str(tmp_path)])
    exact, inexact = payload["settings"]
    assert exact["omnigen_exact_rope"] and not inexact["omnigen_exact_rope"]
    assert exact["images_within_2_255"] == exact["images"] == 5
    assert exact["forwards"] > inexact["forwards"] and inexact["rows_per_forward"] > exact["rows_per_forward"]
    assert (tmp_path / "omnigen-rope.md").read_text().count("|") > 10
