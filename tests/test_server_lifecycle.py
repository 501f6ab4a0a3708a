"""The server's life across processes: kill -9 in the middle of an upload, restart on the same data
folder (registry kept, compiled factors reused, nothing half-registered), a full queue, and SIGTERM
draining (the in-flight request completes, new ones get UNAVAILABLE, exit code 0)."""

from __future__ import annotations

import copy
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from deft_client import DeftClient, DeftError, Progress, Result
from deft_client.proto import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from peft import DeftConfig, get_peft_model
from prometheus_client.parser import text_string_to_metric_families

from deft_runtime.models import build_tiny_sdxl

CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = DeftConfig(r=2, target_modules=["to_q", "to_v"], decomposition_method="qr", init_weights=False)
    model = get_peft_model(copy.deepcopy(build_tiny_sdxl(0).unet), config)
    path = tmp_path_factory.mktemp("adapters") / "keep"
    model.save_pretrained(path)
    return path


def _stalled_upload(address: str, stall: threading.Event) -> grpc.Future:
    """A RegisterAdapter call that sends its header and one chunk, then waits (the upload hangs)."""

    def chunks():
        yield adapters_pb2.RegisterAdapterChunk(header=adapters_pb2.AdapterUpload(name="partial"))
        yield adapters_pb2.RegisterAdapterChunk(data=b"\x00" * 4096)
        stall.wait(60)

    channel = grpc.insecure_channel(address)
    return adapters_pb2_grpc.AdapterServiceStub(channel).RegisterAdapter.future(chunks(), timeout=60)


@pytest.fixture(scope="module")
def restarted(server_factory, peft_dir):
    """Life 1: register 'keep', then die by SIGKILL mid-upload. Life 2 (returned): same data folder."""
    first = server_factory.start()
    with DeftClient(first.address) as c:
        c.register_adapter("keep", peft_dir)
    stall = threading.Event()
    upload = _stalled_upload(first.address, stall)
    deadline = time.monotonic() + 30
    while not any((first.data_dir / "tmp").glob("*/upload-*.part")):
        assert time.monotonic() < deadline, "the upload never reached the server"
        time.sleep(0.02)
    first.send(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    stall.set()
    with pytest.raises(grpc.RpcError):
        upload.result(30)
    second = server_factory.start(  # a long grace period: a 60-step request on a busy 2-core machine
        *("--max-active", "1", "--max-queue", "1", "--grace-period", str(DRAIN_GRACE_S)),
        data_dir=first.data_dir,
        prelude=SLOW_LOAD,
        wait=False,
    )
    _expect_not_serving_while_loading(second)
    return second.wait_ready()


#: what the drain test's server gives in-flight requests after SIGTERM (they must finish, however slowly)
DRAIN_GRACE_S = 300

SLOW_LOAD = """
import time, deft_server.app as app
real = app.load_runtime
app.load_runtime = lambda *args: (time.sleep(3), real(*args))[1]
"""


def _expect_not_serving_while_loading(server) -> None:
    """Listening, NOT_SERVING, and refusing calls with UNAVAILABLE until the model is loaded."""
    fast_retry = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 100)]
    with grpc.insecure_channel(server.address, options=fast_retry) as channel:
        grpc.channel_ready_future(channel).result(timeout=120)  # connects as soon as it listens
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with DeftClient(server.address) as c, pytest.raises(DeftError) as info:
        c.list_adapters()
    assert info.value.code is CODE.UNAVAILABLE and "still loading" in info.value.message


def test_restart_keeps_the_registry_without_partial_uploads_or_recompiling(restarted):
    with DeftClient(restarted.address) as c:
        assert [a.name for a in c.list_adapters()] == ["keep"]
        assert c.get_adapter("keep").state == "ready"
        images = c.generate("x", adapters=["keep"], steps=2, seed=1)
    assert images[0].size == (64, 64)
    log = restarted.log()
    assert "1 adapters (1 from the compiled cache, 0 compiled, 0 incompatible)" in log
    assert "compiling adapter" not in log, "a restart on the same base recompiled an adapter"
    leftovers = [p for p in (restarted.data_dir / "tmp").rglob("*") if not p.is_dir()]
    assert not leftovers, f"the killed upload left its temporary file: {leftovers}"
    assert len(list((restarted.data_dir / "blobs").glob("*/*/*"))) == 1


