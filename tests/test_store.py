"""The registry's stores: one contract for SQLite and PostgreSQL, and what only the shared one does.

PostgreSQL is a real server (see ``tests/conftest.py``); each test gets a fresh database.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import torch
from deft_server import store_postgres
from deft_server.errors import AdapterExists, RegistryUnavailable
from deft_server.registry import AdapterRegistry, AdapterState
from deft_server.store import AdapterRecord, AdapterStore, StoreError, open_store, redact_url
from deft_server.store_postgres import PostgresStore
from deft_server.uploads import UploadFile

from deft_runtime.adapter import AdapterKind
from deft_runtime.base_view import BaseView
from deft_runtime.errors import AdapterIncompatible, AdapterNotFound
from deft_runtime.formats import ReadLimits, save_adapter
from deft_runtime.models import build_tiny_omnigen, build_tiny_sdxl
from deft_runtime.pool import PoolConfig
from deft_runtime.runtime import MultiAdapterModel
from deft_runtime.testing import random_adapter


def _record(name: str, data: bytes) -> AdapterRecord:
    sha = hashlib.sha256(data).hexdigest()
    return AdapterRecord(name, sha, "safetensors", "deft", "deft", "qr", (2,), 1, len(data), 8, {"k": name})


def _upload(store: AdapterStore, data: bytes) -> Path:
    path = store.cache.tmp / f"upload-{hashlib.sha256(data).hexdigest()[:8]}"
    path.write_bytes(data)
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request, tmp_path) -> Callable[[str], AdapterStore]:
    """``make_store(cache)``: a store on this test's registry, with local folder ``tmp_path/cache``."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    opened: list[AdapterStore] = []

    def make(cache: str = "a") -> AdapterStore:
        store = open_store(tmp_path / (cache if url else "shared"), url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_commit_find_remove_round_trip(make_store):
    store = make_store()
    data = b"adapter bytes" * 100
    record = _record("dog", data)
    store.commit(record, _upload(store, data))
    assert store.find("dog") == record == store.get("dog") and store.records() == [record]
    assert store.count() == 1 and store.find("cat") is None
    assert store.blob_path(record.sha256).read_bytes() == data
    assert store.remove("dog") == record
    assert store.records() == [] and store.count() == 0
    assert not store.cache.blob_path(record.sha256).exists()
    with pytest.raises(AdapterNotFound, match="no adapter named 'dog'"):
        store.remove("dog")
    with pytest.raises(AdapterNotFound):
        store.get("dog")


def test_a_taken_name_stores_nothing(make_store):
    store = make_store()
    store.commit(_record("dog", b"one"), _upload(store, b"one"))
    with pytest.raises(AdapterExists, match="'dog' is already registered"):
        store.commit(_record("dog", b"two"), _upload(store, b"two"))
    assert store.get("dog").sha256 == hashlib.sha256(b"one").hexdigest()
    assert not store.cache.blob_path(hashlib.sha256(b"two").hexdigest()).exists()


def test_names_sharing_bytes_keep_them_until_the_last_goes(make_store):
    store = make_store()
    data = b"same bytes"
    store.commit(_record("a", data), _upload(store, data))
    store.commit(_record("b", data), _upload(store, data))
    sha = hashlib.sha256(data).hexdigest()
    store.remove("a")
    assert store.blob_path(sha).read_bytes() == data
    store.remove("b")
    assert not store.cache.blob_path(sha).exists()


def test_records_page_walks_every_name_in_order(make_store):
    store = make_store()
    names = ["B", "a", "a-1", "a.2", "a_3", "b", "z9"]
    for name in names:
        store.commit(_record(name, name.encode()), _upload(store, name.encode()))
    seen, after = [], ""
    while page := store.records_page(after, 3):
        assert len(page) <= 3
        seen += [r.name for r in page]
        after = page[-1].name
    assert seen == [r.name for r in store.records()] and sorted(seen) == sorted(names)
    assert store.records_page("z9", 3) == [] and store.records_page("", 0) == []


# ---------------------------------------------------------------------------- PostgreSQL only


def _blob_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute("SELECT count(*) FROM deft_blobs").fetchone()[0])


