"""The adapter registry: validate, compile against the served base, store, and feed the adapter pool.

Registration (blocking; the service runs it on a worker thread)::

    received upload ─► read (safetensors file, or PEFT tar unpacked safely) ─► model.compile (validates
    against the loaded base: shapes, targets, ranks, NaN, fingerprint) ─► compiled factors cached
    locally ─► one transaction of the store makes the adapter visible (with its bytes)

The index lives in an :class:`~deft_server.store.AdapterStore`: SQLite in ``--data-dir``, or
PostgreSQL shared by every replica (``--registry``). The registry never trusts a memory of the index:
whether a name exists is asked of the store at each request, so an adapter registered or deleted by
another replica is seen at once. What it remembers is which bytes each name had when this process last
used it, so a name deleted or re-registered elsewhere is evicted from the local pool.

The compiled factors are cached per (upload sha256, base digest), where the base digest hashes the
wrapped base weights themselves, so a restart on the same base reuses them and a restart on another
base recompiles (adapters that no longer fit are reported INCOMPATIBLE instead of vanishing).
:meth:`AdapterRegistry.load_compiled` and :meth:`AdapterRegistry.exists` are what the
:class:`~deft_runtime.runtime.MultiAdapterModel` calls as its ``source`` and ``exists``.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from deft_server.errors import AdapterInUse
from deft_server.store import AdapterRecord, AdapterStore, exists_error
from deft_server.uploads import ReceivedFile, extract_archive, is_tar, validate_name

from deft_runtime.adapter import Adapter
from deft_runtime.compile import CompiledAdapter
from deft_runtime.errors import AdapterIncompatible, InvalidAdapter, PoolExhausted
from deft_runtime.formats import ReadLimits, load_adapter
from deft_runtime.formats.native import is_native
from deft_runtime.formats.safetensors_io import read_header
from deft_runtime.runtime import MultiAdapterModel

log = logging.getLogger(__name__)


class UploadFormat(enum.StrEnum):
    SAFETENSORS = "safetensors"
    PEFT_TAR = "peft_tar"


class AdapterState(enum.StrEnum):
    READY = "ready"
    RESIDENT = "resident"
    INCOMPATIBLE = "incompatible"


def base_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """A hash of the wrapped base weights (names, shapes and float32 values): compiled factors depend on them."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(w.shape)}\n".encode())
        digest.update(w.numpy().tobytes())
    return digest.hexdigest()[:32]


