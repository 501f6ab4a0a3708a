"""Tenant machinery without a server: the v1 → v2 migration, keys (hashes only, revocation), the
per-tenant store scoping and quotas, the admission limiter and the key cache's one-second bound."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from deft_server.errors import AdapterExists
from deft_server.keys import KeyRecord, new_key, parse_key
from deft_server.store import MIGRATIONS, AdapterRecord, SQLiteStore
from deft_server.tenants import PUBLIC, Limits, NotPermitted, QuotaExceeded, Tenant, split_pool_name
from deft_server.tenants_auth import CACHE_TTL_S, KeyResolver, is_loopback
from deft_server.tenants_limits import TenantLimiter

from deft_runtime.errors import InvalidRequest


def _record(name: str, data: bytes, owner: str = PUBLIC) -> AdapterRecord:
    sha = hashlib.sha256(data).hexdigest()
    return AdapterRecord(
        name, sha, "safetensors", "deft", "deft", "qr", (2,), 1, len(data), 8, {}, owner=owner
    )


def _upload(store: SQLiteStore, data: bytes) -> Path:
    path = store.cache.tmp / f"up-{hashlib.sha256(data).hexdigest()[:8]}"
    path.write_bytes(data)
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_v1_registry_migrates_and_its_adapters_become_public(tmp_path):
    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    db.executescript(MIGRATIONS[1])
    db.execute(
        "INSERT INTO adapters VALUES ('dog', ?, 'safetensors', 'deft', 'deft', 'qr', '[2]', 1, 3, 8, '{}', 1.0)",
        ("ab" * 32,),
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = SQLiteStore(tmp_path)
    try:
        (dog,) = store.records()
        assert (dog.owner, dog.name, dog.sha256) == (PUBLIC, "dog", "ab" * 32)
        assert store.find_visible("dog", ("alice", PUBLIC)) == [dog]
        assert store.keys.all() == []
    finally:
        store.close()


def test_names_are_per_owner_and_lookups_never_see_other_tenants(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        store.commit(_record("dog", b"a", "alice"), _upload(store, b"a"))
        store.commit(_record("dog", b"b", "bob"), _upload(store, b"b"))
        with pytest.raises(AdapterExists):
            store.commit(_record("dog", b"c", "alice"), _upload(store, b"c"))
        assert [r.owner for r in store.find_visible("dog", ("alice", PUBLIC))] == ["alice"]
        assert store.find_visible("dog", ("carol", PUBLIC)) == []
        assert [r.pool_name for r in store.records_page("", 10, ("bob", PUBLIC))] == ["bob/dog"]
        assert [r.pool_name for r in store.records_page("alice/dog", 10)] == ["bob/dog"]
        store.remove("dog", "alice")
        assert store.find("dog", "bob") is not None and store.usage("alice") == (0, 0)
    finally:
        store.close()


def test_storage_quotas_are_checked_in_the_commit(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        store.commit(_record("a", b"xx", "t"), _upload(store, b"xx"), Limits(max_adapters=1))
        with pytest.raises(QuotaExceeded, match="max_adapters=1"):
            store.commit(_record("b", b"yy", "t"), _upload(store, b"yy"), Limits(max_adapters=1))
        with pytest.raises(QuotaExceeded, match="max_adapter_bytes=3"):
            store.commit(_record("c", b"zz", "t"), _upload(store, b"zz"), Limits(max_adapter_bytes=3))
        assert store.usage("t") == (1, 2)  # nothing of the refused ones was stored
        assert not store.cache.blob_path(hashlib.sha256(b"yy").hexdigest()).exists()
    finally:
        store.close()


def test_keys_store_only_a_salted_hash_and_revocation_sticks(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        record, key = new_key("alice", limits=Limits(rate=2.0))
        store.keys.insert(record)
        key_id, secret = parse_key(key) or ("", "")
        assert key_id == record.key_id and secret not in repr(store.keys.all())
        raw = sqlite3.connect(tmp_path / "registry.sqlite3").execute("SELECT * FROM keys").fetchall()
        assert secret not in repr(raw)
        tenant = store.keys.verify(key)
        assert tenant == Tenant("alice", key_id, False, Limits(rate=2.0))
        assert store.keys.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # wrong secret
        assert store.keys.verify("deft_" + "0" * 12 + "_" + secret) is None  # unknown id
        assert store.keys.verify("not a key") is None
        store.keys.revoke(key_id)
        assert store.keys.verify(key) is None and store.keys.get(key_id).revoked
        other, _ = new_key("alice")
        assert other.salt != record.salt
    finally:
        store.close()


def test_key_input_is_checked():
    with pytest.raises(InvalidRequest, match="tenant id"):
        new_key("_public")
    with pytest.raises(InvalidRequest, match="--weight"):
        new_key("a", limits=Limits(weight=0))
    with pytest.raises(InvalidRequest, match="--rate"):
        new_key("a", limits=Limits(rate=-1))
    assert isinstance(KeyRecord.from_row(new_key("a")[0].row()), KeyRecord)


def test_public_registration_needs_an_admin():
    assert Tenant("a", admin=True).owner_for(public=True) == PUBLIC
    assert Tenant("a").owner_for(public=False) == "a"
    with pytest.raises(NotPermitted):
        Tenant("a").owner_for(public=True)
    assert split_pool_name("a/dog") == ("a", "dog") and split_pool_name("dog") == (PUBLIC, "dog")


def test_concurrency_and_rate_limits_per_tenant():
    clock = Clock()
    limiter = TenantLimiter(clock)
    two = Tenant("a", limits=Limits(max_concurrent=2))
    first, _second = limiter.admit(two), limiter.admit(two)
    with pytest.raises(QuotaExceeded, match="max_concurrent=2"):
        limiter.admit(two)
    limiter.admit(Tenant("b", limits=Limits(max_concurrent=2)))  # another tenant is not affected
    first()
    first()  # idempotent
    limiter.admit(two)
    slow = Tenant("c", limits=Limits(rate=0.5))
    limiter.admit(slow)()
    with pytest.raises(QuotaExceeded, match=r"rate=0.5/s") as refused:
        limiter.admit(slow)
    assert refused.value.retry_after_s == pytest.approx(2.0)
    clock.now += 2.0
    limiter.admit(slow)()


class CountingKeys:
    def __init__(self, tenant: Tenant | None) -> None:
        self.tenant, self.calls = tenant, 0

    def verify(self, token: str) -> Tenant | None:
        self.calls += 1
        return self.tenant


class FakeStore:
    def __init__(self, keys: CountingKeys) -> None:
        self.keys = keys
        self.audited: list[str] = []
        self.audit = self

    def record(self, action: str, **fields: str) -> None:
        self.audited.append(f"{action} {fields}")


def test_a_revocation_is_seen_within_the_cache_ttl():
    clock, keys = Clock(), CountingKeys(Tenant("a"))
    store = FakeStore(keys)
    resolver = KeyResolver(store, clock)  # type: ignore[arg-type]
    assert resolver.resolve("deft_x") == Tenant("a") and resolver.resolve("deft_x") == Tenant("a")
    assert keys.calls == 1  # cached
    keys.tenant = None  # revoked in the database
    clock.now += CACHE_TTL_S * 0.99
    assert resolver.resolve("deft_x") == Tenant("a")
    clock.now += CACHE_TTL_S * 0.02
    assert resolver.resolve("deft_x") is None and keys.calls == 2
    assert store.audited and "deft_x" not in store.audited[0].replace("key_id", "")


def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")
