"""``python -m deft_server [FLAGS]`` is ``deft serve [FLAGS]``."""

from __future__ import annotations

from deft_server.cli import serve_app

if __name__ == "__main__":
    serve_app()(prog_name="python -m deft_server")
