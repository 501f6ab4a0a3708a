"""Server and client pieces that need no server process: the error mapping, settings, request
conversion, the generated stubs, and the engine's asyncio contract the server relies on."""

from __future__ import annotations

import asyncio
import filecmp
import importlib.metadata
import inspect
import subprocess
import sys
import tarfile
from pathlib import Path

import deft_server.errors as server_errors
import grpc
import pytest
from deft_client import DeftError
from deft_client.proto import generation_pb2
from deft_client.wire import adapter_refs, generate_request, upload_chunks
from deft_server.config import ServerSettings
from deft_server.convert import generation_request
from deft_server.errors import status_code_of, to_status
from google.rpc import error_details_pb2, status_pb2

import deft_runtime.engine as engine_module
import deft_runtime.errors as runtime_errors
from deft_runtime.errors import DeftError as RuntimeDeftError
from deft_runtime.errors import InvalidRequest

ROOT = Path(__file__).resolve().parents[1]
CODE = grpc.StatusCode
DETAILS_KEY = "grpc-status-details-bin"


# ---------------------------------------------------------------------------- error mapping

EXPECTED = {
    "InvalidAdapter": CODE.INVALID_ARGUMENT,
    "UnsafeAdapterFormat": CODE.INVALID_ARGUMENT,
    "AdapterFormatError": CODE.INVALID_ARGUMENT,
    "AdapterTooLarge": CODE.INVALID_ARGUMENT,
    "NonFiniteAdapter": CODE.INVALID_ARGUMENT,
    "AdapterDtypeError": CODE.INVALID_ARGUMENT,
    "RankError": CODE.INVALID_ARGUMENT,
    "UnknownTargetModule": CODE.INVALID_ARGUMENT,
    "AdapterShapeError": CODE.INVALID_ARGUMENT,
    "InvalidRequest": CODE.INVALID_ARGUMENT,
    "AdapterOutputNotFinite": CODE.INVALID_ARGUMENT,
    "AdapterIncompatible": CODE.FAILED_PRECONDITION,
    "AdapterInUse": CODE.FAILED_PRECONDITION,
    "AdapterNotFound": CODE.NOT_FOUND,
    "AdapterExists": CODE.ALREADY_EXISTS,
    "PoolExhausted": CODE.RESOURCE_EXHAUSTED,
    "QueueFull": CODE.RESOURCE_EXHAUSTED,
    "UploadTooLarge": CODE.RESOURCE_EXHAUSTED,
    "EngineDraining": CODE.UNAVAILABLE,
    "NotReady": CODE.UNAVAILABLE,
    "RegistryUnavailable": CODE.UNAVAILABLE,
    "DeadlineExceeded": CODE.DEADLINE_EXCEEDED,
    "RequestCancelled": CODE.CANCELLED,
    "GenerationFailed": CODE.INTERNAL,  # a failure of the server, not of the request
    "ModelLoadError": CODE.INTERNAL,  # only at start-up
    "DeftError": CODE.INTERNAL,
}


def _typed_errors() -> dict[str, type[BaseException]]:
    found = {}
    for module in (runtime_errors, engine_module, server_errors):
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, RuntimeDeftError):
                found[name] = cls
    return found


def test_every_typed_error_has_its_status_code():
    errors = _typed_errors()
    assert set(errors) == set(EXPECTED), (
        "a new typed error needs its status code here and in deft_server.errors"
    )
    for name, cls in errors.items():
        assert status_code_of(cls("x")) is EXPECTED[name], name


def test_status_carries_google_rpc_details():
    status = to_status(server_errors.AdapterExists("an adapter named 'x' is already registered"))
    assert (
        status.code is CODE.ALREADY_EXISTS and status.details == "an adapter named 'x' is already registered"
    )
    details = dict(status.trailing_metadata)[DETAILS_KEY]
    rich = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info) and (info.reason, info.domain) == ("ADAPTER_EXISTS", "deft.v1")
    queue_full = status_pb2.Status.FromString(
        dict(to_status(engine_module.QueueFull("full")).trailing_metadata)[DETAILS_KEY]
    )
    retry = error_details_pb2.RetryInfo()
    assert queue_full.details[1].Unpack(retry) and retry.retry_delay.seconds == 1


def test_unexpected_errors_are_internal_without_leaking_their_text():
    status = to_status(KeyError("/secret/path"))
    assert status.code is CODE.INTERNAL and "secret" not in status.details


# ---------------------------------------------------------------------------- settings


def test_settings_flags_override_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFT_MAX_QUEUE", "7")
    monkeypatch.setenv("DEFT_PORT", "6000")
    monkeypatch.setenv("DEFT_MAX_UPLOAD_SIZE", "2MiB")
    settings = ServerSettings(port=7000, data_dir=tmp_path)
    assert (settings.max_queue, settings.port, int(settings.max_upload_size)) == (7, 7000, 2 << 20)
    assert settings.engine_config().max_queue == 7 and settings.read_limits().max_file_bytes == 2 << 20
    with pytest.raises(ValueError, match="tls"):
        ServerSettings(tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="extra"):
        ServerSettings(max_qeue=1)  # a typo is an error, not silently ignored


