"""Receiving an adapter upload safely: names, a size-limited temporary file, and archive unpacking.

An upload is written to a temporary file in the registry's ``tmp/`` folder while it is hashed; it
only becomes visible once the registry commits it (see :mod:`deft_server.registry`). A PEFT
directory travels as a tar archive (optionally gzip-compressed); its members are copied out one by
one into a fresh folder under names this module chooses, never with ``tarfile.extract``, so no
member can land outside that folder, and links, devices and nested paths are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from deft_client.proto import adapters_pb2
from deft_server.errors import UploadTooLarge

from deft_runtime.errors import AdapterFormatError, InvalidRequest
from deft_runtime.names import check_adapter_name

MAX_ARCHIVE_MEMBERS = 16
_GZIP_MAGIC = b"\x1f\x8b"

validate_name = check_adapter_name  # the one rule for adapter names (deft_runtime.names)


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    sha256: str
    size: int


class UploadFile:
    """A temporary file that refuses to grow past ``limit`` bytes and hashes what it receives."""

    def __init__(self, directory: Path, limit: int) -> None:
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=directory)
        self.path = Path(name)
        self.limit = limit
        self.size = 0
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise UploadTooLarge(
                f"the upload is larger than this server's limit of {self.limit} bytes "
                "(start the server with a larger --max-upload-size)"
            )
        self._hash.update(data)
        self._file.write(data)

    def finish(self) -> ReceivedFile:
        """Flush to disk and return what was received (the file stays until :meth:`discard`)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return ReceivedFile(self.path, self._hash.hexdigest(), self.size)

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def received_upload(
    chunks: AsyncIterator[adapters_pb2.RegisterAdapterChunk],
    directory: Path,
    limit: int,
    check_free: Callable[[str], None],
) -> AsyncIterator[tuple[adapters_pb2.AdapterUpload, ReceivedFile]]:
    """Receive a ``RegisterAdapter`` stream: the header (name checked, free, announced size within
    ``limit``), then the bytes into a size-limited, hashed temporary file under ``directory``, checked
    against the announced sha256. The file is removed when the block ends (the registry keeps its
    own copy of what it commits)."""
    first = await anext(aiter(chunks), None)
    if first is None or first.WhichOneof("chunk") != "header":
        raise InvalidRequest("the first RegisterAdapterChunk must carry the header (name and format)")
    header = first.header
    validate_name(header.name)
    await asyncio.to_thread(check_free, header.name)  # may ask a database
    if header.size_bytes > limit:
        raise UploadTooLarge(
            f"the upload is {header.size_bytes} bytes, above this server's limit of {limit} bytes "
            "(start the server with a larger --max-upload-size)"
        )
    upload = await asyncio.to_thread(UploadFile, directory, limit)
    try:
        async for chunk in chunks:
            if chunk.WhichOneof("chunk") != "data":
                raise InvalidRequest("only the first RegisterAdapterChunk may carry the header")
            await asyncio.to_thread(upload.write, chunk.data)
        received = await asyncio.to_thread(upload.finish)
        if header.sha256 and header.sha256.lower() != received.sha256:
            raise InvalidRequest(
                f"the upload's sha256 is {received.sha256}, not {header.sha256} as announced; it was "
                "corrupted or truncated in transit"
            )
        yield header, received
    finally:
        await asyncio.to_thread(upload.discard)


def is_tar(path: Path) -> bool:
    """A tar archive (``ustar`` magic at offset 257) or a gzip stream (taken for a ``.tar.gz``)."""
    with path.open("rb") as f:
        head = f.read(512)
    return head.startswith(_GZIP_MAGIC) or head[257:262] == b"ustar"


def _member_name(member: tarfile.TarInfo) -> str | None:
    """The file name a member is copied to, or None for a folder entry; refuses anything unsafe."""
    parts = [p for p in member.name.replace("\\", "/").split("/") if p not in ("", ".")]
    if member.name.startswith(("/", "\\")) or ".." in parts or len(parts) > 2:
        raise AdapterFormatError(
            f"archive member {member.name!r} is not a plain file at the top level of the archive "
            "(pack the PEFT directory's files, e.g. `tar -cf a.tar -C DIR .`)"
        )
    if member.isdir():
        return None
    if not member.isreg():
        raise AdapterFormatError(
            f"archive member {member.name!r} is a link or special file; only files are accepted"
        )
    return parts[-1]


def extract_archive(path: Path, destination: Path, limit: int) -> Path:
    """Copy the regular files of the tar archive ``path`` into ``destination`` (which must exist).

    Members may sit at the top level or inside one folder (``tar -cf a.tar DIR``); their total size is
    limited to ``limit`` bytes. Returns ``destination``.
    """
    total = 0
    try:
        with tarfile.open(path, mode="r:*") as archive:
            members = archive.getmembers()
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise AdapterFormatError(
                    f"the archive has {len(members)} members; a PEFT directory has a handful of files "
                    f"(at most {MAX_ARCHIVE_MEMBERS} accepted)"
                )
            for member in members:
                name = _member_name(member)
                if name is None:
                    continue
                total += member.size
                if total > limit:
                    raise UploadTooLarge(
                        f"the archive unpacks to more than this server's limit of {limit} bytes"
                    )
                _copy_member(archive, member, destination / name)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise AdapterFormatError(f"the upload is not a readable tar archive: {e}") from e
    return destination


def _copy_member(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    if target.exists():
        raise AdapterFormatError(f"the archive holds {target.name!r} twice")
    source = archive.extractfile(member)
    if source is None:
        raise AdapterFormatError(f"archive member {member.name!r} has no content")
    with source, target.open("xb") as out:
        while chunk := source.read(1 << 20):
            out.write(chunk)
