"""The adapter registry without gRPC: safe uploads, the SQLite store (schema, atomicity, garbage), and
compiled-factor caching across restarts and base models."""

from __future__ import annotations

import copy
import io
import logging
import os
import sqlite3
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from deft_server.errors import AdapterExists, RegistryUnavailable, UploadTooLarge
from deft_server.registry import AdapterRegistry, AdapterState, UploadFormat
from deft_server.store import SCHEMA_VERSION, AdapterRecord, SQLiteStore, StoreError
from deft_server.uploads import UploadFile, extract_archive, is_tar, validate_name
from peft import DeftConfig, get_peft_model
from safetensors.torch import load_file

from deft_runtime.base_view import BaseView
from deft_runtime.errors import (
    AdapterFormatError,
    AdapterIncompatible,
    AdapterNotFound,
    InvalidAdapter,
    InvalidRequest,
)
from deft_runtime.formats import ReadLimits
from deft_runtime.formats.safetensors_io import write_safetensors_atomic
from deft_runtime.models import build_tiny_omnigen, build_tiny_sdxl

# ---------------------------------------------------------------------------- names and uploads


@pytest.mark.parametrize("name", ["dog", "Dog_v2.1", "a-b", "x" * 128, "..a"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "../x", "a b", "dög", "x" * 129, "a\n"])
def test_invalid_names(name):
    with pytest.raises(InvalidRequest, match="invalid adapter name"):
        validate_name(name)