def test_bad_serve_flags_exit_2_with_the_flag_named(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "deft_server", "--max-queue", "0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--max-queue" in out.stderr, out.stderr


# ---------------------------------------------------------------------------- conversion and client wire


def test_unset_fields_stay_unset_and_limits_apply():
    limits = ServerSettings().request_limits()
    msg = generate_request("a dog", adapters=["x", ("y", 0.5)])
    assert not msg.HasField("width") and not msg.HasField("seed") and not msg.HasField("negative_prompt")
    request = generation_request(msg, limits, (64, 64, 50, 5.0), deadline_s=None)
    assert request.adapters == (("x", 1.0), ("y", 0.5)) and request.width is None and request.seed is None
    assert (
        generation_request(
            generate_request("a", negative_prompt=""), limits, (64, 64, 50, 5.0), None
        ).negative_prompt
        == ""
    )
    with pytest.raises(InvalidRequest, match="pixels"):
        generation_request(generate_request("a", width=4096), limits, (2048, 2048, 50, 5.0), None)
    assert [r.name for r in adapter_refs({"a": 2.0})] == ["a"]
    assert generation_pb2.AdapterRef(name="n").HasField("weight") is False


def test_upload_of_a_directory_is_a_flat_tar(tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"w" * 300_000)
    (tmp_path / "peft" / "sub").mkdir()
    chunks = list(upload_chunks("n", tmp_path / "peft"))
    header = chunks[0].header
    body = b"".join(c.data for c in chunks[1:])
    assert header.size_bytes == len(body) and len(chunks) == 3  # 256 KiB chunks
    (tmp_path / "x.tar").write_bytes(body)
    with tarfile.open(tmp_path / "x.tar") as archive:
        assert sorted(archive.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_client_error_reads_code_message_and_reason():
    status = to_status(engine_module.QueueFull("the queue is full"))

    class FakeCall(grpc.RpcError):
        def code(self):
            return status.code

        def details(self):
            return status.details

        def trailing_metadata(self):
            return status.trailing_metadata

    error = DeftError.from_rpc_error(FakeCall())
    assert (error.code, error.message, error.reason) == (
        CODE.RESOURCE_EXHAUSTED,
        "the queue is full",
        "QUEUE_FULL",
    )
    assert str(error) == "RESOURCE_EXHAUSTED: the queue is full"


# ---------------------------------------------------------------------------- generated stubs


def test_committed_stubs_match_the_protos(tmp_path):
    pinned = (ROOT / "protos" / "generate.py").read_text().split('GRPC_TOOLS_VERSION = "')[1].split('"')[0]
    installed = importlib.metadata.version("grpcio-tools")
    if installed != pinned:
        pytest.skip(f"stubs are generated with grpcio-tools {pinned}; {installed} is installed")
    out = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    committed = ROOT / "clients" / "python" / "deft_client" / "proto"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, names, shallow=False)
    assert not mismatch and not errors, f"run `make protos`: {mismatch or errors} differ from protos/"


def test_messages_pickle_by_reference_to_their_real_module():
    """Ray (and any multiprocessing) pickles request messages: their classes must be importable by name."""
    import pickle

    from deft_client.proto import adapters_pb2, generation_pb2

    for message in (
        generation_pb2.GenerateRequest(prompt="a dog", seed=3),
        adapters_pb2.RegisterAdapterChunk(data=b"bytes"),
    ):
        assert type(message).__module__.startswith("deft_client.proto.")
        assert pickle.loads(pickle.dumps(message)) == message


# ---------------------------------------------------------------------------- engine contract


def test_cancelling_an_awaited_engine_future_cancels_only_that_request():
    """The engine's documented asyncio bridge: ``await asyncio.wrap_future(handle.future)``. Cancelling
    that await used to make the engine fail every running request (InvalidStateError on set_result)."""
    from deft_runtime.engine import Engine, EngineConfig, GenerationRequest
    from deft_runtime.models import build_tiny_sdxl
    from deft_runtime.pool import PoolConfig
    from deft_runtime.runtime import MultiAdapterModel

    pipe = build_tiny_sdxl(0)
    model = MultiAdapterModel(
        pipe.unet, pool_config=PoolConfig(device_bytes=1 << 20, host_bytes=1 << 20), backend="torch"
    )
    engine = Engine(pipe, model, EngineConfig())

    async def run() -> int:
        other = engine.submit(GenerationRequest(prompt="other", num_inference_steps=8, seed=1))
        doomed = engine.submit(GenerationRequest(prompt="x", num_inference_steps=8, seed=2))
        waiting = asyncio.ensure_future(asyncio.wrap_future(doomed.future))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.sleep(0.01)  # the cancellation reaches the concurrent future via the loop
        assert doomed.cancelled
        return (await asyncio.wrap_future(other.future)).steps

    try:
        assert asyncio.run(run()) == 8
        assert engine.drain(30) and engine.running == 0
    finally:
        engine.shutdown()
