"""The adapter registry: validate, compile against the served base, store, and feed the adapter pool.

Registration (blocking; the service runs it on a worker thread)::

    received upload ─► read (safetensors file, or PEFT tar unpacked safely) ─► model.compile (validates
    against the loaded base: shapes, targets, ranks, NaN, fingerprint) ─► compiled factors cached
    locally ─► one transaction of the store makes the adapter visible (with its bytes)

The index lives in an :class:`~deft_server.store.AdapterStore`: SQLite in ``--data-dir``, or
PostgreSQL shared by every replica (``--registry``). The registry never trusts a memory of the index:
which bytes a name has is asked of the store at each acquire (the pool compares that version with its
copy), so an adapter registered, deleted or replaced by another replica is seen at its next use.

The compiled factors are cached per (upload sha256, base digest), where the base digest hashes the
wrapped base weights themselves, so a restart on the same base reuses them and a restart on another
base recompiles (adapters that no longer fit are reported INCOMPATIBLE instead of vanishing).
:meth:`AdapterRegistry.version` and :meth:`AdapterRegistry.load` make it the adapter pool's source.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deft_server.store import AdapterRecord, AdapterStore, exists_error
from deft_server.uploads import ReceivedFile, extract_archive, is_tar, validate_name

from deft_runtime.adapter import Adapter
from deft_runtime.base_view import BaseView
from deft_runtime.compile import CompiledAdapter
from deft_runtime.errors import AdapterIncompatible, InvalidAdapter
from deft_runtime.formats import ReadLimits, load_adapter
from deft_runtime.formats.native import is_native
from deft_runtime.formats.safetensors_io import read_header

log = logging.getLogger(__name__)


class UploadFormat(enum.StrEnum):
    SAFETENSORS = "safetensors"
    PEFT_TAR = "peft_tar"


class AdapterState(enum.StrEnum):
    READY = "ready"
    RESIDENT = "resident"
    INCOMPATIBLE = "incompatible"


class AdapterRegistry:
    """Registered adapters of one server: a view over :class:`AdapterStore` bound to the served base.

    It is the adapter pool's :class:`~deft_runtime.pool.AdapterSource` (``version`` / ``load``) and
    knows nothing of the pool: the pool checks versions itself, and whoever composes the two (the
    server's :class:`~deft_server.loading.ServingRuntime`) asks the pool about pins and residency.

    Locking: ``_lock`` guards the ``_incompatible`` memo only and is a leaf (no store call, no call
    out, while it is held); the store has its own leaf lock. Nothing here runs under a lock that the
    engine thread takes.
    """

    def __init__(
        self,
        store: AdapterStore,
        base: BaseView,
        *,
        read_limits: ReadLimits,
        max_rank: int,
        unet_config: Mapping[str, Any] | None = None,
        on_load: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.store = store
        self.cache = store.cache
        self.base = base
        self.read_limits = read_limits
        self.max_rank = max_rank
        self.unet_config = unet_config
        self.on_load = on_load
        self.base_digest = base.digest
        self._lock = threading.Lock()
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
            if self.cache.compiled_path(record.sha256, self.base_digest).is_file():
                cached += 1
                continue
            try:
                self.cache.save_compiled(record.sha256, self.base_digest, self._compile_blob(record))
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

    # ------------------------------------------------------------------ the pool's source

    def version(self, name: str) -> str | None:
        """The sha256 registered as ``name`` now (asked of the store: another replica may have changed
        it), or None. A look-up only."""
        record = self.store.find(name)
        return None if record is None else record.sha256

    def exists(self, name: str) -> bool:
        return self.version(name) is not None

    def load(self, name: str) -> tuple[str, CompiledAdapter]:
        """Compiled factors of ``name`` from the local cache, compiled on a miss (blocking: the engine's
        loader thread calls this with no lock held)."""
        start = time.perf_counter()
        record = self.store.get(name)
        with self._lock:
            incompatible = self._incompatible.get(name)
        if incompatible is not None and incompatible[0] == record.sha256:
            raise AdapterIncompatible(f"adapter {name!r}: {incompatible[1]}")
        compiled = self.cache.load_compiled(record.sha256, self.base_digest)
        if compiled is None:  # not compiled for this base yet (or the cache file went missing)
            try:
                compiled = self._compile_blob(record)
            except (InvalidAdapter, AdapterIncompatible) as e:
                with self._lock:
                    self._incompatible[name] = (record.sha256, str(e))
                raise AdapterIncompatible(f"adapter {name!r}: {e}") from e
            self.cache.save_compiled(record.sha256, self.base_digest, compiled)
        self.on_load(time.perf_counter() - start)
        return record.sha256, compiled

    def load_compiled(self, name: str) -> CompiledAdapter:
        return self.load(name)[1]

    # ------------------------------------------------------------------ registration

    def register(
        self, name: str, upload: ReceivedFile, upload_format: UploadFormat | None, metadata: Mapping[str, str]
    ) -> AdapterRecord:
        """Validate and compile ``upload``, then commit it atomically under ``name``."""
        validate_name(name)
        self.store.check()  # never accept a registration into a registry that has gone away
        self.check_free(name)
        fmt = upload_format or (UploadFormat.PEFT_TAR if is_tar(upload.path) else UploadFormat.SAFETENSORS)
        with tempfile.TemporaryDirectory(dir=self.cache.tmp) as work:
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
        # both steps are safe to race: the compiled cache is content-addressed and written atomically,
        # and the store's commit is the one place a name is taken (AdapterExists if it lost the race);
        # the claim keeps other processes' garbage collection off these files until the row exists
        with self.cache.claim(record.sha256):
            try:
                self.cache.save_compiled(record.sha256, self.base_digest, compiled)
                self.store.commit(record, upload.path)
            except BaseException:
                with contextlib.suppress(Exception):  # else the next start collects them
                    self.store.drop_unreferenced(record.sha256)
                raise
        with self._lock:
            self._incompatible.pop(name, None)
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
        return self.base.compile(adapter, max_rank=self.max_rank)

    def _compile_blob(self, record: AdapterRecord) -> CompiledAdapter:
        with tempfile.TemporaryDirectory(dir=self.cache.tmp) as work:
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
        """READY or INCOMPATIBLE (with why); whether it is also resident is the pool's to say."""
        with self._lock:
            incompatible = self._incompatible.get(name)
        if incompatible is not None:
            return AdapterState.INCOMPATIBLE, incompatible[1]
        return AdapterState.READY, ""

    def delete(self, name: str) -> AdapterRecord:
        """Unregister ``name``. Copies in adapter pools (here or on other replicas) are not touched: they
        are refused at their next use, since the pool checks the version at every acquire."""
        record = self.store.remove(name)
        with self._lock:
            self._incompatible.pop(name, None)
        log.info("deleted adapter %r", name)
        return record


def _source_format(path: Path, fmt: UploadFormat, adapter: Adapter) -> str:
    if fmt is UploadFormat.PEFT_TAR:
        return "peft"
    metadata = read_header(path).get("__metadata__") or {}
    if isinstance(metadata, dict) and is_native(metadata):
        return "deft"
    return adapter.metadata.get("source_format", "safetensors")
