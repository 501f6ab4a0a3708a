"""HTTP answers for gRPC statuses: the one table from status codes to HTTP statuses, in OpenAI's error shape.

Errors reach HTTP the way they reach gRPC: a typed error becomes a ``grpc.Status`` through
:func:`deft_server.errors.to_status` (the servicers do it themselves, see :class:`HttpCallContext`),
and :func:`error_response` answers it with the status of :data:`HTTP_STATUSES` and a body shaped like
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (``code`` is the error's reason in lower
case, e.g. ``adapter_not_found``). Retryable answers carry ``Retry-After`` from the status's RetryInfo.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from deft_server.errors import DOMAIN, reason_of, to_status
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from starlette.responses import JSONResponse

#: gRPC status code → (HTTP status, OpenAI error type)
HTTP_STATUSES: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "request_cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
#: RESOURCE_EXHAUSTED covers answers HTTP tells apart; the error's reason picks them
HTTP_STATUSES_BY_REASON: dict[str, tuple[int, str]] = {
    "UPLOAD_TOO_LARGE": (413, "invalid_request_error"),
    "DISK_FULL": (507, "server_error"),
}
_SERVER_ERROR = (500, "server_error")
_RETRY_STATUSES = {429, 503, 507}
_DETAILS_KEY = "grpc-status-details-bin"


class StatusError(Exception):
    """A call ended with ``status`` (raised by :class:`HttpCallContext`, answered by :func:`error_response`)."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status

    @classmethod
    def of(cls, error: BaseException) -> StatusError:
        """The status the gRPC servicers would end a call with for ``error``."""
        return cls(to_status(error))

    @classmethod
    def http_only(cls, code: grpc.StatusCode, message: str, reason: str) -> StatusError:
        """A refusal only HTTP makes (no token, unknown model): its status built the same way."""
        info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)
        status = status_pb2.Status(code=code.value[0], message=message)
        status.details.add().Pack(info)
        return cls(rpc_status.to_status(status))


class HttpCallContext:
    """The two things the deft servicers ask of a gRPC call context, for a call that came over HTTP:
    its deadline (none) and how to end it with a status (raise :class:`StatusError`). So HTTP runs the
    very servicer code gRPC runs: the same conversion and limits, engine submission, registry calls,
    metrics and error mapping."""

    def time_remaining(self) -> float | None:
        return None

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise StatusError(status)


def _details(status: grpc.Status) -> status_pb2.Status:
    for key, value in status.trailing_metadata or ():
        if key == _DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return status_pb2.Status()


def _reason_and_delay(status: grpc.Status) -> tuple[str, int | None]:
    reason, delay = "", None
    for detail in _details(status).details:
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(retry):
            delay = max(1, retry.retry_delay.seconds)
    return reason, delay


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: StatusError) -> JSONResponse:
    """The HTTP answer to ``error``: status from the table, OpenAI's error body, ``Retry-After``."""
    status = error.status
    reason, delay = _reason_and_delay(status)
    http_status, kind = HTTP_STATUSES_BY_REASON.get(reason) or HTTP_STATUSES.get(status.code, _SERVER_ERROR)
    headers = {"Retry-After": str(delay)} if delay is not None and http_status in _RETRY_STATUSES else None
    body = error_body(status.details, kind, reason.lower() or None)
    return JSONResponse(body, status_code=http_status, headers=headers)


def stream_error_body(error: BaseException) -> dict[str, Any]:
    """The body of an ``error`` event ending a stream that has already answered 200."""
    status = error.status if isinstance(error, StatusError) else to_status(error)
    reason, _ = _reason_and_delay(status)
    _, kind = HTTP_STATUSES_BY_REASON.get(reason) or HTTP_STATUSES.get(status.code, _SERVER_ERROR)
    return error_body(status.details, kind, (reason or reason_of(error)).lower())
