"""Faults and churn: adapter lifecycle under concurrent use, storage failures, crashes.

- In-process: the adapter pool never holds its lock while its source works (the deadlock of a loader
  holding the pool lock while the registry waited for it), and a deleted or replaced adapter is never
  served from a stale pool copy.
- Real server processes over loopback: 60 s of generation while another client deletes and re-registers
  the same adapters (every RPC must keep answering), a disk that fills up (a small tmpfs), the registry
  database removed while the server runs, and kill -9 in the middle of a registration.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import torch
from deft_client import DeftClient, DeftError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deft_runtime.adapter import AdapterKind
from deft_runtime.base_view import BaseView
from deft_runtime.errors import AdapterNotFound
from deft_runtime.formats import save_adapter
from deft_runtime.models import build_tiny_sdxl
from deft_runtime.pool import AdapterPool, PoolConfig
from deft_runtime.runtime import MultiAdapterModel
from deft_runtime.testing import random_adapter

CODE = grpc.StatusCode
#: the churn test's length: long enough that the old lock cycle wedged the server many times over
CHURN_SECONDS = float(os.environ.get("DEFT_CHURN_SECONDS", "60"))
#: a call that takes longer than this counts as a wedged server
RPC_TIMEOUT_S = 60.0
TINY_STEPS = 2


@pytest.fixture
def unet() -> torch.nn.Module:
    """A fresh tiny-sdxl UNet (tests wrap it in place)."""
    return build_tiny_sdxl(0).unet


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> list[Path]:
    """Three small DEFT adapters for tiny-sdxl, in deft's own format."""
    shapes = BaseView(build_tiny_sdxl(0).unet).layer_shapes
    root = tmp_path_factory.mktemp("fault-adapters")
    return [
        save_adapter(
            random_adapter(AdapterKind.DEFT, shapes, rank=2, seed=s), root / f"a{s}.deft.safetensors"
        )
        for s in range(3)
    ]


# ---------------------------------------------------------------------------- in-process: the pool


