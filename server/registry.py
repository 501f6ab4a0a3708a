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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from deft_server.store import AdapterRecord, AdapterStore, exists_error, not_found
from deft_server.tenants import PUBLIC, NotPermitted, Tenant, current_tenant, pool_name, split_pool_name
from deft_server.uploads import ReceivedFile, extract_archive, is_tar, validate_name

from deft_runtime.adapter import Adapter
from deft_runtime.base_view import BaseView
from deft_runtime.compile import CompiledAdapter
from deft_runtime.errors import AdapterIncompatible, InvalidAdapter
from deft_runtime.formats import ReadLimits, load_adapter
from deft_runtime.formats.native import is_native
from deft_runtime.formats.safetensors_io import read_header
from deft_runtime.pool import DirectLoad

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
        self._incompatible: dict[str, tuple[str, str]] = {}  # pool name → (sha256, why it does not fit)
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
                self._incompatible[record.pool_name] = (record.sha256, str(e))
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
        """The sha256 registered under the pool name ``name`` (``owner/name``) now (asked of the store:
        another replica may have changed it), or None. A look-up only."""
        owner, bare = split_pool_name(name)
        record = self.store.find(bare, owner)
        return None if record is None else record.sha256

    def exists(self, name: str) -> bool:
        return self.version(name) is not None

    def load(self, name: str) -> tuple[str, CompiledAdapter]:
        """Compiled factors of ``name`` from the local cache, compiled on a miss (blocking: the engine's
        loader thread calls this with no lock held)."""
        start = time.perf_counter()
        owner, bare = split_pool_name(name)
        record = self.store.get(bare, owner)
        key = record.pool_name  # one key for the memo, however the caller spelt the name
        with self._lock:
            incompatible = self._incompatible.get(key)
        if incompatible is not None and incompatible[0] == record.sha256:
            raise AdapterIncompatible(f"adapter {bare!r}: {incompatible[1]}")
        compiled = self.cache.load_compiled(record.sha256, self.base_digest)
        if compiled is None:  # not compiled for this base yet (or the cache file went missing)
            try:
                compiled = self._compile_blob(record)
            except (InvalidAdapter, AdapterIncompatible) as e:
                with self._lock:
                    self._incompatible[key] = (record.sha256, str(e))
                raise AdapterIncompatible(f"adapter {bare!r}: {e}") from e
            self.cache.save_compiled(record.sha256, self.base_digest, compiled)
        self.on_load(time.perf_counter() - start)
        return record.sha256, compiled

    def direct_load(self, name: str) -> DirectLoad | None:
        """``name``'s compiled file as a plan to read straight into the pool's pages (the CPU pool's
        one-read cold load), or None when :meth:`load` must run (not compiled yet, file damaged,
        known incompatible). Raises AdapterNotFound like :meth:`load`."""
        owner, bare = split_pool_name(name)
        record = self.store.get(bare, owner)
        with self._lock:
            incompatible = self._incompatible.get(record.pool_name)
        if incompatible is not None and incompatible[0] == record.sha256:
            return None
        plan = self.cache.plan_compiled(record.sha256, self.base_digest)
        if plan is None:
            return None
        return DirectLoad(
            record.sha256, plan.ranks, plan.shapes, plan.nbytes, plan.read_into, self.on_load, plan.vector
        )

    def load_compiled(self, name: str) -> CompiledAdapter:
        return self.load(name)[1]

    # ------------------------------------------------------------------ registration

    def register(
        self,
        name: str,
        upload: ReceivedFile,
        upload_format: UploadFormat | None,
        metadata: Mapping[str, str],
        *,
        public: bool = False,
        tenant: Tenant | None = None,
    ) -> AdapterRecord:
        """Validate and compile ``upload``, then commit it atomically as ``tenant``'s ``name`` (or a
        public adapter: admins only), within the tenant's adapter count and bytes quotas."""
        tenant = tenant or current_tenant()
        validate_name(name)
        owner = tenant.owner_for(public)
        limits = tenant.limits if owner != PUBLIC else None
        with self._audited("adapter.register", tenant, f"{owner}/{name}"):
            self.store.check()  # never accept a registration into a registry that has gone away
            self.check_free(name, owner)
            if limits is not None:  # early, before compiling; the commit checks again, exactly
                limits.check_storage(*self.store.usage(owner), upload.size)
            record, compiled = self._build(name, owner, upload, upload_format, metadata)
            # both steps are safe to race: the compiled cache is content-addressed and written atomically,
            # and the store's commit is the one place a name is taken (AdapterExists if it lost the race);
            # the claim keeps other processes' garbage collection off these files until the row exists
            with self.cache.claim(record.sha256):
                try:
                    self.cache.save_compiled(record.sha256, self.base_digest, compiled)
                    self.store.commit(record, upload.path, limits)
                except BaseException:
                    with contextlib.suppress(Exception):  # else the next start collects them
                        self.store.drop_unreferenced(record.sha256)
                    raise
        with self._lock:
            self._incompatible.pop(record.pool_name, None)
        log.info("registered adapter %r of %s", name, owner)
        return record

    def _build(
        self,
        name: str,
        owner: str,
        upload: ReceivedFile,
        upload_format: UploadFormat | None,
        metadata: Mapping[str, str],
    ) -> tuple[AdapterRecord, CompiledAdapter]:
        """Read and compile the upload; its record (not yet committed) and factors."""
        fmt = upload_format or (UploadFormat.PEFT_TAR if is_tar(upload.path) else UploadFormat.SAFETENSORS)
        with tempfile.TemporaryDirectory(dir=self.cache.tmp) as work:
            adapter = self._read(upload.path, fmt, Path(work), upload.label)
            compiled = self._compile(name, adapter)
        log.info("adapter %r: %s", name, adapter.describe())
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
            owner=owner,
        )
        return record, compiled

    def check_free(self, name: str, owner: str | None = None) -> None:
        """Refuse a name the owner (default: the calling tenant) already has."""
        if self.store.find(name, current_tenant().id if owner is None else owner) is not None:
            raise exists_error(name)

    @contextlib.contextmanager
    def _audited(self, action: str, tenant: Tenant, target: str) -> Iterator[None]:
        """Record ``action`` in the audit log with its outcome (ok, or the error's class)."""
        try:
            yield
        except Exception as e:
            self.store.audit.record(
                action, tenant=tenant.id, key_id=tenant.key_id, target=target, result=type(e).__name__
            )
            raise
        self.store.audit.record(action, tenant=tenant.id, key_id=tenant.key_id, target=target)

    def _read(self, path: Path, fmt: UploadFormat, work: Path, label: str | None = None) -> Adapter:
        if fmt is UploadFormat.PEFT_TAR:
            path = extract_archive(path, work, self.read_limits.max_file_bytes)
        return load_adapter(path, limits=self.read_limits, unet_config=self.unet_config, label=label)

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

    def resolve(self, name: str, tenant: Tenant | None = None) -> AdapterRecord:
        """The adapter ``name`` means for ``tenant`` (default: the calling one): its own, else a public
        one. Another tenant's adapter is not found exactly like a name nobody has: the same query runs
        (it reads only the caller's and public rows) and the same error leaves."""
        tenant = tenant or current_tenant()
        found = {r.owner: r for r in self.store.find_visible(name, tenant.visible_owners)}
        for owner in tenant.visible_owners:
            if owner in found:
                return found[owner]
        raise not_found(name)

    def get(self, name: str, tenant: Tenant | None = None) -> AdapterRecord:
        return self.resolve(validate_name(name), tenant)

    def qualify(
        self, adapters: tuple[tuple[str, float], ...], tenant: Tenant | None = None
    ) -> tuple[tuple[str, float], ...]:
        """A request's ``(name, weight)`` pairs with each name resolved to its pool name."""
        return tuple((self.resolve(name, tenant).pool_name, weight) for name, weight in adapters)

    def records(self) -> list[AdapterRecord]:
        return self.store.records()

    def records_page(self, after: str, limit: int, tenant: Tenant | None = None) -> list[AdapterRecord]:
        """A page of the adapters ``tenant`` may list: an admin's lists every tenant's, others their own
        and the public ones."""
        tenant = tenant or current_tenant()
        return self.store.records_page(after, limit, None if tenant.admin else tenant.visible_owners)

    def __len__(self) -> int:
        return self.store.count()

    def state(self, name: str) -> tuple[AdapterState, str]:
        """READY or INCOMPATIBLE (with why) of a pool name (a bare name: a public adapter); whether it
        is also resident is the pool's to say."""
        with self._lock:
            incompatible = self._incompatible.get(pool_name(*split_pool_name(name)))
        if incompatible is not None:
            return AdapterState.INCOMPATIBLE, incompatible[1]
        return AdapterState.READY, ""

    def check_deletable(self, record: AdapterRecord, tenant: Tenant | None = None) -> None:
        if record.owner == PUBLIC and not (tenant or current_tenant()).admin:
            raise NotPermitted(f"adapter {record.name!r} is public: only an admin key can delete it")

    def delete(self, adapter: str | AdapterRecord, tenant: Tenant | None = None) -> AdapterRecord:
        """Unregister ``adapter`` (a name, or a record :meth:`resolve` gave). Copies in adapter pools
        (here or on other replicas) are not touched: they are refused at their next use, since the pool
        checks the version at every acquire."""
        tenant = tenant or current_tenant()
        record = self.resolve(adapter, tenant) if isinstance(adapter, str) else adapter
        with self._audited("adapter.delete", tenant, record.pool_name):
            self.check_deletable(record, tenant)
            removed = self.store.remove(record.name, record.owner)
        with self._lock:
            self._incompatible.pop(record.pool_name, None)
        log.info("deleted adapter %r of %s", record.name, record.owner)
        return removed


def _source_format(path: Path, fmt: UploadFormat, adapter: Adapter) -> str:
    if fmt is UploadFormat.PEFT_TAR:
        return "peft"
    metadata = read_header(path).get("__metadata__") or {}
    if isinstance(metadata, dict) and is_native(metadata):
        return "deft"
    return adapter.metadata.get("source_format", "safetensors")
