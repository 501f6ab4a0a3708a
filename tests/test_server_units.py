"""Server and client pieces that need no server process: the error mapping, settings, request
conversion, the generated stubs, and the engine's asyncio contract the server relies on."""

from __future__ import annotations

import asyncio
import base64
import errno
import filecmp
import importlib.metadata
import inspect
import math
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import deft_server.errors as server_errors
import grpc
import pytest
from deft_client import DeftClient, DeftError, GenerateOptions
from deft_client.proto import adapters_pb2, generation_pb2
from deft_client.wire import adapter_refs, generate_request, upload_chunks
from deft_server.auth import TokenAuth
from deft_server.config import ServerSettings, UploadLimits
from deft_server.convert import (
    MAX_PAGE_BYTES,
    adapters_page,
    generation_request,
    page_after,
    page_size,
    page_token,
)
from deft_server.errors import status_code_of, to_status
from deft_server.store import AdapterRecord
from deft_server.upload_limits import bounded_chunks
from google.rpc import error_details_pb2, status_pb2

import deft_runtime.engine as engine_module
import deft_runtime.errors as runtime_errors
from deft_runtime.engine.families import GenerationDefaults
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
    "DiskFull": CODE.RESOURCE_EXHAUSTED,
    "QuotaExceeded": CODE.RESOURCE_EXHAUSTED,  # a tenant's quota (deft_server.tenants)
    "NotPermitted": CODE.PERMISSION_DENIED,  # e.g. a public adapter without an admin key
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


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as e:
            raise error from e
    except BaseException as chained:
        return chained


def _sqlite_full() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = 13  # type: ignore[attr-defined]  # SQLITE_FULL, set by sqlite3 itself
    return error


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device", "/data/secret/upload.part"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        _sqlite_full(),
        _raised_from(
            runtime_errors.AdapterFormatError("the upload is not a readable tar archive"),
            OSError(errno.ENOSPC, "No space left on device"),
        ),
    ],
    ids=["enospc", "edquot", "sqlite-full", "wrapped-as-invalid-adapter"],
)
def test_a_full_disk_is_resource_exhausted_not_internal_or_the_users_fault(error):
    status = to_status(error)
    assert status.code is CODE.RESOURCE_EXHAUSTED and "disk is full" in status.details
    assert "secret" not in status.details and status_code_of(error) is CODE.RESOURCE_EXHAUSTED
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(dict(status.trailing_metadata)[DETAILS_KEY]).details[0].Unpack(info)
    assert info.reason == "DISK_FULL"
    assert to_status(OSError(errno.EACCES, "Permission denied")).code is CODE.INTERNAL


def test_status_messages_and_details_stay_far_below_the_header_limit():
    status = to_status(InvalidRequest("x" * 100_000))
    assert status.code is CODE.INVALID_ARGUMENT and "100000 characters" in status.details
    header_bytes = len(status.details) + sum(len(v) for _, v in status.trailing_metadata)
    assert header_bytes < 4 << 10


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
    request = generation_request(msg, limits, GenerationDefaults(64, 64, 50, 5.0), deadline_s=None)
    assert request.adapters == (("x", 1.0), ("y", 0.5)) and request.width is None and request.seed is None
    assert (
        generation_request(
            generate_request("a", negative_prompt=""), limits, GenerationDefaults(64, 64, 50, 5.0), None
        ).negative_prompt
        == ""
    )
    with pytest.raises(InvalidRequest, match="pixels"):
        generation_request(
            generate_request("a", width=4096), limits, GenerationDefaults(2048, 2048, 50, 5.0), None
        )
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


# ---------------------------------------------------------------------------- hostile request fields


def _convert(**params) -> object:
    limits = ServerSettings().request_limits()
    return generation_request(
        generate_request("a dog", **params), limits, GenerationDefaults(64, 64, 50, 5.0), None
    )


@pytest.mark.parametrize(
    "params, field",
    [
        (dict(guidance_scale=1e30), "guidance_scale"),
        (dict(guidance_scale=math.nan), "guidance_scale"),
        (dict(guidance_scale=-math.inf), "guidance_scale"),
        (dict(adapters=[("dog", math.inf)]), "weight"),
        (dict(request_id="r" * 129), "request_id"),
        (dict(request_id="r" * (8 << 20)), "request_id"),
        (dict(adapters=["n" * 10_000]), "invalid adapter name"),
        (dict(adapters=["../etc"]), "invalid adapter name"),
        (dict(steps=2**31 - 1), "num_inference_steps"),
        (dict(width=-(2**31)), "width"),
        (dict(num_images=2**31 - 1), "num_images"),
    ],
)
def test_hostile_request_fields_are_refused_naming_the_field_with_a_short_message(params, field):
    with pytest.raises(InvalidRequest) as info:
        _convert(**params)
    assert field in str(info.value) and len(str(info.value)) < 300


