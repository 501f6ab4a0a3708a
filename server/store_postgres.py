"""The shared registry: adapter index and uploaded bytes in PostgreSQL (``--registry postgresql://…``).

Every replica pointed at the same database sees an adapter the moment its registration commits, and
stops seeing it the moment a deletion commits. What stays per replica is derived data, kept under its
own ``--data-dir``: a cache of the uploaded bytes (content-addressed, so never stale) and the
compiled factors for the base that replica serves.

Tables (prefixed ``deft_`` so the registry can share a database with other applications)::

    deft_schema        (version)                        one row; migrations run under an advisory lock
    deft_adapters      ((owner, name) PRIMARY KEY, sha256 → deft_blobs, …the SQLite columns…)
    deft_keys          (key_id PRIMARY KEY, tenant, salt, digest, flags and limits)   salted hashes only
    deft_audit         (id, at, tenant, key_id, action, target, result)
    deft_blobs         (sha256 PRIMARY KEY, size_bytes)
    deft_blob_chunks   (sha256 → deft_blobs ON DELETE CASCADE, seq, data BYTEA)   8 MiB chunks

Bytes travel in chunks so neither side ever holds a whole upload (up to ``--max-upload-size``) in
memory. A registration is one transaction: the blob (skipped when those bytes are already stored),
then the row; a duplicate name rolls both back. A deletion is one transaction too: the row, then
the blob if no other name references it; the foreign key makes a concurrent registration of the
same bytes either see the blob or fail cleanly (it is retried once).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deft_server.errors import RegistryUnavailable
from deft_server.keys import KeyTable
from deft_server.store import (
    COLUMNS,
    USAGE_SQL,
    AdapterRecord,
    AdapterStore,
    StoreError,
    _usage,
    cursor_of,
    exists_error,
    not_found,
    owners_clause,
    redact_url,
)
from deft_server.tenants import PUBLIC, Limits
from deft_server.tenants_audit import AuditLog, TableAudit

SCHEMA_VERSION = 2
CHUNK_BYTES = 8 << 20
_MIGRATION_LOCK = 0x0DEF7  # pg_advisory_xact_lock key: one replica migrates, the others wait
_QUOTA_LOCK = 0x0DEF8  # with hashtext(owner): one registration per tenant checks its quota at a time
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE deft_blobs (
        sha256      TEXT PRIMARY KEY,
        size_bytes  BIGINT NOT NULL
    );
    CREATE TABLE deft_blob_chunks (
        sha256  TEXT NOT NULL REFERENCES deft_blobs (sha256) ON DELETE CASCADE,
        seq     INTEGER NOT NULL,
        data    BYTEA NOT NULL,
        PRIMARY KEY (sha256, seq)
    );
    CREATE TABLE deft_adapters (
        name           TEXT PRIMARY KEY,
        sha256         TEXT NOT NULL REFERENCES deft_blobs (sha256),
        upload_format  TEXT NOT NULL,
        source_format  TEXT NOT NULL,
        kind           TEXT NOT NULL,
        decomposition  TEXT NOT NULL,
        ranks          TEXT NOT NULL,
        target_count   INTEGER NOT NULL,
        size_bytes     BIGINT NOT NULL,
        compiled_bytes BIGINT NOT NULL,
        metadata       TEXT NOT NULL,
        created_at     DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX deft_adapters_sha256 ON deft_adapters (sha256);
    """,
    # tenants: adapters get an owner (v1 adapters become public), names unique per owner; keys; audit
    2: """
    ALTER TABLE deft_adapters ADD COLUMN owner TEXT NOT NULL DEFAULT '_public';
    ALTER TABLE deft_adapters ALTER COLUMN owner DROP DEFAULT;
    ALTER TABLE deft_adapters DROP CONSTRAINT deft_adapters_pkey;
    ALTER TABLE deft_adapters ADD PRIMARY KEY (owner, name);
    CREATE TABLE deft_keys (
        key_id            TEXT PRIMARY KEY,
        tenant            TEXT NOT NULL,
        salt              TEXT NOT NULL,
        digest            TEXT NOT NULL,
        admin             INTEGER NOT NULL,
        max_adapters      BIGINT,
        max_adapter_bytes BIGINT,
        max_concurrent    BIGINT,
        rate              DOUBLE PRECISION,
        weight            DOUBLE PRECISION NOT NULL,
        created_at        DOUBLE PRECISION NOT NULL,
        revoked_at        DOUBLE PRECISION
    );
    CREATE TABLE deft_audit (
        id       BIGSERIAL PRIMARY KEY,
        at       DOUBLE PRECISION NOT NULL,
        tenant   TEXT NOT NULL,
        key_id   TEXT NOT NULL,
        action   TEXT NOT NULL,
        target   TEXT NOT NULL,
        result   TEXT NOT NULL
    );
    """,
}


