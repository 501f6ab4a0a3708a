"""One access-log line per generation request, on the ``deft_server.access`` logger (INFO).

A line is ``key=value`` pairs (strings JSON-quoted), e.g.::

    generate id=5f0c… label="job-7" tenant=acme status=ok steps=30 size=1024x1024 images=1 adapters=2
    latency_s=3.214 warnings=1

``id`` is the engine's id of the request (absent when it was refused before admission), ``label`` the
client's ``request_id``, ``tenant`` the caller's tenant (absent without tenants). Prompts are the users'
data: they are logged only with ``deft serve --log-prompts``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

from deft_server.tenants import PUBLIC

log = logging.getLogger("deft_server.access")
_BARE = re.compile(r"[A-Za-z0-9._:-]+")


@dataclass
class AccessEntry:
    """What is known of one request, filled in as it is admitted."""

    tenant: str = ""
    server_id: str = ""
    label: str = ""
    steps: int = 0
    width: int = 0
    height: int = 0
    images: int = 0
    adapters: int = 0
    prompt: str | None = None
    negative_prompt: str | None = None
    warnings: list[str] = field(default_factory=list)

    def line(self, status: str, latency_s: float, log_prompts: bool) -> str:
        tenant = "" if self.tenant == PUBLIC else self.tenant  # PUBLIC: a server without tenants
        pairs: list[tuple[str, object]] = [("id", self.server_id), ("label", self.label)]
        pairs += [("tenant", tenant), ("status", status)]
        if self.steps:
            size = f"{self.width}x{self.height}"
            pairs += [
                ("steps", self.steps),
                ("size", size),
                ("images", self.images),
                ("adapters", self.adapters),
            ]
        pairs += [("latency_s", round(latency_s, 3)), ("warnings", len(self.warnings))]
        line = " ".join(f"{k}={_value(v)}" for k, v in pairs if v not in ("", None))
        prompts = [("prompt", self.prompt), ("negative_prompt", self.negative_prompt)] if log_prompts else []
        for name, text in prompts:  # free text: always a JSON string, "" included
            line += f" {name}={json.dumps(text)}" if text is not None else ""
        return "generate " + line


def _value(value: object) -> str:
    """Plain when it cannot be misread (``ok``, ``30``, ``64x64``), else a JSON string."""
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


def log_access(entry: AccessEntry, status: str, latency_s: float, log_prompts: bool) -> None:
    log.info("%s", entry.line(status, latency_s, log_prompts))