def test_every_replica_sees_a_registration_at_once_and_fetches_the_bytes(postgres_url, tmp_path, monkeypatch):
    monkeypatch.setattr(store_postgres, "CHUNK_BYTES", 1000)  # many chunks, streamed both ways
    one, two = PostgresStore(postgres_url, tmp_path / "one"), PostgresStore(postgres_url, tmp_path / "two")
    data = bytes(range(256)) * 40  # 10 KiB: 11 chunks
    record = _record("dog", data)
    one.commit(record, _upload(one, data))
    assert two.find("dog") == record and two.count() == 1
    assert not two.cache.blob_path(record.sha256).exists()
    assert two.blob_path(record.sha256).read_bytes() == data  # streamed into two's own cache
    assert two.cache.blob_path(record.sha256).exists()
    with pytest.raises(AdapterExists):  # the name is taken fleet-wide
        two.commit(_record("dog", b"other"), _upload(two, b"other"))
    assert _blob_count(postgres_url) == 1  # the refused upload's bytes were rolled back
    two.remove("dog")
    assert one.find("dog") is None and _blob_count(postgres_url) == 0
    one.close()
    two.close()


def test_corrupted_bytes_are_refused_not_served(postgres_url, tmp_path):
    store = PostgresStore(postgres_url, tmp_path / "c")
    record = _record("dog", b"good bytes")
    store.commit(record, _upload(store, b"good bytes"))
    store.cache.drop(record.sha256)
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE deft_blob_chunks SET data = %s", (b"evil bytes",))
    with pytest.raises(StoreError, match="no intact copy"):
        store.blob_path(record.sha256)
    assert not store.cache.blob_path(record.sha256).exists()
    store.close()


def test_schema_from_a_newer_deft_is_refused(postgres_url, tmp_path):
    PostgresStore(postgres_url, tmp_path / "a").close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM deft_schema").fetchall() == [
            (store_postgres.SCHEMA_VERSION,)
        ]
        conn.execute("UPDATE deft_schema SET version = 99")
    with pytest.raises(StoreError, match="schema version 99, written by a newer deft"):
        PostgresStore(postgres_url, tmp_path / "b")


def test_an_unreachable_database_is_a_clear_error_without_the_password(tmp_path):
    from conftest import free_port

    url = f"postgresql://deft:s3cret@127.0.0.1:{free_port()}/nope"
    with pytest.raises(StoreError, match="cannot connect to the registry database") as e:
        open_store(tmp_path, url)
    assert "s3cret" not in str(e.value) and "deft:***@127.0.0.1" in str(e.value)
    with pytest.raises(StoreError, match="unsupported --registry 'mysql://u:\\*\\*\\*@h/db'"):
        open_store(tmp_path, "mysql://u:pw@h/db")
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_a_dropped_connection_is_reopened(postgres_url, tmp_path, make_postgres_db):
    store = PostgresStore(postgres_url, tmp_path / "a")
    store.commit(_record("dog", b"x"), _upload(store, b"x"))
    with psycopg.connect(postgres_url, autocommit=True) as admin:  # what a database restart does
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    assert store.find("dog") is not None  # a read is retried once on a new connection
    store.close()
    store = PostgresStore(postgres_url, tmp_path / "b")
    store.commit(_record("cat", b"y"), _upload(store, b"y"))
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    with pytest.raises(RegistryUnavailable, match="unreachable.*retry"):  # a write is not retried
        store.remove("cat")
    assert store.remove("cat").name == "cat"  # ...but the next call reconnects
    store.close()


# ---------------------------------------------------------------------------- registries sharing PostgreSQL


