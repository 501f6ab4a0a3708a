"""Build what the server serves: pipeline → multi-adapter model → registry → engine (blocking, slow)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from deft_server.config import ServerSettings
from deft_server.errors import AdapterInUse
from deft_server.metrics import ServerMetrics
from deft_server.registry import AdapterRegistry, AdapterState
from deft_server.store import AdapterRecord, AdapterStore, open_store
from deft_server.tenants import current_tenant, pool_name, split_pool_name
from deft_server.tenants_limits import TenantLimiter

from deft_runtime.base_view import BaseView
from deft_runtime.devices import resolve_device, resolve_dtype
from deft_runtime.engine import Engine, GenerationRequest, RequestHandle
from deft_runtime.engine.request_state import EventCallback
from deft_runtime.errors import PoolExhausted, shorten
from deft_runtime.models import denoiser_of, load_pipeline
from deft_runtime.models.prompt_limits import truncation_warnings
from deft_runtime.pool import AdapterPool, PoolConfig
from deft_runtime.runtime import MultiAdapterModel

log = logging.getLogger(__name__)


@dataclass
class ServingRuntime:
    """The loaded model and everything bound to it, composed: the registry and the adapter pool do not
    know each other (the pool's source is the registry), so questions about both are answered here."""

    model_name: str
    pipe: Any
    model: MultiAdapterModel
    registry: AdapterRegistry
    engine: Engine
    limiter: TenantLimiter = field(default_factory=TenantLimiter)

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def waiting(self) -> int:
        return self.engine.waiting

    @property
    def registered(self) -> int:
        return len(self.registry)

    @property
    def pool(self) -> AdapterPool:
        return self.model.pool

    def adapter_state(self, adapter: str | AdapterRecord) -> tuple[AdapterState, str]:
        """State of a record, or of a pool name (a bare name: a public adapter)."""
        name = (
            adapter.pool_name if isinstance(adapter, AdapterRecord) else pool_name(*split_pool_name(adapter))
        )
        state, reason = self.registry.state(name)
        if state is AdapterState.READY and self.pool.is_resident(name):
            return AdapterState.RESIDENT, ""
        return state, reason

    def delete_adapter(self, name: str) -> None:
        """Unregister the calling tenant's ``name`` (public ones: admins only); refused while requests on
        this replica run with it (other replicas stop serving it at their next request for it). The
        pool's copy is dropped if nothing pinned it meanwhile, else it is refused at its next use."""
        record = self.registry.resolve(name)
        self.registry.check_deletable(record)
        if self.pool.pins(record.pool_name):
            raise AdapterInUse(
                f"adapter {shorten(name)} is in use by running requests; delete it once they have finished"
            )
        self.registry.delete(record)
        with contextlib.suppress(PoolExhausted):
            self.pool.evict(record.pool_name)

    def submit(self, job: GenerationRequest, on_event: EventCallback) -> RequestHandle:
        """Queue ``job`` for the calling tenant (blocking: registry look-ups): its adapter names resolved
        to the tenant's (or public) adapters, within the tenant's concurrency and rate quotas, which it
        holds until the request ends; the engine admits it fairly among tenants (by ``--weight``)."""
        tenant = current_tenant()
        adapters = self.registry.qualify(job.adapters, tenant)
        job = replace(job, adapters=adapters, tenant=tenant.id, weight=tenant.limits.weight)
        release = self.limiter.admit(tenant)
        try:
            handle = self.engine.submit(job, on_event=on_event)
        except BaseException:
            release()
            raise
        handle.future.add_done_callback(lambda _: release())
        return handle

    def prompt_warnings(self, job: GenerationRequest) -> list[str]:
        """What the client is told of its prompts: those longer than the text encoders read (blocking)."""
        return truncation_warnings(self.pipe, {"prompt": job.prompt, "negative_prompt": job.negative_prompt})

    def close(self) -> None:
        self.engine.shutdown()
        self.registry.store.close()


def load_runtime(settings: ServerSettings, metrics: ServerMetrics) -> ServingRuntime:
    """Open the registry, load the model, compile adapters not yet compiled for this base, start the engine.

    The registry is opened first, so an unreachable database fails the start in seconds, not after a
    model load of minutes.
    """
    store = open_store(settings.data_dir, settings.registry)
    log.info("adapter registry: %s", store.location)
    try:
        return _load(settings, metrics, store)
    except BaseException:
        store.close()
        raise


def _load(settings: ServerSettings, metrics: ServerMetrics, store: AdapterStore) -> ServingRuntime:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    log.info("loading model %r on %s (%s)", settings.model, device, str(dtype).removeprefix("torch."))
    pipe = load_pipeline(settings.model, torch_dtype=dtype, device=device, cache_dir=settings.cache_dir)
    denoiser = denoiser_of(pipe)
    base = BaseView(denoiser)
    unet = getattr(pipe, "unet", None)
    registry = AdapterRegistry(
        store,
        base,
        read_limits=settings.read_limits(),
        max_rank=settings.max_rank,
        unet_config=dict(unet.config) if unet is not None else None,
        on_load=metrics.adapter_loaded,
    )
    pool = PoolConfig(
        device_bytes=int(settings.adapter_memory),
        host_bytes=int(settings.adapter_host_memory),
        max_slots=settings.max_resident_adapters,
        max_rank=settings.max_rank,
        dtype=dtype,
        device=device,
    )
    model = MultiAdapterModel(
        denoiser,
        base=base,
        pool_config=pool,
        backend=settings.backend,
        max_rows=settings.max_batch_rows,
        max_adapters_per_row=settings.max_adapters_per_request,
        source=registry,
    )
    engine = Engine(pipe, model, settings.engine_config(), observer=metrics, device=device, dtype=dtype)
    if settings.compile:
        log.info("compiling the denoiser (--compile): the server reports SERVING when it is done")
        try:
            log.info("compiled and warmed up in %.1fs", engine.warm_up())
        except BaseException:
            engine.shutdown()
            raise
    return ServingRuntime(settings.model, pipe, model, registry, engine)
