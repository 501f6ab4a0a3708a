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


PemSource = bytes | str | os.PathLike[str] | None


def _pem(source: PemSource) -> bytes | None:
    if source is None:
        return None
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def credentials(
    root_certificates: PemSource, client_certificate: PemSource = None, client_key: PemSource = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM bytes or PEM file paths; None for a plaintext channel.

    ``client_certificate`` and ``client_key`` (together) present a client certificate, for servers
    that require mutual TLS (``deft serve --tls-client-ca``).
    """
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together: give both or neither")
    if root_certificates is None and client_certificate is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates),
        private_key=_pem(client_key),
        certificate_chain=_pem(client_certificate),
    )


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
