"""End to end against one real server process (started with ``deft serve``) over loopback gRPC:
registration in three formats, fidelity against diffusers (+PEFT), streaming, metrics, health and
reflection, the CLI round trip, and every error path with its status code.

The server requires a token, so every call here also exercises authentication.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import math
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from deft_cli.app import app
from deft_client import AsyncDeftClient, DeftClient, DeftError, Preview, Progress, Queued, Result, Started
from deft_client.proto import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from diffusers import StableDiffusionXLPipeline
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from peft import DeftConfig, LoraConfig, PeftModel, get_peft_model
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file
from typer.testing import CliRunner

from deft_runtime.adapter import AdapterKind, BaseFingerprint
from deft_runtime.formats import load_adapter, save_adapter
from deft_runtime.models import build_tiny_sdxl
from deft_runtime.testing import random_adapter

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TOL = 2 / 255
TOKEN = "s3cret"
CODE = grpc.StatusCode
FLAGS = (
    *("--token", TOKEN, "--max-upload-size", "1MiB", "--max-message-size", "1MiB"),
    *("--max-adapters-per-request", "2", "--max-prompt-chars", "300", "--max-steps", "200"),
)


# ---------------------------------------------------------------------------- adapters and oracle


def _peft_dir(denoiser, config, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(denoiser), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "deft_R" in name or "lora_B" in name:
                p.mul_(8.0)  # strong enough to change the image visibly
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """dog: PEFT DEFT dir; style: diffusers single-file LoRA (+ its PEFT dir); own: deft's own file."""
    root = tmp_path_factory.mktemp("adapters")
    unet = build_tiny_sdxl(0).unet
    dog = _peft_dir(
        unet,
        DeftConfig(r=4, target_modules=TARGETS, decomposition_method="qr", init_weights=False),
        root / "dog",
        1,
    )
    style_peft = _peft_dir(
        unet,
        LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
        root / "style_peft",
        2,
    )
    layers = {
        k.removeprefix("base_model.model."): v
        for k, v in load_file(style_peft / "adapter_model.safetensors").items()
    }
    StableDiffusionXLPipeline.save_lora_weights(root / "style", unet_lora_layers=layers)
    own_peft = _peft_dir(
        unet,
        DeftConfig(r=2, target_modules=TARGETS, decomposition_method="relu", init_weights=False),
        root / "own_peft",
        3,
    )
    own = save_adapter(load_adapter(own_peft), root / "own.deft.safetensors")
    return {
        "dog": dog,
        "style": root / "style" / "pytorch_lora_weights.safetensors",
        "style_peft": style_peft,
        "own": own,
        "own_peft": own_peft,
    }


def reference(peft_dir: Path | None = None, lora_file: Path | None = None, **kwargs) -> np.ndarray:
    """diffusers' own pipeline; the adapter attached through PEFT or diffusers' LoRA loader."""
    pipe = build_tiny_sdxl(0)
    if peft_dir is not None:
        pipe.unet = PeftModel.from_pretrained(pipe.unet, peft_dir).get_base_model()
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    seed = kwargs.pop("seed")
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


# ---------------------------------------------------------------------------- server and clients


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start(*FLAGS, via_cli=True)


