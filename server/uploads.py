"""Receiving an adapter upload safely: names, a size-limited temporary file, and archive unpacking.

An upload is written to a temporary file in the registry's ``tmp/`` folder while it is hashed; it
only becomes visible once the registry commits it (see :mod:`deft_server.registry`). A PEFT
directory travels as a tar archive (optionally gzip-compressed); its members are copied out one by
one into a fresh folder under names this module chooses, never with ``tarfile.extract``, so no
member can land outside that folder, and links, devices and nested paths are refused.

The archive is read as a stream, one member at a time, and every bound holds *while* it is read:
at most :data:`MAX_ARCHIVE_MEMBERS` members, names of at most :data:`MAX_MEMBER_NAME_CHARS`
characters, declared sizes summing to at most the limit, and decompressed bytes metered by
:class:`_MeteredArchive` (the accepted members' data plus :data:`MAX_ARCHIVE_OVERHEAD` of headers),
so a gzip bomb or a 4 GiB "long name" header is refused after at most a few MiB of inflation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

from deft_client.proto import adapters_pb2
from deft_server.errors import UploadTooLarge

from deft_runtime.errors import AdapterFormatError, InvalidRequest, shorten
from deft_runtime.names import check_adapter_name

MAX_ARCHIVE_MEMBERS = 16
MAX_MEMBER_NAME_CHARS = 255
#: Decompressed bytes an archive may hold besides its files' data: tar headers, pax/GNU name records.
MAX_ARCHIVE_OVERHEAD = 1024**2
_GZIP_MAGIC = b"\x1f\x8b"
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)

validate_name = check_adapter_name  # the one rule for adapter names (deft_runtime.names)


#: How messages name an upload whose client sent no file name.
UNNAMED_UPLOAD = "the upload"
MAX_FILE_NAME_CHARS = 255


@dataclasses.dataclass(frozen=True)
class ReceivedFile:
    path: Path
    sha256: str
    size: int
    #: how messages name the upload: the client's file name (see :func:`upload_label`)
    label: str = UNNAMED_UPLOAD


def upload_label(file_name: str) -> str:
    """How messages name an upload: the file name the client sent (``AdapterUpload.file_name``), with
    control characters replaced and cut to :data:`MAX_FILE_NAME_CHARS`; never used as a path."""
    name = "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in file_name.strip())
    if not name:
        return UNNAMED_UPLOAD
    return name if len(name) <= MAX_FILE_NAME_CHARS else f"{name[:MAX_FILE_NAME_CHARS]}…"


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
        yield header, dataclasses.replace(received, label=upload_label(header.file_name))
    finally:
        await asyncio.to_thread(upload.discard)


def is_tar(path: Path) -> bool:
    """A tar archive (``ustar`` magic at offset 257) or a gzip stream (taken for a ``.tar.gz``)."""
    with path.open("rb") as f:
        head = f.read(512)
    return head.startswith(_GZIP_MAGIC) or head[257:262] == b"ustar"


class _MeteredArchive:
    """The decompressed bytes of an archive, refused past ``allowance``.

    The allowance starts at :data:`MAX_ARCHIVE_OVERHEAD` (headers, pax and GNU name records, the
    reader's read-ahead) and grows by the declared size of each member once it is accepted, so the
    inflater never produces more than the accepted data plus that overhead.
    """

    def __init__(self, path: Path) -> None:
        self._raw = path.open("rb")
        gzipped = self._raw.read(2) == _GZIP_MAGIC
        self._raw.seek(0)
        self._source: io.BufferedIOBase = (
            gzip.GzipFile(fileobj=self._raw, mode="rb") if gzipped else self._raw
        )
        self.allowance = MAX_ARCHIVE_OVERHEAD
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        room = self.allowance - self.consumed + 1  # one byte more than allowed proves an overrun
        size = room if size is None or size < 0 else min(size, room)
        try:
            data = self._source.read(size)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a corrupt or truncated gzip stream
            raise AdapterFormatError(f"the upload is not a readable tar archive: {e}") from e
        self.consumed += len(data)
        if self.consumed > self.allowance:
            raise AdapterFormatError(
                f"the archive's headers take more than {MAX_ARCHIVE_OVERHEAD} bytes besides its files "
                "(a PEFT directory's tar has a few KiB of them); it is not a plain archive of a PEFT directory"
            )
        return data

    def grant(self, size: int) -> None:
        self.allowance += size + tarfile.BLOCKSIZE  # the member's data and its padding

    def close(self) -> None:
        self._source.close()
        self._raw.close()


def _check_member_name(name: str) -> None:
    if len(name) > MAX_MEMBER_NAME_CHARS:
        raise AdapterFormatError(
            f"archive member name {shorten(name)} has {len(name)} characters; at most "
            f"{MAX_MEMBER_NAME_CHARS} are accepted"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise AdapterFormatError(f"archive member name {shorten(name)} contains a control character")


def _member_name(member: tarfile.TarInfo) -> str | None:
    """The file name a member is copied to, or None for a folder entry; refuses anything unsafe."""
    _check_member_name(member.name)
    parts = [p for p in member.name.replace("\\", "/").split("/") if p not in ("", ".")]
    leaf = parts[-1] if parts else ""
    bad_path = member.name.startswith(("/", "\\")) or ".." in parts or len(parts) > 2
    # a file needs a leaf name the filesystem takes (255 bytes); "." alone is only a folder
    if bad_path or (not leaf and not member.isdir()) or len(leaf.encode("utf-8", "surrogateescape")) > 255:
        raise AdapterFormatError(
            f"archive member {shorten(member.name)} is not a plain file at the top level of the archive "
            "(pack the PEFT directory's files, e.g. `tar -cf a.tar -C DIR .`)"
        )
    if member.isdir():
        return None
    if member.type not in _FILE_TYPES:
        raise AdapterFormatError(
            f"archive member {shorten(member.name)} is a link or special file (tar type "
            f"{shorten(member.type.decode('latin-1'))}); only regular files and folders are accepted"
        )
    return leaf


def extract_archive(path: Path, destination: Path, limit: int) -> Path:
    """Copy the regular files of the tar archive ``path`` (plain or gzip) into ``destination``.

    Members may sit at the top level or inside one folder (``tar -cf a.tar DIR``); their total size is
    limited to ``limit`` bytes. The archive is read as a stream and each bound (member count, name
    length, declared sizes, decompressed bytes) is checked before the work it limits is done.
    ``destination`` must exist; returns it. A refused archive leaves no file behind in it; failing
    writes (a full disk) raise their ``OSError``.
    """
    stream, written = _MeteredArchive(path), list[Path]()
    try:
        _read_members(stream, destination, limit, written)
    except BaseException:
        for target in written:
            target.unlink(missing_ok=True)
        raise
    finally:
        stream.close()
    return destination


def _read_members(stream: _MeteredArchive, destination: Path, limit: int, written: list[Path]) -> None:
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
            _copy_members(archive, stream, destination, limit, written)
    except tarfile.TarError as e:
        raise AdapterFormatError(f"the upload is not a readable tar archive (plain or gzip): {e}") from e


def _copy_members(
    archive: tarfile.TarFile, stream: _MeteredArchive, destination: Path, limit: int, written: list[Path]
) -> None:
    total = 0
    for count, member in enumerate(iter(archive.next, None), start=1):
        if count > MAX_ARCHIVE_MEMBERS:
            raise AdapterFormatError(
                f"the archive has more than {MAX_ARCHIVE_MEMBERS} members; a PEFT directory has a handful "
                "of files"
            )
        name = _member_name(member)
        if name is None:
            continue
        total += member.size
        if total > limit:
            raise UploadTooLarge(f"the archive unpacks to more than this server's limit of {limit} bytes")
        stream.grant(member.size)
        _copy_member(archive, member, destination / name, written)


def _copy_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path, written: list[Path]
) -> None:
    if target.exists():
        raise AdapterFormatError(f"the archive holds {shorten(target.name)} twice")
    source = archive.extractfile(member)
    if source is None:
        raise AdapterFormatError(f"archive member {shorten(member.name)} has no content")
    with source, target.open("xb") as out:
        written.append(target)
        while chunk := source.read(1 << 20):
            out.write(chunk)