class PostgresStore(AdapterStore):
    """Index and bytes in PostgreSQL; local caches under ``cache_dir``. One connection, serialized."""

    shared = True

    def __init__(
        self, url: str, cache_dir: Path, *, connect_timeout: float = 10.0, statement_timeout: float = 60.0
    ) -> None:
        try:
            import psycopg
        except ImportError as e:
            raise StoreError(
                "--registry postgresql://… needs the PostgreSQL driver: pip install 'deft[postgres]'"
            ) from e
        self._pg = psycopg
        self._url = url
        # bounded waits: an unreachable or stuck database becomes an error, never a hung request
        self._connect_options: dict[str, Any] = {
            "connect_timeout": max(1, int(connect_timeout)),
            "options": f"-c statement_timeout={int(statement_timeout * 1000)}",
        }
        try:
            self._conn = psycopg.connect(url, autocommit=True, **self._connect_options)
        except psycopg.Error as e:
            raise StoreError(
                f"cannot connect to the registry database {redact_url(url)}: {str(e).strip()}"
            ) from e
        self._lock = threading.Lock()
        super().__init__(cache_dir)
        self._migrate()
        self._keys = KeyTable(self._run_marked, "deft_keys")
        self._audit = TableAudit(self._run_marked, "deft_audit")
        self.collect_garbage()

    @property
    def location(self) -> str:
        return redact_url(self._url)

    # ------------------------------------------------------------------ connection

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """The shared connection inside one transaction; reconnects a dropped connection first."""
        with self._lock:
            if self._conn.closed or self._conn.broken:
                self._reconnect()
            with self._unavailable_on_error(), self._conn.transaction():
                yield self._conn

    @contextlib.contextmanager
    def _bulk_transaction(self) -> Iterator[Any]:
        """A transaction on a connection of its own, for moving a blob's bytes: the per-request lookups
        on the shared connection never wait behind a transfer of many megabytes."""
        with self._unavailable_on_error():
            conn = self._pg.connect(self._url, autocommit=True, **self._connect_options)
            try:
                with conn.transaction():
                    yield conn
            finally:
                conn.close()

    @contextlib.contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        try:
            yield
        except self._pg.OperationalError as e:
            raise RegistryUnavailable(
                f"the registry database {self.location} is unreachable: {str(e).strip()}; retry"
            ) from e

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction; retried once on a fresh connection when the old one
        was dropped (a database restart or failover), since every caller's statement is idempotent."""
        for attempt in (0, 1):
            try:
                with self._transaction() as conn:
                    cursor = conn.execute(sql, params)
                    return list(cursor.fetchall()) if cursor.description is not None else []
            except RegistryUnavailable:
                if attempt or not self._conn.broken:
                    raise
        raise AssertionError("unreachable")

    def _reconnect(self) -> None:
        try:
            self._conn = self._pg.connect(self._url, autocommit=True, **self._connect_options)
        except self._pg.Error as e:
            raise RegistryUnavailable(
                f"cannot reconnect to the registry database {self.location}: {str(e).strip()}; retry"
            ) from e

    def _migrate(self) -> None:
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS deft_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM deft_schema").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the registry at {self.location} has schema version {version}, written by a newer "
                    f"deft (this one reads up to {SCHEMA_VERSION}); upgrade deft on every replica"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                conn.execute(MIGRATIONS[target])
            if row is None:
                conn.execute("INSERT INTO deft_schema VALUES (%s)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                conn.execute("UPDATE deft_schema SET version = %s", (SCHEMA_VERSION,))

    # ------------------------------------------------------------------ index

    def _run_marked(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """:meth:`_run` of a statement written with ``?`` placeholders (the shared key and audit code)."""
        return self._run(sql.replace("?", "%s"), params)

    @property
    def keys(self) -> KeyTable:
        return self._keys

    @property
    def audit(self) -> AuditLog:
        return self._audit

    def records(self, owner: str | None = None) -> list[AdapterRecord]:
        where, params = owners_clause(None if owner is None else (owner,), "%s")
        rows = self._run(f"SELECT {COLUMNS} FROM deft_adapters WHERE {where} ORDER BY owner, name", params)
        return [AdapterRecord.from_row(r) for r in rows]

    def records_page(
        self, after: str, limit: int, owners: Sequence[str] | None = None
    ) -> list[AdapterRecord]:
        where, params = owners_clause(owners, "%s")
        sql = (
            f"SELECT {COLUMNS} FROM deft_adapters WHERE (owner, name) > (%s, %s) AND {where} "
            "ORDER BY owner, name LIMIT %s"
        )
        return [AdapterRecord.from_row(r) for r in self._run(sql, (*cursor_of(after), *params, limit))]

    def find(self, name: str, owner: str = PUBLIC) -> AdapterRecord | None:
        sql = f"SELECT {COLUMNS} FROM deft_adapters WHERE owner = %s AND name = %s"
        rows = self._run(sql, (owner, name))
        return AdapterRecord.from_row(rows[0]) if rows else None

    def find_visible(self, name: str, owners: Sequence[str]) -> list[AdapterRecord]:
        where, params = owners_clause(owners, "%s")
        rows = self._run(f"SELECT {COLUMNS} FROM deft_adapters WHERE name = %s AND {where}", (name, *params))
        return [AdapterRecord.from_row(r) for r in rows]

    def count(self, owner: str | None = None) -> int:
        where, params = owners_clause(None if owner is None else (owner,), "%s")
        return int(self._run(f"SELECT count(*) FROM deft_adapters WHERE {where}", params)[0][0])

    def usage(self, owner: str) -> tuple[int, int]:
        return _usage(self._run(USAGE_SQL.format(table="deft_adapters"), (owner,))[0])

    def references(self, sha256: str) -> bool:
        return bool(self._run("SELECT 1 FROM deft_adapters WHERE sha256 = %s LIMIT 1", (sha256,)))

    def commit(self, record: AdapterRecord, received: Path, limits: Limits | None = None) -> None:
        for attempt in (0, 1):
            try:
                self._commit_once(record, received, limits)
                break
            except self._pg.errors.UniqueViolation as e:
                raise exists_error(record.name) from e
            except self._pg.errors.ForeignKeyViolation:  # the same bytes were deleted meanwhile
                if attempt:
                    raise
        self.cache.place_blob(received, record.sha256)  # warm this replica's cache

    def _commit_once(self, record: AdapterRecord, received: Path, limits: Limits | None) -> None:
        placeholders = ", ".join(["%s"] * len(record.row()))
        with self._bulk_transaction() as conn:
            if limits is not None:  # serialized per tenant until this transaction ends
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s::int, hashtext(%s))", (_QUOTA_LOCK, record.owner)
                )
                used = conn.execute(USAGE_SQL.format(table="deft_adapters"), (record.owner,)).fetchone()
                limits.check_storage(*_usage(used), record.size_bytes)
            inserted = conn.execute(
                "INSERT INTO deft_blobs (sha256, size_bytes) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (record.sha256, received.stat().st_size),
            ).rowcount
            if inserted:
                with received.open("rb") as f:
                    for seq, chunk in enumerate(iter(lambda: f.read(CHUNK_BYTES), b"")):
                        conn.execute(
                            "INSERT INTO deft_blob_chunks (sha256, seq, data) VALUES (%s, %s, %s)",
                            (record.sha256, seq, chunk),
                        )
            conn.execute(f"INSERT INTO deft_adapters ({COLUMNS}) VALUES ({placeholders})", record.row())

    def remove(self, name: str, owner: str = PUBLIC) -> AdapterRecord:
        with self._transaction() as conn:
            row = conn.execute(
                f"DELETE FROM deft_adapters WHERE owner = %s AND name = %s RETURNING {COLUMNS}", (owner, name)
            ).fetchone()
            if row is None:
                raise not_found(name)
            record = AdapterRecord.from_row(row)
            orphaned = conn.execute(
                "DELETE FROM deft_blobs WHERE sha256 = %s "
                "AND NOT EXISTS (SELECT 1 FROM deft_adapters WHERE sha256 = %s)",
                (record.sha256, record.sha256),
            ).rowcount
        if orphaned:
            self.cache.drop(record.sha256)
        return record

    # ------------------------------------------------------------------ bytes

    def blob_path(self, sha256: str) -> Path:
        """The cached copy, or the bytes streamed from the database into the cache (hash-checked)."""
        local = self.cache.blob_path(sha256)
        if local.is_file():
            return local
        digest = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix="blob-", dir=self.cache.tmp)
        try:
            with os.fdopen(fd, "wb") as out, self._bulk_transaction() as conn:
                cursor = conn.cursor(name=f"blob_{sha256[:16]}")  # server-side: chunk by chunk
                cursor.itersize = 1
                cursor.execute("SELECT data FROM deft_blob_chunks WHERE sha256 = %s ORDER BY seq", (sha256,))
                for (data,) in cursor:
                    digest.update(data)
                    out.write(data)
                cursor.close()
            if digest.hexdigest() != sha256:
                raise StoreError(
                    f"the registry at {self.location} holds no intact copy of blob {sha256[:12]}… "
                    "(missing or corrupted chunks); register the adapter again"
                )
            return self.cache.place_blob(Path(name), sha256)
        finally:
            Path(name).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        super().close()
