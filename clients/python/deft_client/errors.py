"""The one exception the client raises: :class:`DeftError`, with the gRPC status code and the server's message."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class DeftError(Exception):
    """A call failed. ``code`` is the ``grpc.StatusCode``, ``message`` the server's explanation and
    ``reason`` its machine-readable reason (e.g. ``ADAPTER_NOT_FOUND``; empty when the failure did not
    come from the deft server, e.g. a connection error)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> DeftError:
        call: Any = error
        code = call.code() if callable(getattr(call, "code", None)) else grpc.StatusCode.UNKNOWN
        message = call.details() if callable(getattr(call, "details", None)) else str(error)
        metadata = call.trailing_metadata() if callable(getattr(call, "trailing_metadata", None)) else None
        return cls(code, message or code.name.lower().replace("_", " "), _reason(metadata))


def _reason(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """``ErrorInfo.reason`` from the ``google.rpc.Status`` in the trailing metadata, if any."""
    for key, value in metadata or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason
    return ""
