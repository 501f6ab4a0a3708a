"""``python -m deft_server [FLAGS]`` is ``deft serve [FLAGS]``."""

from __future__ import annotations

import sys

from deft_runtime.cli import app

if __name__ == "__main__":
    app(["serve", *sys.argv[1:]], prog_name="python -m deft_server")