@pytest.fixture(scope="module")
def client(server):
    with DeftClient(server.address, token=TOKEN, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def registered(client, files):
    """The three formats, registered once for the module."""
    return {
        "dog": client.register_adapter("dog", files["dog"], metadata={"owner": "tests"}),
        "style": client.register_adapter("style", files["style"]),
        "own": client.register_adapter("own", files["own"]),
    }


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(DeftError) as info:
        call()
    return info.value.code


# ---------------------------------------------------------------------------- registry


def test_register_three_formats_then_list_get_delete(client, registered, files):
    dog, style, own = registered["dog"], registered["style"], registered["own"]
    assert (dog.kind, dog.decomposition, dog.source_format, dog.ranks) == ("deft", "qr", "peft", (4,))
    assert (style.kind, style.decomposition, style.source_format, style.ranks) == (
        "lora",
        "",
        "diffusers",
        (4,),
    )
    assert (own.kind, own.decomposition, own.source_format, own.ranks) == ("deft", "relu", "deft", (2,))
    assert dog.target_count == style.target_count == own.target_count == 48
    assert style.sha256 == hashlib.sha256(files["style"].read_bytes()).hexdigest()
    assert style.size_bytes == files["style"].stat().st_size
    assert dog.metadata == {"owner": "tests"} and dog.state == "ready" and dog.compiled_bytes > 0
    assert abs(time.time() - dog.created_at.timestamp()) < 300

    client.register_adapter("temp", files["own"])  # the same bytes under a second name share one blob
    assert [a.name for a in client.list_adapters()] == ["dog", "own", "style", "temp"]
    assert client.get_adapter("temp").sha256 == own.sha256
    client.delete_adapter("temp")
    assert code_of(lambda: client.get_adapter("temp")) is CODE.NOT_FOUND
    assert [a.name for a in client.list_adapters()] == ["dog", "own", "style"]
    assert client.get_adapter("own").sha256 == own.sha256  # its blob survived the other name's deletion


# ---------------------------------------------------------------------------- generation


def test_concurrent_generations_with_different_adapters_match_diffusers(server, registered, files):
    specs = {
        "dog": dict(prompt="a dog on a beach", adapters=[("dog", 1.0)], steps=6, guidance_scale=5.0, seed=1),
        "style": dict(
            prompt="a city at night", adapters=[("style", 1.0)], steps=4, guidance_scale=1.0, seed=2
        ),
        "own": dict(prompt="a tree", adapters=["own"], steps=4, seed=3, negative_prompt="blurry"),
        "none": dict(prompt="a cat", steps=3, guidance_scale=3.0, seed=4, num_images=2),
    }

    async def run() -> dict[str, list]:
        async with AsyncDeftClient(server.address, token=TOKEN, timeout=120) as c:
            results: dict[str, list] = {}
            others: list[asyncio.Task] = []
            async for event in c.generate_stream(**specs["dog"]):
                if isinstance(event, Progress) and event.step == 1:  # the others join mid-run
                    others = [asyncio.create_task(c.generate(**specs[k])) for k in ("style", "own", "none")]
                if isinstance(event, Result):
                    results["dog"] = event.images
            for key, task in zip(("style", "own", "none"), others, strict=True):
                results[key] = await task
            return results

    before = scrape(server)
    got = asyncio.run(run())
    after = scrape(server)
    mixed = (
        ("deft_batch_distinct_adapters_count", ()),
        ("deft_batch_distinct_adapters_bucket", (("le", "1.0"),)),
    )
    assert (after[mixed[0]] - after[mixed[1]]) > (before[mixed[0]] - before[mixed[1]]), (
        "no mixed-adapter forward"
    )

    oracle = {
        "dog": dict(peft_dir=files["dog"]),
        "style": dict(lora_file=files["style"]),
        "own": dict(peft_dir=files["own_peft"]),
        "none": {},
    }
    for key, spec in specs.items():
        spec = dict(spec)
        spec.pop("adapters", None)
        ref = reference(
            **oracle[key],
            prompt=spec.pop("prompt"),
            num_inference_steps=spec.pop("steps"),
            num_images_per_prompt=spec.pop("num_images", 1),
            **spec,
        )
        image = as_array(got[key])
        assert image.shape == ref.shape
        assert np.abs(image - ref).max() <= TOL, f"{key}: off by {np.abs(image - ref).max() * 255:.2f}/255"
    assert (
        np.abs(
            as_array(got["dog"]) - reference(prompt="a dog on a beach", num_inference_steps=6, seed=1)
        ).max()
        > 10 / 255
    )


def test_stream_events_arrive_in_order(client):
    events = list(
        client.generate_stream("a fox", steps=4, seed=5, preview_every_n_steps=2, request_id="fox-1")
    )
    kinds = [type(e) for e in events]
    assert kinds == [Queued, Started, Progress, Progress, Preview, Progress, Progress, Result]
    assert events[0].position >= 1 and events[1].total_steps == 4
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3, 4]
    preview = next(e for e in events if isinstance(e, Preview))
    assert preview.step == 2 and preview.image.size == (32, 32)
    result = events[-1]
    assert {e.request_id for e in events} == {"fox-1"}
    assert result.seed == 5 and result.steps == 4 and result.images[0].size == (64, 64)


