"""How a command reaches a deft server: one declaration of the connection options (``--server``,
``--token``, ``--tls-ca``, ``--client-cert`` and ``--client-key``, with their ``DEFT_*`` variables) for
every command that talks to one, and one way to report what went wrong (an auth failure is an auth
failure, an unreachable server an unreachable server)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from deft_cli.console import fail

if TYPE_CHECKING:
    from deft_client import DeftClient, DeftError

DEFAULT_PORT = 50051  # deft serve --port's default
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
START_HINT = (
    "\nnothing listens there: start a server with `deft serve` (it listens on 127.0.0.1:50051), "
    "or pass --server HOST:PORT of a running one"
)
PANEL = "Server connection"


@dataclass(frozen=True)
class Connection:
    """The connection options (an option group: see :mod:`deft_cli.options`)."""

    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            envvar="DEFT_SERVER",
            help=f"HOST:PORT of the deft server (default: {DEFAULT_SERVER})",
            rich_help_panel=PANEL,
        ),
    ] = None
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="DEFT_TOKEN",
            help="the server's --token (sent as 'authorization: Bearer TOKEN')",
            rich_help_panel=PANEL,
        ),
    ] = None
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            envvar="DEFT_TLS_CA",
            help="PEM root certificates of a TLS server",
            rich_help_panel=PANEL,
        ),
    ] = None
    client_cert: Annotated[
        Path | None,
        typer.Option(
            "--client-cert",
            envvar="DEFT_CLIENT_CERT",
            help="PEM client certificate, for a server with mutual TLS (--tls-client-ca)",
            rich_help_panel=PANEL,
        ),
    ] = None
    client_key: Annotated[
        Path | None,
        typer.Option(
            "--client-key",
            envvar="DEFT_CLIENT_KEY",
            help="PEM private key of --client-cert",
            rich_help_panel=PANEL,
        ),
    ] = None

    @property
    def address(self) -> str:
        """The server's address (flag, ``$DEFT_SERVER``, default), with deft's port when it names
        none: gRPC would take ``localhost`` for ``localhost:443``."""
        return with_default_port(self.server or os.environ.get("DEFT_SERVER") or DEFAULT_SERVER)

    def client(self, timeout: float | None = None) -> DeftClient:
        """A ``DeftClient`` for this connection (raises ``typer.Exit`` when the client is missing)."""
        try:
            from deft_client import DeftClient
        except ImportError as e:
            raise fail(f"talking to a server needs the client: pip install 'deft[server]' ({e})") from e
        if (self.client_cert is None) != (self.client_key is None):
            raise fail("--client-cert and --client-key go together: give both or neither")
        return DeftClient(
            self.address,
            token=self.token,
            root_certificates=self.tls_ca,
            timeout=timeout,
            client_certificate=self.client_cert,
            client_key=self.client_key,
        )

    def explain(self, error: DeftError) -> str:
        """What a failed call means for the user, naming the server."""
        import grpc

        if error.code == grpc.StatusCode.UNAUTHENTICATED:
            hint = "" if "DEFT_TOKEN" in error.message else " (pass --token TOKEN or set DEFT_TOKEN)"
            return f"authentication failed at {self.address} (UNAUTHENTICATED): {error.message}{hint}"
        if (
            error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            and not error.reason
        ):
            hint = START_HINT if "refused" in error.message.lower() else ""
            return f"cannot reach the deft server at {self.address}: {error.message}{hint}"
        return str(error)


def with_default_port(address: str) -> str:
    """``address`` with ``:50051`` added when it names a host without a port (``localhost``,
    ``10.0.0.5``, ``[::1]``); targets with a scheme (``unix:``, ``dns:///``) are left alone."""
    if "/" in address or address.startswith("unix:"):
        return address
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{DEFAULT_PORT}"
    return address if ":" in address else f"{address}:{DEFAULT_PORT}"


@contextlib.contextmanager
def connect(connection: Connection, timeout: float | None = None) -> Iterator[DeftClient]:
    """A connected client; a ``DeftError`` inside the block exits 1 with :meth:`Connection.explain`."""
    from deft_client import DeftError

    try:
        with connection.client(timeout) as client:
            yield client
    except DeftError as e:
        raise fail(connection.explain(e)) from e