def test_the_largest_accepted_values_pass():
    request = _convert(guidance_scale=100.0, request_id="r" * 128, adapters=[("n" * 128, 10.0)])
    assert request.guidance_scale == 100.0 and request.adapters == (("n" * 128, 10.0),)


# ---------------------------------------------------------------------------- ListAdapters pages


def test_page_tokens_round_trip_and_forged_ones_are_refused():
    assert page_after("") == "" and page_after(page_token("dog-v2.1")) == "_public/dog-v2.1"
    assert page_after(page_token("alice/dog")) == "alice/dog"  # after a tenant's adapter
    forged = [
        "!!!",
        "é",
        "x" * 100_000,
        base64.urlsafe_b64encode(b"after:dog").decode(),  # not our prefix
        page_token("a/b/c"),  # our prefix, not a name
        page_token("_x/b"),  # not a tenant
        page_token("n" * 129),
        page_token("dog")[:-2],  # truncated
    ]
    for token in forged:
        with pytest.raises(InvalidRequest, match="page_token") as info:
            page_after(token)
        assert len(str(info.value)) < 300
    request = adapters_pb2.ListAdaptersRequest
    assert page_size(request()) == 100 and page_size(request(page_size=5)) == 5
    assert page_size(request(page_size=2**31 - 1)) == 1000
    with pytest.raises(InvalidRequest, match="page_size"):
        page_size(request(page_size=-1))


def _record(name: str, metadata_bytes: int = 0) -> AdapterRecord:
    metadata = {"k": "v" * metadata_bytes} if metadata_bytes else {}
    return AdapterRecord(name, "0" * 64, "safetensors", "deft", "deft", "qr", (2,), 1, 10, 8, metadata)


def _describe(record: AdapterRecord) -> adapters_pb2.Adapter:
    return adapters_pb2.Adapter(name=record.name, metadata=record.metadata)


def test_a_page_stops_at_its_size_or_its_byte_budget_and_says_where_to_go_on():
    records = [_record(f"a{i:03}") for i in range(6)]
    page = adapters_page(records, 5, _describe)  # the store returns size + 1 when more follow
    assert [a.name for a in page.adapters] == [f"a{i:03}" for i in range(5)]
    assert page_after(page.next_page_token) == "_public/a004"
    last = adapters_page(records[:3], 5, _describe)
    assert len(last.adapters) == 3 and last.next_page_token == ""
    heavy = [_record(f"h{i}", metadata_bytes=300 << 10) for i in range(8)]  # legacy, pre-limit metadata
    page = adapters_page(heavy, 100, _describe)
    assert 0 < len(page.adapters) < 8 and page.ByteSize() <= MAX_PAGE_BYTES
    assert page_after(page.next_page_token) == "_public/" + page.adapters[-1].name


# ---------------------------------------------------------------------------- upload stream bounds

UPLOAD_LIMITS = UploadLimits(max_bytes=1 << 20, max_chunks=1000, max_metadata_bytes=1024)


def _header(**fields) -> adapters_pb2.RegisterAdapterChunk:
    return adapters_pb2.RegisterAdapterChunk(header=adapters_pb2.AdapterUpload(name="a", **fields))


def _data(data: bytes) -> adapters_pb2.RegisterAdapterChunk:
    return adapters_pb2.RegisterAdapterChunk(data=data)


def _drain(*chunks: adapters_pb2.RegisterAdapterChunk) -> list[adapters_pb2.RegisterAdapterChunk]:
    async def source():
        for chunk in chunks:
            yield chunk

    async def run():
        return [c async for c in bounded_chunks(source(), UPLOAD_LIMITS)]

    return asyncio.run(run())


