"""What a pipeline's text encoders cannot read of a prompt (diffusers truncates it silently to the client).

CLIP text encoders read at most ``tokenizer.model_max_length`` tokens (77 for SDXL's two, start and end
tokens included); diffusers drops the rest and logs it. :func:`truncation_warnings` says so in words the
client gets back with its result.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Mapping
from typing import Any

#: past this, a tokenizer's ``model_max_length`` is transformers' "no limit" placeholder (≈1e30)
_NO_LIMIT = 1 << 20

#: this module's own copy of each pipeline tokenizer, and the lock its calls take. A fast (Rust)
#: tokenizer's padding and truncation are state that every call sets: counting tokens on a request
#: thread with the pipeline's own tokenizer, while the engine thread encodes prompts with it (padded to
#: 77), could leave the engine's batch unpadded (a real failure under load: "Expected size 3 but got
#: size 77" in ``encode_prompt``).
_COPIES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _private(tokenizer: Any) -> Any:
    """This module's copy of ``tokenizer`` (made once; call with ``_LOCK`` held)."""
    mine = _COPIES.get(tokenizer)
    if mine is None:
        mine = _COPIES[tokenizer] = copy.deepcopy(tokenizer)
    return mine


def _tokenizers(pipe: Any) -> list[Any]:
    found = (getattr(pipe, name, None) for name in ("tokenizer", "tokenizer_2"))
    return [t for t in found if t is not None and 0 < int(t.model_max_length) < _NO_LIMIT]


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` as the pipeline encodes it (start and end tokens included), untruncated."""
    return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])


def truncation_warnings(pipe: Any, prompts: Mapping[str, str | None]) -> list[str]:
    """One warning per prompt (``{"prompt": text, "negative_prompt": text}``) longer than a text encoder
    of ``pipe`` reads; blocking (tokenizes), bounded by the server's prompt length limit."""
    warnings = []
    for name, text in prompts.items():
        for tokenizer in _tokenizers(pipe) if text else ():
            with _LOCK:
                count = token_count(_private(tokenizer), text or "")
            limit = int(tokenizer.model_max_length)
            if count > limit:
                warnings.append(
                    f"{name} truncated: it is {count} tokens long (start and end tokens included) but the "
                    f"text encoder reads only the first {limit}; the rest was ignored, so shorten it"
                )
                break
    return warnings
