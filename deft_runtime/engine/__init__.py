"""Generation engine: step-level continuous batching with per-request adapters (see engine.py)."""

from deft_runtime.engine.engine import Engine, EngineConfig
from deft_runtime.engine.observer import EngineObserver
from deft_runtime.engine.request_state import RequestHandle
from deft_runtime.engine.types import (
    AdapterOutputNotFinite,
    DeadlineExceeded,
    EngineDraining,
    EventKind,
    GenerationEvent,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    QueueFull,
    RequestCancelled,
)

__all__ = [
    "AdapterOutputNotFinite",
    "DeadlineExceeded",
    "Engine",
    "EngineConfig",
    "EngineDraining",
    "EngineObserver",
    "EventKind",
    "GenerationEvent",
    "GenerationFailed",
    "GenerationRequest",
    "GenerationResult",
    "QueueFull",
    "RequestCancelled",
    "RequestHandle",
]
