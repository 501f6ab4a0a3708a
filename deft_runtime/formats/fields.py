"""Typed reads of untrusted JSON (adapter configs, safetensors metadata).

Every value from a file is checked before it is used, and every failure is an
:class:`~deft_runtime.errors.InvalidAdapter` that names the field and echoes a bounded copy of what
was found. Numbers must be JSON numbers (not strings or booleans), finite, and within a bound.
"""

from __future__ import annotations

import json
import math

from deft_runtime.errors import AdapterFormatError, NonFiniteAdapter, shorten

#: Largest LoRA/DEFT rank a config may announce (far above any layer of a supported model).
MAX_CONFIG_RANK = 65536
#: Largest |alpha| a config may carry; the per-layer scale has its own bound (``validation.MAX_SCALE``).
MAX_ALPHA = 1e6


def parse_json(text: str | bytes, what: str) -> object:
    """``json.loads`` whose every failure (bad syntax, bad UTF-8, nesting deeper than Python's
    recursion limit) is an :class:`AdapterFormatError` naming ``what``."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{what} is not valid JSON: {e}") from e
    except RecursionError as e:  # raised by the C decoder before it allocates anything large
        raise AdapterFormatError(
            f"{what} is nested too deeply (arrays or objects inside each other); it is not an adapter config"
        ) from e


def field_name(key: str, parent: str | None = None) -> str:
    """How a message names a field: ``'r'`` at the top level, ``rank_pattern['to_q']`` inside one."""
    return shorten(key) if parent is None else f"{parent}[{shorten(key)}]"


def mapping(value: object, field: str) -> dict[str, object]:
    """A JSON object (``None`` reads as empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{field} must be a JSON object, found {shorten(value)}")
    return value


def string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise AdapterFormatError(f"{field} must be a string, found {shorten(value)}")
    return value


def flag(value: object, field: str) -> bool:
    """A JSON boolean (``None`` reads as false). Strings such as ``"false"`` are refused, not truthy."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterFormatError(f"{field} must be true or false, found {shorten(value)}")
    return value


def number(value: object, field: str, bound: float = MAX_ALPHA) -> float:
    """A finite JSON number with ``|value| ≤ bound``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AdapterFormatError(f"{field} must be a number, found {shorten(value)}")
    return finite(float(value), field, bound)


def finite(value: float, field: str, bound: float) -> float:
    """``value`` unless it is NaN/Inf (:class:`NonFiniteAdapter`) or outside ``[-bound, bound]``."""
    if not math.isfinite(value):
        raise NonFiniteAdapter(f"{field} is {value!r}; it must be a finite number")
    if abs(value) > bound:
        raise AdapterFormatError(
            f"{field} is {value!r}, outside [{-bound:g}, {bound:g}]; no working adapter needs such a value"
        )
    return value


def rank(value: object, field: str) -> int:
    """A positive integer (``4`` or ``4.0``) up to :data:`MAX_CONFIG_RANK`."""
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value < 1:  # type: ignore[operator]
        raise AdapterFormatError(f"{field} must be a positive integer, found {shorten(value)}")
    if value > MAX_CONFIG_RANK:  # type: ignore[operator]
        raise AdapterFormatError(f"{field} is {shorten(value)}, above the largest rank {MAX_CONFIG_RANK}")
    return int(value)  # type: ignore[call-overload]