class BlockingSource:
    """A source whose loads wait until the test lets them go (a slow database, a compile)."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self.loading = threading.Event()
        self.go = threading.Event()
        self.versions = {"slow": "1", "other": "1"}

    def version(self, name: str) -> str | None:
        return self.versions.get(name)

    def load(self, name: str):
        if name == "slow":
            self.loading.set()
            assert self.go.wait(30), "the test never released the load"
        if name not in self.versions:
            raise AdapterNotFound(f"no adapter named {name!r} is registered")
        return self.versions[name], self.compiled[name]


def _pool_with(unet, source) -> AdapterPool:
    view = BaseView(unet)
    return AdapterPool(view.layer_shapes, PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20), source)


def test_pool_serves_other_callers_while_a_load_blocks(unet):
    """Regression: the loader held the pool lock inside ``source`` while deletion waited for it."""
    view = BaseView(unet)
    compiled = {
        n: view.compile(random_adapter(AdapterKind.LORA, view.layer_shapes, rank=1, seed=i))
        for i, n in enumerate(["slow", "other"])
    }
    source = BlockingSource(compiled)
    pool = _pool_with(unet, source)
    pool.acquire(["other"])
    loader = threading.Thread(target=pool.acquire, args=(["slow"],), daemon=True)
    loader.start()
    assert source.loading.wait(30)
    done = threading.Event()

    def engine_and_registry_calls() -> None:  # what the engine thread and a DeleteAdapter do meanwhile
        pool.ready(["other"])
        pool.release(["other"])
        pool.evict("other")
        pool.pins("slow")
        done.set()

    threading.Thread(target=engine_and_registry_calls, daemon=True).start()
    try:
        assert done.wait(10), "pool calls blocked behind a load in progress"
    finally:
        source.go.set()
        loader.join(30)
    assert pool.pins("slow") == 1 and not pool.is_resident("other")


def test_a_replaced_or_deleted_adapter_is_never_served_from_a_stale_copy(unet):
    view = BaseView(unet)
    model = MultiAdapterModel(
        unet, base=view, pool_config=PoolConfig(device_bytes=8 << 20, host_bytes=8 << 20), backend="torch"
    )
    first = model.register("dog", random_adapter(AdapterKind.LORA, view.layer_shapes, rank=2, seed=1))
    layer = next(iter(first.factors))
    slot = model.pool.acquire(["dog"])["dog"]
    model.pool.release(["dog"])
    # replaced behind the pool's back (as another replica would, through a shared registry)
    second = view.compile(random_adapter(AdapterKind.LORA, view.layer_shapes, rank=2, seed=2))
    model._memory.put("dog", second)
    slot = model.pool.acquire(["dog"])["dog"]
    pages = model.pool.layers[layer].page_table[slot, :2].long()
    torch.testing.assert_close(model.pool.layers[layer].A[pages], second.factors[layer].A)
    model.pool.release(["dog"])
    model._memory.pop("dog")  # deleted behind its back: refused, though a copy is still resident
    assert model.pool.is_resident("dog")
    with pytest.raises(AdapterNotFound):
        model.pool.acquire(["dog"])


# ---------------------------------------------------------------------------- real servers: churn


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


@pytest.mark.slow
def test_generation_keeps_completing_while_adapters_are_deleted_and_reregistered(
    server_factory, adapter_files
):
    server = server_factory.start()
    names = [f"churn{i}" for i in range(len(adapter_files))]
    with DeftClient(server.address, timeout=RPC_TIMEOUT_S) as admin:
        for name, path in zip(names, adapter_files, strict=True):
            admin.register_adapter(name, path)
    outcomes: Counter[str] = Counter()
    completed_at: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + CHURN_SECONDS

    def record(kind: str, call) -> None:
        try:
            call()
            outcomes[f"{kind}:OK"] += 1
        except DeftError as e:
            outcomes[f"{kind}:{e.code.name}"] += 1
            if e.code is CODE.DEADLINE_EXCEEDED or e.code is CODE.UNAVAILABLE or e.code is CODE.INTERNAL:
                errors.append(f"{kind}: {e.code.name} {e}")

    def generator(offset: int) -> None:
        with DeftClient(server.address, timeout=RPC_TIMEOUT_S) as c:
            i = offset
            while time.monotonic() < stop_at and not errors:
                name = names[i % len(names)]
                i += 1
                before = outcomes["generate:OK"]
                record(
                    "generate", lambda n=name, s=i: c.generate("x", adapters=[n], steps=TINY_STEPS, seed=s)
                )
                if outcomes["generate:OK"] > before:
                    completed_at.append(time.monotonic())

    def churner() -> None:
        with DeftClient(server.address, timeout=RPC_TIMEOUT_S) as c:
            i = 0
            while time.monotonic() < stop_at and not errors:
                name, path = names[i % len(names)], adapter_files[i % len(names)]
                i += 1
                record("delete", lambda n=name: c.delete_adapter(n))
                record("register", lambda n=name, p=path: c.register_adapter(n, p))
                record("list", c.list_adapters)

    threads = [threading.Thread(target=generator, args=(k,)) for k in range(2)]
    threads.append(threading.Thread(target=churner))
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(CHURN_SECONDS + 3 * RPC_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), f"a client is stuck: {dict(outcomes)}"
    assert not errors, (
        f"{errors[:3]} after {time.monotonic() - start:.0f}s; outcomes {dict(outcomes)}\n{server.log()[-4000:]}"
    )
    allowed = {
        "generate:OK", "generate:NOT_FOUND",
        "delete:OK", "delete:NOT_FOUND", "delete:FAILED_PRECONDITION",
        "register:OK", "register:ALREADY_EXISTS", "list:OK",
    }  # fmt: skip
    assert set(outcomes) <= allowed, dict(outcomes)
    assert outcomes["delete:OK"] >= 3 and outcomes["register:OK"] >= 3, dict(outcomes)
    # generations kept completing through the whole run, not just at its start
    assert completed_at and completed_at[-1] > stop_at - CHURN_SECONDS / 3, dict(outcomes)
    assert _health(server.address) == health_pb2.HealthCheckResponse.SERVING
    with DeftClient(server.address, timeout=RPC_TIMEOUT_S) as c:
        for name, path in zip(names, adapter_files, strict=True):
            if name not in {a.name for a in c.list_adapters()}:
                c.register_adapter(name, path)
            assert c.generate("x", adapters=[name], steps=TINY_STEPS, seed=0)
            c.delete_adapter(name)  # no pin was left behind by the churn
        assert c.list_adapters() == []


# ---------------------------------------------------------------------------- real servers: storage faults


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 24 MiB tmpfs (a disk that really fills up); skips where this machine cannot mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path, keep_free: int = 0) -> Path:
    """Fill the filesystem of ``folder`` up to ``keep_free`` bytes with one file."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free - keep_free
    with filler.open("wb") as f, contextlib.suppress(OSError):  # full: that is the point
        f.write(b"\0" * max(free, 0))
    return filler


