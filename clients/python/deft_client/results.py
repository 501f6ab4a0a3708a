"""What the client returns: adapter descriptions and generation events (plain dataclasses)."""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass, field

from PIL import Image

from deft_client.proto import adapters_pb2, generation_pb2


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter, as ``GetAdapter`` describes it."""

    name: str
    kind: str
    decomposition: str
    ranks: tuple[int, ...]
    target_count: int
    size_bytes: int
    sha256: str
    created_at: dt.datetime
    state: str  # ready | resident | incompatible
    source_format: str
    compiled_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)
    state_reason: str = ""
    owner: str = ""  # the tenant that registered it; "" for a public adapter

    @classmethod
    def from_message(cls, msg: adapters_pb2.Adapter) -> AdapterInfo:
        state = adapters_pb2.AdapterState.Name(msg.state).removeprefix("ADAPTER_STATE_").lower()
        return cls(
            name=msg.name,
            kind=msg.kind,
            decomposition=msg.decomposition,
            ranks=tuple(msg.ranks),
            target_count=msg.target_count,
            size_bytes=msg.size_bytes,
            sha256=msg.sha256,
            created_at=msg.created_at.ToDatetime(tzinfo=dt.UTC),
            state=state,
            source_format=msg.source_format,
            compiled_bytes=msg.compiled_bytes,
            metadata=dict(msg.metadata),
            state_reason=msg.state_reason,
            owner=msg.owner,
        )


@dataclass(frozen=True)
class AdapterPage:
    """One ``ListAdapters`` page: adapters by name, and the token of the next page ("" after the last)."""

    adapters: list[AdapterInfo]
    next_page_token: str

    @classmethod
    def from_message(cls, msg: adapters_pb2.ListAdaptersResponse) -> AdapterPage:
        return cls([AdapterInfo.from_message(a) for a in msg.adapters], msg.next_page_token)


@dataclass(frozen=True)
class Queued:
    request_id: str
    position: int


@dataclass(frozen=True)
class Started:
    request_id: str
    total_steps: int


@dataclass(frozen=True)
class Progress:
    request_id: str
    step: int
    total_steps: int


@dataclass(frozen=True)
class Preview:
    request_id: str
    step: int
    total_steps: int
    image: Image.Image


@dataclass(frozen=True)
class Result:
    request_id: str
    images: list[Image.Image]
    seed: int
    steps: int
    queue_seconds: float
    total_seconds: float
    #: what the server says about how it read the request (e.g. a prompt truncated to 77 tokens)
    warnings: tuple[str, ...] = ()
    #: the guidance scale the server used, and its base model's name (None / "" from older servers)
    guidance_scale: float | None = None
    model: str = ""


GenerationEvent = Queued | Started | Progress | Preview | Result


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def result_from_message(request_id: str, msg: generation_pb2.Result) -> Result:
    return Result(
        request_id=request_id,
        images=[decode_png(im.png) for im in msg.images],
        seed=msg.seed,
        steps=msg.steps,
        queue_seconds=msg.queue_seconds,
        total_seconds=msg.total_seconds,
        warnings=tuple(msg.warnings),
        guidance_scale=msg.guidance_scale if msg.HasField("guidance_scale") else None,
        model=msg.model,
    )


def event_from_message(msg: generation_pb2.GenerateEvent) -> GenerationEvent | None:
    """The event of a stream message (None for a kind this client does not know yet)."""
    kind, rid = msg.WhichOneof("event"), msg.request_id
    if kind == "queued":
        return Queued(rid, msg.queued.position)
    if kind == "started":
        return Started(rid, msg.started.total_steps)
    if kind == "progress":
        return Progress(rid, msg.progress.step, msg.progress.total_steps)
    if kind == "preview":
        return Preview(rid, msg.preview.step, msg.preview.total_steps, decode_png(msg.preview.png))
    if kind == "result":
        return result_from_message(rid, msg.result)
    return None
