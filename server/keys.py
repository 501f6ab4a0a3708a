"""Tenant keys: created once (the secret is shown once), stored only as a salted hash, revocable.

A key reads ``deft_<key id>_<secret>``: the key id (12 hex digits) names the row, the secret is 256
random bits (URL-safe base64). The registry's database keeps ``HMAC-SHA256(salt, secret)`` with a
per-key random salt, never the secret; a check recomputes it and compares in constant time. A long
random secret needs no slow password hash (nothing to brute-force), so a check costs microseconds.

The table (``keys`` in SQLite, ``deft_keys`` in PostgreSQL, created by the store's schema v2) is
reached through :class:`KeyTable`, one implementation over a backend's ``execute`` function.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from deft_server.tenants import Limits, Tenant, validate_tenant_id

from deft_runtime.errors import DeftError, InvalidRequest, shorten

KEY_PREFIX = "deft_"
_KEY = re.compile(r"deft_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
KEY_COLUMNS = (
    "key_id, tenant, salt, digest, admin, max_adapters, max_adapter_bytes, max_concurrent, rate, weight, "
    "created_at, revoked_at"
)
#: (sql, params) → rows; a backend's one-statement runner (placeholders written as ``?``)
Execute = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


class KeyNotFound(DeftError):
    """No key has that id (NOT_FOUND)."""


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str
    salt: str  # hex
    digest: str  # hex HMAC-SHA256(salt, secret)
    admin: bool = False
    limits: Limits = field(default_factory=Limits)
    created_at: float = 0.0
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def tenant_of(self) -> Tenant:
        return Tenant(id=self.tenant, key_id=self.key_id, admin=self.admin, limits=self.limits)

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_digest(bytes.fromhex(self.salt), secret), self.digest)

    def row(self) -> tuple[Any, ...]:
        lim = self.limits
        return (
            self.key_id, self.tenant, self.salt, self.digest, int(self.admin), lim.max_adapters,
            lim.max_adapter_bytes, lim.max_concurrent, lim.rate, lim.weight, self.created_at, self.revoked_at,
        )  # fmt: skip

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> KeyRecord:
        key_id, tenant, salt, digest, admin, n, size, concurrent, rate, weight, created, revoked = row
        limits = Limits(
            max_adapters=None if n is None else int(n),
            max_adapter_bytes=None if size is None else int(size),
            max_concurrent=None if concurrent is None else int(concurrent),
            rate=None if rate is None else float(rate),
            weight=float(weight),
        )
        revoked_at = None if revoked is None else float(revoked)
        return cls(
            str(key_id), str(tenant), str(salt), str(digest), bool(admin), limits, float(created), revoked_at
        )


def _digest(salt: bytes, secret: str) -> str:
    return hmac.new(salt, secret.encode(), hashlib.sha256).hexdigest()


def new_key(tenant: str, *, admin: bool = False, limits: Limits | None = None) -> tuple[KeyRecord, str]:
    """A fresh key for ``tenant``: its record (to store) and the full key string (to show once)."""
    validate_tenant_id(tenant)
    check_limits(limits or Limits())
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    salt = secrets.token_bytes(16)
    record = KeyRecord(
        key_id, tenant, salt.hex(), _digest(salt, secret), admin, limits or Limits(), time.time()
    )
    return record, f"{KEY_PREFIX}{key_id}_{secret}"


def parse_key(token: str) -> tuple[str, str] | None:
    """``(key id, secret)`` of a well-formed key, else None."""
    match = _KEY.fullmatch(token)
    return None if match is None else (match.group(1), match.group(2))


def check_limits(limits: Limits) -> Limits:
    for name in ("max_adapters", "max_adapter_bytes", "max_concurrent"):
        value = getattr(limits, name)
        if value is not None and value < 0:
            raise InvalidRequest(f"--{name.replace('_', '-')} must be ≥ 0, got {value}")
    if limits.rate is not None and not limits.rate > 0:
        raise InvalidRequest(f"--rate must be > 0 requests per second, got {limits.rate}")
    if not 0 < limits.weight <= 1000:
        raise InvalidRequest(f"--weight must be in (0, 1000], got {limits.weight}")
    return limits


class KeyTable:
    """The keys of one registry database (SQLite or PostgreSQL, through ``execute``)."""

    def __init__(self, execute: Execute, table: str) -> None:
        self._execute = execute
        self._table = table

    def insert(self, record: KeyRecord) -> None:
        marks = ", ".join("?" * len(record.row()))
        self._execute(f"INSERT INTO {self._table} ({KEY_COLUMNS}) VALUES ({marks})", record.row())

    def find(self, key_id: str) -> KeyRecord | None:
        rows = self._execute(f"SELECT {KEY_COLUMNS} FROM {self._table} WHERE key_id = ?", (key_id,))
        return KeyRecord.from_row(rows[0]) if rows else None

    def get(self, key_id: str) -> KeyRecord:
        record = self.find(key_id)
        if record is None:
            raise KeyNotFound(f"no key has the id {shorten(key_id)}; `deft keys list` shows them")
        return record

    def all(self) -> list[KeyRecord]:
        rows = self._execute(f"SELECT {KEY_COLUMNS} FROM {self._table} ORDER BY tenant, created_at", ())
        return [KeyRecord.from_row(r) for r in rows]

    def replace(self, record: KeyRecord) -> None:
        """Store ``record``'s flags, limits and revocation (its id, tenant and hash never change)."""
        lim = record.limits
        self._execute(
            f"UPDATE {self._table} SET admin = ?, max_adapters = ?, max_adapter_bytes = ?, "
            "max_concurrent = ?, rate = ?, weight = ?, revoked_at = ? WHERE key_id = ?",
            (
                int(record.admin), lim.max_adapters, lim.max_adapter_bytes, lim.max_concurrent, lim.rate,
                lim.weight, record.revoked_at, record.key_id,
            ),
        )  # fmt: skip

    def revoke(self, key_id: str) -> KeyRecord:
        record = self.get(key_id)
        if record.revoked:
            return record
        revoked = replace(record, revoked_at=time.time())
        self.replace(revoked)
        return revoked

    def verify(self, token: str) -> Tenant | None:
        """The tenant of a valid, unrevoked key, else None. Unknown ids and wrong secrets do the same
        work (one look-up, one HMAC, one comparison)."""
        parsed = parse_key(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        record = self.find(key_id)
        if record is None:
            _decoy.matches(secret)  # the same work as a wrong secret
            return None
        if not record.matches(secret) or record.revoked:
            return None
        return record.tenant_of()


_decoy = KeyRecord("0" * 12, "decoy", "00" * 16, "0" * 64)
