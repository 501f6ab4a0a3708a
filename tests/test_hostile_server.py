"""The hostile-client catalogue: protocol abuse on every RPC field against one real ``deft serve``
process over loopback, each case with the exact gRPC status it must get.

Every case also checks that the status message stays short (no echo of the hostile value), and is
followed by a health check (SERVING) and a normal generation with an adapter, so a case that wedges
or poisons the server fails there and then. One server is shared by the whole catalogue (bounded
limits, so the floods stay cheap); the session prints how many cases were tried and how many got
their exact expected status::

    hostile protocol catalogue: 75 cases tried, 75 got their exact expected status (100.0%)
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from deft_client import AsyncDeftClient, DeftClient, GenerateOptions
from deft_client.proto import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deft_runtime.adapter import AdapterKind
from deft_runtime.formats import save_adapter
from deft_runtime.testing import random_adapter

TOKEN = "hostile-s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CODE = grpc.StatusCode
MAX_CHUNKS = 128
FLAGS = (
    *("--token", TOKEN, "--max-upload-size", "1MiB", "--max-message-size", "4MiB"),
    *("--max-upload-chunks", str(MAX_CHUNKS), "--max-metadata-size", "1KiB", "--max-steps", "50"),
)
#: a status message this long or longer means hostile input was echoed
MAX_DETAILS = 1100
CALL_TIMEOUT_S = 60
LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


# ---------------------------------------------------------------------------- the tally


@dataclass
class Tally:
    tried: int = 0
    exact: int = 0
    misses: list[str] = field(default_factory=list)

    def record(self, case: str, got: grpc.StatusCode, want: grpc.StatusCode) -> None:
        self.tried += 1
        if got is want:
            self.exact += 1
        else:
            self.misses.append(f"{case}: {got.name} (expected {want.name})")

    def summary(self) -> str:
        rate = 100.0 * self.exact / self.tried if self.tried else 0.0
        line = (
            f"hostile protocol catalogue: {self.tried} cases tried, {self.exact} got their exact "
            f"expected status ({rate:.1f}%)"
        )
        return "\n".join([line, *(f"  miss: {m}" for m in self.misses)])


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    counts = Tally()
    yield counts
    if not counts.tried:
        return
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(counts.summary())
        return
    with capture.global_and_fixture_disabled():  # shown in the session's output, pass or fail
        reporter.write_line("")
        reporter.write_line(counts.summary())


# ---------------------------------------------------------------------------- server and stubs


@dataclass
class Wire:
    """Raw stubs (no client-side checks in the way) and the bytes of a valid adapter."""

    generation: generation_pb2_grpc.GenerationServiceStub
    adapters: adapters_pb2_grpc.AdapterServiceStub
    health: health_pb2_grpc.HealthStub
    adapter_bytes: bytes


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start(*FLAGS)


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory) -> Path:
    adapter = random_adapter(AdapterKind.DEFT, {LAYER: (64, 64)}, rank=2, seed=4)
    return save_adapter(adapter, tmp_path_factory.mktemp("hostile") / "ok.deft.safetensors")


@pytest.fixture(scope="module")
def wire(server, adapter_file) -> Iterator[Wire]:
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        yield Wire(
            generation_pb2_grpc.GenerationServiceStub(channel),
            adapters_pb2_grpc.AdapterServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
            adapter_file.read_bytes(),
        )


@pytest.fixture(scope="module")
def client(server, adapter_file) -> Iterator[DeftClient]:
    with DeftClient(server.address, token=TOKEN, timeout=CALL_TIMEOUT_S) as c:
        c.register_adapter("ok", adapter_file)
        yield c


# ---------------------------------------------------------------------------- building calls

Call = Callable[[Wire], object]


def request(**fields: object) -> generation_pb2.GenerateRequest:
    fields.setdefault("prompt", "x")
    fields.setdefault("num_inference_steps", 1)
    return generation_pb2.GenerateRequest(**fields)


def ref(name: str = "ok", weight: float | None = None) -> generation_pb2.AdapterRef:
    return generation_pb2.AdapterRef(name=name, weight=weight)


def once(message: generation_pb2.GenerateRequest, metadata=AUTH) -> Call:
    return lambda w: w.generation.GenerateOnce(message, metadata=metadata, timeout=CALL_TIMEOUT_S)


def stream(message: generation_pb2.GenerateRequest, metadata=AUTH) -> Call:
    return lambda w: list(w.generation.Generate(message, metadata=metadata, timeout=CALL_TIMEOUT_S))


def listing(metadata=AUTH, **fields: object) -> Call:
    message = adapters_pb2.ListAdaptersRequest(**fields)
    return lambda w: w.adapters.ListAdapters(message, metadata=metadata, timeout=CALL_TIMEOUT_S)


def get(name: str) -> Call:
    message = adapters_pb2.GetAdapterRequest(name=name)
    return lambda w: w.adapters.GetAdapter(message, metadata=AUTH, timeout=CALL_TIMEOUT_S)


def delete(name: str) -> Call:
    message = adapters_pb2.DeleteAdapterRequest(name=name)
    return lambda w: w.adapters.DeleteAdapter(message, metadata=AUTH, timeout=CALL_TIMEOUT_S)


def header(name: str = "probe", **fields: object) -> adapters_pb2.RegisterAdapterChunk:
    return adapters_pb2.RegisterAdapterChunk(header=adapters_pb2.AdapterUpload(name=name, **fields))


def data(payload: bytes) -> adapters_pb2.RegisterAdapterChunk:
    return adapters_pb2.RegisterAdapterChunk(data=payload)


def upload(*chunks: adapters_pb2.RegisterAdapterChunk | None, metadata=AUTH) -> Call:
    """A RegisterAdapter stream; ``None`` stands for one data chunk with the valid adapter's bytes."""

    def call(w: Wire) -> object:
        stream = (c if c is not None else data(w.adapter_bytes) for c in chunks)
        return w.adapters.RegisterAdapter(stream, metadata=metadata, timeout=CALL_TIMEOUT_S)

    return call


