"""The FastAPI app: routes, the token check, CORS, the playground's static files and error answers."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from deft_server.auth import MISSING_TOKEN, BearerToken
from deft_server.config import ServerSettings
from deft_server.http_api.errors import StatusError, error_body, error_response
from deft_server.http_api.routes import Routes
from deft_server.service import GenerationService, ServerState
from deft_server.tenants_auth import HttpKeyCheck
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles

from deft_runtime.errors import DeftError, InvalidRequest

MISSING_KEY = (
    "this server requires a key: send 'Authorization: Bearer KEY' (openai SDK: OpenAI(api_key=KEY); "
    "the playground: its API key field)"
)


def token_check(settings: ServerSettings) -> Callable[[Request], None]:
    """The dependency refusing a request without exactly the server's token (the gRPC check)."""
    token = BearerToken(settings.token.get_secret_value()) if settings.token else None

    def authorize(request: Request) -> None:
        if token is None:
            return
        refusal = token.refusal([("authorization", v) for v in request.headers.getlist("authorization")])
        if refusal is not None:
            message = MISSING_KEY if refusal == MISSING_TOKEN else refusal
            raise StatusError.http_only(grpc.StatusCode.UNAUTHENTICATED, message, "UNAUTHENTICATED")

    return authorize


def auth_check(settings: ServerSettings, state: ServerState) -> Callable[..., Any]:
    """``--auth keys``: the tenant key check (the request then acts as the key's tenant); else the token."""
    if settings.auth_mode != "keys":
        return token_check(settings)
    check = HttpKeyCheck(lambda: state.runtime.registry.store if state.runtime is not None else None)

    async def authorize(request: Request) -> None:
        await check(request)

    return authorize


def _handlers() -> dict[int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]]:
    async def status(request: Request, e: Exception) -> Response:
        return error_response(e if isinstance(e, StatusError) else StatusError.of(e))

    async def invalid(request: Request, e: Exception) -> Response:
        return error_response(StatusError.of(InvalidRequest(str(e))))

    async def http(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(e.detail), kind, None), status_code=e.status_code, headers=e.headers
        )

    return {StatusError: status, DeftError: status, RequestValidationError: invalid, HTTPException: http}


def build_app(settings: ServerSettings, state: ServerState, generation: GenerationService) -> FastAPI:
    routes = Routes(settings, state, generation)
    app = FastAPI(
        title="deft",
        summary="OpenAI-compatible Images API of a deft server",
        docs_url=None,  # the docs pages load scripts from a CDN; /openapi.json stays
        redoc_url=None,
        exception_handlers=_handlers(),
    )
    app.include_router(routes.router(), dependencies=[Depends(auth_check(settings, state))])
    app.include_router(routes.open_router())
    app.mount("/static", StaticFiles(packages=[("deft_server", "static")]), name="static")
    if settings.cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origin),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    return app
