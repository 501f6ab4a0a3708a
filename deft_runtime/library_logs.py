"""Keep diffusers' and transformers' noise out of deft's output.

- transformers warns twice, at the first diffusers import, that torchvision is missing and it falls back
  to the PIL image processors (which deft never uses): dropped.
- diffusers' SDXL pipelines log the part of a prompt they cut at the text encoder's 77 tokens, so a
  server's log would hold its users' prompts: the line is kept, the prompt text is not. The server tells
  the client instead (the ``warnings`` of its result).
- the "Loading pipeline components" / "Loading weights" progress bars of every model load are off
  (:func:`no_progress_bars`, called by the model loader).

:func:`quiet_libraries` only installs logging filters (no import of either library), so
``deft_runtime`` runs it on import, before anything imports diffusers.
"""

from __future__ import annotations

import logging
import re

#: the modules whose loggers say the words quoted in the filters below
_TORCHVISION_LOGGER = "transformers.utils.import_utils"
_PROMPT_LOGGERS = (
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
)
_TRUNCATED = re.compile(r"input was truncated because CLIP can only handle sequences up to (\d+) tokens")


def _not_torchvision_fallback(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed)" not in str(record.msg)


def _without_prompt_text(record: logging.LogRecord) -> bool:
    """Rewrite diffusers' truncation warning so it no longer quotes the prompt."""
    found = _TRUNCATED.search(str(record.msg))
    if found:
        record.msg = f"a prompt was truncated to the text encoder's {found.group(1)} tokens (text not logged)"
        record.args = ()
    return True


def quiet_libraries() -> None:
    """Install the filters (idempotent: a logger holds each filter once)."""
    logging.getLogger(_TORCHVISION_LOGGER).addFilter(_not_torchvision_fallback)
    for name in _PROMPT_LOGGERS:
        logging.getLogger(name).addFilter(_without_prompt_text)


def no_progress_bars() -> None:
    """Turn off diffusers' and transformers' loading progress bars for this process."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
