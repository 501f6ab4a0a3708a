"""On-disk state of the adapter registry: a SQLite index, content-addressed blobs, compiled factors.

Layout under ``--data-dir``::

    registry.sqlite3                          the index (one row per registered adapter)
    blobs/sha256/ab/abcdef…                    uploaded bytes, named by their sha256
    compiled/<base digest>/<sha256>.safetensors  compiled factors (B, A) per layer, float32
    tmp/                                      uploads in progress (emptied at start-up)

**Atomicity.** A blob is written to ``tmp/`` and moved into place with one ``os.replace``; the row
that names it is inserted in one SQLite transaction afterwards. A crash (even ``kill -9``) at any
point leaves either no row (the adapter was never registered; the stray blob is collected at the next
start) or a complete adapter. Compiled factors are a cache: a missing file is simply recompiled.

**Schema versioning.** ``PRAGMA user_version`` holds the schema version; :data:`MIGRATIONS` upgrade
older files in order, and a file from a newer deft is refused rather than misread.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deft_server.errors import AdapterExists

from deft_runtime.adapter import AdapterKind, BaseFingerprint
from deft_runtime.compile import CompiledAdapter, LowRankFactors
from deft_runtime.errors import AdapterFormatError, AdapterNotFound, DeftError
from deft_runtime.formats.safetensors_io import read_safetensors, write_safetensors_atomic

SCHEMA_VERSION = 1
MIGRATIONS: dict[int, str] = {
    # version reached → SQL that gets there from the version before
    1: """
    CREATE TABLE adapters (
        name           TEXT PRIMARY KEY,
        sha256         TEXT NOT NULL,
        upload_format  TEXT NOT NULL,   -- safetensors | peft_tar
        source_format  TEXT NOT NULL,   -- deft | peft | diffusers | kohya
        kind           TEXT NOT NULL,
        decomposition  TEXT NOT NULL,
        ranks          TEXT NOT NULL,   -- JSON list of distinct ranks
        target_count   INTEGER NOT NULL,
        size_bytes     INTEGER NOT NULL,
        compiled_bytes INTEGER NOT NULL,
        metadata       TEXT NOT NULL,   -- JSON object of strings
        created_at     REAL NOT NULL    -- unix seconds
    );
    """,
}
_COMPILED_FORMAT = "deft.compiled"
_COLUMNS = (
    "name, sha256, upload_format, source_format, kind, decomposition, ranks, target_count, "
    "size_bytes, compiled_bytes, metadata, created_at"
)


class StoreError(DeftError):
    """The data directory cannot be used (written by a newer deft, unreadable, ...)."""


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter, as the index stores it."""

    name: str
    sha256: str
    upload_format: str
    source_format: str
    kind: str
    decomposition: str
    ranks: tuple[int, ...]
    target_count: int
    size_bytes: int
    compiled_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def row(self) -> tuple[object, ...]:
        return (
            self.name,
            self.sha256,
            self.upload_format,
            self.source_format,
            self.kind,
            self.decomposition,
            json.dumps(list(self.ranks)),
            self.target_count,
            self.size_bytes,
            self.compiled_bytes,
            json.dumps(self.metadata, sort_keys=True),
            self.created_at,
        )

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> AdapterRecord:
        name, sha, upload, source, kind, decomposition, ranks, targets, size, compiled, meta, created = row
        return cls(
            name=str(name),
            sha256=str(sha),
            upload_format=str(upload),
            source_format=str(source),
            kind=str(kind),
            decomposition=str(decomposition),
            ranks=tuple(int(r) for r in json.loads(str(ranks))),
            target_count=int(targets),  # type: ignore[call-overload]
            size_bytes=int(size),  # type: ignore[call-overload]
            compiled_bytes=int(compiled),  # type: ignore[call-overload]
            metadata={str(k): str(v) for k, v in json.loads(str(meta)).items()},
            created_at=float(created),  # type: ignore[arg-type]
        )


