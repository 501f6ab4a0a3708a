"""Channel construction shared by the blocking and the asyncio client."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
#: Results carry PNG images; let them be large (the server bounds what it sends by its own limits).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]


def resolve_target(target: str | None) -> str:
    """``target``, else ``$DEFT_SERVER``, else ``127.0.0.1:50051``."""
    return target or os.environ.get("DEFT_SERVER") or DEFAULT_TARGET


def credentials(root_certificates: bytes | str | os.PathLike[str] | None) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM bytes or a PEM file path; None for a plaintext channel."""
    if root_certificates is None:
        return None
    pem = root_certificates if isinstance(root_certificates, bytes) else Path(root_certificates).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=pem)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
