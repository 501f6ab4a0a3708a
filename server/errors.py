"""The one mapping from typed errors to gRPC status codes, with ``google.rpc.Status`` details.

Every error a user can cause is a :class:`~deft_runtime.errors.DeftError` subclass (runtime, engine,
or the few below that only the server raises), and :data:`STATUS_CODES` gives each its code. The
first matching class in the table wins, so subclasses come before their bases. Anything else is a
bug: it is logged with its traceback and reported as INTERNAL without leaking its text.

The details carry a ``google.rpc.ErrorInfo`` (``reason`` = the error class in UPPER_SNAKE_CASE,
``domain`` = ``deft.v1``) and, for errors worth retrying, a ``google.rpc.RetryInfo``.

A full disk (``ENOSPC``/``EDQUOT``, or SQLite's ``SQLITE_FULL``) anywhere in an error's cause chain is
reported as :class:`DiskFull` (RESOURCE_EXHAUSTED), whatever wrapped it. Messages are capped at
:data:`MAX_MESSAGE_CHARS`, so a status always fits gRPC's header limit (16 KiB) with its details; the
checks that echo user input bound it themselves with :func:`deft_runtime.errors.shorten`.
"""

from __future__ import annotations

import errno
import logging
import re

import grpc
from deft_server.tenants import NotPermitted, QuotaExceeded
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
#: the longest status message sent (the message travels twice: as grpc-message and in the details)
MAX_MESSAGE_CHARS = 1000
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_SQLITE_FULL = 13


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


class DiskFull(DeftError):
    """The server's disk (or its quota) is full (RESOURCE_EXHAUSTED; retry once space is freed)."""


#: Error class → status code; the first match wins (subclasses before their bases).
STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (UploadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotPermitted, grpc.StatusCode.PERMISSION_DENIED),
    (DiskFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
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


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    return (getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_FULL


def typed(error: BaseException) -> BaseException:
    """``error``, or :class:`DiskFull` when a full disk caused it (the cause chain is followed, so an
    ``InvalidAdapter`` raised ``from`` an ENOSPC while unpacking is the server's fault, not the user's)."""
    cause: BaseException | None = error
    for _ in range(16):  # a bounded walk: a cause chain can be a cycle
        if cause is None or isinstance(cause, DiskFull):
            return error
        if _is_disk_full(cause):
            full = DiskFull("the server's disk is full; retry once space has been freed on the server")
            full.__cause__ = error
            return full
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return error


def status_code_of(error: BaseException) -> grpc.StatusCode:
    error = typed(error)
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
    error = typed(error)
    code = status_code_of(error)
    if code is grpc.StatusCode.INTERNAL and not isinstance(error, DeftError):
        log.error("internal error", exc_info=error)
        message = "internal server error (see the server log)"
    else:
        message = str(error) or type(error).__name__
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 30] + f"… ({len(message)} characters in all)"
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason_of(error), domain=DOMAIN))]
    if code in _RETRYABLE:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int((getattr(error, "retry_after_s", None) or _RETRY_AFTER_S) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(status)
