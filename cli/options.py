"""Option groups: a frozen dataclass declares a group of command-line options once (name, type,
default and help, as ``Annotated[T, typer.Option(...)]`` fields), and :func:`with_options` adds its
fields to a command, which then receives one typed instance per group instead of loose keywords.

``Connection`` (every command that talks to a server) and the ``deft train`` groups are declared
this way, so a flag's name, type, default and help live in exactly one place."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

#: the base model of ``deft train`` and ``deft export-onnx`` when ``--model`` is not given: the one
#: ``deft serve`` serves by default (deft_server.config.ServerSettings.model; not imported here)
DEFAULT_MODEL = "shapes-sdxl"


def model_option() -> Any:
    """``--model`` of the commands that load a base model themselves (``$DEFT_MODEL``, as serve)."""
    return typer.Option(
        "--model",
        envvar="DEFT_MODEL",
        help="base model: shapes-sdxl | tiny-sdxl | tiny-omnigen | diffusers directory | hub id",
    )


def group_parameters(group: type) -> list[inspect.Parameter]:
    """The fields of the dataclass ``group`` as keyword-only command parameters."""
    hints = typing.get_type_hints(group, include_extras=True)
    return [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default,
            annotation=hints[f.name],
        )
        for f in dataclasses.fields(group)
    ]


def with_options(**groups: type) -> Callable[[F], F]:
    """Decorate a command so that each dataclass in ``groups`` contributes its fields as options; the
    command receives ``keyword=Group(...)`` for each ``keyword=Group`` given here."""

    def decorate(command: F) -> F:
        own = [
            p
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.name not in groups and p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        added = [p for group in groups.values() for p in group_parameters(group)]
        names = [p.name for p in [*own, *added]]
        if len(set(names)) != len(names):
            raise TypeError(f"{command.__name__}: option groups repeat a name ({sorted(names)})")

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for keyword, group in groups.items():
                fields = [f.name for f in dataclasses.fields(group)]
                values[keyword] = group(**{name: values.pop(name) for name in fields})
            return command(**values)

        run.__signature__ = inspect.Signature([*own, *added])  # type: ignore[attr-defined]
        run.__annotations__ = {}  # typer reads the types from the signature above
        del run.__wrapped__
        return typing.cast(F, run)

    return decorate