def _stream_in_background(
    address: str, steps: int, stop: threading.Event | None = None
) -> tuple[list[object], threading.Event, threading.Thread]:
    """Stream one request on a thread; ``started`` is set at its first step; ``stop`` abandons it."""
    events: list[object] = []
    started = threading.Event()

    def run() -> None:
        with DeftClient(address) as c:
            stream = c.generate_stream("long", steps=steps, seed=2)
            try:
                for event in stream:
                    events.append(event)
                    if isinstance(event, Progress):
                        started.set()
                    if stop is not None and stop.is_set():
                        break
            except DeftError as e:
                events.append(e)
                started.set()
            finally:
                stream.close()  # leaving the stream cancels the request on the server

    thread = threading.Thread(target=run)
    thread.start()
    return events, started, thread


def _gauge(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples[name]


def test_full_queue_is_resource_exhausted(restarted):
    stop = threading.Event()
    events, started, thread = _stream_in_background(restarted.address, steps=150, stop=stop)
    assert started.wait(60)
    assert not isinstance(events[-1], DeftError), events[-1]
    channel = grpc.insecure_channel(restarted.address)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    queued = stub.GenerateOnce.future(
        generation_pb2.GenerateRequest(prompt="q", num_inference_steps=1), timeout=60
    )
    deadline = time.monotonic() + 30
    while (
        _gauge(restarted, "deft_requests_waiting") < 1
    ):  # the second request waits behind the first (max-active 1)
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)
    with DeftClient(restarted.address) as c, pytest.raises(DeftError) as info:
        c.generate("third", steps=1, timeout=30)  # the queue (max-queue 1) is full
    assert info.value.code is CODE.RESOURCE_EXHAUSTED
    assert "queue is full" in info.value.message and info.value.reason == "QUEUE_FULL"
    queued.cancel()
    channel.close()
    stop.set()
    thread.join(60)
    assert not isinstance(events[-1], Result), "the long request was abandoned, not finished"
    deadline = time.monotonic() + 30
    while _gauge(restarted, "deft_requests_waiting") or _gauge(restarted, "deft_requests_running"):
        assert time.monotonic() < deadline, "the abandoned requests never left the engine"
        time.sleep(0.02)


def test_sigterm_drains_in_flight_requests_and_exits_zero(restarted):
    events, started, thread = _stream_in_background(restarted.address, steps=60)
    assert started.wait(120)
    assert not isinstance(events[-1], DeftError), events[-1]
    restarted.send(signal.SIGTERM)
    with grpc.insecure_channel(restarted.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        while (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            != health_pb2.HealthCheckResponse.NOT_SERVING
        ):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    with DeftClient(restarted.address) as c, pytest.raises(DeftError) as info:
        c.generate("late", steps=1)
    assert info.value.code is CODE.UNAVAILABLE
    thread.join(DRAIN_GRACE_S)
    assert isinstance(events[-1], Result), events[-1]
    assert events[-1].steps == 60
    assert restarted.wait(60) == 0
    assert "stopped" in restarted.log()


def test_a_model_that_cannot_load_exits_1_with_the_reason(server_factory):
    server = server_factory.start("--model", "/nonexistent/model", wait=False)
    assert server.wait(120) == 1
    assert "could not start serving: model '/nonexistent/model' looks like a local path" in server.log()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_root_certificates(server_factory, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server = server_factory.start("--tls-cert", str(cert), "--tls-key", str(key), wait=False)
    with DeftClient(f"localhost:{server.port}", root_certificates=cert, timeout=60) as c:
        c.wait_ready(120)
        assert c.list_adapters() == []
        assert c.generate("x", steps=1, seed=1)[0].size == (64, 64)
    with DeftClient(server.address, timeout=5) as plain, pytest.raises(DeftError) as info:
        plain.list_adapters()  # a plaintext client cannot talk to a TLS server
    assert info.value.code is CODE.UNAVAILABLE
