"""Ask a deft server's ``grpc.health.v1`` service whether it is serving: the container's health check.

::

    python -m deft_server.healthcheck [--address HOST:PORT] [--service NAME] [--timeout S]

Exit status 0 when the server answers SERVING for ``--service`` (``""``, the whole server, by
default; ``deft.v1.GenerationService`` or ``deft.v1.AdapterService`` for one service), 1 otherwise,
with a one-line reason on stderr. The default address is ``127.0.0.1`` on ``$DEFT_PORT`` (50051), so
the check follows the server's own port setting inside a container. When the server speaks TLS
(``$DEFT_TLS_CERT`` set, or ``--tls-ca`` given) the check connects with TLS, trusting that
certificate file; ``--tls-server-name`` overrides the name checked against the certificate.

Health and reflection calls need no token, so the check works on servers started with ``--token``.
It imports only grpcio and the health stubs (no torch), so it is cheap to run every few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def default_address() -> str:
    return f"127.0.0.1:{os.environ.get('DEFT_PORT', '50051')}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deft_server.healthcheck",
        description="Exit 0 if the deft server at ADDRESS reports SERVING for SERVICE, else 1.",
    )
    parser.add_argument("--address", default=default_address(), help="HOST:PORT (default: %(default)s)")
    parser.add_argument("--service", default="", help="health service name; '' (default) is the whole server")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=Path(os.environ["DEFT_TLS_CERT"]) if os.environ.get("DEFT_TLS_CERT") else None,
        help="PEM file of certificates to trust; connects with TLS (default: $DEFT_TLS_CERT if set)",
    )
    parser.add_argument("--tls-server-name", default=None, help="name to verify the certificate against")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca.read_bytes())
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def check(args: argparse.Namespace) -> str | None:
    """None when SERVING, else the reason it is not."""
    what = f"service {args.service!r}" if args.service else "server"
    try:
        channel = _channel(args)
    except OSError as e:
        return f"cannot read the TLS certificates {args.tls_ca}: {e.strerror or e}"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                return f"cannot reach {args.address}: {details or 'unavailable'}"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"no answer from {args.address} within {args.timeout:g}s"
            if code == grpc.StatusCode.NOT_FOUND:
                return f"{args.address} has no health status for {what}"
            return f"health check of {args.address} failed: {code.name} {details}".rstrip()
    if reply.status != SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return f"{what} at {args.address} is {status}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = check(args)
    if reason is not None:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
