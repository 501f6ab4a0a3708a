"""The one mapping from typed errors to gRPC status codes, with ``google.rpc.Status`` details.

Every error a user can cause is a :class:`~deft_runtime.errors.DeftError` subclass (runtime, engine,
or the few below that only the server raises), and :data:`STATUS_CODES` gives each its code. The
first matching class in the table wins, so subclasses come before their bases. Anything else is a
bug: it is logged with its traceback and reported as INTERNAL without leaking its text.

The details carry a ``google.rpc.ErrorInfo`` (``reason`` = the error class in UPPER_SNAKE_CASE,
``domain`` = ``deft.v1``) and, for errors worth retrying, a ``google.rpc.RetryInfo``.
"""

from __future__ import annotations

import logging
import re

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from deft_runtime.engine import (
    AdapterOutputNotFinite,
    DeadlineExceeded,
    EngineDraining,
    GenerationFailed,
    QueueFull,
    RequestCancelled,
)
from deft_runtime.errors import (
    AdapterIncompatible,
    AdapterNotFound,
    DeftError,
    InvalidAdapter,
    InvalidRequest,
    PoolExhausted,
)

log = logging.getLogger(__name__)
DOMAIN = "deft.v1"


class AdapterExists(DeftError):
    """An adapter is already registered under that name (ALREADY_EXISTS)."""


class AdapterInUse(DeftError):
    """The adapter cannot be deleted while running requests use it (FAILED_PRECONDITION)."""


class UploadTooLarge(DeftError):
    """The upload (or an archive member) is above the server's size limit (RESOURCE_EXHAUSTED)."""


class RegistryUnavailable(DeftError):
    """The shared registry's database cannot be reached right now (UNAVAILABLE; retry)."""


class NotReady(DeftError):
    """The server is still loading its model, or is shutting down (UNAVAILABLE)."""


#: Error class → status code; the first match wins (subclasses before their bases).
STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (UploadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidAdapter, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterOutputNotFinite, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterExists, grpc.StatusCode.ALREADY_EXISTS),
    (AdapterIncompatible, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PoolExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineDraining, grpc.StatusCode.UNAVAILABLE),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestCancelled, grpc.StatusCode.CANCELLED),
    (GenerationFailed, grpc.StatusCode.INTERNAL),
)
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
_RETRY_AFTER_S = 1


def status_code_of(error: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def reason_of(error: BaseException) -> str:
    """``AdapterNotFound`` → ``ADAPTER_NOT_FOUND`` (stable, machine-readable)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).upper()


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: BaseException) -> grpc.Status:
    """The gRPC status (code, message, and ``grpc-status-details-bin`` trailer) for ``error``."""
    code = status_code_of(error)
    if code is grpc.StatusCode.INTERNAL and not isinstance(error, DeftError):
        log.error("internal error", exc_info=error)
        message = "internal server error (see the server log)"
    else:
        message = str(error) or type(error).__name__
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason_of(error), domain=DOMAIN))]
    if code in _RETRYABLE:
        delay = duration_pb2.Duration(seconds=_RETRY_AFTER_S)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(status)
