"""The audit log: key creation, update and revocation, adapter registration and deletion, failed
authentication; one entry each with time, tenant, key id, action, target and result. Never a secret.

SQLite registries append JSON lines to ``--data-dir/audit.jsonl`` (one ``write`` per line with
``O_APPEND``, so the CLI and several servers sharing the folder interleave whole lines); PostgreSQL
registries insert into ``deft_audit``, shared by every replica. Writing an entry never fails the
call it records: a failure is logged instead.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

from deft_server.keys import Execute

from deft_runtime.errors import shorten

log = logging.getLogger(__name__)
AUDIT_FILE = "audit.jsonl"
AUDIT_COLUMNS = "at, tenant, key_id, action, target, result"


@dataclass(frozen=True)
class AuditEntry:
    action: str  # key.create | key.update | key.revoke | adapter.register | adapter.delete | auth.fail
    tenant: str = ""
    key_id: str = ""
    target: str = ""  # an adapter's pool name or a key id; user input is shortened
    result: str = "ok"  # ok | the refusal's reason
    at: float = 0.0


class AuditLog(ABC):
    def record(
        self, action: str, *, tenant: str = "", key_id: str = "", target: str = "", result: str = "ok"
    ) -> None:
        entry = AuditEntry(
            action, tenant[:64], key_id[:12], shorten(target, 200, quote=False), result[:200], time.time()
        )
        try:
            self._append(entry)
        except Exception as e:  # the call it records must not fail because of its log entry
            log.error("cannot append to the audit log: %s (entry %s)", e, entry)

    @abstractmethod
    def _append(self, entry: AuditEntry) -> None: ...

    @abstractmethod
    def entries(self, limit: int = 1000) -> list[AuditEntry]:
        """The latest ``limit`` entries, oldest first."""


class JsonLinesAudit(AuditLog):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _append(self, entry: AuditEntry) -> None:
        line = (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def entries(self, limit: int = 1000) -> list[AuditEntry]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()[-limit:]
        return [AuditEntry(**json.loads(line)) for line in lines if line.strip()]


class TableAudit(AuditLog):
    def __init__(self, execute: Execute, table: str) -> None:
        self._execute = execute
        self._table = table

    def _append(self, entry: AuditEntry) -> None:
        self._execute(
            f"INSERT INTO {self._table} ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (entry.at, entry.tenant, entry.key_id, entry.action, entry.target, entry.result),
        )

    def entries(self, limit: int = 1000) -> list[AuditEntry]:
        rows = self._execute(f"SELECT {AUDIT_COLUMNS} FROM {self._table} ORDER BY id DESC LIMIT ?", (limit,))
        return [
            AuditEntry(str(a), str(t), str(k), str(g), str(r), float(at)) for at, t, k, a, g, r in rows[::-1]
        ]