@pytest.mark.slow
def test_disk_full_registration_fails_cleanly_and_delete_still_frees_space(
    server_factory, small_disk, adapter_files
):
    data = small_disk / "data"
    server = server_factory.start(data_dir=data)
    with DeftClient(server.address, timeout=RPC_TIMEOUT_S) as c:
        c.register_adapter("kept", adapter_files[0])
        filler = _fill(small_disk)
        with pytest.raises(DeftError) as info:
            c.register_adapter("late", adapter_files[1])
        assert info.value.code is CODE.RESOURCE_EXHAUSTED and "disk" in str(info.value).lower()
        c.delete_adapter("kept")  # deletion works on a full disk, so space can be freed
        assert c.list_adapters() == []
        assert c.generate("x", steps=TINY_STEPS, seed=0)  # still serving
        assert _health(server.address) == health_pb2.HealthCheckResponse.SERVING
        filler.unlink()
        c.register_adapter("late", adapter_files[1])
    server.stop()
    leftovers = sorted(p.name for p in (data / "blobs").rglob("*") if p.is_file())
    leftovers += sorted(p.name for p in (data / "compiled").rglob("*") if p.is_file())
    registered = {
        row[0] for row in sqlite3.connect(data / "registry.sqlite3").execute("SELECT sha256 FROM adapters")
    }
    assert {name.removesuffix(".safetensors") for name in leftovers} == registered, "orphan files left behind"


@pytest.mark.slow
def test_registry_file_removed_while_serving_turns_health_off(server_factory, adapter_files, tmp_path):
    data = tmp_path / "data"
    server = server_factory.start(data_dir=data)
    with DeftClient(server.address, timeout=RPC_TIMEOUT_S) as c:
        c.register_adapter("before", adapter_files[0])
        for suffix in ("", "-wal", "-shm"):
            (data / f"registry.sqlite3{suffix}").unlink(missing_ok=True)
        deadline = time.monotonic() + 15
        while _health(server.address) == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health still says SERVING with the registry file gone"
            time.sleep(0.2)
        with pytest.raises(DeftError) as info:
            c.register_adapter("after", adapter_files[1])
        assert info.value.code is CODE.UNAVAILABLE and "registry" in str(info.value)


@pytest.mark.slow
def test_kill_9_mid_registration_leaves_no_orphan_after_restart(server_factory, adapter_files, tmp_path):
    """The compiled factors are written before the index row: kill the server between the two."""
    data = tmp_path / "data"
    prelude = (
        "import os, signal, deft_server.store as s\n"
        "_commit = s.SQLiteStore.commit\n"
        "def commit(self, *args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "s.SQLiteStore.commit = commit\n"
    )
    server = server_factory.start(data_dir=data, prelude=prelude)
    with DeftClient(server.address, timeout=RPC_TIMEOUT_S) as c, pytest.raises(DeftError):
        c.register_adapter("doomed", adapter_files[0])
    assert server.wait(30) == -signal.SIGKILL
    assert any((data / "compiled").rglob("*.safetensors")), "the crash came after the compiled write"
    restarted = server_factory.start(data_dir=data)
    with DeftClient(restarted.address, timeout=RPC_TIMEOUT_S) as c:
        assert c.list_adapters() == []
    leftovers = [p for sub in ("blobs", "compiled") for p in (data / sub).rglob("*") if p.is_file()]
    assert leftovers == [], f"orphans survived the restart: {leftovers}"