class AdapterRegistry:
    """Registered adapters of one server: a view over :class:`AdapterStore` bound to the served model."""

    def __init__(
        self,
        store: AdapterStore,
        model: MultiAdapterModel,
        *,
        read_limits: ReadLimits,
        max_rank: int,
        unet_config: Mapping[str, Any] | None = None,
        on_load: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.store = store
        self.model = model
        self.read_limits = read_limits
        self.max_rank = max_rank
        self.unet_config = unet_config
        self.on_load = on_load
        self.base_digest = base_digest(model.base_weights)
        self._lock = threading.Lock()  # serializes commits, deletions and the memo below
        self._seen: dict[str, str] = {}  # name → sha256 this process last served under that name
        self._incompatible: dict[str, tuple[str, str]] = {}  # name → (sha256, why it does not fit)
        self._prepare()

    def _prepare(self) -> None:
        """Make sure every registered adapter has compiled factors for this base (compile the missing).

        A shared store (PostgreSQL) is not prepared eagerly: a new replica would otherwise fetch and
        compile every adapter of the fleet before serving. There, factors are compiled on first use
        and an adapter that does not fit this base fails the request that asked for it.
        """
        records = self.store.records()
        if self.store.shared:
            log.info("registry %s: %d adapters (compiled on first use)", self.store.location, len(records))
            return
        cached = compiled = 0
        for record in records:
            if self.store.compiled_path(record.sha256, self.base_digest).is_file():
                cached += 1
                continue
            try:
                self.store.save_compiled(record.sha256, self.base_digest, self._compile_blob(record))
                compiled += 1
            except (InvalidAdapter, AdapterIncompatible) as e:
                self._incompatible[record.name] = (record.sha256, str(e))
                log.warning("adapter %r does not fit the served base model: %s", record.name, e)
        log.info(
            "registry %s: %d adapters (%d from the compiled cache, %d compiled, %d incompatible)",
            self.store.location,
            len(records),
            cached,
            compiled,
            len(self._incompatible),
        )

    # ------------------------------------------------------------------ the model's view

    def exists(self, name: str) -> bool:
        """Whether ``name`` is registered now (asked of the store: another replica may have changed it)."""
        record = self.store.find(name)
        self._observe(name, record)
        return record is not None

    def _observe(self, name: str, record: AdapterRecord | None) -> None:
        """Drop local copies of ``name`` when the store now has other bytes (or none) under it."""
        sha = record.sha256 if record is not None else None
        with self._lock:
            before = self._seen.get(name)
            if sha is None:
                self._seen.pop(name, None)
            else:
                self._seen[name] = sha
            incompatible = self._incompatible.get(name)
            if incompatible is not None and incompatible[0] != sha:
                del self._incompatible[name]
        if before is not None and before != sha:
            try:
                self.model.pool.evict(name)
                log.info("adapter %r changed in the registry; evicted the local copy", name)
            except PoolExhausted:
                log.warning("adapter %r changed in the registry while requests use it; evicting later", name)

    def load_compiled(self, name: str) -> CompiledAdapter:
        """The pool's source: compiled factors from the local cache (called on the engine's loader thread)."""
        start = time.perf_counter()
        record = self.store.get(name)
        self._observe(name, record)
        if name in self._incompatible:
            raise AdapterIncompatible(f"adapter {name!r}: {self._incompatible[name][1]}")
        compiled = self.store.load_compiled(record.sha256, self.base_digest)
        if compiled is None:  # not compiled for this base yet (or the cache file went missing)
            try:
                compiled = self._compile_blob(record)
            except (InvalidAdapter, AdapterIncompatible) as e:
                with self._lock:
                    self._incompatible[name] = (record.sha256, str(e))
                raise AdapterIncompatible(f"adapter {name!r}: {e}") from e
            self.store.save_compiled(record.sha256, self.base_digest, compiled)
        self.on_load(time.perf_counter() - start)
        return compiled

    # ------------------------------------------------------------------ registration

    def register(
        self, name: str, upload: ReceivedFile, upload_format: UploadFormat | None, metadata: Mapping[str, str]
    ) -> AdapterRecord:
        """Validate and compile ``upload``, then commit it atomically under ``name``."""
        validate_name(name)
        self.check_free(name)
        fmt = upload_format or (UploadFormat.PEFT_TAR if is_tar(upload.path) else UploadFormat.SAFETENSORS)
        with tempfile.TemporaryDirectory(dir=self.store.tmp) as work:
            adapter = self._read(upload.path, fmt, Path(work))
            compiled = self._compile(name, adapter)
        record = AdapterRecord(
            name=name,
            sha256=upload.sha256,
            upload_format=fmt.value,
            source_format=_source_format(upload.path, fmt, adapter),
            kind=adapter.kind.value,
            decomposition=adapter.decomposition.value if adapter.decomposition else "",
            ranks=tuple(sorted(set(compiled.ranks.values()))),
            target_count=len(compiled.factors),
            size_bytes=upload.size,
            compiled_bytes=compiled.nbytes,
            metadata=dict(metadata),
        )
        with self._lock:
            self.store.save_compiled(record.sha256, self.base_digest, compiled)
            self.store.commit(record, upload.path)
        self._observe(name, record)
        log.info("registered adapter %r: %s", name, adapter.describe())
        return record

    def check_free(self, name: str) -> None:
        if self.store.find(name) is not None:
            raise exists_error(name)

    def _read(self, path: Path, fmt: UploadFormat, work: Path) -> Adapter:
        if fmt is UploadFormat.PEFT_TAR:
            path = extract_archive(path, work, self.read_limits.max_file_bytes)
        return load_adapter(path, limits=self.read_limits, unet_config=self.unet_config)

    def _compile(self, name: str, adapter: Adapter) -> CompiledAdapter:
        log.info("compiling adapter %r against the base model", name)
        return self.model.compile(adapter, max_rank=self.max_rank)

    def _compile_blob(self, record: AdapterRecord) -> CompiledAdapter:
        with tempfile.TemporaryDirectory(dir=self.store.tmp) as work:
            adapter = self._read(
                self.store.blob_path(record.sha256), UploadFormat(record.upload_format), Path(work)
            )
            return self._compile(record.name, adapter)

    # ------------------------------------------------------------------ queries and deletion

    def get(self, name: str) -> AdapterRecord:
        return self.store.get(name)

    def records(self) -> list[AdapterRecord]:
        return self.store.records()

    def __len__(self) -> int:
        return self.store.count()

    def state(self, name: str) -> tuple[AdapterState, str]:
        if name in self._incompatible:
            return AdapterState.INCOMPATIBLE, self._incompatible[name][1]
        if self.model.pool.is_resident(name):
            return AdapterState.RESIDENT, ""
        return AdapterState.READY, ""

    def delete(self, name: str) -> None:
        """Unregister ``name``: refused while requests on this replica run with it. Other replicas stop
        serving it at their next request for it."""
        with self._lock:
            self.store.get(name)
            try:
                self.model.pool.evict(name)
            except PoolExhausted as e:
                raise AdapterInUse(
                    f"adapter {name!r} is in use by running requests; delete it once they have finished"
                ) from e
            self.store.remove(name)
            self._seen.pop(name, None)
            self._incompatible.pop(name, None)
        log.info("deleted adapter %r", name)


def _source_format(path: Path, fmt: UploadFormat, adapter: Adapter) -> str:
    if fmt is UploadFormat.PEFT_TAR:
        return "peft"
    metadata = read_header(path).get("__metadata__") or {}
    if isinstance(metadata, dict) and is_native(metadata):
        return "deft"
    return adapter.metadata.get("source_format", "safetensors")
