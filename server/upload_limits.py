"""Bounds on a ``RegisterAdapter`` stream, enforced while it streams, before any work is done for it.

:func:`bounded_chunks` sits between gRPC and :func:`deft_server.uploads.received_upload`: it checks
the header (name, format, sha256, metadata) as soon as it arrives, counts every data chunk (empty ones
too) against ``max_chunks`` and against the bytes they carry (past the first ``free_chunks``, chunks
must average ``min_average_chunk_bytes``, so a flood of empty or one-byte chunks is refused after a few
dozen, whatever ``max_chunks`` is), and holds the bytes received to the ``size_bytes`` the header
announced: more is refused at the chunk that passes it, fewer when the stream ends. Messages name the
limit (and its flag, where it has one).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping

from deft_client.proto import adapters_pb2
from deft_server.config import UploadLimits
from deft_server.convert import UPLOAD_FORMATS
from deft_server.uploads import validate_name

from deft_runtime.errors import InvalidRequest, shorten

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_metadata(metadata: Mapping[str, str], limits: UploadLimits) -> None:
    if len(metadata) > limits.max_metadata_entries:
        raise InvalidRequest(
            f"the adapter metadata has {len(metadata)} entries; at most {limits.max_metadata_entries} "
            "are accepted"
        )
    total = 0
    for key, value in metadata.items():
        if not 1 <= len(key) <= limits.max_metadata_key_chars:
            raise InvalidRequest(
                f"metadata key {shorten(key)} is {len(key)} characters long; keys have 1-"
                f"{limits.max_metadata_key_chars} characters"
            )
        total += len(key.encode()) + len(value.encode())
    if total > limits.max_metadata_bytes:
        raise InvalidRequest(
            f"the adapter metadata is {total} bytes (keys and values, UTF-8); this server accepts at most "
            f"{limits.max_metadata_bytes} (--max-metadata-size)"
        )


def check_header(header: adapters_pb2.AdapterUpload, limits: UploadLimits) -> None:
    """Everything about the header that needs no registry: name, format, sha256 and metadata."""
    validate_name(header.name)
    if header.format not in UPLOAD_FORMATS:
        raise InvalidRequest(
            f"unknown upload format {header.format}: use UPLOAD_FORMAT_SAFETENSORS (1), "
            "UPLOAD_FORMAT_PEFT_TAR (2), or UPLOAD_FORMAT_UNSPECIFIED (0) to let the server detect it"
        )
    if header.sha256 and not _SHA256.fullmatch(header.sha256):
        raise InvalidRequest(
            f"sha256 {shorten(header.sha256)} is not 64 hex digits; leave it empty or send the hex "
            "sha256 of the bytes"
        )
    check_metadata(header.metadata, limits)


def _check_count(chunks: int, received: int, limits: UploadLimits) -> None:
    if chunks > limits.max_chunks:
        raise InvalidRequest(
            f"the upload came in more than {limits.max_chunks} data chunks (--max-upload-chunks; empty "
            "chunks count); send it in larger chunks (the deft client sends 256 KiB)"
        )
    if chunks > limits.free_chunks + received // limits.min_average_chunk_bytes:
        raise InvalidRequest(
            f"the upload sent {chunks} data chunks carrying {received} bytes: past the first "
            f"{limits.free_chunks}, chunks must average at least {limits.min_average_chunk_bytes} bytes "
            "(empty chunks count); send it in larger chunks (the deft client sends 256 KiB)"
        )


def _check_size(received: int, announced: int, ended: bool) -> None:
    if announced and (received > announced or (ended and received != announced)):
        came = f"{received} bytes came" if ended else f"more came ({received} bytes so far)"
        raise InvalidRequest(
            f"the header announced size_bytes={announced}, but {came}; send the file's exact size, "
            "or 0 when it is not known"
        )


async def bounded_chunks(
    chunks: AsyncIterator[adapters_pb2.RegisterAdapterChunk], limits: UploadLimits
) -> AsyncIterator[adapters_pb2.RegisterAdapterChunk]:
    """``chunks`` with the bounds above applied as they arrive; empty data chunks are dropped
    (counted, never forwarded). Misplaced headers pass through for the receiver to refuse."""
    announced = received = count = 0
    position = 0
    async for chunk in chunks:
        position += 1
        kind = chunk.WhichOneof("chunk")
        if kind == "header" and position == 1:
            check_header(chunk.header, limits)
            announced = chunk.header.size_bytes
        elif kind == "data":
            count, received = count + 1, received + len(chunk.data)
            _check_count(count, received, limits)
            _check_size(received, announced, ended=False)
            if not chunk.data and position > 1:  # a first chunk goes on, for the receiver to refuse
                continue
        yield chunk
    _check_size(received, announced, ended=True)
