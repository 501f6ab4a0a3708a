"""Metrics hooks of the engine (the server's Prometheus metrics implement them)."""

from __future__ import annotations

from typing import Protocol


class EngineObserver(Protocol):
    """Called on the engine thread at the step and request boundaries (cheap only)."""

    def on_forward(self, rows: int, distinct_adapters: int, seconds: float) -> None: ...
    def on_request_done(self, status: str, latency_s: float, queue_s: float, images: int) -> None: ...
    def on_queue(self, waiting: int, running: int) -> None: ...


class NullObserver:
    def on_forward(self, rows: int, distinct_adapters: int, seconds: float) -> None:
        pass

    def on_request_done(self, status: str, latency_s: float, queue_s: float, images: int) -> None:
        pass

    def on_queue(self, waiting: int, running: int) -> None:
        pass