@pytest.mark.parametrize(
    "chunks, match",
    [
        ((_header(), *[_data(b"")] * 30_000), "65 data chunks carrying 0 bytes"),
        ((_header(), *[_data(b"x")] * 1000), "chunks must average at least 4096 bytes"),
        ((_header(), *[_data(b"x" * 4096)] * 1001), "more than 1000 data chunks"),
        ((_header(size_bytes=10), _data(b"x" * 11)), "size_bytes=10, but more came"),
        ((_header(size_bytes=10), _data(b"x" * 9)), "size_bytes=10, but 9 bytes came"),
        ((_header(metadata={f"k{i}": "" for i in range(65)}),), "65 entries"),
        ((_header(metadata={"k" * 129: "v"}),), "metadata key"),
        ((_header(metadata={"": "v"}),), "metadata key"),
        ((_header(metadata={"k": "v" * 1024}),), "--max-metadata-size"),
        ((_header(format=99),), "unknown upload format 99"),
        ((_header(sha256="f" * 10_000),), "sha256"),
        ((adapters_pb2.RegisterAdapterChunk(header=adapters_pb2.AdapterUpload(name="n" * 10_000)),), "name"),
    ],
    ids=[
        "30k-empty-chunks",
        "tiny-chunks",
        "too-many-chunks",
        "more-than-announced",
        "fewer-than-announced",
        "metadata-entries",
        "metadata-key-long",
        "metadata-key-empty",
        "metadata-bytes",
        "unknown-format",
        "sha256-long",
        "name-long",
    ],
)
def test_upload_streams_are_bounded_while_they_stream(chunks, match):
    with pytest.raises(InvalidRequest, match=match) as info:
        _drain(*chunks)
    assert len(str(info.value)) < 300


def test_a_well_formed_upload_passes_without_its_empty_chunks():
    header = _header(size_bytes=6, metadata={"owner": "me"}, sha256="a" * 64)
    out = _drain(header, _data(b"abc"), _data(b""), _data(b"def"))
    assert out == [header, _data(b"abc"), _data(b"def")]
    first_empty = _drain(_data(b""))  # no header first: passed on for the receiver to refuse
    assert [c.WhichOneof("chunk") for c in first_empty] == ["data"]


# ---------------------------------------------------------------------------- credentials


class _Call:
    def __init__(self, *metadata: tuple[str, str], method: str = "/deft.v1.AdapterService/ListAdapters"):
        self.method, self.invocation_metadata = method, metadata


@pytest.mark.parametrize(
    "metadata, refusal",
    [
        ((("authorization", "Bearer right"),), None),
        ((), "requires a token"),
        ((("authorization", "Bearer wrong"),), "requires a token"),
        ((("authorization", "Bearer wrong"), ("authorization", "Bearer right")), "exactly one authorization"),
        ((("authorization", "Bearer right"), ("authorization", "Bearer right")), "exactly one authorization"),
    ],
    ids=["right", "missing", "wrong", "wrong-then-right", "right-twice"],
)
def test_exactly_one_right_authorization_header_is_accepted(metadata, refusal):
    auth = TokenAuth("right")
    outcome = auth._refusal(_Call(*metadata))
    assert outcome is None if refusal is None else refusal in (outcome or "")
    assert auth._refusal(_Call(*metadata, method="/grpc.health.v1.Health/Check")) is None


# ---------------------------------------------------------------------------- client request type


def test_generate_options_are_the_one_request_type_of_the_keyword_api():
    options = GenerateOptions(adapters=[("dog", 0.5)], seed=3, steps=7, guidance_scale=0.0)
    assert generate_request("p", options) == generate_request(
        "p", adapters=[("dog", 0.5)], seed=3, steps=7, guidance_scale=0.0
    )
    overridden = generate_request("p", options, seed=4)
    assert overridden.seed == 4 and overridden.num_inference_steps == 7
    assert generate_request("p", options).HasField("guidance_scale")  # an explicit 0.0 stays set
    with pytest.raises(TypeError, match="stpes"):
        generate_request("p", stpes=3)  # a typo is an error, never silently ignored
    signatures = [inspect.signature(m) for m in (DeftClient.generate, DeftClient.generate_stream)]
    assert all("options" in s.parameters and "timeout" in s.parameters for s in signatures)


def test_request_metrics_name_tenants_only_when_asked() -> None:
    from deft_server.metrics import ServerMetrics
    from prometheus_client import generate_latest

    plain, labelled = ServerMetrics(), ServerMetrics(tenant_labels=True)
    for metrics in (plain, labelled):
        metrics.request_finished("ok", 0.5, "alice")
        metrics.request_finished("invalid_argument", None, "bob")
    text = generate_latest(plain.registry).decode()
    assert 'deft_requests_total{status="ok"} 1.0' in text
    assert "alice" not in text and "bob" not in text
    text = generate_latest(labelled.registry).decode()
    assert 'deft_requests_total{status="ok",tenant="alice"} 1.0' in text
    assert 'deft_requests_total{status="invalid_argument",tenant="bob"} 1.0' in text
    assert 'deft_request_latency_seconds_count{tenant="alice"} 1.0' in text
