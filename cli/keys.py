"""``deft keys create | list | update | revoke``: tenant keys in the registry's database.

They open the registry ``deft serve`` uses (``--data-dir`` / ``--registry``, or ``DEFT_DATA_DIR`` /
``DEFT_REGISTRY``) directly, not through a server, and work while servers run: a revocation reaches
every server on that registry within a second. ``create`` prints the key once; only its salted hash
is stored. Limits: a number, or ``none`` for unlimited (``update`` leaves out what it does not name).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from deft_cli.console import console, fail
from deft_cli.listing import JSON, WIDE, print_json, print_table, table
from deft_cli.options import with_options
from rich.markup import escape

if TYPE_CHECKING:
    from deft_server.store import AdapterStore
    from deft_server.tenants import Limits

keys_app = typer.Typer(help="Manage tenant keys (for deft serve --auth keys).", no_args_is_help=True)
PANEL = "Registry"
UNLIMITED = ("none", "unlimited")


@dataclass(frozen=True)
class RegistryLocation:
    """Where the keys live: the same options as ``deft serve``."""

    data_dir: Annotated[
        Path | None,
        typer.Option(envvar="DEFT_DATA_DIR", help="the server's --data-dir", rich_help_panel=PANEL),
    ] = None
    registry: Annotated[
        str | None,
        typer.Option(envvar="DEFT_REGISTRY", help="the server's --registry URL", rich_help_panel=PANEL),
    ] = None

    @contextlib.contextmanager
    def store(self) -> Iterator[AdapterStore]:
        """The registry's store (a ``DeftError`` inside exits 1 with its message)."""
        try:
            from deft_server.config import default_data_dir
            from deft_server.store import open_store
        except ImportError as e:
            raise fail(f"deft keys needs the server extra: pip install 'deft[server]' ({e})") from e
        from deft_runtime.errors import DeftError

        try:
            store = open_store(Path(self.data_dir or default_data_dir()).expanduser(), self.registry)
            try:
                yield store
            finally:
                store.close()
        except DeftError as e:
            raise fail(e) from e


@dataclass(frozen=True)
class LimitFlags:
    """A key's quotas and weight; None: not given (create: unlimited, update: unchanged)."""

    max_adapters: Annotated[str | None, typer.Option(help="most adapters the tenant holds (none: any)")] = (
        None
    )
    max_adapter_bytes: Annotated[
        str | None, typer.Option(help="most upload bytes of the tenant's adapters, e.g. 2GiB (none: any)")
    ] = None
    max_concurrent: Annotated[
        str | None, typer.Option(help="most requests queued or running per server (none: any)")
    ] = None
    rate: Annotated[str | None, typer.Option(help="requests per second per server, e.g. 5/s or 60/min")] = (
        None
    )
    weight: Annotated[float | None, typer.Option(help="fair-share weight (default 1)")] = None

    def applied(self, limits: Limits) -> Limits:
        """``limits`` with the given flags changed (raises ValueError on a bad value)."""
        changes: dict[str, Any] = {}
        for name in ("max_adapters", "max_concurrent"):
            if (value := getattr(self, name)) is not None:
                changes[name] = None if value.lower() in UNLIMITED else int(value)
        if self.max_adapter_bytes is not None:
            changes["max_adapter_bytes"] = _size(self.max_adapter_bytes)
        if self.rate is not None:
            changes["rate"] = _rate(self.rate)
        if self.weight is not None:
            changes["weight"] = self.weight
        return dataclasses.replace(limits, **changes)


def _size(text: str) -> int | None:
    if text.lower() in UNLIMITED:
        return None
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise ValueError(
            f"--max-adapter-bytes {text!r}: give bytes or a size such as 512MiB or 2GB"
        ) from None


def _rate(text: str) -> float | None:
    if text.lower() in UNLIMITED:
        return None
    number, _, unit = text.partition("/")
    per = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}.get(unit.strip().lower())
    try:
        if per is None:
            raise ValueError
        return float(number) / per
    except ValueError:
        raise ValueError(f"--rate {text!r}: give requests per second, as 5, 5/s, 30/min or 100/h") from None


