"""Optional bearer-token authentication (``--token``): every call but health checks and reflection
must carry exactly one ``authorization: Bearer <token>`` header, else it ends with UNAUTHENTICATED.
Several ``authorization`` headers are refused even if one is right: which one a proxy or another
server would read is ambiguous."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
MISSING_TOKEN = (
    "this server requires a token: pass token=... to the client, --token to the CLI, or set DEFT_TOKEN"
)


class BearerToken:
    """The one check of a call's ``authorization`` metadata (the interceptor below and the Ray Serve
    ingress in :mod:`deft_server.ray_app` both use it)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def refusal(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """Why a call with ``metadata`` is refused, or None when it carries exactly the token."""
        given = [value for key, value in metadata or () if key == "authorization"]
        if len(given) > 1:
            return f"send exactly one authorization header (this call has {len(given)})"
        token = given[0] if given else ""
        if hmac.compare_digest(token.encode() if isinstance(token, str) else token, self._expected):
            return None
        return MISSING_TOKEN


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._token = BearerToken(token)

    def _refusal(self, details: grpc.HandlerCallDetails) -> str | None:
        """Why the call is refused, or None when it may proceed."""
        if details.method.startswith(OPEN_PREFIXES):
            return None
        return self._token.refusal(details.invocation_metadata)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        refusal = None if handler is None else self._refusal(details)
        return handler if refusal is None else _denying(handler, refusal)


def rewrap(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serializers as ``handler`` whose behaviour is ``wrap(behaviour)``."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    for kind, make in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return make(wrap(behaviour), **kwargs)
    return handler


def _denying(
    handler: grpc.RpcMethodHandler, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that refuses the call with ``code``."""

    async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(_deny, **kwargs)
