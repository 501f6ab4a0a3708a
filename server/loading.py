"""Build what the server serves: pipeline → multi-adapter model → registry → engine (blocking, slow)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from deft_server.config import ServerSettings
from deft_server.metrics import ServerMetrics
from deft_server.registry import AdapterRegistry
from deft_server.store import AdapterStore, open_store

from deft_runtime.compile import CompiledAdapter
from deft_runtime.engine import Engine
from deft_runtime.models import denoiser_of, load_pipeline
from deft_runtime.pool import AdapterPool, PoolConfig
from deft_runtime.runtime import MultiAdapterModel

log = logging.getLogger(__name__)


@dataclass
class ServingRuntime:
    """The loaded model and everything bound to it."""

    model_name: str
    pipe: Any
    model: MultiAdapterModel
    registry: AdapterRegistry
    engine: Engine

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

    def close(self) -> None:
        self.engine.shutdown()
        self.registry.store.close()


class RegistryLink:
    """The model's adapter source. The model needs the registry to load adapters and the registry needs
    the model to compile them, so the model gets this link, which is bound once the registry exists."""

    def __init__(self) -> None:
        self.registry: AdapterRegistry | None = None

    def load(self, name: str) -> CompiledAdapter:
        if self.registry is None:
            raise RuntimeError("the adapter registry is not open yet")
        return self.registry.load_compiled(name)

    def exists(self, name: str) -> bool:
        return self.registry is not None and self.registry.exists(name)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


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
    link = RegistryLink()
    pool = PoolConfig(
        device_bytes=int(settings.adapter_memory),
        host_bytes=int(settings.adapter_host_memory),
        max_slots=settings.max_resident_adapters,
        max_rank=settings.max_rank,
        dtype=dtype,
        device=device,
    )
    model = MultiAdapterModel(
        denoiser_of(pipe),
        pool_config=pool,
        backend=settings.backend,
        max_rows=settings.max_batch_rows,
        max_adapters_per_row=settings.max_adapters_per_request,
        source=link.load,
        exists=link.exists,
    )
    unet = getattr(pipe, "unet", None)
    link.registry = AdapterRegistry(
        store,
        model,
        read_limits=settings.read_limits(),
        max_rank=settings.max_rank,
        unet_config=dict(unet.config) if unet is not None else None,
        on_load=metrics.adapter_loaded,
    )
    engine = Engine(pipe, model, settings.engine_config(), observer=metrics, device=device, dtype=dtype)
    return ServingRuntime(settings.model, pipe, model, link.registry, engine)