def test_upload_file_hashes_and_enforces_its_limit(tmp_path):
    upload = UploadFile(tmp_path, limit=10)
    upload.write(b"12345")
    upload.write(b"67890")
    received = upload.finish()
    assert received.size == 10 and received.path.read_bytes() == b"1234567890"
    assert received.sha256 == "c775e7b757ede630cd0aa1113bd102661ab38829ca52a6422ab782862f268646"
    upload.discard()
    assert not received.path.exists()
    upload = UploadFile(tmp_path, limit=10)
    with pytest.raises(UploadTooLarge, match="limit of 10 bytes"):
        upload.write(b"x" * 11)
    upload.discard()
    assert not any(tmp_path.iterdir())


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                archive.addfile(info, io.BytesIO(member[1]))
    return path


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_archives_unpack_flat_from_the_top_level_or_one_folder(tmp_path):
    for i, (name, mode) in enumerate([("a.json", "w"), ("dir/a.json", "w"), ("./a.json", "w:gz")]):
        archive = _tar(tmp_path / f"{i}.tar", [(name, b"{}"), ("b.safetensors", b"xx")], mode)
        assert is_tar(archive)
        out = tmp_path / f"out{i}"
        out.mkdir()
        extract_archive(archive, out, limit=100)
        assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.safetensors"]
    assert not is_tar(_write(tmp_path / "plain", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"))


@pytest.mark.parametrize(
    "members, error, match",
    [
        ([("../evil", b"x")], AdapterFormatError, "not a plain file"),
        ([("/abs/evil", b"x")], AdapterFormatError, "not a plain file"),
        ([("a/b/c", b"x")], AdapterFormatError, "not a plain file"),
        ([_link("evil", "/etc/passwd", tarfile.SYMTYPE)], AdapterFormatError, "link or special"),
        ([("x", b"1"), _link("y", "x", tarfile.LNKTYPE)], AdapterFormatError, "link or special"),
        ([_link("dev", "", tarfile.CHRTYPE)], AdapterFormatError, "link or special"),
        ([("a/x", b"1"), ("b/x", b"2")], AdapterFormatError, "twice"),
        ([(f"f{i}", b"") for i in range(20)], AdapterFormatError, "members"),
        ([("big", b"x" * 101)], UploadTooLarge, "limit of 100"),
    ],
)
def test_unsafe_archives_are_refused_without_writing_outside(tmp_path, members, error, match):
    archive = _tar(tmp_path / "a.tar", members)
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    with pytest.raises(error, match=match):
        extract_archive(archive, out, limit=100)
    assert {p.name for p in tmp_path.rglob("*")} <= {"a.tar", "deep", "out", "x", "a"}


def test_a_truncated_archive_is_a_format_error(tmp_path):
    archive = _tar(tmp_path / "a.tar", [("a.json", b"{}" * 1000)])
    archive.write_bytes(archive.read_bytes()[:700])
    with pytest.raises(AdapterFormatError, match="not a readable tar"):
        extract_archive(archive, tmp_path, limit=10_000)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- store


def _record(name: str, sha: str = "ab" * 32) -> AdapterRecord:
    return AdapterRecord(name, sha, "safetensors", "deft", "deft", "qr", (2, 4), 3, 10, 20, {"k": "v"})


def test_store_schema_version_and_refusal_of_newer_files(tmp_path):
    store = SQLiteStore(tmp_path)
    store.commit(_record("a"), _write(store.cache.tmp / "x", b"x"))
    assert store.get("a") == store.records()[0] and store.get("a").ranks == (2, 4)
    with pytest.raises(AdapterExists, match="already registered"):
        store.commit(_record("a"), _write(store.cache.tmp / "y", b"y"))
    store.close()
    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99, written by a newer deft"):
        SQLiteStore(tmp_path)


def test_store_start_up_clears_dead_uploads_and_every_unclaimed_orphan(tmp_path):
    store = SQLiteStore(tmp_path)
    store.commit(_record("a", "cd" * 32), _write(store.cache.tmp / "k", b"kept"))
    orphan, claimed = "ef" * 32, "12" * 32  # files a crash left before their rows were inserted
    dead = tmp_path / "tmp" / "999999999-dead"  # the upload folder of a process that died ...
    _write(tmp_path / "tmp" / f"{dead.name}.claims" / orphan, b"")  # ... mid-registration: claim dies too
    _write(dead / "upload-1.part", b"half")
    for sha in (orphan, claimed):
        _write(store.cache.blob_path(sha), b"orphan")
        _write(store.cache.compiled_path(sha, "digest"), b"factors")
    partial = store.cache.compiled / "digest" / ".x.safetensors.tmp-999999999"  # an atomic write cut short
    _write(partial, b"half")
    live = store.cache.tmp  # this process's: another store in a running process must not lose its uploads
    _write(live / "upload-2.part", b"in progress")

    with store.cache.claim(claimed):  # this (running) process is registering these bytes right now
        other = SQLiteStore(tmp_path)
    assert not dead.exists() and not (tmp_path / "tmp" / f"{dead.name}.claims").exists()
    assert (live / "upload-2.part").exists() and other.cache.tmp != live
    assert other.blob_path("cd" * 32).read_bytes() == b"kept"
    assert not other.blob_path(orphan).exists() and not other.cache.compiled_path(orphan, "digest").exists()
    assert other.blob_path(claimed).exists() and other.cache.compiled_path(claimed, "digest").exists()
    assert not partial.exists()
    with pytest.raises(AdapterNotFound):
        other.remove("nope")
    store.close()
    assert not live.exists()  # a clean close removes the process's own folder
    other.close()
    third = SQLiteStore(tmp_path)  # nobody claims them any more: collected at this start
    assert not third.blob_path(claimed).exists() and not third.cache.compiled_path(claimed, "digest").exists()
    third.close()


def test_store_health_check_notices_a_removed_or_replaced_database(tmp_path):
    store = SQLiteStore(tmp_path)
    store.check()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"registry.sqlite3{suffix}").unlink(missing_ok=True)
    with pytest.raises(RegistryUnavailable, match="was removed while the server ran"):
        store.check()
    SQLiteStore(tmp_path / "elsewhere").close()
    os.replace(tmp_path / "elsewhere" / "registry.sqlite3", tmp_path / "registry.sqlite3")
    with pytest.raises(RegistryUnavailable, match="was replaced"):
        store.check()
    store.close()


def test_a_failed_commit_leaves_no_blob_or_compiled_file(tmp_path, monkeypatch):
    store = SQLiteStore(tmp_path)
    sha = "ab" * 32
    _write(store.cache.compiled_path(sha, "digest"), b"factors")

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "_db", _FailingDb(store._db, full))
    with pytest.raises(sqlite3.OperationalError):
        store.commit(_record("a", sha), _write(store.cache.tmp / "u", b"bytes"))
    monkeypatch.undo()
    assert not store.cache.blob_path(sha).exists() and not store.cache.compiled_path(sha, "digest").exists()
    store.close()


