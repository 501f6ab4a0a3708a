"""How ``--help`` reads: one pass over the click command tree typer builds, so that every command's
help follows the same conventions without repeating them in each declaration.

- value placeholders are click's plain words (``TEXT``, ``INTEGER``, ``NUMBER``, ``PATH``), arguments
  are upper-case names (``deft inspect [OPTIONS] PATH``), and switches show none (typer 0.29 prints
  ``<bool>``, ``<list[str]>`` and ``{path}``);
- a switch that is off by default is just ``--switch`` (no ``--no-switch`` to fill the name column);
- defaults are shown in one style, ``[default: X]``: typer's own, and the ``(default: X)`` that a help
  text gives for a default typer cannot show (``None`` meaning "the model's");
- a docstring's paragraphs are reflowed (typer's rich help keeps its line breaks);
- the help is laid out at least :data:`MIN_HELP_WIDTH` columns wide, so no flag name is cut.
"""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperOption

if TYPE_CHECKING:
    from typer._click.core import Command  # typer 0.29 vendors click; get_command's return type

C = TypeVar("C", bound="Command")  # what typer.main.get_command returns: TyperCommand, TyperGroup
MIN_HELP_WIDTH = 120  # deft serve's longest flag and [DEFT_VARIABLE; default] fit uncut
MAX_CHOICES_METAVAR = 16  # a longer list of choices shows as CHOICE (the help text names them)
_DEFAULT_IN_TEXT = re.compile(r"\s*\(default:? ([^()]*(?:\([^()]*\)[^()]*)*)\)")
_PLAIN_TYPES = {int: "INTEGER", float: "NUMBER", str: "TEXT", Path: "PATH"}


class _PlainArgument(TyperArgument):
    """An argument shown by its metavar alone, click-style: ``PATH``, ``[PATH]`` when optional."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        return name if self.required else f"[{name}]"

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def help_width() -> int:
    """The width help is laid out at: the terminal's, but never under :data:`MIN_HELP_WIDTH`."""
    return max(shutil.get_terminal_size((MIN_HELP_WIDTH, 24)).columns, MIN_HELP_WIDTH)


def tidy(command: C, *, defaults: bool = True) -> C:
    """Apply the conventions above to ``command`` and its subcommands, in place; ``defaults=False``
    leaves the switches and the default texts alone (``deft serve``'s generated flags have their own
    ``[DEFT_VAR; default]`` style)."""
    if command.help:
        command.help = _unwrapped(command.help)
    help_option = command.get_help_option(typer.Context(command))  # typer makes it on first use
    for param in [*command.params, *([help_option] if help_option else [])]:
        if isinstance(param, TyperArgument):
            param.metavar = param.metavar or (param.name or "value").upper()
            param.__class__ = _PlainArgument
        elif isinstance(param, TyperOption):
            _tidy_option(param, defaults=defaults)
    for sub in getattr(command, "commands", {}).values():
        tidy(sub, defaults=defaults)
    return command


def _unwrapped(text: str) -> str:
    """``text`` with its paragraphs on one line each (typer's rich help keeps a docstring's line
    breaks, which then fall mid-sentence); the terminal wraps them."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split("\n")) for p in paragraphs)


def _tidy_option(option: TyperOption, *, defaults: bool) -> None:
    if option.is_flag or option.count:
        option.metavar = ""
        if defaults and option.default is False and not option.envvar:
            option.secondary_opts = []
    elif option.metavar is None and option.type_descriptor.is_choice:
        choices = "|".join(map(str, option.type_descriptor.choices or ()))
        option.metavar = choices if len(choices) <= MAX_CHOICES_METAVAR else "CHOICE"
    elif option.metavar is None:
        annotation = option.type_descriptor.annotation
        element = (getattr(annotation, "__args__", None) or (annotation,))[0]
        option.metavar = _PLAIN_TYPES.get(element, getattr(element, "__name__", "VALUE").upper())
    if defaults and option.help is not None and option.name != "help":
        option.help, option.show_default = _one_default_style(option), False


def _one_default_style(option: TyperOption) -> str:
    """The help text ending in ``[default: X]`` (typer's default, or the one the text gave)."""
    assert option.help is not None
    text, given = option.help, None
    if match := _DEFAULT_IN_TEXT.search(text):
        text, given = (text[: match.start()] + text[match.end() :]).strip(), match.group(1)
    shown = given if given is not None else _default_text(option)
    return f"{text} {escape(f'[default: {shown}]')}" if shown else text  # not rich markup


def _default_text(option: TyperOption) -> str | None:
    value: Any = option.default
    if option.is_flag:
        return option.opts[0] if value is True else None
    if value is None or value == [] or callable(value):
        return None
    return str(value)
