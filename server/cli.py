"""``deft serve`` / ``python -m deft_server``: one command-line option per field of
:class:`~deft_server.config.ServerSettings`, generated from the model.

A setting is declared once, as a field of the settings model (name, type, default, and its help as
the field's ``description``); its flag is ``--field-name``, its environment variable
``DEFT_FIELD_NAME``, and its help line says both, with the default. A field added to the model is
a flag without touching this module. Flags left out stay unset here, so the environment and the
model's defaults apply; pydantic validates every value, flags and environment alike."""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from deft_server.config import ServerSettings
from pydantic import ByteSize
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

_PLAIN = (str, int, float, Path)


def _value_type(annotation: Any) -> Any:
    """The annotation without ``| None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _show(value: Any) -> str:
    """A default as a user would type it (``512MiB``, ``none``, ``~/.local/share/deft``)."""
    if value is None:
        return "none"
    if isinstance(value, ByteSize):
        for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if value and value % (1 << shift) == 0:
                return f"{value >> shift}{unit}"
        return str(int(value))
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        return "~" + text[len(home) :] if text.startswith(home) else text
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return None if field.default is PydanticUndefined else field.default


def _option(name: str, field: FieldInfo, env_prefix: str) -> inspect.Parameter:
    """The typer option of one settings field (default None: "not given on the command line")."""
    value_type = _value_type(field.annotation)
    flag = "--" + name.replace("_", "-")
    env = env_prefix + name.upper()
    choices = typing.get_args(value_type) if typing.get_origin(value_type) is Literal else ()
    described = field.description or (" | ".join(map(str, choices)) if choices else name.replace("_", " "))
    help = f"{described} [{env}; {_show(_default(field))}]"
    decls: tuple[str, ...] = (flag,)
    kwargs: dict[str, Any] = {"help": help, "show_default": False}
    if value_type is bool:
        cli_type: Any = bool
        decls = (f"{flag}/--no-{flag[2:]}",)
    elif choices:
        cli_type = value_type  # typer offers a Literal's values as choices
    elif typing.get_origin(value_type) is list:
        (item,) = typing.get_args(value_type) or (str,)
        cli_type = list.__class_getitem__(item if item in _PLAIN else str)
    else:
        cli_type = value_type if value_type in _PLAIN else str  # ByteSize, SecretStr, ...: pydantic parses
    option = typer.Option(*decls, **kwargs)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[cli_type | None, option]
    )


def serve_parameters() -> list[inspect.Parameter]:
    """One option per field of :class:`ServerSettings`, in the model's order."""
    prefix = str(ServerSettings.model_config.get("env_prefix", ""))
    return [_option(name, field, prefix) for name, field in ServerSettings.model_fields.items()]


def serve(**flags: Any) -> None:
    """Start the gRPC server (health, reflection, Prometheus metrics); SIGTERM drains it and exits 0.

    Every flag is also an environment variable (--max-queue = DEFT_MAX_QUEUE); flags win. Sizes accept
    units (512MiB, 2GiB) or plain bytes.
    """
    overrides = {name: value for name, value in flags.items() if value is not None and value != []}
    from deft_server.app import main

    raise typer.Exit(main(overrides))


serve.__signature__ = inspect.Signature(serve_parameters())  # type: ignore[attr-defined]
serve.__annotations__ = {}  # typer reads the generated signature


def serve_app() -> typer.Typer:
    """A one-command app running :func:`serve` (mounted as ``deft serve`` by ``deft_cli``)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(serve)
    return app
