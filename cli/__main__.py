"""``python -m deft_cli`` is ``deft``."""

from __future__ import annotations

from deft_cli.app import app

if __name__ == "__main__":
    app(prog_name="deft")
