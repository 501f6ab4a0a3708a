"""What a pipeline's text encoders cannot read of a prompt (diffusers truncates it silently to the client).

CLIP text encoders read at most ``tokenizer.model_max_length`` tokens (77 for SDXL's two, start and end
tokens included); diffusers drops the rest and logs it. :func:`truncation_warnings` says so in words the
client gets back with its result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: past this, a tokenizer's ``model_max_length`` is transformers' "no limit" placeholder (≈1e30)
_NO_LIMIT = 1 << 20


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
            limit, count = int(tokenizer.model_max_length), token_count(tokenizer, text or "")
            if count > limit:
                warnings.append(
                    f"{name} truncated: it is {count} tokens long (start and end tokens included) but the "
                    f"text encoder reads only the first {limit}; the rest was ignored, so shorten it"
                )
                break
    return warnings
