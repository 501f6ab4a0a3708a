"""The lock file pins what `make` installs: every dependency of ``deft[dev]``, at the version installed."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{LOCK.name}: {line!r} is not an exact pin (NAME==VERSION)"
            pins[_canonical(name)] = version
    return pins


def _closure(root: str, extras: set[str]) -> set[str]:
    """Every distribution ``root[extras]`` needs, transitively (by the installed metadata)."""
    seen: set[str] = set()
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
                continue
            dep = _canonical(req.name)
            if dep == "deft":  # deft[server,...] inside deft[dev]
                todo.append((root, set(req.extras)))
                continue
            if dep not in seen:
                seen.add(dep)
                todo.append((dep, set(req.extras)))
    return seen


def test_every_dependency_is_pinned_at_the_installed_version():
    pins = _locked()
    needed = _closure("deft", {"dev"}) - {"torch"}  # torch: the Makefile's TORCH_SPEC
    missing = sorted(needed - set(pins))
    assert not missing, f"not in {LOCK.name}: {missing}; run `make lock`"
    stale = {n: (pins[n], metadata.version(n)) for n in needed if metadata.version(n) != pins[n]}
    assert not stale, f"installed versions differ from {LOCK.name} (locked, installed): {stale}"
    assert "torch" not in pins, "torch is pinned by TORCH_SPEC (a CPU or a CUDA build), not by the lock"
