"""Where the adapter registry keeps its state: an index of adapters, their uploaded bytes, compiled factors.

Two backends share one interface, :class:`AdapterStore`:

- :class:`SQLiteStore` (the default): everything under ``--data-dir``, for one machine. Several
  processes on that machine may share the folder (WAL mode, per-process temporary folders).
- :class:`~deft_server.store_postgres.PostgresStore` (``--registry postgresql://…``): the index *and*
  the uploaded bytes in PostgreSQL, shared by every replica; ``--data-dir`` then holds only this
  replica's caches. ``deploy/README.md`` argues the choice against an object store.

The index is the half that differs per backend; this process's files under ``--data-dir`` (blobs or
their cache, compiled factors, uploads in progress, garbage collection) are the
:class:`~deft_server.local_cache.LocalCache` every store has as ``store.cache``. With SQLite the index is
``registry.sqlite3`` beside them.

**Atomicity.** :meth:`AdapterStore.commit` makes an adapter visible in one transaction, after (SQLite)
or together with (PostgreSQL) its bytes. A crash at any point leaves either no row (never registered;
its files are orphans, removed at the next start) or a complete adapter. Compiled factors are a cache: a missing file is
recompiled.

**Schema versioning.** Each backend records its schema version and applies migrations in order; a
registry written by a newer deft is refused rather than misread.

**Tenants (schema v2).** Every adapter has an ``owner`` (a tenant id, or
:data:`~deft_server.tenants.PUBLIC`); names are unique per owner. Adapters of a v1 registry become
public: every tenant can use them, only admins delete them, and a server without ``--auth keys``
serves them exactly as before. The same database holds the tenant keys (:attr:`AdapterStore.keys`,
salted hashes only); the audit log (:attr:`AdapterStore.audit`) is a table in PostgreSQL and
``audit.jsonl`` beside a SQLite index.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deft_server.errors import AdapterExists, RegistryUnavailable
from deft_server.keys import KeyTable
from deft_server.local_cache import LocalCache
from deft_server.tenants import PUBLIC, Limits, pool_name, split_pool_name
from deft_server.tenants_audit import AUDIT_FILE, AuditLog, JsonLinesAudit

from deft_runtime.errors import AdapterNotFound, DeftError

if TYPE_CHECKING:
    from deft_runtime.adapter import Adapter
    from deft_runtime.formats import ReadLimits

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
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
    # tenants: adapters get an owner (v1 adapters become public), names unique per owner; keys
    2: """
    CREATE TABLE adapters_v2 (
        name           TEXT NOT NULL,
        sha256         TEXT NOT NULL,
        upload_format  TEXT NOT NULL,
        source_format  TEXT NOT NULL,
        kind           TEXT NOT NULL,
        decomposition  TEXT NOT NULL,
        ranks          TEXT NOT NULL,
        target_count   INTEGER NOT NULL,
        size_bytes     INTEGER NOT NULL,
        compiled_bytes INTEGER NOT NULL,
        metadata       TEXT NOT NULL,
        created_at     REAL NOT NULL,
        owner          TEXT NOT NULL,   -- tenant id, or '_public'
        PRIMARY KEY (owner, name)
    );
    INSERT INTO adapters_v2 SELECT *, '_public' FROM adapters;
    DROP TABLE adapters;
    ALTER TABLE adapters_v2 RENAME TO adapters;
    CREATE INDEX adapters_sha256 ON adapters (sha256);
    CREATE TABLE keys (
        key_id            TEXT PRIMARY KEY,
        tenant            TEXT NOT NULL,
        salt              TEXT NOT NULL,   -- hex, random per key
        digest            TEXT NOT NULL,   -- hex HMAC-SHA256(salt, secret); the secret is not stored
        admin             INTEGER NOT NULL,
        max_adapters      INTEGER,         -- NULL: unlimited
        max_adapter_bytes INTEGER,
        max_concurrent    INTEGER,
        rate              REAL,            -- requests per second
        weight            REAL NOT NULL,
        created_at        REAL NOT NULL,
        revoked_at        REAL
    );
    """,
}
COLUMNS = (
    "name, sha256, upload_format, source_format, kind, decomposition, ranks, target_count, "
    "size_bytes, compiled_bytes, metadata, created_at, owner"
)


class StoreError(DeftError):
    """The registry cannot be used (written by a newer deft, unreachable database, bad URL, ...)."""


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
    owner: str = PUBLIC  # the tenant that registered it, or PUBLIC

    @property
    def pool_name(self) -> str:
        return pool_name(self.owner, self.name)

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
            self.owner,
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> AdapterRecord:
        (
            name,
            sha,
            upload,
            source,
            kind,
            decomposition,
            ranks,
            targets,
            size,
            compiled,
            meta,
            created,
            owner,
        ) = row
        return cls(
            name=str(name),
            sha256=str(sha),
            upload_format=str(upload),
            source_format=str(source),
            kind=str(kind),
            decomposition=str(decomposition),
            ranks=tuple(int(r) for r in json.loads(str(ranks))),
            target_count=int(targets),
            size_bytes=int(size),
            compiled_bytes=int(compiled),
            metadata={str(k): str(v) for k, v in json.loads(str(meta)).items()},
            created_at=float(created),
            owner=str(owner),
        )


def exists_error(name: str) -> AdapterExists:
    return AdapterExists(
        f"an adapter named {name!r} is already registered; delete it first or pick another name"
    )


def not_found(name: str) -> AdapterNotFound:
    return AdapterNotFound(f"no adapter named {name!r} is registered")


class AdapterStore(ABC):
    """The registry's index of adapters and their bytes (backend-specific), with this process's
    :class:`~deft_server.local_cache.LocalCache` under ``root`` (``--data-dir``) as ``cache``.

    Thread-safe; every method does blocking I/O. Look-ups (``find``, ``records``, ``count``,
    ``references``) have no side effects.
    """

    #: whether other processes may change the index at any time (then nothing is assumed from startup)
    shared: bool = False

    def __init__(self, root: Path) -> None:
        self.cache = LocalCache(root)
        self.root = self.cache.root

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the index lives, for logs and messages (never with a password)."""

    @property
    @abstractmethod
    def keys(self) -> KeyTable:
        """The tenant keys of this registry (see :mod:`deft_server.keys`)."""

    @property
    @abstractmethod
    def audit(self) -> AuditLog:
        """Where key and adapter changes and failed authentications are recorded."""

    @abstractmethod
    def records(self, owner: str | None = None) -> list[AdapterRecord]:
        """Every registered adapter (of ``owner``, when given), by owner and name."""

    @abstractmethod
    def records_page(
        self, after: str, limit: int, owners: Sequence[str] | None = None
    ) -> list[AdapterRecord]:
        """At most ``limit`` adapters (of ``owners``, when given) after the cursor ``after`` (a pool name
        ``owner/name``, a bare name for a public one, or "" for the first), by owner and name."""

    @abstractmethod
    def find(self, name: str, owner: str = PUBLIC) -> AdapterRecord | None:
        """``owner``'s adapter registered as ``name`` now, or None."""

    @abstractmethod
    def find_visible(self, name: str, owners: Sequence[str]) -> list[AdapterRecord]:
        """The adapters named ``name`` whose owner is one of ``owners`` (one query, whoever else holds
        that name: a tenant's look-up never reads another tenant's rows)."""

    @abstractmethod
    def count(self, owner: str | None = None) -> int: ...

    @abstractmethod
    def usage(self, owner: str) -> tuple[int, int]:
        """How many adapters ``owner`` has and their upload bytes."""

    @abstractmethod
    def commit(self, record: AdapterRecord, received: Path, limits: Limits | None = None) -> None:
        """Store the bytes at ``received`` (sha256 ``record.sha256``) and make ``record`` visible,
        atomically; raises :class:`AdapterExists` (storing nothing) when the owner has the name, and
        :class:`QuotaExceeded` when ``limits`` refuse one more adapter of that size (checked in the same
        transaction, so concurrent registrations cannot overshoot)."""

    @abstractmethod
    def remove(self, name: str, owner: str = PUBLIC) -> AdapterRecord:
        """Unregister ``owner``'s ``name`` and drop its bytes unless another adapter shares them."""

    @abstractmethod
    def references(self, sha256: str) -> bool:
        """Whether any registered adapter has the bytes ``sha256``."""

    @abstractmethod
    def blob_path(self, sha256: str) -> Path:
        """A local file holding the uploaded bytes ``sha256`` (fetched into the cache if needed)."""

    def close(self) -> None:
        self.cache.close()

    def check(self) -> None:
        """Raise :class:`RegistryUnavailable` when the index cannot be used now (health probes this)."""
        self.count()

    def get(self, name: str, owner: str = PUBLIC) -> AdapterRecord:
        record = self.find(name, owner)
        if record is None:
            raise not_found(name)
        return record

    def drop_unreferenced(self, sha256: str) -> None:
        """Drop this process's files of ``sha256`` unless a registered adapter still has those bytes."""
        if not self.references(sha256):
            self.cache.drop(sha256)

    def collect_garbage(self) -> None:
        """Remove local files no registered adapter names (see :meth:`LocalCache.collect_garbage`)."""
        self.cache.collect_garbage(lambda: {r.sha256 for r in self.records()})