class _FailingDb:
    """A SQLite connection whose INSERTs fail (as on a full disk); reads go through."""

    def __init__(self, db: sqlite3.Connection, fail) -> None:
        self._db, self._fail = db, fail

    def execute(self, sql: str, *args):
        return self._fail() if sql.lstrip().startswith("INSERT") else self._db.execute(sql, *args)

    def __enter__(self):
        return self._db.__enter__()

    def __exit__(self, *exc):
        return self._db.__exit__(*exc)


# ---------------------------------------------------------------------------- registry on a real base

TARGETS = ["to_q", "to_v"]


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = DeftConfig(r=2, target_modules=TARGETS, decomposition_method="qr", init_weights=False)
    path = tmp_path_factory.mktemp("adapter") / "peft"
    get_peft_model(copy.deepcopy(build_tiny_sdxl(0).unet), config).save_pretrained(path)
    return path


def _registry(data_dir: Path, denoiser: torch.nn.Module) -> AdapterRegistry:
    return AdapterRegistry(SQLiteStore(data_dir), BaseView(denoiser), read_limits=ReadLimits(), max_rank=8)


def _received(tmp: Path, peft_dir: Path):
    archive = tmp / "upload.tar"
    with tarfile.open(archive, "w") as tar:
        for f in peft_dir.iterdir():
            tar.add(f, arcname=f.name)
    upload = UploadFile(tmp, limit=1 << 30)
    upload.write(archive.read_bytes())
    return upload.finish()


def test_registry_caches_compiled_factors_across_restarts_and_bases(tmp_path, peft_dir, caplog):
    caplog.set_level(logging.INFO, logger="deft_server.registry")
    registry = _registry(tmp_path / "data", build_tiny_sdxl(0).unet)
    record = registry.register("dog", _received(tmp_path, peft_dir), None, {"a": "b"})
    assert (record.upload_format, record.source_format, record.ranks) == ("peft_tar", "peft", (2,))
    first = registry.load_compiled("dog")
    registry.store.close()
    assert caplog.text.count("compiling adapter 'dog'") == 1

    caplog.clear()  # same base: the cached factors are used, nothing is recompiled
    registry = _registry(tmp_path / "data", build_tiny_sdxl(0).unet)
    again = registry.load_compiled("dog")
    assert "compiling" not in caplog.text and "1 from the compiled cache" in caplog.text
    assert all(torch.equal(first.factors[k].A, again.factors[k].A) for k in first.factors)
    registry.store.close()

    caplog.clear()  # other weights, same architecture: compiled again for that base
    registry = _registry(tmp_path / "data", build_tiny_sdxl(1).unet)
    assert "compiling adapter 'dog'" in caplog.text and registry.state("dog")[0] is AdapterState.READY
    assert not torch.equal(
        registry.load_compiled("dog").factors[next(iter(first.factors))].A,
        next(iter(first.factors.values())).A,
    )
    registry.store.close()

    registry = _registry(tmp_path / "data", build_tiny_omnigen(0).transformer)  # another architecture
    state, reason = registry.state("dog")
    assert state is AdapterState.INCOMPATIBLE and "no adapter target" in reason
    with pytest.raises(AdapterIncompatible):
        registry.load_compiled("dog")
    assert [r.name for r in registry.records()] == ["dog"]  # kept, just not usable here
    registry.delete("dog")
    assert not registry.exists("dog") and not any(registry.store.cache.blobs.glob("*/*"))
    assert not any(registry.store.cache.compiled.glob("*/*"))