def test_unset_fields_take_the_model_defaults(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        reply = stub.GenerateOnce(
            generation_pb2.GenerateRequest(prompt="x", num_inference_steps=2),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
            timeout=60,
        )
    images = reply.result.images
    assert len(images) == 1 and (images[0].width, images[0].height) == (64, 64)  # tiny-sdxl's default size
    assert reply.request_id and reply.result.steps == 2


# ---------------------------------------------------------------------------- metrics, health, reflection


def test_metrics_count_the_requests_sent(server, client, registered):
    before = scrape(server)
    for seed in (1, 2):
        client.generate("m", adapters=["dog"], steps=2, seed=seed, num_images=2)
    client.generate("m", steps=2, seed=3)
    for bad in (dict(steps=0), dict(width=3)):
        with pytest.raises(DeftError):
            client.generate("m", **bad)
    with pytest.raises(DeftError):
        client.generate("m", adapters=["ghost"])
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("deft_requests_total", status="ok") == 3
    assert delta("deft_requests_total", status="invalid_argument") == 2
    assert delta("deft_requests_total", status="not_found") == 1
    assert delta("deft_images_generated_total") == 5
    assert delta("deft_request_latency_seconds_count") == 3  # only what the engine accepted
    assert delta("deft_queue_wait_seconds_count") == 3
    assert delta("deft_denoise_step_seconds_count") >= 2 and delta("deft_batch_size_count") >= 2
    assert after[("deft_adapters_registered", ())] == 3
    assert after[("deft_requests_running", ())] == 0 and after[("deft_requests_waiting", ())] == 0
    assert after[("deft_adapters_resident", (("tier", "device"),))] >= 1
    # the CPU pool reads a cold adapter's compiled file straight into its device pages (no host tier)
    assert after[("deft_adapter_loads_total", (("tier", "device"),))] >= 1
    assert after[("deft_adapter_load_seconds_count", ())] >= 1
    assert delta("deft_adapter_cache_hits_total") >= 1
    for name in ("deft_adapter_evictions_total", "deft_adapter_cache_misses_total"):
        assert any(key[0] == name for key in after)
    assert after[("deft_request_latency_seconds_bucket", (("le", "1800.0"),))] >= 3  # buckets reach minutes


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as channel:  # both work without the token
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "deft.v1.GenerationService", "deft.v1.AdapterService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"deft.v1.GenerationService", "deft.v1.AdapterService", "grpc.health.v1.Health"} <= names


# ---------------------------------------------------------------------------- CLI


def test_cli_round_trip(server, files, tmp_path):
    runner = CliRunner()
    common = ["--server", server.address, "--token", TOKEN]
    result = runner.invoke(app, ["adapters", "register", "cli-dog", str(files["dog"]), *common])
    assert result.exit_code == 0, result.output
    assert "registered cli-dog: deft (qr), 48 layers" in result.output
    result = runner.invoke(app, ["adapters", "list", *common])
    assert result.exit_code == 0 and "cli-dog" in result.output
    result = runner.invoke(app, ["adapters", "show", "cli-dog", *common])
    assert result.exit_code == 0 and "sha256" in result.output
    out = tmp_path / "images" / "x.png"
    args = [
        "generate",
        "--prompt",
        "a dog",
        "--adapter",
        "cli-dog:0.5",
        "--steps",
        "2",
        "--seed",
        "3",
        "--num-images",
        "2",
        "--out",
        str(out),
        *common,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "images" / "x_0.png").is_file() and (tmp_path / "images" / "x_1.png").is_file()
    assert "seed 3, 2 steps" in result.output
    result = runner.invoke(
        app, ["generate", "--prompt", "a", "--adapter", "ghost", "--out", str(out), *common]
    )
    assert result.exit_code == 1 and "NOT_FOUND: no adapter named 'ghost'" in result.output
    result = runner.invoke(app, ["adapters", "delete", "cli-dog", *common])
    assert result.exit_code == 0 and "deleted cli-dog" in result.output
    result = runner.invoke(app, ["adapters", "list", "--server", server.address])
    assert result.exit_code == 1 and "UNAUTHENTICATED" in result.output


# ---------------------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    "params, code, message",
    [
        (dict(width=65), CODE.INVALID_ARGUMENT, "multiples of 2"),
        (dict(steps=0), CODE.INVALID_ARGUMENT, "num_inference_steps must be between 1 and 200"),
        (dict(steps=500), CODE.INVALID_ARGUMENT, "between 1 and 200"),
        (dict(num_images=50), CODE.INVALID_ARGUMENT, "num_images"),
        (dict(width=8192, height=8192), CODE.INVALID_ARGUMENT, "pixels"),
        (dict(width=-64), CODE.INVALID_ARGUMENT, "width"),
        (dict(guidance_scale=math.inf), CODE.INVALID_ARGUMENT, "guidance_scale"),
        (dict(prompt="p" * 301), CODE.INVALID_ARGUMENT, "at most 300"),
        (dict(adapters=[("dog", math.nan)]), CODE.INVALID_ARGUMENT, "finite"),
        (dict(adapters=[("dog", 1e6)]), CODE.INVALID_ARGUMENT, "finite number in"),
        (dict(adapters=["dog", "style", "own"]), CODE.INVALID_ARGUMENT, "at most 2 per request"),
        (dict(adapters=["dog", "dog"]), CODE.INVALID_ARGUMENT, "listed twice"),
        (dict(adapters=["ghost"]), CODE.NOT_FOUND, "no adapter named 'ghost'"),
        (dict(prompt="p" * (2 << 20)), CODE.RESOURCE_EXHAUSTED, ""),  # above --max-message-size
    ],
)
def test_bad_generation_requests(client, registered, params, code, message):
    params = {"prompt": "x", "steps": 2, **params}
    with pytest.raises(DeftError) as info:
        client.generate(**params)
    assert info.value.code is code and message in info.value.message
    if code is not CODE.RESOURCE_EXHAUSTED:
        assert info.value.reason  # google.rpc.ErrorInfo came through