USAGE_SQL = "SELECT count(*), coalesce(sum(size_bytes), 0) FROM {table} WHERE owner = %s"


def _usage(row: tuple[Any, ...] | None) -> tuple[int, int]:
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def cursor_of(after: str) -> tuple[str, str]:
    """The ``(owner, name)`` a page continues after ("" → before everything)."""
    return split_pool_name(after) if after else ("", "")


def owners_clause(owners: Sequence[str] | None, mark: str = "?") -> tuple[str, tuple[str, ...]]:
    """A WHERE condition restricting rows to ``owners`` (None: every owner), and its parameters."""
    if owners is None:
        return "1 = 1", ()
    return f"owner IN ({', '.join([mark] * len(owners))})", tuple(owners)


class SQLiteStore(AdapterStore):
    """The default backend: a SQLite index and the blobs in ``--data-dir``, on one machine."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self._lock = threading.Lock()
        self._path = self.root / "registry.sqlite3"
        self._db = sqlite3.connect(self._path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._identity = _file_identity(self._path)
        self._migrate()
        self._keys = KeyTable(self._rows, "keys")
        self._audit = JsonLinesAudit(self.root / AUDIT_FILE)
        self.collect_garbage()

    @property
    def location(self) -> str:
        return str(self.root / "registry.sqlite3")

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
                    self._db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[target]}")
                    self._db.execute(f"PRAGMA user_version = {target}")

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction (the key table and audit use this too)."""
        with self._lock, self._db:
            return self._db.execute(sql, params).fetchall()

    @property
    def keys(self) -> KeyTable:
        return self._keys

    @property
    def audit(self) -> AuditLog:
        return self._audit

    def records(self, owner: str | None = None) -> list[AdapterRecord]:
        where, params = owners_clause(None if owner is None else (owner,))
        rows = self._rows(f"SELECT {COLUMNS} FROM adapters WHERE {where} ORDER BY owner, name", params)
        return [AdapterRecord.from_row(r) for r in rows]

    def records_page(
        self, after: str, limit: int, owners: Sequence[str] | None = None
    ) -> list[AdapterRecord]:
        where, params = owners_clause(owners)
        sql = f"SELECT {COLUMNS} FROM adapters WHERE (owner, name) > (?, ?) AND {where} ORDER BY owner, name LIMIT ?"
        rows = self._rows(sql, (*cursor_of(after), *params, limit))
        return [AdapterRecord.from_row(r) for r in rows]

    def find(self, name: str, owner: str = PUBLIC) -> AdapterRecord | None:
        rows = self._rows(f"SELECT {COLUMNS} FROM adapters WHERE owner = ? AND name = ?", (owner, name))
        return AdapterRecord.from_row(rows[0]) if rows else None

    def find_visible(self, name: str, owners: Sequence[str]) -> list[AdapterRecord]:
        where, params = owners_clause(owners)
        rows = self._rows(f"SELECT {COLUMNS} FROM adapters WHERE name = ? AND {where}", (name, *params))
        return [AdapterRecord.from_row(r) for r in rows]

    def count(self, owner: str | None = None) -> int:
        where, params = owners_clause(None if owner is None else (owner,))
        return int(self._rows(f"SELECT count(*) FROM adapters WHERE {where}", params)[0][0])

    def usage(self, owner: str) -> tuple[int, int]:
        with self._lock:
            return _usage(
                self._db.execute(USAGE_SQL.format(table="adapters").replace("%s", "?"), (owner,)).fetchone()
            )

    def check(self) -> None:
        """The database file must still be the one opened (not removed or replaced) and readable."""
        try:
            identity = _file_identity(self._path)
        except FileNotFoundError:
            raise RegistryUnavailable(
                f"the registry database {self._path} was removed while the server ran; registrations are "
                "refused so that none is lost: restore the file and restart the server"
            ) from None
        if identity != self._identity:
            raise RegistryUnavailable(
                f"the registry database {self._path} was replaced while the server ran; restart the server"
            )
        try:
            with self._lock:
                self._db.execute("SELECT name FROM adapters LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            raise RegistryUnavailable(f"the registry database {self._path} is unreadable: {e}") from e

    def commit(self, record: AdapterRecord, received: Path, limits: Limits | None = None) -> None:
        placeholders = ", ".join("?" * len(record.row()))
        try:
            self.cache.place_blob(received, record.sha256)
            with self._lock, self._db:
                self._db.execute("BEGIN IMMEDIATE")  # the quota check and the insert, serialized
                if limits is not None:
                    used = _usage(
                        self._db.execute(
                            USAGE_SQL.format(table="adapters").replace("%s", "?"), (record.owner,)
                        ).fetchone()
                    )
                    limits.check_storage(*used, record.size_bytes)
                self._db.execute(f"INSERT INTO adapters ({COLUMNS}) VALUES ({placeholders})", record.row())
        except sqlite3.IntegrityError as e:
            self.drop_unreferenced(record.sha256)
            raise exists_error(record.name) from e
        except BaseException:
            with contextlib.suppress(Exception):  # else the next start collects them
                self.drop_unreferenced(record.sha256)
            raise

    def remove(self, name: str, owner: str = PUBLIC) -> AdapterRecord:
        record = self.get(name, owner)
        try:
            self._delete_row(name, owner)
        except sqlite3.OperationalError as e:
            if not (_is_disk_full(e) and self.cache.release_reserve()):
                raise
            self._delete_row(name, owner)  # with the reserved bytes free
        self.drop_unreferenced(record.sha256)
        self.cache.ensure_reserve()
        return record

    def _delete_row(self, name: str, owner: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM adapters WHERE owner = ? AND name = ?", (owner, name))

    def references(self, sha256: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
        return row is not None

    def blob_path(self, sha256: str) -> Path:
        return self.cache.blob_path(sha256)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        super().close()


REGISTRY_URL_HELP = (
    "give a postgresql://USER:PASSWORD@HOST:PORT/DB URL, or leave it out to use SQLite in --data-dir"
)


def is_registry_url(url: str) -> bool:
    """Whether ``--registry`` names a backend deft has (PostgreSQL)."""
    return url.split("://", 1)[0].lower() in ("postgresql", "postgres") if "://" in url else False


def open_store(data_dir: Path, registry: str | None = None) -> AdapterStore:
    """The store ``deft serve --data-dir DIR [--registry URL]`` uses."""
    if not registry:
        return SQLiteStore(data_dir)
    if not is_registry_url(registry):
        raise StoreError(f"unsupported --registry {redact_url(registry)!r}: {REGISTRY_URL_HELP}")
    from deft_server.store_postgres import PostgresStore

    return PostgresStore(registry, data_dir)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def read_registered_adapter(
    name: str,
    *,
    data_dir: Path,
    registry: str | None = None,
    limits: ReadLimits | None = None,
    unet_config: Mapping[str, Any] | None = None,
) -> Adapter:
    """Read the adapter registered as ``name`` (for tools such as ``deft export-onnx``): a public
    adapter's name, or ``TENANT/NAME`` for a tenant's.

    Opens the store read-mostly: it never clears another process's uploads in progress.
    """
    from deft_server.uploads import extract_archive

    from deft_runtime.formats import ReadLimits, load_adapter

    limits = limits or ReadLimits()
    store = open_store(data_dir, registry)
    try:
        owner, bare = split_pool_name(name)
        record = store.get(bare, owner)
        path = store.blob_path(record.sha256)
        with tempfile.TemporaryDirectory(dir=store.cache.tmp) as work:
            if record.upload_format == "peft_tar":
                path = extract_archive(path, Path(work), limits.max_file_bytes)
            adapter = load_adapter(path, limits=limits, unet_config=unet_config)
        adapter.metadata["sha256"] = record.sha256  # the registered bytes, for provenance
        return adapter
    finally:
        store.close()


def _file_identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _is_disk_full(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", 0) or 0
    return (
        code & 0xFF == sqlite3.SQLITE_FULL
        or "disk is full" in str(error)
        or (isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ENOSPC)
    )