def upload_sized(delta: int, name: str) -> Call:
    """The valid adapter, with a header announcing ``len(bytes) + delta`` bytes."""

    def call(w: Wire) -> object:
        size = len(w.adapter_bytes) + delta
        chunks = [header(name, size_bytes=size), data(w.adapter_bytes)]
        return w.adapters.RegisterAdapter(iter(chunks), metadata=AUTH, timeout=CALL_TIMEOUT_S)

    return call


def token_of(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


# ---------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    id: str
    call: Call
    code: grpc.StatusCode
    match: str = ""  # a substring the status message must contain


LONG = "n" * 10_000
WRONG = (("authorization", "Bearer wrong"),)
INVALID = CODE.INVALID_ARGUMENT
DENIED = CODE.UNAUTHENTICATED

GENERATION = [
    Case("gen-adapter-name-10k", once(request(adapters=[ref(LONG)])), INVALID, "invalid adapter name"),
    Case("gen-stream-adapter-name-10k", stream(request(adapters=[ref(LONG)])), INVALID, "adapter name"),
    Case("gen-adapter-name-empty", once(request(adapters=[ref("")])), INVALID, "invalid adapter name"),
    Case("gen-adapter-name-path", once(request(adapters=[ref("../ok")])), INVALID, "invalid adapter name"),
    Case("gen-adapter-unknown", once(request(adapters=[ref("ghost")])), CODE.NOT_FOUND, "ghost"),
    Case(
        "gen-adapters-too-many",
        once(request(adapters=[ref(f"a{i}") for i in range(5)])),
        INVALID,
        "at most 4",
    ),
    Case("gen-adapter-twice", once(request(adapters=[ref(), ref()])), INVALID, "twice"),
    Case("gen-request-id-129", stream(request(request_id="r" * 129)), INVALID, "request_id"),
    Case("gen-request-id-3MiB", stream(request(request_id="r" * (3 << 20))), INVALID, "request_id"),
    Case("gen-guidance-1e30", once(request(guidance_scale=1e30)), INVALID, "guidance_scale"),
    Case("gen-guidance-101", once(request(guidance_scale=101.0)), INVALID, "guidance_scale"),
    Case("gen-guidance-nan", once(request(guidance_scale=math.nan)), INVALID, "guidance_scale"),
    Case("gen-guidance-inf", once(request(guidance_scale=math.inf)), INVALID, "guidance_scale"),
    Case("gen-guidance-negative", once(request(guidance_scale=-1.0)), INVALID, "guidance_scale"),
    Case("gen-weight-nan", once(request(adapters=[ref(weight=math.nan)])), INVALID, "weight"),
    Case("gen-weight-inf", once(request(adapters=[ref(weight=-math.inf)])), INVALID, "weight"),
    Case("gen-weight-1e308", once(request(adapters=[ref(weight=1e308)])), INVALID, "weight"),
    Case("gen-steps-int32-max", once(request(num_inference_steps=2**31 - 1)), INVALID, "num_inference_steps"),
    Case("gen-steps-negative", once(request(num_inference_steps=-1)), INVALID, "num_inference_steps"),
    Case("gen-width-int32-min", once(request(width=-(2**31))), INVALID, "width"),
    Case("gen-height-int32-max", once(request(height=2**31 - 1)), INVALID, "height"),
    Case("gen-pixels-too-many", once(request(width=4096, height=4096)), INVALID, "pixels"),
    Case("gen-width-odd", once(request(width=65)), INVALID, "width"),
    Case("gen-images-int32-max", once(request(num_images=2**31 - 1)), INVALID, "num_images"),
    Case("gen-preview-negative", stream(request(preview_every_n_steps=-5)), INVALID, "preview_every_n_steps"),
    Case("gen-prompt-too-long", once(request(prompt="p" * 4001)), INVALID, "prompt"),
    Case(
        "gen-negative-prompt-too-long", once(request(negative_prompt="p" * 4001)), INVALID, "negative_prompt"
    ),
    Case("gen-message-above-limit", once(request(prompt="p" * (5 << 20))), CODE.RESOURCE_EXHAUSTED),
]

REGISTRY = [
    Case("get-name-10k", get(LONG), INVALID, "invalid adapter name"),
    Case("get-name-empty", get(""), INVALID, "invalid adapter name"),
    Case("get-name-path", get("../../etc/passwd"), INVALID, "invalid adapter name"),
    Case("get-unknown", get("ghost"), CODE.NOT_FOUND, "ghost"),
    Case("delete-name-10k", delete(LONG), INVALID, "invalid adapter name"),
    Case("delete-name-nul", delete("ok\x00"), INVALID, "invalid adapter name"),
    Case("delete-unknown", delete("ghost"), CODE.NOT_FOUND, "ghost"),
    Case("list-page-token-garbage", listing(page_token="!!!not-base64!!!"), INVALID, "page_token"),
    Case("list-page-token-10k", listing(page_token="A" * 10_000), INVALID, "page_token"),
    Case("list-page-token-forged", listing(page_token=token_of(b"after:ok")), INVALID, "page_token"),
    Case(
        "list-page-token-bad-name",
        listing(page_token=token_of(b"deft.v1/adapters/after:../x")),
        INVALID,
        "page_token",
    ),
    Case("list-page-size-negative", listing(page_size=-1), INVALID, "page_size"),
    Case("list-page-size-int32-max", listing(page_size=2**31 - 1), CODE.OK),
]

UPLOADS = [
    Case("register-name-10k", upload(header(LONG), None), INVALID, "invalid adapter name"),
    Case("register-name-slash", upload(header("a/b"), None), INVALID, "invalid adapter name"),
    Case("register-no-header", upload(None), INVALID, "header"),
    Case("register-empty-stream", upload(), INVALID, "header"),
    Case("register-two-headers", upload(header(), header()), INVALID, "header"),
    Case("register-unset-chunk", upload(header(), adapters_pb2.RegisterAdapterChunk()), INVALID, "header"),
    Case("register-format-unknown-enum", upload(header("enum", format=7), None), INVALID, "format 7"),
    Case("register-format-negative-enum", upload(header("enum", format=-1), None), INVALID, "format -1"),
    Case(
        "register-metadata-many",
        upload(header("meta", metadata={f"k{i}": "" for i in range(1000)}), None),
        INVALID,
        "1000 entries",
    ),
    Case(
        "register-metadata-3MiB-value",
        upload(header("meta", metadata={"k": "v" * (3 << 20)}), None),
        INVALID,
        "--max-metadata-size",
    ),
    Case(
        "register-metadata-key-10k",
        upload(header("meta", metadata={LONG: "v"}), None),
        INVALID,
        "metadata key",
    ),
    Case("register-sha256-10k", upload(header("sha", sha256="f" * 10_000), None), INVALID, "sha256"),
    Case("register-sha256-mismatch", upload(header("sha", sha256="0" * 64), None), INVALID, "sha256"),
    Case(
        "register-30k-empty-chunks",
        upload(header("flood"), *[data(b"")] * 30_000),
        INVALID,
        "65 data chunks carrying 0 bytes",
    ),
    Case("register-tiny-chunks", upload(header("flood"), *[data(b"x")] * 1000), INVALID, "must average"),
    Case(
        "register-too-many-chunks",
        upload(header("flood"), *[data(b"x" * 5000)] * (MAX_CHUNKS + 1)),
        INVALID,
        f"more than {MAX_CHUNKS} data chunks (--max-upload-chunks",
    ),
    Case("register-size-more-than-announced", upload_sized(-1, "size"), INVALID, "size_bytes"),
    Case("register-size-fewer-than-announced", upload_sized(+1, "size"), INVALID, "size_bytes"),
    Case(
        "register-announced-above-limit", upload(header("big", size_bytes=1 << 40)), CODE.RESOURCE_EXHAUSTED
    ),
    Case(
        "register-bytes-above-limit",
        upload(header("big"), *[data(b"\0" * (256 << 10))] * 5),
        CODE.RESOURCE_EXHAUSTED,
        "--max-upload-size",
    ),
    Case("register-garbage-bytes", upload(header("junk"), data(b"\x00" * 4096)), INVALID),
]

CREDENTIALS = [
    Case("auth-missing-unary", listing(metadata=()), DENIED, "requires a token"),
    Case("auth-missing-stream", stream(request(), metadata=()), DENIED, "requires a token"),
    Case("auth-missing-upload", upload(header("auth"), None, metadata=()), DENIED, "requires a token"),
    Case("auth-wrong", listing(metadata=WRONG), DENIED),
    Case("auth-not-bearer", listing(metadata=(("authorization", TOKEN),)), DENIED),
    Case("auth-lowercase-scheme", listing(metadata=(("authorization", f"bearer {TOKEN}"),)), DENIED),
    Case("auth-wrong-then-right", listing(metadata=WRONG + AUTH), DENIED, "exactly one authorization"),
    Case("auth-right-then-wrong", once(request(), metadata=AUTH + WRONG), DENIED, "exactly one"),
    Case("auth-right-twice-upload", upload(header("auth"), None, metadata=AUTH * 2), DENIED, "exactly one"),
    Case("auth-right-twice-stream", stream(request(), metadata=AUTH * 2), DENIED, "exactly one"),
    # above gRPC's own 16 KiB header limit: refused by gRPC before any deft code runs
    Case(
        "auth-token-1MiB",
        listing(metadata=(("authorization", "Bearer " + "t" * (1 << 20)),)),
        CODE.RESOURCE_EXHAUSTED,
        "metadata size exceeds",
    ),
    Case(
        "call-metadata-2000-entries",
        listing(metadata=AUTH + tuple((f"x-junk-{i}", "v" * 8) for i in range(2000))),
        CODE.RESOURCE_EXHAUSTED,
    ),
    Case(
        "call-metadata-50-entries",
        listing(metadata=AUTH + tuple((f"x-junk-{i}", "v") for i in range(50))),
        CODE.OK,
    ),
]

CATALOGUE = [*GENERATION, *REGISTRY, *UPLOADS, *CREDENTIALS]


def outcome(case: Case, w: Wire) -> tuple[grpc.StatusCode, str]:
    try:
        case.call(w)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return CODE.OK, ""


def assert_healthy(w: Wire) -> None:
    """SERVING, and a normal generation with a registered adapter completes."""
    reply = w.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    result = once(request(adapters=[ref("ok")], seed=1))(w)
    assert len(result.result.images) == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_hostile_call_gets_its_exact_status(case: Case, wire: Wire, client: DeftClient, tally: Tally):
    code, details = outcome(case, wire)
    tally.record(case.id, code, case.code)
    assert code is case.code, f"{case.id}: {code.name}: {details[:300]}"
    assert case.match in details, details[:300]
    assert len(details) < MAX_DETAILS, f"the status echoes {len(details)} characters"
    assert_healthy(wire)


def test_refused_uploads_left_nothing_behind(wire: Wire, client: DeftClient, server):
    """Runs after the catalogue: only the adapter the module registered is there, no temporary files."""
    assert [a.name for a in client.list_adapters()] == ["ok"]
    leftovers = [p for p in (server.data_dir / "tmp").rglob("*") if not p.is_dir()]
    assert not leftovers, leftovers
    assert_healthy(wire)


def test_list_adapters_pages_through_every_adapter_with_opaque_tokens(client: DeftClient, adapter_file):
    names = ["ok", *(f"page-{i}" for i in range(4))]
    for name in names[1:]:
        client.register_adapter(name, adapter_file, metadata={"owner": "hostile"})
    try:
        seen, token, pages = [], "", 0
        while True:
            page = client.list_adapters_page(page_size=2, page_token=token)
            assert len(page.adapters) <= 2
            seen += [a.name for a in page.adapters]
            pages += 1
            if not (token := page.next_page_token):
                break
            assert seen[-1] not in token  # opaque: no name in the clear
        assert seen == sorted(names) and pages == 3
        assert [a.name for a in client.list_adapters()] == sorted(names)  # every page, transparently
        assert [a.name for a in asyncio.run(_async_list(client.target))] == sorted(names)
    finally:
        for name in names[1:]:
            client.delete_adapter(name)


async def _async_list(target: str) -> list:
    async with AsyncDeftClient(target, token=TOKEN, timeout=CALL_TIMEOUT_S) as c:
        page = await c.list_adapters_page(page_size=1)
        assert len(page.adapters) == 1 and page.next_page_token
        return await c.list_adapters()


def test_generate_options_and_keywords_make_the_same_request(client: DeftClient):
    options = GenerateOptions(adapters=[("ok", 0.5)], seed=5, steps=1, request_id="label-1")
    by_options = client.generate_result("a cat", options)
    by_keywords = client.generate_result(
        "a cat", adapters=[("ok", 0.5)], seed=5, steps=1, request_id="label-1"
    )
    assert by_options.seed == by_keywords.seed == 5 and by_options.steps == 1
    # the same request alone in its batch: the same kernels on the same tensors
    assert by_options.images[0].tobytes() == by_keywords.images[0].tobytes()
    assert client.generate_result("a cat", options, seed=6).seed == 6  # keywords override options