def _pickle_file(path: Path) -> Path:
    torch.save({"w": torch.ones(2)}, path)
    return path


def _native(path: Path, **overrides) -> Path:
    """A deft-format adapter for tiny-sdxl, with one thing broken."""
    shapes = {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}
    shapes.update(overrides.pop("shapes", {}))
    adapter = random_adapter(AdapterKind.DEFT, shapes, rank=2, seed=4)
    if overrides.pop("nan", False):
        next(iter(adapter.layers.values())).P[0, 0] = math.nan
    if overrides.pop("fingerprint", False):
        adapter.fingerprint = BaseFingerprint({name: (32, 32) for name in shapes})
    return save_adapter(adapter, path)


def _tar(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo("adapter_model.safetensors")
            info.type, info.linkname = tarfile.SYMTYPE, symlink
            archive.addfile(info)
    return path


UNET = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
UPLOADS = {
    "pickle": (lambda d: _pickle_file(d / "adapter.bin"), CODE.INVALID_ARGUMENT, "never unpickles"),
    "pickle-renamed": (lambda d: _pickle_file(d / "a.safetensors"), CODE.INVALID_ARGUMENT, "pickle"),
    "garbage": (lambda d: _write(d / "g.safetensors", b"\x00" * 2000), CODE.INVALID_ARGUMENT, "safetensors"),
    "text": (
        lambda d: _write(d / "t.safetensors", b"hello, not an adapter" * 50),
        CODE.INVALID_ARGUMENT,
        "header",
    ),
    "nan": (lambda d: _native(d / "n.deft.safetensors", nan=True), CODE.INVALID_ARGUMENT, "NaN"),
    "shapes": (
        lambda d: _native(d / "s.deft.safetensors", shapes={f"{UNET}.to_k": (64, 63)}),
        CODE.INVALID_ARGUMENT,
        "[64 x 63] weight",
    ),
    "unknown-module": (
        lambda d: _native(d / "u.deft.safetensors", shapes={"mid_block.nope.to_q": (64, 64)}),
        CODE.INVALID_ARGUMENT,
        "no adapter target",
    ),
    "other-base": (
        lambda d: _native(d / "f.deft.safetensors", fingerprint=True),
        CODE.FAILED_PRECONDITION,
        "made for base",
    ),
    "too-large": (
        lambda d: _write(d / "big.safetensors", b"\x00" * ((1 << 20) + 1)),
        CODE.RESOURCE_EXHAUSTED,
        "limit",
    ),
    "tar-traversal": (
        lambda d: _tar(d / "t.tar", {"../../evil.json": b"{}"}),
        CODE.INVALID_ARGUMENT,
        "not a plain file",
    ),
    "tar-absolute": (
        lambda d: _tar(d / "t.tar", {"/tmp/evil.json": b"{}"}),
        CODE.INVALID_ARGUMENT,
        "not a plain file",
    ),
    "tar-symlink": (
        lambda d: _tar(d / "t.tar", {"adapter_config.json": b"{}"}, symlink="/etc/passwd"),
        CODE.INVALID_ARGUMENT,
        "link",
    ),
    "tar-empty-dir": (lambda d: _tar(d / "t.tar", {"x/readme.md": b"hi"}), CODE.INVALID_ARGUMENT, ""),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(UPLOADS))
def test_bad_uploads_are_refused_and_leave_nothing(client, server, tmp_path, case):
    make, code, message = UPLOADS[case]
    path = make(tmp_path)
    with pytest.raises(DeftError) as info:
        client.register_adapter(f"bad-{case}", path)
    assert info.value.code is code, info.value
    assert message in info.value.message
    assert f"bad-{case}" not in {a.name for a in client.list_adapters()}
    leftovers = [p for p in (server.data_dir / "tmp").rglob("*") if not p.is_dir()]
    assert not leftovers, f"a refused upload left temporary files: {leftovers}"
    assert not Path("/tmp/evil.json").exists() and not (server.data_dir.parent / "evil.json").exists()


def test_registry_name_and_upload_protocol_errors(client, server, registered, files):
    assert code_of(lambda: client.register_adapter("dog", files["own"])) is CODE.ALREADY_EXISTS
    for name in ("../x", "a/b", "a b", "", "..", "x" * 200):
        assert code_of(lambda n=name: client.register_adapter(n, files["own"])) is CODE.INVALID_ARGUMENT
    assert code_of(lambda: client.get_adapter("ghost")) is CODE.NOT_FOUND
    assert code_of(lambda: client.delete_adapter("ghost")) is CODE.NOT_FOUND
    assert code_of(lambda: client.register_adapter("x", files["dog"] / "missing")) is CODE.INVALID_ARGUMENT

    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(server.address) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)

        def upload(*chunks):
            return lambda: stub.RegisterAdapter(iter(chunks), metadata=metadata, timeout=30)

        header = adapters_pb2.RegisterAdapterChunk(header=adapters_pb2.AdapterUpload(name="proto"))
        data = adapters_pb2.RegisterAdapterChunk(data=files["own"].read_bytes())
        for call, code in [
            (upload(data), CODE.INVALID_ARGUMENT),  # no header first
            (upload(header, header), CODE.INVALID_ARGUMENT),  # a second header
            (
                upload(
                    adapters_pb2.RegisterAdapterChunk(
                        header=adapters_pb2.AdapterUpload(name="p", sha256="00")
                    )
                ),
                CODE.INVALID_ARGUMENT,
            ),
            (
                upload(
                    adapters_pb2.RegisterAdapterChunk(
                        header=adapters_pb2.AdapterUpload(name="p", size_bytes=1 << 40)
                    )
                ),
                CODE.RESOURCE_EXHAUSTED,
            ),
            (
                upload(header, *[adapters_pb2.RegisterAdapterChunk(data=b"\x00" * (256 << 10))] * 5),
                CODE.RESOURCE_EXHAUSTED,
            ),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() is code, info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # no token
            adapters_pb2_grpc.AdapterServiceStub(channel).ListAdapters(
                adapters_pb2.ListAdaptersRequest(), timeout=10
            )
        assert info.value.code() is CODE.UNAUTHENTICATED


def test_deadline_cancel_and_delete_in_use(server, client, files):
    client.register_adapter("busy", files["own"])
    with pytest.raises(DeftError) as info:
        client.generate("x", steps=200, timeout=0.5)
    assert info.value.code is CODE.DEADLINE_EXCEEDED

    stream = client.generate_stream("x", adapters=["busy"], steps=200, seed=1)
    for event in stream:
        if isinstance(event, Progress):
            break  # mid-run, holding its adapter
    assert code_of(lambda: client.delete_adapter("busy")) is CODE.FAILED_PRECONDITION
    stream.close()  # the client leaves: the server cancels the request at its next step
    deadline = time.monotonic() + 30
    while scrape(server)[("deft_requests_running", ())] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scrape(server)[("deft_requests_total", (("status", "cancelled"),))] >= 1
    while True:  # the engine drops the request's pins right after it leaves the running set
        try:
            client.delete_adapter("busy")
            break
        except DeftError as e:
            assert e.code is CODE.FAILED_PRECONDITION and time.monotonic() < deadline
            time.sleep(0.05)
    assert "busy" not in {a.name for a in client.list_adapters()}


def test_concurrent_registrations_of_one_name_leave_one(server, files):
    outcomes: list[object] = []

    def register() -> None:
        with DeftClient(server.address, token=TOKEN) as c:
            try:
                outcomes.append(c.register_adapter("race", files["own"]))
            except DeftError as e:
                outcomes.append(e.code)

    threads = [threading.Thread(target=register) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(1 for o in outcomes if not isinstance(o, grpc.StatusCode)) == 1
    assert [o for o in outcomes if isinstance(o, grpc.StatusCode)] == [CODE.ALREADY_EXISTS] * 2
    with DeftClient(server.address, token=TOKEN) as c:
        c.delete_adapter("race")
