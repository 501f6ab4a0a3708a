"""``POST /v1/adapters``: a ``multipart/form-data`` upload, streamed into ``RegisterAdapterChunk`` messages.

The body is parsed as it arrives (never spooled whole): the text fields ``name`` (required), ``format``
(``auto`` | ``safetensors`` | ``peft_tar``), ``sha256`` and ``metadata`` (a JSON object of strings)
must come before the ``file`` part; when the file part begins they become the header chunk, and its
bytes follow as data chunks of :data:`CHUNK_BYTES`. The chunks go to the gRPC servicer's
``RegisterAdapter``, so the upload is bounded, received and registered exactly as over gRPC
(``--max-upload-size``, ``--max-upload-chunks``, metadata limits, the sha256 check).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator

from deft_client.proto import adapters_pb2
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from deft_runtime.errors import InvalidRequest, shorten

#: data chunk size (the deft client's)
CHUNK_BYTES = 256 << 10
MAX_FIELD_BYTES = 64 << 10
MAX_PARTS = 8
FORMATS = {
    "": adapters_pb2.UPLOAD_FORMAT_UNSPECIFIED,
    "auto": adapters_pb2.UPLOAD_FORMAT_UNSPECIFIED,
    "safetensors": adapters_pb2.UPLOAD_FORMAT_SAFETENSORS,
    "peft_tar": adapters_pb2.UPLOAD_FORMAT_PEFT_TAR,
}
FIELDS = ("name", "format", "sha256", "metadata")


def boundary_of(request: Request) -> bytes:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "POST /v1/adapters takes multipart/form-data: the fields name, format, sha256 and metadata, "
            "then the adapter file as the part 'file' (e.g. curl -F name=NAME -F file=@adapter.safetensors)"
        )
    return boundary


def _metadata(text: str) -> dict[str, str]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidRequest(
            f'metadata must be a JSON object of strings (e.g. {{"owner": "me"}}), got {shorten(text)}'
        )
    return value


class UploadParts:
    """Push parser state: the text fields so far, then the file's chunks, ready to be taken."""

    def __init__(self, boundary: bytes) -> None:
        self.fields: dict[str, str] = {}
        self.ready: deque[adapters_pb2.RegisterAdapterChunk] = deque()
        self.file_seen = self.file_done = False
        self._parts = 0
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._part: str | None = None
        self._value = bytearray()
        callbacks = {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._add("_header_name", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def _add(self, attribute: str, data: bytes) -> None:
        setattr(self, attribute, getattr(self, attribute) + data)

    def _begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS or self.file_done:
            raise InvalidRequest(
                "the upload has parts after the file: send name, format, sha256, metadata, then file"
            )
        self._disposition, self._part, self._value = b"", None, bytearray()

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name != "file" and name not in FIELDS:
            raise InvalidRequest(f"unknown form field {shorten(name)}: send {', '.join(FIELDS)} and file")
        self._part = name
        if name == "file":
            self.file_seen = True
            file_name = options.get(b"filename", b"").decode("utf-8", "replace")  # a label for messages
            self.ready.append(adapters_pb2.RegisterAdapterChunk(header=self._header(file_name)))

    def _header(self, file_name: str) -> adapters_pb2.AdapterUpload:
        if "name" not in self.fields:
            raise InvalidRequest("the form field 'name' must come before the part 'file'")
        fmt = self.fields.get("format", "")
        if fmt not in FORMATS:
            raise InvalidRequest(f"format {shorten(fmt)} is not one of auto, safetensors, peft_tar")
        return adapters_pb2.AdapterUpload(
            name=self.fields["name"],
            format=FORMATS[fmt],
            sha256=self.fields.get("sha256", ""),
            metadata=_metadata(self.fields.get("metadata", "")),
            file_name=file_name,
        )

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        if self._part == "file":
            while len(self._value) >= CHUNK_BYTES:
                self.ready.append(adapters_pb2.RegisterAdapterChunk(data=bytes(self._value[:CHUNK_BYTES])))
                del self._value[:CHUNK_BYTES]
        elif len(self._value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"form field {self._part!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _end(self) -> None:
        if self._part == "file":
            if self._value:
                self.ready.append(adapters_pb2.RegisterAdapterChunk(data=bytes(self._value)))
            self.file_done = True
        elif self._part is not None:
            self.fields[self._part] = self._value.decode("utf-8", "replace")


async def upload_chunks(request: Request) -> AsyncIterator[adapters_pb2.RegisterAdapterChunk]:
    """The ``RegisterAdapterChunk`` stream of a multipart upload, produced as its body arrives."""
    parts = UploadParts(boundary_of(request))
    async for body in request.stream():
        _feed(parts, body)
        while parts.ready:
            yield parts.ready.popleft()
    _feed(parts, None)
    while parts.ready:
        yield parts.ready.popleft()
    if not parts.file_done:
        raise InvalidRequest("the upload has no complete part 'file' with the adapter's bytes")


def _feed(parts: UploadParts, body: bytes | None) -> None:
    """Parse ``body`` (None: the end of the stream)."""
    try:
        parts.parser.write(body) if body is not None else parts.parser.finalize()
    except MultipartParseError as e:
        raise InvalidRequest(f"the multipart body is malformed: {shorten(str(e))}") from None