class AdapterStore:
    """The registry's files and index. Thread-safe; every method does blocking I/O."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.expanduser()
        self.blobs = self.root / "blobs" / "sha256"
        self.compiled = self.root / "compiled"
        self.tmp = self.root / "tmp"
        for folder in (self.blobs, self.compiled, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "registry.sqlite3", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self._clear_tmp()
        self.collect_garbage()

    # ------------------------------------------------------------------ schema

    def _migrate(self) -> None:
        with self._lock:
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.root} holds a registry of schema version {version}, written by a newer deft "
                    f"(this one reads up to {SCHEMA_VERSION}); upgrade deft or use another --data-dir"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                with self._db:
                    self._db.executescript(MIGRATIONS[target])
                    self._db.execute(f"PRAGMA user_version = {target}")

    def _clear_tmp(self) -> None:
        """Uploads that were in progress when a previous process died were never registered."""
        for leftover in self.tmp.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    # ------------------------------------------------------------------ index

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY name").fetchall()
        return [AdapterRecord.from_row(r) for r in rows]

    def get(self, name: str) -> AdapterRecord:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise AdapterNotFound(f"no adapter named {name!r} is registered")
        return AdapterRecord.from_row(row)

    def insert(self, record: AdapterRecord) -> None:
        """Commit ``record`` (its blob must already be in place); one transaction."""
        placeholders = ", ".join("?" * len(record.row()))
        try:
            with self._lock, self._db:
                self._db.execute(f"INSERT INTO adapters ({_COLUMNS}) VALUES ({placeholders})", record.row())
        except sqlite3.IntegrityError as e:
            raise AdapterExists(
                f"an adapter named {record.name!r} is already registered; delete it first or pick another name"
            ) from e

    def remove(self, name: str) -> AdapterRecord:
        record = self.get(name)
        with self._lock, self._db:
            self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))
        return record

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ blobs

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def commit_blob(self, received: Path, sha256: str) -> Path:
        """Move a received upload into its content-addressed place (a no-op if already there)."""
        target = self.blob_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            received.unlink(missing_ok=True)
        else:
            os.replace(received, target)
            _fsync_dir(target.parent)
        return target

    def discard_unreferenced(self, sha256: str) -> None:
        """Delete the blob and compiled files of ``sha256`` unless a row still names them."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
        if row is not None:
            return
        self.blob_path(sha256).unlink(missing_ok=True)
        for compiled in self.compiled.glob(f"*/{sha256}.safetensors"):
            compiled.unlink(missing_ok=True)

    def collect_garbage(self) -> None:
        """Delete blobs and compiled files no row names (left by a crash or a deletion)."""
        wanted = {r.sha256 for r in self.records()}
        for blob in self.blobs.glob("*/*"):
            if blob.name not in wanted:
                blob.unlink(missing_ok=True)
        for compiled in self.compiled.glob("*/*.safetensors"):
            if compiled.name.removesuffix(".safetensors") not in wanted:
                compiled.unlink(missing_ok=True)

    # ------------------------------------------------------------------ compiled factors

    def compiled_path(self, sha256: str, base_digest: str) -> Path:
        return self.compiled / base_digest / f"{sha256}.safetensors"

    def save_compiled(self, sha256: str, base_digest: str, compiled: CompiledAdapter) -> None:
        tensors = {}
        for layer, f in compiled.factors.items():
            tensors[f"{layer}.B"], tensors[f"{layer}.A"] = f.B.float(), f.A.float()
        metadata = {"format": _COMPILED_FORMAT, "kind": compiled.kind.value, "base_digest": base_digest}
        if compiled.fingerprint is not None:
            metadata["fingerprint"] = compiled.fingerprint.to_json()
        write_safetensors_atomic(self.compiled_path(sha256, base_digest), tensors, metadata)

    def load_compiled(self, sha256: str, base_digest: str) -> CompiledAdapter | None:
        """The cached factors, or None when they are not cached (or the file is not ours)."""
        path = self.compiled_path(sha256, base_digest)
        if not path.is_file():
            return None
        try:
            tensors, metadata = read_safetensors(path)
        except AdapterFormatError:
            return None
        if metadata.get("format") != _COMPILED_FORMAT or metadata.get("base_digest") != base_digest:
            return None
        factors = {
            layer: LowRankFactors(B=tensors[f"{layer}.B"], A=tensors[f"{layer}.A"])
            for layer in _layers(tensors)
        }
        fingerprint = (
            BaseFingerprint.from_json(metadata["fingerprint"]) if "fingerprint" in metadata else None
        )
        return CompiledAdapter(
            kind=AdapterKind(metadata["kind"]),
            factors=factors,
            fingerprint=fingerprint,  # type: ignore[arg-type]
        )


def _layers(tensors: dict[str, torch.Tensor]) -> Iterator[str]:
    return (key.removesuffix(".B") for key in tensors if key.endswith(".B"))


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
