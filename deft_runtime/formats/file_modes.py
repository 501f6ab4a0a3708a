"""Results get the permissions of any file the user creates: ``0666``/``0777`` minus the umask.

Files are staged before they are renamed into place (never half-written), and the staging tools are
owner-only: ``tempfile.mkdtemp`` makes ``0700`` folders and safetensors' writer ``0600`` files. An
adapter written that way could not be read by the server's user or a teammate, unlike everything else
in the same folder; :func:`publish` gives staged results the modes a plain ``open``/``mkdir`` would.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask: from ``/proc`` where there is one (no change, so no race with threads
    creating files meanwhile), else set and put back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(path: Path) -> Path:
    """``path`` (a folder: with everything in it) at ``0666``/``0777`` minus the umask; links untouched."""
    mask = current_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    return path
