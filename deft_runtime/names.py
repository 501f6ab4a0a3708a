"""The one rule for adapter names, shared by the server (registration) and the command line
(``deft train --register`` checks the name before hours of training)."""

from __future__ import annotations

import re

from deft_runtime.errors import InvalidRequest, shorten

ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")


def check_adapter_name(name: str) -> str:
    """``name`` if it is an adapter name: 1-128 of ``A-Z a-z 0-9 . _ -``, not ``.`` or ``..``."""
    if not ADAPTER_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidRequest(
            f"invalid adapter name {shorten(name)}: use 1-128 letters, digits, '.', '_' or '-' "
            "(no spaces or path separators), and not '.' or '..'"
        )
    return name