def _shapes(unet: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Two of the UNet's attention projections, as adapter targets."""
    names = [n for n, m in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))][:2]
    return {n: tuple(unet.get_submodule(n).weight.shape) for n in names}  # type: ignore[misc]


def _registry(url: str, cache: Path, denoiser: torch.nn.Module) -> tuple[AdapterRegistry, MultiAdapterModel]:
    """As the server wires them: base view → registry → model whose pool loads through the registry."""
    base = BaseView(denoiser)
    registry = AdapterRegistry(PostgresStore(url, cache), base, read_limits=ReadLimits(), max_rank=8)
    pool = PoolConfig(device_bytes=4 << 20, host_bytes=4 << 20)
    model = MultiAdapterModel(denoiser, base=base, pool_config=pool, backend="torch", source=registry)
    return registry, model


def _received(tmp: Path, adapter, name: str):
    path = tmp / f"{name}.deft.safetensors"
    save_adapter(adapter, path)
    upload = UploadFile(tmp, limit=1 << 30)
    upload.write(path.read_bytes())
    return upload.finish()


def test_replicas_see_registrations_deletions_and_replacements_of_each_other(postgres_url, tmp_path):
    unet = build_tiny_sdxl(0).unet
    one, _ = _registry(postgres_url, tmp_path / "one", copy.deepcopy(unet))
    two, model = _registry(postgres_url, tmp_path / "two", copy.deepcopy(unet))
    first = random_adapter(AdapterKind.DEFT, _shapes(unet), rank=2, seed=1)
    one.register("dog", _received(tmp_path, first, "first"), None, {})

    assert two.exists("dog") and len(two) == 1  # registered on one, seen by two at once
    factors = two.load_compiled("dog")  # compiled on first use from the shared bytes
    assert model.pool.acquire(["dog"]) is not None
    model.pool.release(["dog"])
    assert two.state("dog")[0] is AdapterState.READY and model.pool.is_resident("dog")

    one.delete("dog")  # deleted on one: two stops serving its copy at the next use
    assert not two.exists("dog")
    with pytest.raises(AdapterNotFound):
        two.load_compiled("dog")
    with pytest.raises(AdapterNotFound):
        model.pool.acquire(["dog"])

    second = random_adapter(AdapterKind.DEFT, _shapes(unet), rank=2, seed=2)
    one.register("dog", _received(tmp_path, second, "second"), None, {})  # same name, other bytes
    assert two.exists("dog")
    again = two.load_compiled("dog")
    layer = next(iter(factors.factors))
    assert not torch.equal(again.factors[layer].A, factors.factors[layer].A)
    slot = model.pool.acquire(["dog"])["dog"]  # the pool reloads the new bytes, never the old copy
    pages = model.pool.layers[layer].page_table[slot, : again.factors[layer].rank].long()
    torch.testing.assert_close(model.pool.layers[layer].A[pages], again.factors[layer].A)
    model.pool.release(["dog"])
    for registry in (one, two):
        registry.store.close()


def test_an_adapter_that_does_not_fit_fails_on_first_use_on_that_replica_only(postgres_url, tmp_path):
    unet = build_tiny_sdxl(0).unet
    sdxl, _ = _registry(postgres_url, tmp_path / "sdxl", unet)
    sdxl.register(
        "dog", _received(tmp_path, random_adapter(AdapterKind.DEFT, _shapes(unet), rank=2), "a"), None, {}
    )
    omnigen, _ = _registry(postgres_url, tmp_path / "omnigen", build_tiny_omnigen(0).transformer)
    assert omnigen.exists("dog")
    with pytest.raises(AdapterIncompatible, match="'dog'"):
        omnigen.load_compiled("dog")
    assert omnigen.state("dog")[0] is AdapterState.INCOMPATIBLE
    assert sdxl.state("dog")[0] is AdapterState.READY and sdxl.load_compiled("dog").factors
    for registry in (sdxl, omnigen):
        registry.store.close()