def test_racing_registrations_of_the_same_bytes_leave_one_intact(tmp_path, peft_dir, monkeypatch):
    """Threads registering one name with the same bytes all pass the early name check, compile, and
    then write the same content-addressed files at once: one wins, the others get AdapterExists (never
    an I/O error from a shared temporary file), and the winner's blob and factors survive the losers'
    clean-up."""
    registry = _registry(tmp_path / "data", build_tiny_sdxl(0).unet)
    threads = 4
    barrier = threading.Barrier(threads, timeout=60)
    build = registry._build

    def build_then_wait(*args, **kwargs):
        built = build(*args, **kwargs)
        barrier.wait()  # every thread is past check_free before anyone saves or commits
        return built

    monkeypatch.setattr(registry, "_build", build_then_wait)
    folders = [tmp_path / f"u{i}" for i in range(threads)]
    uploads = [_received(f, peft_dir) for f in folders if not f.mkdir()]
    outcomes: list[object] = []

    def register(upload) -> None:
        try:
            outcomes.append(registry.register("race", upload, None, {}))
        except Exception as e:
            outcomes.append(e)

    workers = [threading.Thread(target=register, args=(u,)) for u in uploads]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert sorted(type(o).__name__ for o in outcomes) == ["AdapterExists"] * (threads - 1) + ["AdapterRecord"]
    (record,) = [o for o in outcomes if isinstance(o, AdapterRecord)]
    assert registry.store.blob_path(record.sha256).is_file()
    assert registry.store.cache.compiled_path(record.sha256, registry.base_digest).is_file()
    assert not any(registry.store.cache.compiled.glob("*/.*.tmp-*"))
    assert not any(registry.store.cache.tmp_root.glob("*.claims/*"))  # every claim released
    assert registry.load_compiled("race").factors


def test_a_claim_outlives_each_thread_but_the_last(tmp_path):
    cache = SQLiteStore(tmp_path).cache
    sha = "ab" * 32
    _write(cache.blob_path(sha), b"bytes")
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache.claim(sha):
            inside.set()
            release.wait(30)

    other = threading.Thread(target=hold)
    other.start()
    assert inside.wait(30)
    with cache.claim(sha):
        pass  # this thread's claim ends; the other thread's is still held
    assert cache._claimed() == {sha}
    cache.drop(sha)  # another registration of these bytes is in progress: its files stay
    assert cache.blob_path(sha).is_file()
    release.set()
    other.join(30)
    assert cache._claimed() == set()
    cache.drop(sha)
    assert not cache.blob_path(sha).exists()


def test_threads_writing_one_file_atomically_all_succeed(tmp_path):
    target = tmp_path / "same.safetensors"
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        try:
            for _ in range(20):
                write_safetensors_atomic(target, {"x": torch.full((256,), float(seed))}, {"k": "v"})
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert errors == []
    assert load_file(target)["x"].unique().numel() == 1  # one writer's whole file, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["same.safetensors"]


def test_a_failed_registration_leaves_nothing(tmp_path, peft_dir):
    registry = _registry(tmp_path / "data", build_tiny_sdxl(0).unet)
    upload = UploadFile(tmp_path, limit=1 << 20)
    upload.write(b"not an adapter at all" * 10)
    with pytest.raises(InvalidAdapter):  # a "header length" of ~7e18: refused before any allocation
        registry.register("bad", upload.finish(), UploadFormat.SAFETENSORS, {})
    assert registry.records() == [] and not any(registry.store.cache.blobs.glob("*/*"))
    assert not any(registry.store.cache.tmp.iterdir())