def _limits_text(limits: Limits) -> str:
    parts = [
        f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
        for name, value in dataclasses.asdict(limits).items()
        if value is not None and not (name == "weight" and value == 1.0)
    ]
    return ", ".join(parts) or "unlimited"


def _checked(flags: LimitFlags, base: Limits) -> Limits:
    from deft_server.keys import check_limits

    from deft_runtime.errors import DeftError

    try:
        return check_limits(flags.applied(base))
    except (ValueError, DeftError) as e:
        raise fail(e) from e


@keys_app.command("create")
@with_options(location=RegistryLocation, flags=LimitFlags)
def keys_create(
    tenant: Annotated[str, typer.Argument(help="tenant id: letters, digits, '.', '_', '-'")],
    location: RegistryLocation,
    flags: LimitFlags,
    admin: Annotated[
        bool, typer.Option("--admin", help="may list every tenant and manage public adapters")
    ] = False,
) -> None:
    """Create a key for TENANT and print it (once: only its hash is stored)."""
    from deft_server.keys import new_key
    from deft_server.tenants import Limits

    limits = _checked(flags, Limits())
    with location.store() as store:
        record, secret = new_key(tenant, admin=admin, limits=limits)
        store.keys.insert(record)
        store.audit.record("key.create", tenant=tenant, key_id=record.key_id, target=record.key_id)
    role = "admin key" if admin else "key"
    console.print(
        f"created {role} [bold]{record.key_id}[/] for tenant {escape(tenant)} ({_limits_text(limits)})"
    )
    console.print("the key (shown only now; send it as 'authorization: Bearer KEY' or DEFT_TOKEN):")
    print(secret)


@keys_app.command("list")
@with_options(location=RegistryLocation)
def keys_list(location: RegistryLocation, wide: WIDE = False, as_json: JSON = False) -> None:
    """List the keys (never their secrets)."""
    with location.store() as store:
        records = store.keys.all()
    if as_json:
        return print_json([_key_json(r) for r in records])
    rows = table("key id", "tenant", "admin", "limits", "created", "revoked", folded=("tenant", "limits"))
    for r in records:
        revoked = _when(r.revoked_at) if r.revoked_at is not None else ""
        rows.add_row(
            r.key_id, r.tenant, "yes" if r.admin else "", _limits_text(r.limits), _when(r.created_at), revoked
        )
    print_table(rows, wide=wide)


def _key_json(record: Any) -> dict[str, Any]:
    """A key's record for ``--json``: never its hash or salt."""
    return {
        "key_id": record.key_id,
        "tenant": record.tenant,
        "admin": record.admin,
        "limits": dataclasses.asdict(record.limits),
        "created_at": _when(record.created_at),
        "revoked_at": _when(record.revoked_at) if record.revoked_at is not None else None,
    }


def _when(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@keys_app.command("update")
@with_options(location=RegistryLocation, flags=LimitFlags)
def keys_update(
    key_id: Annotated[str, typer.Argument(help="the key's id (deft keys list)")],
    location: RegistryLocation,
    flags: LimitFlags,
    admin: Annotated[bool | None, typer.Option("--admin/--no-admin", help="grant or withdraw admin")] = None,
) -> None:
    """Change a key's admin flag, quotas or weight (servers apply it within a second)."""
    with location.store() as store:  # a DeftError inside (no such key) exits 1 with its message
        record = store.keys.get(key_id)
        changed = dataclasses.replace(
            record, limits=_checked(flags, record.limits), admin=record.admin if admin is None else admin
        )
        store.keys.replace(changed)
        store.audit.record("key.update", tenant=record.tenant, key_id=key_id, target=key_id)
    console.print(f"updated {escape(key_id)} ({escape(record.tenant)}): {_limits_text(changed.limits)}")


@keys_app.command("revoke")
@with_options(location=RegistryLocation)
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (deft keys list)")], location: RegistryLocation
) -> None:
    """Revoke a key: every server on this registry refuses it within a second."""
    with location.store() as store:
        record = store.keys.revoke(key_id)
        store.audit.record("key.revoke", tenant=record.tenant, key_id=key_id, target=key_id)
    console.print(f"revoked {escape(key_id)} ({escape(record.tenant)})")
