"""Typed errors raised at the runtime boundary.

Every error a user can cause is one of these classes, so the server maps each to a precise
gRPC status code in one place (``deft_server``) and never reports a user's mistake as an
internal failure. Messages say what was expected, what was found, and what to do.
"""

from __future__ import annotations

#: How much of a user-supplied value (name, key, pattern) an error message echoes by default.
ECHO_LIMIT = 80


def shorten(value: object, limit: int = ECHO_LIMIT, *, quote: bool = True) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for echoing user input into error messages.

    gRPC status messages and details travel in headers (16 KiB in all), so a message must never grow
    with the input: a 10k-character name becomes ``'nnnn…'… (10000 characters)``. ``quote=False``
    cuts a string without quoting it (for the text of a library's error).
    """
    if isinstance(value, str):
        head = repr(value[:limit]) if quote else value[:limit]
        return head if len(value) <= limit else f"{head}… ({len(value)} characters)"
    try:
        text = repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class DeftError(Exception):
    """Base class of every error deft raises on purpose."""


class InvalidAdapter(DeftError, ValueError):
    """The adapter file or object is malformed (maps to INVALID_ARGUMENT)."""


class UnsafeAdapterFormat(InvalidAdapter):
    """A pickle-based file (``.bin``/``.pt``/``.ckpt``) was offered; it is never unpickled."""


class AdapterFormatError(InvalidAdapter):
    """The bytes are not a readable adapter: bad safetensors header, unknown layout, missing keys."""


class AdapterTooLarge(InvalidAdapter):
    """The file (or its safetensors header) is above the configured size limit."""


class NonFiniteAdapter(InvalidAdapter):
    """An adapter tensor contains NaN or Inf."""


class AdapterDtypeError(InvalidAdapter):
    """An adapter tensor is not a floating-point tensor."""


class RankError(InvalidAdapter):
    """A rank is impossible for the layer (``r > min(d_out, d_in)``) or above the configured maximum."""


class UnknownTargetModule(InvalidAdapter):
    """The adapter targets a module the base model does not have (or that is not a Linear)."""


class AdapterShapeError(InvalidAdapter):
    """An adapter tensor's shape does not fit the base layer it targets."""


class AdapterIncompatible(DeftError):
    """The adapter was made for a different base model (maps to FAILED_PRECONDITION)."""


class AdapterNotFound(DeftError, KeyError):
    """No adapter is registered under that name (maps to NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "adapter not found"


class PoolExhausted(DeftError):
    """The adapters a request needs cannot fit in the adapter pool (maps to RESOURCE_EXHAUSTED)."""


class InvalidRequest(DeftError, ValueError):
    """A generation request has bad parameters (maps to INVALID_ARGUMENT)."""


class ModelLoadError(DeftError):
    """A base model could not be resolved or loaded."""
